"""Pretrained weights, loading side: where each tag's weights are, and loading them with clear errors.

* Weights shipped inside the package (``lcnn_zoo/weights/<model>.<tag>.safetensors``, listed with
  their sha256 in ``weights/manifest.json``) load offline right after ``pip install``.
* Weights published on the Hugging Face Hub are listed in a *published manifest*: the package's
  ``weights/published.json`` and the user's own (``$LCNN_ZOO_PUBLISHED``, default
  ``~/.cache/lcnn_zoo/published.json``), which ``lcnn-zoo push --upload`` updates. Each Hub repo is
  ``<namespace>/<model>.<tag>`` (namespace ``$LCNN_ZOO_HUB_NAMESPACE``, default ``lcnn-zoo``).
* The registry is static: the timm cfgs built at ``import lcnn_zoo`` come from the package's own
  manifests only (:func:`package_tags`, :func:`weights_location` with ``user=False``), so
  ``timm.list_pretrained("lcnn*")`` lists what the installed package loads, and importing reads
  nothing under the user's home. The user's own uploads (:func:`user_uploads`) are resolved when a
  model is built: ``pretrained=True`` on one of their tags finds it then.
* Loading goes through timm (``build_model_with_cfg`` → huggingface_hub); only safetensors are read.
  Whether the Hub answers is asked through huggingface_hub too (its request, its timeout
  ``$HF_HUB_ETAG_TIMEOUT`` and its offline mode ``HF_HUB_OFFLINE``).

Publishing (repo folders, cards, uploads, bundling) is :mod:`lcnn_zoo.commands.publishing`.
"""
from __future__ import annotations

import hashlib
import json
import math
import re
import warnings
from pathlib import Path
from typing import Any, Callable, Dict, Optional, Tuple

from huggingface_hub import constants as hf_constants
from huggingface_hub import errors as hf_errors
from huggingface_hub import get_hf_file_metadata, hf_hub_url, try_to_load_from_cache
from safetensors import SafetensorError
from timm.models import load_pretrained, resolve_pretrained_cfg
from torch import nn

from .environment import env
from .errors import UserError, shown
from .weight_checks import check_weights

__all__ = ["NAMESPACE", "WEIGHTS_DIR", "REPO_CONFIGS", "hub_id", "tag_dataset", "bundled_manifest",  # noqa: F822
           "published_manifest", "published_manifest_path", "weights_location", "bundled_weights", "recipe_hint",
           "check_hub_spec", "safe_build", "PretrainedLoadError", "HUB_FILENAME", "bundled_file", "package_tags",
           "read_manifest", "hub_unreachable_reason", "entry_problem", "user_uploads", "user_upload"]
# (NAMESPACE is served by the module's __getattr__, below)

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
REPO_CONFIGS = Path(__file__).resolve().parents[1] / "configs"  # present in a clone (the recipes)
HUB_FILENAME = "model.safetensors"  # never fall back to a pickled file


def __getattr__(name: str) -> Any:
    # NAMESPACE is read when it is used (push), not at import: a bad $LCNN_ZOO_HUB_NAMESPACE is then
    # that command's one-line error, and importing the package never fails on it.
    if name == "NAMESPACE":
        return env("LCNN_ZOO_HUB_NAMESPACE")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


class PretrainedLoadError(UserError, RuntimeError):
    """Pretrained weights could not be loaded; the message says which and how to fix it."""


def hub_id(model: str, tag: str) -> str:
    """Hub repo id of a pretrained tag in the current namespace, e.g. ``lcnn-zoo/lcnn_resnet18.cifar10``."""
    return f"{env('LCNN_ZOO_HUB_NAMESPACE')}/{model}.{tag}"


def tag_dataset(model_name: str) -> str:
    """The dataset of a pretrained tag: ``lcnn_resnet20.fmnist_gradreg`` → ``fmnist``; ``""`` without a tag."""
    return model_name.split(".", 1)[1].split("_")[0] if "." in model_name else ""


# The schema of a manifest entry: field → (check, what it must be). Unknown fields are kept (newer
# versions may add some); a known field of the wrong type or range makes the entry unusable.
_ENTRY_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_+=@,-]{0,99}\.[A-Za-z0-9._+=@,-]{1,100}$")
_MAX_CLASSES, _MAX_SIDE = 1_000_000, 65_536


