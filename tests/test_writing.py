"""lcnn_zoo.writing, the one write policy: temporary files and locks never follow links, a folder
holding anything is never written into, names are names, and multi-file changes roll back."""
import os

import pytest

from lcnn_zoo.checkpoint import RunFolder
from lcnn_zoo.errors import UserError
from lcnn_zoo.writing import Transaction, atomic_write, check_name, file_lock, new_folder, write_text


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
    monkeypatch.setattr("lcnn_zoo.writing.secrets.token_hex", lambda n: "abcd")
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

    monkeypatch.setattr("lcnn_zoo.writing.os.replace", replace)
    with pytest.raises(UserError, match="no space left"):
        Transaction().add(tmp_path / "a", b"new a").add(tmp_path / "b", b"new b").add(tmp_path / "manifest", "m").commit()
    assert (tmp_path / "a").read_bytes() == b"old a" and not (tmp_path / "b").exists()
    assert not (tmp_path / "manifest").exists() and sorted(p.name for p in tmp_path.iterdir()) == ["a"]
