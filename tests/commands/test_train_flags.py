"""lcnn-zoo train speaks timm train.py's flags: each one is an option of the same name and meaning, an
alias, a no-op, or refused in one line saying why (lcnn_zoo/commands/train_flags.py) — checked against timm's
own argument list below, kept as data: every add_argument option string of train.py in
huggingface/pytorch-image-models at commit aa4b5850 (timm 1.0.29.dev0, 2026-08-08; the installed timm
is 1.0.31, whose wheel and sdist do not ship train.py)."""
import dataclasses
import shlex

import pytest
import torch

from lcnn_zoo.commands.config import TrainConfig
from lcnn_zoo.commands.options import train_config
from lcnn_zoo.commands.train_flags import ALIASES, NO_OPS, REFUSED
from lcnn_zoo.errors import UserError

from cli_helpers import fails_with

TIMM_TRAIN_FLAGS = """
-c --config --data-dir --dataset --train-split --val-split --train-num-samples --val-num-samples
--dataset-download --class-map --input-img-mode --input-key --target-key
--dataset-trust-remote-code --model --pretrained --pretrained-path --initial-checkpoint --resume
--no-resume-opt --num-classes --gp --img-size --in-chans --input-size --crop-pct --mean --std
--interpolation -b --batch-size -vb --validation-batch-size --channels-last --fuser
--grad-accum-steps --grad-checkpointing --fast-norm --model-kwargs --head-init-scale
--head-init-bias --torchcompile-mode --torchscript --torchcompile --device --amp --amp-dtype
--model-dtype --no-ddp-bb --synchronize-step --local_rank --device-modules --opt --opt-eps
--opt-betas --momentum --weight-decay --clip-grad --clip-mode --layer-decay --layer-decay-min-scale
--layer-decay-no-opt-scale --opt-kwargs --sched --sched-on-updates --lr --lr-base --lr-base-size
--lr-base-scale --lr-noise --lr-noise-pct --lr-noise-std --lr-cycle-mul --lr-cycle-decay
--lr-cycle-limit --lr-k-decay --warmup-lr --min-lr --epochs --epoch-repeats --start-epoch
--decay-milestones --decay-epochs --warmup-epochs --cooldown-epochs --patience-epochs --decay-rate
--dr --no-aug --scale --ratio --hflip --vflip --color-jitter --color-jitter-prob --grayscale-prob
--gaussian-blur-prob --aug-repeats --aug-splits --jsd-loss --bce-loss --bce-sum --bce-target-thresh
--bce-pos-weight --reprob --remode --recount --resplit --mixup --cutmix --cutmix-minmax
--mixup-prob --mixup-switch-prob --mixup-mode --mixup-off-epoch --smoothing --train-interpolation
--drop --drop-connect --drop-path --drop-block --bn-momentum --bn-eps --sync-bn --dist-bn
--split-bn --model-ema --model-ema-force-cpu --model-ema-decay --model-ema-warmup --seed
--worker-seeding --log-interval --val-interval --recovery-interval --checkpoint-hist -j --workers
--save-images --pin-mem --no-prefetcher --output --experiment --eval-metric --tta
--use-multi-epochs-loader --log-wandb --wandb-project --wandb-tags --wandb-resume-id
--train-img-sizes --train-batch-sizes --train-size-probs --train-size-schedule
--train-size-schedule-spread --train-size-random-mix --train-batches-per-epoch
--train-steps-per-epoch --variable-batch-loss-scale --naflex-loader --naflex-train-seq-lens
--naflex-max-seq-len --naflex-patch-sizes --naflex-patch-size-probs --naflex-loss-scale
--naflex-patchify-channels-first --kd-model-name --kd-distill-type --kd-loss-type
--distill-loss-weight --task-loss-weight --kd-temperature --kd-student-feature-dim
--kd-teacher-feature-dim --kd-token-distill-type --warmup-prefix --train-crop-mode --aa
""".split()

