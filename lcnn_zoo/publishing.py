"""Publishing trained weights: a Hub repo folder (:func:`save_pretrained`) with its model card, the
upload (:func:`push_folder`, recorded in the user's published manifest), and shipping weights
inside the package (:func:`bundle`, with the manifest's checksum and measured accuracy).

Nothing here deletes or overwrites a file it did not write: a repo folder is written only into an
empty folder or over a previous push of the same model (or, with ``overwrite``, its three files are
replaced and everything else is left alone); a shipped tag is replaced only when asked, with its old
and new accuracy printed; bundling measures before it writes, and writes the weights before the
manifest entry that vouches for them.
"""
from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path
from string import Template
from typing import Any, Dict, Optional, Sequence

import torch
from huggingface_hub import HfApi, get_token
from timm.models import save_for_hf
from torch import nn

from . import hub
from .checkpoint import (
    RunFolder,
    atomic_write,
    load_state_dict,
    read_json,
    write_json,
    write_text,
)
from .data import build_dataset
from .errors import UserError
from .factory import create_model, split_spec, state_dict_shapes
from .hub import (
    HUB_FILENAME,
    bundled_manifest,
    hub_id,
    published_manifest_path,
    tag_dataset,
)
from .layers import converge_spectral_norms
from .layers.spectral_norm import deferred_convergence

__all__ = ["PUSH_FILES", "save_pretrained", "push_folder", "record_published", "bundle", "select_metrics",
           "metrics_table", "render_recipe", "render_model_card", "find_model_card_template"]

PUSH_FILES = (HUB_FILENAME, "config.json", "README.md")
BUNDLE_EVAL_IMAGES = 1000  # the manifest's accuracy: the first 1,000 test images


def _previous_push_of(folder: Path, architecture: str) -> bool:
    config = folder / "config.json"
    if not config.is_file():
        return False
    try:
        return read_json(config).get("architecture") == architecture
    except UserError:
        return False


def save_pretrained(model: nn.Module, output_dir: str | os.PathLike, *, model_card: str,
                    overwrite: bool = False) -> Path:
    """Write a Hub repo folder: ``model.safetensors``, timm's ``config.json`` and ``README.md``.

    ``output_dir`` must be new, empty, or a previous push of the same architecture holding only
    those three files; with ``overwrite`` those three are replaced in any folder and nothing else in
    it is touched. Each file is written to a temporary file and renamed into place.
    """
    out = Path(output_dir)
    if out.exists() and not out.is_dir():
        raise UserError(f"--output-dir {out} is a file, not a folder")
    architecture = model.pretrained_cfg.get("architecture", "") if hasattr(model, "pretrained_cfg") else ""
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        foreign = sorted(p.name for p in out.iterdir() if p.name not in PUSH_FILES)
        if foreign or not _previous_push_of(out, architecture):
            raise UserError(f"--output-dir {out} is not empty and is not a previous push of {architecture} "
                            f"(it holds {', '.join(foreign) or 'the files of another model'}): choose a new folder, "
                            f"or pass --overwrite to replace only {', '.join(PUSH_FILES)} in it")
    with tempfile.TemporaryDirectory(prefix="lcnn-zoo-push-") as staging:
        save_for_hf(model, staging, safe_serialization=True)
        read_json(Path(staging) / "config.json")  # sanity: timm wrote valid JSON
        out.mkdir(parents=True, exist_ok=True)
        for name in (HUB_FILENAME, "config.json"):
            data = (Path(staging) / name).read_bytes()
            atomic_write(out / name, lambda f, d=data: f.write(d))
    write_text(out / "README.md", model_card)
    return out


def push_folder(folder: str | os.PathLike, repo_id: str, *, token: Optional[str] = None, private: bool = False,
                commit_message: str = "Add lcnn-zoo weights") -> str:
    """Upload a folder written by :func:`save_pretrained` to ``repo_id``; returns the commit URL."""
    token = token or get_token()
    if not token:
        raise UserError("No Hugging Face token: run `hf auth login` or set HF_TOKEN to push")
    api = HfApi(token=token)
    api.create_repo(repo_id, exist_ok=True, private=private, repo_type="model")
    info = api.upload_folder(repo_id=repo_id, folder_path=str(folder), commit_message=commit_message)
    return str(getattr(info, "commit_url", info))


