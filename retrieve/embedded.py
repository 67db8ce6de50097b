"""A split of a dataset embedded into an engine folder by the engine's model, once (resumable): what
tuning, split predictions and the benchmark read their query vectors from.

    ensure_embedded(engine, data, split) -> the folder of its shards (embeddings/<split>)
    embed_for_eval(engine, data, split)  -> (ids, lat, lon, float32 embeddings)
"""
from __future__ import annotations

from pathlib import Path


def ensure_embedded(engine, data: Path, split: str, workers: int = -1, log=None) -> Path:
    """The folder of a split's embeddings by the engine's model. Always through embed_split: it embeds
    only the shards that are missing, and its plan refuses a folder made from another dataset, split,
    model or set of rows, so stored embeddings are never silently those of something else."""
    from embed.split import EmbedConfig, embed_split
    from geovote.data import read_split
    from geovote.lock import engine_lock

    emb_dir = engine.layout.embeddings(split)
    with engine_lock(engine.layout.root, f"embedding {split}", log=log or _stderr):
        s = read_split(data, split, rejects_path=engine.layout.rejects(split))
        cfg = EmbedConfig(model=engine.model_name, workers=workers)
        embed_split(s, engine.backbone, emb_dir, cfg, data, log=log or _stderr)
    return emb_dir


def embed_for_eval(engine, data: Path, split: str, workers: int = -1, log=None):
    """(ids, lat, lon, embeddings float32) of a split, embedded once into the engine folder."""
    from geovote.shards import read_embeddings

    e = read_embeddings(ensure_embedded(engine, data, split, workers, log))
    return e.ids, e.lat_deg, e.lon_deg, e.embedding


def _stderr(message: str) -> None:
    import sys

    print(message, file=sys.stderr)
