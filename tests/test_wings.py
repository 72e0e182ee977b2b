"""The package's two wings: the library (everything under ``lcnn_zoo/`` but ``commands/``) never imports
the commands (``lcnn_zoo/commands/``). The two entry-point shims that run a command
(``lcnn_zoo/__main__.py``, ``lcnn_zoo/timm_script.py``) are the only exceptions."""
import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "lcnn_zoo"
ENTRY_POINTS = {"__main__.py", "timm_script.py"}


def _imported(source: str, module: str) -> set:
    """Absolute names of the modules ``source`` (the text of ``module``, dotted) imports, statically:
    import statements, relative ones resolved, and ``importlib.import_module("…")`` string literals."""
    package = module.rsplit(".", 1)[0]  # the package a relative import starts from (a module's, or __init__'s own)
    names = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
            names |= {base} | {f"{base}.{a.name}" for a in node.names}
        elif (isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", "")) == "import_module"
              and node.args and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)):
            target = node.args[0].value
            names.add(f"lcnn_zoo{target}" if target.startswith(".") else target)
    return names


def _library_files():
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE)
        if rel.parts[0] != "commands" and str(rel) not in ENTRY_POINTS:
            yield rel, path


def test_the_library_never_imports_the_commands():
    offenders = []
    for rel, path in _library_files():
        module = "lcnn_zoo." + ".".join(rel.with_suffix("").parts)
        hits = sorted(n for n in _imported(path.read_text(encoding="utf-8"), module)
                      if n == "lcnn_zoo.commands" or n.startswith("lcnn_zoo.commands."))
        offenders += [f"lcnn_zoo/{rel} imports {n}" for n in hits]
    assert offenders == []
    assert len(list(_library_files())) > 20  # the walk saw the library


@pytest.mark.parametrize("source, module", [
    ("from ..commands.data import build_dataset", "lcnn_zoo.models.resnet"),
    ("from .commands import training", "lcnn_zoo.hub"),
    ("import lcnn_zoo.commands.cli", "lcnn_zoo.folding"),
    ("importlib.import_module('.commands.cli', 'lcnn_zoo')", "lcnn_zoo.hub"),
])
def test_the_check_sees_each_way_of_importing_a_command(source, module):
    assert any(n.startswith("lcnn_zoo.commands") for n in _imported(source, module)), source


def test_importing_the_library_loads_no_command():
    code = ("import sys, torch, lcnn_zoo, lcnn_zoo.hub, lcnn_zoo.layers, lcnn_zoo.models; "
            "from lcnn_zoo import lcnnify, fold, LCNNPenalty, curvature_stats, hessian_bound, attach_penalty; "
            "print(sorted(m for m in sys.modules if m.startswith('lcnn_zoo.commands')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=PACKAGE.parent, check=True)
    assert out.stdout.strip() == "[]", out.stdout
