"""A FAISS index over embedding shards that keeps every vector's coordinates and id.

Index folder (all arrays row-aligned with FAISS ids 0..N-1):
    index.faiss        the FAISS index (inner product on L2-normalised vectors), loaded into RAM
    refine.faiss       an fp16 copy of the vectors (a FAISS IndexScalarQuantizer QT_fp16), memory-mapped,
                       for exact re-ranking; also readable by numpy (`GeoIndex.vectors`)
    latitude.npy, longitude.npy   float64 degrees, memory-mapped
    ids.npy            image ids, fixed-width bytes, memory-mapped
    index.json         version, factory, metric, dim, count, nprobe, shortlist, embedding manifest

Why re-rank: PQ codes order neighbours poorly (recall@10 about 0.34 against exact search on 1M clustered
vectors with IVF1024,PQ64); re-scoring a shortlist of `shortlist * k` candidates exactly from
the fp16 copy brings it near 1. FAISS's IndexRefine does the re-scoring in C++ (15x the numpy gather +
einsum it replaced, benchmark/index_bench.py). The copy is memory-mapped (faiss.IO_FLAG_MMAP_IFC): it
costs disk, and RAM only as the page cache allows. refine.faiss is written by streaming the shards
straight into FAISS's file layout, so the build never holds every vector in memory.
"""
from __future__ import annotations

import json
import math
import shutil
import struct
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from geovote.shards import ShardError, read_manifest, read_shard, shard_paths, shard_sizes

INDEX_VERSION = 2
FILES = ("index.faiss", "index.json", "refine.faiss", "latitude.npy", "longitude.npy", "ids.npy")
EXACT_MAX_VECTORS = 50_000  # below this an exact (flat) search is fast enough and needs no training
HNSW_COARSE_FROM = 1_000_000  # from here the coarse quantizer itself is searched with HNSW
TRAIN_PER_LIST = 100  # training vectors per IVF list (FAISS warns below 39)
TRAIN_MAX = 256 * 1024
DEFAULT_NPROBE = 16
# a subset (a region) is searched exactly up to this many rows: the IVF scan restricted to a share f of
# the rows needs nprobe / f lists to find as many of them, so its cost grows as 1/f while an exact search
# over the subset (one BLAS matmul per batch of queries) grows as f. A cost model, not a measurement:
# assuming 4-bit fast-scan look-ups some 25x cheaper per code than a 768-d fp32 dot product, the two
# cross near f = 0.15 at 5.1M rows; 500k stays on the exact side of that. The crossover is unmeasured.
SUBSET_EXACT_MAX = 500_000
# a region larger than this is first looked for among the unrestricted search's top PREFILTER_FACTOR * k:
# when the query lies in the region (a user's --within, the benchmark's true country) its nearest
# neighbours mostly do too, and the first k region rows of that list are the region's top k at the
# unrestricted search's own recall, for the cost of one ordinary search instead of an exact pass over
# the region's rows (5.1M rehearsal: 1,713 s of exact region search for 210k queries before this).
# Queries with fewer than k region rows there fall back to the filtered search below.
PREFILTER_FROM = 50_000
PREFILTER_FACTOR = 4
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


class IndexError_(Exception):  # noqa: N801 - `IndexError` is a builtin
    pass


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


@dataclass
class SearchResult:
    similarity: np.ndarray  # (Q, k) float32, inner product (cosine); -inf where fewer than k found
    rows: np.ndarray  # (Q, k) int64 row in the index; -1 where fewer than k found
    ids: np.ndarray  # (Q, k) object array of str ("" where missing)
    lat_deg: np.ndarray  # (Q, k) float64 (NaN where missing)
    lon_deg: np.ndarray


