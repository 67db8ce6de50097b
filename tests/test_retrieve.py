"""retrieve.query and retrieve.tune end to end through main([...]) on the small sample."""
import json
import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from embed.build import main as embed_main
from geovote.data import read_split
from retrieve.engine import Engine, load_params
from retrieve.predict import VoteConfig, cell_table
from retrieve.query import main as query_main
from retrieve.tune import main as tune_main


@pytest.fixture()
def built(tiny_engine):
    return tiny_engine


def test_query_json_answers_every_image_and_names_the_bad_one(sample_root, built, tmp_path, capsys):
    imgs = sorted((sample_root / "images" / "test").rglob("*.jpg"))[:3]
    bad = tmp_path / "bad.jpg"
    bad.write_text("no")
    rc = query_main([str(imgs[0]), str(bad), str(imgs[1]), str(imgs[2]), "--index", str(built / "index"),
                     "--json"])
    cap = capsys.readouterr()
    assert rc == 1
    assert cap.err.strip() == f"error: {bad}: not an image PIL can read"
    lines = [json.loads(x) for x in cap.out.strip().splitlines()]
    assert [x["image"] for x in lines] == [str(p) for p in imgs]
    for x in lines:
        assert set(x) == {"image", "latitude", "longitude", "confidence", "calibrated", "within_km", "radius_km",
                          "expected_geoscore", "kind", "far_pick", "country", "region", "sub_region", "city",
                          "candidates"}
        assert -90 <= x["latitude"] <= 90 and 0 <= x["confidence"] <= 1 and len(x["country"]) == 2
        assert x["candidates"][0] == {"latitude": x["latitude"], "longitude": x["longitude"],
                                      "score": x["confidence"]}
        # the engine was tuned, so calibrated: confidence is P(within 200 km), probabilities grow with the
        # distance, the answer's score is the highest, and the 90% radius sits where the levels say
        assert x["calibrated"] and list(x["within_km"]) == ["1", "25", "200", "750", "2500"]
        p = list(x["within_km"].values())
        assert x["confidence"] == x["within_km"]["200"] and p == sorted(p) and 0 <= p[0] and p[-1] <= 1
        # its expected GeoScore is that of its own distribution (the choice: test_calibration, below)
        from retrieve.calibrate import expected_weights

        a, b = expected_weights()
        assert x["expected_geoscore"] == pytest.approx(float(np.dot(a, p) + b), abs=0.5)  # both rounded
        assert x["kind"] in ("peak", "runner_up", "far_pick", "neighbour") and x["far_pick"] == (x["kind"] == "far_pick")
        levels = [1, 25, 200, 750, 2500]
        above = [km for km, q in zip(levels, p) if q >= 0.9]
        below = [km for km, q in zip(levels, p) if q < 0.9]
        assert (not above or x["radius_km"] <= above[0]) and (not below or x["radius_km"] > below[-1])


def test_query_for_people_and_folders(sample_root, built, capsys):
    folder = sample_root / "images" / "test" / "00"
    assert query_main([str(folder), "--index", str(built / "index"), "--top", "2", "--json"]) == 0
    answers = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert query_main([str(folder), "--index", str(built / "index"), "--top", "2"]) == 0
    out = capsys.readouterr().out
    images = sorted(folder.glob("*.jpg"))
    assert [a["image"] for a in answers] == [str(p) for p in images]
    # each image's first line for people says what --json says, rounded for reading
    heads = [line for line in out.splitlines() if not line.startswith(" ")]
    assert len(heads) == len(images)
    for line, a in zip(heads, answers):
        assert line.startswith(f"{a['image']}: {a['latitude']:.5f}, {a['longitude']:.5f}  near ")
        assert line.endswith(f"({a['confidence']:.0%} probability within 200 km; 90% within "
                             f"{a['radius_km']:,.0f} km)")
    assert out.count("https://www.openstreetmap.org/?mlat=") == len(images)


def test_query_refuses_a_missing_index(tmp_path, capsys):
    assert query_main(["x.jpg", "--index", str(tmp_path / "none")]) == 2
    assert "no index at" in capsys.readouterr().err
    assert query_main(["x.jpg"]) == 2  # the default engine (GEOVOTE_DATA's sample) was never built
    assert "build it first with `python -m embed.build`" in capsys.readouterr().err


