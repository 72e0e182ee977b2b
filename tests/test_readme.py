"""The README's code blocks run as written: every ``python`` block, and every command of every
``bash`` block — those that install or run the test suite are the commands CI itself runs
(``.ci/run``), the quickstart is run whole by ``tests/commands/test_quickstart.py``, and the others run here,
in a fresh folder."""
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from cli_helpers import needs_fmnist

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text(encoding="utf-8")
BLOCKS = re.findall(r"^```(\w*)\n(.*?)^```", README, re.S | re.M)
ENV = {**os.environ, "PYTHONPATH": str(REPO)}


def _commands(code: str):
    """The commands of a bash block: its lines without comments, split at ``&&``."""
    for line in code.splitlines():
        line = line.split(" #")[0].strip()
        if line and not line.startswith("#"):
            yield from (part.strip() for part in line.split("&&"))


def _run_by_ci(command: str) -> bool:
    """Whether ``.ci/run`` runs ``command`` (``pip`` / ``python`` there are ``python3 -m pip`` / ``python3``)."""
    ci = (REPO / ".ci" / "run").read_text(encoding="utf-8")
    words = [".[dev]" if w == "." else w for w in shlex.split(command)]
    if words[0] == "pip":
        words = ["python3", "-m", "pip"] + words[1:]
    elif words[0] == "python":
        words = ["python3"] + words[1:]

    def split(line):
        try:  # the package with its dev extras is the package installed
            return [".[dev]" if w == "." else w for w in shlex.split(line)]
        except ValueError:  # a line of shell shlex does not parse (escapes, open quotes): not a command of ours
            return []
    return any(all(w in split(line) for w in words) for line in ci.splitlines()
               if line.strip() and not line.lstrip().startswith("#"))


def test_every_block_is_python_bash_or_the_citation():
    assert BLOCKS, "no code blocks found"
    assert {lang for lang, _ in BLOCKS} <= {"python", "bash", "bibtex"}, [lang for lang, _ in BLOCKS]
    assert sum(lang == "python" for lang, _ in BLOCKS) >= 2 and sum(lang == "bash" for lang, _ in BLOCKS) >= 2


@pytest.mark.parametrize("index", [i for i, (lang, _) in enumerate(BLOCKS) if lang == "python"])
def test_python_blocks_run_as_written(index):
    code = BLOCKS[index][1]
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=600,
                          env=ENV)
    assert proc.returncode == 0, proc.stderr[-3000:]
    if "lcnn_report" in code:
        assert "every operation is covered" in proc.stdout, proc.stdout[-2000:]


def test_install_and_test_commands_are_the_ones_ci_runs():
    """The first bash block: what CI does on a clean clone (install, the test suite); the quickstart is
    the slow test_quickstart.py, run whole in CI's slow step."""
    first = [c for c in _commands(BLOCKS[[lang for lang, _ in BLOCKS].index("bash")][1])]
    assert "lcnn-zoo quickstart" in first and "python -m pytest -q" in first
    for command in first:
        if command == "lcnn-zoo quickstart":
            assert '"quickstart"' in (REPO / "tests" / "commands" / "test_quickstart.py").read_text(encoding="utf-8")
        else:
            assert _run_by_ci(command), command


@needs_fmnist
def test_the_other_bash_blocks_run_as_written(tmp_path):
    """Every later bash block, each command in turn, in an empty folder (the commands write runs/…)."""
    exe = shutil.which("lcnn-zoo")
    blocks = [code for lang, code in BLOCKS if lang == "bash"][1:]
    assert blocks
    for code in blocks:
        for command in _commands(code):
            words = shlex.split(command)
            if words[0] == "lcnn-zoo":  # the console script, or the same module where it is not installed
                words = [exe] + words[1:] if exe else [sys.executable, "-m", "lcnn_zoo"] + words[1:]
            proc = subprocess.run(words, cwd=tmp_path, capture_output=True, text=True, timeout=900, env=ENV)
            assert proc.returncode == 0, (command, proc.stderr[-3000:])
    names = {p.name for p in (tmp_path / "runs" / "first").iterdir()}  # what the README says the folder holds
    assert {"args.json", "last.pth", "model.safetensors", "model_best.safetensors", "summary.json",
            "summary.csv"} <= names, names
    assert (tmp_path / "runs" / "first-eval" / "eval.json").is_file()


def test_the_tests_the_docs_cite_exist():
    """docs/*.md cite tests as ``test_file.py::test_name`` (a following ``::test_name`` is in the same
    file): a renamed or removed test must not leave a claim the suite no longer checks."""
    missing, checked = [], 0
    for doc in sorted((REPO / "docs").glob("*.md")):
        current = None
        for cell in re.findall(r"`([^`\n]*test_\w+[^`\n]*)`", doc.read_text(encoding="utf-8")):
            m = re.match(r"(test_\w+\.py)?::(test_\w+)", cell)
            if not m:
                continue
            current = m.group(1) or current
            path, checked = next((REPO / "tests").rglob(current or "-"), None), checked + 1
            if path is None or f"def {m.group(2)}(" not in path.read_text(encoding="utf-8"):
                missing.append(f"{doc.name}: {current}::{m.group(2)}")
    assert missing == [] and checked > 50


def _doc_command_lines():
    """Every ``lcnn-zoo`` command of docs/*.md's bash blocks, as argv after ``lcnn-zoo``: continuation
    lines joined, comments dropped, a ``common=(…)`` array expanded where ``"${common[@]}"`` uses it;
    lines that abbreviate with ``…`` are left out."""
    for doc in sorted((REPO / "docs").glob("*.md")):
        arrays = {}
        for block in re.findall(r"^```bash\n(.*?)^```", doc.read_text(encoding="utf-8"), re.S | re.M):
            text = re.sub(r"\\\n\s*", " ", block)
            for name, body in re.findall(r"^(\w+)=\((.*?)\)", text, re.S | re.M):
                arrays[name] = shlex.split(body.replace("\n", " "))
            for line in text.splitlines():
                line = line.split(" #")[0].strip()
                if "…" in line or "lcnn_zoo " not in line + " " and not line.startswith("lcnn-zoo "):
                    continue
                words = []
                for w in shlex.split(line):
                    m = re.fullmatch(r"\$\{(\w+)\[@\]\}", w)
                    words.extend(arrays[m.group(1)] if m else [w])
                start = words.index("lcnn-zoo") if "lcnn-zoo" in words else words.index("lcnn_zoo")
                yield doc.name, words[start + 1:]


def test_every_lcnn_zoo_command_in_docs_parses():
    """Each documented ``lcnn-zoo`` line's options are accepted as written (the commands that train
    for minutes run in CI's slow step or by hand; a renamed or removed option must not outlive its docs)."""
    from lcnn_zoo.commands.cli import build_parser
    from lcnn_zoo.commands.options import train_config

    seen = 0
    cwd = os.getcwd()
    os.chdir(REPO)  # the docs' relative paths (configs/…) are the repository's
    try:
        for doc, argv in _doc_command_lines():
            seen += 1
            try:
                if argv[0] == "train":
                    train_config(argv[1:])
                else:
                    build_parser().parse_args(argv)
            except SystemExit as e:
                raise AssertionError(f"{doc}: lcnn-zoo {shlex.join(argv)} is refused (exit {e.code})") from e
    finally:
        os.chdir(cwd)
    assert seen >= 8
