"""Region constraints (--within, --bbox, the form fields): parsing, the filtered search against brute
force, answers inside, and the sample's country accuracy with the true country given."""
import json

import numpy as np
import pytest

from geovote.geo import haversine_km
from retrieve.region import Region, RegionError, parse_region


@pytest.mark.parametrize("within, bbox, message", [
    ("ZZ", None, "unknown country codes ZZ"),
    ("UK", None, "GB not UK"),
    ("FRA", None, "ISO 3166 alpha-2"),
    (None, "1,2,3", "four numbers"),
    (None, "10,0,5,20", "south (10) must be below north (5)"),
    (None, "0,200,10,210", "longitudes must be within"),
    (None, "0,5,10,5", "empty box"),
    (None, "nan,0,1,1", "not finite"),
    ("", None, "names no country"),  # given but empty: refused, not answered from anywhere
    (",", None, "names no country"),
    (" , ", None, "names no country"),
    (None, "", "four numbers"),
])
def test_bad_regions_are_refused_with_a_reason(within, bbox, message):
    with pytest.raises(RegionError, match=message.replace("(", r"\(").replace(")", r"\)")):
        parse_region(within, bbox)


def test_regions_parse_and_contain_by_hand():
    r = parse_region(" fr, DE ,fr", "40,-10,55,20")
    assert r.countries == ("FR", "DE") and r.bbox == (40, -10, 55, 20)
    assert not parse_region(None, None)
    # a box across the antimeridian: 170E .. 170W
    box = parse_region(None, "-30,170,10,-170")
    np.testing.assert_array_equal(box.in_box([-17, -17, -17, 20, 0], [178, -175, 0, 178, 169.9]),
                                  [True, True, False, False, False])
    paris, berlin, rome = (48.85, 2.35), (52.52, 13.40), (41.90, 12.50)
    inside = Region(("FR", "DE")).contains(*zip(paris, berlin, rome))
    np.testing.assert_array_equal(inside, [True, True, False])


def _index(tmp_path, n=60_000, dim=32, factory="IVF64,PQ8x4fs"):
    from geovote.shards import write_shard
    from index.build import build_index
    from index.search import GeoIndex

    rng = np.random.default_rng(0)
    centers = rng.normal(size=(50, dim))
    emb = centers[rng.integers(0, 50, n)] + 0.5 * rng.normal(size=(n, dim))
    emb = (emb / np.linalg.norm(emb, axis=1, keepdims=True)).astype(np.float16)
    shards = tmp_path / "shards"
    shards.mkdir()
    write_shard(shards / "shard-00000.parquet", [str(i) for i in range(n)], rng.uniform(-60, 60, n),
                rng.uniform(-180, 180, n), emb)
    (shards / "manifest.json").write_text(json.dumps({"dim": dim}))
    build_index(shards, tmp_path / "index", factory=factory, log=lambda *_: None)
    index = GeoIndex(tmp_path / "index")
    source = np.asarray(index.ids).astype(int)  # an IVF index numbers its rows list by list
    return index, emb[source].astype(np.float32), rng  # the vectors by index row


def test_subset_search_finds_only_the_subset_and_its_true_neighbours(tmp_path, monkeypatch):
    import index.search

    monkeypatch.setattr(index.search, "SUBSET_EXACT_MAX", 10_000)  # so that 55,000 rows take the IVF path
    index, emb, rng = _index(tmp_path)
    queries = emb[rng.choice(len(emb), 50, replace=False)] + 0.05 * rng.normal(size=(50, emb.shape[1]))
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    def recall(found, truth):
        return np.mean([len(set(a) & set(b)) / 10 for a, b in zip(found, truth)])

    # the unfiltered search's own recall on this toy PQ index is the bar a filtered search must meet
    full = recall(index.search(queries, k=10).rows, np.argsort(-(queries @ emb.T), axis=1)[:, :10])
    for size in (2_000, 55_000):  # exact among the rows, then FAISS's IVF scan with a selector
        rows = np.sort(rng.choice(len(emb), size, replace=False))
        sims = queries @ emb[rows].T  # brute force over the subset (vectors as stored, fp16)
        truth = rows[np.argsort(-sims, axis=1)[:, :10]]
        for shortlist in (None, 100):
            res = index.search(queries, k=10, subset=rows, shortlist=shortlist)
            assert np.isin(res.rows, rows).all()
            got = recall(res.rows, truth)
            if size == 2_000:
                assert got == 1.0
            else:
                assert got >= (0.95 if shortlist else full - 0.05), (size, shortlist, got, full)
    with pytest.raises(Exception, match="sorted, distinct"):
        index.search(queries, k=10, subset=np.array([5, 3]))