def _count(value: Any, top: int) -> bool:
    """A JSON integer in [1, top] (not a bool, not a float such as 1e400)."""
    return isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= top


def _repo_id(value: Any) -> bool:
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    if not isinstance(value, str) or value.count("/") != 1:
        return False
    try:
        validate_repo_id(value)
    except HFValidationError:
        return False
    return True


_ENTRY_FIELDS: Dict[str, Tuple[Callable[[Any], bool], str]] = {
    "repo_id": (_repo_id, "a Hub repo id '<namespace>/<name>'"),
    "sha256": (lambda v: isinstance(v, str) and re.fullmatch(r"[0-9a-f]{64}", v) is not None,
               "64 lowercase hexadecimal digits"),
    "file": (lambda v: isinstance(v, str) and Path(v).name == v and v.endswith(".safetensors"),
             "a .safetensors file name in the weights folder"),
    "num_classes": (lambda v: _count(v, _MAX_CLASSES), f"an integer from 1 to {_MAX_CLASSES:,}"),
    "input_size": (lambda v: isinstance(v, list) and (v == [] or (len(v) == 3
                                                                  and all(_count(s, _MAX_SIDE) for s in v))),
                   f"[channels, height, width], integers from 1 to {_MAX_SIDE:,} (or [] when unknown)"),
    "accuracy_first1000": (lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v),
                           "a finite number"),
    "dataset": (lambda v: isinstance(v, str), "a string"),
    "eval_command": (lambda v: isinstance(v, str), "a string"),
    "metrics": (lambda v: isinstance(v, dict), "a mapping"),
}


def entry_problem(name: Any, entry: Any) -> Optional[str]:
    """What is wrong with one manifest entry (``None`` when it fits the schema), naming the field.

    Args:
        name: the entry's key, ``<model>.<tag>``.
        entry: its value, a mapping of the fields in ``_ENTRY_FIELDS`` (others are kept as they are).
    """
    if not isinstance(name, str) or not _ENTRY_NAME.match(name):
        return f"the entry {shown(name)} is not named '<model>.<tag>'"
    if not isinstance(entry, dict):
        return f"the entry for {shown(name)} is {type(entry).__name__}, not a mapping (repo_id, sha256, …)"
    for field, (check, what) in _ENTRY_FIELDS.items():
        if field in entry and not check(entry[field]):
            return f"the entry for {shown(name)} has {field} = {shown(entry[field], 60)}, not {what}"
    return None


def _manifest_file(path: Path) -> Tuple[Dict[str, Dict[str, Any]], Dict[str, str]]:
    """(the entries that fit the schema, {name: problem} for those that do not) of a manifest file."""
    if not path.is_file():
        return {}, {}
    # The package's own manifests are restored by reinstalling; the user's (uploads recorded by push)
    # is theirs: fixing it, or moving it away (its tags are then not found), is enough.
    fix = ("reinstall lcnn-zoo" if path.resolve().parent == WEIGHTS_DIR.resolve() else
           "it is your record of your own uploads ($LCNN_ZOO_PUBLISHED): fix it, or move it away")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
        raise PretrainedLoadError(f"{path} is not valid JSON (truncated or corrupted?): {shown(str(e), 120)}; "
                                  f"{fix}") from e
    if not isinstance(data, dict):
        raise PretrainedLoadError(f"{path} is not a weights manifest (expected a mapping of tag: entry); {fix}")
    good: Dict[str, Dict[str, Any]] = {}
    bad: Dict[str, str] = {}
    for name, entry in data.items():
        problem = entry_problem(name, entry)
        if problem is None:
            good[name] = entry
        else:
            bad[str(name)] = problem
    return good, bad


def read_manifest(path: Path, *, strict: bool = False) -> Dict[str, Dict[str, Any]]:
    """A weights manifest (``<model>.<tag>`` → entry), every entry checked against the schema.

    Args:
        path: the manifest file (absent: no entries).
        strict: an entry that does not fit raises (for rewriting the file, which must not drop or
            keep it silently); otherwise it is skipped with a warning naming the file, the entry and
            the field (reading: one damaged entry never stops the others, nor ``import lcnn_zoo``).

    Raises:
        PretrainedLoadError: the file is not a JSON mapping; with ``strict``, an entry does not fit.
    """
    good, bad = _manifest_file(path)
    for problem in bad.values():
        if strict:
            raise PretrainedLoadError(f"{path}: {problem}: fix or remove that entry")
        warnings.warn(f"{path}: {problem}; the entry is skipped (fix or remove it)", stacklevel=2)
    return good


