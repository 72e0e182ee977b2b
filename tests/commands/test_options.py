"""lcnn_zoo.commands.options: the option parser made from TrainConfig's fields — YAML, then the command line,
each checked; the shipped configs parse."""
import re
from pathlib import Path

import pytest

from lcnn_zoo.commands.options import train_config as parse_args
from lcnn_zoo.errors import UserError

REPO = Path(__file__).resolve().parents[2]


def test_config_and_cli_override(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("model: lcnn_resnet56\nepochs: 7\nlambda-grad: 0.5\ndecay_milestones: [3, 5]\n")
    args = parse_args(["--config", str(cfg), "--epochs", "9"])
    assert args.model == "lcnn_resnet56" and args.epochs == 9 and args.lambda_grad == 0.5
    assert args.decay_milestones == [3, 5]
    bad = tmp_path / "bad.yaml"
    bad.write_text("modle: x\n")
    with pytest.raises(UserError):
        parse_args(["--config", str(bad)])
    with pytest.raises(UserError):
        parse_args(["--config", str(tmp_path / "missing.yaml")])
    with pytest.raises(UserError):
        parse_args(["--lambda-beta", "-1"])


def test_shipped_configs_parse():
    for cfg in sorted((REPO / "configs").glob("*.yaml")):
        args = parse_args(["--config", str(cfg)])
        assert args.epochs > 0, cfg


def test_key_values_are_python_literals_or_strings_and_a_bad_item_is_one_line():
    args = parse_args(["--model-kwargs", "logit_scale=2.5", "act=relu", "sizes=(1, 2)", "flag=True"])
    assert args.model_kwargs == {"logit_scale": 2.5, "act": "relu", "sizes": (1, 2), "flag": True}
    with pytest.raises(UserError, match="--model-kwargs: expected KEY=VALUE, got 'oops'"):
        parse_args(["--model-kwargs", "oops"])


def test_every_field_is_an_option_and_its_kind_decides_the_flag():
    """Each TrainConfig field is reachable from the command line: a flag named after it (``--no-<name>``
    for a switch that is on by default), and a value given there lands in that field."""
    import dataclasses

    from lcnn_zoo.commands.config import TrainConfig
    from lcnn_zoo.commands.options import fields_parser

    parser = fields_parser(TrainConfig, "t", "")
    flags = {s for a in parser._actions for s in a.option_strings}  # argparse exposes no public list
    for f in dataclasses.fields(TrainConfig):
        dashed = f.name.replace("_", "-")
        on = f.metadata["kind"] == "bool" and f.default is True
        assert (f"--no-{dashed}" if on else f"--{dashed}") in flags, f.name
    assert parse_args(["--input-size", "1", "20", "20"]).input_size == [1, 20, 20]
    assert parse_args(["--decay-milestones", "3", "6"]).decay_milestones == [3, 6]
    with pytest.raises(UserError, match="invalid int value"):
        parse_args(["--epochs", "three"])


@pytest.mark.parametrize("command", ["train", "eval", "push", "quickstart"])
def test_help_states_each_default_once_and_names_every_value(command, capsys):
    """--help (issue 32): no option says its default twice or "(default: None)", and the usage line
    shows a name for every value (argparse shows ==SUPPRESS== for an argument without a destination)."""
    from lcnn_zoo.commands.cli import main

    with pytest.raises(SystemExit):
        main([command, "--help"])
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines anywhere
    assert "SUPPRESS" not in text
    assert "(default: None)" not in text
    assert not re.search(r"\(default[^)]*\) \(default", text)