def record_published(tag: str, repo_id: str, folder: Path) -> Path:
    """Add ``tag`` → ``repo_id`` to the user's published manifest, so ``pretrained=True`` on the tag
    finds the upload (``weights_location`` reads it at import)."""
    path = published_manifest_path()
    manifest = read_json(path, "published manifest") if path.is_file() else {}
    digest = hashlib.sha256((folder / HUB_FILENAME).read_bytes()).hexdigest()
    manifest[tag] = {"repo_id": repo_id, "sha256": digest}
    return write_json(path, manifest)


# --------------------------------------------------------------------------------------------
# Shipping weights in the package
# --------------------------------------------------------------------------------------------
@torch.no_grad()
def _first_images_accuracy(model: nn.Module, dataset: str) -> float:
    ds = build_dataset(dataset, train=False)
    x, y = ds.images[:BUNDLE_EVAL_IMAGES].float() / 255.0, ds.labels[:BUNDLE_EVAL_IMAGES]
    return 100.0 * (model.eval()(x).argmax(1) == y).float().mean().item()


def bundle(folder: Path, tag: str, model: nn.Module, *, metrics: Optional[dict], eval_command: str,
           replace: bool = False) -> float:
    """Ship ``folder``'s weights as ``lcnn_zoo/weights/<tag>.safetensors`` with a manifest entry (sha256
    and the accuracy on the first 1,000 test images, measured *before* anything is written).

    Replacing a shipped tag needs ``replace`` and prints the old and new accuracy. The weights are
    written before the manifest entry that vouches for them; a bundle stopped in between leaves a
    file whose checksum the manifest does not have, which loading refuses. Returns the accuracy.
    """
    dataset = tag_dataset(tag)
    if dataset not in ("fmnist", "cifar10", "cifar100"):
        raise UserError(f"--bundle: cannot tell the dataset of {tag} (its tag must start with fmnist, cifar10 or "
                        f"cifar100)")
    manifest = bundled_manifest()
    old = manifest.get(tag)
    if old is not None and not replace:
        raise UserError(f"{tag} is already shipped (accuracy {old.get('accuracy_first1000')}% on the first "
                        f"{BUNDLE_EVAL_IMAGES} test images): pass --replace-shipped to replace it")
    data = (folder / HUB_FILENAME).read_bytes()
    accuracy = round(_first_images_accuracy(model, dataset), 2)
    if old is not None:
        print(f"replacing the shipped {tag}: accuracy on the first {BUNDLE_EVAL_IMAGES} test images "
              f"{old.get('accuracy_first1000')}% → {accuracy}%")
    atomic_write(hub.WEIGHTS_DIR / f"{tag}.safetensors", lambda f: f.write(data))
    manifest[tag] = {"sha256": hashlib.sha256(data).hexdigest(), "accuracy_first1000": accuracy,
                     "eval_command": eval_command, "metrics": metrics or {}}
    write_json(hub.WEIGHTS_DIR / "manifest.json", dict(sorted(manifest.items())))
    return accuracy
# --------------------------------------------------------------------------------------------
# Model cards
# --------------------------------------------------------------------------------------------
_TEMPLATE_BEGIN, _TEMPLATE_END = "<!-- BEGIN HUB TEMPLATE -->", "<!-- END HUB TEMPLATE -->"
_KIND_DESCRIPTIONS = {
    "lcnn": "low-curvature neural network (LCNN)",
    "softplus": "softplus-β=1e3 baseline (the paper's \"standard\" model)",
    "relu": "plain ReLU baseline",
}
_METRIC_LABELS = {
    "accuracy": "clean accuracy (%)",
    "grad_norm_mean": "E‖∇ₓℓ‖₂",
    "hessian_norm_mean": "E‖∇²ₓℓ‖₂",
    "curvature_mean": "E normalised curvature C(x)",
}
_DATASET_NAMES = {"cifar10": "CIFAR-10", "cifar100": "CIFAR-100", "fmnist": "Fashion-MNIST"}


def find_model_card_template(path: Optional[str | os.PathLike] = None) -> str:
    """The Hub template block of MODEL_CARD.md (given path, ./MODEL_CARD.md, or the repo root's)."""
    candidates = [Path(path)] if path else [Path.cwd() / "MODEL_CARD.md",
                                            Path(__file__).resolve().parents[1] / "MODEL_CARD.md"]
    for c in candidates:
        if c.is_file():
            text = c.read_text(encoding="utf-8")
            if _TEMPLATE_BEGIN not in text or _TEMPLATE_END not in text:
                raise UserError(f"{c} has no '{_TEMPLATE_BEGIN}' ... '{_TEMPLATE_END}' block")
            return text.split(_TEMPLATE_BEGIN, 1)[1].split(_TEMPLATE_END, 1)[0].lstrip("\n")
    raise UserError(f"MODEL_CARD.md template not found (looked at {', '.join(map(str, candidates))}); "
                    "run from a clone of lcnn-zoo or pass --template")