def test_split_predictions_are_scored_by_benchmark_score(sample_root, built, tmp_path, capsys):
    from benchmark.score import main as score_main

    out = tmp_path / "pred.parquet"
    assert query_main(["--split", "test", "--data", str(sample_root), "--index", str(built / "index"),
                       "--out", str(out)]) == 0
    t = pq.read_table(out)
    assert t.column_names == ["id", "latitude", "longitude", "confidence", "radius_km", "within_1km", "within_25km",
                              "within_200km", "within_750km", "within_2500km", "expected_geoscore",
                              "kind"] and t.num_rows == len(read_split(sample_root, "test", check_images=False))
    np.testing.assert_array_equal(t.column("confidence").to_numpy(), t.column("within_200km").to_numpy())
    assert set(t.column("kind").to_pylist()) <= {"peak", "runner_up", "far_pick", "neighbour"}
    # the same answers as the engine gives the image files themselves (their embeddings stored as the
    # shards store them, in fp16: the tiny model's ties would otherwise reorder some neighbours)
    from embed.images import open_rgb

    split = read_split(sample_root, "test")
    engine = Engine(built / "index")
    emb = engine.embed_images([open_rgb(p, 32) for p in split.image_paths()]).astype(np.float16)
    pred, _ = engine.locate(emb.astype(np.float32))
    pos = {i: j for j, i in enumerate(t.column("id").to_pylist())}
    order = [pos[i] for i in split.ids.astype(str)]
    np.testing.assert_allclose(t.column("latitude").to_numpy()[order], pred.lat_deg, atol=1e-9)
    np.testing.assert_allclose(t.column("longitude").to_numpy()[order], pred.lon_deg, atol=1e-9)
    np.testing.assert_allclose(t.column("confidence").to_numpy()[order], pred.confidence, atol=1e-9)
    # and benchmark.score's GeoScore is the formula, by hand
    capsys.readouterr()
    assert score_main([str(out), "--truth", str(sample_root / "test.csv"), "--json"]) == 0
    plat, plon = t.column("latitude").to_numpy()[order], t.column("longitude").to_numpy()[order]
    by_hand = np.mean([5000 * math.exp(-_haversine(a, b, c, d) / 1492.7)
                       for a, b, c, d in zip(plat, plon, split.lat_deg, split.lon_deg)])
    assert json.loads(capsys.readouterr().out)["geoscore"] == pytest.approx(by_hand, rel=1e-9)


def _haversine(lat1, lon1, lat2, lon2):
    p1, p2 = math.radians(lat1), math.radians(lat2)
    a = math.sin((p2 - p1) / 2) ** 2 + math.cos(p1) * math.cos(p2) * math.sin(math.radians(lon2 - lon1) / 2) ** 2
    return 2 * 6371.0 * math.asin(math.sqrt(a))


