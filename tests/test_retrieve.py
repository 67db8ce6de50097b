"""retrieve.query and retrieve.tune end to end through main([...]) on the small sample."""
import json

import numpy as np
import pyarrow.parquet as pq
import pytest

from embed.build import main as embed_main
from retrieve.engine import Engine, RetrieveParams, cell_table
from retrieve.query import main as query_main
from retrieve.tune import main as tune_main


@pytest.fixture(scope="module")
def built(sample_root, tiny_model, tmp_path_factory):
    out = tmp_path_factory.mktemp("engine")
    assert embed_main(["--data", str(sample_root), "--model", str(tiny_model), "--out", str(out),
                       "--workers", "0"]) == 0
    return out


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
        assert set(x) == {"image", "latitude", "longitude", "confidence", "country", "region", "sub_region",
                          "city", "candidates"}
        assert -90 <= x["latitude"] <= 90 and 0 <= x["confidence"] <= 1 and len(x["country"]) == 2
        assert x["candidates"][0] == {"latitude": x["latitude"], "longitude": x["longitude"],
                                      "score": x["confidence"]}


def test_query_for_people_and_folders(sample_root, built, capsys):
    folder = sample_root / "images" / "test" / "00"
    assert query_main([str(folder), "--index", str(built / "index"), "--top", "2"]) == 0
    out = capsys.readouterr().out
    assert out.count("https://www.openstreetmap.org/?mlat=") == len(list(folder.glob("*.jpg")))
    assert "confidence" in out


def test_query_refuses_a_missing_index(tmp_path, capsys):
    assert query_main(["x.jpg", "--index", str(tmp_path / "none")]) == 2
    assert "no index folder" in capsys.readouterr().err


def test_split_predictions_are_scored_by_benchmark_score(sample_root, built, tmp_path, capsys):
    from benchmark.score import main as score_main

    out = tmp_path / "pred.parquet"
    assert query_main(["--split", "test", "--data", str(sample_root), "--index", str(built / "index"),
                       "--out", str(out)]) == 0
    t = pq.read_table(out)
    assert t.column_names == ["id", "latitude", "longitude", "confidence"] and t.num_rows == 200
    capsys.readouterr()
    assert score_main([str(out), "--truth", str(sample_root / "test.csv"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["geoscore"] > 0


def test_tune_stores_parameters_the_engine_then_uses(sample_root, built, capsys):
    assert tune_main(["--index", str(built / "index"), "--data", str(sample_root)]) == 0
    out = capsys.readouterr().out
    assert "voting: GeoScore" in out and "1-nn: GeoScore" in out
    saved = json.loads((built / "index" / "retrieve.json").read_text())
    assert saved["validation"]["images"] == 200 and saved["trials"] > 100
    engine = Engine(built / "index")
    assert engine.params == RetrieveParams.from_dict(saved["params"])
    assert tune_main(["--index", str(built / "index"), "--split", "test"]) == 2


def test_cell_tables():
    lat = np.array([10.0, 10.01, -40.0])
    lon = np.array([20.0, 20.01, 170.0])
    h3 = cell_table(lat, lon, RetrieveParams(cells="h3", levels=(1, 3)))
    assert h3.shape == (3, 2) and h3[0, 0] == h3[1, 0] and h3[0, 0] != h3[2, 0]
    qt = cell_table(np.repeat(lat, 50), np.repeat(lon, 50), RetrieveParams(cells="quadtree", levels=(1, 2),
                                                                           quadtree_max_points=10))
    assert qt.shape == (150, 2)
    with pytest.raises(ValueError, match="h3 or quadtree"):
        cell_table(lat, lon, RetrieveParams(cells="s2"))
