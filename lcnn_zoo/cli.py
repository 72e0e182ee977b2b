"""The ``lcnn-zoo`` command line."""
from __future__ import annotations

import argparse
import json
import shlex
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
    metrics = None
    if args.metrics:
        # A whole eval.json: this model's entry, by --metrics-key, tag name or run-folder name.
        names = [n for n in (args.metrics_key, args.model, Path(args.checkpoint).resolve().parent.name) if n]
        try:
            metrics = hub.select_metrics(json.loads(Path(args.metrics).read_text()), names)
        except (OSError, ValueError) as e:
            raise SystemExit(f"--metrics {args.metrics}: {e}") from e
    repo_id = args.repo_id or hub.hub_id(arch, tag)
    recipe = hub.render_recipe(Path(args.recipe).read_text(), args.recipe) if args.recipe else ""
    card = hub.render_model_card(
        hub.find_model_card_template(args.template), model_name=args.model, repo_id=repo_id,
        cfg=model.pretrained_cfg, kind=getattr(model, "kind", "lcnn"), metrics=metrics,
        recipe=recipe, eval_command=args.eval_command or "")
    out = Path(args.output_dir) if args.output_dir else Path("hub") / repo_id.split("/")[-1]
    folder = hub.save_pretrained(model, out, model_card=card)
    print(f"wrote {folder} (model.safetensors, config.json, README.md)")
    if args.bundle:
        _bundle(folder, args.model, metrics, args.eval_command or "")
    if args.upload:
        print("uploaded:", hub.push_folder(folder, repo_id, private=args.private))
    return 0


def _bundle(folder: Path, tag: str, metrics: Optional[dict], eval_command: str) -> None:
    """Ship the folder's weights inside the package (lcnn_zoo/weights) with a manifest entry: sha256
    and the accuracy on the first 1,000 test images, measured now through timm's loading path."""
    import hashlib
    import os
    import shutil

    import timm

    from . import hub
    from .data import build_dataset

    dataset = hub.tag_dataset(tag)
    if dataset not in ("fmnist", "cifar10", "cifar100"):
        raise SystemExit(f"--bundle: cannot tell the dataset of {tag}")
    hub.WEIGHTS_DIR.mkdir(exist_ok=True)
    target = hub.WEIGHTS_DIR / f"{tag}.safetensors"
    tmp = target.with_suffix(".tmp")
    shutil.copyfile(folder / "model.safetensors", tmp)
    os.replace(tmp, target)
    manifest = hub.bundled_manifest()
    manifest[tag] = {"sha256": hashlib.sha256(target.read_bytes()).hexdigest()}
    _write_manifest(manifest)
    model = timm.create_model(tag, pretrained=True).eval()
    ds = build_dataset(dataset, train=False)
    x, y = ds.images[:1000].float() / 255.0, ds.labels[:1000]
    with torch.no_grad():
        acc = 100.0 * (model(x).argmax(1) == y).float().mean().item()
    manifest[tag].update({"accuracy_first1000": round(acc, 2), "eval_command": eval_command, "metrics": metrics or {}})
    _write_manifest(manifest)
    print(f"bundled {target} (accuracy on the first 1,000 test images: {acc:.2f}%)")


def _write_manifest(manifest: dict) -> None:
    import os

    from . import hub

    path = hub.WEIGHTS_DIR / "manifest.json"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


def _eval_config(args: argparse.Namespace):
    from .evaluation import EvalConfig

    return EvalConfig(limit=args.limit, geom_samples=args.geom_samples, pgd_samples=args.pgd_samples,
                      pgd_steps=args.pgd_steps, eps=tuple(args.eps), noise_samples=args.noise_samples,
                      hvp_iters=args.hvp_iters, batch_size=args.batch_size, seed=args.seed,
                      progress=not args.no_progress)


def _cmd_eval(args: argparse.Namespace) -> int:
    from .evaluation import markdown_report, run_eval

    if args.threads:
        torch.set_num_threads(args.threads)
    # The whole command line, so eval.md / eval.json say exactly how to regenerate them.
    command = "lcnn-zoo " + shlex.join(args.argv)
    results = run_eval(args.models, args.dataset, data_dir=args.data_dir, download=args.download, arch=args.arch,
                       cfg=_eval_config(args), output=Path(args.output), command=command)
    print(markdown_report(results))
    print(f"wrote {Path(args.output) / 'eval.json'}, eval.md and gradient_robustness.png")
    return 0


