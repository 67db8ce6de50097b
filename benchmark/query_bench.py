"""Speed of retrieve.query with the default model on this machine, measured side by side in one run.

    python -m benchmark.query_bench [--index DIR] [--images 1000]

    cold start    `python -m retrieve.query IMG --json` in a fresh process, start to answer (median of 3)
    warm          one image at a time through a loaded engine: decode, embed, search, vote, geocode
    batch         the sample's test images in batches of 64: images/s
    voting cost   at k = 100, the vote's time against the search's, on the same 1,000 queries
Targets (issue #5): cold <= 3 s, warm <= 20 ms an image, voting < 10% of search at k = 100.
"""
from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmark.query_bench", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--index", type=Path, default=None)
    ap.add_argument("--images", type=int, default=1000)
    args = ap.parse_args(argv)
    from embed.images import open_rgb
    from geovote.layout import resolve
    from geovote.paths import default_sample_root
    from retrieve.answer import answers_for_images
    from retrieve.engine import Engine
    from retrieve.predict import vote

    index = resolve(index=args.index).require_index()
    paths = sorted((default_sample_root() / "images" / "test").rglob("*.jpg"))[:args.images]
    cold, torch_only = [], []
    for p in paths[:5]:  # side by side: the floor (python + torch) and the whole first answer
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-c", "import torch"], check=True, capture_output=True)
        torch_only.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-m", "retrieve.query", str(p), "--json", "--index", str(index)],
                       cwd=ROOT, check=True, capture_output=True)
        cold.append(time.perf_counter() - t0)
    engine = Engine(index)
    size = engine.backbone.image_size
    answers_for_images(engine, [open_rgb(paths[0], size)], ["warm-up"])
    warm = []
    for p in paths[:100]:
        t0 = time.perf_counter()
        answers_for_images(engine, [open_rgb(p, size)], [p.name])
        warm.append(time.perf_counter() - t0)
    t0 = time.perf_counter()
    for s in range(0, len(paths), 64):
        chunk = paths[s:s + 64]
        answers_for_images(engine, [open_rgb(p, size) for p in chunk], [p.name for p in chunk])
    batch_rate = len(paths) / (time.perf_counter() - t0)
    emb = engine.embed_images([open_rgb(p, size) for p in paths])
    params = replace(engine.params, k=100)
    t0 = time.perf_counter()
    res = engine.search(emb, 100)
    search_s = time.perf_counter() - t0
    table = np.asarray(engine.cells(params))
    t0 = time.perf_counter()
    cells = table[np.maximum(res.rows, 0)]
    vote(res.similarity, res.lat_deg, res.lon_deg, cells, params)
    vote_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    vote(res.similarity, res.lat_deg, res.lon_deg, cells, replace(params, n_alternatives=0))
    vote_answer_s = time.perf_counter() - t0
    print(f"index {index} ({engine.index.count:,} images, {engine.index.info['factory']}), "
          f"model {engine.backbone.name}")
    print(f"cold start, process start to answer: {statistics.median(cold):.2f} s "
          f"(runs: {', '.join(f'{c:.2f}' for c in cold)}; target <= 3 s); python -c 'import torch': "
          f"{statistics.median(torch_only):.2f} s; "
          f"ratio {statistics.median(cold) / statistics.median(torch_only):.2f}x")
    print(f"warm, one image at a time: {1000 * statistics.median(warm):.1f} ms median, "
          f"{1000 * np.percentile(warm, 95):.1f} ms p95 (target <= 20 ms)")
    print(f"batch of 64: {batch_rate:,.0f} images/s over {len(paths):,} images")
    print(f"k = 100 on {len(emb):,} queries: search {1000 * search_s:.0f} ms, vote {1000 * vote_s:.0f} ms "
          f"= {vote_s / search_s:.0%} of search; without the runner-up peaks {1000 * vote_answer_s:.0f} ms "
          f"= {vote_answer_s / search_s:.0%} (benchmark.vote_bench: against a 1M index)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
