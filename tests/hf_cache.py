"""Populate a real (offline) Hugging Face cache with a repo folder, the way hf_hub_download lays it out."""
import hashlib
import shutil
from pathlib import Path

from huggingface_hub import constants


def publish(tag: str, repo_id: str) -> None:
    """Record ``tag`` → ``repo_id`` in the (test) published manifest, as ``lcnn-zoo push --upload`` does."""
    import json
    import os

    path = Path(os.environ["LCNN_ZOO_PUBLISHED"])
    data = json.loads(path.read_text()) if path.is_file() else {}
    data[tag] = {"repo_id": repo_id}
    path.write_text(json.dumps(data))


def unpublish(tag: str) -> None:
    import json
    import os

    path = Path(os.environ["LCNN_ZOO_PUBLISHED"])
    data = json.loads(path.read_text()) if path.is_file() else {}
    data.pop(tag, None)
    path.write_text(json.dumps(data))


def populate(repo_id: str, folder: Path, revision: str = "main") -> Path:
    """Copy ``folder``'s files into ``$HF_HUB_CACHE/models--org--name`` (blobs + snapshot + ref)."""
    cache = Path(constants.HF_HUB_CACHE)
    repo_dir = cache / ("models--" + repo_id.replace("/", "--"))
    commit = hashlib.sha1(repo_id.encode()).hexdigest()
    snap = repo_dir / "snapshots" / commit
    snap.mkdir(parents=True, exist_ok=True)
    (repo_dir / "blobs").mkdir(exist_ok=True)
    for f in Path(folder).iterdir():
        data = f.read_bytes()
        blob = repo_dir / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        target = snap / f.name
        if target.exists() or target.is_symlink():
            target.unlink()
        target.symlink_to(blob)
    (repo_dir / "refs").mkdir(exist_ok=True)
    (repo_dir / "refs" / revision).write_text(commit)
    return snap


def remove(repo_id: str) -> None:
    shutil.rmtree(Path(constants.HF_HUB_CACHE) / ("models--" + repo_id.replace("/", "--")), ignore_errors=True)
