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

    emb = _embed(engine, images, tta)
    pred, res = engine.locate(emb, region=region)
    place = reverse_geocode(np.nan_to_num(pred.lat_deg), np.nan_to_num(pred.lon_deg))
    out = []
    for i, name in enumerate(names):
        out.append({"image": name, **_answer(pred, i, place),
                    "neighbours": [{"id": str(res.ids[i, j]), "latitude": float(res.lat_deg[i, j]),
                                    "longitude": float(res.lon_deg[i, j]),
                                    "similarity": round(float(res.similarity[i, j]), 4)}
                                   for j in range(res.rows.shape[1]) if res.rows[i, j] >= 0]})
    return out


def _answer(pred, i: int, place: dict | None = None, calibrated: bool | None = None) -> dict:
    """The answer keys of row i of a Prediction (coordinates, probabilities, kind, candidates, and the
    place names when `place`, reverse_geocode's columns, is given)."""
    levels = [str(km) for km in LEVELS_KM]
    cands = [{"latitude": round(float(pred.lat_deg[i]), 6), "longitude": round(float(pred.lon_deg[i]), 6),
              "score": round(float(pred.confidence[i]), 4)}]
    for a in range(pred.alt_lat_deg.shape[1]):
        if np.isfinite(pred.alt_lat_deg[i, a]):
            cands.append({"latitude": round(float(pred.alt_lat_deg[i, a]), 6),
                          "longitude": round(float(pred.alt_lon_deg[i, a]), 6),
                          "score": round(float(pred.alt_score[i, a]), 4)})
    has = pred.within_km is not None
    return {
        "latitude": cands[0]["latitude"], "longitude": cands[0]["longitude"],
        "confidence": cands[0]["score"], "calibrated": has if calibrated is None else calibrated,
        "within_km": dict(zip(levels, (round(float(p), 4) for p in pred.within_km[i]))) if has else None,
        "radius_km": round(float(pred.radius_km[i]), 1) if has else None,
        "expected_geoscore": round(float(pred.expected_geoscore[i]), 1) if has else None,
        "kind": (KINDS[int(pred.answer_kind[i])]
                 if pred.answer_kind is not None and pred.answer_kind[i] >= 0 else "peak"),
        "far_pick": bool(pred.far_answered[i]) if pred.far_answered is not None else False,
        **({k: str(place[k][i]) for k in ("country", "region", "sub_region", "city")} if place else {}),
        "candidates": cands,
    }


PHOTO_KEYS = ("latitude", "longitude", "confidence", "within_km", "radius_km")  # each photo's own answer


def answers_for_albums(engine, images: list, albums: list, names: list[str], tta: bool = False, region=None,
                       spread_km: float | None = None) -> list[dict]:
    """PIL images, albums (lists of indices into them) and the photos' names -> one answer dict per
    album (retrieve.album): the single answer's keys for the joint answer, plus `images`, `spread_km`,
    `best_single_within_200km` (the most confident photo's own P(within 200 km)) and `photos` (each
    photo's own answer and its `agreement`: its support within 200 km of the joint answer)."""
    from geovote.geocode import reverse_geocode

    emb = _embed(engine, images, tta)
    got, _ = engine.locate_albums(emb, albums, spread_km=spread_km, region=region)
    joint, single = got.joint, got.single
    place = reverse_geocode(np.nan_to_num(joint.lat_deg), np.nan_to_num(joint.lon_deg))
    out = []
    for i, rows in enumerate(got.albums):
        photos = []
        for r, agree in zip(rows, got.agreement[i]):
            own = _answer(single, int(r))
            photos.append({"image": names[r], **{k: own[k] for k in PHOTO_KEYS},
                           "agreement": round(float(agree), 4)})
        out.append({"images": [names[r] for r in rows], **_answer(joint, i, place, bool(got.calibrated[i])),
                    "spread_km": got.spread_km,
                    "best_single_within_200km": max(p["confidence"] for p in photos), "photos": photos})
    return out


def _embed(engine, images: list, tta: bool) -> np.ndarray:
    emb = engine.embed_images(images)
    if tta:  # average with the mirrored image's embedding, then renormalise
        from PIL import ImageOps

        emb = emb + engine.embed_images([ImageOps.mirror(i) for i in images])
        emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    return emb


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


def album_answers(engine, albums: list, tta: bool = False, region=None, spread_km: float | None = None):
    """albums: [(name or None, [paths])] -> yield (name, answer dict or None, [(path, error)]), in order,
    in batches of about BATCH photos. A photo that cannot be read is left out of its album (and named);
    an album with no readable photo has no answer."""
    from embed.images import ImageFailure, open_rgb
    from geovote.csvsafe import printable

    size = engine.backbone.image_size
    start = 0
    while start < len(albums):
        batch, n = [], 0
        while start < len(albums) and (not batch or n + len(albums[start][1]) <= BATCH):
            batch.append(albums[start])
            n += len(albums[start][1])
            start += 1
        imgs, names, groups, errors = [], [], [], []
        for _, paths in batch:
            rows, bad = [], []
            for p in paths:
                try:
                    imgs.append(open_rgb(p, size))
                except ImageFailure as e:
                    bad.append((p, str(e)))
                    continue
                rows.append(len(imgs) - 1)
                names.append(printable(str(p)))
            groups.append(rows)
            errors.append(bad)
        answered = [g for g in groups if g]
        results = iter(answers_for_albums(engine, imgs, answered, names, tta, region, spread_km)
                       if answered else [])
        for (name, _), rows, bad in zip(batch, groups, errors):
            answer = next(results) if rows else None
            if answer is not None and name is not None:
                answer = {"album": name, **answer}
            yield name, answer, bad


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
