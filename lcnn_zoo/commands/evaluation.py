"""The paper's measurements for one or several models, side by side: JSON, markdown tables, plots.

* Table 1: accuracy and mean ± std of ‖∇ₓℓ‖₂, ‖∇²ₓℓ‖₂ and normalised curvature on test samples;
* Table 2: accuracy under ℓ2-PGD at ε ∈ {0.05, 0.1, 0.15, 0.2} (input units: pixels in [0, 1]);
* Table 3: train/test relative discrepancy of the three geometry measures;
* Figure 2: relative gradient change vs noise norm, with the curvature prediction ‖ε‖·C(x).

Used by ``lcnn-zoo eval`` and ``lcnn-zoo quickstart``.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn
from tqdm import tqdm

from ..errors import UserError, shown
from ..geometry import (
    CurvatureStats,
    curvature_stats,
    gradient_robustness,
    relative_discrepancy,
)
from ..layers.spectral_norm import deferred_convergence
from ..robustness import pgd_accuracy
from ..weight_checks import WeightsError, check_outputs, check_weights, load_mismatch, state_mismatch
from .checkpoint import RunFolder, RunState, atomic_write, load_state_dict, write_json, write_text
from .config import EvalConfig
from .data import DataInfo, build_dataset, describe_dataset, num_classes_of
from .factory import create_model, input_size_of, split_spec, state_dict_shapes
from .preflight import check_dataset_memory
from .writing import non_finite

__all__ = ["EvalConfig", "load_model", "evaluate_model", "markdown_report", "plot_gradient_robustness",
           "run_eval", "write_report", "first_samples"]


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------
def load_model(spec: str, *, arch: Optional[str] = None, input_size: Optional[Sequence[int]] = None,
               device: Optional[torch.device] = None, random_init: bool = False,
               allow_unfinished: bool = False) -> Tuple[str, nn.Module]:
    """Build a model from a registry name (with pretrained tag), ``local-dir:``/``hf-hub:`` name, a
    run folder written by ``lcnn-zoo train``, or a checkpoint (``.pth`` / ``.safetensors``).

    A registry name without a tag is an architecture, not weights: it is refused unless
    ``random_init`` (then the model is measured as initialised, and its name says so). A run that
    has not finished (still training, or stopped) is refused unless ``allow_unfinished``: then its
    ``last.pth`` is measured, and the name and :func:`run_eval`'s results record the epoch.
    Returns (display name, model in eval mode).
    """
    path = Path(spec)
    if path.is_dir():
        if not RunFolder.is_run(path):
            raise UserError(f"{shown(Path(path))} is a folder but not a run folder of `lcnn-zoo train` (no args.json); "
                            f"for a Hub repo folder use local-dir:{shown(Path(path))}")
        state = RunFolder(path).require_finished("lcnn-zoo eval", allow_unfinished)
        name, model = path.name, _from_run(RunFolder(path), arch, latest=not state.finished)
        name = _mark_unfinished(name, model, state)
    elif path.suffix in (".pth", ".pt", ".safetensors"):
        if not path.is_file():
            raise UserError(f"checkpoint not found: {shown(Path(path))}")
        state = None
        holder = RunFolder.holding(path)  # any file of a run (model_best too) is as finished as its run
        if holder is not None:
            state = holder.require_finished("lcnn-zoo eval", allow_unfinished)
        name, model = path.stem, _from_checkpoint(path, arch, input_size)
        name = _mark_unfinished(name, model, state)
    elif path.is_file():
        raise UserError(f"{shown(path)} is a file but not a checkpoint (.pth, .pt or .safetensors)")
    else:
        _, tag = split_spec(spec)
        pretrained = bool(tag) or spec.startswith(("hf-hub:", "local-dir:"))
        if not pretrained and not random_init:
            raise UserError(f"{shown(spec)} names an architecture, not trained weights: name a tag (see "
                            f"timm.list_pretrained('lcnn*')), a run folder or a checkpoint, or pass --random-init "
                            f"to measure it as initialised")
        name, model = (spec if pretrained else f"{spec} (random init)"), create_model(
            spec, input_size=input_size, pretrained=pretrained)
    return name, (model.to(device) if device is not None else model).eval()


def _mark_unfinished(name: str, model: nn.Module, state: Optional[RunState]) -> str:
    """``name``, and the epoch an unfinished run's weights come from (also kept on ``model`` for
    :func:`run_eval`'s results)."""
    if state is None or state.finished:
        return name
    setattr(model, "unfinished_run", {"epoch": state.epoch, "epochs": state.epochs, "status": state.status})
    return f"{name} ({state.status}: epoch {state.epoch if state.epoch is not None else '?'}" + (
        f" of {state.epochs})" if state.epochs else ")")