def _refuse_damaged_entry(name: str, user: bool = True) -> None:
    """Loading ``name`` itself: a damaged entry for it is named, not taken for "never published"."""
    paths = [WEIGHTS_DIR / "manifest.json", WEIGHTS_DIR / "published.json"]
    for path in paths + ([published_manifest_path()] if user else []):
        problem = _manifest_file(path)[1].get(name)
        if problem is not None:
            raise PretrainedLoadError(f"{path}: {problem}: fix or remove that entry")


def bundled_manifest(strict: bool = False) -> Dict[str, Dict[str, Any]]:
    """``lcnn_zoo/weights/manifest.json``: for each shipped tag its sha256 and recorded metrics
    (``strict``: see :func:`read_manifest`)."""
    return read_manifest(WEIGHTS_DIR / "manifest.json", strict=strict)


def bundled_file(name: str, entry: Optional[Dict[str, Any]] = None) -> Path:
    """The shipped weights file of tag ``name`` (``<model>.<tag>``): the manifest entry's ``file``
    (bundles write a new content-addressed file and switch the manifest to it), else ``<name>.safetensors``."""
    entry = bundled_manifest().get(name) if entry is None else entry
    return WEIGHTS_DIR / ((entry or {}).get("file") or f"{name}.safetensors")


def package_tags() -> Dict[str, Dict[str, Dict[str, Any]]]:
    """Tags that a bundle added to the package beyond the zoo's own (``lcnn-zoo push --model
    lcnn_resnet20.fm3 --bundle``), or that the package's ``weights/published.json`` lists: architecture
    → tag → the ``num_classes`` and ``input_size`` their entry records, so timm's registry lists them
    and ``pretrained=True`` builds them right. Read once, at import, from the package's files only
    (the user's uploads: :func:`user_uploads`, at build time).

    Returns:
        ``{architecture: {tag: {"num_classes": int, "input_size": (C, H, W)}}}``; empty, with a
        warning, when a package manifest is damaged (``import lcnn_zoo`` never fails on it).
    """
    try:
        entries = {**_published(user=False), **bundled_manifest()}
    except PretrainedLoadError as e:
        warnings.warn(str(e), stacklevel=2)
        return {}
    return _shapes_by_architecture(entries)


def _shapes_by_architecture(entries: Dict[str, Dict[str, Any]]) -> Dict[str, Dict[str, Dict[str, Any]]]:
    out: Dict[str, Dict[str, Dict[str, Any]]] = {}
    for name, entry in entries.items():  # each checked by read_manifest: integers in range
        arch, _, tag = name.partition(".")
        n, size = entry.get("num_classes"), entry.get("input_size")
        if tag and n is not None and size:
            out.setdefault(arch, {})[tag] = {"num_classes": n, "input_size": tuple(size)}
    return out


def user_uploads() -> Dict[str, Dict[str, Any]]:
    """The user's own uploads (``lcnn-zoo push --upload`` records them in ``$LCNN_ZOO_PUBLISHED``):
    ``<model>.<tag>`` → its manifest entry. Read when called (a damaged entry is skipped with a
    warning naming the file and the field, see :func:`read_manifest`): the static registry does not
    list them, ``timm.create_model("<model>.<tag>", pretrained=True)`` resolves them at build time.

    Raises:
        PretrainedLoadError: the file is not a JSON mapping (naming it and what to do).
    """
    return read_manifest(published_manifest_path())


def user_upload(model: str, tag: str) -> Optional[Dict[str, Any]]:
    """The ``num_classes`` and ``input_size`` the user's manifest records for an upload of ``model.tag``
    that the static registry does not know (a new tag), else None.

    Args:
        model: the architecture, e.g. ``lcnn_resnet20``.
        tag: the tag, e.g. ``fm3``.

    Returns:
        ``{"num_classes": int, "input_size": (C, H, W)}``, or None when the user has no such upload.
    """
    _refuse_damaged_entry(f"{model}.{tag}")
    return _shapes_by_architecture(user_uploads()).get(model, {}).get(tag)


def published_manifest_path() -> Path:
    """The user's published manifest (``$LCNN_ZOO_PUBLISHED`` or ``~/.cache/lcnn_zoo/published.json``)."""
    return Path(env("LCNN_ZOO_PUBLISHED"))


