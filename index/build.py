"""Building an index folder from embedding shards (the layout: index.search), in bounded memory.

    refresh_index(shard_dir, out)   nothing when current; new vectors into the kept training when the
                                    shards changed and the index still suits them; else a build
    build_index(shard_dir, out)     the factory chosen from the data (choose_factory) or named, trained on a
                                    sample, rows in inverted-list order, nprobe and shortlist measured on
                                    the index itself (index.autotune)

refine.faiss is written by streaming the shards straight into FAISS's file layout (index.search.fp16_header),
so the build never holds every vector in memory.
"""
from __future__ import annotations

import json
import math
import shutil
import time
from pathlib import Path

import numpy as np

from geovote.shards import ShardError, read_manifest, read_shard, shard_paths, shard_sizes
from index.search import (DEFAULT_NPROBE, FILES, INDEX_VERSION, GeoIndex, IndexError_, fp16_header,
                          fp16_vectors)

EXACT_MAX_VECTORS = 50_000  # below this an exact (flat) search is fast enough and needs no training
HNSW_COARSE_FROM = 1_000_000  # from here the coarse quantizer itself is searched with HNSW
TRAIN_PER_LIST = 100  # training vectors per IVF list (FAISS warns below 39)
TRAIN_MAX = 256 * 1024
# candidates re-ranked = shortlist * k. An IVF index measures its own nprobe and shortlist when it is built
# (index.autotune: no fixed rule held from 1M to 5M); these defaults are what it keeps when its codes
# cannot reach the recall target on its vectors, and what a Flat index (nothing to tune) records.
DEFAULT_SHORTLIST = 30



def default_shortlist(n_vectors: int) -> int:
    """More vectors crowd each neighbourhood, so the true top k sit further down the PQ order: 30 x k up
    to 1M, growing as N^0.75 beyond (5M: 100 x k). Measured on clustered 512-d vectors: recall@10 0.985
    at 1M with 30, 0.869 at 5M with 30, 0.936 with 50, 0.983 with 100 (docs/BENCHMARKS.md)."""
    return max(DEFAULT_SHORTLIST, round(DEFAULT_SHORTLIST * (n_vectors / 1_000_000) ** 0.75))
ADD_BATCH = 65_536


