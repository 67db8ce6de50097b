"""Where geovote keeps its data by default: `$GEOVOTE_DATA`, else `./data`."""
from __future__ import annotations

import os
from pathlib import Path


def data_root() -> Path:
    return Path(os.environ.get("GEOVOTE_DATA", "data"))


def default_sample_root() -> Path:
    return data_root() / "sample"
