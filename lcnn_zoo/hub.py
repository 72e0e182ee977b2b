"""Pretrained weights: Hugging Face Hub ids, loading with clear errors, bundled weights, publishing.

* Every pretrained tag ``<model>.<tag>`` has its own Hub repo ``<namespace>/<model>.<tag>`` holding
  ``model.safetensors`` + timm's ``config.json`` + a model card (like timm's own repos). The
  namespace is ``$LCNN_ZOO_HUB_NAMESPACE`` (read at import), default ``lcnn-zoo``.
* Loading goes through timm (``build_model_with_cfg`` → huggingface_hub); only safetensors are
  ever read from the network.
* Weights shipped inside the package (``lcnn_zoo/weights/<model>.<tag>.safetensors``) are used
  first, so those tags load offline right after ``pip install``.
* The published state dict is the *unfolded* LCNN (trainable; ``lcnn_zoo.fold`` makes it
  deployable), spectral-norm keys as ``<layer>.weight`` (unnormalised), ``weight_u``, ``weight_v``.
"""
from __future__ import annotations

import json
import os
import shutil
import socket
import tempfile
from pathlib import Path
from typing import Any, Callable, Dict, Optional, Sequence
from urllib.parse import urlparse

import torch
from torch import nn

__all__ = ["NAMESPACE", "hub_id", "tag_dataset", "bundled_weights", "safe_build", "PretrainedLoadError",
           "save_pretrained", "push_folder"]

NAMESPACE = os.environ.get("LCNN_ZOO_HUB_NAMESPACE", "lcnn-zoo").strip("/") or "lcnn-zoo"
WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
_PROBE_TIMEOUT_S = float(os.environ.get("LCNN_ZOO_HUB_PROBE_TIMEOUT", "3"))


class PretrainedLoadError(RuntimeError):
    """Pretrained weights could not be loaded; the message says which and how to fix it."""


def hub_id(model: str, tag: str) -> str:
    """Hub repo id of a pretrained tag, e.g. ``lcnn-zoo/lcnn_resnet18.cifar10``."""
    return f"{NAMESPACE}/{model}.{tag}"


def tag_dataset(model_name: str) -> str:
    """The dataset of a pretrained tag: ``lcnn_resnet20.fmnist_gradreg`` → ``fmnist``; ``""`` without a tag."""
    return model_name.split(".", 1)[1].split("_")[0] if "." in model_name else ""


def bundled_manifest() -> Dict[str, Dict[str, Any]]:
    """``lcnn_zoo/weights/manifest.json``: for each shipped tag its sha256 and recorded metrics."""
    path = WEIGHTS_DIR / "manifest.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def bundled_weights(model: str, tag: str) -> Optional[Path]:
    """Path of the weights shipped in the package for ``model.tag``, if any (checksum verified)."""
    import hashlib

    path = WEIGHTS_DIR / f"{model}.{tag}.safetensors"
    if not path.is_file():
        return None
    expected = bundled_manifest().get(f"{model}.{tag}", {}).get("sha256")
    if expected and hashlib.sha256(path.read_bytes()).hexdigest() != expected:
        raise PretrainedLoadError(f"The weights shipped for '{model}.{tag}' ({path}) do not match their checksum "
                                  f"in manifest.json: the installation is corrupted; reinstall lcnn-zoo.")
    return path


def _hub_error(cfg: Dict[str, Any], reason: str) -> PretrainedLoadError:
    repo = cfg.get("hf_hub_id")
    name = cfg.get("architecture", "model") + (f".{cfg['tag']}" if cfg.get("tag") else "")
    return PretrainedLoadError(
        f"Pretrained weights for '{name}' live on the Hugging Face Hub as '{repo}' "
        f"(file '{cfg.get('hf_hub_filename') or 'model.safetensors'}') and could not be loaded: {reason}.\n"
        f"Fixes: connect to the network and retry; or download them once and set HF_HUB_OFFLINE=1 to use the "
        f"local cache; or point at a local copy with timm.create_model('local-dir:/path/to/folder') or "
        f"pretrained_cfg_overlay=dict(file='/path/to/model.safetensors'); or set LCNN_ZOO_HUB_NAMESPACE if the "
        f"weights are published under another namespace.")