def choose_factory(n_vectors: int, dim: int) -> str:
    """FAISS factory string for `n_vectors` vectors of `dim` dimensions.

    Exact for small sets. Else IVF with ~sqrt(N) lists (a power of two: 1M -> 1024) and 4-bit fast-scan
    PQ with dim/4 sub-quantizers (512-d: 64 B a vector), HNSW on the coarse centroids from 1M vectors.
    Why dim/4: at 1M clustered 512-d vectors, PQ128x4fs re-ranked x30 reaches recall@10 0.985, where
    PQ64x4fs needs x50 for 0.99 at less than half the speed, and 8-bit PQ64 is 2-3x slower to scan
    (docs/BENCHMARKS.md).
    """
    if n_vectors <= EXACT_MAX_VECTORS:
        return "Flat"
    nlist = 2 ** int(round(math.log2(math.sqrt(n_vectors))))
    coarse = f"IVF{nlist}_HNSW32" if n_vectors >= HNSW_COARSE_FROM else f"IVF{nlist}"
    m = max(1, dim // 4)
    while dim % m:
        m -= 1
    return f"{coarse},PQ{m}x4fs"


def check_factory(factory: str, dim: int) -> None:
    """IndexError_ unless FAISS can build `factory` for `dim`-d vectors."""
    import faiss

    try:
        faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as e:
        first = str(e).strip().splitlines()[-1].rsplit(": ", 1)[-1] if str(e).strip() else "rejected"
        raise IndexError_(f"index_factory {factory!r} is not a FAISS factory string for {dim}-d vectors "
                          f"({first}); e.g. Flat, IVF1024,PQ32x4fs, or leave it empty to choose from the "
                          "data") from None


def _ids_width(paths: list[Path]) -> int:
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    width = 1
    for p in paths:
        ids = pq.read_table(p, columns=["id"]).column("id")
        width = max(width, pc.max(pc.binary_length(ids)).as_py() or 1)
    return width


def index_is_current(index_dir: str | Path, shard_dir: str | Path, factory: str | None = None) -> bool:
    """Whether `index_dir` is a complete index built from exactly the embeddings in `shard_dir` (their
    manifest) with `factory` (None: any): a rerun of the pipeline then need not rebuild it."""
    index_dir = Path(index_dir)
    if not all((index_dir / f).is_file() for f in FILES):
        return False
    try:
        info = json.loads((index_dir / "index.json").read_text())
        manifest = read_manifest(shard_dir)
    except (OSError, ValueError, ShardError):
        return False
    return (info.get("version") == INDEX_VERSION and info.get("embedding_manifest") == manifest
            and (factory is None or info.get("factory") == factory))


REBUILD_GROWTH = 4  # an index is retrained once it holds this many times the vectors it was trained on


def refresh_index(shard_dir: str | Path, out: str | Path, factory: str | None = None, log=print) -> dict:
    """Bring the index folder `out` up to date with the shards: nothing when it is current; when the
    shards changed (rows added, removed, replaced) and the index still suits them, its trained coarse
    quantizer and codebooks are kept and only the vectors are added anew (no training); else it is
    built from scratch, saying why. Returns index.json."""
    out = Path(out)
    if index_is_current(out, shard_dir, factory):
        log(f"index: {out} is up to date with the embeddings")
        return json.loads((out / "index.json").read_text())
    why = _why_retrain(shard_dir, out, factory)
    if why is None:
        old = json.loads((out / "index.json").read_text())
        # as asked, else chosen again (the same string: _why_retrain checked), else the one named before
        named = factory or (None if old.get("factory_chosen", True) else old["factory"])
        return build_index(shard_dir, out, factory=named, trained=out / "index.faiss",
                           trained_count=old.get("trained_count", old["count"]), log=log)
    if why:
        log(f"index: building anew: {why}")
        old = json.loads((out / "index.json").read_text())
        named_before = not old.get("factory_chosen", True) and old.get("dim") == shard_sizes(shard_dir)[1]
        if not factory and named_before:
            factory = old.get("factory")  # the factory the user named before is kept, as an update keeps it
    return build_index(shard_dir, out, factory=factory, log=log)


def _why_retrain(shard_dir, out: Path, factory: str | None) -> str | None:
    """None when the index in `out` may keep its training for the shards; else why not ("" when there is
    no usable index to speak of)."""
    try:
        info = json.loads((out / "index.json").read_text())
        if info.get("version") != INDEX_VERSION or not (out / "index.faiss").is_file():
            return ""
        sizes, dim = shard_sizes(shard_dir)
        manifest = read_manifest(shard_dir)
    except (OSError, ValueError, ShardError):
        return ""
    n, trained = sum(sizes), int(info.get("trained_count", info.get("count", 0)))
    if info.get("dim") != dim or info.get("backbone") != manifest.get("backbone"):
        return "the embeddings come from another model"
    if factory and factory != info.get("factory"):
        return f"index_factory {factory} asked for, the index is {info.get('factory')}"
    if not factory and info.get("factory_chosen", True) and choose_factory(n, dim) != info.get("factory"):
        return (f"{n:,} vectors call for {choose_factory(n, dim)}; the index is {info.get('factory')}, "
                f"chosen for {trained:,}")
    if n > REBUILD_GROWTH * trained:
        return f"{n:,} vectors, more than {REBUILD_GROWTH}x the {trained:,} it was trained on"
    return None


def build_index(shard_dir: str | Path, out: str | Path, factory: str | None = None,
                nprobe: int | None = None, shortlist: int | None = None, seed: int = 0,
                trained: Path | None = None, trained_count: int | None = None, list_order: bool = True,
                log=print) -> dict:
    """Build the index folder `out` from the shards in `shard_dir`, in bounded memory. Returns index.json.
    `trained`: an index file of the same factory whose training (coarse quantizer, codebooks) is kept
    instead of training anew; `trained_count`: how many vectors that training was done for.
    `nprobe`, `shortlist`: the search settings stored in index.json; by default an IVF index measures
    them on itself (index.autotune), each one given overrides its measured value.
    `list_order`: number an IVF index's rows list by list (see _order_by_list); False keeps shard order
    (only to measure what the ordering buys: benchmark.index_bench)."""
    import faiss

    t0 = time.perf_counter()
    shard_dir, out = Path(shard_dir), Path(out)
    manifest = read_manifest(shard_dir)
    paths = shard_paths(shard_dir)
    sizes, dim = shard_sizes(shard_dir)
    n = sum(sizes)
    if n == 0:
        raise IndexError_(f"{shard_dir}: the shards hold no vectors")
    if manifest.get("dim", dim) != dim:
        raise IndexError_(f"{shard_dir}: manifest says dim {manifest.get('dim')}, shards hold {dim}")
    chosen = not factory
    factory = factory or choose_factory(n, dim)
    check_factory(factory, dim)
    tmp = out.with_name(out.name + ".partial")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)

    # 1. stream the shards into row-aligned files: fp16 vectors (FAISS layout), coordinates, ids
    lat = np.lib.format.open_memmap(tmp / "latitude.npy", "w+", np.float64, (n,))
    lon = np.lib.format.open_memmap(tmp / "longitude.npy", "w+", np.float64, (n,))
    ids = np.lib.format.open_memmap(tmp / "ids.npy", "w+", f"S{_ids_width(paths)}", (n,))
    header = fp16_header(dim, n)
    with open(tmp / "refine.faiss", "wb") as f:
        f.write(header)
        row = 0
        for path, size in zip(paths, sizes):
            s = read_shard(path)
            if len(s) != size:
                raise IndexError_(f"{path}: {len(s)} rows, its metadata said {size}")
            if not np.all(np.isfinite(s.embedding)):
                raise IndexError_(f"{path}: embeddings with NaN or infinite values")
            f.write(np.ascontiguousarray(s.embedding, dtype="<f2").tobytes())
            lat[row:row + size], lon[row:row + size] = s.lat_deg, s.lon_deg
            ids[row:row + size] = np.char.encode(s.ids.astype(str), "utf-8")
            row += size
    vectors = fp16_vectors(tmp / "refine.faiss", dim, n)
    for a in (lat, lon, ids):
        a.flush()
    t_copy = time.perf_counter()

    # 2. train on a sample (or keep an earlier training), then add in batches: never all float32 vectors
    if trained is not None:
        index = faiss.read_index(str(trained))
        index.reset()  # the vectors go; the quantizer and codebooks stay
    else:
        index = faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)
        trained_count = n
    if not index.is_trained:
        nlist = faiss.extract_index_ivf(index).nlist if "IVF" in factory else 256
        n_train = min(n, max(nlist * TRAIN_PER_LIST, 10_000), TRAIN_MAX)
        rows = np.sort(np.random.default_rng(seed).choice(n, n_train, replace=False))
        try:
            index.train(np.asarray(vectors[rows], np.float32))
        except RuntimeError as e:
            shutil.rmtree(tmp, ignore_errors=True)
            why = str(e).strip().splitlines()[-1].rsplit(": ", 1)[-1]
            raise IndexError_(f"cannot train {factory} on {n:,} vectors ({why}); use fewer IVF lists or "
                              "leave index_factory empty to choose from the data") from None
    t_train = time.perf_counter()
    if list_order and "IVF" in factory:  # a query's re-rank candidates then lie in nprobe runs of the copy
        vectors = _order_by_list(index, tmp, vectors, lat, lon, ids)
    t_order = time.perf_counter()
    for start in range(0, n, ADD_BATCH):
        index.add(np.asarray(vectors[start:start + ADD_BATCH], np.float32))
    t_add = time.perf_counter()
    faiss.write_index(index, str(tmp / "index.faiss"))
    info = {
        "version": INDEX_VERSION, "factory": factory, "metric": "inner_product", "dim": dim, "count": n,
        "nprobe": nprobe or DEFAULT_NPROBE, "shortlist": shortlist or default_shortlist(n),
        "embedding_manifest": manifest,
        "backbone": manifest.get("backbone"), "factory_chosen": chosen, "trained_count": trained_count,
        "build_seconds": {"copy": t_copy - t0, "train": t_train - t_copy, "order": t_order - t_train,
                          "add": t_add - t_order},
    }
    (tmp / "index.json").write_text(json.dumps(info, indent=2) + "\n")
    if "IVF" in factory:
        from index.autotune import measure_search

        measured = measure_search(GeoIndex(tmp), fallback=(DEFAULT_NPROBE, default_shortlist(n)))
        info.update(nprobe=nprobe or measured["nprobe"], shortlist=shortlist or measured["shortlist"],
                    search_measured=measured)
        info["build_seconds"]["measure"] = time.perf_counter() - t_add
        (tmp / "index.json").write_text(json.dumps(info, indent=2) + "\n")
        settings = f"nprobe {info['nprobe']}, re-rank x{info['shortlist']}"
        unreached = f" (defaults: recall {measured['target_recall']} is out of reach)"
        log(f"index: measured on {measured['queries']} of its vectors: {settings} recall@{measured['k']} "
            f"{measured['recall']:.3f}" + ("" if measured["reached"] else unreached))
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    how = f"its training for {trained_count:,} kept" if trained is not None else "built"
    log(f"index: {n:,} vectors of {dim} dims, {factory}, {how} in {time.perf_counter() - t0:.1f} s -> {out}")
    return info


