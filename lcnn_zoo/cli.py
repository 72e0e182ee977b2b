"""The ``lcnn-zoo`` command line."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Dict, List, Optional

import torch

__all__ = ["main", "load_checkpoint_state_dict"]


def load_checkpoint_state_dict(path: str | Path, *, use_ema: bool = False) -> Dict[str, torch.Tensor]:
    """Read a state dict from ``.safetensors`` or a training checkpoint (``torch.load(weights_only=True)``;
    nothing is unpickled). Training checkpoints hold it under ``state_dict`` (``state_dict_ema``)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except Exception as e:  # noqa: BLE001 - safetensors raises several types
            raise ValueError(f"{path} is not a valid safetensors file (truncated or corrupted?): {e}") from e
    try:
        ckpt = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001
        raise ValueError(f"cannot read checkpoint {path} with weights_only=True: {e}") from e
    if isinstance(ckpt, dict) and ("state_dict" in ckpt or "state_dict_ema" in ckpt):
        key = "state_dict_ema" if use_ema else "state_dict"
        if key not in ckpt:
            raise KeyError(f"{path} has no '{key}' entry (keys: {sorted(ckpt)})")
        ckpt = ckpt[key]
    if not isinstance(ckpt, dict) or not all(isinstance(v, torch.Tensor) for v in ckpt.values()):
        raise ValueError(f"{path} does not contain a state dict of tensors")
    return {k.removeprefix("module."): v for k, v in ckpt.items()}


def _cmd_push(args: argparse.Namespace) -> int:
    import timm

    from . import hub
    from .layers import converge_spectral_norms

    if "." not in args.model:
        raise SystemExit(f"--model must be '<architecture>.<tag>' (e.g. lcnn_resnet20.fmnist), got {args.model!r}")
    arch, tag = args.model.split(".", 1)
    model = timm.create_model(args.model, pretrained=False)
    state = load_checkpoint_state_dict(args.checkpoint, use_ema=args.ema)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise SystemExit(f"checkpoint {args.checkpoint} does not match {args.model}: {e}") from e
    if args.ema:
        converge_spectral_norms(model, n_iter=50, tol=1e-6)  # averaged singular vectors are not singular vectors
    model.eval()
    metrics = json.loads(Path(args.metrics).read_text()) if args.metrics else None
    repo_id = args.repo_id or hub.hub_id(arch, tag)
    card = hub.render_model_card(
        hub.find_model_card_template(args.template), model_name=args.model, repo_id=repo_id,
        cfg=model.pretrained_cfg, kind=getattr(model, "kind", "lcnn"), metrics=metrics,
        recipe=Path(args.recipe).read_text() if args.recipe else "", eval_command=args.eval_command or "")
    out = Path(args.output_dir) if args.output_dir else Path("hub") / repo_id.split("/")[-1]
    folder = hub.save_pretrained(model, out, model_card=card)
    print(f"wrote {folder} (model.safetensors, config.json, README.md)")
    if args.upload:
        print("uploaded:", hub.push_folder(folder, repo_id, private=args.private))
    return 0


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="lcnn-zoo", description="Low-curvature neural networks for timm users")
    sub = ap.add_subparsers(dest="command", required=True)
    p = sub.add_parser("push", help="write (and optionally upload) a Hub repo folder for a trained checkpoint")
    p.add_argument("checkpoint", help=".safetensors state dict or a training checkpoint (.pth)")
    p.add_argument("--model", required=True, help="'<architecture>.<tag>', e.g. lcnn_resnet20.fmnist")
    p.add_argument("--output-dir", help="folder to write (default: hub/<model>.<tag>)")
    p.add_argument("--metrics", help="JSON written by `lcnn-zoo eval` for the model card")
    p.add_argument("--recipe", help="text file describing the training recipe for the model card")
    p.add_argument("--eval-command", help="the command that produced --metrics, quoted in the card")
    p.add_argument("--template", help="MODEL_CARD.md to take the template from")
    p.add_argument("--repo-id", help="Hub repo id (default: $LCNN_ZOO_HUB_NAMESPACE/<model>.<tag>)")
    p.add_argument("--ema", action="store_true", help="publish the EMA weights of a training checkpoint")
    p.add_argument("--upload", action="store_true", help="upload with huggingface_hub (needs a token)")
    p.add_argument("--private", action="store_true", help="create the Hub repo as private")
    p.set_defaults(func=_cmd_push)
    return ap


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
