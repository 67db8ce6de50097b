"""Our index against exact search on clustered synthetic 512-d vectors, side by side in one run.

    python -m benchmark.index_bench [--n 1000000] [--queries 1000]

Reports build time, bytes per vector in RAM (the FAISS index; the fp16 re-rank copy is memory-mapped
and reported apart) and on disk, recall@10 against exact search, and queries/s in batches of 1,000,
also with the re-rank copy evicted from the page cache (cold). Beside ours: the index autofaiss picks for
the same memory, and exact search (the ceiling).

autofaiss 2.18.0 pins numpy<2, so it cannot live in this environment; its pick was taken once in a
separate venv: get_optimal_index_keys_v2(1_000_000, 512, "72MB")[0] (our RAM per vector x 1M) gives
"OPQ64_448,IVF16384_HNSW32,PQ64x8" (the same for 5M at 360MB). It has no re-rank stage; autofaiss tunes
nprobe for speed, so it is shown at several. Training it as autofaiss would (k-means of >= 31 x 16,384
vectors into 16,384 centroids) takes most of an hour on a 2-core machine, so by default the benchmark
trains its encoding (OPQ to 448 dims, 8-bit PQ64: 64 B a vector, our memory) over our 1,024 lists;
--autofaiss-full trains the pick itself.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from geovote.shards import write_shard
from index.build import build_index
from index.search import GeoIndex
from index.synthetic import clustered_vectors

SHARD_ROWS = 100_000
AUTOFAISS_PICK = "OPQ64_448,IVF16384_HNSW32,PQ64x8"
AUTOFAISS_AFFORDABLE = "OPQ64_448,IVF1024_HNSW32,PQ64x8"  # its encoding, our number of lists


def evict(path: Path) -> None:
    """Drop a file's pages from the page cache (needs no privileges for clean pages)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def source_rows(found) -> np.ndarray:
    """Rows of the base array: an index numbers its rows in its own (inverted-list) order, so they are
    read back from the ids ("v<row>"); a plain array of rows (a bare FAISS index) already is."""
    if isinstance(found, np.ndarray):
        return found
    return np.vectorize(lambda i: int(i[1:]) if i else -1, otypes=[np.int64])(found.ids)