OURS = {"--" + f.name.replace("_", "-") for f in dataclasses.fields(TrainConfig)}
# timm flags with a value, and one to give them (flags absent here are switches or take a string)
VALUES = {"--img-size": "32", "--log-interval": "10", "--dist-bn": "reduce", "--in-chans": "1",
          "--input-size": "1 28 28", "-b": "8", "--batch-size": "8",
          "-vb": "8", "--validation-batch-size": "8", "-j": "2", "--workers": "2", "--grad-accum-steps": "2",
          "--model-kwargs": "logit_scale=2", "--torchcompile-mode": "default", "--amp-dtype": "float16",
          "--opt": "adamw", "--opt-eps": "1e-8", "--opt-betas": "0.9 0.99", "--momentum": "0.8",
          "--weight-decay": "1e-4", "--clip-grad": "1.0", "--clip-mode": "value", "--opt-kwargs": "foreach=True",
          "--sched": "cosine", "--lr": "0.05", "--lr-noise": "0.5", "--lr-noise-pct": "0.5", "--lr-noise-std": "0.5",
          "--lr-cycle-mul": "2.0", "--lr-cycle-decay": "0.3", "--lr-cycle-limit": "2", "--lr-k-decay": "0.5",
          "--warmup-lr": "1e-4", "--min-lr": "1e-5", "--epochs": "3", "--decay-milestones": "1 2",
          "--decay-epochs": "1", "--warmup-epochs": "1", "--cooldown-epochs": "1", "--decay-rate": "0.5",
          "--dr": "0.5", "--hflip": "0.3", "--vflip": "0.1", "--reprob": "0.2", "--remode": "const",
          "--recount": "2", "--mixup": "0.2", "--cutmix": "0.2", "--cutmix-minmax": "0.2 0.8", "--mixup-prob": "0.5",
          "--mixup-switch-prob": "0.3", "--mixup-mode": "pair", "--mixup-off-epoch": "2", "--smoothing": "0.1",
          "--drop": "0.1", "--drop-path": "0.1", "--bn-momentum": "0.05", "--bn-eps": "1e-4",
          "--model-ema-decay": "0.99", "--seed": "1", "--val-interval": "2", "--bce-target-thresh": "0.2",
          "--bce-pos-weight": "2.0", "--aa": "rand-m9-mstd0.5", "--gp": "max", "--device": "cpu",
          "--num-classes": "10", "--dataset": "torch/fashion_mnist", "--model": "lcnn_resnet20",
          "--local_rank": "0", "--experiment": "x", "--torchcompile": "inductor", "--train-split": "tr",
          "--val-split": "te"}
STRING_FLAGS = {"-c", "--config", "--data-dir", "--pretrained-path", "--initial-checkpoint", "--resume", "--output"}


def test_every_timm_train_flag_is_ours_an_alias_a_no_op_or_refused_and_nothing_else_is_listed():
    missing = [f for f in TIMM_TRAIN_FLAGS if f not in OURS and f not in ALIASES and f not in NO_OPS
               and f not in REFUSED]
    assert missing == [], f"timm train.py flags lcnn-zoo train neither takes nor refuses: {missing}"
    listed = set(ALIASES) | set(NO_OPS) | set(REFUSED)
    assert sorted(listed - set(TIMM_TRAIN_FLAGS)) == []  # no entry for a flag timm does not have
    assert not (set(REFUSED) & OURS) and not (set(NO_OPS) & OURS) and not (set(ALIASES) & OURS)
    for alias, field in ALIASES.items():
        assert "--" + field.replace("_", "-") in OURS, alias
    taken = [f for f in TIMM_TRAIN_FLAGS if f not in REFUSED]
    assert len(taken) >= 95, len(taken)  # of the 178 option strings; the other 83 are refused with a reason


