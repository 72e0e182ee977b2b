"""``python -m lcnn_zoo.timm_script <timm script> [its arguments]``: run one of timm's own scripts
(train.py, validate.py, benchmark.py, inference.py, onnx_export.py, … from a clone of timm; the
wheel does not ship them) with the zoo's ``lcnn_*`` models registered.

timm's scripts find models by name in timm's registry, which ``import lcnn_zoo`` fills; only
train.py has a flag that imports a module first (``--device-modules``). This runs the script as
``python <script>`` would (``__name__ == "__main__"``, ``sys.argv[0]`` the script, its folder first
on ``sys.path``), after that import. Works under ``torchrun -m lcnn_zoo.timm_script train.py …``.

    python -m lcnn_zoo.timm_script ../pytorch-image-models/validate.py --model lcnn_resnet20.fmnist \\
        --pretrained --data-dir fmnist/ --split test
"""
from __future__ import annotations

import runpy
import sys
from pathlib import Path
from typing import List, Optional

USAGE = "usage: python -m lcnn_zoo.timm_script <timm script.py> [its arguments]"


def _not_python(script: Path) -> str:
    """Why ``script`` cannot run as Python ("" when it compiles): a binary behind a ``.py`` name (null
    bytes), a shell script, text in another encoding. Compiled here, before anything is imported, so
    that runpy's SyntaxError traceback never stands for the answer; errors the script raises when it
    runs stay its own.

    Args:
        script: an existing file.
    """
    try:
        compile(script.read_bytes(), str(script), "exec", dont_inherit=True)
    except SyntaxError as e:  # null bytes, bad syntax, undecodable text
        where = f" (line {e.lineno})" if e.lineno else ""
        return f"{str(e.msg).splitlines()[0][:200] if e.msg else 'invalid syntax'}{where}"
    except ValueError as e:  # null bytes, on Pythons before 3.12
        return str(e).splitlines()[0][:200]
    except OSError as e:  # unreadable
        return f"it cannot be read ({e.strerror or e.__class__.__name__})"
    return ""


def main(argv: Optional[List[str]] = None) -> int:
    """Run the timm script ``argv[0]`` with its arguments ``argv[1:]`` (default: ``sys.argv[1:]``), models registered.

    Returns:
        The exit code: the script's own (0 when it returns), 2 when ``argv[0]`` is not a Python script
        or no script is given, 0 for ``--help``.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE + "\n\n" + __doc__.split("\n\n")[1])
        return 0 if argv else 2
    script = Path(argv[0])
    if script.suffix != ".py" or not script.is_file():
        print(f"error: {str(script)[:200]!r} is not a Python script (a timm script such as validate.py)\n{USAGE}",
              file=sys.stderr)
        return 2
    reason = _not_python(script)
    if reason:
        print(f"error: {str(script)[:200]!r} is not a Python script: {reason}", file=sys.stderr)
        return 2
    import lcnn_zoo  # noqa: F401  (registers the lcnn_* models in timm)

    sys.argv = [str(script), *argv[1:]]
    sys.path.insert(0, str(script.resolve().parent))
    try:
        runpy.run_path(str(script), run_name="__main__")
    except SystemExit as e:  # the script's own exit status
        if isinstance(e.code, str):
            print(e.code, file=sys.stderr)
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
