"""lcnn_zoo.commands.factory: model names (registry tags, ``local-dir:``, other timm models converted), what a
state dict says about its model, and initial checkpoints loaded into a new run's model."""
import pytest
import timm
import torch
from safetensors.torch import save_file

import lcnn_zoo  # noqa: F401  (registers the models)
from lcnn_zoo.commands.factory import (
    create_model,
    input_size_of,
    is_lcnn,
    is_zoo_architecture,
    load_initial,
    split_spec,
    state_dict_shapes,
)
from lcnn_zoo.errors import UserError

from cli_helpers import FAST_LCNN_RUN, fails_with, files_under, needs_fmnist


def test_names_split_into_architecture_and_tag():
    assert split_spec("lcnn_resnet20.fmnist") == ("lcnn_resnet20", "fmnist")
    assert split_spec("lcnn_resnet20") == ("lcnn_resnet20", "")
    assert split_spec("local-dir:/some/where") == ("local-dir:/some/where", "")
    assert is_zoo_architecture("lcnn_resnet20.cifar10") and not is_zoo_architecture("resnet18")
    with pytest.raises(UserError, match="neither a model name nor a checkpoint"):
        split_spec("/tmp/x/weights")


def test_create_model_builds_for_the_size_asked_and_converts_other_timm_models():
    zoo = create_model("lcnn_resnet20", input_size=(1, 20, 20), num_classes=4)
    assert is_lcnn(zoo) and input_size_of(zoo) == (1, 20, 20) and zoo(torch.rand(2, 1, 20, 20)).shape == (2, 4)
    plain = create_model("resnet10t", input_size=(3, 32, 32), num_classes=3)
    assert not is_lcnn(plain) and input_size_of(plain) == (3, 32, 32)
    converted = create_model("resnet10t", input_size=(3, 32, 32), num_classes=3, convert=True)
    assert is_lcnn(converted) and converted.lcnn_report.input_size == (3, 32, 32)
    with pytest.raises(UserError, match="unknown model 'nope_net'"):
        create_model("nope_net")


def test_a_state_dict_tells_its_input_size_and_classes():
    state = timm.create_model("lcnn_resnet20", in_chans=1, img_size=(28, 28), num_classes=7).state_dict()
    assert state_dict_shapes("lcnn_resnet20", state) == ((1, 28, 28), 7)
    assert state_dict_shapes("lcnn_resnet20.fmnist", {}) == (None, None)


def test_initial_checkpoint_keeps_an_explicit_logit_scale(tmp_path):
    save_file(timm.create_model("lcnn_resnet20", logit_scale=2.0).state_dict(), tmp_path / "w.safetensors")
    kept = timm.create_model("lcnn_resnet20", logit_scale=5.0)
    load_initial(kept, str(tmp_path / "w.safetensors"), keep=("logit_scale",))
    assert kept.logit_scale.item() == 5.0
    loaded = timm.create_model("lcnn_resnet20", logit_scale=5.0)
    load_initial(loaded, str(tmp_path / "w.safetensors"))
    assert loaded.logit_scale.item() == 2.0


def test_an_initial_checkpoint_of_part_of_the_model_is_refused_unless_allowed(tmp_path, capsys):
    full = timm.create_model("lcnn_resnet20", num_classes=10).state_dict()
    part = {k: v for k, v in full.items() if not k.startswith("stages.2.")}
    save_file(part, tmp_path / "part.safetensors")
    model = timm.create_model("lcnn_resnet20", num_classes=10)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(UserError, match="covers only part of .*pass --allow-partial"):
        load_initial(model, tmp_path / "part.safetensors")
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # nothing loaded
    load_initial(model, tmp_path / "part.safetensors", allow_partial=True)
    assert "left as initialised (--allow-partial)" in capsys.readouterr().err
    assert torch.equal(model.state_dict()["stem.conv.weight" if "stem.conv.weight" in full else "conv1.weight"],
                       full["stem.conv.weight" if "stem.conv.weight" in full else "conv1.weight"])
    save_file({"not.a.key": torch.zeros(1)}, tmp_path / "other.safetensors")
    with pytest.raises(UserError, match="unexpected keys"):
        load_initial(model, tmp_path / "other.safetensors")
    # another class count: the head is left as built, and said so
    save_file(timm.create_model("lcnn_resnet20", num_classes=3).state_dict(), tmp_path / "three.safetensors")
    load_initial(model, tmp_path / "three.safetensors")
    assert "re-initialised" in capsys.readouterr().err


def test_an_initial_checkpoint_wrong_in_content_is_refused(tmp_path):
    """Issue 31, case 10, for --initial-checkpoint: a float tensor relabelled I32 was cast silently."""
    from safetensors.torch import load_file

    from lcnn_zoo import hub

    from model_helpers import damaged

    model = create_model("lcnn_resnet20_softplus", input_size=(1, 28, 28), num_classes=10)
    state, name = damaged(load_file(str(hub.WEIGHTS_DIR / "lcnn_resnet20_softplus.fmnist.safetensors")), "i32")
    save_file(state, str(tmp_path / "w.safetensors"))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(UserError,
                       match=f"w.safetensors: tensor '{name}' is stored as int32 where the model has float32"):
        load_initial(model, tmp_path / "w.safetensors")
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # nothing was loaded


@needs_fmnist
def test_an_initial_checkpoint_from_a_run_that_has_not_finished_is_refused_unless_asked(tmp_path, capsys,
                                                                                        monkeypatch):
    """Hostile pass of issue 31, T8: `train --initial-checkpoint <run still training>` (or any file of
    it) silently started from its mid-training weights. Now the run-state rule of push and eval: refused
    before any data is read unless --allow-unfinished, whose run then records the epoch in args.json."""
    from lcnn_zoo.commands import training
    from lcnn_zoo.commands.checkpoint import RunFolder
    from lcnn_zoo.commands.options import train_config
    from lcnn_zoo.commands.preflight import train_plan

    from model_helpers import run_folder

    def read(*a, **k):
        raise AssertionError("the data was read")

    monkeypatch.setattr(training, "_datasets", read)
    done = run_folder(tmp_path / "done", epoch=2, epochs=2)
    stopped = run_folder(tmp_path / "stopped", epoch=2, epochs=5, finished=False)
    argv = FAST_LCNN_RUN + ["--epochs", "1", "--output", str(tmp_path / "runs"), "--initial-checkpoint"]
    with RunFolder(done).lock():
        fails_with(capsys, ["train"] + argv + [str(done / "model_best.safetensors")], "is still training at epoch 2",
                   "pass --allow-unfinished")
    for source in (stopped, stopped / "model_best.safetensors", stopped / "last.pth"):
        fails_with(capsys, ["train"] + argv + [str(source)], "is unfinished at epoch 2 of 5",
                   "`lcnn-zoo train --initial-checkpoint` would use mid-training weights", "pass --allow-unfinished")
    assert files_under(tmp_path / "runs") == []
    assert train_plan(train_config(argv + [str(done)])).initial_state.finished
    plan = train_plan(train_config(argv + [str(stopped), "--allow-unfinished"]))
    assert (plan.initial_state.epoch, plan.initial_state.epochs, plan.initial_state.status) == (2, 5, "unfinished")