def test_a_large_subset_is_found_among_the_unrestricted_neighbours_or_searched_filtered(tmp_path,
                                                                                       monkeypatch):
    """Queries inside a large region take their region rows from the unrestricted top PREFILTER_FACTOR * k;
    queries outside it, with too few region rows there, fall back to the filtered search. Both are
    checked against brute force over the region."""
    import index.search

    monkeypatch.setattr(index.search, "PREFILTER_FROM", 1_000)
    index, emb, rng = _index(tmp_path)
    rows = np.flatnonzero(emb[:, 0] > 0)  # a "region" of about half the rows, contiguous in embedding space
    inside = rng.choice(rows, 40, replace=False)
    outside = rng.choice(np.flatnonzero(emb[:, 0] < -0.3), 40, replace=False)
    queries = emb[np.concatenate([inside, outside])] + 0.05 * rng.normal(size=(80, emb.shape[1]))
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    filtered = []
    real = index._filtered
    monkeypatch.setattr(index, "_filtered", lambda q, *a: filtered.append(len(q)) or real(q, *a))

    res = index.search(queries, k=10, subset=rows, shortlist=100)
    assert np.isin(res.rows, rows).all() and np.all(np.diff(res.similarity, axis=1) <= 0)
    truth = rows[np.argsort(-(queries @ emb[rows].T), axis=1)[:, :10]]
    got = np.array([len(set(a) & set(b)) / 10 for a, b in zip(res.rows, truth)])
    assert got[:40].mean() >= 0.95 and got[40:].mean() >= 0.95, (got[:40].mean(), got[40:].mean())
    # the inside queries were answered by the prefilter, every outside one by the filtered search
    assert len(filtered) == 1 and 40 <= filtered[0] < 80, filtered


def test_within_the_true_country_answers_inside_it_and_scores_higher(sample_root, tiny_engine):
    from geovote.data import read_split
    from geovote.metrics import mean_geoscore
    from retrieve.engine import Engine
    from retrieve.region import country_codes
    from retrieve.embedded import embed_for_eval

    engine = Engine(tiny_engine / "index")
    ids, lat, lon, emb = embed_for_eval(engine, sample_root, "test", workers=0, log=lambda *_: None)
    truth = read_split(sample_root, "test", columns=("unique_country",), check_images=False)
    cc = dict(zip(truth.ids.astype(str), truth.column("unique_country").astype(str)))
    true_cc = np.array([cc[i] for i in ids.astype(str)])
    free, _ = engine.locate(emb)
    plat, plon = free.lat_deg.copy(), free.lon_deg.copy()
    for c in np.unique(true_cc):
        rows = np.flatnonzero(true_cc == c)
        try:
            pred, res = engine.locate(emb[rows], region=Region((c,)))
        except RegionError:  # no training image in that country: the engine says so, and answers freely
            continue
        assert np.all(country_codes(pred.lat_deg, pred.lon_deg) == c)
        assert np.all(np.isin(country_codes(res.lat_deg[res.rows >= 0], res.lon_deg[res.rows >= 0]), [c]))
        plat[rows], plon[rows] = pred.lat_deg, pred.lon_deg
    covered = np.isin(true_cc, list(set(np.char.decode(np.unique(engine.countries()), "ascii"))))
    assert covered.mean() > 0.9
    assert np.all(country_codes(plat[covered], plon[covered]) == true_cc[covered])  # country accuracy 100%
    assert mean_geoscore(plat, plon, lat, lon) > mean_geoscore(free.lat_deg, free.lon_deg, lat, lon)