def _from_run(run: RunFolder, arch: Optional[str], latest: bool = False) -> nn.Module:
    """The run's final weights (``latest``: its last checkpoint, for an unfinished run)."""
    args = run.args()
    summary = run.summary()
    input_size = summary.get("input_size") or args.get("input_size")
    num_classes = summary.get("num_classes") or args.get("num_classes")
    if input_size is None or num_classes is None:
        meta = run.load_checkpoint()
        input_size, num_classes = input_size or meta.get("input_size"), num_classes or meta.get("num_classes")
    architecture, _ = split_spec(arch or args["model"])  # the run's weights, not the tag's
    weights = run.file(RunFolder.LAST) if latest and run.file(RunFolder.LAST).is_file() else run.weights()
    with deferred_convergence():  # the run's weights bring their singular vectors
        model = create_model(architecture, input_size=input_size, num_classes=num_classes,
                             model_kwargs=args.get("model_kwargs") or {}, convert=bool(args.get("lcnnify")))
        _load_state(model, load_state_dict(weights), weights)
    return model.eval()


def _from_checkpoint(path: Path, arch: Optional[str], input_size: Optional[Sequence[int]]) -> nn.Module:
    meta: Dict[str, Any] = RunFolder(path.parent).load_checkpoint(path) if path.suffix != ".safetensors" else {}
    state = load_state_dict(path)
    name = arch or meta.get("arch")
    if not name:
        raise UserError(f"{path}: pass --arch (the checkpoint does not say which model it is)")
    size, classes = input_size or meta.get("input_size"), meta.get("num_classes")
    if size is None or classes is None:
        found_size, found_classes = state_dict_shapes(name, state)
        size, classes = size or found_size, classes or found_classes
    with deferred_convergence():  # the checkpoint brings its singular vectors
        model = create_model(split_spec(name)[0], input_size=size, num_classes=classes)
        _load_state(model, state, path)
    return model


def _load_state(model: nn.Module, state: Dict[str, torch.Tensor], where: Path) -> None:
    check_weights(state, where, model)  # before load_state_dict, which would cast an integer tensor silently
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        reason = state_mismatch(model, state) or load_mismatch(e)  # tensors compared, else torch's words
        if "another architecture" not in reason:
            reason += ": these weights are for another architecture"
        raise UserError(f"{where} does not match the model architecture ({type(model).__name__}): {reason} "
                        f"(pass --arch and --input-size if it was trained for another)") from e


