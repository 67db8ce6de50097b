"""The vote against the search it follows, at k = 100 on an index of N vectors, side by side in one run.

    python -m benchmark.vote_bench [--n 1000000] [--queries 1000]

Builds our index (index.build, default factory) over N clustered synthetic 512-d vectors placed at
random GeoNames-like places (clusters share a region, so neighbours vote over real cells), searches
k = 100 for each query, then votes (retrieve.predict) with the engine's default settings: with the
three runner-up peaks (what retrieve.query shows) and without (what split predictions, tuning and
benchmark.run compute). Prints each as a share of the search time.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmark.vote_bench", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--queries", type=int, default=1000)
    ap.add_argument("--k", type=int, default=100)
    args = ap.parse_args(argv)
    from geovote.shards import write_shard
    from index.build import build_index
    from index.search import GeoIndex
    from index.synthetic import clustered_vectors
    from retrieve.predict import VoteConfig, cell_table, vote

    rng = np.random.default_rng(0)
    n_clusters = 1000
    vectors = clustered_vectors(args.n + args.queries, 512, n_clusters=n_clusters, seed=3)
    # each cluster is a region: its vectors sit within ~100 km of its centre
    centre = np.stack([np.degrees(np.arcsin(rng.uniform(-0.9, 0.9, n_clusters))),
                       rng.uniform(-180, 180, n_clusters)], 1)
    nearest = np.argmax(vectors @ clustered_vectors(n_clusters, 512, n_clusters=n_clusters, seed=3).T, axis=1)
    lat = np.clip(centre[nearest, 0] + rng.normal(0, 1, len(vectors)), -89.9, 89.9)
    lon = (centre[nearest, 1] + rng.normal(0, 1, len(vectors)) + 180) % 360 - 180
    base, queries = vectors[:args.n], vectors[args.n:]
    with tempfile.TemporaryDirectory() as tmp:
        shards = Path(tmp) / "shards"
        shards.mkdir()
        for i, start in enumerate(range(0, args.n, 100_000)):
            stop = min(args.n, start + 100_000)
            write_shard(shards / f"shard-{i:05d}.parquet", [str(j) for j in range(start, stop)],
                        lat[start:stop], lon[start:stop], base[start:stop])
        (shards / "manifest.json").write_text('{"backbone": "synthetic", "dim": 512}')
        info = build_index(shards, Path(tmp) / "index", log=lambda *_: None)
        index = GeoIndex(Path(tmp) / "index")
        cfg = VoteConfig(k=args.k)
        table = cell_table(np.asarray(index.lat), np.asarray(index.lon), cfg)
        index.search(queries[:50], args.k)  # warm-up
        t0 = time.perf_counter()
        res = index.search(queries, args.k)
        search_s = time.perf_counter() - t0
        cells = table[np.maximum(res.rows, 0)]
        timings = {}
        for label, c in (("with 3 runner-up peaks", cfg), ("answer only", replace(cfg, n_alternatives=0))):
            vote(res.similarity[:50], res.lat_deg[:50], res.lon_deg[:50], cells[:50], c)
            t0 = time.perf_counter()
            vote(res.similarity, res.lat_deg, res.lon_deg, cells, c)
            timings[label] = time.perf_counter() - t0
    print(f"{args.n:,} vectors ({info['factory']}, shortlist x{info['shortlist']}), "
          f"{args.queries:,} queries, k = {args.k}")
    print(f"search: {1000 * search_s:.0f} ms ({args.queries / search_s:,.0f} queries/s)")
    for label, t in timings.items():
        print(f"vote, {label}: {1000 * t:.0f} ms = {t / search_s:.0%} of the search")
    return 0


if __name__ == "__main__":
    sys.exit(main())
