"""timm train.py's flags in ``lcnn-zoo train``: a timm command line runs with ``python train.py``
replaced by ``lcnn-zoo train`` (add ``--reg lcnn_gradreg`` for the paper's recipe).

Every train.py flag is one of: an option of the same name and meaning (most: the fields of
:class:`~lcnn_zoo.commands.config.TrainConfig`), an alias below (another name here, the same meaning), a
no-op (it concerns timm's loop only), or refused in one line saying why. Defaults may differ
(``--epochs`` 200 here, 300 in timm; ``--smoothing`` 0, 0.1): give a value to be sure.
Standard library only, so ``lcnn-zoo train --help`` needs no torch.
"""
from __future__ import annotations

from typing import Dict

__all__ = ["ALIASES", "NO_OPS", "REFUSED"]

#: train.py's name → this option (same meaning)
ALIASES: Dict[str, str] = {
    "-c": "config",
    "-b": "batch_size",
    "-vb": "validation_batch_size",
    "-j": "workers",
    "--drop": "drop_rate",
    "--dr": "decay_rate",
    "--dataset-download": "download",
    "--val-interval": "eval_every",
    "--pretrained-path": "initial_checkpoint",
    "--torchcompile": "compile",  # takes timm's optional backend name: inductor only
}

#: accepted, with nothing to do: why
NO_OPS: Dict[str, str] = {
    "--no-prefetcher": "lcnn-zoo train has no GPU prefetcher",
    "--local_rank": "the process's rank is read from torchrun's environment",
    "--sync-bn": "BatchNorm statistics are always synchronised across DDP processes",
    "--dist-bn": "BatchNorm statistics are synchronised at every step, so there is nothing to distribute at an "
                 "epoch's end",
}

_SIZES = ("an LCNN's spectral norms are computed for one input size, so training at several sizes would leave "
          "its bound unchecked at the others")
_INPUTS = ("inputs are [0, 1] images at --input-size, unnormalised (so ℓ2 radii mean what they mean in the paper) "
           "and augmented by pad-and-crop (--aug-pad), not timm's RandomResizedCrop")
_AUG = "not in lcnn-zoo's augmentation (pad-and-crop, flips, --aa, --reprob, Mixup/CutMix)"
_WANDB = "lcnn-zoo logs to the run folder only; nothing leaves the machine"
_NAFLEX = "NaFlex is timm's variable-resolution ViT loader; the zoo's models are CNNs"
_KD = "knowledge distillation is not part of lcnn-zoo train"
_SPLIT = "AugMix split batches (JSD loss, split BatchNorm) are not supported: γ-Lipschitz BatchNorm has no split form"
_LAYER_DECAY = ("layer-wise lr decay needs timm's parameter groups of the model; lcnn-zoo builds its own (β and γ "
                "without weight decay)")
_LR_BASE = "lcnn-zoo takes --lr itself (default 0.1), not an lr scaled from --lr-base by the batch size"
_HF = "hf:<name> datasets are read from their image and label columns, without remote code"
_SCRIPT = "an LCNN cannot be compiled by TorchScript (it refuses, pointing to lcnn_zoo.fold); use --torchcompile"

