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
import html
import json
import os
import re
import tempfile
from pathlib import Path
from string import Template
from typing import Any, Dict, Optional, Sequence, Tuple, cast

import torch
from huggingface_hub import HfApi, ModelCard, ModelCardData, get_token
from huggingface_hub import constants as hf_constants
from timm.models import save_for_hf
from torch import nn

from .. import hub
from ..errors import UserError, shown
from ..hub import (
    HUB_FILENAME,
    bundled_manifest,
    hub_id,
    published_manifest_path,
    tag_dataset,
)
from ..layers import converge_spectral_norms, frozen_state
from ..layers.spectral_norm import deferred_convergence
from ..weight_checks import check_outputs, check_weights, load_mismatch, state_mismatch
from .checkpoint import (
    RunFolder,
    RunState,
    load_state_dict,
    read_json,
    write_json,
)
from .data import SOURCES, build_dataset
from .evaluation import first_samples
from .factory import create_model, input_size_of, split_spec, state_dict_shapes
from .writing import Transaction, check_name, check_writable_parent, file_lock, non_finite, not_regular

__all__ = ["PUSH_FILES", "save_pretrained", "push_folder", "record_published", "bundle", "select_metrics",
           "metrics_table", "render_recipe", "render_model_card", "build_model_card", "find_model_card_template",
           "card_dataset", "md_text", "md_code", "md_fenced"]

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
    if out.is_symlink() and not out.exists():
        raise UserError(f"--output-dir {shown(Path(out))} is a dangling symbolic link (to "
                        f"{shown(Path(os.readlink(out)))}, which does not exist): remove it, or choose another folder")
    if os.path.lexists(out) and not out.is_dir():
        raise UserError(f"--output-dir {shown(Path(out))} is a file, not a folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        foreign = sorted(p.name for p in out.iterdir() if p.name not in PUSH_FILES)
        if foreign or not _previous_push_of(out, architecture):
            raise UserError(f"--output-dir {shown(Path(out))} is not empty and is not a previous push of "
                            f"{architecture} "
                            f"(it holds {shown(', '.join(foreign), 60) if foreign else 'the files of another model'}): "
                            f"choose a new folder, or pass --overwrite to replace only {', '.join(PUSH_FILES)} in it")
    check_writable_parent(out, "--output-dir")


def save_pretrained(model: nn.Module, output_dir: str | os.PathLike, *, model_card: str,
                    overwrite: bool = False, label_names: Sequence[str] = ()) -> Path:
    """Write a Hub repo folder: ``model.safetensors``, timm's ``config.json`` and ``README.md``.
    ``label_names`` (the class names, in label order) go into ``config.json`` where timm's
    ``save_for_hf`` puts them, its top-level ``label_names``, which timm loads into the model's
    ``pretrained_cfg["label_names"]``.

    ``output_dir`` must be new, empty, or a previous push of the same architecture holding only
    those three files; with ``overwrite`` those three are replaced in any folder and nothing else in
    it is touched. The three files change together (:class:`~lcnn_zoo.commands.writing.Transaction`: written
    under temporary names, renamed, restored on failure), the card last.
    """
    out = Path(output_dir)
    architecture = ""
    if hasattr(model, "pretrained_cfg"):
        architecture = cast(Dict[str, Any], model.pretrained_cfg).get("architecture", "")
    check_output_dir(out, architecture, overwrite)
    if label_names and len(label_names) != model.num_classes:
        raise UserError(f"{len(label_names)} class names for a model with {model.num_classes} classes: give one name "
                        f"per class, in label order")
    with tempfile.TemporaryDirectory(prefix="lcnn-zoo-push-") as staging:
        save_for_hf(model, staging, safe_serialization=True,
                    model_config={"label_names": [str(c) for c in label_names]} if label_names else None)
        read_json(Path(staging) / "config.json")  # sanity: timm wrote valid JSON
        tx = Transaction()
        for name in (HUB_FILENAME, "config.json"):
            tx.add(out / name, (Path(staging) / name).read_bytes())
        tx.add(out / "README.md", model_card)
        tx.commit()
    return out


def check_upload_possible(token: Optional[str] = None) -> str:
    """A token, and a Hub that answers (huggingface_hub's request and timeout), or a one-line :class:`UserError`."""
    token = token or get_token()
    if not token:
        raise UserError("No Hugging Face token: run `hf auth login` or set HF_TOKEN to push")
    if hf_constants.HF_HUB_OFFLINE:
        raise UserError("--upload: HF_HUB_OFFLINE is set; unset it to upload")
    reason = hub.hub_unreachable_reason(token=token)
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
    finds the upload (resolved when the model is built: :func:`lcnn_zoo.hub.user_upload`)."""
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
_DATASET_NAMES = {name: s.title for name, s in SOURCES.items() if s.title}
# The Hub's own dataset repos, for the card's YAML `datasets:` (the Hub links the model to them).
_HUB_DATASETS = {name: s.hub_id for name, s in SOURCES.items() if s.hub_id}
LOCAL_DATASET = "an image folder"  # what a card says of data that lives on the uploader's machine
LOCAL_PATH = "<local path>"  # what a card shows instead of a path on the uploader's machine
# A recipe's options whose values are paths on the uploader's machine (TrainConfig's).
_LOCAL_PATH_OPTIONS = ("config", "data_dir", "output", "resume", "initial_checkpoint")


def find_model_card_template(path: Optional[str | os.PathLike] = None) -> str:
    """The Hub template block of MODEL_CARD.md (given path, ./MODEL_CARD.md, or the repo root's)."""
    candidates = [Path(path)] if path else [Path.cwd() / "MODEL_CARD.md",
                                            Path(__file__).resolve().parents[2] / "MODEL_CARD.md"]
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


def _visible(text: str, keep: str = "") -> str:
    """``text`` with each control or other non-printable character (newline, escape, U+2028) written
    as its Python escape (``\\n``), except those in ``keep``: a value cannot start a new line of
    Markdown, where ``#``, ``---`` or an indented block would take effect."""
    return "".join(c if c.isprintable() or c in keep else c.encode("unicode_escape").decode("ascii") for c in text)


# Inline Markdown (CommonMark and the Hub's extensions: tables, strikethrough, $math$) that a
# character can start; < > & are HTML-escaped instead, so no tag or entity survives. An underscore
# inside a word cannot open or close emphasis (CommonMark): lcnn_resnet20 stays as it is.
_MD_INLINE = re.compile(r"[\\`*\[\]|~$]|(?<![0-9A-Za-z])_|_(?![0-9A-Za-z])")
# What starts a heading, a list item or a setext underline when it begins a line (the template may
# put a value first on a line): "# x", "- x", "+ x", "1. x", "1) x", "---", "===".
_MD_LINE_START = re.compile(r"^(#{1,6}|[+-]|\d{1,9}[.)])(?=[ \t]|$)|^([=-])(?=[=-]*[ \t]*$)")


def md_text(value: Any) -> str:
    """``value`` as literal Markdown text on one line: what a class folder name, a dataset name or
    a metrics file's key shows in a card, without adding markup (HTML, links, emphasis, table cells).

    Args:
        value: anything; shown as ``str(value)``.
    """
    text = _MD_INLINE.sub(lambda m: "\\" + m.group(0), html.escape(_visible(str(value)), quote=False))
    return _MD_LINE_START.sub(lambda m: m.group(0)[:-1] + "\\" + m.group(0)[-1], text)


def md_code(value: str) -> str:
    """``value`` as one inline code span that it cannot close: fenced by more backticks than its
    longest run (CommonMark), padded where it starts or ends with one, on one line."""
    text = _visible(value)
    fence = "`" * (max((len(run) for run in re.findall(r"`+", text)), default=0) + 1)
    pad = " " if text.startswith("`") or text.endswith("`") else ""
    return f"{fence}{pad}{text}{pad}{fence}"


def md_fenced(text: str, info: str = "") -> str:
    """``text`` as a fenced code block that no line of it can close (a fence longer than any run of
    backticks in it); control characters other than newlines and tabs are written as escapes."""
    body = _visible(text.strip("\n"), keep="\n\t")
    fence = "`" * max(3, max((len(run) for run in re.findall(r"`+", body)), default=0) + 1)
    return f"{fence}{info}\n{body}\n{fence}"


def _fmt(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def metrics_table(metrics: Optional[Dict[str, Any]]) -> str:
    """Markdown table of one model's measured metrics (what ``lcnn-zoo eval`` wrote; nothing else).
    Every cell is literal text (:func:`md_text`): a key or value of the metrics file adds no markup."""
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
    lines += [f"| {md_text(k)} | {md_text(v)} |" for k, v in rows]
    return "\n".join(lines)


def _without_local_paths(text: str) -> str:
    """A YAML recipe with the values of its path options (``data_dir``, ``output``, …) and a
    ``folder:`` dataset replaced by placeholders: as written when it has none (comments kept), else
    re-serialised by PyYAML's safe dumper."""
    import yaml

    from .config import safe_yaml

    try:
        data = safe_yaml(text)
    except yaml.YAMLError as e:
        raise UserError(f"--recipe is not valid YAML ({shown(str(e).splitlines()[0], 120)})") from e
    if not isinstance(data, dict):
        return text
    changed = dict(data)
    for key, value in data.items():
        option = str(key).replace("-", "_")
        if option in _LOCAL_PATH_OPTIONS and isinstance(value, str) and value not in ("", "auto"):
            changed[key] = LOCAL_PATH
        elif option == "dataset" and isinstance(value, str) and value.lower().startswith("folder:"):
            changed[key] = f"folder:{LOCAL_PATH}"
    if changed == data:
        return text
    return yaml.safe_dump(changed, sort_keys=False, allow_unicode=True, default_flow_style=False)


def render_recipe(text: str, path: str = "") -> str:
    """The card's training section. A YAML config is shown as the command and the config, without
    the uploader's local paths (the config is named by its file name, or ``configs/<name>`` for one
    of the repository's; path options are placeholders); other text is the uploader's own Markdown.

    Args:
        text: the recipe file's text.
        path: its path (its suffix says whether it is a YAML config).
    """
    if path.endswith((".yaml", ".yml")):
        name = Path(path).name
        try:
            Path(path).resolve().relative_to(hub.REPO_CONFIGS.resolve())
            name = f"configs/{name}"
        except ValueError:
            pass
        return (f"Trained with {md_code(f'lcnn-zoo train --config {name}')}:\n\n"
                f"{md_fenced(_without_local_paths(text), 'yaml')}")
    return text


def _is_local_path(text: str) -> bool:
    return text.startswith(("/", "~", ".")) or "\\" in text or os.path.exists(text)


def _hub_repo(name: str) -> bool:
    """Whether ``name`` is a Hub repo id ``<namespace>/<name>`` (and not a path here)."""
    return name.count("/") == 1 and not _is_local_path(name) and _valid_repo_id(name)


def _valid_repo_id(name: str) -> bool:
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


def card_dataset(dataset: str, option: str = "--dataset") -> Tuple[Optional[str], str]:
    """What a card says of the training data: (the Hub dataset id for its YAML ``datasets:``, or
    ``None``; the words of its text, not yet escaped). Data on the uploader's machine (``folder:``,
    a path, ``hf:`` of a local folder) is "an image folder", never its path.

    Args:
        dataset: as ``train --dataset`` took it (``fmnist``, ``folder:<path>``, ``hf:<name>``) or as
            ``push --dataset`` names it (``fmnist``, ``hf:<owner>/<name>``, ``<owner>/<name>``, a word).
        option: what to name in the error.

    Raises:
        UserError: a name with control characters (a newline would start new lines of the card); an
            ``hf:`` name that is neither a Hub id nor a local folder.
    """
    name = dataset.strip()
    key = name.lower()
    if key in _HUB_DATASETS:
        return _HUB_DATASETS[key], _DATASET_NAMES[key]
    if key.startswith("folder:"):
        return None, LOCAL_DATASET
    if not name.isprintable():
        raise UserError(f"{option} {shown(dataset)} has control characters (a newline?): give the dataset's name "
                        f"on one line")
    if key.startswith("hf:"):
        name = name[3:]
        if _is_local_path(name):
            return None, LOCAL_DATASET
        if _hub_repo(name) or ("/" not in name and _valid_repo_id(name)):  # <owner>/<name>, or a canonical name
            return name, name
        # (was "an image folder": a typo such as "hf:my org/data" dropped the name and said something false)
        raise UserError(f"{option} {shown(dataset)}: {shown(name)} is not a Hub dataset id (<owner>/<name> of "
                        f"letters, digits, '-', '_' and '.') nor a local folder")
    if _hub_repo(name):
        return name, name
    if "/" in name or _is_local_path(name):
        return None, LOCAL_DATASET
    return None, name


def _without_local_path_words(command: str) -> str:
    """``command`` with each word that is an absolute or home path (also after ``--opt=`` or
    ``folder:``) replaced by a placeholder: a card quotes the command, not the uploader's folders."""
    words = []
    for word in command.split(" "):
        bare = word.strip("'\"")
        head, _, tail = bare.rpartition("=") if bare.startswith("-") else ("", "", bare)
        prefix, colon, rest = tail.partition(":") if tail.lower().startswith("folder:") else ("", "", tail)
        if rest.startswith(("/", "~")):
            word = f"{head}{'=' if head else ''}{prefix}{colon}{LOCAL_PATH}"
        words.append(word)
    return " ".join(words)


def _template_parts(template: str) -> Tuple[Dict[str, Any], str]:
    """(the template's YAML header as data, its Markdown body). The header is read with the configs'
    safe loader (aliases capped) and may hold no ``${…}`` field: it is written by huggingface_hub."""
    import yaml

    from .config import safe_yaml

    match = re.match(r"\A---[ \t]*\r?\n(.*?)\r?\n---[ \t]*(?:\r?\n|\Z)", template, re.S)
    if match is None:
        return {}, template
    try:
        meta = safe_yaml(match.group(1)) or {}
    except yaml.YAMLError as e:
        raise UserError(f"the model card template's YAML header is not valid YAML "
                        f"({shown(str(e).splitlines()[0], 120)})") from e
    if not isinstance(meta, dict):
        raise UserError("the model card template's YAML header is not a mapping of key: value")
    if "$" in match.group(1):
        raise UserError("the model card template's YAML header has a $ field: the header is written from the model's "
                        "data (datasets, license, tags); put ${…} fields in the text below it")
    return meta, template[match.end():]


def build_model_card(template: str, *, model_name: str, repo_id: str, cfg: Dict[str, Any], flavour: str,
                     metrics: Optional[Dict[str, Any]] = None, recipe: str = "", eval_command: str = "",
                     dataset: str = "", classes: Sequence[str] = ()) -> ModelCard:
    """The Hub card of one model: huggingface_hub's :class:`ModelCard` whose YAML header is a
    :class:`ModelCardData` (the template's header, ``datasets:`` from the data) serialised by the
    library, and whose text is the template's with its ``${…}`` fields filled (``string.Template``;
    unknown fields raise). Every user or data string in the text is literal (:func:`md_text`,
    :func:`md_code`); a local folder or path appears as "an image folder" or a placeholder; the
    usage line loads ``hf-hub:<repo_id>``, which works for every reader.

    Args:
        template: the Hub template block (:func:`find_model_card_template`).
        model_name: ``<architecture>.<tag>`` (checked by ``push``: a name, no path).
        repo_id: the Hub repo, ``<namespace>/<name>`` (checked by ``push``).
        cfg: the model's pretrained cfg (``num_classes``, ``input_size``).
        flavour: ``lcnn``, ``softplus`` or ``relu``.
        metrics: one model's metrics (:func:`select_metrics`).
        recipe: the training section (:func:`render_recipe`).
        eval_command: the command that measured ``metrics``, quoted as code.
        dataset: the training data (:func:`card_dataset`); default the tag's (``.fmnist``).
        classes: the class names, in label order.
    """
    meta, body = _template_parts(template)
    hub_dataset, described = card_dataset(dataset or tag_dataset(model_name) or "unknown")
    data = ModelCardData(**{"library_name": "timm", "pipeline_tag": "image-classification", **meta})
    if hub_dataset:
        data.datasets = [hub_dataset]
    n = cfg.get("num_classes")
    if classes:
        classes_line = f"Classes ({len(classes)}, in label order): {', '.join(md_text(c) for c in classes)}."
    else:
        classes_line = f"{int(n)} classes." if isinstance(n, int) else ""
    ours = described in _DATASET_NAMES.values() or described == LOCAL_DATASET
    values = dict(
        model_id=md_text(repo_id.split("/")[-1]), model_name=model_name, repo_id=repo_id,
        architecture=model_name.split(".")[0], flavour_description=md_text(_FLAVOUR_DESCRIPTIONS.get(flavour, flavour)),
        dataset=hub_dataset or md_text(described), dataset_description=described if ours else md_text(described),
        classes_line=classes_line, input_size="×".join(str(int(s)) for s in cfg.get("input_size", ())),
        recipe=recipe or "Not recorded.",
        eval_command=md_code(_without_local_path_words(eval_command)) if eval_command.strip() else "not recorded",
        metrics_table=metrics_table(metrics))
    try:
        text = Template(body).substitute(values)
    except (KeyError, ValueError) as e:
        raise UserError(f"the model card template has a field it cannot fill ({shown(str(e), 60)}): use ${{name}} "
                        f"fields from MODEL_CARD.md's template, and $$ for a literal $") from e
    return ModelCard(f"---\n{data.to_yaml()}\n---\n{text}")


def render_model_card(template: str, **fields: Any) -> str:
    """The text of :func:`build_model_card` (``README.md``), with the same keyword arguments."""
    return str(build_model_card(template, **fields))


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
    kind = not_regular(p)
    if kind is not None:  # a FIFO is never opened (it would wait for a writer), a device never read
        raise UserError(f"{option} {shown(Path(path))} is not a regular file ({kind}): pass a text file")
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
    bad = non_finite(metrics)
    if bad is not None:  # a NaN accuracy would be published as "nan" (eval of weights whose gradients overflow)
        raise UserError(f"--metrics {shown(path)}: {shown(bad[0])} is {bad[1]}, not a finite number: measure the "
                        f"model again (or leave out --metrics)")
    return metrics


def _load_for_push(weights: Path, arch: str, info: Dict[str, Any], ema: bool) -> nn.Module:
    state = load_state_dict(weights, use_ema=ema)
    size, n_classes = state_dict_shapes(arch, state)
    size, n_classes = info.get("input_size") or size, info.get("num_classes") or n_classes
    try:
        with deferred_convergence():  # the checkpoint brings its singular vectors
            model = create_model(arch, input_size=size, num_classes=n_classes)
            check_weights(state, weights, model)  # before load_state_dict, which would cast integers silently
            model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        reason = state_mismatch(model, state) or load_mismatch(e)  # tensors compared, else torch's words
        if "another architecture" not in reason:
            reason += ": these weights are for another architecture"
        raise UserError(f"checkpoint {shown(Path(weights))} does not match {arch}: {reason}") from e
    if ema:
        converge_spectral_norms(model, n_iter=50, tol=1e-6)  # averaged singular vectors are not singular vectors
    built = input_size_of(model)
    if built is not None:  # finite weights can still overflow: nothing is published that computes NaN
        with frozen_state(model.eval()):  # a forward that changes no buffer: what is published is what was read
            check_outputs(model, torch.rand(2, *built, generator=torch.Generator().manual_seed(0)), weights)
    return model.eval()


def _weights_to_push(source: Path, ema: bool, allow_unfinished: bool) -> Tuple[Path, Optional[RunState]]:
    """(the weights file to publish, the state of the run it belongs to or None) for ``source``, a
    checkpoint file or a run folder. Raises UserError if it does not exist, or if its run has not
    finished and ``allow_unfinished`` is false."""
    if not source.exists():
        raise UserError(f"checkpoint not found: {shown(Path(source))}")
    run_state = None
    if source.is_dir():  # a run folder: its final weights, or with --ema the checkpoint that holds the EMA copy
        run_state = RunFolder(source).require_finished("lcnn-zoo push", allow_unfinished)
        latest = ema or not run_state.finished  # an unfinished run's newest weights are in last.pth
        weights = RunFolder(source).file(RunFolder.LAST) if latest else RunFolder(source).weights()
    else:
        weights = source
        holder = RunFolder.holding(source)  # any file of a run (model_best too) is as finished as its run
        if holder is not None:
            run_state = holder.require_finished("lcnn-zoo push", allow_unfinished)
    return weights, run_state


def _with_unfinished_note(card: str, weights: Path, run_state: RunState) -> str:
    """The model card with a closing paragraph saying from which epoch of an unfinished run the weights are."""
    if weights.name == RunFolder.LAST:
        note = (f"These weights are from epoch {run_state.epoch} of {run_state.epochs or '?'} of a run that was "
                f"{run_state.status}")
    else:  # another of its files (its best weights): written at some epoch up to the run's last
        note = (f"These weights ({md_text(weights.name)}) are from a run that was {run_state.status} at epoch "
                f"{run_state.epoch} of {run_state.epochs or '?'}")
    return card.rstrip("\n") + (f"\n\n**Unfinished run.** {note} when they were pushed "
                                f"(`lcnn-zoo push --allow-unfinished`).\n")


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
    weights, run_state = _weights_to_push(source, ema, allow_unfinished)
    template_text = find_model_card_template(template)
    if dataset:
        card_dataset(dataset)  # a name the card cannot show (a newline) fails before any model is built
    recipe = render_recipe(_read_text(recipe_path, "--recipe"), recipe_path) if recipe_path else ""
    metrics = None
    if metrics_path:
        names = [n for n in (metrics_key, model_name, (source if source.is_dir() else source.parent).name) if n]
        metrics = _read_metrics(metrics_path, names)
    out = Path(output_dir) if output_dir else Path("hub") / f"{arch}.{tag}"
    check_output_dir(out, arch, overwrite)
    # the bundle rewrites the whole manifest: a damaged entry (another tag's too) is named now, before any file
    shipped = bundled_manifest(strict=True) if ship else {}
    if ship and model_name in shipped and not replace_shipped:
        old = shipped[model_name]
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
    if repo_id is not None and not _hub_repo(repo_id):
        raise UserError(f"--repo-id must be a Hub repo id '<namespace>/<name>' (letters, digits, '-', '_', '.'), "
                        f"got {shown(repo_id)}")
    repo = repo_id or hub_id(arch, tag)
    class_names = list(classes) or list(info.get("classes") or ())
    if class_names and len(class_names) != model.num_classes:
        raise UserError(f"{'--classes' if classes else 'the run'} names {len(class_names)} classes and the model has "
                        f"{model.num_classes}: give one name per class, in label order")
    card = render_model_card(template_text, model_name=model_name, repo_id=repo,
                             cfg=cast(Dict[str, Any], model.pretrained_cfg), flavour=getattr(model, "flavour", "lcnn"),
                             metrics=metrics, recipe=recipe, eval_command=eval_command,
                             dataset=dataset or (info["dataset"] if isinstance(info.get("dataset"), str) else ""),
                             classes=class_names)
    if run_state is not None and not run_state.finished:  # --allow-unfinished: the card says so
        card = _with_unfinished_note(card, weights, run_state)
    folder = save_pretrained(model, out, model_card=card, overwrite=overwrite, label_names=class_names)
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
