"""An index's search settings (nprobe, re-rank shortlist), chosen by measuring the index itself.

How many lists to probe and how many PQ candidates to re-rank depend on the data (how clustered, how
crowded each neighbourhood is at this size) more than on any fixed rule: the 1M rule (x30) recovered
0.985 of the true top 10 at 1M synthetic vectors but 0.869 at 5M. So every IVF index is measured once,
at the end of its build: QUERIES of its own vectors are searched (each one's own row left out) against
their exact top k over every vector, on a grid of nprobe x shortlist, and the index keeps

- nprobe: the fewest lists whose recall, at the longest shortlist, is within PLATEAU of the most lists'
  and at least the target (probing more finds nothing the re-rank can use), then
- shortlist: the shortest that reaches TARGET_RECALL at that nprobe.

When even the most lists and the longest shortlist on the grid fall short of the target (vectors that the
index's codes cannot order: near-isotropic noise, as the full-size rehearsal fabricates), the index keeps
the fallback settings it was given (index.build's defaults) instead of buying a little recall with many
times the search cost, and index.json says so (`reached`: false, with the recall at both settings).

The measurement is recorded in index.json (`search_measured`, its time in `build_seconds`). Its exact
top k reads the whole fp16 copy once.
"""
from __future__ import annotations

import numpy as np

TARGET_RECALL = 0.98
PLATEAU = 0.005
QUERIES = 200
K = 10
NPROBES = (2, 4, 8, 16, 32, 64)
SHORTLISTS = (5, 10, 15, 20, 30, 40, 50, 60, 80, 100, 120, 150, 200)


def measure_search(index, fallback: tuple[int, int], queries: int = QUERIES, k: int = K,
                   target: float = TARGET_RECALL, seed: int = 0) -> dict:
    """The nprobe and shortlist `index` (an index.search.GeoIndex over an IVF index) should search with,
    and what was measured: {"nprobe", "shortlist", "recall", "reached", "target_recall", "queries", "k",
    "grid"}. `fallback`: the (nprobe, shortlist) kept when the target is out of reach."""
    import faiss
    from faiss.contrib.evaluation import knn_intersection_measure

    from index.exact import exact_topk

    n = index.count
    rows = np.sort(np.random.default_rng(seed).choice(n, min(queries, n), replace=False))
    q = np.asarray(index.vectors[rows], np.float32)
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    _, truth = exact_topk(index.vectors, q, k + 1, device="cpu")
    truth = _without_own_row(truth, rows, k)

    def recall(nprobe: int, shortlist: int) -> float:
        # k + 1 found (the own row among them) from the shortlist x k candidates a search for k re-ranks
        found = index.search(q, k + 1, nprobe=nprobe, shortlist=shortlist * k / (k + 1)).rows
        return float(knn_intersection_measure(_without_own_row(found, rows, k), truth))

    nlist = faiss.extract_index_ivf(index.index).nlist
    nprobes = sorted({p for p in NPROBES if p < nlist} | {min(nlist, NPROBES[-1])})
    longest = SHORTLISTS[-1]
    grid = {}
    def measured(p: int, s: int) -> float:
        if (p, s) not in grid:
            grid[(p, s)] = recall(p, s)
        return grid[(p, s)]

    plateau = measured(nprobes[-1], longest)
    if plateau < target:
        nprobe, shortlist = fallback
        measured(nprobe, shortlist)
    else:  # the fewest lists at the plateau that still reach the target, then the shortest shortlist
        nprobe = next(p for p in nprobes if measured(p, longest) >= max(target, plateau - PLATEAU))
        shortlist = next(s for s in SHORTLISTS if measured(nprobe, s) >= target)
    return {"nprobe": int(nprobe), "shortlist": int(shortlist), "recall": round(grid[(nprobe, shortlist)], 4),
            "target_recall": target, "reached": grid[(nprobe, shortlist)] >= target,
            "queries": len(rows), "k": k,
            "grid": {f"nprobe {p} x{s}": round(r, 4) for (p, s), r in sorted(grid.items())}}


def _without_own_row(found: np.ndarray, own: np.ndarray, k: int) -> np.ndarray:
    """(Q, k) of (Q, k + 1) rows: each query's own row dropped (or the last, when it was not found)."""
    mine = found == own[:, None]
    drop = np.where(mine.any(1), mine.argmax(1), found.shape[1] - 1)
    keep = np.ones(found.shape, bool)
    keep[np.arange(len(found)), drop] = False
    return found[keep].reshape(len(found), k)