#: refused: why (one line each)
REFUSED: Dict[str, str] = {
    "--train-num-samples": "for timm's iterable datasets; lcnn-zoo's are indexed (see --train-subset)",
    "--val-num-samples": "for timm's iterable datasets; lcnn-zoo's are indexed (see --test-subset)",
    "--class-map": "the classes are the dataset's own (folder names, or its label names)",
    "--input-img-mode": "images are read with the channels of --input-size (or --in-chans)",
    "--input-key": _HF,
    "--target-key": _HF,
    "--dataset-trust-remote-code": _HF,
    "--no-resume-opt": "a resumed run restores its optimizer: it resumes exactly, or is refused",
    "--crop-pct": _INPUTS,
    "--mean": _INPUTS,
    "--std": _INPUTS,
    "--interpolation": _INPUTS,
    "--train-interpolation": _INPUTS,
    "--scale": _INPUTS,
    "--ratio": _INPUTS,
    "--train-crop-mode": _INPUTS,
    "--fuser": _SCRIPT,
    "--torchscript": _SCRIPT,
    "--fast-norm": "timm's fast norm is for LayerNorm/GroupNorm, which the zoo's models do not have",
    "--head-init-scale": "an LCNN's classifier is spectrally normalised: the scale of its initial weights is "
                         "normalised away",
    "--head-init-bias": "the classifier's initial bias is the model's (zero)",
    "--model-dtype": "lcnn-zoo trains float32 weights; use --amp for mixed precision",
    "--no-ddp-bb": "DDP always broadcasts buffers (BatchNorm statistics, singular vectors) here",
    "--synchronize-step": "no device synchronisation is added per step",
    "--device-modules": "lcnn-zoo train runs on cpu or cuda (--device)",
    "--layer-decay": _LAYER_DECAY,
    "--layer-decay-min-scale": _LAYER_DECAY,
    "--layer-decay-no-opt-scale": _LAYER_DECAY,
    "--lr-base": _LR_BASE,
    "--lr-base-size": _LR_BASE,
    "--lr-base-scale": _LR_BASE,
    "--patience-epochs": "for timm's plateau schedule, which is not offered (--sched: multistep, cosine, step, poly, "
                         "tanh, none)",
    "--epoch-repeats": "an epoch is one pass over the training set",
    "--start-epoch": "a run starts at epoch 0, or where --resume left it",
    "--color-jitter": _AUG,
    "--color-jitter-prob": _AUG,
    "--grayscale-prob": _AUG,
    "--gaussian-blur-prob": _AUG,
    "--aug-repeats": "repeated augmentation needs timm's RepeatAugSampler, which lcnn-zoo does not use",
    "--aug-splits": _SPLIT,
    "--jsd-loss": _SPLIT,
    "--split-bn": _SPLIT,
    "--resplit": _SPLIT,
    "--drop-connect": "drop connect is EfficientNet's; the zoo's ResNets take --drop-path",
    "--drop-block": "DropBlock is not in the zoo's CIFAR architectures",
    "--worker-seeding": "DataLoader workers are seeded from --seed",
    "--recovery-interval": "last.pth is written whole at every epoch's end; continue with --resume auto",
    "--checkpoint-hist": "a run keeps last.pth and model_best.safetensors, not a history of checkpoints",
    "--save-images": "lcnn-zoo writes no image files",
    "--eval-metric": "a run selects its best epoch by top-1",
    "--tta": "there is no test-time augmentation",
    "--use-multi-epochs-loader": "the DataLoader is rebuilt per run, not per epoch, already",
    "--log-wandb": _WANDB,
    "--wandb-project": _WANDB,
    "--wandb-tags": _WANDB,
    "--wandb-resume-id": _WANDB,
    "--train-img-sizes": _SIZES,
    "--train-batch-sizes": _SIZES,
    "--train-size-probs": _SIZES,
    "--train-size-schedule": _SIZES,
    "--train-size-schedule-spread": _SIZES,
    "--train-size-random-mix": _SIZES,
    "--variable-batch-loss-scale": _SIZES,
    "--train-batches-per-epoch": "an epoch is one pass over the training set",
    "--train-steps-per-epoch": "an epoch is one pass over the training set",
    "--naflex-loader": _NAFLEX,
    "--naflex-train-seq-lens": _NAFLEX,
    "--naflex-max-seq-len": _NAFLEX,
    "--naflex-patch-sizes": _NAFLEX,
    "--naflex-patch-size-probs": _NAFLEX,
    "--naflex-loss-scale": _NAFLEX,
    "--naflex-patchify-channels-first": _NAFLEX,
    "--kd-model-name": _KD,
    "--kd-distill-type": _KD,
    "--kd-loss-type": _KD,
    "--distill-loss-weight": _KD,
    "--task-loss-weight": _KD,
    "--kd-temperature": _KD,
    "--kd-student-feature-dim": _KD,
    "--kd-teacher-feature-dim": _KD,
    "--kd-token-distill-type": _KD,
}
