"""Several photos of one place (retrieve.album): the CDF reading and the groups by hand, a photo's
probabilities at any point against its own candidate table, an album of one photo as that photo's own
answer, an outlier's cost on the sample with the bundled model, and retrieve.query --together / --albums
end to end."""
import csv
import json

import numpy as np
import pytest

from embed.build import main as embed_main
from geovote.data import read_split
from geovote.geo import haversine_km
from geovote.metrics import geoscore
from retrieve.album import ALBUM_FEATURES, cdf_at, groups, photo_within
from retrieve.calibrate import FARTHEST_KM
from retrieve.candidates import FEATURES
from retrieve.engine import Engine
from retrieve.query import main as query_main


def test_cdf_reading_by_hand():
    within = np.array([0.1, 0.3, 0.6, 0.8, 0.9])  # at 1, 25, 200, 750, 2500 km
    r = np.array([0.0, -5.0, 1.0, 25.0, 2500.0, FARTHEST_KM, 1e6])
    np.testing.assert_allclose(cdf_at(within, r), [0, 0, 0.1, 0.3, 0.9, 1.0, 1.0])
    # between two levels: linear in log(1 + d)
    d = 100.0
    t = (np.log1p(d) - np.log1p(25)) / (np.log1p(200) - np.log1p(25))
    assert cdf_at(within, np.array([d]))[0] == pytest.approx(0.3 + t * 0.3)
    # below 1 km: from 0 at 0 km
    assert cdf_at(within, np.array([0.5]))[0] == pytest.approx(0.1 * np.log1p(0.5) / np.log1p(1.0))
    # batch dimensions broadcast: two CDFs, each read at its own radii
    two = np.stack([within, np.full(5, 0.5)])
    np.testing.assert_allclose(cdf_at(two, np.array([[25.0, 750.0], [1.0, 2500.0]])), [[0.3, 0.8], [0.5, 0.5]])


def test_groups_are_the_rows_of_each_sequence_in_order_of_first_appearance():
    seq = np.array(["b", "", "a", "b", "c", "a", "", "b"])
    got = groups(seq)
    want = {}
    for i, s in enumerate(seq):  # by hand
        if s:
            want.setdefault(s, []).append(i)
    assert [g.tolist() for g in got] == list(want.values())
    assert groups(np.array(["", ""])) == []
    # a blank CSV cell reads as null: no sequence, not one called "None"
    assert [g.tolist() for g in groups(np.array([None, "a", None, "a"], dtype=object))] == [[1, 3]]


@pytest.fixture(scope="module")
def default_engine(sample_root, tmp_path_factory):
    """The small sample indexed with the bundled model: answers that mean something (val tuned, with
    its 20 sequences and val_far's 10 the album model's tuning albums)."""
    out = tmp_path_factory.mktemp("default-engine")
    assert embed_main(["--data", str(sample_root), "--out", str(out), "--workers", "0"]) == 0
    return out


@pytest.mark.slow
def test_tuning_fits_an_album_model_on_the_sequences(default_engine):
    saved = json.loads((default_engine / "index" / "retrieve.json").read_text())["albums"]
    assert saved["fitted"] and saved["albums"] == {"val": 20, "val_far": 10}
    # the spread of the best cross-fitted GeoScore over both sets' photos
    by = saved["geoscore_by_spread"]
    assert float(saved["spread_km"]) == float(max(by, key=lambda k: by[k]["all"]))
    engine = Engine(default_engine / "index")
    assert engine.albums.model is not None and engine.albums.model.features == list(ALBUM_FEATURES)
    assert engine.albums.spread_km == saved["spread_km"]


@pytest.mark.slow
def test_album_tuning_keeps_going_when_a_tuning_set_has_no_sequences(default_engine, sample_root):
    """val_far without a sequence column (or far train rows of which no two share one): the album model
    is fitted on val's albums alone, and the record says the far set had none."""
    from retrieve import tuning

    engine = Engine(default_engine / "index")
    main, far = tuning.tuning_sets(engine, sample_root, "val", 0, lambda *a: None)
    far.sequence = None
    tables = [tuning.candidate_rows(engine, engine.params, ts) for ts in (main, far)]
    _, crossfit = tuning.crossfit_scores(tables, (main.name, far.name), sequences=[main.sequence, None])
    got, record = tuning.tune_albums(tables, crossfit, (main, far), lambda *a: None)
    assert got.model is not None and record["albums"] == {"val": 20, "val_far": 0}
    assert set(record["geoscore_by_spread"]["0"]) == {"val", "all"}


