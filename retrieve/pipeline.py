"""The main job, stage after stage: embed a dataset's splits (or a folder of photos), index train, tune
the voting.

    build_engine(BuildConfig(...)) -> the engine folder (geovote.layout.EngineLayout)

It sits above the stages it drives (embed, index, retrieve.tuning), so none of them imports another
stage's driver. `python -m embed.build` is its command.
"""
from __future__ import annotations

import hashlib
import time
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, fields, replace
from pathlib import Path

from embed.images import DEFAULT_MAX_PIXELS
from embed.split import EmbedConfig, embed_split
from geovote.layout import EngineLayout


@dataclass
class BuildConfig:
    """The main job's settings (`python -m embed.build --config F --set key=value`): what to index, how
    to embed it (the EmbedConfig keys), and whether to index and tune."""
    data: str = ""  # dataset root in OSV-5M layout; "" = the bundled sample (generated on first use)
    photos: str = ""  # instead of a dataset: a folder of geotagged photos (geovote.photos)
    photos_csv: str = ""  # path,latitude,longitude for photos whose EXIF lacks coordinates
    splits: tuple[str, ...] = ("train",)
    out: str = ""  # "" = <data>/geovote/<model>
    # embedding: embed.split.EmbedConfig
    model: str = "default"  # see embed.models
    batch_size: int = 256
    workers: int = -1
    shard_rows: int = 16384
    max_pixels: int = DEFAULT_MAX_PIXELS
    pause_s: float = 0.0
    decode: str = "pil"  # "pil-full": no reduced-size decoding; "torchvision": on the model's device
    # then
    index: bool = True  # build the FAISS index over the train split
    index_factory: str = ""  # "" = chosen from the data (index.build.choose_factory)
    tune: bool = True  # then choose the voting parameters on val (or on train held out of its own search)
    dist_timeout_min: float = 120.0  # under torchrun: how long a collective may wait for a slow rank

    def __post_init__(self):
        from geovote.config import ConfigError

        if not self.splits:
            raise ConfigError("splits: name at least one split (train, val, test)")
        if self.dist_timeout_min <= 0:
            raise ConfigError(f"dist_timeout_min must be positive, got {self.dist_timeout_min}")
        self.embedding()  # its own checks, now

    def embedding(self) -> EmbedConfig:
        return EmbedConfig(**{f.name: getattr(self, f.name) for f in fields(EmbedConfig)})


def build_engine(cfg: BuildConfig, log=print) -> Path:
    """Embed every split of `cfg` (or its folder of photos), then (rank 0) index train and tune the
    voting. Returns the folder."""
    from embed.models import canonical_name
    from geovote import distributed
    from geovote.bundled_sample import ensure_sample

    if cfg.photos:
        return _build_photo_engine(cfg, log)
    rank, world = distributed.init(cfg.dist_timeout_min)
    root = Path(cfg.data) if cfg.data else ensure_sample()
    cfg = replace(cfg, model=canonical_name(cfg.model))  # paths stored absolute: queries work anywhere
    backbone = _backbone(cfg)
    layout = (EngineLayout(Path(cfg.out)) if cfg.out
              else EngineLayout.for_dataset(root, engine_name(cfg.model, backbone.name)))
    _check_out(layout)
    with _locked(layout, rank, world, log):
        return _build(cfg, root, backbone, layout, rank, world, log)


@contextmanager
def _locked(layout: EngineLayout, rank: int, world: int, log):
    """The engine's write lock (geovote.lock), held by rank 0 for the whole job; every rank learns
    whether it was had, so that a refused job stops on all of them."""
    from geovote import distributed
    from geovote.lock import EngineBusy, engine_lock

    with ExitStack() as stack:
        busy = None
        if rank == 0:
            try:
                stack.enter_context(engine_lock(layout.root, "embed.build", log=log))
            except (EngineBusy, OSError) as e:  # every rank stops, not only rank 0
                busy = str(e) if isinstance(e, EngineBusy) else f"{layout.root}: cannot be locked ({e})"
        if world > 1:
            busy = distributed.broadcast(busy)
        if busy:
            distributed.leave()
            raise EngineBusy(busy)
        yield


def _build(cfg: BuildConfig, root: Path, backbone, layout: EngineLayout, rank: int, world: int, log) -> Path:
    from geovote import distributed
    from geovote.data import read_split

    for name in cfg.splits:
        split = read_split(root, name, rejects_path=layout.rejects(name) if rank == 0 else None)
        if rank == 0:
            log(split.report.summary())
        # ends at a barrier under torchrun
        embed_split(split, backbone, layout.embeddings(name), cfg.embedding(), root, rank, world, log)
    if rank != 0:  # rank 0 alone indexes and tunes: the others leave rather than wait on a collective
        distributed.leave()
        return layout.root
    t_alone = time.perf_counter()
    if "train" in cfg.splits:
        _index_and_tune(cfg, layout, backbone, root, log)
    if world > 1:
        log(f"rank 0 indexed and tuned alone in {time.perf_counter() - t_alone:.1f} s "
            "(the other ranks had left)")
    distributed.leave()
    return layout.root