def _cmd_quickstart(args: argparse.Namespace) -> int:
    from .quickstart import run_quickstart

    return run_quickstart(output=Path(args.output), threads=args.threads, progress=not args.no_progress)


def _add_eval_options(p: argparse.ArgumentParser) -> None:
    from .evaluation import EvalConfig

    d = EvalConfig()
    p.add_argument("--limit", type=int, default=d.limit, help="test images for accuracy (0: all)")
    p.add_argument("--geom-samples", type=int, default=d.geom_samples, help="images for Tables 1 and 3 (per split)")
    p.add_argument("--pgd-samples", type=int, default=d.pgd_samples, help="test images for Table 2")
    p.add_argument("--pgd-steps", type=int, default=d.pgd_steps)
    p.add_argument("--eps", type=float, nargs="+", default=list(d.eps), help="ℓ2 radii (input units)")
    p.add_argument("--noise-samples", type=int, default=d.noise_samples, help="images for Figure 2")
    p.add_argument("--hvp-iters", type=int, default=d.hvp_iters, help="Lanczos steps per image")
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--seed", type=int, default=d.seed)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="lcnn-zoo", description="Low-curvature neural networks for timm users")
    sub = ap.add_subparsers(dest="command", required=True)
    p = sub.add_parser("quickstart", help="train a standard and an LCNN+GradReg model on Fashion-MNIST and compare")
    p.add_argument("--output", default="runs/quickstart")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: leave)")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=_cmd_quickstart)
    sub.add_parser("train", help="train a model (all options: lcnn-zoo train --help)", add_help=False)
    p = sub.add_parser("eval", help="the paper's measurements for one or more models, side by side")
    p.add_argument("models", nargs="+", help="registry name[.tag], local-dir:/hf-hub: name, run folder or checkpoint")
    p.add_argument("--dataset", default="fmnist", help="cifar10 | cifar100 | fmnist | folder:<path> | hf:<name>")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--download", action="store_true")
    p.add_argument("--arch", default=None, help="architecture for checkpoints that do not record it")
    p.add_argument("--output", default="runs/eval", help="folder for eval.json, eval.md and plots")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--no-progress", action="store_true")
    _add_eval_options(p)
    p.set_defaults(func=_cmd_eval)
    p = sub.add_parser("push", help="write (and optionally upload) a Hub repo folder for a trained checkpoint")
    p.add_argument("checkpoint", help=".safetensors state dict or a training checkpoint (.pth)")
    p.add_argument("--model", required=True, help="'<architecture>.<tag>', e.g. lcnn_resnet20.fmnist")
    p.add_argument("--output-dir", help="folder to write (default: hub/<model>.<tag>)")
    p.add_argument("--metrics", help="eval.json written by `lcnn-zoo eval`, for the model card")
    p.add_argument("--metrics-key", help="which model of a multi-model eval.json (default: the --model name, "
                                          "then the checkpoint's run-folder name)")
    p.add_argument("--recipe", help="the training config (.yaml) or a text file describing the recipe, for the card")
    p.add_argument("--eval-command", help="the command that produced --metrics, quoted in the card")
    p.add_argument("--template", help="MODEL_CARD.md to take the template from")
    p.add_argument("--repo-id", help="Hub repo id (default: $LCNN_ZOO_HUB_NAMESPACE/<model>.<tag>)")
    p.add_argument("--ema", action="store_true", help="publish the EMA weights of a training checkpoint")
    p.add_argument("--upload", action="store_true", help="upload with huggingface_hub (needs a token)")
    p.add_argument("--bundle", action="store_true",
                   help="also ship the weights inside the package (lcnn_zoo/weights) for offline pretrained=True")
    p.add_argument("--private", action="store_true", help="create the Hub repo as private")
    p.set_defaults(func=_cmd_push)
    return ap


def main(argv: Optional[List[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] == "train":  # all of `lcnn-zoo train`'s options belong to the training parser
        from .training import main as train_main

        return train_main(argv[1:])
    args = build_parser().parse_args(argv)
    args.argv = argv
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
