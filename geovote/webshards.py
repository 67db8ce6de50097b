"""A gallery downloaded by img2dataset (`--output_format webdataset`): a folder of tar shards, read in
place as one split (train).

    <root>/00000.tar        <key>.jpg, <key>.json (the sample's metadata), <key>.txt (a caption), ...
    <root>/00000.parquet    the same metadata, one row per sample img2dataset tried (`key`, `status`, ...)

Coordinates are the metadata's `latitude` and `longitude` (OSV-5M's names; img2dataset keeps the columns
it is given with `--save_additional_columns '["latitude","longitude"]'`), from the parquet beside a shard
when it has them (one columnar read), else from each sample's `.json`. An image's id is its webdataset
key: the member's path up to the first dot of its file name. This module only reads; geovote.data's
read_split checks the rows as a CSV's are (coordinates, duplicates, missing images) and counts what was
dropped here (samples img2dataset failed to download, unreadable .json). Images are read in place
(geovote.archives), never extracted.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from geovote.archives import ARCHIVE_SEP, ArchiveError, list_members, read_member

SHARD_SUFFIX = ".tar"
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")  # img2dataset's encode formats
SPLIT = "train"  # a folder of shards is one gallery
ID = "key"  # img2dataset's name for a sample's key; the id of its image


class WebShardError(Exception):
    """Shards whose metadata cannot give coordinates (geovote.data raises it as a DataError)."""


@dataclass
class Scan:
    """What the shards of a folder hold, before any row check (geovote.data.read_split does those)."""

    meta: pa.Table  # `key` + the wanted columns, as text, + `_row` (the sample's number in shard order)
    images: pa.Table  # `key`, `path` (<shard>::<member>), `size` (bytes), `mtime_ns` (the shard's)
    rejected: list = field(default_factory=list)  # (reason, key, row, text) of samples dropped already
    records: int = 0  # samples named by the metadata or holding an image
    shards: int = 0


def shard_files(root: str | os.PathLike) -> list[Path]:
    root = Path(root)
    return sorted(p for p in root.glob(f"*{SHARD_SUFFIX}") if p.is_file()) if root.is_dir() else []


def key_and_extension(member: str) -> tuple[str, str]:
    """webdataset's rule: `dir/000001.jpg` -> (`dir/000001`, `jpg`); `a/b.seg.png` -> (`a/b`, `seg.png`);
    a leading `./` (a tar made with `tar cf x.tar .`) is not part of the key."""
    while member.startswith("./"):
        member = member[2:]
    folder, _, name = member.rpartition("/")
    stem, _, ext = name.partition(".")
    return (f"{folder}/{stem}" if folder else stem), ext.lower()


def scan_shards(root: str | os.PathLike, columns: Sequence[str], log=None) -> Scan:
    """Every shard of `root`: the metadata's `columns` (coordinates first) and the images, read in
    place. Samples img2dataset failed to download, unreadable .json files and images nothing gives the
    coordinates of are listed in `rejected` with the reason."""
    root = Path(root)
    shards = shard_files(root)
    if not shards:
        raise WebShardError(f"{root}: no webdataset shard (*{SHARD_SUFFIX}) there")
    scan = Scan(meta=None, images=None, shards=len(shards))
    metas, images = [], []
    for shard in shards:
        meta, imgs = _read_shard(shard, root, list(columns), scan, log)
        metas.append(meta)
        images.append(imgs)
    scan.meta, scan.images = pa.concat_tables(metas), pa.concat_tables(images)
    return scan


def _read_shard(shard: Path, root: Path, columns: list[str], scan: Scan, log):
    """(the shard's metadata rows, those img2dataset failed to download left out; its images)."""
    try:
        members = list_members(shard, log)
    except ArchiveError as e:
        if log:
            log(f"{shard}: {e}: its images are missing")
        members = []
    rel = os.path.relpath(shard, root)
    image_of: dict[str, tuple[str, int]] = {}
    json_of: dict[str, str] = {}
    compound_image: dict[str, tuple[str, int]] = {}
    compound_json: dict[str, str] = {}
    for name, size in members:
        key, ext = key_and_extension(name)
        last = ext.rpartition(".")[2]
        if ext in IMAGE_EXTENSIONS:
            image_of.setdefault(key, (name, size))
        elif ext == "json":
            json_of.setdefault(key, name)
        elif last in IMAGE_EXTENSIONS:  # `b.jpg` of `a.b.jpg`; a `seg.png` mask never beats `jpg`
            compound_image.setdefault(key, (name, size))
        elif last == "json":
            compound_json.setdefault(key, name)
    for key, v in compound_image.items():  # only for a sample with no plain image
        image_of.setdefault(key, v)
    for key, v in compound_json.items():
        json_of.setdefault(key, v)
    mtime_ns = shard.stat().st_mtime_ns
    images = pa.table({ID: pa.array(list(image_of), pa.string()),
                       "path": pa.array([f"{rel}{ARCHIVE_SEP}{n}" for n, _ in image_of.values()],
                                        pa.string()),
                       "size": pa.array([s for _, s in image_of.values()], pa.int64()),
                       "mtime_ns": pa.array([mtime_ns] * len(image_of), pa.int64())})
    row0 = scan.records
    parquet = shard.with_suffix(".parquet")
    meta = _parquet_meta(parquet, columns) if parquet.is_file() else None
    if meta is None:
        meta, described = _json_meta(shard, json_of, columns, scan, row0), set(json_of)
        scan.records += len(json_of)  # the unreadable ones were rejected, with their row
    else:
        meta = meta.append_column("_row", pa.array(np.arange(row0, row0 + meta.num_rows)))
        described = set(meta.column(ID).to_pylist())
        scan.records += meta.num_rows  # a key given twice is two rows: the second is a duplicate id
    if "status" in meta.column_names:
        status = meta.column("status").to_pylist()
        failed = np.array([s is not None and s != "success" for s in status], bool)
        for i in np.flatnonzero(failed):
            scan.rejected.append(("not downloaded (img2dataset status)", meta.column(ID)[i].as_py(),
                                  meta.column("_row")[i].as_py(), status[i]))
        meta = meta.filter(pa.array(~failed)).drop_columns(["status"])
    for key in sorted(set(image_of) - described):  # an image nothing gives the coordinates of
        scan.rejected.append(("no metadata (.json or parquet row)", key, scan.records,
                              f"{rel}{ARCHIVE_SEP}{image_of[key][0]}"))
        scan.records += 1
    return meta, images


def _parquet_meta(path: Path, wanted: list[str]) -> pa.Table | None:
    """The shard's parquet as `wanted` (+ `status`), the key as `id`; None when it lacks the
    coordinates (then the .json files are read)."""
    import pyarrow.parquet as pq

    try:
        schema = pq.read_schema(path)
    except (OSError, pa.ArrowInvalid) as e:
        raise WebShardError(f"{path}: unreadable parquet ({e})") from None
    names = schema.names
    need = [ID, *wanted]
    if any(c not in names for c in need):
        return None
    key_type = schema.field(ID).type
    if not (pa.types.is_string(key_type) or pa.types.is_large_string(key_type)):
        raise WebShardError(f"{path}: its `key` column is {key_type}, not text: img2dataset writes keys as "
                            "text, as the members' names are (000000001.jpg); it cannot be matched to them")
    t = pq.read_table(path, columns=need + (["status"] if "status" in names else []))
    # as text, as a CSV's cells are: checked_rows parses the coordinates and rejects what is not a number
    return pa.table({c: pc.cast(t.column(c), pa.string()) for c in t.column_names})


def _json_meta(shard: Path, json_of: dict[str, str], wanted: list[str], scan: Scan, row0: int) -> pa.Table:
    """`key` and `wanted` from each sample's .json (read in place); a .json that is not an object is
    rejected with the reason, one that lacks a wanted key stops the read (WebShardError)."""
    values: dict[str, list] = {c: [] for c in [ID, *wanted]}
    rows: list[int] = []
    for i, (key, name) in enumerate(json_of.items()):
        try:
            record = json.loads(read_member(shard, name))
        except (ArchiveError, ValueError) as e:
            scan.rejected.append(("unreadable metadata (.json)", key, row0 + i, str(e)))
            continue
        if not isinstance(record, dict):
            scan.rejected.append(("unreadable metadata (.json)", key, row0 + i, "not a JSON object"))
            continue
        missing = [c for c in wanted if c not in record]
        if missing:
            raise WebShardError(f"{shard}::{name} lacks {', '.join(missing)}; it has: {', '.join(record)} "
                                "(img2dataset keeps a column given with --save_additional_columns)")
        values[ID].append(key)
        for c in wanted:
            v = record[c]
            values[c].append(None if v is None else json.dumps(v) if isinstance(v, (dict, list)) else str(v))
        rows.append(row0 + i)
    return pa.table({**{c: pa.array(v, pa.string()) for c, v in values.items()},
                     "_row": pa.array(rows, pa.int64())})
