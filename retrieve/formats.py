"""Answers in the formats map tools read: GeoJSON (RFC 7946: QGIS, kepler.gl, geojson.io, Google Earth
via import) and CSV.

    feature_collection(answers)   -> a FeatureCollection: one Point per photo at [longitude, latitude],
                                     properties: image, place names, confidence, within_km, radius_km,
                                     expected_geoscore, kind, far_pick, candidates
    csv_text(answers)             -> one row per photo (within_km flattened to within_<d>km columns, the
                                     evidence as a JSON list in one cell; text cells made safe for
                                     spreadsheets by geovote.csvsafe)

`retrieve.query --format geojson|csv` writes them.
"""
from __future__ import annotations

import csv
import io
import json

from geovote import csvsafe
from retrieve.calibrate import LEVELS_KM

PLACE_KEYS = ("country", "region", "sub_region", "city")


def feature(answer: dict) -> dict:
    props = {k: answer[k] for k in ("image", "album", "images", *PLACE_KEYS, "confidence", "calibrated",
                                    "within_km", "radius_km", "expected_geoscore", "kind", "far_pick",
                                    "candidates", "evidence", "spread_km", "best_single_within_200km",
                                    "photos")
             if k in answer}
    return {"type": "Feature",
            "geometry": {"type": "Point", "coordinates": [answer["longitude"], answer["latitude"]]},
            "properties": props}


def feature_collection(answers: list[dict]) -> dict:
    return {"type": "FeatureCollection", "features": [feature(a) for a in answers]}


def geojson_text(answers: list[dict]) -> str:
    return json.dumps(feature_collection(answers), allow_nan=False)


CSV_COLUMNS = ("image", "latitude", "longitude", *PLACE_KEYS, "confidence", "radius_km",
               *(f"within_{km}km" for km in LEVELS_KM), "expected_geoscore", "kind", "far_pick", "evidence")


# albums (retrieve.query --together/--albums): one row per album, its photos and their agreement as lists
ALBUM_CSV_COLUMNS = ("album", "images", "latitude", "longitude", *PLACE_KEYS, "confidence", "calibrated",
                     "radius_km", *(f"within_{km}km" for km in LEVELS_KM), "expected_geoscore", "kind",
                     "spread_km", "best_single_within_200km", "agreement")


def csv_text(answers: list[dict]) -> str:
    """One row per answer; albums (answers with `images`) in ALBUM_CSV_COLUMNS, photos in CSV_COLUMNS."""
    buf = io.StringIO()
    w = csv.writer(buf)
    albums = any("images" in a for a in answers)
    columns = ALBUM_CSV_COLUMNS if albums else CSV_COLUMNS
    w.writerow(columns)
    for a in answers:
        within = a.get("within_km") or {}
        evidence = [{k: csvsafe.printable(v) if isinstance(v, str) else v for k, v in e.items()}
                    for e in a.get("evidence") or []]  # gallery images, nearest first: one JSON list
        row = {**a, **{f"within_{km}km": within.get(str(km)) for km in LEVELS_KM},
               "evidence": json.dumps(evidence, ensure_ascii=False) if evidence else None}
        if albums:  # the photos in one cell each, in the same order: image;image and agreement;agreement
            row |= {"images": ";".join(csvsafe.printable(i) for i in a["images"]),
                    "agreement": ";".join(str(p["agreement"]) for p in a["photos"])}
        w.writerow(csvsafe.row(row.get(c) for c in columns))
    return buf.getvalue()
