"""lcnn_zoo/layers/_kernels/__init__.py, the kernels' one door: in the library only the activation
imports the fused kernels, in one statement, and only the names the door exports (not its modules);
importing the package loads the Triton kernels only when they are first used."""
import ast
import subprocess
import sys
from pathlib import Path

import pytest

from lcnn_zoo.layers import _kernels

PACKAGE = Path(__file__).resolve().parents[1] / "lcnn_zoo"
DOOR = "lcnn_zoo.layers._kernels"


def _kernel_imports(source: str, module: str) -> list:
    """(line, imported module, names) of each import statement of ``source`` (the text of ``module``,
    dotted) that reaches the door or anything under it; relative imports resolved."""
    package = module.rsplit(".", 1)[0]
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            targets = [(a.name, ()) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
            names = tuple(a.name for a in node.names)
            if base == DOOR or base.startswith(DOOR + "."):
                targets = [(base, names)]
            else:  # `from . import _kernels` in layers/, `from .layers import _kernels`: the door as a name
                targets = [(f"{base}.{n}", ()) for n in names]
        else:
            continue
        found += [(node.lineno, t, names) for t, names in targets if t == DOOR or t.startswith(DOOR + ".")]
    return found


def test_the_activation_is_the_only_way_into_the_kernels():
    statements = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE)
        if rel.parts[:2] == ("layers", "_kernels"):
            continue
        module = "lcnn_zoo." + ".".join(rel.with_suffix("").parts)
        hits = _kernel_imports(path.read_text(encoding="utf-8"), module)
        if hits:
            statements[str(rel)] = hits
    assert list(statements) == ["layers/activation.py"], statements
    ((_, target, names),) = statements["layers/activation.py"]  # one statement
    assert target == DOOR and names and set(names) <= set(_kernels.__all__), (target, names)


@pytest.mark.parametrize("source, module, reaches", [
    ("from ._kernels.fused import _status", "lcnn_zoo.layers.preforward", True),
    ("from ._kernels import fused", "lcnn_zoo.layers.activation", True),
    ("from . import _kernels", "lcnn_zoo.layers.state", True),
    ("import lcnn_zoo.layers._kernels.triton", "lcnn_zoo.penalty", True),
    ("from .layers._kernels import kernel_path", "lcnn_zoo.conversion", True),
    ("from . import prepared", "lcnn_zoo.layers.activation", False),
    ("from .layers import activation", "lcnn_zoo.penalty", False),
])
def test_the_check_sees_each_way_in(source, module, reaches):
    assert bool(_kernel_imports(source, module)) == reaches, source


def test_the_triton_kernels_are_imported_on_first_use_only():
    """Triton is optional (GPU only): importing the package, running the activation on the CPU or asking
    for the recorded paths must not import the Triton kernels."""
    code = ("import sys, torch, lcnn_zoo; from lcnn_zoo.layers import _kernels; "
            "lcnn_zoo.CenteredSoftplus()(torch.randn(8, requires_grad=True)).sum().backward(); "
            "_kernels.fused_status(); "
            "print('lcnn_zoo.layers._kernels.triton' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=PACKAGE.parent,
                         timeout=600, check=True)
    assert out.stdout.strip() == "False", out.stdout
