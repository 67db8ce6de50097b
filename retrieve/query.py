"""Where was this photo taken? Embed it, find its nearest training images, let them vote.

    python -m retrieve.query photo.jpg [more.jpg | folder ...]     # for people
    python -m retrieve.query photo.jpg --json                      # one JSON object per image and line
    python -m retrieve.query --split test --data data/sample        # a whole split -> predictions parquet

--index defaults to the bundled sample's index, built by `python -m embed.build`. An unreadable image gets
a one-line error naming it; the others are still answered, and the exit code is 1 if any failed.
--json keys: image, latitude, longitude, confidence, country, region, sub_region, city, candidates
(a list of {latitude, longitude, score}).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif"}
BATCH = 64


def default_index() -> Path:
    from geovote.paths import default_sample_root

    return default_sample_root() / "geovote" / "default" / "index"


def expand(inputs: list[str]) -> list[Path]:
    """Files as given; folders replaced by the images inside them, sorted."""
    out = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            out += sorted(f for f in p.rglob("*") if f.suffix.lower() in IMAGE_SUFFIXES and f.is_file())
        else:
            out.append(p)
    return out


def osm_link(lat: float, lon: float, zoom: int = 10) -> str:
    return f"https://www.openstreetmap.org/?mlat={lat:.5f}&mlon={lon:.5f}#map={zoom}/{lat:.5f}/{lon:.5f}"


def answers_for_images(engine, images: list, names: list[str], tta: bool = False) -> list[dict]:
    """PIL images -> answer dicts (the --json keys plus `neighbours`), in order."""
    from geovote.geocode import reverse_geocode

    emb = engine.embed_images(images)
    if tta:  # average with the mirrored image's embedding, then renormalise
        from PIL import ImageOps

        emb = emb + engine.embed_images([ImageOps.mirror(i) for i in images])
        emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    pred, res = engine.locate(emb)
    place = reverse_geocode(np.nan_to_num(pred.lat_deg), np.nan_to_num(pred.lon_deg))
    out = []
    for i, name in enumerate(names):
        cands = [{"latitude": round(float(pred.lat_deg[i]), 6), "longitude": round(float(pred.lon_deg[i]), 6),
                  "score": round(float(pred.confidence[i]), 4)}]
        for a in range(pred.alt_lat_deg.shape[1]):
            if np.isfinite(pred.alt_lat_deg[i, a]):
                cands.append({"latitude": round(float(pred.alt_lat_deg[i, a]), 6),
                              "longitude": round(float(pred.alt_lon_deg[i, a]), 6),
                              "score": round(float(pred.alt_score[i, a]), 4)})
        out.append({
            "image": name, "latitude": cands[0]["latitude"], "longitude": cands[0]["longitude"],
            "confidence": cands[0]["score"], "country": str(place["country"][i]),
            "region": str(place["region"][i]), "sub_region": str(place["sub_region"][i]),
            "city": str(place["city"][i]), "candidates": cands,
            "neighbours": [{"id": str(res.ids[i, j]), "latitude": float(res.lat_deg[i, j]),
                            "longitude": float(res.lon_deg[i, j]),
                            "similarity": round(float(res.similarity[i, j]), 4)}
                           for j in range(res.rows.shape[1]) if res.rows[i, j] >= 0],
        })
    return out


def answers(engine, paths: list[Path], tta: bool = False):
    """Yield (path, answer dict or None, error or None), in order, in batches."""
    from embed.images import ImageFailure, open_rgb

    size = engine.backbone.image_size
    for start in range(0, len(paths), BATCH):
        chunk = paths[start:start + BATCH]
        imgs, ok, errors = [], [], {}
        for p in chunk:
            try:
                imgs.append(open_rgb(p, size))
                ok.append(p)
            except ImageFailure as e:
                errors[p] = str(e)
        results = dict(zip(ok, answers_for_images(engine, imgs, [str(p) for p in ok], tta))) if imgs else {}
        for p in chunk:
            yield p, results.get(p), errors.get(p)


def human(answer: dict, top: int) -> str:
    lat, lon = answer["latitude"], answer["longitude"]
    place = ", ".join(x for x in (answer["city"], answer["region"], answer["country"]) if x)
    conf = answer["confidence"]
    lines = [f"{answer['image']}: {lat:.5f}, {lon:.5f}  near {place}  (confidence {conf:.0%})",
             f"  map: {osm_link(lat, lon)}"]
    alts = answer["candidates"][1:top]
    if alts:
        from geovote.geo import haversine_km
        from geovote.geocode import reverse_geocode

        where = reverse_geocode([c["latitude"] for c in alts], [c["longitude"] for c in alts])
        lines.append("  alternatives:")
        for i, c in enumerate(alts):
            d = float(haversine_km(lat, lon, c["latitude"], c["longitude"]))
            lines.append(f"    {c['latitude']:.4f}, {c['longitude']:.4f}  near {where['city'][i]}, "
                         f"{where['country'][i]}  (score {c['score']:.0%}, {d:,.0f} km away)")
    return "\n".join(lines)


def predict_split(engine, data: Path, split: str, out: Path, workers: int = -1) -> Path:
    """Embed a split (resumable, beside the index) and write its predictions as parquet."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from embed.build import EmbedConfig, embed_split
    from geovote.data import read_split
    from geovote.shards import iter_shards

    s = read_split(data, split, rejects_path=engine.index_dir.parent / f"rejects-{split}.csv")
    emb_dir = engine.index_dir.parent / "embeddings" / split
    cfg = EmbedConfig(data=str(data), splits=(split,), model=engine.model_name, workers=workers, index=False)
    embed_split(s, engine.backbone, emb_dir, cfg, data, log=lambda m: print(m, file=sys.stderr))
    ids, lat, lon, conf = [], [], [], []
    for shard in iter_shards(emb_dir):
        for start in range(0, len(shard), 4096):
            pred, _ = engine.locate(shard.embedding[start:start + 4096].astype(np.float32))
            ids += list(shard.ids[start:start + 4096])
            lat.append(pred.lat_deg)
            lon.append(pred.lon_deg)
            conf.append(pred.confidence)
    table = pa.table({"id": pa.array(ids, pa.string()), "latitude": np.concatenate(lat),
                      "longitude": np.concatenate(lon), "confidence": np.concatenate(conf)})
    out.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, out)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m retrieve.query", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("images", nargs="*", help="image files or folders of images")
    ap.add_argument("--index", type=Path, default=None, help="index folder (default: the sample's)")
    ap.add_argument("--model", default=None, help="override the model the index names")
    ap.add_argument("--top", type=int, default=3, help="answers to show: the best and N-1 alternatives")
    ap.add_argument("--json", action="store_true", help="one JSON object per image and line")
    ap.add_argument("--tta", action="store_true", help="average with the mirrored image")
    ap.add_argument("--split", help="predict a whole split of --data instead of images")
    ap.add_argument("--data", type=Path, help="dataset root for --split (default: the sample)")
    ap.add_argument("--out", type=Path, help="predictions parquet for --split")
    args = ap.parse_args(argv)
    if not args.images and not args.split:
        ap.error("give image files or folders, or --split")
    from embed.models import BackboneError
    from geovote.data import DataError
    from index.store import IndexError_
    from retrieve.engine import Engine

    index = args.index or default_index()
    try:
        if not index.exists() and args.index is None:
            raise IndexError_(f"no index at {index}: build it first with `python -m embed.build`")
        engine = Engine(index, model=args.model)
        if args.split:
            from geovote.paths import default_sample_root

            data = args.data or default_sample_root()
            out = args.out or index.parent / f"predictions-{args.split}.parquet"
            print(predict_split(engine, data, args.split, out))
            return 0
    except (IndexError_, BackboneError, DataError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    failed = 0
    paths = expand(args.images)
    if not paths:
        print("error: no images found in " + " ".join(args.images), file=sys.stderr)
        return 2
    for path, answer, error in answers(engine, paths, tta=args.tta):
        if error:
            failed += 1
            print(f"error: {path}: {error}", file=sys.stderr)
        elif args.json:
            print(json.dumps({k: v for k, v in answer.items() if k != "neighbours"}), flush=True)
        else:
            print(human(answer, args.top), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
