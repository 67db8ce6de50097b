"""Answers for images and for whole splits: what retrieve.query prints and the server returns.

    answers_for_images(engine, pil_images, names)   -> [answer dict]   (the --json keys + `neighbours`)

The answer is the candidate of highest expected GeoScore (retrieve.calibrate.decide); its `confidence` is
P(the true place is within 200 km), `within_km` the same for 1, 25, 200, 750 and 2500 km, `radius_km`
the radius holding it with 90% probability, `expected_geoscore` what it scores on average, all from its
own distance distribution fitted on the tuning split; `kind` says what it is (the vote's `peak`, a
`runner_up` peak, the `far_pick`, a `neighbour`: a gallery image's place); the other candidates follow
in the same order, each `score` its own P(within 200 km). An engine without calibration.json answers
`calibrated: false`, the vote's peak, the raw vote share as confidence and score, no within_km or
radius_km.
    answers(engine, paths)                           -> (path, answer | None, error | None), in order
    predict_split(engine, data, split, out)          -> predictions parquet or CSV (by out's suffix:
                                                        id, latitude, longitude, confidence), for
                                                        benchmark.score
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from retrieve.calibrate import LEVELS_KM
from retrieve.candidates import KINDS

BATCH = 64  # images decoded and embedded together
SPLIT_BATCH = 4096  # split queries searched and voted together


def answers_for_images(engine, images: list, names: list[str], tta: bool = False, region=None) -> list[dict]:
    """PIL images -> answer dicts (the --json keys plus `neighbours`), in order. `region`
    (retrieve.region.Region): answer only from, and inside, it."""
    from geovote.geocode import reverse_geocode

    emb = engine.embed_images(images)
    if tta:  # average with the mirrored image's embedding, then renormalise
        from PIL import ImageOps

        emb = emb + engine.embed_images([ImageOps.mirror(i) for i in images])
        emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    pred, res = engine.locate(emb, region=region)
    place = reverse_geocode(np.nan_to_num(pred.lat_deg), np.nan_to_num(pred.lon_deg))
    levels = [str(km) for km in LEVELS_KM]
    out = []
    for i, name in enumerate(names):
        cands = [{"latitude": round(float(pred.lat_deg[i]), 6), "longitude": round(float(pred.lon_deg[i]), 6),
                  "score": round(float(pred.confidence[i]), 4)}]
        for a in range(pred.alt_lat_deg.shape[1]):
            if np.isfinite(pred.alt_lat_deg[i, a]):
                cands.append({"latitude": round(float(pred.alt_lat_deg[i, a]), 6),
                              "longitude": round(float(pred.alt_lon_deg[i, a]), 6),
                              "score": round(float(pred.alt_score[i, a]), 4)})
        calibrated = pred.within_km is not None
        out.append({
            "image": name, "latitude": cands[0]["latitude"], "longitude": cands[0]["longitude"],
            "confidence": cands[0]["score"], "calibrated": calibrated,
            "within_km": dict(zip(levels, (round(float(p), 4) for p in pred.within_km[i]))) if calibrated
            else None,
            "radius_km": round(float(pred.radius_km[i]), 1) if calibrated else None,
            "expected_geoscore": round(float(pred.expected_geoscore[i]), 1) if calibrated else None,
            "kind": (KINDS[int(pred.answer_kind[i])]
                     if pred.answer_kind is not None and pred.answer_kind[i] >= 0 else "peak"),
            "far_pick": bool(pred.far_answered[i]) if pred.far_answered is not None else False,
            "country": str(place["country"][i]),
            "region": str(place["region"][i]), "sub_region": str(place["sub_region"][i]),
            "city": str(place["city"][i]), "candidates": cands,
            "neighbours": [{"id": str(res.ids[i, j]), "latitude": float(res.lat_deg[i, j]),
                            "longitude": float(res.lon_deg[i, j]),
                            "similarity": round(float(res.similarity[i, j]), 4)}
                           for j in range(res.rows.shape[1]) if res.rows[i, j] >= 0],
        })
    return out


def answers(engine, paths: list[Path], tta: bool = False, region=None):
    """Yield (path, answer dict or None, error or None), in order, in batches."""
    from embed.images import ImageFailure, open_rgb
    from geovote.csvsafe import printable

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
        names = [printable(str(p)) for p in ok]  # valid UTF-8 in every output, whatever the file name
        results = (dict(zip(ok, answers_for_images(engine, imgs, names, tta, region)))
                   if imgs else {})
        for p in chunk:
            yield p, results.get(p), errors.get(p)


def predict_split(engine, data: Path, split: str, out: Path, workers: int = -1, log=None) -> Path:
    """Embed a split (resumable, into the engine folder) and write its predictions: id, latitude,
    longitude, confidence, and for a calibrated engine radius_km, within_<d>km, expected_geoscore and
    kind; parquet, CSV or GeoJSON by `out`'s suffix."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from geovote.shards import iter_shards
    from retrieve.embedded import ensure_embedded

    ids, lat, lon, conf, radius, within, expected, kind = [], [], [], [], [], [], [], []
    for shard in iter_shards(ensure_embedded(engine, data, split, workers, log)):
        for start in range(0, len(shard), SPLIT_BATCH):
            pred, _ = engine.locate(shard.embedding[start:start + SPLIT_BATCH].astype(np.float32),
                                    alternatives=False)
            ids += list(shard.ids[start:start + SPLIT_BATCH])
            lat.append(pred.lat_deg)
            lon.append(pred.lon_deg)
            conf.append(pred.confidence)
            if pred.within_km is not None:
                radius.append(pred.radius_km)
                within.append(pred.within_km)
                expected.append(pred.expected_geoscore)
                kind.append(pred.answer_kind)
    cols = {"id": pa.array(ids, pa.string()), "latitude": np.concatenate(lat),
            "longitude": np.concatenate(lon), "confidence": np.concatenate(conf)}
    if within:
        w = np.concatenate(within)
        kinds = np.concatenate(kind)
        cols |= {"radius_km": np.concatenate(radius),
                 **{f"within_{km}km": w[:, j] for j, km in enumerate(LEVELS_KM)},
                 "expected_geoscore": np.concatenate(expected),
                 "kind": pa.array([KINDS[k] if k >= 0 else None for k in kinds], pa.string())}
    table = pa.table(cols)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".partial")
    if out.suffix == ".csv":
        import pyarrow.csv as pacsv

        from geovote.csvsafe import cell

        safe_ids = pa.array([cell(i) for i in ids], pa.string())  # read back by benchmark.score (uncell)
        pacsv.write_csv(table.set_column(0, "id", safe_ids), tmp)
    elif out.suffix == ".geojson":
        from retrieve.formats import geojson_text

        points = [{"image": r["id"], "latitude": r["latitude"], "longitude": r["longitude"],
                   "confidence": r["confidence"]}
                  for r in table.to_pylist() if r["latitude"] == r["latitude"]]
        tmp.write_text(geojson_text(points))  # rows without an answer (NaN) have no point
    else:
        pq.write_table(table, tmp)
    tmp.replace(out)  # a killed run leaves no half-written predictions under the real name
    return out
