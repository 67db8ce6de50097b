"""Our index against exact search on clustered synthetic 512-d vectors, side by side in one run.

    python -m benchmark.index_bench [--n 1000000] [--queries 1000]

Reports build time, bytes per vector in RAM (the FAISS index; the fp16 re-rank copy is memory-mapped
and reported apart) and on disk, recall@10 against exact search, and queries/s in batches of 1,000.
Not yet here (issue #4): the index autofaiss picks for the same memory, and 5M vectors.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from geovote.shards import write_shard
from index.store import GeoIndex, build_index
from index.synthetic import clustered_vectors

SHARD_ROWS = 100_000


def recall_at(rows: np.ndarray, truth: np.ndarray, k: int = 10) -> float:
    return float(np.mean([len(set(a[:k]) & set(b[:k])) / k for a, b in zip(rows, truth)]))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmark.index_bench", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--queries", type=int, default=1000)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--shortlists", type=int, nargs="+", default=[10],
                    help="re-rank shortlist factors to sweep at nprobe 16 (candidates = factor x k)")
    ap.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "geovote-index-bench")
    args = ap.parse_args(argv)
    import faiss

    both = clustered_vectors(args.n + args.queries, args.dim, seed=0)
    base, queries = both[:args.n], both[args.n:]
    del both
    shards = args.workdir / f"shards_{args.n}"
    if not (shards / "manifest.json").exists():
        shards.mkdir(parents=True, exist_ok=True)
        for j, start in enumerate(range(0, args.n, SHARD_ROWS)):
            sl = slice(start, start + SHARD_ROWS)
            m = base[sl].shape[0]
            write_shard(shards / f"shard-{j:05d}.parquet", [f"v{start + i}" for i in range(m)],
                        np.zeros(m), np.zeros(m), base[sl])
        (shards / "manifest.json").write_text(json.dumps({"backbone": "synthetic", "dim": args.dim}))
    base16 = base.astype(np.float16).astype(np.float32)  # what the shards hold
    del base

    t0 = time.perf_counter()
    flat = faiss.IndexFlatIP(args.dim)
    flat.add(base16)
    t1 = time.perf_counter()
    _, truth = flat.search(queries, 10)
    exact_qps = len(queries) / (time.perf_counter() - t1)
    exact_build = t1 - t0
    del flat

    t0 = time.perf_counter()
    info = build_index(shards, args.workdir / f"index_{args.n}", log=lambda *_: None)
    build_s = time.perf_counter() - t0
    idx = GeoIndex(args.workdir / f"index_{args.n}")
    ram_b = (idx.folder / "index.faiss").stat().st_size / args.n
    disk_b = sum(f.stat().st_size for f in idx.folder.iterdir()) / args.n
    rows = [("exact (IndexFlatIP, float32 in RAM)", exact_build, 4 * args.dim, 4 * args.dim, 1.0, exact_qps)]
    for nprobe in (8, 16, 32):
        for rerank in (True, False):
            idx.search(queries[:100], 10, nprobe=nprobe, rerank=rerank)  # warm the page cache
            t0 = time.perf_counter()
            res = idx.search(queries, 10, nprobe=nprobe, rerank=rerank)
            qps = len(queries) / (time.perf_counter() - t0)
            name = f"ours {info['factory']} nprobe {nprobe}" + (", re-ranked x10" if rerank else ", PQ order")
            rows.append((name, build_s, ram_b, disk_b, recall_at(res.rows, truth), qps))
    for shortlist in args.shortlists:
        if shortlist == info["shortlist"]:
            continue
        idx.search(queries[:100], 10, nprobe=16, shortlist=shortlist)
        t0 = time.perf_counter()
        res = idx.search(queries, 10, nprobe=16, shortlist=shortlist)
        qps = len(queries) / (time.perf_counter() - t0)
        name = f"ours {info['factory']} nprobe 16, re-ranked x{shortlist}"
        rows.append((name, build_s, ram_b, disk_b, recall_at(res.rows, truth), qps))
    print(f"{args.n:,} clustered {args.dim}-d vectors, {len(queries):,} queries in one batch")
    print(f"{'method':<58} {'build s':>8} {'RAM B/vec':>10} {'disk B/vec':>11} {'recall@10':>10} {'q/s':>9}")
    for name, b, ram, disk, rec, qps in rows:
        print(f"{name:<58} {b:>8.1f} {ram:>10.0f} {disk:>11.0f} {rec:>10.3f} {qps:>9,.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
