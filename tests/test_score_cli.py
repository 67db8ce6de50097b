"""`python -m benchmark.score` against an independent computation of the OSV-5M formulas."""
import csv
import json
import math

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from benchmark.score import main
from geovote.metrics import SCORE_KEYS


def _truth(sample_root):
    with open(sample_root / "test.csv", newline="") as f:
        return list(csv.DictReader(f))


def _write_preds(path, rows):
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["id", "latitude", "longitude"])
        w.writerows(rows)


@pytest.fixture
def preds(sample_root, tmp_path):
    rng = np.random.default_rng(3)
    rows = []
    for r in _truth(sample_root):
        step = rng.choice([0.0, 0.05, 1.0, 5.0, 40.0])  # from exact to another continent
        lat = float(np.clip(float(r["latitude"]) + rng.normal(0, step), -90, 90))
        lon = (float(r["longitude"]) + rng.normal(0, step) + 180) % 360 - 180
        rows.append((r["id"], lat, lon))
    rows.reverse()  # order must not matter: the join is on id
    path = tmp_path / "preds.csv"
    _write_preds(path, rows)
    return path, rows


def _independent(truth, rows):
    """The formulas of OSV-5M's metrics, row by row with the math module and reverse_geocoder itself."""
    import reverse_geocoder

    pred = {i: (lat, lon) for i, lat, lon in rows}
    dists = []
    for r in truth:
        (plat, plon), tlat, tlon = pred[r["id"]], float(r["latitude"]), float(r["longitude"])
        p1, p2 = math.radians(plat), math.radians(tlat)
        a = (math.sin((p2 - p1) / 2) ** 2
             + math.cos(p1) * math.cos(p2) * math.sin(math.radians(tlon - plon) / 2) ** 2)
        dists.append(2 * 6371 * math.asin(math.sqrt(a)))
    out = {"n": len(dists), "geoscore": sum(5000 * math.exp(-d / 1492.7) for d in dists) / len(dists),
           "mean_km": sum(dists) / len(dists), "median_km": float(np.median(dists))}
    for radius in (1, 25, 200, 750, 2500):
        out[f"acc_{radius}km"] = sum(d < radius for d in dists) / len(dists)
    locs = reverse_geocoder.search([pred[r["id"]] for r in truth], mode=1, verbose=False)
    parts = {"country": ["cc"], "region": ["admin1", "cc"], "area": ["admin2", "admin1", "cc"],
             "city": ["name", "admin2", "admin1", "cc"]}
    columns = {"country": "unique_country", "region": "unique_region", "area": "unique_sub-region",
               "city": "unique_city"}
    for level, keys in parts.items():
        hits = [("_".join(loc[k] for k in keys)) == r[columns[level]] for loc, r in zip(locs, truth)]
        out[f"acc_{level}"] = sum(hits) / len(hits)
    return out


def test_score_reproduces_an_independent_computation(sample_root, preds, capsys):
    path, rows = preds
    assert main([str(path), "--truth", str(sample_root / "test.csv"), "--json"]) == 0
    got = json.loads(capsys.readouterr().out)
    want = _independent(_truth(sample_root), rows)
    assert set(SCORE_KEYS) <= set(got)
    for key in SCORE_KEYS:
        assert got[key] == pytest.approx(want[key], rel=1e-9, abs=1e-12), key
    assert got["n_country"] == len(rows)
    assert 0 < got["acc_country"] < 1 and 0 < got["acc_25km"] < got["acc_2500km"] <= 1


def test_table_output_and_parquet_input(sample_root, preds, tmp_path, capsys):
    path, rows = preds
    pq.write_table(pa.table({"id": [r[0] for r in rows], "latitude": [r[1] for r in rows],
                             "longitude": [r[2] for r in rows]}), tmp_path / "p.parquet")
    assert main([str(tmp_path / "p.parquet"), "--truth", str(sample_root / "test.csv")]) == 0
    text = capsys.readouterr().out
    assert "GeoScore" in text and "country accuracy" in text and f"{len(rows):,}" in text


def test_missing_rows_are_an_error_unless_subset(sample_root, preds, tmp_path, capsys):
    _, rows = preds
    _write_preds(tmp_path / "few.csv", rows[:50])
    truth = str(sample_root / "test.csv")
    assert main([str(tmp_path / "few.csv"), "--truth", truth]) == 2
    assert "have no prediction" in capsys.readouterr().err
    assert main([str(tmp_path / "few.csv"), "--truth", truth, "--subset", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["n"] == 50


@pytest.mark.parametrize("rows, message", [
    ([("no-such-id", 1.0, 2.0)], "not in"),
    ([("x", "nan", 2.0)], "out of range"),
    ([("x", 95.0, 2.0)], "out of range"),
    ([("x", "north", 2.0)], "cannot read"),
])
def test_bad_predictions_are_refused(sample_root, preds, tmp_path, capsys, rows, message):
    _, good = preds
    bad = [(rows[0][0] if rows[0][0] != "x" else good[0][0], *rows[0][1:])] + good[1:]
    _write_preds(tmp_path / "bad.csv", bad)
    assert main([str(tmp_path / "bad.csv"), "--truth", str(sample_root / "test.csv")]) == 2
    assert message in capsys.readouterr().err


def test_duplicate_ids_missing_columns_and_missing_files(sample_root, preds, tmp_path, capsys):
    _, good = preds
    truth = str(sample_root / "test.csv")
    _write_preds(tmp_path / "dup.csv", good + good[:1])
    assert main([str(tmp_path / "dup.csv"), "--truth", truth]) == 2
    assert "duplicate" in capsys.readouterr().err
    (tmp_path / "nocol.csv").write_text("id,lat,lon\na,1,2\n")
    assert main([str(tmp_path / "nocol.csv"), "--truth", truth]) == 2
    assert "lacks column(s) latitude, longitude" in capsys.readouterr().err
    assert main([str(tmp_path / "none.csv"), "--truth", truth]) == 2
    assert main([str(tmp_path / "dup.csv"), "--truth", str(tmp_path / "none.csv")]) == 2