def published_manifest() -> Dict[str, Dict[str, Any]]:
    """Tags published on the Hub: the package's ``weights/published.json``, then the user's (which wins)."""
    return _published(user=True)


def _published(user: bool) -> Dict[str, Dict[str, Any]]:
    """The package's published manifest, then (``user``) the user's, which wins: the one place that
    decides whether the user's uploads count (at build time) or not (the static registry)."""
    package = read_manifest(WEIGHTS_DIR / "published.json")
    return {**package, **read_manifest(published_manifest_path())} if user else package


def weights_location(model: str, tag: str, *, strict: bool = True, user: bool = True) -> Dict[str, Any]:
    """The timm cfg keys that say where ``model.tag``'s weights are.

    Args:
        model: the architecture, e.g. ``lcnn_resnet20``.
        tag: the tag, e.g. ``fmnist``.
        strict: a damaged manifest or entry raises, naming the file and the entry's field (loading);
            with ``strict=False`` (building the registry at import) it warns and is skipped.
        user: whether the user's own uploads count (at build time); the registry built at import
            passes ``False``: it is static, made of the package's files.

    Returns:
        ``{"file": path}`` for shipped weights, ``{"hf_hub_id": …, "hf_hub_filename": …}`` for
        published ones, ``{}`` for a recipe-only tag.
    """
    name = f"{model}.{tag}"
    if not strict:
        try:
            return _weights_location(name, user)
        except PretrainedLoadError as e:
            warnings.warn(str(e), stacklevel=2)
            return {}
    _refuse_damaged_entry(name, user)
    return _weights_location(name, user)


def _weights_location(name: str, user: bool) -> Dict[str, Any]:
    entry = bundled_manifest().get(name)
    if entry is not None and bundled_file(name, entry).is_file():
        return {"file": str(bundled_file(name, entry))}
    entry = _published(user).get(name)
    if entry and entry.get("repo_id"):
        return {"hf_hub_id": entry["repo_id"], "hf_hub_filename": HUB_FILENAME}
    return {}


def bundled_weights(model: str, tag: str) -> Optional[Path]:
    """Path of the weights shipped in the package for ``model.tag``, if any, after checking them
    against the manifest's sha256 (a file without a manifest entry and checksum is refused)."""
    path = bundled_file(f"{model}.{tag}")
    if not path.is_file():
        return None
    expected = bundled_manifest().get(f"{model}.{tag}", {}).get("sha256")
    if not expected:
        raise PretrainedLoadError(f"The weights shipped for '{model}.{tag}' ({path}) have no checksum in "
                                  f"manifest.json: they are not trusted; reinstall lcnn-zoo or re-bundle them with "
                                  f"`lcnn-zoo push --bundle`.")
    if hashlib.sha256(path.read_bytes()).hexdigest() != expected:
        raise PretrainedLoadError(f"The weights shipped for '{model}.{tag}' ({path}) do not match their checksum "
                                  f"in manifest.json: the installation is corrupted; reinstall lcnn-zoo.")
    return path


def recipe_hint(model: str, tag: str) -> str:
    """The command that trains ``model.tag`` (its committed config when there is one)."""
    dataset = tag.split("_")[0]
    gradreg = tag.endswith("_gradreg")
    base = model.removeprefix("lcnn_")
    flavour = "lcnn"
    for suffix in ("_softplus", "_relu"):
        if base.endswith(suffix):
            base, flavour = base[: -len(suffix)], suffix[1:]
    variant = {"lcnn": "lcnn_gradreg" if gradreg else "lcnn",
               "softplus": "gradreg" if gradreg else "standard"}.get(flavour)
    config = f"configs/{dataset}_{base}_{variant}.yaml"
    if variant and (REPO_CONFIGS / Path(config).name).is_file():
        return f"`lcnn-zoo train --config {config} --download` (one command, see docs/training.md)"
    reg = ("lcnn_gradreg" if gradreg else "lcnn") if flavour == "lcnn" else ("gradreg" if gradreg else "none")
    return f"`lcnn-zoo train --model {model} --dataset {dataset} --reg {reg} --download` (see docs/training.md)"


