"""Searching an index folder: `GeoIndex(folder).search(queries, k, subset=rows)` -> SearchResult.

Index folder (all arrays row-aligned with FAISS ids 0..N-1; written by index.build):
    index.faiss        the FAISS index (inner product on L2-normalised vectors), loaded into RAM
    refine.faiss       an fp16 copy of the vectors (a FAISS IndexScalarQuantizer QT_fp16), memory-mapped,
                       for exact re-ranking; also readable by numpy (`GeoIndex.vectors`, fp16_vectors)
    latitude.npy, longitude.npy   float64 degrees, memory-mapped
    ids.npy            image ids, fixed-width bytes, memory-mapped
    index.json         version, factory, metric, dim, count, nprobe, shortlist, embedding manifest

Routes. Unrestricted: on a GPU, exact (index.exact, the fp16 copy on the device); a Flat index, exact
(index.exact over the index's own float32 vectors); an IVF index, its scan of nprobe lists re-ranked
exactly from the fp16 copy (IndexRefine, `shortlist * k` candidates: PQ codes alone order neighbours
poorly, recall@10 about 0.34 on 1M clustered vectors). Restricted to a subset of rows (a region): exact
over the subset when it is small (PREFILTER_FROM) or on a GPU; else first the region's rows among the
unrestricted top PREFILTER_FACTOR x k, and for the queries that found fewer than k there, exact over the
subset up to SUBSET_EXACT_MAX rows, FAISS's IVF scan with an IDSelector beyond.
"""
from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from index.exact import exact_topk

INDEX_VERSION = 2
FILES = ("index.faiss", "index.json", "refine.faiss", "latitude.npy", "longitude.npy", "ids.npy")
DEFAULT_NPROBE = 16
# a subset (a region) is searched exactly up to this many rows: the IVF scan restricted to a share f of
# the rows needs nprobe / f lists to find as many of them, so its cost grows as 1/f while an exact search
# over the subset (index.exact: one pass over the subset's rows) grows as f. A cost model, not a measurement:
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


class IndexError_(Exception):  # noqa: N801 - `IndexError` is a builtin
    pass


@dataclass
class SearchResult:
    similarity: np.ndarray  # (Q, k) float32, inner product (cosine); -inf where fewer than k found
    rows: np.ndarray  # (Q, k) int64 row in the index; -1 where fewer than k found
    ids: np.ndarray  # (Q, k) object array of str ("" where missing)
    lat_deg: np.ndarray  # (Q, k) float64 (NaN where missing)
    lon_deg: np.ndarray


def fp16_header(dim: int, n: int) -> bytes:
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


def fp16_vectors(path: Path, dim: int, n: int) -> np.ndarray:
    """The vectors in refine.faiss as a read-only (n, dim) float16 memory map."""
    return np.memmap(path, np.dtype("<f2"), "r", offset=len(fp16_header(dim, n)), shape=(n, dim))


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
    top-k, index.exact): faster than IVF-PQ there, and it needs only torch. On the CPU a Flat index is
    searched by index.exact over its own vectors, an IVF index by FAISS.
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
        self.vectors = self._open("refine.faiss", lambda p: fp16_vectors(p, self.dim, self.count))
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
        # a Flat index is searched by index.exact over its own float32 vectors (a view, no copy): the
        # search every exact caller runs, ties and all
        self._flat = None
        if self.exact:
            flat = faiss.downcast_index(self.index)
            if not isinstance(flat, faiss.IndexFlat):
                raise IndexError_(f"{self.folder}: index.json says Flat, index.faiss holds a "
                                  f"{type(flat).__name__}: rebuild the index")
            self._flat_index = flat  # the view below reads its memory: it lives as long as this object
            self._flat = faiss.rev_swig_ptr(flat.get_xb(), self.count * self.dim).reshape(self.count,
                                                                                           self.dim)
            self._flat.flags.writeable = False

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
            sim, rows = exact_topk(self._gpu_vectors, q, k, device=self.device)
        elif self.exact:
            sim, rows = exact_topk(self._flat, q, k, device="cpu")
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
            return self._result(*exact_topk(self._gpu_vectors, q, k, rows=rows, device=self.device))
        if self.exact or rows.size <= PREFILTER_FROM:
            return self._result(*exact_topk(self._flat if self.exact else self.vectors, q, k, rows=rows,
                                            device="cpu"))
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
            return exact_topk(self.vectors, q, k, rows=rows, device="cpu")
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