def _fp16_header(dim: int, n: int) -> bytes:
    """The bytes FAISS writes before the codes of an IndexScalarQuantizer(dim, QT_fp16, inner product)
    holding n vectors: its empty serialisation with ntotal (bytes 8-16) and the codes' byte count (the
    last 8) set. Checked against faiss.write_index byte for byte in tests/test_index.py."""
    import faiss

    empty = faiss.serialize_index(faiss.IndexScalarQuantizer(
        dim, faiss.ScalarQuantizer.QT_fp16, faiss.METRIC_INNER_PRODUCT)).tobytes()
    zero = struct.pack("<q", 0)
    if empty[:4] != b"IxSQ" or empty[8:16] != zero or empty[-8:] != zero:
        raise IndexError_("this FAISS version writes IndexScalarQuantizer in an unknown layout")
    return empty[:8] + struct.pack("<q", n) + empty[16:-8] + struct.pack("<Q", n * dim * 2)


def _fp16_vectors(path: Path, dim: int, n: int) -> np.ndarray:
    """The vectors in refine.faiss as a read-only (n, dim) float16 memory map."""
    return np.memmap(path, np.dtype("<f2"), "r", offset=len(_fp16_header(dim, n)), shape=(n, dim))


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
    header = _fp16_header(dim, n)
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
    vectors = _fp16_vectors(tmp / "refine.faiss", dim, n)
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
        f.write(_fp16_header(dim, n))
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
    return _fp16_vectors(path, dim, n)


def _gpu_device(device: str) -> str | None:
    """The CUDA device `device` resolves to (geovote.distributed.pick_device), or None for the CPU."""
    if device == "cpu":
        return None
    from geovote.distributed import pick_device

    try:
        resolved = pick_device(device)
    except ValueError as e:
        raise IndexError_(str(e)) from None
    return resolved if resolved.startswith("cuda") else None


def index_digest(index_json: bytes) -> str:
    """What names one build of an index: a hash of its index.json (which holds its embedding manifest,
    creation time and build timings), so that files derived from an index (the engine's caches) can be
    tied to the build that made them."""
    import hashlib

    return hashlib.sha256(index_json).hexdigest()[:16]


def current_digest(folder: str | Path) -> str | None:
    """The digest of the index now in `folder` (None while there is none: being replaced, or removed)."""
    try:
        return index_digest((Path(folder) / "index.json").read_bytes())
    except OSError:
        return None


