"""The engine folder: every path into it is built here, and nowhere else.

    <engine>/                           default <data>/geovote/<model slug>/ (embed.build --out)
        embeddings/<split>/             shards + manifest.json + failures.csv + plan.json (embed)
        rejects-<split>.csv             dataset rows that could not be used, with the reason (geovote.data)
        index/                          the FAISS index folder (index.build, index.search)
            retrieve.json               voting parameters chosen by retrieve.tune
            calibration.json            answers' probabilities, fitted by retrieve.tune (retrieve.calibrate)
            calibration-albums.json     albums' answers' probabilities, fitted on sequences (retrieve.album)
            cells-<spec>-<digest>.npy   each training row's cell at every voting level (retrieve.engine)
            countries-<digest>.npy      each training row's country code (retrieve.engine, for --within)
            spacing-<m>-<digest>.npy    each training row's distance to its m-th nearest other row (km)
                                        (<digest>: the index build they were computed from, a hash of
                                        its index.json: a cache is only ever read by that build)
        predictions-<split>.parquet     retrieve.query --split

An engine is named by its folder or by its index folder (`--index DIR`: DIR is the index, whatever its
name, and its parent is the engine).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from geovote.paths import default_sample_root

INDEX_DIR = "index"
EMBEDDINGS_DIR = "embeddings"
PARAMS_FILE = "retrieve.json"
CALIBRATION_FILE = "calibration.json"
ALBUM_CALIBRATION_FILE = "calibration-albums.json"
# embeddings/<split>/: id and path (`<archive>::<member>`) of every image read from an archive, sorted by
# id: where the gallery finds the evidence behind an answer (retrieve.engine.Engine.gallery_lookup)
ARCHIVED_IMAGES_FILE = "archived-images.parquet"


class EngineMissing(FileNotFoundError):
    """No engine (index) where one was expected; the message says how to build it."""


def model_slug(name: str) -> str:
    """A folder name for a model name: a checkpoint folder's own name, else the name made path-safe."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", Path(name).name if Path(name).is_dir() else name).strip("-")


@dataclass(frozen=True)
class EngineLayout:
    root: Path
    index_dir: Path | None = None  # an index folder named by the user; default root/index

    @classmethod
    def for_dataset(cls, data_root: str | Path | None = None, model: str = "default") -> "EngineLayout":
        """Where embed.build puts the engine of `model` over a dataset (default: the bundled sample)."""
        data = Path(data_root) if data_root else default_sample_root()
        return cls(data / "geovote" / model_slug(model))

    @classmethod
    def from_index(cls, index_dir: str | Path) -> "EngineLayout":
        """The engine an index folder belongs to (its parent); the index keeps its own name."""
        index_dir = Path(index_dir)
        return cls(index_dir.parent, index_dir)

    @property
    def index(self) -> Path:
        return self.index_dir if self.index_dir is not None else self.root / INDEX_DIR

    @property
    def params(self) -> Path:
        return self.index / PARAMS_FILE

    @property
    def calibration(self) -> Path:
        return self.index / CALIBRATION_FILE

    @property
    def album_calibration(self) -> Path:
        return self.index / ALBUM_CALIBRATION_FILE

    def embeddings(self, split: str) -> Path:
        return self.root / EMBEDDINGS_DIR / split

    def archived_images(self, split: str) -> Path:
        return self.embeddings(split) / ARCHIVED_IMAGES_FILE

    def rejects(self, split: str) -> Path:
        return self.root / f"rejects-{split}.csv"

    def cells(self, spec: str, digest: str) -> Path:
        return self.index / f"cells-{spec}-{digest}.npy"

    def countries(self, digest: str) -> Path:
        return self.index / f"countries-{digest}.npy"

    def spacing(self, m: int, digest: str) -> Path:
        return self.index / f"spacing-{m}-{digest}.npy"

    def predictions(self, split: str) -> Path:
        return self.root / f"predictions-{split}.parquet"

    def require_index(self) -> Path:
        """The index folder, or EngineMissing saying how to build it (or where the index is, when
        pointed at an engine folder instead of its index)."""
        if (self.index / "index.json").is_file():
            return self.index
        if (self.index / INDEX_DIR / "index.json").is_file():
            raise EngineMissing(f"{self.index} is an engine folder, not an index: did you mean "
                                f"--index {self.index / INDEX_DIR}?")
        if self.index.is_dir():
            raise EngineMissing(f"{self.index} holds no index (no index.json): build one with "
                                "`python -m embed.build`")
        raise EngineMissing(f"no index at {self.index}: build it first with `python -m embed.build`")


def resolve(index: str | Path | None = None, engine: str | Path | None = None) -> EngineLayout:
    """The engine a command was pointed at: `--index DIR`, `--engine DIR`, or the bundled sample's."""
    if index is not None:
        return EngineLayout.from_index(index)
    if engine is not None:
        return EngineLayout(Path(engine))
    return EngineLayout.for_dataset()