def _inverted_list_of(index, vectors, batch: int = ADD_BATCH) -> np.ndarray:
    """(n,) the IVF list each row of `vectors` goes to: the coarse quantizer's pick, after the index's
    transforms (a rotation, OPQ) as `add` applies them."""
    import faiss

    ivf = faiss.extract_index_ivf(index)
    pre = faiss.downcast_index(index)
    chain = ([pre.chain.at(i) for i in range(pre.chain.size())]
             if isinstance(pre, faiss.IndexPreTransform) else [])
    out = np.empty(len(vectors), np.int64)
    for start in range(0, len(vectors), batch):
        x = np.asarray(vectors[start:start + batch], np.float32)
        for transform in chain:
            x = transform.apply(x)
        out[start:start + len(x)] = ivf.quantizer.assign(x, 1)[:, 0]
    return out


def _order_by_list(index, folder: Path, vectors, lat, lon, ids, chunk: int = 200_000):
    """Rewrite the folder's row-aligned files (refine.faiss, coordinates, ids) with the rows sorted by
    the IVF list they go to, so that FAISS ids (assigned in add order) run contiguously per list. Why: the
    re-rank reads each candidate's 1 KB row from the memory-mapped copy; in shard order a query's
    candidates are scattered over the whole file (a TLB miss and a cold page each), in list order they
    fall in the nprobe lists' runs (index_bench, 5M: docs/BENCHMARKS.md). Returns the reordered copy."""
    order = np.argsort(_inverted_list_of(index, vectors), kind="stable")
    n, dim = vectors.shape
    path = folder / "refine.faiss"
    with open(folder / "refine.faiss.ordered", "wb") as f:
        f.write(fp16_header(dim, n))
        for start in range(0, n, chunk):
            rows = order[start:start + chunk]
            by_row = np.argsort(rows)  # gather in file order, then put back in list order
            block = np.empty((len(rows), dim), "<f2")
            block[by_row] = vectors[rows[by_row]]
            f.write(block.tobytes())
    for name, a in (("latitude.npy", lat), ("longitude.npy", lon), ("ids.npy", ids)):
        np.save(folder / f"ordered-{name}", np.asarray(a)[order])
        (folder / f"ordered-{name}").replace(folder / name)  # a new file: the open maps keep the old one
    (folder / "refine.faiss.ordered").replace(path)
    return fp16_vectors(path, dim, n)
