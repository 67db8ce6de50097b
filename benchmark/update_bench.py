"""Adding photos to a gallery: the update (embed only the new photos, keep the index's training) against
a full rebuild of the grown folder, side by side on the same machine, and the recall of both.

    python -m benchmark.update_bench [--n 10000] [--added 0.1] [--factory IVF64,PQ32x4fs]

A folder of --n real photos (the sample's train images, written as JPEGs with EXIF GPS blocks) is built
into an engine; then --added x n more photos land in it and `embed.build --photos` runs again (the
update); then the grown folder is built from scratch into another engine (the rebuild). Tuning is off in
all three: it costs the same either way. The factory is an IVF-PQ one because the automatic choice at this
size is an exact (Flat) index, whose recall is 1 whatever happens to its training.

Recall@10 against exact search over the same vectors, for queries that are photos of the gallery (half of
them from the added ones): the updated engine's and the rebuilt one's, side by side.
"""
from __future__ import annotations

import argparse
import csv
import json
import tempfile
import time
from pathlib import Path

import numpy as np


def _dms(value: float) -> tuple[float, float, float]:
    value = abs(value)
    d = int(value)
    m = int((value - d) * 60)
    return float(d), float(m), round((value - d - m / 60) * 3600, 4)


def write_photos(sample: Path, rows: list[dict], folder: Path) -> None:
    """Each sample row's image as a JPEG with its coordinates in an EXIF GPS block, in nested folders."""
    from PIL import Image

    src = {p.stem: p for p in (sample / "images" / "train").rglob("*.jpg")}
    for i, r in enumerate(rows):
        lat, lon = float(r["latitude"]), float(r["longitude"])
        exif = Image.Exif()
        exif[0x8825] = {1: "N" if lat >= 0 else "S", 2: _dms(lat), 3: "E" if lon >= 0 else "W", 4: _dms(lon)}
        path = folder / f"roll{i % 7}" / f"{r['id']}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        with Image.open(src[r["id"]]) as im:
            im.save(path, "JPEG", exif=exif, quality=90)


def recall_at_10(index_dir: Path, queries: np.ndarray) -> float:
    from index.search import GeoIndex

    from faiss.contrib.evaluation import knn_intersection_measure

    from index.exact import exact_topk

    index = GeoIndex(index_dir)
    found = index.search(queries, k=10).rows
    truth = exact_topk(index.vectors, queries, 10, device="cpu")[1]
    return float(knn_intersection_measure(found, truth))


def main(argv=None) -> int:
    from geovote.bundled_sample import ensure_sample
    from geovote.shards import read_embeddings
    from retrieve.pipeline import BuildConfig, build_engine

    ap = argparse.ArgumentParser(prog="python -m benchmark.update_bench", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=10_000, help="photos in the gallery at first")
    ap.add_argument("--added", type=float, default=0.1, help="photos added, as a share of --n")
    ap.add_argument("--factory", default="IVF64,PQ32x4fs")
    ap.add_argument("--queries", type=int, default=1000)
    args = ap.parse_args(argv)
    sample = ensure_sample()
    with open(sample / "train.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    n_added = int(round(args.n * args.added))
    if args.n + n_added > len(rows):
        ap.error(f"the sample has {len(rows):,} train images: --n plus the added ones must not exceed that")
    quiet = lambda *_: None  # noqa: E731
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        folder = tmp / "photos"
        write_photos(sample, rows[:args.n], folder)

        def build(out: Path) -> float:
            t0 = time.perf_counter()
            build_engine(BuildConfig(photos=str(folder), out=str(out), tune=False, index_factory=args.factory,
                                     workers=-1), log=quiet)
            return time.perf_counter() - t0

        t_first = build(tmp / "updated")
        write_photos(sample, rows[args.n:args.n + n_added], folder)
        t_update = build(tmp / "updated")
        t_rebuild = build(tmp / "rebuilt")

        emb = read_embeddings(tmp / "rebuilt" / "embeddings" / "train")
        added = set(r["id"] for r in rows[args.n:args.n + n_added])
        is_added = np.array([Path(i).stem in added for i in emb.ids.astype(str)])
        rng = np.random.default_rng(0)
        half = args.queries // 2
        pick = np.concatenate([rng.choice(np.flatnonzero(is_added), min(half, is_added.sum()), replace=False),
                               rng.choice(np.flatnonzero(~is_added), half, replace=False)])
        queries = emb.embedding[pick]
        r_updated = recall_at_10(tmp / "updated" / "index", queries)
        r_rebuilt = recall_at_10(tmp / "rebuilt" / "index", queries)
        trained = json.loads((tmp / "updated" / "index" / "index.json").read_text())["trained_count"]
    result = {"photos": args.n, "added": n_added, "factory": args.factory, "first_build_s": round(t_first, 2),
              "update_s": round(t_update, 2), "rebuild_s": round(t_rebuild, 2),
              "update_over_rebuild": round(t_update / t_rebuild, 3), "index_trained_on": trained,
              "recall10_updated": round(r_updated, 4), "recall10_rebuilt": round(r_rebuilt, 4)}
    print(f"gallery of {args.n:,} photos, {n_added:,} added ({args.factory})")
    print(f"  first build      {t_first:8.2f} s")
    print(f"  update           {t_update:8.2f} s   ({t_update / t_rebuild:.3f} of a rebuild; index training "
          f"for {trained:,} kept)")
    print(f"  full rebuild     {t_rebuild:8.2f} s")
    print(f"  recall@10 against exact search: updated {r_updated:.4f}, rebuilt {r_rebuilt:.4f} "
          f"({len(pick):,} gallery photos as queries, {min(half, int(is_added.sum())):,} of them added)")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    from geovote.cli import exit_now

    exit_now(main())
