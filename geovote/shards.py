"""Embedding shards: the files between `embed` and `index`.

A shard folder holds `shard-NNNNN.parquet` files with columns
    id (string), latitude, longitude (float64, degrees),
    embedding (fixed_size_list<halffloat>[dim], L2-normalised)
and a `manifest.json` (backbone, preprocessing, dim, rows, dataset, config, code version) written by the
embedding stage. Readers go shard by shard: `iter_shards` holds one shard at a time, `read_embeddings`
the result plus one shard.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

MANIFEST = "manifest.json"
SHARD_GLOB = "shard-*.parquet"


class ShardError(Exception):
    pass


@dataclass
class Shard:
    ids: np.ndarray  # (n,) object array of str
    lat_deg: np.ndarray  # (n,) float64
    lon_deg: np.ndarray  # (n,) float64
    embedding: np.ndarray  # (n, dim) float16

    def __len__(self) -> int:
        return len(self.ids)


def shard_schema(dim: int) -> pa.Schema:
    return pa.schema([("id", pa.string()), ("latitude", pa.float64()), ("longitude", pa.float64()),
                      ("embedding", pa.list_(pa.float16(), dim))])


SHARD_WRITE_OPTIONS = {"compression": "none", "use_dictionary": False, "write_statistics": False}


def shard_table(ids, lat_deg, lon_deg, embedding: np.ndarray) -> pa.Table:
    """One shard's rows as the Arrow table written (shard_schema)."""
    emb = np.ascontiguousarray(embedding, dtype=np.float16)
    n, dim = emb.shape
    flat = pa.array(emb.reshape(-1), pa.float16())
    return pa.Table.from_arrays(
        [pa.array(list(ids), pa.string()), pa.array(lat_deg, pa.float64()), pa.array(lon_deg, pa.float64()),
         pa.FixedSizeListArray.from_arrays(flat, dim)], schema=shard_schema(dim))


def write_shard(path: str | Path, ids, lat_deg, lon_deg, embedding: np.ndarray) -> None:
    """Write one shard atomically (to a temporary name, then renamed)."""
    table = shard_table(ids, lat_deg, lon_deg, embedding)
    path = Path(path)
    tmp = path.with_name(path.name + ".partial")
    # fp16 embeddings neither compress nor make a dictionary, and no reader filters on statistics:
    # without the three a 16,384 x 768 shard is written 3.5x and read 4.5-5x faster, 7% larger
    # (python -m benchmark.shard_io)
    pq.write_table(table, tmp, **SHARD_WRITE_OPTIONS)
    tmp.rename(path)


def shard_paths(folder: str | Path) -> list[Path]:
    paths = sorted(Path(folder).glob(SHARD_GLOB))
    if not paths:
        raise ShardError(f"no embedding shards ({SHARD_GLOB}) in {folder}")
    return paths


def read_manifest(folder: str | Path) -> dict:
    path = Path(folder) / MANIFEST
    if not path.is_file():
        raise ShardError(f"no {MANIFEST} in {folder}: not a finished embedding run")
    return json.loads(path.read_text())


def read_shard(path: str | Path) -> Shard:
    table = pq.read_table(path)
    emb = table.column("embedding").combine_chunks()
    dim = emb.type.list_size
    return Shard(
        ids=table.column("id").to_numpy(zero_copy_only=False),
        lat_deg=table.column("latitude").to_numpy(),
        lon_deg=table.column("longitude").to_numpy(),
        embedding=emb.flatten().to_numpy(zero_copy_only=False).reshape(-1, dim),
    )


def iter_shards(folder: str | Path) -> Iterator[Shard]:
    for path in shard_paths(folder):
        yield read_shard(path)


def read_embeddings(folder: str | Path, rows: np.ndarray | None = None, dtype=np.float32) -> Shard:
    """Every shard of `folder` as one Shard (or only the sorted global `rows` of it), read shard by shard
    into arrays allocated once: the peak is the result plus one shard, never a list of shards plus
    their concatenation. Embeddings as `dtype` (float32 for numpy/FAISS maths, float16 to halve memory)."""
    paths = shard_paths(folder)
    sizes, dim = shard_sizes(folder)
    total = sum(sizes)
    if rows is None:
        rows = np.arange(total)
    rows = np.asarray(rows, np.int64)
    if rows.size and (np.any(np.diff(rows) <= 0) or rows[0] < 0 or rows[-1] >= total):
        raise ShardError(f"rows must be sorted, distinct and within the {total} rows of {folder}")
    out = Shard(ids=np.empty(len(rows), object), lat_deg=np.empty(len(rows)), lon_deg=np.empty(len(rows)),
                embedding=np.empty((len(rows), dim), dtype))
    start, filled = 0, 0
    for path, size in zip(paths, sizes):
        lo, hi = np.searchsorted(rows, [start, start + size])
        if hi > lo:
            s = read_shard(path)
            local = rows[lo:hi] - start
            out.ids[filled:filled + hi - lo] = s.ids[local]
            out.lat_deg[filled:filled + hi - lo] = s.lat_deg[local]
            out.lon_deg[filled:filled + hi - lo] = s.lon_deg[local]
            out.embedding[filled:filled + hi - lo] = s.embedding[local]
            filled += hi - lo
        start += size
    return out


def read_coordinates(folder: str | Path) -> Shard:
    """Every row's id and coordinates in shard order (no embeddings: 5.1M rows in seconds). An index
    numbers its rows in its own order (index.build), so whatever streams the shards (the heads, the
    holdout) takes the rows' coordinates from here, not from the index."""
    parts = [pq.read_table(p, columns=["id", "latitude", "longitude"]) for p in shard_paths(folder)]
    table = pa.concat_tables(parts)
    return Shard(ids=table.column("id").to_numpy(zero_copy_only=False),
                 lat_deg=table.column("latitude").to_numpy(), lon_deg=table.column("longitude").to_numpy(),
                 embedding=np.empty((table.num_rows, 0), np.float16))


def shard_sizes(folder: str | Path) -> tuple[list[int], int]:
    """Rows in each shard (from parquet metadata, without reading data) and the dimension."""
    sizes, dim = [], None
    for path in shard_paths(folder):
        f = pq.ParquetFile(path)
        sizes.append(f.metadata.num_rows)
        d = f.schema_arrow.field("embedding").type.list_size
        if dim is not None and d != dim:
            raise ShardError(f"{path}: dimension {d}, other shards have {dim}")
        dim = d
    return sizes, dim
