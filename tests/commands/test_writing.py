"""lcnn_zoo.commands.writing, the one write policy: temporary files and locks never follow links, a folder
holding anything is never written into, names are names, and multi-file changes roll back."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

from lcnn_zoo.commands.checkpoint import RunFolder
from lcnn_zoo.commands.writing import (
    Transaction,
    atomic_write,
    check_name,
    file_lock,
    lock_holder,
    new_folder,
    write_text,
)
from lcnn_zoo.errors import UserError


def test_a_lock_that_is_a_symlink_is_refused_and_its_target_untouched(tmp_path):
    target = tmp_path / "precious.txt"
    target.write_text("keep me")
    (tmp_path / "run").mkdir()
    os.symlink(target, tmp_path / "run" / ".lock")
    with pytest.raises(UserError, match="symbolic link"):
        with RunFolder(tmp_path / "run").lock():
            pass
    assert target.read_text() == "keep me"


def test_a_stale_lock_file_does_not_block(tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / ".lock").write_text("pid 1 on elsewhere, started long ago")  # left by a SIGKILL
    with RunFolder(tmp_path / "run").lock():
        assert "pid" in (tmp_path / "run" / ".lock").read_text()


def test_a_second_holder_fails_at_once(tmp_path):
    with file_lock(tmp_path / "l", "the thing", describe="pid 42"):
        with pytest.raises(UserError, match=r"the thing is in use \('pid 42'\)"):
            with file_lock(tmp_path / "l", "the thing"):
                pass


def test_a_lock_held_by_another_process_names_it_and_is_free_once_that_process_is_killed(tmp_path):
    """The lock is filelock's flock: a live holder in another process refuses a second one in one line naming
    it (its note survives the refused attempt), and a SIGKILL releases it: the lock file left behind blocks
    nothing. Holding it adds no file to the folder but the lock file, which stays after release."""
    code = ("import sys, time\nfrom lcnn_zoo.commands.writing import file_lock\n"
            "with file_lock(sys.argv[1], 'x', describe='pid 7 on host'):\n"
            "    print('held', flush=True)\n    time.sleep(600)\n")
    lock = tmp_path / "run" / ".lock"
    holder = subprocess.Popen([sys.executable, "-c", code, str(lock)], stdout=subprocess.PIPE, text=True,
                              cwd=Path(__file__).resolve().parents[2])
    try:
        assert holder.stdout.readline().strip() == "held"
        for _ in range(2):
            with pytest.raises(UserError, match=r"the run is in use \('pid 7 on host'\): wait for it to finish"):
                with file_lock(lock, "the run", describe="pid 8"):
                    pass
        assert lock_holder(lock) == "pid 7 on host"
    finally:
        holder.kill()
        holder.wait()
    assert lock_holder(lock) is None  # released by the kernel with the process
    with file_lock(lock, "the run", describe="pid 8"):
        assert lock_holder(lock) == "pid 8" and lock.read_text() == "pid 8"
        assert sorted(p.name for p in lock.parent.iterdir()) == [".lock"]
    assert sorted(p.name for p in lock.parent.iterdir()) == [".lock"] and lock_holder(lock) is None


def test_atomic_write_replaces_a_symlink_never_its_target(tmp_path):
    target = tmp_path / "elsewhere.txt"
    target.write_text("theirs")
    os.symlink(target, tmp_path / "args.json")
    write_text(tmp_path / "args.json", "ours")
    assert target.read_text() == "theirs"
    assert not (tmp_path / "args.json").is_symlink() and (tmp_path / "args.json").read_text() == "ours"


def test_a_planted_temporary_name_is_not_followed(tmp_path, monkeypatch):
    """Temporary names carry a random part and are opened with O_EXCL | O_NOFOLLOW."""
    target = tmp_path / "victim"
    target.write_text("theirs")
    monkeypatch.setattr("lcnn_zoo.commands.writing.secrets.token_hex", lambda n: "abcd")
    os.symlink(target, tmp_path / f".x.tmp-lcnn-{os.getpid()}-abcd")
    with pytest.raises((UserError, FileExistsError)):
        atomic_write(tmp_path / "x", lambda f: f.write(b"ours"))
    assert target.read_text() == "theirs"


def test_new_folders_never_hold_anything(tmp_path):
    (tmp_path / "exp").mkdir()
    assert new_folder(tmp_path, "exp") == tmp_path / "exp"  # empty: used
    (tmp_path / "exp" / "mine.txt").write_text("x")
    assert new_folder(tmp_path, "exp") == tmp_path / "exp-1"
    assert new_folder(tmp_path, "exp") == tmp_path / "exp-1"  # exp-1 is empty now
    (tmp_path / "exp-1" / "f").write_text("x")
    assert new_folder(tmp_path, "exp", create=False) == tmp_path / "exp-2"
    assert not (tmp_path / "exp-2").exists()
    os.symlink(tmp_path / "exp", tmp_path / "link")
    assert new_folder(tmp_path, "link") == tmp_path / "link-1"  # a link is never taken for an empty folder
    with pytest.raises(UserError, match="exists and holds files"):
        new_folder(tmp_path, "exp", existing="refuse")


@pytest.mark.parametrize("name", ["/abs", "../up", "a/b", ".hidden", "", "x" * 201, "a\nb", "..", "."])
def test_names_are_not_paths(name):
    with pytest.raises(UserError, match="must be a name"):
        check_name(name, "--experiment")


def test_a_transaction_restores_what_it_replaced(tmp_path, monkeypatch):
    (tmp_path / "a").write_bytes(b"old a")
    real = os.replace
    calls = []

    def replace(src, dst, *args, **kw):
        calls.append(dst)
        if str(dst).endswith("manifest"):
            raise OSError(28, "No space left on device")
        return real(src, dst, *args, **kw)

    monkeypatch.setattr("lcnn_zoo.commands.writing.os.replace", replace)
    with pytest.raises(UserError, match="no space left"):
        Transaction().add(tmp_path / "a", b"new a").add(tmp_path / "b", b"new b").add(
            tmp_path / "manifest", "m").commit()
    assert (tmp_path / "a").read_bytes() == b"old a" and not (tmp_path / "b").exists()
    assert not (tmp_path / "manifest").exists() and sorted(p.name for p in tmp_path.iterdir()) == ["a"]


@pytest.mark.parametrize("code", ["ENOENT", "ENAMETOOLONG", "EMLINK", "EIO"])
def test_every_os_error_of_a_write_is_one_line_naming_the_path(tmp_path, monkeypatch, code):
    """Hostile pass of issue 31, P4/T2/V5: _os_error re-raised any errno outside its table (ENOENT
    under /proc, ENAMETOOLONG, EMLINK, …): a traceback. Every OSError is now one UserError line."""
    import errno

    import lcnn_zoo.commands.writing as writing

    number = getattr(errno, code)

    def refuse(*a, **k):
        raise OSError(number, os.strerror(number))

    real_mkdir = os.mkdir
    monkeypatch.setattr(writing.os, "mkdir", refuse)
    with pytest.raises(UserError, match=f"while creating the folder .*{tmp_path.name}"):
        writing._mkdirs(tmp_path / "a" / "b")
    monkeypatch.setattr(writing.os, "mkdir", real_mkdir)
    monkeypatch.setattr(writing.os, "replace", refuse)
    with pytest.raises(UserError, match=f"while writing .*{tmp_path.name}/f.txt"):
        write_text(tmp_path / "f.txt", "x")
    assert not (tmp_path / "f.txt").exists()


def test_a_parent_where_no_folder_can_be_created_is_found_before_any_work(tmp_path, monkeypatch):
    """`os.access` says yes where `mkdir` fails (root under /proc): the preflight creates and removes a
    probe folder in the nearest existing folder, and checks the length of the names still to create."""
    import errno

    import lcnn_zoo.commands.writing as writing
    from lcnn_zoo.commands.writing import check_writable_parent

    real = os.mkdir

    def no_such(path, *a, **k):
        if str(path).startswith(str(tmp_path / "proc")):
            raise FileNotFoundError(errno.ENOENT, "No such file or directory")
        return real(path, *a, **k)

    (tmp_path / "proc").mkdir()
    monkeypatch.setattr(writing.os, "mkdir", no_such)
    with pytest.raises(UserError, match=r"--output .*proc/x/y: a folder cannot be created in .*proc \(no such file"):
        check_writable_parent(tmp_path / "proc" / "x" / "y", "--output")
    with pytest.raises(UserError, match="is longer than the file system's"):
        check_writable_parent(tmp_path / ("n" * 300) / "y", "--output")
    assert check_writable_parent(tmp_path / "ok" / "y", "--output") == tmp_path / "ok" / "y"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["proc"]  # the probes are gone, nothing created


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="needs Linux's /proc")
def test_an_output_under_proc_is_one_line_before_any_work(tmp_path, capsys, monkeypatch):
    """The hostile pass's reproductions (P4, T2, V5), as root: `train --output /proc/x`, `eval --output
    /proc/evx`, `push --output-dir /proc/hostile` and LCNN_ZOO_CACHE=/proc/nope were FileNotFoundError
    tracebacks (push's and eval's after the model was loaded). One line, before any data or model."""
    from lcnn_zoo.commands import training

    from cli_helpers import FAST_LCNN_RUN, fails_with, needs_fmnist
    from model_helpers import checkpoint

    def read(*a, **k):
        raise AssertionError("work started before the output folder was checked")

    monkeypatch.setattr(training, "_datasets", read)
    monkeypatch.setattr("lcnn_zoo.commands.evaluation.build_dataset", read)
    monkeypatch.setattr("lcnn_zoo.commands.evaluation.load_model", read)
    monkeypatch.setattr("lcnn_zoo.commands.publishing._load_for_push", read)
    fails_with(capsys, ["eval", "lcnn_resnet20.fmnist", "--output", "/proc/evx"], "/proc")
    ckpt = checkpoint(tmp_path)
    fails_with(capsys, ["push", str(ckpt), "--model", "lcnn_resnet20.cifar10", "--output-dir", "/proc/hostile"],
               "/proc")
    if not needs_fmnist.args[0]:  # the Fashion-MNIST files are there
        fails_with(capsys, ["train"] + FAST_LCNN_RUN + ["--epochs", "1", "--output", "/proc/x"], "/proc")
        monkeypatch.setenv("LCNN_ZOO_CACHE", "/proc/nope")
        fails_with(capsys, ["train"] + FAST_LCNN_RUN + ["--epochs", "1", "--output", str(tmp_path / "runs")],
                   "the data cache ($LCNN_ZOO_CACHE)", "/proc")
        assert not (tmp_path / "runs").exists()
    assert not os.path.exists("/proc/x") and not os.path.exists("/proc/evx")