def test_tune_stores_parameters_the_engine_then_uses(sample_root, built, capsys):
    assert tune_main(["--index", str(built / "index"), "--data", str(sample_root)]) == 0
    out = capsys.readouterr().out
    assert "voting: GeoScore" in out and "1-nn: GeoScore" in out
    saved = json.loads((built / "index" / "retrieve.json").read_text())
    n_val = len(read_split(sample_root, "val", check_images=False))
    assert saved["validation"]["images"] == n_val and saved["trials"] > 100
    engine = Engine(built / "index")
    assert engine.params == load_params(built / "index" / "retrieve.json")
    # the engine, answering val with what tune chose, scores what tune recorded
    from geovote.metrics import mean_geoscore
    from retrieve.embedded import embed_for_eval

    _, lat, lon, emb = embed_for_eval(engine, sample_root, "val")
    raw, _ = engine.locate(emb, calibrated=False)
    assert mean_geoscore(raw.lat_deg, raw.lon_deg, lat, lon) == pytest.approx(
        saved["validation"]["chosen voting"]["geoscore"], rel=1e-6)
    # the one decision: fitted on val and the far places of val_far; every answer is the candidate of the
    # engine's table whose expected GeoScore, integrated here numerically from its probabilities, is highest
    assert engine.calibration is not None and engine.calibration.fitted_on == "val + val_far"
    pred, _ = engine.locate(emb)
    table, _ = engine.candidates(emb)
    within = engine.calibration.within(table.features)
    knots = np.log1p([0.0, 1, 25, 200, 750, 2500, np.pi * 6371.0])
    u = np.linspace(0, knots[-1], 20001)
    g = 5000 * np.exp(-np.expm1((u[1:] + u[:-1]) / 2) / 1492.7)
    expected = np.full(table.present.shape, -np.inf)
    for q, c in zip(*np.nonzero(table.present)):
        expected[q, c] = np.sum(np.diff(np.interp(u, knots, [0.0, *within[q, c], 1.0])) * g)
    best = np.argmax(expected, axis=1)
    close = np.sort(expected, axis=1)[:, -2] > expected[np.arange(len(best)), best] - 0.5  # near-ties: either
    np.testing.assert_array_equal(pred.lat_deg[~close], table.lat_deg[~close, best[~close]])
    for q in np.flatnonzero(close):  # a near-tie: the answer is one of the candidates within 0.5 of the best
        tied = expected[q] > expected[q, best[q]] - 0.5
        assert np.any((table.lat_deg[q, tied] == pred.lat_deg[q]) & (table.lon_deg[q, tied] == pred.lon_deg[q]))
    # the cross-fitted answers' scores on both tuning sets are recorded
    assert {"answer on val", "answer on val_far"} <= set(saved["validation"])
    _, far_lat, far_lon, far_emb = embed_for_eval(engine, sample_root, "val_far")
    # the far pick's weights: those of the highest GeoScore on val_far, recomputed through the engine
    weights, p = saved["far_pick"]["weights"], saved["params"]
    assert weights[f"T={p['far_temperature']}, power={p['far_density_power']}"] == max(weights.values())
    far, _ = engine.locate(far_emb, params=replace(engine.params, n_alternatives=0), calibrated=False)
    table, _ = engine.candidates(far_emb)
    kinds = table.kind
    fp = np.flatnonzero(kinds[0] == 2)[0]  # the far pick's column
    assert mean_geoscore(table.lat_deg[:, fp], table.lon_deg[:, fp], far_lat, far_lon) == pytest.approx(
        max(weights.values()), rel=1e-6)
    assert tune_main(["--index", str(built / "index"), "--split", "test"]) == 2
    assert tune_main(["--index", str(built / "index"), "--split", "test_far"]) == 2


def test_retrieve_json_with_an_unknown_key_is_refused_by_name(built, tmp_path, capsys):
    import shutil

    from geovote.config import ConfigError

    index = tmp_path / "index"
    shutil.copytree(built / "index", index)
    path = index / "retrieve.json"
    stored = json.loads(path.read_text()) if path.exists() else {"params": {}}
    stored["params"]["neighbours"] = 30  # a typo of a real setting must not be dropped silently
    path.write_text(json.dumps(stored))
    with pytest.raises(ConfigError, match=r"retrieve.json params: unknown key 'neighbours'"):
        Engine(index)
    assert query_main(["x.jpg", "--index", str(index)]) == 2
    assert "unknown key 'neighbours'" in capsys.readouterr().err


def test_cell_tables():
    lat = np.array([10.0, 10.01, -40.0])
    lon = np.array([20.0, 20.01, 170.0])
    h3 = cell_table(lat, lon, VoteConfig(cells="h3", levels=(1, 3)))
    assert h3.shape == (3, 2) and h3[0, 0] == h3[1, 0] and h3[0, 0] != h3[2, 0]
    qt = cell_table(np.repeat(lat, 50), np.repeat(lon, 50), VoteConfig(cells="quadtree", levels=(1, 2),
                                                                           quadtree_max_points=10))
    assert qt.shape == (150, 2)
    with pytest.raises(ValueError, match="cells must be one of h3, quadtree"):
        cell_table(lat, lon, VoteConfig(cells="s2"))