def recall_at(rows: np.ndarray, truth: np.ndarray, k: int = 10) -> float:
    return float(np.mean([len(set(a[:k]) & set(b[:k])) / k for a, b in zip(rows, truth)]))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmark.index_bench", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--queries", type=int, default=1000)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--shortlists", type=int, nargs="+", default=[20, 30, 50],
                    help="re-rank shortlist factors to sweep (candidates = factor x k)")
    ap.add_argument("--nprobes", type=int, nargs="+", default=[8, 16])
    ap.add_argument("--skip-autofaiss", action="store_true")
    ap.add_argument("--factories", nargs="+", default=[],
                    help="other factory strings for our index (build_index), measured beside the default")
    ap.add_argument("--shard-order", action="store_true",
                    help="also build the default index with its rows in shard order (as before list order)")
    ap.add_argument("--autofaiss-full", action="store_true", help="train autofaiss's pick itself (slow)")
    ap.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "geovote-index-bench")
    args = ap.parse_args(argv)
    import faiss

    base = clustered_vectors(args.n + args.queries, args.dim, seed=0)  # one array: 5M x 512 is 10 GB
    queries = base[args.n:].copy()
    base = base[:args.n]
    shards = args.workdir / f"shards_{args.n}"
    if not (shards / "manifest.json").exists():
        shards.mkdir(parents=True, exist_ok=True)
        for j, start in enumerate(range(0, args.n, SHARD_ROWS)):
            sl = slice(start, start + SHARD_ROWS)
            m = base[sl].shape[0]
            write_shard(shards / f"shard-{j:05d}.parquet", [f"v{start + i}" for i in range(m)],
                        np.zeros(m), np.zeros(m), base[sl])
        (shards / "manifest.json").write_text(json.dumps({"backbone": "synthetic", "dim": args.dim}))
    for start in range(0, args.n, SHARD_ROWS):  # in place: what the shards hold (fp16), as float32
        base[start:start + SHARD_ROWS] = base[start:start + SHARD_ROWS].astype(np.float16)
    base16 = base

    t1 = time.perf_counter()
    _, truth = faiss.knn(queries, base16, 10, metric=faiss.METRIC_INNER_PRODUCT)  # exact, no copy
    exact_qps = len(queries) / (time.perf_counter() - t1)
    exact_build = 0.0

    t0 = time.perf_counter()
    info = build_index(shards, args.workdir / f"index_{args.n}", log=lambda *_: None)
    build_s = time.perf_counter() - t0
    idx = GeoIndex(args.workdir / f"index_{args.n}")
    ram_b = (idx.folder / "index.faiss").stat().st_size / args.n
    disk_b = sum(f.stat().st_size for f in idx.folder.iterdir()) / args.n
    rows = [("exact (faiss.knn, float32 in RAM)", exact_build, 4 * args.dim, 4 * args.dim, 1.0, exact_qps)]

    def timed(name, search, build, ram, disk):
        search(queries[:100])  # warm up
        qps = 0.0
        for _ in range(2):  # the faster of two passes: the first also maps the copy's pages in
            t0 = time.perf_counter()
            found = search(queries)
            qps = max(qps, len(queries) / (time.perf_counter() - t0))
        rows.append((name, build, ram, disk, recall_at(source_rows(found), truth), qps))

    timed(f"ours {info['factory']} as built: measured nprobe {info['nprobe']}, x{info['shortlist']}",
          lambda q, ix=idx: ix.search(q, 10), build_s, ram_b, disk_b)
    for nprobe in args.nprobes:
        for shortlist in args.shortlists:
            timed(f"ours {info['factory']} nprobe {nprobe}, re-ranked x{shortlist}",
                  lambda q, n=nprobe, s=shortlist, ix=idx: ix.search(q, 10, nprobe=n, shortlist=s),
                  build_s, ram_b, disk_b)
        timed(f"ours {info['factory']} nprobe {nprobe}, PQ order",
              lambda q, n=nprobe, ix=idx: ix.search(q, 10, nprobe=n, rerank=False),
              build_s, ram_b, disk_b)
    alternatives = [(f, True, f) for f in args.factories]
    if args.shard_order:
        alternatives.append((info["factory"], False, f"{info['factory']} rows in shard order"))
    for j, (factory, list_order, label) in enumerate(alternatives):  # the same search grid, side by side
        t0 = time.perf_counter()
        build_index(shards, args.workdir / f"index_{args.n}_alt{j}", factory=factory, list_order=list_order,
                    log=lambda *_: None)
        alt_build = time.perf_counter() - t0
        alt = GeoIndex(args.workdir / f"index_{args.n}_alt{j}")
        alt_ram = (alt.folder / "index.faiss").stat().st_size / args.n
        alt_disk = sum(f.stat().st_size for f in alt.folder.iterdir()) / args.n
        for nprobe in args.nprobes:
            for shortlist in args.shortlists:
                timed(f"{label} nprobe {nprobe}, re-ranked x{shortlist}",
                      lambda q, n=nprobe, s=shortlist, ix=alt: ix.search(q, 10, nprobe=n, shortlist=s),
                      alt_build, alt_ram, alt_disk)
        alt = None
    # cold: the re-rank copy evicted from the page cache (mapped pages stay, so close the index first)
    folder = idx.folder
    idx = None
    evict(folder / "refine.faiss")
    idx = GeoIndex(folder)
    t0 = time.perf_counter()
    found = idx.search(queries, 10)
    rows.append(("ours, default, re-rank copy not in page cache", build_s, ram_b, disk_b,
                 recall_at(source_rows(found), truth), len(queries) / (time.perf_counter() - t0)))
    idx = None

    if not args.skip_autofaiss:
        t0 = time.perf_counter()
        af_key = AUTOFAISS_PICK if args.autofaiss_full else AUTOFAISS_AFFORDABLE
        af = faiss.index_factory(args.dim, af_key, faiss.METRIC_INNER_PRODUCT)
        train_rows = np.sort(np.random.default_rng(0).choice(args.n, min(args.n, 256 * 1024), replace=False))
        af.train(base16[train_rows])
        for start in range(0, args.n, 65_536):
            af.add(base16[start:start + 65_536])
        af_build = time.perf_counter() - t0
        af_ram = len(faiss.serialize_index(af)) / args.n
        for nprobe in (16, 64):
            params = faiss.SearchParametersIVF(nprobe=nprobe)
            timed(f"autofaiss {af_key} nprobe {nprobe}",
                  lambda q, p=params: af.search(q, 10, params=p)[1], af_build, af_ram, af_ram)
    print(f"{args.n:,} clustered {args.dim}-d vectors, {len(queries):,} queries in one batch")
    print(f"{'method':<64} {'build s':>8} {'RAM B/vec':>10} {'disk B/vec':>11} {'recall@10':>10} {'q/s':>9}")
    for name, b, ram, disk, rec, qps in rows:
        print(f"{name:<64} {b:>8.1f} {ram:>10.0f} {disk:>11.0f} {rec:>10.3f} {qps:>9,.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