def _build_photo_engine(cfg: BuildConfig, log=print) -> Path:
    """An engine over a folder of geotagged photos (geovote.photos): the photos with coordinates are the
    gallery (ids: their paths relative to the folder), the others are listed in rejects-photos.csv; then
    the index and the tuning on photos held out of their own search, as for a dataset without val."""
    from embed.models import canonical_name
    from geovote.lock import engine_lock
    from geovote.paths import default_sample_root
    from geovote.photos import scan_photos, write_rejects

    root = Path(cfg.photos).resolve()
    cfg = replace(cfg, model=canonical_name(cfg.model), photos=str(root), splits=("train",))
    backbone = _backbone(cfg)
    # by default beside the sample, named after the folder and a hash of its path: two folders called
    # `pics` get two engines
    folder = f"{root.name}-{hashlib.sha256(str(root).encode()).hexdigest()[:8]}"
    layout = (EngineLayout(Path(cfg.out)) if cfg.out else
              EngineLayout(default_sample_root().parent / "photos" / folder / engine_name(cfg.model,
                                                                                         backbone.name)))
    _check_out(layout)  # before the scan, which opens every photo
    with engine_lock(layout.root, "embed.build --photos", log=log):
        split, rejected = scan_photos(root, cfg.photos_csv or None)
        reasons = ", ".join(f"{n:,} {why}" for why, n in split.report.rejected.most_common())
        left_out = (f", {split.report.rows - len(split):,} left out ({reasons}; listed in "
                    f"{layout.rejects('photos')})")
        log(f"{root}: {split.report.rows:,} photos, {len(split):,} with coordinates"
            + (left_out if rejected else ""))
        if len(split) == 0:
            write_rejects(layout.rejects("photos"), rejected)  # the file the message above points to
            split.require_rows()
        embed_split(split, backbone, layout.embeddings("train"), cfg.embedding(), root, log=log)
        write_rejects(layout.rejects("photos"), rejected)  # once the engine holds this scan's photos
        _index_and_tune(cfg, layout, backbone, root, log)
    return layout.root


def _backbone(cfg: BuildConfig):
    """The model, and the index factory checked against its width: a bad factory string must fail now,
    not after hours of embedding."""
    from embed.models import load_backbone

    backbone = load_backbone(cfg.model)
    if cfg.index and cfg.index_factory:
        from index.build import check_factory

        check_factory(cfg.index_factory, backbone.dim)
    return backbone


def _index_and_tune(cfg: BuildConfig, layout: EngineLayout, backbone, root: Path, log) -> None:
    """The train split's index brought up to date, then the voting tuned (on val, or without one on
    train images held out of their own search), as cfg asks: the same for datasets and photo folders."""
    if not cfg.index:
        return
    from index.build import refresh_index

    refresh_index(layout.embeddings("train"), layout.index, factory=cfg.index_factory or None, log=log)
    if cfg.tune:
        _tune(layout, cfg.model, backbone, root, cfg.workers, log)


def _check_out(layout: EngineLayout) -> None:
    """ConfigError unless the engine folder is a folder, or can be made: before any work."""
    from geovote.config import ConfigError
    from geovote.paths import folder_problem

    why = folder_problem(layout.root)
    if why:
        raise ConfigError(f"--out {layout.root}: {why}")


def engine_name(model: str, backbone_name: str) -> str:
    """The engine folder's name: the model's name, or for a folder or a file (whose name says little:
    every fine-tune is `.../best`) the backbone's name, which carries the weights' hash."""
    from embed.models import ALIASES, NAMED

    if model in NAMED or model in ALIASES or model.startswith(("random:", "pixels:", "hf-hub:")):
        return model
    if ":" in model and not Path(model.split(":", 1)[1]).exists() and not Path(model).exists():
        return model  # ARCH:TAG
    return backbone_name


def _tune(layout: EngineLayout, model: str, backbone, root: Path, workers: int, log) -> None:
    from retrieve.engine import Engine
    from retrieve.tuning import TooFewToTune, tune_and_save

    engine = Engine(layout.index, model=model, backbone=backbone, calibrated=False)
    try:
        best, scores, _ = tune_and_save(engine, root, "val", workers, log)
    except TooFewToTune as e:
        log(f"not tuned: {e}; queries will use the default voting settings")
        return
    log(f"val: voting GeoScore {scores['voting']['geoscore']:.0f} (1-NN {scores['1-nn']['geoscore']:.0f}, "
        f"weighted mean {scores['weighted mean']['geoscore']:.0f}) with k={best.k}, T={best.temperature}, "
        f"{best.cells} levels {best.levels}, bandwidth {best.bandwidth_km:g} km")