@pytest.mark.slow
def test_without_val_split_tuning_holds_train_images_out_of_their_own_search(sample_root, tiny_model, tmp_path,
                                                                             capsys):
    import shutil

    from geovote.geo import haversine_km
    from retrieve.tuning import carve_from_train

    data = tmp_path / "noval"
    data.mkdir()
    shutil.copy(sample_root / "train.csv", data / "train.csv")
    shutil.copytree(sample_root / "images" / "train", data / "images" / "train")
    out = tmp_path / "engine"
    assert embed_main(["--data", str(data), "--model", str(tiny_model), "--out", str(out), "--workers", "0"]) == 0
    assert "no val split: tuning on 2,000 train images held out" in capsys.readouterr().out
    saved = json.loads((out / "index" / "retrieve.json").read_text())
    assert saved["validation"]["split"].startswith("train (held out")
    # no query keeps itself or anything within 1 km among its neighbours
    engine = Engine(out / "index")
    _, emb, lat, lon, exclude = carve_from_train(engine, data, n=300)
    res = exclude(engine.search(emb, 60))
    found = res.rows >= 0
    assert found.sum(1).min() >= 10
    d = haversine_km(res.lat_deg, res.lon_deg, lat[:, None], lon[:, None])
    assert np.all(d[found] >= 1.0)
    assert np.all(np.diff(np.where(found, res.similarity, -np.inf), axis=1)[found[:, 1:]] <= 1e-6)  # rank order kept
    # with a `sequence` column, neighbours from the query's own capture sequence are dropped too
    import csv

    seq_root = tmp_path / "seq"
    seq_root.mkdir()
    with open(data / "train.csv") as f, open(seq_root / "train.csv", "w", newline="") as g:
        reader = csv.DictReader(f)
        writer = csv.DictWriter(g, [*reader.fieldnames, "sequence"])
        writer.writeheader()
        seq = {}
        for i, row in enumerate(reader):
            seq[row["id"]] = f"s{i % 97}"  # 97 long sequences spread over the world
            writer.writerow({**row, "sequence": seq[row["id"]]})
    q_ids, emb, lat, lon, exclude = carve_from_train(engine, seq_root, n=300)
    res = exclude(engine.search(emb, 60))
    for q, row in zip(q_ids, res.ids):
        assert all(seq[i] != seq[q] for i in row if i)


def test_geojson_and_csv_for_map_tools(sample_root, built, tmp_path, capsys):
    """--format geojson: one FeatureCollection, valid by the `geojson` library (RFC 7946), a Point per
    image at [longitude, latitude] with what --json says; --format csv: the same answers as a table."""
    import csv as csvmod
    import io

    import geojson

    imgs = sorted((sample_root / "images" / "test").rglob("*.jpg"))[:4]
    index = str(built / "index")
    assert query_main([*map(str, imgs), "--index", index, "--json"]) == 0
    want = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert query_main([*map(str, imgs), "--index", index, "--format", "geojson"]) == 0
    text = capsys.readouterr().out
    fc = geojson.loads(text)
    assert fc.is_valid and fc["type"] == "FeatureCollection" and len(fc["features"]) == 4
    for f, a in zip(fc["features"], want):
        assert f["geometry"] == {"type": "Point", "coordinates": [a["longitude"], a["latitude"]]}
        assert f["properties"] == {k: a[k] for k in ("image", "country", "region", "sub_region", "city",
                                                      "confidence", "calibrated", "within_km", "radius_km",
                                                      "expected_geoscore", "kind", "far_pick", "candidates")}
    assert query_main([*map(str, imgs), "--index", index, "--format", "csv"]) == 0
    rows = list(csvmod.DictReader(io.StringIO(capsys.readouterr().out)))
    assert [r["image"] for r in rows] == [a["image"] for a in want]
    for r, a in zip(rows, want):
        assert float(r["latitude"]) == a["latitude"] and float(r["within_750km"]) == a["within_km"]["750"]
        assert float(r["radius_km"]) == a["radius_km"] and r["country"] == a["country"]
        assert float(r["expected_geoscore"]) == a["expected_geoscore"] and r["kind"] == a["kind"]
        assert r["far_pick"] == str(a["far_pick"])
    with pytest.raises(SystemExit):
        query_main([str(imgs[0]), "--index", index, "--json", "--format", "csv"])
    # a whole split as map points
    out = tmp_path / "test.geojson"
    assert query_main(["--split", "test", "--data", str(sample_root), "--index", index, "--out", str(out)]) == 0
    fc = geojson.loads(out.read_text())
    assert fc.is_valid and len(fc["features"]) == len(read_split(sample_root, "test", check_images=False))


def test_evidence_names_the_gallery_images_behind_an_answer(sample_root, built, capsys):
    img = sorted((sample_root / "images" / "test").rglob("*.jpg"))[0]
    assert query_main([str(img), "--index", str(built / "index"), "--json", "--evidence", "3"]) == 0
    a = json.loads(capsys.readouterr().out)
    engine = Engine(built / "index")
    from embed.images import open_rgb

    res = engine.search(engine.embed_images([open_rgb(img, engine.backbone.image_size)]), engine.params.k)
    assert [e["id"] for e in a["evidence"]] == list(res.ids[0][:3])
    for e in a["evidence"]:
        path = Path(e["path"])
        assert path.name == f"{e['id']}.jpg" and (sample_root / "images" / "train").resolve() in path.parents
    assert engine.gallery_image("../train") is None and engine.gallery_image("") is None