@pytest.mark.slow
def test_a_photo_asked_about_its_own_neighbour_has_that_candidates_features(default_engine, sample_root):
    """Candidates.features_at computes a point's features as candidate_table does: asked about the
    places of a photo's own neighbour candidates, every feature but the rank (a foreign point ranks after
    all neighbours) is the table's own."""
    engine = Engine(default_engine / "index")
    split = read_split(sample_root, "test")
    emb = _embed(engine, split.image_paths()[:20])
    table, _ = engine.candidates(emb)
    neighbour = table.kind == 3
    rank = FEATURES.index("rank")
    others = [i for i in range(len(FEATURES)) if i != rank]
    checked = 0
    for q in range(len(emb)):
        cols = np.flatnonzero(neighbour[q])
        got = table.features_at(np.array([q]), table.lat_deg[q, cols], table.lon_deg[q, cols])[0]
        np.testing.assert_allclose(got[:, others], table.features[q, cols][:, others], rtol=1e-12)
        assert (got[:, rank] == engine.params.k).all()
        checked += len(cols)
    assert checked >= 40
    # photo_within: a photo's own candidates keep their own probabilities; another photo's points are
    # asked of the model
    within = engine.calibration.within(table.features)
    rows = np.array([0, 1])
    pts = np.concatenate([table.lat_deg[0][table.present[0]], table.lat_deg[1][table.present[1]]])
    lon = np.concatenate([table.lon_deg[0][table.present[0]], table.lon_deg[1][table.present[1]]])
    own = np.concatenate([np.full(table.present[0].sum(), 0), np.full(table.present[1].sum(), 1)])
    own_col = np.concatenate([np.flatnonzero(table.present[0]), np.flatnonzero(table.present[1])])
    p = photo_within(table, within, rows, pts, lon, own, own_col, [engine.calibration])
    np.testing.assert_array_equal(p[0, own == 0], within[0][table.present[0]])
    np.testing.assert_array_equal(p[1, own == 1], within[1][table.present[1]])
    asked = engine.calibration.within(table.features_at(np.array([0]), pts[own == 1], lon[own == 1]))[0]
    np.testing.assert_array_equal(p[0, own == 1], asked)


def _sequences(sample_root, split="test"):
    s = read_split(sample_root, split, columns=["sequence"])
    seq = s.column("sequence").astype(str)
    return s, [g for g in groups(seq) if len(g) > 1]


def _embed(engine, paths):
    from embed.images import open_rgb

    return engine.embed_images([open_rgb(p, engine.backbone.image_size) for p in paths])


@pytest.mark.slow
def test_an_album_of_one_photo_is_that_photos_own_answer(default_engine, sample_root):
    engine = Engine(default_engine / "index")
    s = read_split(sample_root, "test")
    emb = _embed(engine, s.image_paths()[:12])
    got, _ = engine.locate_albums(emb, [np.array([i]) for i in range(12)])
    alone, _ = engine.locate(emb)
    np.testing.assert_array_equal(got.joint.lat_deg, alone.lat_deg)
    np.testing.assert_array_equal(got.joint.lon_deg, alone.lon_deg)
    np.testing.assert_array_equal(got.joint.within_km, alone.within_km)
    assert got.calibrated.all()
    # its agreement is its own answer's probability within 200 km + the spread (read off its CDF)
    want = cdf_at(alone.within_km, np.full((12, 1), 200 + engine.albums.spread_km))[:, 0]
    np.testing.assert_allclose(np.concatenate(got.agreement), want)


@pytest.mark.slow
def test_a_photo_of_another_continent_costs_an_album_at_most_2_percent(default_engine, sample_root):
    """The sample's test sequences, answered with and without a photo taken over 5,000 km away added
    (a test_far view): the albums' mean GeoScore against their own photos' places drops at most 2%, and
    the added photo agrees least with the answer wherever the album's own photos agree with it."""
    engine = Engine(default_engine / "index")
    s, albums = _sequences(sample_root)
    far = read_split(sample_root, "test_far")
    emb = _embed(engine, s.image_paths())
    far_emb = _embed(engine, far.image_paths()[:200])
    rng = np.random.default_rng(0)
    added = []
    for rows in albums:
        a_lat, a_lon = s.lat_deg[rows].mean(), s.lon_deg[rows].mean()
        away = np.flatnonzero(haversine_km(far.lat_deg[:200], far.lon_deg[:200], a_lat, a_lon) > 5000)
        added.append(rng.choice(away))
    n = len(emb)
    all_emb = np.concatenate([emb, far_emb])
    plain, _ = engine.locate_albums(all_emb, [np.asarray(r) for r in albums])
    spoiled, _ = engine.locate_albums(all_emb, [np.append(r, n + j) for r, j in zip(albums, added)])

    def score(pred):
        return np.mean([geoscore(haversine_km(pred.lat_deg[i], pred.lon_deg[i], s.lat_deg[r], s.lon_deg[r])).mean()
                        for i, r in enumerate(albums)])

    base, worse = score(plain.joint), score(spoiled.joint)
    assert worse >= 0.98 * base, (base, worse)
    # where the album's own photos agree with its answer, the added photo agrees least, every time
    agreed = [a for a in spoiled.agreement if a[:-1].mean() >= 0.5]
    assert len(agreed) >= len(albums) // 2
    assert all(a[-1] < a[:-1].min() for a in agreed)