def _hub_reachable() -> Optional[str]:
    """None if the Hub endpoint accepts a TCP connection within the probe timeout, else the reason."""
    from huggingface_hub import constants

    url = urlparse(constants.ENDPOINT)
    host, port = url.hostname, url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((host, port), timeout=_PROBE_TIMEOUT_S):
            return None
    except OSError as e:
        return f"{host}:{port} is unreachable ({e.__class__.__name__}: {e})"


def _check_available(cfg: Dict[str, Any]) -> None:
    """Fail fast (seconds, not a minute of retries) when Hub weights cannot possibly be fetched."""
    from huggingface_hub import constants, try_to_load_from_cache

    if cfg.get("source") == "local-dir" or cfg.get("file") or cfg.get("state_dict") is not None:
        return
    repo = cfg.get("hf_hub_id")
    if not repo:
        raise PretrainedLoadError(
            f"No pretrained weights are published for '{cfg.get('architecture')}' "
            f"({cfg.get('notes') or 'no hf_hub_id'}); use pretrained=False, or pass "
            f"pretrained_cfg_overlay=dict(file=...) with your own checkpoint.")
    filename = cfg.get("hf_hub_filename") or "model.safetensors"
    if isinstance(try_to_load_from_cache(repo, filename), str):
        return
    if constants.HF_HUB_OFFLINE:
        raise _hub_error(cfg, "HF_HUB_OFFLINE is set and the file is not in the local Hugging Face cache")
    reason = _hub_reachable()
    if reason is not None:
        raise _hub_error(cfg, reason)


def safe_build(build_fn: Callable[..., nn.Module], model_cls: type, variant: str, pretrained: bool,
               **kwargs: Any) -> nn.Module:
    """``build_fn(model_cls, variant, pretrained, **kwargs)`` (timm's ``build_model_with_cfg``) with
    bundled weights preferred and every loading failure turned into a :class:`PretrainedLoadError`
    that names the weights and the fix."""
    if not pretrained:
        return build_fn(model_cls, variant, pretrained, **kwargs)
    from huggingface_hub import errors as hf_errors
    from safetensors import SafetensorError
    from timm.models._builder import resolve_pretrained_cfg

    cfg = resolve_pretrained_cfg(variant, pretrained_cfg=kwargs.get("pretrained_cfg"),
                                 pretrained_cfg_overlay=kwargs.get("pretrained_cfg_overlay")).to_dict()
    tag = cfg.get("tag") or ""
    bundled = bundled_weights(variant, tag) if tag else None
    overlay = dict(kwargs.get("pretrained_cfg_overlay") or {})
    if bundled is not None and not (overlay.get("file") or cfg.get("source") == "local-dir"):
        overlay["file"] = str(bundled)
        kwargs["pretrained_cfg_overlay"] = overlay
        cfg["file"] = str(bundled)
    _check_available(cfg)
    where = cfg.get("file") or cfg.get("hf_hub_id") or variant
    try:
        return build_fn(model_cls, variant, pretrained, **kwargs)
    except (hf_errors.HfHubHTTPError, hf_errors.LocalEntryNotFoundError, hf_errors.EntryNotFoundError,
            hf_errors.OfflineModeIsEnabled) as e:
        raise _hub_error(cfg, f"{e.__class__.__name__}: {e}") from e
    except SafetensorError as e:
        raise PretrainedLoadError(f"The weights file for '{variant}' ({where}) is not a valid safetensors file "
                                  f"(truncated or corrupted?): {e}. Delete it and download again.") from e
    except RuntimeError as e:
        msg = str(e)
        if "state_dict" in msg or "size mismatch" in msg or "Missing key" in msg or "Unexpected key" in msg:
            raise PretrainedLoadError(f"The checkpoint {where} does not match the architecture '{variant}' "
                                      f"(wrong model or shapes): {msg}") from e
        raise