@pytest.mark.parametrize("flag", [f for f in TIMM_TRAIN_FLAGS if f not in REFUSED and f not in STRING_FLAGS])
def test_a_taken_timm_flag_parses_with_timms_meaning(flag):
    argv = [flag, *shlex.split(VALUES.get(flag, ""))]
    cfg = train_config(argv)
    name = ALIASES.get(flag, flag.lstrip("-").replace("-", "_"))
    if flag in NO_OPS:
        assert cfg == train_config([])
    elif flag == "--torchcompile":
        assert cfg.compile is True
    elif flag == "--dataset":
        assert cfg.dataset == "fmnist"
    else:
        assert hasattr(cfg, name), flag
        assert getattr(cfg, name) != getattr(TrainConfig(), name) or flag in ("--device", "--model"), flag


@pytest.mark.parametrize("flag", sorted(REFUSED))
def test_a_refused_timm_flag_says_why_in_one_line(flag, capsys):
    with pytest.raises(UserError) as err:
        train_config([flag, "1"])
    msg = str(err.value)
    assert msg == f"{flag} (timm train.py's) is not taken by lcnn-zoo train: {REFUSED[flag]}"
    assert "\n" not in msg and len(msg) < 300


def test_timms_dataset_spellings_and_size_parts(tmp_path):
    assert train_config(["--dataset", "torch/cifar10"]).dataset == "cifar10"
    assert train_config(["--dataset", "hfds/foo/bar"]).dataset == "hf:foo/bar"
    assert train_config(["--dataset", "", "--data-dir", "/data/x"]).dataset == "folder:/data/x"
    with pytest.raises(UserError, match="needs --data-dir"):
        train_config(["--dataset", ""])
    (tmp_path / "train").mkdir()
    assert train_config(["--data-dir", str(tmp_path)]).dataset == f"folder:{tmp_path}"  # timm's --data-dir alone
    assert train_config(["--data-dir", str(tmp_path), "--dataset", "fmnist"]).dataset == "fmnist"
    with pytest.raises(UserError, match="--in-chans 3 contradicts --input-size 1 28 28"):
        train_config(["--in-chans", "3", "--input-size", "1", "28", "28"])
    with pytest.raises(UserError, match="inductor only"):
        train_config(["--torchcompile", "eager"])


def test_a_timm_train_command_line_runs_with_the_reg_added(tmp_path):
    """A train.py command line (its names: -b, -j, --drop, --drop-path, --aa, --reprob, --clip-grad,
    --grad-accum-steps, --grad-checkpointing, --min-lr, --warmup-lr, --no-prefetcher, --in-chans,
    --img-size, --dataset torch/…) with `python train.py` replaced by `lcnn-zoo train`."""
    from lcnn_zoo.commands.training import train
    line = ("--dataset torch/fashion_mnist --model lcnn_resnet20 -b 32 -j 0 --lr 0.05 --epochs 2 --sched cosine "
            "--warmup-epochs 1 --warmup-lr 0.01 --min-lr 1e-4 --drop 0.1 --drop-path 0.05 --aa rand-m9-mstd0.5 "
            "--reprob 0.25 --remode const --hflip 0.5 --clip-grad 2.0 --clip-mode norm --grad-accum-steps 2 "
            "--grad-checkpointing --in-chans 1 --img-size 16 --no-prefetcher --smoothing 0.1 --model-ema "
            "--model-ema-warmup --seed 1")
    cfg = train_config(shlex.split(line) + ["--reg", "lcnn_gradreg", "--train-subset", "128", "--test-subset", "64",
                                            "--no-progress", "--output", str(tmp_path), "--experiment", "timm"])
    summary = train(cfg)
    assert list(summary["input_size"]) == [1, 16, 16]  # --in-chans and --img-size are its parts
    h = summary["history"][-1]
    assert torch.isfinite(torch.tensor(h["train_loss"])) and h["train_grad_sq"] > 0
    assert summary["history"][0]["lr"] == pytest.approx(0.01)  # warm-up starts at --warmup-lr


