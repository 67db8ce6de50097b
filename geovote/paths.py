"""Where geovote keeps its data by default: `$GEOVOTE_DATA`, else `./data`; and a file's sha256."""
from __future__ import annotations

import os
from pathlib import Path


def data_root() -> Path:
    return Path(os.environ.get("GEOVOTE_DATA", "data"))


def default_sample_root() -> Path:
    return data_root() / "sample"


def folder_problem(folder: Path) -> str:
    """Why `folder` cannot be used or made for writing ("" when it can): the nearest of it and its
    parents that exists must be a folder this process may write in. Checked before long work."""
    for f in (folder, *folder.parents):
        if f.exists():
            if not f.is_dir():
                return f"{f} is a file, not a folder"
            if not os.access(f, os.W_OK | os.X_OK):
                return f"{f} is not writable"
            return ""
    return ""


def file_sha256(path: str | os.PathLike) -> str:
    """The sha256 of a file's bytes (hex), read in 1 MiB blocks: weights and published engines."""
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