class GeoIndex:
    """An opened index folder. `search(queries, k)` -> SearchResult.

    device: 'cpu' (default), 'auto' (CUDA when torch sees a GPU; what retrieve.engine asks for) or
    'cuda'. On CUDA the fp16 vectors are loaded on the GPU once and every search is exact (fp16 matmul +
    top-k): faster than IVF-PQ there, and it needs only torch (the `gpu` extra's faiss-cuda is optional).
    A FAISS GPU build, when installed and seeing a GPU, takes over the exact (Flat) index instead.
    """

    def __init__(self, folder: str | Path, device: str = "cpu"):
        import faiss

        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise IndexError_(f"no index folder {self.folder}")
        missing = [f for f in FILES if not (self.folder / f).is_file()]
        if missing:
            raise IndexError_(f"{self.folder} is incomplete: missing {', '.join(missing)}")
        self.info = self._read_info()
        if self.info.get("version") != INDEX_VERSION:
            raise IndexError_(f"{self.folder} was built by index version {self.info.get('version')}; this "
                              f"code reads version {INDEX_VERSION}: rebuild it")
        try:
            self.dim, self.count = int(self.info["dim"]), int(self.info["count"])
        except (KeyError, TypeError, ValueError):
            raise IndexError_(f"{self.folder / 'index.json'}: no valid dim and count: "
                              "rebuild the index") from None
        self.vectors = self._open("refine.faiss", lambda p: _fp16_vectors(p, self.dim, self.count))
        self.lat = self._open("latitude.npy", lambda p: np.load(p, mmap_mode="r"))
        self.lon = self._open("longitude.npy", lambda p: np.load(p, mmap_mode="r"))
        self.ids = self._open("ids.npy", lambda p: np.load(p, mmap_mode="r"))
        self.index = self._open("index.faiss", lambda p: faiss.read_index(str(p)))
        for name, a in (("vectors", self.vectors), ("latitude", self.lat), ("longitude", self.lon),
                        ("ids", self.ids)):
            if a.shape[0] != self.count:
                raise IndexError_(f"{self.folder}: {name} holds {a.shape[0]} rows, "
                                  f"index.json says {self.count}")
        if self.index.ntotal != self.count or self.index.d != self.dim:
            raise IndexError_(f"{self.folder}: FAISS index has {self.index.ntotal} x {self.index.d}, "
                              f"index.json says {self.count} x {self.dim}")
        self.exact = self.info["factory"] == "Flat"
        # the re-rank copy stays on disk: FAISS maps it, and reads only the candidates' rows
        self.refine = self._open("refine.faiss", lambda p: faiss.read_index(str(p), faiss.IO_FLAG_MMAP_IFC))
        if self.refine.ntotal != self.count:
            raise IndexError_(f"{self.folder}: refine.faiss holds {self.refine.ntotal} vectors, "
                              f"index.json says {self.count}")
        self.refined = faiss.IndexRefine(self.index, self.refine)
        self.device = _gpu_device(device)
        self._gpu_vectors = None
        if self.device is not None:
            import torch

            self._gpu_vectors = torch.from_numpy(np.ascontiguousarray(self.vectors)).to(self.device)
        elif self.exact and getattr(faiss, "get_num_gpus", lambda: 0)() > 0:
            self.index = faiss.index_cpu_to_all_gpus(self.index)

    def _read_info(self) -> dict:
        path = self.folder / "index.json"
        try:
            raw = path.read_bytes()
            self.digest = index_digest(raw)
            info = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise IndexError_(f"{path} is not valid JSON ({e}): the index is damaged; rebuild it with "
                              "`python -m embed.build`") from None
        if not isinstance(info, dict):
            raise IndexError_(f"{path} is not an index description: rebuild the index")
        return info

    def _open(self, name: str, opener):
        """Open one file of the folder; a damaged one (truncated, emptied, overwritten) is named."""
        path = self.folder / name
        try:
            return opener(path)
        except (OSError, ValueError, RuntimeError, EOFError) as e:
            why = str(e).strip().splitlines()[-1][:200] if str(e).strip() else type(e).__name__
            raise IndexError_(f"{path} is damaged or truncated ({why}): rebuild the index with "
                              "`python -m embed.build`") from None

    @property
    def backbone(self) -> str | None:
        return self.info.get("backbone")

    def check_queries(self, queries, backbone: str | None = None) -> np.ndarray:
        """(Q, dim) float32, L2-normalised; refuses what would give wrong answers."""
        if backbone is not None and self.backbone is not None and backbone != self.backbone:
            raise IndexError_(f"queries embedded with {backbone!r}, index built with {self.backbone!r}")
        q = np.asarray(queries, dtype=np.float32)
        if q.ndim == 1:
            q = q[None]
        if q.ndim != 2 or q.shape[1] != self.dim:
            raise IndexError_(f"query dimension {q.shape[-1]} does not match the index's {self.dim}")
        if not np.all(np.isfinite(q)):
            raise IndexError_("queries contain NaN or infinite values")
        norms = np.linalg.norm(q, axis=1, keepdims=True)
        if np.any(norms == 0):
            raise IndexError_("a query vector is all zeros")
        return np.ascontiguousarray(q / norms)

    def search(self, queries, k: int = 10, nprobe: int | None = None, shortlist: int | None = None,
               rerank: bool = True, backbone: str | None = None, subset=None) -> SearchResult:
        """k nearest neighbours of each query. `rerank=False` returns the index's own (PQ) order.
        `subset`: sorted rows to search among (a region): exactly when they are few or on the GPU, else
        inside FAISS's IVF scan (an IDSelector, with nprobe raised by the share the subset leaves out);
        a large subset is first looked for among the unrestricted neighbours (PREFILTER_FROM)."""
        q = self.check_queries(queries, backbone)
        k = int(k)
        if k < 1:
            raise IndexError_(f"k must be at least 1, got {k}")
        if subset is not None:
            return self._search_subset(q, k, np.asarray(subset, np.int64), nprobe, shortlist)
        return self._result(*self._search_rows(q, k, nprobe, shortlist, rerank))

    def _search_rows(self, q, k, nprobe, shortlist, rerank=True):
        """(similarity, row) arrays of the unrestricted search, rows -1 where fewer than k."""
        import faiss

        if self._gpu_vectors is not None:
            sim, rows = exact_search_torch(self._gpu_vectors, q, k, device=self.device)
        elif self.exact:
            sim, rows = self.index.search(q, k)
        else:
            ivf = faiss.SearchParametersIVF(nprobe=int(nprobe or self.info["nprobe"]))
            if rerank:
                shortlist = float(shortlist or self.info["shortlist"])
                params = faiss.IndexRefineSearchParameters(k_factor=shortlist, base_index_params=ivf)
                sim, rows = self.refined.search(q, k, params=params)
            else:
                sim, rows = self.index.search(q, k, params=ivf)
        return sim, rows.astype(np.int64)

    def _search_subset(self, q, k, rows, nprobe, shortlist) -> SearchResult:
        if rows.size == 0:
            raise IndexError_("the subset to search holds no vector")
        if rows[0] < 0 or rows[-1] >= self.count or np.any(np.diff(rows) <= 0):
            raise IndexError_(f"subset rows must be sorted, distinct and within the {self.count} rows")
        if self._gpu_vectors is not None:
            import torch

            sub = self._gpu_vectors.index_select(0, torch.as_tensor(rows, device=self.device))
            sim, local = exact_search_torch(sub, q, k, device=self.device)
            found = rows[local]
            if found.shape[1] < k:  # fewer rows than k: padded as the CPU path pads
                pad = k - found.shape[1]
                sim = np.concatenate([sim, np.full((len(sim), pad), -np.inf, np.float32)], 1)
                found = np.concatenate([found, np.full((len(found), pad), -1, np.int64)], 1)
            return self._result(sim, found)
        if self.exact or rows.size <= PREFILTER_FROM:
            return self._result(*exact_search_rows(self.vectors, rows, q, k))
        sim, found = self._prefiltered(q, k, rows, nprobe, shortlist)
        rest = np.flatnonzero(found[:, -1] < 0)  # too few region rows among the unrestricted neighbours
        if rest.size:
            sim[rest], found[rest] = self._filtered(q[rest], k, rows, nprobe, shortlist)
        return self._result(sim, found)

    def _prefiltered(self, q, k, rows, nprobe, shortlist):
        """The first k subset rows among each query's unrestricted top PREFILTER_FACTOR * k, in order:
        (similarity, row) with -inf / -1 rows where fewer than k were there."""
        # as many candidates re-ranked as for the k asked (k x shortlist): the cost of an ordinary search
        shortlist = max(1.0, float(shortlist or self.info["shortlist"]) / PREFILTER_FACTOR)
        cand_sim, cand = self._search_rows(q, k * PREFILTER_FACTOR, nprobe, shortlist)
        pos = np.minimum(np.searchsorted(rows, cand), rows.size - 1)
        inside = (cand >= 0) & (rows[pos] == cand)
        rank = np.cumsum(inside, axis=1) - 1  # each member's place among the query's members
        keep = inside & (rank < k)
        sim = np.full((len(q), k), -np.inf, np.float32)
        found = np.full((len(q), k), -1, np.int64)
        qi, _ = np.nonzero(keep)
        sim[qi, rank[keep]] = cand_sim[keep]
        found[qi, rank[keep]] = cand[keep]
        return sim, found

    def _filtered(self, q, k, rows, nprobe, shortlist):
        """(similarity, row) of the top k among `rows`: exact over them when they are few enough, else
        FAISS's IVF scan with a selector."""
        import faiss

        if rows.size <= SUBSET_EXACT_MAX:
            return exact_search_rows(self.vectors, rows, q, k)
        ivf_index = faiss.extract_index_ivf(self.index)
        scale = self.count / rows.size  # lists hold that many times fewer candidates of the subset
        probes = min(ivf_index.nlist, math.ceil(int(nprobe or self.info["nprobe"]) * scale))
        selector = faiss.IDSelectorBatch(rows.size, faiss.swig_ptr(rows))
        ivf = faiss.SearchParametersIVF(nprobe=probes, sel=selector)
        params = faiss.IndexRefineSearchParameters(k_factor=int(shortlist or self.info["shortlist"]),
                                                   base_index_params=ivf)
        sim, found = self.refined.search(q, k, params=params)
        del selector  # FAISS held a pointer to it (and to rows) until here
        return sim, found.astype(np.int64)

    def _result(self, sim: np.ndarray, rows: np.ndarray) -> SearchResult:
        rows = rows.astype(np.int64)
        valid = rows >= 0
        safe = np.where(valid, rows, 0)
        ids = np.char.decode(np.asarray(self.ids[safe.reshape(-1)]), "utf-8").astype(object)
        ids = ids.reshape(rows.shape)
        ids[~valid] = ""
        lat = np.where(valid, self.lat[safe], np.nan)
        lon = np.where(valid, self.lon[safe], np.nan)
        sim = np.where(valid, sim, -np.inf).astype(np.float32)
        return SearchResult(sim, np.where(valid, rows, -1), ids, lat, lon)