def hub_unreachable_reason(repo_id: Optional[str] = None, filename: str = "config.json",
                           token: Optional[str] = None) -> Optional[str]:
    """Why the Hub cannot be asked for a file now, or None when it answers: huggingface_hub's own
    metadata request (``HEAD``), with its timeout (``$HF_HUB_ETAG_TIMEOUT``, 10 s by default) and
    its offline mode, so a load or an upload fails in seconds rather than after retries.

    Args:
        repo_id: the repo a load will fetch from; None asks the endpoint's API (an upload's check).
        filename: the file of ``repo_id`` the load will fetch.
        token: sent with the request (a private repo answers 401 without it: still an answer).

    Returns:
        None when the endpoint answered, whatever the status (a missing repo or file is the load's
        own error to report); otherwise a reason naming the endpoint.
    """
    if hf_constants.HF_HUB_OFFLINE:
        return "HF_HUB_OFFLINE is set"
    endpoint = hf_constants.ENDPOINT
    url = hf_hub_url(repo_id, filename, endpoint=endpoint) if repo_id else f"{endpoint}/api/whoami-v2"
    try:
        get_hf_file_metadata(url, token=token, timeout=hf_constants.HF_HUB_ETAG_TIMEOUT)
    except hf_errors.HfHubHTTPError:  # an HTTP status: the Hub answered
        return None
    except Exception as e:  # whatever the transport raises (refused, timed out, a proxy's error): no answer
        return f"the Hub at {endpoint} is unreachable ({e.__class__.__name__}: {shown(str(e), 160)})"
    return None


def _unreachable(what: str, repo: str, reason: str) -> PretrainedLoadError:
    return PretrainedLoadError(
        f"{what} is published on the Hugging Face Hub as '{repo}' and could not be loaded: {reason}.\n"
        f"Fixes: connect to the network and retry; or download it once and set HF_HUB_OFFLINE=1 to use the local "
        f"cache; or point at a local copy with timm.create_model('local-dir:/path/to/folder').")


def _check_fetchable(what: str, repo: str, filename: str) -> None:
    """Fail fast (seconds, not a minute of retries) when a Hub file cannot possibly be fetched."""
    if isinstance(try_to_load_from_cache(repo, filename), str):
        return
    if hf_constants.HF_HUB_OFFLINE:
        raise _unreachable(what, repo, "HF_HUB_OFFLINE is set and it is not in the local Hugging Face cache")
    reason = hub_unreachable_reason(repo, filename)
    if reason is not None:
        raise _unreachable(what, repo, reason)


def check_hub_spec(spec: str) -> None:
    """For ``hf-hub:<repo>`` names: fail at once, clearly, when the repo cannot be fetched."""
    if spec.startswith("hf-hub:"):
        repo = spec.split(":", 1)[1].split("@")[0]
        _check_fetchable(f"'{repo}'", repo, "config.json")


def _checked_filter(inner: Optional[Callable[..., Any]], where: str) -> Callable[..., Any]:
    """timm's ``pretrained_filter_fn`` (called with the state dict read from the file and the model,
    before ``load_state_dict``), checking the weights after ``inner`` (if any) has filtered them: not
    finite, a negative variance or integers where the model has floats (which the load would cast
    silently) are refused naming the file and the tensor (:func:`lcnn_zoo.weight_checks.check_weights`)."""
    def checked(state: Dict[str, Any], model: Optional[nn.Module] = None) -> Dict[str, Any]:
        if inner is not None:
            try:
                state = inner(state, model)
            except TypeError:  # timm's convention: a filter may take the state dict alone
                state = inner(state)
        check_weights(state, where, model)
        return state

    return checked


def _load_after(build_fn: Callable[..., nn.Module], before_loading: Callable[[nn.Module], nn.Module]
                ) -> Callable[..., nn.Module]:
    """``build_fn`` that builds without weights, applies ``before_loading``, then loads the weights
    with timm's ``load_pretrained`` (the same file resolution, filter and strictness as a build)."""
    def build(model_cls: type, variant: str, pretrained: bool, **kwargs: Any) -> nn.Module:
        filter_fn = kwargs.pop("pretrained_filter_fn", None)
        model = before_loading(build_fn(model_cls, variant, False, **kwargs))
        cfg = getattr(model, "pretrained_cfg", None) or {}
        first = model.get_submodule(cfg["first_conv"]) if cfg.get("first_conv") else None
        load_pretrained(model, pretrained_cfg=cfg, num_classes=kwargs.get("num_classes", cfg.get("num_classes", 1000)),
                        in_chans=getattr(first, "in_channels", kwargs.get("in_chans", 3)), filter_fn=filter_fn)
        return model
    return build