# --------------------------------------------------------------------------------------------
# Measuring
# --------------------------------------------------------------------------------------------
def first_samples(ds, n: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """The first ``n`` samples of ``ds`` (all when ``n`` is 0) as (images (N, C, H, W) in [0, 1], labels (N,))."""
    n = min(n, len(ds)) if n else len(ds)
    if hasattr(ds, "images"):  # in-memory datasets: slice directly
        x = ds.images[:n]
        x = x.float() / 255.0 if x.dtype == torch.uint8 else x
        return x, ds.labels[:n]
    xs, ys = zip(*(ds[i] for i in range(n)))
    return torch.stack(xs), torch.tensor(ys)


def _batches(x: torch.Tensor, y: torch.Tensor, bs: int):
    for i in range(0, x.shape[0], bs):
        yield x[i:i + bs], y[i:i + bs]


def _geometry(model: nn.Module, x: torch.Tensor, y: torch.Tensor, cfg: EvalConfig, device, gen) -> CurvatureStats:
    parts = [curvature_stats(model, xb.to(device), yb.to(device), n_iter=cfg.hvp_iters, generator=gen)
             for xb, yb in _batches(x, y, 32)]
    return CurvatureStats(*(torch.cat([getattr(p, k).cpu() for p in parts])
                            for k in ("grad_norm", "hessian_norm", "curvature")))


@torch.no_grad()
def _accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, bs: int, device, name: Optional[str]) -> float:
    correct = 0
    for xb, yb in _batches(x, y, bs):
        logits = model(xb.to(device))
        if not bool(torch.isfinite(logits).all()):  # the argmax of NaN logits is not an accuracy
            raise WeightsError(f"{shown(name, 160) if name else 'the model'} computes logits that are not finite on "
                               f"{int((~torch.isfinite(logits)).any(1).sum())} of {len(yb)} test images: it cannot "
                               f"be measured; check its weights")
        correct += int((logits.argmax(1).cpu() == yb).sum())
    return 100.0 * correct / max(len(y), 1)


def evaluate_model(model: nn.Module, test_ds, train_ds, cfg: EvalConfig,
                   device: Optional[torch.device] = None, name: Optional[str] = None) -> Dict[str, Any]:
    """All measurements for one model. Returns a JSON-able dict.

    Args:
        name: the model's name in the message that refuses it when its logits are not finite
            (:class:`~lcnn_zoo.weight_checks.WeightsError`, raised during the accuracy, the first measurement).
    """
    device = device or next(model.parameters()).device
    model.eval()
    gen = torch.Generator().manual_seed(cfg.seed)
    steps = tqdm(total=5, desc="measuring", leave=False, disable=not cfg.progress)
    x_all, y_all = first_samples(test_ds, cfg.limit)
    out: Dict[str, Any] = {"accuracy": _accuracy(model, x_all, y_all, cfg.batch_size, device, name),
                           "test_samples": int(len(y_all))}
    steps.update()
    xg, yg = first_samples(test_ds, cfg.geom_samples)
    test_geo = _geometry(model, xg, yg, cfg, device, gen)
    out.update(test_geo.summary())
    out["geometry_samples"] = int(len(yg))
    steps.update()
    xt, yt = first_samples(train_ds, cfg.geom_samples)
    train_geo = _geometry(model, xt, yt, cfg, device, gen)
    out["train_geometry"] = train_geo.summary()
    out["train_test_discrepancy"] = relative_discrepancy(train_geo, test_geo)
    steps.update()
    xp, yp = first_samples(test_ds, cfg.pgd_samples)
    pgd = pgd_accuracy(model, ((xb.to(device), yb.to(device)) for xb, yb in _batches(xp, yp, cfg.batch_size)),
                       list(cfg.eps), steps=cfg.pgd_steps)
    out["pgd_l2"] = {f"{e:g}": v for e, v in pgd.items()}
    out["pgd_samples"], out["pgd_steps"] = int(len(yp)), cfg.pgd_steps
    steps.update()
    xn, yn = first_samples(test_ds, cfg.noise_samples)
    rel = gradient_robustness(model, xn.to(device), yn.to(device), cfg.noise_norms, generator=gen).cpu()
    curv = test_geo.curvature[: len(yn)]
    out["gradient_robustness"] = {
        "noise_norms": list(cfg.noise_norms),
        "relative_change_mean": rel.mean(1).tolist(),
        "relative_change_std": rel.std(1).tolist() if rel.shape[1] > 1 else [0.0] * len(cfg.noise_norms),
        "prediction_mean": [float(r * curv.mean()) for r in cfg.noise_norms],
        "samples": int(len(yn)),
    }
    steps.update()
    steps.close()
    return out