def exact_search_rows(vectors, rows: np.ndarray, queries: np.ndarray, k: int, block: int = 65536,
                      score_bytes: int = 1 << 28):
    """Exact inner-product top-k of each query among `vectors[rows]` (an fp16 memory map), reading the
    rows in blocks and taking the queries in chunks whose (chunk x block) scores stay under `score_bytes`
    (a whole batch at once held the scores, their concatenation, the int64 candidate rows and
    argpartition's indices side by side: (Q x block) four times over): (similarity, row) arrays of
    shape (Q, k), -inf and -1 where fewer than k."""
    q = np.asarray(queries, np.float32)
    best_sim = np.full((len(q), k), -np.inf, np.float32)
    best_row = np.full((len(q), k), -1, np.int64)
    chunk = max(1, score_bytes // (4 * (block + k)))
    for start in range(0, rows.size, block):
        r = rows[start:start + block]
        vec = np.asarray(vectors[r], np.float32)
        for a in range(0, len(q), chunk):
            s = q[a:a + chunk] @ vec.T  # (chunk, block)
            sim = np.concatenate([best_sim[a:a + chunk], s], 1)
            cand = np.concatenate([best_row[a:a + chunk], np.broadcast_to(r, s.shape)], 1)
            top = np.argpartition(-sim, k - 1, axis=1)[:, :k] if sim.shape[1] > k else np.argsort(-sim, 1)
            best_sim[a:a + chunk] = np.take_along_axis(sim, top, 1)
            best_row[a:a + chunk] = np.take_along_axis(cand, top, 1)
    order = np.argsort(-best_sim, axis=1, kind="stable")
    return np.take_along_axis(best_sim, order, 1), np.take_along_axis(best_row, order, 1)


SCORE_BYTES = 1 << 30  # the (queries x N) score matrix of one exact-search batch stays under 1 GiB


def exact_search_torch(vectors, queries, k: int, device: str | None = None, batch: int | None = None):
    """Exact inner-product top-k with torch (fp16 matmul on CUDA, fp32 on CPU): the GPU path that
    works wherever torch sees a GPU, with or without a FAISS GPU build. Queries go in
    batches whose score matrix stays under SCORE_BYTES (5M vectors: 107 queries, not 4,096 x 5M = 41 GB)."""
    import torch

    from geovote.distributed import pick_device

    device = device or pick_device()
    dtype = torch.float16 if device.startswith("cuda") else torch.float32
    base = vectors if torch.is_tensor(vectors) else torch.as_tensor(np.asarray(vectors))
    base = base.to(device=device, dtype=dtype)  # (N, d); no copy when already there
    if batch is None:
        batch = max(1, min(4096, SCORE_BYTES // (base.element_size() * max(1, base.shape[0]))))
    out_sim, out_rows = [], []
    for start in range(0, len(queries), batch):
        q = torch.as_tensor(np.asarray(queries[start:start + batch], np.float32), device=device).to(dtype)
        sim, rows = torch.topk(q @ base.T, k=min(k, base.shape[0]), dim=1)  # (B, k)
        out_sim.append(sim.float().cpu().numpy())
        out_rows.append(rows.cpu().numpy())
    return np.concatenate(out_sim), np.concatenate(out_rows).astype(np.int64)
