"""The main job, stage after stage: embed a dataset's splits, index train, tune the voting.

    build_engine(EmbedConfig(...)) -> the engine folder (geovote.layout.EngineLayout)

It sits above the stages it drives (embed, index, retrieve.tuning), so none of them imports another
stage's driver. `python -m embed.build` is its command.
"""
from __future__ import annotations

from pathlib import Path

from embed.split import EmbedConfig, embed_split
from geovote.layout import EngineLayout


def build_engine(cfg: EmbedConfig, log=print) -> Path:
    """Embed every split of `cfg`, then (rank 0) index train and tune the voting. Returns the folder."""
    from embed.models import load_backbone
    from geovote import distributed
    from geovote.bundled_sample import ensure_sample
    from geovote.data import read_split

    rank, world = distributed.init()
    root = Path(cfg.data) if cfg.data else ensure_sample()
    backbone = load_backbone(cfg.model)
    if cfg.index and cfg.index_factory:  # a bad factory string must fail now, not after hours of embedding
        from index.store import check_factory

        check_factory(cfg.index_factory, backbone.dim)
    layout = EngineLayout(Path(cfg.out)) if cfg.out else EngineLayout.for_dataset(root, cfg.model)
    for name in cfg.splits:
        split = read_split(root, name, rejects_path=layout.rejects(name))
        if rank == 0:
            log(split.report.summary())
        embed_split(split, backbone, layout.embeddings(name), cfg, root, rank, world, log)
    if cfg.index and "train" in cfg.splits and rank == 0:
        from index.store import build_index, index_is_current

        if index_is_current(layout.index, layout.embeddings("train"), cfg.index_factory or None):
            log(f"index: {layout.index} is up to date with the train embeddings")
        else:
            build_index(layout.embeddings("train"), layout.index, factory=cfg.index_factory or None, log=log)
        if cfg.tune:  # on val, or without one on train images held out of their own search
            _tune(layout, cfg.model, backbone, root, cfg.workers, log)
    distributed.barrier()
    return layout.root


def _tune(layout: EngineLayout, model: str, backbone, root: Path, workers: int, log) -> None:
    from retrieve.engine import Engine
    from retrieve.tuning import TooFewToTune, tune_and_save

    engine = Engine(layout.index, model=model, backbone=backbone)
    try:
        best, scores, _ = tune_and_save(engine, root, "val", workers, log)
    except TooFewToTune as e:
        log(f"not tuned: {e}; queries will use the default voting settings")
        return
    log(f"val: voting GeoScore {scores['voting']['geoscore']:.0f} (1-NN {scores['1-nn']['geoscore']:.0f}, "
        f"weighted mean {scores['weighted mean']['geoscore']:.0f}) with k={best.k}, T={best.temperature}, "
        f"{best.cells} levels {best.levels}, bandwidth {best.bandwidth_km:g} km")