@pytest.mark.slow
def test_query_together_and_albums_end_to_end(default_engine, sample_root, tmp_path, capsys):
    """--together answers the photos given once, as Engine.locate_albums does; --albums answers each
    album of a CSV as --together would; a photo that cannot be read is named and left out; a CSV without
    the columns is refused."""
    s, albums = _sequences(sample_root)
    index = str(default_engine / "index")
    paths = s.image_paths()
    first = [str(paths[i]) for i in albums[0]]
    assert query_main([*first, "--together", "--json", "--index", index]) == 0
    answer = json.loads(capsys.readouterr().out)
    engine = Engine(default_engine / "index")
    got, _ = engine.locate_albums(_embed(engine, first), [np.arange(len(first))])
    assert answer["images"] == first and len(answer["photos"]) == len(first)
    assert (answer["latitude"], answer["longitude"]) == (round(float(got.joint.lat_deg[0]), 6),
                                                          round(float(got.joint.lon_deg[0]), 6))
    assert answer["within_km"]["200"] == round(float(got.joint.within_km[0, 2]), 4) == answer["confidence"]
    assert answer["calibrated"] and answer["spread_km"] == engine.albums.spread_km
    assert answer["best_single_within_200km"] == max(p["confidence"] for p in answer["photos"])
    assert [p["agreement"] for p in answer["photos"]] == [round(float(a), 4) for a in got.agreement[0]]
    # albums from a CSV, paths relative to it, one with an unreadable photo
    bad = tmp_path / "bad.jpg"
    bad.write_text("no")
    table = tmp_path / "albums.csv"
    with open(table, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["album", "image"])
        for name, rows in (("one", albums[0]), ("two", albums[1])):
            for i in rows:
                w.writerow([name, str(paths[i])])
        w.writerow(["two", "bad.jpg"])
    assert query_main(["--albums", str(table), "--json", "--index", index]) == 1  # a photo failed
    cap = capsys.readouterr()
    lines = [json.loads(line) for line in cap.out.splitlines()]
    assert [a["album"] for a in lines] == ["one", "two"]
    assert lines[0]["latitude"] == answer["latitude"] and lines[0]["within_km"] == answer["within_km"]
    assert len(lines[1]["images"]) == len(albums[1]) and f"{bad}: not an image PIL can read (album two)" in cap.err
    # the same albums as a CSV document and a GeoJSON one
    assert query_main(["--albums", str(table), "--format", "csv", "--index", index]) == 1
    rows = list(csv.DictReader(capsys.readouterr().out.splitlines()))
    assert [r["album"] for r in rows] == ["one", "two"] and float(rows[0]["latitude"]) == answer["latitude"]
    assert rows[0]["images"].split(";") == first and len(rows[0]["agreement"].split(";")) == len(first)
    out = tmp_path / "albums.geojson"
    assert query_main(["--albums", str(table), "--out", str(out), "--index", index]) == 1
    fc = json.loads(out.read_text())
    assert [f["properties"]["album"] for f in fc["features"]] == ["one", "two"]
    assert fc["features"][0]["geometry"]["coordinates"] == [answer["longitude"], answer["latitude"]]
    # another spread than the album model was fitted with: answered, but not called calibrated
    other = engine.albums.spread_km + 50
    assert query_main([*first, "--together", "--json", "--spread-km", str(other), "--index", index]) == 0
    wider = json.loads(capsys.readouterr().out)
    assert wider["spread_km"] == other and wider["calibrated"] is False
    # a CSV saved by a spreadsheet (a byte order mark) reads the same
    bom = tmp_path / "bom.csv"
    bom.write_bytes(b"\xef\xbb\xbf" + table.read_bytes())
    assert query_main(["--albums", str(bom), "--json", "--index", index]) == 1
    assert [json.loads(line)["album"] for line in capsys.readouterr().out.splitlines()] == ["one", "two"]
    # refusals
    (tmp_path / "cols.csv").write_text("name,image\na,b.jpg\n")
    assert query_main(["--albums", str(tmp_path / "cols.csv"), "--index", index]) == 2
    assert "needs the columns album and image (missing: album)" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        query_main(["--albums", str(table), first[0], "--index", index])
    with pytest.raises(SystemExit):
        query_main([*first, "--together", "--spread-km", "-1", "--index", index])