def test_query_and_server_regions(sample_root, tiny_engine, capsys):
    from fastapi.testclient import TestClient

    from retrieve.app import create_app
    from retrieve.engine import Engine
    from retrieve.query import main as query_main

    img = sorted((sample_root / "images" / "test").rglob("*.jpg"))[0]
    index = str(tiny_engine / "index")
    with pytest.raises(SystemExit):
        query_main([str(img), "--index", index, "--within", "ZZ"])
    assert "unknown country codes ZZ" in capsys.readouterr().err
    # the middle of the Pacific: no training image there
    assert query_main([str(img), "--index", index, "--bbox=-10,-150,-5,-140"]) == 2  # "=": S is negative
    assert "no training image of this engine lies in box -10,-150,-5,-140" in capsys.readouterr().err
    assert query_main([str(img), "--index", index, "--within", "FR", "--json"]) == 0
    a = json.loads(capsys.readouterr().out)
    assert a["country"] == "FR"
    box = "30,-20,60,30"
    assert query_main([str(img), "--index", index, "--bbox", box, "--json"]) == 0
    b = json.loads(capsys.readouterr().out)
    assert 30 <= b["latitude"] <= 60 and -20 <= b["longitude"] <= 30
    assert all(30 <= c["latitude"] <= 60 and -20 <= c["longitude"] <= 30 for c in b["candidates"])
    with TestClient(create_app(Engine(tiny_engine / "index")), base_url="http://127.0.0.1") as client:
        files = {"image": (img.name, img.read_bytes(), "image/jpeg")}
        r = client.post("/locate", files=files, data={"within": "FR"})
        assert r.status_code == 200 and r.json()["country"] == "FR"
        assert (r.json()["latitude"], r.json()["longitude"]) == (a["latitude"], a["longitude"])
        r = client.post("/locate", files=files, data={"within": "ZZ"})
        assert r.status_code == 400 and "unknown country codes ZZ" in r.json()["error"]
        r = client.post("/locate", files=files, data={"bbox": "-10,-150,-5,-140"})
        assert r.status_code == 422 and "no training image" in r.json()["error"]
    d = haversine_km(a["latitude"], a["longitude"], b["latitude"], b["longitude"])
    assert np.isfinite(d)


def test_exact_subset_search_in_blocks_equals_one_pass(monkeypatch):
    """Rows in blocks (memory bounded) give what one brute-force pass gives."""
    import index.exact
    from index.exact import exact_topk

    monkeypatch.setattr(index.exact, "BLOCK_ROWS", 500)  # six blocks to merge
    rng = np.random.default_rng(5)
    vectors = rng.normal(size=(5000, 16)).astype(np.float16)
    rows = np.sort(rng.choice(5000, 3000, replace=False))
    q = rng.normal(size=(257, 16)).astype(np.float32)
    sim, found = exact_topk(vectors, q, 7, rows=rows, device="cpu")
    full = q @ vectors[rows].astype(np.float32).T
    want = rows[np.argsort(-full, axis=1, kind="stable")[:, :7]]
    np.testing.assert_array_equal(found, want)
    np.testing.assert_allclose(sim, np.take_along_axis(full, np.argsort(-full, axis=1, kind="stable")[:, :7], 1),
                               rtol=1e-5)
    few, rows_few = exact_topk(vectors, q[:2], 5, rows=rows[:3], device="cpu")  # fewer rows than k: padded
    assert np.all(rows_few[:, 3:] == -1) and np.all(np.isinf(few[:, 3:]))


def test_region_rows_equal_a_scan_of_every_row(tiny_engine):
    """Rows of a region come from slices of the rows sorted by country: checked against testing each row."""
    from retrieve.engine import Engine

    engine = Engine(tiny_engine / "index")
    codes = np.asarray(engine.countries())
    lat, lon = np.asarray(engine.index.lat), np.asarray(engine.index.lon)
    common = [c.decode() for c, _ in sorted(zip(*np.unique(codes, return_counts=True)), key=lambda t: -t[1])[:3]]
    checked = 0
    for region in (Region((common[0],)), Region(tuple(common)), Region((common[1],), (-60, -180, 50, 20)),
                   Region((), (-30, 170, 10, -170))):
        expect = region.in_box(lat, lon)
        if region.countries:
            expect &= np.isin(codes, [c.encode() for c in region.countries])
        if expect.any():
            np.testing.assert_array_equal(engine.region_rows(region), np.flatnonzero(expect))
            checked += 1
    assert checked >= 3