# --------------------------------------------------------------------------------------------
# Reporting
# --------------------------------------------------------------------------------------------
def _pm(m: Dict[str, Any], key: str) -> str:
    return f"{m[key + '_mean']:.4g} ± {m[key + '_std']:.3g}"


def markdown_report(results: Dict[str, Dict[str, Any]], command: str = "") -> str:
    """Tables 1–3 of the paper for the evaluated models, as markdown."""
    names = list(results)
    lines = []
    if command:
        lines += [f"Command: `{command}`", ""]
    any_r = results[names[0]]
    lines += [f"Table 1 — geometry on {any_r['geometry_samples']} test images, accuracy on "
              f"{any_r['test_samples']}:", "",
              "| model | E‖∇ₓℓ‖₂ | E‖∇²ₓℓ‖₂ | E C(x) | accuracy (%) |", "|---|---|---|---|---|"]
    for n in names:
        r = results[n]
        lines.append(f"| {n} | {_pm(r, 'grad_norm')} | {_pm(r, 'hessian_norm')} | {_pm(r, 'curvature')} | "
                     f"{r['accuracy']:.2f} |")
    eps = list(any_r["pgd_l2"])
    lines += ["", f"Table 2 — accuracy (%) under ℓ2-PGD ({any_r['pgd_steps']} steps, {any_r['pgd_samples']} test "
                  f"images):",
              "", "| model | " + " | ".join(f"ε={e}" for e in eps) + " |", "|---" * (len(eps) + 1) + "|"]
    for n in names:
        lines.append(f"| {n} | " + " | ".join(f"{results[n]['pgd_l2'][e]:.2f}" for e in eps) + " |")
    lines += ["", "Table 3 — train/test relative discrepancy |E_test − E_train| / E_test:", "",
              "| model | Δ‖∇ₓℓ‖₂ | Δ‖∇²ₓℓ‖₂ | ΔC |", "|---|---|---|---|"]
    for n in names:
        d = results[n]["train_test_discrepancy"]
        lines.append(f"| {n} | {d['grad_norm']:.3g} | {d['hessian_norm']:.3g} | {d['curvature']:.3g} |")
    return "\n".join(lines) + "\n"