def select_metrics(data: Dict[str, Any], names: Sequence[str]) -> Dict[str, Any]:
    """One model's metrics from what ``lcnn-zoo eval`` wrote.

    ``data`` is either a single model's metrics or a whole ``eval.json`` (``{"results": {name: metrics}}``);
    in the latter case the entry is the first of ``names`` present, or the only one. Raises
    :class:`UserError` naming the entries when none matches, so a card never shows another model's numbers.
    """
    results = data.get("results")
    if not isinstance(results, dict):
        return data
    for name in names:
        if name in results:
            return results[name]
    if len(results) == 1:
        return next(iter(results.values()))
    raise UserError(f"the metrics file holds several models ({', '.join(results)}) and none is named "
                     f"{' or '.join(map(repr, names))}: pass --metrics-key")


def _fmt(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def metrics_table(metrics: Optional[Dict[str, Any]]) -> str:
    """Markdown table of one model's measured metrics (what ``lcnn-zoo eval`` wrote; nothing else)."""
    if not metrics:
        return "No metrics were measured for this upload."
    m = dict(metrics)
    rows = []
    if "accuracy" in m:
        rows.append((_METRIC_LABELS["accuracy"] + (f", {m['test_samples']} test images" if "test_samples" in m else ""),
                     _fmt(m.pop("accuracy"))))
        m.pop("test_samples", None)
    n_geo = m.pop("geometry_samples", None)
    for key in ("grad_norm", "hessian_norm", "curvature"):
        if f"{key}_mean" in m:
            mean, std = m.pop(f"{key}_mean"), m.pop(f"{key}_std", None)
            label = _METRIC_LABELS[f"{key}_mean"] + (f" ({n_geo} test images)" if n_geo else "")
            rows.append((label, _fmt(mean) + (f" ± {_fmt(std)}" if std is not None else "")))
    pgd = m.pop("pgd_l2", None)
    if isinstance(pgd, dict):
        steps, n = m.pop("pgd_steps", None), m.pop("pgd_samples", None)
        how = ", ".join(s for s in (f"{steps} steps" if steps else "", f"{n} test images" if n else "") if s)
        for eps, acc in pgd.items():
            rows.append((f"accuracy (%) under ℓ2-PGD, ε={eps}" + (f" ({how})" if how else ""), _fmt(acc)))
    disc = m.pop("train_test_discrepancy", None)
    if isinstance(disc, dict):
        for key, v in disc.items():
            rows.append((f"train/test relative discrepancy of {key}", _fmt(v)))
    m.pop("train_geometry", None)
    m.pop("gradient_robustness", None)
    m.pop("dataset", None)
    for key, value in m.items():  # anything else measured, as it was recorded
        if isinstance(value, (int, float)):
            rows.append((_METRIC_LABELS.get(key, key), _fmt(value)))
        elif isinstance(value, dict):
            rows += [(f"{key} {sub}", _fmt(v)) for sub, v in value.items() if isinstance(v, (int, float))]
    lines = ["| metric | value |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in rows]
    return "\n".join(lines)


def render_recipe(text: str, path: str = "") -> str:
    """The card's training section: a YAML config is shown as the command and the config."""
    if path.endswith((".yaml", ".yml")):
        return f"Trained with `lcnn-zoo train --config {path}`:\n\n```yaml\n{text.strip()}\n```"
    return text


def render_model_card(template: str, *, model_name: str, repo_id: str, cfg: Dict[str, Any], kind: str,
                      metrics: Optional[Dict[str, Any]] = None, recipe: str = "", eval_command: str = "",
                      dataset: str = "", classes: Sequence[str] = ()) -> str:
    """Fill the template's ``${...}`` fields (string.Template; unknown fields raise). ``dataset``
    defaults to the tag's (``.fmnist`` → Fashion-MNIST); ``classes``: the class names, in label order."""
    dataset = dataset or tag_dataset(model_name) or "unknown"
    n = cfg.get("num_classes")
    if classes:
        classes_line = f"Classes ({len(classes)}, in label order): {', '.join(map(str, classes))}."
    else:
        classes_line = f"{n} classes." if n else ""
    return Template(template).substitute(
        model_id=repo_id.split("/")[-1], model_name=model_name, repo_id=repo_id,
        architecture=model_name.split(".")[0], kind_description=_KIND_DESCRIPTIONS.get(kind, kind),
        dataset=dataset, dataset_description=_DATASET_NAMES.get(dataset, dataset), classes_line=classes_line,
        input_size="×".join(str(s) for s in cfg.get("input_size", ())),
        recipe=recipe or "Not recorded.", eval_command=eval_command or "not recorded",
        metrics_table=metrics_table(metrics),
    )


# --------------------------------------------------------------------------------------------
# `lcnn-zoo push`
# --------------------------------------------------------------------------------------------
def _run_info(checkpoint: Path) -> Dict[str, Any]:
    """The run folder's summary when the checkpoint is (in) one, else {}."""
    folder = checkpoint if checkpoint.is_dir() else checkpoint.parent
    return RunFolder(folder).summary() if RunFolder.is_run(folder) else {}


def publish(checkpoint: str | os.PathLike, model_name: str, *, output_dir: Optional[str] = None,
            overwrite: bool = False, metrics_path: Optional[str] = None, metrics_key: Optional[str] = None,
            recipe_path: Optional[str] = None, eval_command: str = "", dataset: str = "",
            classes: Sequence[str] = (), template: Optional[str] = None, repo_id: Optional[str] = None,
            ema: bool = False, upload: bool = False, ship: bool = False, replace_shipped: bool = False,
            private: bool = False) -> Path:
    """Everything ``lcnn-zoo push`` does: build ``model_name``'s architecture for the checkpoint's
    input size and classes (a new tag name is fine), load the weights, write the repo folder with
    its card, then optionally ship them in the package and upload them. Returns the folder."""
    from .checkpoint import RunFolder
    if "." not in model_name:
        raise UserError(f"--model must be '<architecture>.<tag>' (e.g. lcnn_resnet20.fmnist), got {model_name!r}")
    arch, tag = split_spec(model_name)
    source = Path(checkpoint)
    weights = RunFolder(source).weights() if source.is_dir() else source
    state = load_state_dict(weights, use_ema=ema)
    info = _run_info(source)
    size, n_classes = state_dict_shapes(arch, state)
    size, n_classes = info.get("input_size") or size, info.get("num_classes") or n_classes
    try:
        with deferred_convergence():  # the checkpoint brings its singular vectors
            model = create_model(arch, input_size=size, num_classes=n_classes)
            model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise UserError(f"checkpoint {weights} does not match {arch}: {str(e).splitlines()[0]}") from e
    if ema:
        converge_spectral_norms(model, n_iter=50, tol=1e-6)  # averaged singular vectors are not singular vectors
    model.eval()
    model.pretrained_cfg = {**model.pretrained_cfg, "architecture": arch, "tag": tag,
                            "num_classes": model.num_classes}
    metrics = None
    if metrics_path:
        names = [n for n in (metrics_key, model_name, (source if source.is_dir() else source.parent).name) if n]
        metrics = select_metrics(read_json(metrics_path, "--metrics file"), names)
    repo = repo_id or hub_id(arch, tag)
    recipe = render_recipe(Path(recipe_path).read_text(encoding="utf-8"), recipe_path) if recipe_path else ""
    card = render_model_card(find_model_card_template(template), model_name=model_name, repo_id=repo,
                             cfg=model.pretrained_cfg, kind=getattr(model, "kind", "lcnn"), metrics=metrics,
                             recipe=recipe, eval_command=eval_command, dataset=dataset or info.get("dataset", ""),
                             classes=list(classes) or info.get("classes") or ())
    folder = save_pretrained(model, Path(output_dir) if output_dir else Path("hub") / f"{arch}.{tag}",
                             model_card=card, overwrite=overwrite)
    print(f"wrote {folder} ({', '.join(PUSH_FILES)})")
    if ship:
        accuracy = bundle(folder, model_name, model, metrics=metrics, eval_command=eval_command,
                          replace=replace_shipped)
        print(f"bundled {hub.WEIGHTS_DIR / (model_name + '.safetensors')} (accuracy on the first "
              f"{BUNDLE_EVAL_IMAGES} test images: {accuracy:.2f}%)")
    if upload:
        print("uploaded:", push_folder(folder, repo, private=private))
        print(f"recorded {model_name} → {repo} in {record_published(model_name, repo, folder)}")
    return folder
