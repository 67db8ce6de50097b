"""What answering photos together costs (retrieve.album), side by side with answering them alone.

    python -m benchmark.album_bench [--index DIR] [--sizes 1 3 10 50] [--repeats 7]

For albums of N of the sample's test photos (embedded once beforehand: decoding and the model cost the
same either way), the median time of
    together   Engine.locate_albums: N searches, each photo's candidates, the album's pooled table, its
               model, and each photo's agreement
    alone      Engine.locate on the N photos as one batch (what `retrieve.query` does without --together)
    one by one Engine.locate on each photo in turn
and the ratio of together to alone. Target (issue #29): together costs at most the N searches plus a
vote over the pooled candidates.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np


def _median_s(fn, repeats: int) -> float:
    fn()  # warm-up: caches, first allocations
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmark.album_bench", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--index", type=Path, default=None)
    ap.add_argument("--sizes", type=int, nargs="+", default=[1, 3, 10, 50])
    ap.add_argument("--repeats", type=int, default=7)
    args = ap.parse_args(argv)
    from embed.images import open_rgb
    from geovote.layout import resolve
    from geovote.paths import default_sample_root
    from retrieve.engine import Engine

    index = resolve(index=args.index).require_index()
    engine = Engine(index)
    paths = sorted((default_sample_root() / "images" / "test").rglob("*.jpg"))[:max(args.sizes)]
    emb = engine.embed_images([open_rgb(p, engine.backbone.image_size) for p in paths])
    print(f"index {index} ({engine.index.count:,} images, {engine.index.info['factory']}), model "
          f"{engine.backbone.name}, album model {'fitted' if engine.albums.model is not None else 'absent'}")
    print("| photos | together (ms) | alone, one batch (ms) | one by one (ms) | together / alone |")
    print("|---|---|---|---|---|")
    for n in args.sizes:
        e, album = emb[:n], [np.arange(n)]
        together = _median_s(lambda e=e, album=album: engine.locate_albums(e, album), args.repeats)
        alone = _median_s(lambda e=e: engine.locate(e), args.repeats)
        one_by_one = _median_s(lambda e=e: [engine.locate(e[i:i + 1]) for i in range(len(e))],
                               max(1, args.repeats // 2))
        print(f"| {n} | {1000 * together:.1f} | {1000 * alone:.1f} | {1000 * one_by_one:.1f} | "
              f"{together / alone:.2f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
