"""lcnn_zoo.commands.config: every option is validated before any work, in one line naming the option."""
import pytest

from cli_helpers import fails_with


@pytest.mark.parametrize("yaml_text,argv,fragment", [
    ("", ["--train-subset", "-5"], "--train-subset must be >= 0"),
    ('no_flip: "false"\n', [], "true or false"),
    ("lambda_beta: .nan\n", [], "finite"),
    ("decay_milestones: 5\n", [], "list of integers"),
    ("input_size: 28\n", [], "three integers"),
    ("epochs: 0\n", [], "c.yaml: epochs must be >= 1"),
    ("reg: lcnnn\n", [], "one of none, lcnn"),
])
def test_options_are_validated_before_any_work(tmp_path, capsys, yaml_text, argv, fragment):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml_text)
    fails_with(capsys, ["train", "--config", str(cfg), "--output", str(tmp_path / "runs")] + argv, fragment)
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("kind,fragment", [("fifo", "a named pipe (FIFO)"), ("device", "a character device")])
def test_a_config_that_is_a_fifo_or_a_device_is_said_so_not_opened(tmp_path, capsys, kind, fragment):
    """Hostile pass of issue 31, P9: `--config` a FIFO or /dev/zero said "config file not found"."""
    import os

    cfg = tmp_path / "c.yaml"
    os.mkfifo(cfg) if kind == "fifo" else cfg.symlink_to("/dev/zero")
    fails_with(capsys, ["train", "--config", str(cfg), "--output", str(tmp_path / "runs")],
               "c.yaml is not a regular file", fragment)
    assert not (tmp_path / "runs").exists()


def test_threads_has_an_upper_bound(capsys, tmp_path):
    """Hostile pass, T6: --threads 100000 gave a MemoryError while reading the data, then a segfault."""
    from lcnn_zoo.commands.config import THREADS_MAX

    fails_with(capsys, ["train", "--threads", str(THREADS_MAX + 1), "--output", str(tmp_path / "runs")],
               "--threads must be <=")
    for command in (["eval", "lcnn_resnet20.fmnist"], ["quickstart"]):
        fails_with(capsys, [*command, "--threads", "100000", "--output", str(tmp_path / "out")],
                   "--threads: must be <=")
    assert not (tmp_path / "runs").exists() and not (tmp_path / "out").exists()
