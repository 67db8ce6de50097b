"""The one exact top-k: what every exact search of the project runs (a region's rows, a GPU index, the
ground truth an index measures itself against, finetune's validation).

    exact_topk(vectors, queries, k, rows=None, device=None) -> (similarity (Q, k), row (Q, k))

Inner products of L2-normalised vectors. On a CUDA device: torch, the vectors (a tensor already there,
or an array copied once) in fp16, queries in batches whose score matrix stays under SCORE_BYTES. On the
CPU: FAISS's exhaustive search (faiss.knn) over the vectors (or `vectors[rows]`) read in blocks of
BLOCK_ROWS (an fp16 memory map of 5M rows is never loaded whole), each block's best k merged into the
running best k. A single query is searched as two copies of itself: FAISS computes one query with
another kernel than several (the last bits differ with 2+ threads), so a query's neighbours do not
depend on how many others came with it. Rows -1 and similarity -inf where fewer than k exist. Ties on
the CPU: the lower row first, whatever the blocks.
"""
from __future__ import annotations

import numpy as np

SCORE_BYTES = 1 << 30  # a torch batch's (queries x N) score matrix stays under 1 GiB (5M: 107 queries)
BLOCK_ROWS = 65_536  # CPU: rows read (fp16 -> float32) and searched at once


def exact_topk(vectors, queries, k: int, rows: np.ndarray | None = None, device: str | None = None):
    """(similarity, row) of each query's k best among `vectors` (or only among the sorted `rows` of
    it), as float32 and int64 arrays of shape (Q, k). `device`: "cpu", "cuda[:n]", or None for what
    geovote.distributed.pick_device says. A torch tensor is searched with torch where it lies; an array
    with torch on CUDA, with FAISS on the CPU."""
    if _is_tensor(vectors) or (device or _default_device()).startswith("cuda"):
        return _topk_torch(vectors, queries, k, rows, device)
    q = np.ascontiguousarray(queries, np.float32)
    if len(q) == 1:  # as one of a batch (see the module's doc)
        sim, found = _topk_blocks(vectors, None if rows is None else np.asarray(rows, np.int64),
                                  np.concatenate([q, q]), k)
        return sim[:1], found[:1]
    return _topk_blocks(vectors, None if rows is None else np.asarray(rows, np.int64), q, k)


def _is_tensor(x) -> bool:
    return hasattr(x, "is_cuda") and hasattr(x, "index_select")


def _default_device() -> str:
    from geovote.distributed import pick_device

    return pick_device()


TIE_MARGIN = 16


def _topk_blocks(vectors, rows: np.ndarray | None, q: np.ndarray, k: int):
    """faiss.knn on each block of the vectors (slices when `rows` is None: no copy of a float32 array),
    merged into the running best k by (similarity, row)."""
    import faiss

    n = vectors.shape[0] if rows is None else rows.size
    best_sim = np.full((len(q), k), -np.inf, np.float32)
    best_row = np.full((len(q), k), -1, np.int64)
    for start in range(0, n, BLOCK_ROWS):  # read here: a test may set it small
        stop = min(n, start + BLOCK_ROWS)
        if rows is None:
            r = np.arange(start, stop, dtype=np.int64)
            vec = np.ascontiguousarray(vectors[start:stop], np.float32)
        else:
            r = rows[start:stop]
            vec = np.ascontiguousarray(vectors[r], np.float32)
        # TIE_MARGIN more than k: faiss keeps any k of equal similarities, and which ones must not
        # depend on k (tuning searches deeper than a query): the lower rows win among those returned
        s, local = faiss.knn(q, vec, min(k + TIE_MARGIN, len(r)), metric=faiss.METRIC_INNER_PRODUCT)
        sim = np.concatenate([best_sim, s], 1)
        cand = np.concatenate([best_row, np.where(local >= 0, r[np.maximum(local, 0)], -1)], 1)
        cand_key = np.where(cand >= 0, cand, np.iinfo(np.int64).max)  # padding sorts last among -inf
        order = np.lexsort((cand_key, -sim), axis=1)[:, :k]  # by similarity, ties by the lower row
        best_sim, best_row = np.take_along_axis(sim, order, 1), np.take_along_axis(cand, order, 1)
    return best_sim, best_row


def _topk_torch(vectors, queries, k: int, rows, device: str | None):
    import torch

    if _is_tensor(vectors):
        device = device or str(vectors.device)
    device = device or _default_device()
    dtype = torch.float16 if device.startswith("cuda") else torch.float32
    base = vectors if torch.is_tensor(vectors) else torch.as_tensor(np.asarray(vectors))
    base = base.to(device=device, dtype=dtype)  # (N, d); no copy when already there
    if rows is not None:
        base = base.index_select(0, torch.as_tensor(np.asarray(rows, np.int64), device=device))
    batch = max(1, min(4096, SCORE_BYTES // (base.element_size() * max(1, base.shape[0]))))
    kk = min(k, base.shape[0])
    out_sim, out_rows = [], []
    for start in range(0, len(queries), batch):
        q = torch.as_tensor(np.asarray(queries[start:start + batch], np.float32), device=device).to(dtype)
        sim, found = torch.topk(q @ base.T, k=kk, dim=1)
        out_sim.append(sim.float().cpu().numpy())
        out_rows.append(found.cpu().numpy())
    sim = np.concatenate(out_sim) if out_sim else np.zeros((0, kk), np.float32)
    found = np.concatenate(out_rows).astype(np.int64) if out_rows else np.zeros((0, kk), np.int64)
    if rows is not None:
        found = np.asarray(rows, np.int64)[found]
    if kk < k:  # fewer rows than k: padded as the CPU path pads
        pad = k - kk
        sim = np.concatenate([sim, np.full((len(sim), pad), -np.inf, np.float32)], 1)
        found = np.concatenate([found, np.full((len(found), pad), -1, np.int64)], 1)
    return sim, found
