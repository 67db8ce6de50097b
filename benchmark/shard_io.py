"""Writing and reading one embedding shard: geovote.shards' options against pyarrow's defaults (snappy,
dictionary, statistics), same table, same machine, in one run.

    python -m benchmark.shard_io [--rows 16384] [--dim 768] [--repeat 5]

Prints each way's write and read time (median of --repeat), the file size, and the ratios.
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmark.shard_io", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=16384)
    ap.add_argument("--dim", type=int, default=768)
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args(argv)
    import pyarrow.parquet as pq

    from geovote.shards import SHARD_WRITE_OPTIONS, read_shard, shard_table

    rng = np.random.default_rng(0)
    emb = rng.standard_normal((args.rows, args.dim), np.float32)
    emb = (emb / np.linalg.norm(emb, axis=1, keepdims=True)).astype(np.float16)
    ids = (10**14 + rng.permutation(args.rows)).astype(str)
    lat, lon = rng.uniform(-60, 70, args.rows), rng.uniform(-180, 180, args.rows)
    table = shard_table(ids, lat, lon, emb)  # the same table, written both ways
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, options in (("pyarrow defaults", {}), ("geovote.shards", SHARD_WRITE_OPTIONS)):
            path = Path(tmp) / f"{len(results)}.parquet"
            writes, reads = [], []
            for _ in range(args.repeat):
                t0 = time.perf_counter()
                pq.write_table(table, path, **options)  # what write_shard does, bar the rename
                writes.append(time.perf_counter() - t0)
                t0 = time.perf_counter()
                shard = read_shard(path)
                reads.append(time.perf_counter() - t0)
            np.testing.assert_array_equal(shard.embedding, emb)
            results[name] = (statistics.median(writes), statistics.median(reads), path.stat().st_size)
            w, r, size = results[name]
            print(f"{name:>17}: write {w * 1000:6.0f} ms, read {r * 1000:6.0f} ms, {size / 1e6:.1f} MB")
    (w0, r0, s0), (w1, r1, s1) = results.values()
    print(f"geovote.shards against the defaults: write {w0 / w1:.2f}x faster, read {r0 / r1:.2f}x faster, "
          f"size {s1 / s0:.3f}x ({args.rows:,} x {args.dim} fp16)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