def test_gradient_accumulation_steps_on_the_mean_of_the_batches_gradients():
    """--grad-accum-steps k: one optimizer step per k batches, on the mean of their gradients (so a
    penalty added to each batch's loss counts once), clipped after unscaling."""
    from types import SimpleNamespace

    from lcnn_zoo.commands.training import _optimizer_step
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(3))
    batches = [torch.randn(3) for _ in range(2)]
    for b in batches:
        (w * b).sum().backward()
    cfg = SimpleNamespace(clip_grad=None, clip_mode="norm", sched_on_updates=False)
    run = SimpleNamespace(cfg=cfg, core=torch.nn.ParameterList([w]), scaler=None, ema=None, scheduler=None,
                          optimizer=torch.optim.SGD([w], lr=1.0), updates=0)
    before = w.detach().clone()
    _optimizer_step(run, 2)
    torch.testing.assert_close(w.detach(), before - (batches[0] + batches[1]) / 2)
    assert w.grad is None and run.updates == 1
    (w * 10.0).sum().backward()
    run.cfg.clip_grad = 0.5
    before = w.detach().clone()
    _optimizer_step(run, 1)
    assert float((before - w.detach()).norm()) == pytest.approx(0.5, rel=1e-5)  # the step is the clipped gradient


def test_a_timm_line_on_an_image_folder_with_its_split_names_runs(tmp_path):
    """`python train.py --data-dir D --train-split train --val-split test …` → `lcnn-zoo train …`: --data-dir
    alone is an image folder, as in timm, and the split flags name its sub-folders."""
    import numpy as np
    from PIL import Image

    from lcnn_zoo.commands.training import train
    g = np.random.default_rng(0)
    for split, n in (("train", 40), ("test", 16)):
        for i in range(n):
            d = tmp_path / "data" / split / f"c{i % 2}"
            d.mkdir(parents=True, exist_ok=True)
            Image.fromarray(g.integers(0, 255, (12, 12), dtype=np.uint8), "L").save(d / f"{i}.png")
    line = f"--data-dir {tmp_path / 'data'} --train-split train --val-split test --model lcnn_resnet20 -b 8 --epochs 1"
    cfg = train_config(shlex.split(line) + ["--no-progress", "--output", str(tmp_path / "runs"), "--in-chans", "1"])
    assert cfg.dataset == f"folder:{tmp_path / 'data'}"
    summary = train(cfg)
    assert summary["classes"] == ["c0", "c1"] and list(summary["input_size"]) == [1, 12, 12]
    with pytest.raises(UserError, match="has no 'nope' split"):
        train(train_config(shlex.split(line) + ["--val-split", "nope", "--output", str(tmp_path / "runs2")]))
    assert not (tmp_path / "runs2").exists()


def test_the_command_refuses_a_timm_flag_with_exit_code_2_and_writes_nothing(tmp_path, capsys):
    fails_with(capsys, ["train", "--output", str(tmp_path / "runs"), "--aug-splits", "3"],
               "--aug-splits (timm train.py's) is not taken by lcnn-zoo train: AugMix split batches")
    assert not (tmp_path / "runs").exists()


def test_every_refused_flag_of_a_command_line_is_reported_at_once():
    """A timm command line with several refused flags is fixed in one rerun (issue 32): one message,
    each flag with its reason, in the order given; a flag given twice is named once."""
    flags = [f for f in sorted(REFUSED)][:3]
    argv = ["--lr", "0.1"] + [a for f in flags for a in (f, "1")] + [flags[0], "2"]
    with pytest.raises(UserError) as err:
        train_config(argv)
    msg = str(err.value)
    assert msg.startswith("3 of timm train.py's flags are not taken by lcnn-zoo train: ")
    assert msg.count(flags[0]) == 1 and all(f"{f}: {REFUSED[f]}" in msg for f in flags)
    assert "\n" not in msg
