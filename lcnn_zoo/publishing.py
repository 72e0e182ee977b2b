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
import json
import os
import tempfile
from pathlib import Path
from string import Template
from typing import Any, Dict, Optional, Sequence, cast

import torch
from huggingface_hub import HfApi, get_token
from huggingface_hub import constants as hf_constants
from timm.models import save_for_hf
from torch import nn

from . import hub
from .checkpoint import (
    RunFolder,
    load_state_dict,
    read_json,
    write_json,
)
from .data import build_dataset
from .errors import UserError, shown
from .evaluation import first_samples
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
from .writing import Transaction, check_name, check_writable_parent, file_lock

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


def check_output_dir(out: Path, architecture: str, overwrite: bool) -> None:
    """The push folder rule (see :func:`save_pretrained`), checked before anything is built or written."""
    if os.path.lexists(out) and not out.is_dir():
        raise UserError(f"--output-dir {shown(Path(out))} is a file, not a folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        foreign = sorted(p.name for p in out.iterdir() if p.name not in PUSH_FILES)
        if foreign or not _previous_push_of(out, architecture):
            raise UserError(f"--output-dir {shown(Path(out))} is not empty and is not a previous push of {architecture} "
                            f"(it holds {shown(', '.join(foreign), 60) if foreign else 'the files of another model'}): "
                            f"choose a new folder, or pass --overwrite to replace only {', '.join(PUSH_FILES)} in it")
    check_writable_parent(out, "--output-dir")


def save_pretrained(model: nn.Module, output_dir: str | os.PathLike, *, model_card: str,
                    overwrite: bool = False) -> Path:
    """Write a Hub repo folder: ``model.safetensors``, timm's ``config.json`` and ``README.md``.

    ``output_dir`` must be new, empty, or a previous push of the same architecture holding only
    those three files; with ``overwrite`` those three are replaced in any folder and nothing else in
    it is touched. The three files change together (:class:`~lcnn_zoo.writing.Transaction`: written
    under temporary names, renamed, restored on failure), the card last.
    """
    out = Path(output_dir)
    architecture = ""
    if hasattr(model, "pretrained_cfg"):
        architecture = cast(Dict[str, Any], model.pretrained_cfg).get("architecture", "")
    check_output_dir(out, architecture, overwrite)
    with tempfile.TemporaryDirectory(prefix="lcnn-zoo-push-") as staging:
        save_for_hf(model, staging, safe_serialization=True)
        read_json(Path(staging) / "config.json")  # sanity: timm wrote valid JSON
        tx = Transaction()
        for name in (HUB_FILENAME, "config.json"):
            tx.add(out / name, (Path(staging) / name).read_bytes())
        tx.add(out / "README.md", model_card)
        tx.commit()
    return out


def check_upload_possible(token: Optional[str] = None) -> str:
    """A token, and a Hub that answers (the loading side's 3 s probe), or a one-line :class:`UserError`."""
    token = token or get_token()
    if not token:
        raise UserError("No Hugging Face token: run `hf auth login` or set HF_TOKEN to push")
    if hf_constants.HF_HUB_OFFLINE:
        raise UserError("--upload: HF_HUB_OFFLINE is set; unset it to upload")
    reason = hub.hub_unreachable_reason()
    if reason is not None:
        raise UserError(f"--upload: the Hugging Face Hub cannot be reached ({reason}); the folder is written, upload "
                        f"it later with `hf upload`")
    # the upload is recorded in the published manifest afterwards: a damaged entry there is named now
    hub.read_manifest(published_manifest_path(), strict=True)
    return token


def push_folder(folder: str | os.PathLike, repo_id: str, *, token: Optional[str] = None, private: bool = False,
                commit_message: str = "Add lcnn-zoo weights") -> str:
    """Upload a folder written by :func:`save_pretrained` to ``repo_id``; returns the commit URL."""
    token = check_upload_possible(token)
    api = HfApi(token=token)
    api.create_repo(repo_id, exist_ok=True, private=private, repo_type="model")
    info = api.upload_folder(repo_id=repo_id, folder_path=str(folder), commit_message=commit_message)
    return str(getattr(info, "commit_url", info))


def record_published(tag: str, repo_id: str, folder: Path) -> Path:
    """Add ``tag`` → ``repo_id`` to the user's published manifest, so ``pretrained=True`` on the tag
    finds the upload (``weights_location`` reads it at import)."""
    path = published_manifest_path()
    digest = hashlib.sha256((folder / HUB_FILENAME).read_bytes()).hexdigest()
    config = read_json(folder / "config.json", "model config (config.json)")
    with file_lock(path.with_name(f".{path.name}.lock"), f"{path} (another push updates it)"):
        manifest = hub.read_manifest(path, strict=True)  # a damaged entry is named, never dropped or rewritten
        manifest[tag] = {"repo_id": repo_id, "sha256": digest, "num_classes": config.get("num_classes"),
                         "input_size": list(config.get("pretrained_cfg", {}).get("input_size") or [])}
        return write_json(path, manifest)


# --------------------------------------------------------------------------------------------
# Shipping weights in the package
# --------------------------------------------------------------------------------------------
@torch.no_grad()
def _first_images_accuracy(model: nn.Module, test_ds) -> float:
    x, y = first_samples(test_ds, BUNDLE_EVAL_IMAGES)
    return 100.0 * (model.eval()(x).argmax(1) == y).float().mean().item()


def bundle_dataset(tag: str, model: nn.Module, run: Dict[str, Any]):
    """The test split ``bundle`` measures on: the run's own dataset (its summary's ``dataset`` and
    ``--data-dir``), else the tag's; its class count must be the model's."""
    dataset = run.get("dataset") or tag_dataset(tag)
    if not dataset or (dataset not in ("fmnist", "cifar10", "cifar100") and not dataset.startswith("folder:")):
        raise UserError(f"--bundle: cannot tell the dataset of {shown(tag)} (bundle a run folder, which records it, "
                        f"or use a tag starting with fmnist, cifar10 or cifar100)")
    size = tuple(cast(Dict[str, Any], model.pretrained_cfg).get("input_size") or ()) or None
    ds = build_dataset(dataset, train=False, data_dir=run.get("data_dir"), classes=run.get("classes") or None,
                       channels=size[0] if size else None, image_size=size[1:] if size else None,
                       eval_on_train=bool(run.get("eval_on_train")))
    n = len(getattr(ds, "classes", []) or [])
    if n and n != model.num_classes:
        raise UserError(f"--bundle: the model has {model.num_classes} classes and its test data ({shown(dataset)}) has "
                        f"{n}: bundle the run folder it was trained in, so it is measured on its own classes")
    return dataset, ds


def bundle(folder: Path, tag: str, model: nn.Module, *, metrics: Optional[dict], eval_command: str,
           replace: bool = False, run: Optional[Dict[str, Any]] = None) -> float:
    """Ship ``folder``'s weights in the package with a manifest entry (sha256, the accuracy on the
    first 1,000 test images of the run's own data, the class count and input size that let timm
    build the tag), all measured *before* anything is written. Returns the accuracy.

    A transaction under the weights folder's lock (concurrent bundles wait their turn): the weights
    go to a new content-addressed file ``<tag>.<sha256[:12]>.safetensors``, then the manifest is
    replaced in one rename to point at it — the commit — and only then is the replaced file
    removed. A bundle stopped at any point leaves the manifest and the files it names as they were
    before or after, never a file under another's checksum. Replacing a shipped tag needs ``replace``.
    """
    dataset, test_ds = bundle_dataset(tag, model, run or {})
    data = (folder / HUB_FILENAME).read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    accuracy = round(_first_images_accuracy(model, test_ds), 2)
    with file_lock(hub.WEIGHTS_DIR / ".manifest.lock", f"{hub.WEIGHTS_DIR} (another bundle is writing it)"):
        manifest = bundled_manifest(strict=True)  # under the lock: a concurrent bundle's entry is kept
        old = manifest.get(tag)
        if old is not None and not replace:
            raise UserError(f"{tag} is already shipped (accuracy {old.get('accuracy_first1000')}% on the first "
                            f"{BUNDLE_EVAL_IMAGES} test images): pass --replace-shipped to replace it")
        if old is not None:
            print(f"replacing the shipped {tag}: accuracy on the first {BUNDLE_EVAL_IMAGES} test images "
                  f"{old.get('accuracy_first1000')}% → {accuracy}%")
        new_file = f"{tag}.{digest[:12]}.safetensors"
        old_file = hub.bundled_file(tag, old) if old is not None else None
        manifest[tag] = {"sha256": digest, "file": new_file, "accuracy_first1000": accuracy, "dataset": dataset,
                         "num_classes": int(cast(int, model.num_classes)),
                         "input_size": list(cast(Dict[str, Any], model.pretrained_cfg).get("input_size") or []),
                         "eval_command": eval_command, "metrics": metrics or {}}
        tx = Transaction()
        tx.add(hub.WEIGHTS_DIR / new_file, data)
        tx.add(hub.WEIGHTS_DIR / "manifest.json", json.dumps(dict(sorted(manifest.items())), indent=2) + "\n")
        tx.commit()
        referenced = {hub.bundled_file(t, e).name for t, e in manifest.items()}
        for p in hub.WEIGHTS_DIR.glob(f"{tag}*.safetensors"):  # the replaced file, and orphans of killed bundles
            if p.name not in referenced and p.name.startswith(f"{tag}.") and (p == old_file or _ours(p.name, tag)):
                p.unlink()
    return accuracy


def _ours(name: str, tag: str) -> bool:
    """Whether ``name`` is a content-addressed weights file a bundle of ``tag`` wrote."""
    rest = name[len(tag) + 1:].removesuffix(".safetensors")
    return len(rest) == 12 and all(c in "0123456789abcdef" for c in rest)


# --------------------------------------------------------------------------------------------
# Model cards
# --------------------------------------------------------------------------------------------
_TEMPLATE_BEGIN, _TEMPLATE_END = "<!-- BEGIN HUB TEMPLATE -->", "<!-- END HUB TEMPLATE -->"
_FLAVOUR_DESCRIPTIONS = {
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


def render_model_card(template: str, *, model_name: str, repo_id: str, cfg: Dict[str, Any], flavour: str,
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
    values = dict(
        model_id=repo_id.split("/")[-1], model_name=model_name, repo_id=repo_id,
        architecture=model_name.split(".")[0], flavour_description=_FLAVOUR_DESCRIPTIONS.get(flavour, flavour),
        dataset=dataset, dataset_description=_DATASET_NAMES.get(dataset, dataset), classes_line=classes_line,
        input_size="×".join(str(s) for s in cfg.get("input_size", ())),
        recipe=recipe or "Not recorded.", eval_command=eval_command or "not recorded",
        metrics_table=metrics_table(metrics))
    try:
        return Template(template).substitute(values)
    except (KeyError, ValueError) as e:
        raise UserError(f"the model card template has a field it cannot fill ({shown(str(e), 60)}): use ${{name}} "
                        f"fields from MODEL_CARD.md's template, and $$ for a literal $") from e


# --------------------------------------------------------------------------------------------
# `lcnn-zoo push`
# --------------------------------------------------------------------------------------------
def _run_info(checkpoint: Path) -> Dict[str, Any]:
    """The run folder's summary when the checkpoint is (in) one, else {}."""
    folder = checkpoint if checkpoint.is_dir() else checkpoint.parent
    if not RunFolder.is_run(folder):
        return {}
    run = RunFolder(folder)
    args = run.args()
    return {"data_dir": args.get("data_dir"), "eval_on_train": args.get("eval_on_train"), **run.summary()}


def _read_text(path: str, option: str) -> str:
    p = Path(path)
    if not p.is_file():
        raise UserError(f"{option} {shown(path)}: no such file")
    try:
        return p.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"{option} {shown(path)} is not a UTF-8 text file") from e


def _read_metrics(path: str, names: Sequence[str]) -> Dict[str, Any]:
    data = read_json(path, "--metrics file")
    if not isinstance(data, dict):
        raise UserError(f"--metrics {shown(path)} holds a {type(data).__name__}, not what `lcnn-zoo eval` writes "
                        f"(a mapping with 'results')")
    metrics = select_metrics(data, names)
    if not isinstance(metrics, dict):
        raise UserError(f"--metrics {shown(path)}: the model's entry is a {type(metrics).__name__}, not a mapping")
    return metrics


def _load_for_push(weights: Path, arch: str, info: Dict[str, Any], ema: bool) -> nn.Module:
    state = load_state_dict(weights, use_ema=ema)
    size, n_classes = state_dict_shapes(arch, state)
    size, n_classes = info.get("input_size") or size, info.get("num_classes") or n_classes
    try:
        with deferred_convergence():  # the checkpoint brings its singular vectors
            model = create_model(arch, input_size=size, num_classes=n_classes)
            model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise UserError(f"checkpoint {shown(Path(weights))} does not match {arch}: {shown(str(e).splitlines()[0], 160)}") from e
    if ema:
        converge_spectral_norms(model, n_iter=50, tol=1e-6)  # averaged singular vectors are not singular vectors
    return model.eval()


def publish(checkpoint: str | os.PathLike, model_name: str, *, output_dir: Optional[str] = None,
            overwrite: bool = False, metrics_path: Optional[str] = None, metrics_key: Optional[str] = None,
            recipe_path: Optional[str] = None, eval_command: str = "", dataset: str = "",
            classes: Sequence[str] = (), template: Optional[str] = None, repo_id: Optional[str] = None,
            ema: bool = False, upload: bool = False, ship: bool = False, replace_shipped: bool = False,
            private: bool = False, allow_unfinished: bool = False) -> Path:
    """Everything ``lcnn-zoo push`` does: build ``model_name``'s architecture for the checkpoint's
    input size and classes (a new tag name is fine), load the weights, write the repo folder with
    its card, then optionally ship them in the package and upload them. Returns the folder.

    Every input (name, template, recipe, metrics, output folder, the shipped tag, the bundle's test
    data, the Hub) is checked, and the card rendered, before the first file is written. A run that
    has not finished (still training, or stopped) is refused unless ``allow_unfinished``: then its
    ``last.pth`` is published and the card says from which epoch."""
    if "." not in model_name:
        raise UserError(f"--model must be '<architecture>.<tag>' (e.g. lcnn_resnet20.fmnist), got {shown(model_name)}")
    check_name(model_name, "--model")  # it names files and folders: never a path
    arch, tag = split_spec(model_name)
    source = Path(checkpoint)
    if not source.exists():
        raise UserError(f"checkpoint not found: {shown(Path(source))}")
    run_state = None
    if source.is_dir():  # a run folder: its final weights, or with --ema the checkpoint that holds the EMA copy
        run_state = RunFolder(source).require_finished("lcnn-zoo push", allow_unfinished)
        latest = ema or not run_state.finished  # an unfinished run's newest weights are in last.pth
        weights = RunFolder(source).file(RunFolder.LAST) if latest else RunFolder(source).weights()
    else:
        weights = source
        if source.name == RunFolder.LAST and RunFolder.is_run(source.parent):  # a run's mid-training weights?
            run_state = RunFolder(source.parent).require_finished("lcnn-zoo push", allow_unfinished)
    template_text = find_model_card_template(template)
    recipe = render_recipe(_read_text(recipe_path, "--recipe"), recipe_path) if recipe_path else ""
    metrics = None
    if metrics_path:
        names = [n for n in (metrics_key, model_name, (source if source.is_dir() else source.parent).name) if n]
        metrics = _read_metrics(metrics_path, names)
    out = Path(output_dir) if output_dir else Path("hub") / f"{arch}.{tag}"
    check_output_dir(out, arch, overwrite)
    if ship and model_name in bundled_manifest() and not replace_shipped:
        old = bundled_manifest()[model_name]
        raise UserError(f"{model_name} is already shipped (accuracy {old.get('accuracy_first1000')}% on the first "
                        f"{BUNDLE_EVAL_IMAGES} test images): pass --replace-shipped to replace it")
    if upload:
        check_upload_possible()
    info = _run_info(source)
    model = _load_for_push(weights, arch, info, ema)
    # (timm's pretrained_cfg is a dict attribute; nn.Module's stubs type attributes as Tensor | Module)
    model.pretrained_cfg = {  # type: ignore[assignment]
        **cast(Dict[str, Any], model.pretrained_cfg), "architecture": arch, "tag": tag,
        "num_classes": model.num_classes}
    if ship:
        bundle_dataset(model_name, model, info)  # the test data exists and has the model's classes
    repo = repo_id or hub_id(arch, tag)
    card = render_model_card(template_text, model_name=model_name, repo_id=repo,
                             cfg=cast(Dict[str, Any], model.pretrained_cfg), flavour=getattr(model, "flavour", "lcnn"),
                             metrics=metrics, recipe=recipe, eval_command=eval_command,
                             dataset=dataset or info.get("dataset", ""),
                             classes=list(classes) or info.get("classes") or ())
    if run_state is not None and not run_state.finished:  # --allow-unfinished: the card says so
        card = card.rstrip("\n") + (f"\n\n**Unfinished run.** These weights are from epoch {run_state.epoch} of "
                                    f"{run_state.epochs or '?'} of a run that was {run_state.status} when they were "
                                    f"pushed (`lcnn-zoo push --allow-unfinished`).\n")
    folder = save_pretrained(model, out, model_card=card, overwrite=overwrite)
    print(f"wrote {folder} ({', '.join(PUSH_FILES)})")
    if ship:
        accuracy = bundle(folder, model_name, model, metrics=metrics, eval_command=eval_command,
                          replace=replace_shipped, run=info)
        print(f"bundled {hub.bundled_file(model_name)} (accuracy on the first {BUNDLE_EVAL_IMAGES} test images of "
              f"{bundled_manifest()[model_name]['dataset']}: {accuracy:.2f}%)")
    if upload:
        print("uploaded:", push_folder(folder, repo, private=private))
        print(f"recorded {model_name} → {repo} in {record_published(model_name, repo, folder)}")
    return folder