# --------------------------------------------------------------------------------------------
# Publishing
# --------------------------------------------------------------------------------------------
def save_pretrained(model: nn.Module, output_dir: str | os.PathLike, *, model_card: str,
                    extra_files: Optional[Dict[str, str]] = None) -> Path:
    """Write a Hub repo folder: ``model.safetensors``, timm's ``config.json``, ``README.md``.

    Written into a temporary folder next to ``output_dir`` and renamed into place, so an
    interrupted write never leaves a partial folder. An existing ``output_dir`` is replaced.
    """
    from timm.models import save_for_hf

    output_dir = Path(output_dir).resolve()
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.", dir=output_dir.parent))
    try:
        save_for_hf(model, str(tmp), safe_serialization=True)
        (tmp / "README.md").write_text(model_card, encoding="utf-8")
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text, encoding="utf-8")
        json.loads((tmp / "config.json").read_text())  # sanity: timm wrote valid JSON
        if output_dir.exists():
            backup = output_dir.with_name(f".{output_dir.name}.old")
            if backup.exists():
                shutil.rmtree(backup)
            output_dir.rename(backup)
            tmp.rename(output_dir)
            shutil.rmtree(backup)
        else:
            tmp.rename(output_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return output_dir


def push_folder(folder: str | os.PathLike, repo_id: str, *, token: Optional[str] = None, private: bool = False,
                commit_message: str = "Add lcnn-zoo weights") -> str:
    """Upload a folder written by :func:`save_pretrained` to ``repo_id``; returns the commit URL."""
    from huggingface_hub import HfApi, get_token

    token = token or get_token()
    if not token:
        raise PermissionError("No Hugging Face token: run `hf auth login` or set HF_TOKEN to push")
    api = HfApi(token=token)
    api.create_repo(repo_id, exist_ok=True, private=private, repo_type="model")
    info = api.upload_folder(repo_id=repo_id, folder_path=str(folder), commit_message=commit_message)
    return str(getattr(info, "commit_url", info))


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


def find_model_card_template(path: Optional[str | os.PathLike] = None) -> str:
    """The Hub template block of MODEL_CARD.md (given path, ./MODEL_CARD.md, or the repo root's)."""
    candidates = [Path(path)] if path else [Path.cwd() / "MODEL_CARD.md",
                                            Path(__file__).resolve().parents[1] / "MODEL_CARD.md"]
    for c in candidates:
        if c.is_file():
            text = c.read_text(encoding="utf-8")
            if _TEMPLATE_BEGIN not in text or _TEMPLATE_END not in text:
                raise ValueError(f"{c} has no '{_TEMPLATE_BEGIN}' ... '{_TEMPLATE_END}' block")
            return text.split(_TEMPLATE_BEGIN, 1)[1].split(_TEMPLATE_END, 1)[0].lstrip("\n")
    raise FileNotFoundError(f"MODEL_CARD.md template not found (looked at {', '.join(map(str, candidates))}); "
                            "run from a clone of lcnn-zoo or pass --template")


def select_metrics(data: Dict[str, Any], names: Sequence[str]) -> Dict[str, Any]:
    """One model's metrics from what ``lcnn-zoo eval`` wrote.

    ``data`` is either a single model's metrics or a whole ``eval.json`` (``{"results": {name: metrics}}``);
    in the latter case the entry is the first of ``names`` present, or the only one. Raises ValueError
    naming the entries when none matches, so a card never shows another model's numbers.
    """
    results = data.get("results")
    if not isinstance(results, dict):
        return data
    for name in names:
        if name in results:
            return results[name]
    if len(results) == 1:
        return next(iter(results.values()))
    raise ValueError(f"the metrics file holds several models ({', '.join(results)}) and none is named "
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
                      metrics: Optional[Dict[str, Any]] = None, recipe: str = "", eval_command: str = "") -> str:
    """Fill the template's ``${...}`` fields (string.Template; unknown fields raise)."""
    from string import Template

    dataset = tag_dataset(model_name) or "unknown"
    dataset_names = {"cifar10": "CIFAR-10", "cifar100": "CIFAR-100", "fmnist": "Fashion-MNIST"}
    return Template(template).substitute(
        model_id=repo_id.split("/")[-1], model_name=model_name, repo_id=repo_id,
        architecture=model_name.split(".")[0], kind_description=_KIND_DESCRIPTIONS.get(kind, kind),
        dataset=dataset, dataset_description=dataset_names.get(dataset, dataset),
        input_size="×".join(str(s) for s in cfg.get("input_size", ())),
        recipe=recipe or "Not recorded.", eval_command=eval_command or "not recorded",
        metrics_table=metrics_table(metrics),
    )