def plot_gradient_robustness(results: Dict[str, Dict[str, Any]], path: Path) -> Path:
    """Figure 2: relative gradient change vs ‖ε‖ (solid) and the prediction ‖ε‖·E C (dashed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 4))
    for i, (name, r) in enumerate(results.items()):
        g = r["gradient_robustness"]
        color = f"C{i}"
        ax.plot(g["noise_norms"], g["relative_change_mean"], "o-", color=color, label=name)
        ax.plot(g["noise_norms"], g["prediction_mean"], "--", color=color, alpha=0.6)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("noise norm ‖ε‖₂")
    ax.set_ylabel("‖∇ℓ(x+ε) − ∇ℓ(x)‖ / ‖∇ℓ(x)‖")
    ax.set_title("Gradient robustness (dashed: ‖ε‖·E C(x))")
    ax.legend(fontsize=8)
    fig.tight_layout()
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=120))
    plt.close(fig)
    return path


def _unique_names(specs: Sequence[str], names: Sequence[str]) -> List[str]:
    """Display names, one per model: a name given twice (two run folders both called ``exp``)
    becomes the spec as typed, and a spec given twice is numbered."""
    out: List[str] = []
    for spec, name in zip(specs, names):
        candidate = name if list(names).count(name) == 1 else spec
        base, i = candidate, 2
        while candidate in out:
            candidate, i = f"{base} ({i})", i + 1
        out.append(candidate)
    return out


def run_eval(specs: Sequence[str], dataset: str, *, data_dir: Optional[str] = None, download: bool = False,
             arch: Optional[str] = None, input_size: Optional[Sequence[int]] = None,
             cfg: Optional[EvalConfig] = None, output: Optional[Path] = None,
             device: Optional[torch.device] = None, command: str = "",
             random_init: bool = False, allow_unfinished: bool = False) -> Dict[str, Dict[str, Any]]:
    """Evaluate each model in ``specs`` on ``dataset``; with ``output``, write eval.json, eval.md and
    the plot into that folder (:func:`write_report`; the caller chose it: a new folder of its own).

    Every model is loaded (its weights checked: :mod:`lcnn_zoo.weight_checks`) and checked against
    the data (input size, number of classes, finite outputs on the first test images) before any
    measurement starts, so a mistake costs seconds, not a partial evaluation. A run that has not
    finished is measured only with ``allow_unfinished`` (its entry then says which epoch).
    """
    cfg = (cfg or EvalConfig()).validate()
    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    loaded = [load_model(spec, arch=arch, input_size=input_size, device=device, random_init=random_init,
                         allow_unfinished=allow_unfinished) for spec in specs]
    models = list(zip(_unique_names(specs, [n for n, _ in loaded]), [m for _, m in loaded]))
    datasets: Dict[Tuple[int, ...], Tuple[Any, Any]] = {}
    info: Optional[DataInfo] = None
    for spec, (name, model) in zip(specs, models):
        size = input_size_of(model) or ()
        if size not in datasets:
            info = info or describe_dataset(dataset, data_dir=data_dir, download=download)
            check_dataset_memory(info, size)  # (the size read from the weights): before the data is resized
            kw: Dict[str, Any] = dict(image_size=tuple(size[1:]), channels=size[0]) if size else {}
            test_ds = build_dataset(dataset, train=False, data_dir=data_dir, download=download, **kw)
            train_ds = build_dataset(dataset, train=True, data_dir=data_dir, download=download,
                                     classes=getattr(test_ds, "classes", None), **kw)
            datasets[size] = (test_ds, train_ds)
        test_ds, _ = datasets[size]
        sample = test_ds[0][0]
        if size and tuple(sample.shape) != tuple(size):
            raise UserError(f"{shown(spec)} expects inputs of size {tuple(size)}, but {shown(dataset)} images are "
                            f"{tuple(sample.shape)}")
        outputs = getattr(model, "num_classes", None)
        classes = num_classes_of(test_ds)
        if outputs is not None and outputs < classes:
            raise UserError(f"{shown(spec)} has {outputs} classes and {shown(dataset)} has {classes}: evaluate it on "
                            f"the data it was trained for")
        x0, y0 = first_samples(test_ds, min(cfg.batch_size, len(test_ds)))
        check_outputs(model, x0.to(device), spec, y0.to(device))
    results: Dict[str, Dict[str, Any]] = {}
    for name, model in models:
        test_ds, train_ds = datasets[input_size_of(model) or ()]
        if cfg.progress:
            print(f"evaluating {name} on {dataset} ...", flush=True)
        results[name] = evaluate_model(model, test_ds, train_ds, cfg, device, name=name)
        results[name]["dataset"] = dataset
        if getattr(model, "unfinished_run", None):  # --allow-unfinished: which epoch was measured
            results[name]["unfinished_run"] = getattr(model, "unfinished_run")
    if output is not None:
        write_report(results, Path(output), cfg=cfg, command=command)
    return results


def write_report(results: Dict[str, Dict[str, Any]], folder: Path, *, cfg: EvalConfig, command: str = "") -> Path:
    """eval.json, eval.md and gradient_robustness.png in ``folder`` (each written atomically).

    Raises:
        UserError: a result is NaN or infinite (named; nothing is written): eval.json would hold the
            bare ``NaN``/``Infinity`` tokens, which are not JSON, and ``push --metrics`` would publish them.
    """
    bad = non_finite(results)
    if bad is not None:
        raise UserError(f"the measurement {shown(bad[0], 120)} is {bad[1]}, not a finite number: nothing was written "
                        f"(eval.json holds finite numbers only); check the model's weights")
    write_json(folder / "eval.json", {"command": command, "config": dict(cfg.__dict__), "results": results},
               allow_nan=False)
    write_text(folder / "eval.md", markdown_report(results, command))
    plot_gradient_robustness(results, folder / "gradient_robustness.png")
    return folder