def safe_build(build_fn: Callable[..., nn.Module], model_cls: type, variant: str, pretrained: bool,
               before_loading: Optional[Callable[[nn.Module], nn.Module]] = None, **kwargs: Any) -> nn.Module:
    """``build_fn(model_cls, variant, pretrained, **kwargs)`` (timm's ``build_model_with_cfg``): shipped
    weights checked against their checksum, tags without weights refused at once with the command
    that trains them, and every loading failure turned into a :class:`PretrainedLoadError` that
    names the weights and the fix.

    Args:
        before_loading: with ``pretrained``, the model is built without weights, passed through this
            (``lcnn_zoo.fold`` for folded weights: they fit the folded model's layers, not the
            LCNN's), and the weights are then loaded into what it returns by timm's ``load_pretrained``.
    """
    if not pretrained:
        return build_fn(model_cls, variant, pretrained, **kwargs)
    if before_loading is not None:
        build_fn = _load_after(build_fn, before_loading)
    cfg = resolve_pretrained_cfg(variant, pretrained_cfg=kwargs.get("pretrained_cfg"),
                                 pretrained_cfg_overlay=kwargs.get("pretrained_cfg_overlay")).to_dict()
    tag = cfg.get("tag") or ""
    name = f"{variant}.{tag}" if tag else variant
    local = cfg.get("source") == "local-dir" or cfg.get("state_dict") is not None
    overlay = dict(kwargs.get("pretrained_cfg_overlay") or {})
    # An hf-hub:<repo> name brings its repo's config, which says where its weights are: the manifests
    # (this machine's record of uploads) must not replace it, or a pushed card's usage line would
    # fail for every reader whose manifest does not list the tag.
    named_repo = cfg.get("source") == "hf-hub"
    if tag and not local and not named_repo and not overlay.get("file") and not overlay.get("hf_hub_id"):
        # The manifests as they are now: weights published after import (lcnn-zoo push --upload) load too.
        where = weights_location(variant, tag)
        cfg = {k: v for k, v in cfg.items() if k not in ("file", "hf_hub_id")}
        cfg.update(where)
        kwargs["pretrained_cfg_overlay"] = {**overlay, "file": None, "hf_hub_id": None, **where}
    if not local and cfg.get("file") and Path(cfg["file"]).resolve().parent == WEIGHTS_DIR:
        bundled_weights(variant, tag)  # shipped: verify the checksum first
    elif not local and not cfg.get("file"):
        repo = cfg.get("hf_hub_id")
        if not repo:
            how = (f"train them with {recipe_hint(variant, tag)}" if tag else
                   f"train them with `lcnn-zoo train --model {variant} --dataset <your data>` (see docs/training.md), "
                   f"or load your own with pretrained_cfg_overlay=dict(file='/path/to/model.safetensors')")
            raise PretrainedLoadError(f"no pretrained weights have been published for {name}; {how}")
        _check_fetchable(f"Pretrained weights for '{name}'", repo, cfg.get("hf_hub_filename") or HUB_FILENAME)
    weights = cfg.get("file") or cfg.get("hf_hub_id") or variant
    kwargs["pretrained_filter_fn"] = _checked_filter(kwargs.get("pretrained_filter_fn"), str(weights))
    try:
        return build_fn(model_cls, variant, pretrained, **kwargs)
    except (hf_errors.HfHubHTTPError, hf_errors.LocalEntryNotFoundError, hf_errors.EntryNotFoundError,
            hf_errors.OfflineModeIsEnabled) as e:
        raise _unreachable(f"Pretrained weights for '{name}'", str(cfg.get("hf_hub_id")),
                           f"{e.__class__.__name__}: {e}") from e
    except SafetensorError as e:
        raise PretrainedLoadError(f"The weights file for '{name}' ({weights}) is not a valid safetensors file "
                                  f"(truncated or corrupted?): {e}. Delete it and download again.") from e
    except RuntimeError as e:
        msg = str(e)
        if "state_dict" in msg or "size mismatch" in msg or "Missing key" in msg or "Unexpected key" in msg:
            raise PretrainedLoadError(f"The checkpoint {weights} does not match the architecture '{variant}' "
                                      f"(wrong model or shapes): {msg}") from e
        raise
