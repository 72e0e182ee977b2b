"""Test configuration: offline Hugging Face Hub, a throw-away HF cache, deterministic small CPU runs."""
import os
import tempfile

# huggingface_hub reads these once, at import: set them before anything imports timm.
_HF_HOME = tempfile.mkdtemp(prefix="lcnn-zoo-hf-")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HOME", _HF_HOME)
os.environ.setdefault("HF_HUB_CACHE", os.path.join(_HF_HOME, "hub"))
# The user's published manifest (lcnn-zoo push --upload writes it): a throw-away one for the tests.
os.environ["LCNN_ZOO_PUBLISHED"] = os.path.join(_HF_HOME, "published.json")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture
def readonly_dir(tmp_path):
    """A folder on a read-only file system (a tmpfs mounted ro; skipped where mounting is not allowed)."""
    import subprocess

    mount = tmp_path / "ro"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=64k", "tmpfs", str(mount)],
                      capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here")
    try:
        yield mount
    finally:
        subprocess.run(["umount", str(mount)])


@pytest.fixture
def weights(tmp_path, monkeypatch):
    """A copy of the package's shipped weights folder, so bundling tests never touch the real one."""
    import shutil

    from lcnn_zoo import hub

    folder = tmp_path / "weights"
    shutil.copytree(hub.WEIGHTS_DIR, folder)
    monkeypatch.setattr(hub, "WEIGHTS_DIR", folder)
    return folder
