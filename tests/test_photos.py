"""A gallery from a folder of geotagged photos (embed.build --photos): real JPEGs and PNGs written with
real EXIF GPS blocks by Pillow, with photos lacking GPS, at (0, 0), out of range and unreadable."""
import csv
import json
import shutil

import numpy as np
import pytest
from PIL import Image

from geovote.photos import dms_to_deg, scan_photos


def _dms(value: float) -> tuple[float, float, float]:
    value = abs(value)
    d = int(value)
    m = int((value - d) * 60)
    return float(d), float(m), round((value - d - m / 60) * 3600, 4)


def _save(path, src, lat=None, lon=None, fmt="JPEG"):
    path.parent.mkdir(parents=True, exist_ok=True)
    exif = Image.Exif()
    if lat is not None:
        exif[0x8825] = {1: "N" if lat >= 0 else "S", 2: _dms(lat), 3: "E" if lon >= 0 else "W", 4: _dms(lon),
                        6: 120.0}  # an altitude, ignored
    with Image.open(src) as im:
        im.save(path, fmt, exif=exif)


@pytest.fixture(scope="module")
def photo_folder(sample_root, tmp_path_factory):
    """300 of the sample's real train images as geotagged photos in nested folders, plus the bad ones."""
    root = tmp_path_factory.mktemp("photos")
    with open(sample_root / "train.csv", newline="") as f:
        rows = list(csv.DictReader(f))[:300]
    truth = {}
    for i, r in enumerate(rows):
        src = next((sample_root / "images" / "train").rglob(f"{r['id']}.jpg"))
        fmt, ext = ("PNG", "png") if i % 10 == 0 else ("JPEG", "jpg")
        rel = f"trip{i % 3}/day{i % 7}/img_{i:04d}.{ext}"
        lat, lon = float(r["latitude"]), float(r["longitude"])
        _save(root / rel, src, lat, lon, fmt)
        truth[rel] = (lat, lon)
    src = next((sample_root / "images" / "train").rglob("*.jpg"))
    _save(root / "no_gps.jpg", src)
    _save(root / "zero.jpg", src, 0.0, 0.0)
    _save(root / "far_north.jpg", src, 95.0, 10.0)
    (root / "broken.jpg").write_bytes(b"not a jpeg at all")
    (root / "notes.txt").write_text("not a photo")
    _save(root / "from_csv.jpg", src)  # no GPS in EXIF: its coordinates come from the CSV
    (root / "coords.csv").write_text("path,latitude,longitude\nfrom_csv.jpg,-33.86,151.21\n")
    truth["from_csv.jpg"] = (-33.86, 151.21)
    return root, truth


def test_dms_with_references():
    assert dms_to_deg((48.0, 51.0, 29.4), "N") == pytest.approx(48 + 51 / 60 + 29.4 / 3600)
    assert dms_to_deg((2.0, 21.0, 5.0), b"W") == pytest.approx(-(2 + 21 / 60 + 5 / 3600))
    assert dms_to_deg((33.0, 52.0, 0.0), "S") < 0


def test_scan_reads_exif_and_rejects_with_reasons(photo_folder):
    root, truth = photo_folder
    split, rejected = scan_photos(root, root / "coords.csv")
    assert dict(rejected) == {"no_gps.jpg": "no GPS coordinates in its EXIF",
                              "zero.jpg": "GPS at (0, 0): a camera without a fix",
                              "far_north.jpg": "coordinates out of range",
                              "broken.jpg": "not an image Pillow can read (UnidentifiedImageError)"}
    got = dict(zip(split.ids, zip(split.lat_deg, split.lon_deg)))
    assert set(got) == set(truth)
    for rel, (lat, lon) in truth.items():  # DMS seconds to 4 decimals: within ~0.1 m
        assert got[rel] == pytest.approx((lat, lon), abs=1e-6)
    assert split.report.rows == 305 and split.report.valid == 301


def test_build_a_gallery_from_photos_and_query_it(photo_folder, tiny_model, tmp_path, capsys):
    from embed.build import main as embed_main
    from retrieve.engine import Engine
    from retrieve.query import main as query_main

    root, truth = photo_folder
    out = tmp_path / "engine"
    assert embed_main(["--photos", str(root), "--photos-csv", str(root / "coords.csv"), "--model", str(tiny_model),
                       "--out", str(out), "--workers", "0"]) == 0
    printed = capsys.readouterr().out
    assert "305 photos, 301 with coordinates, 4 left out" in printed
    with open(out / "rejects-photos.csv", newline="") as f:
        assert sorted(r["path"] for r in csv.DictReader(f)) == ["broken.jpg", "far_north.jpg", "no_gps.jpg",
                                                                "zero.jpg"]
    engine = Engine(out / "index")
    ids = np.char.decode(np.asarray(engine.index.ids), "utf-8")
    assert sorted(ids) == sorted(truth)
    lat = dict(zip(ids, np.asarray(engine.index.lat)))
    assert all(lat[i] == pytest.approx(truth[i][0], abs=1e-6) for i in ids)
    # tuned on photos held out of their own search (there is no val)
    tuned = json.loads((out / "index" / "retrieve.json").read_text())["validation"]
    assert engine.tuned and tuned["split"] == "train (held out of its own search)" and tuned["images"] == 301
    # a photo of the gallery finds itself among the most similar (the tiny random model ties some images),
    # and the evidence is the engine's nearest neighbours, each the file in the folder
    from embed.images import open_rgb

    rel = "trip1/day1/img_0001.jpg"
    assert query_main([str(root / rel), "--index", str(out / "index"), "--json", "--evidence", "5"]) == 0
    a = json.loads(capsys.readouterr().out)
    res = engine.search(engine.embed_images([open_rgb(root / rel, engine.backbone.image_size)]), 5)
    assert [e["id"] for e in a["evidence"]] == list(res.ids[0])
    assert rel in res.ids[0] and res.similarity[0][list(res.ids[0]).index(rel)] >= res.similarity[0][0] - 1e-3
    assert all(e["path"] == str((root / e["id"]).resolve()) for e in a["evidence"])
    assert engine.gallery_image("../" + root.name + "/" + rel) is None  # never outside the folder
    assert engine.gallery_image("coords.csv") is None  # in the folder, but not in the gallery


def test_photos_refused_clearly(tmp_path, capsys):
    from embed.build import main as embed_main

    assert embed_main(["--photos", str(tmp_path / "none")]) == 2
    assert "is not a folder of photos" in capsys.readouterr().err
    empty = tmp_path / "empty"
    empty.mkdir()
    shutil.copy(__file__, empty / "x.txt")
    assert embed_main(["--photos", str(empty), "--out", str(tmp_path / "e")]) == 2
    assert "0 usable rows" in capsys.readouterr().err


def test_a_changed_folder_is_refused_not_mixed(photo_folder, tiny_model, tmp_path, capsys):
    from embed.build import main as embed_main

    root, _ = photo_folder
    mine = tmp_path / "photos"
    shutil.copytree(root, mine, ignore=shutil.ignore_patterns("trip1", "trip2"))  # a smaller gallery
    out = tmp_path / "engine"
    args = ["--photos", str(mine), "--model", str(tiny_model), "--out", str(out), "--workers", "0",
            "--set", "tune=false"]
    assert embed_main(args) == 0
    assert embed_main(args) == 0  # the same folder again: nothing to redo
    shutil.copy(mine / "trip0" / "day0" / "img_0000.png", mine / "added.png")
    capsys.readouterr()
    assert embed_main(args) == 2
    assert "holds an earlier run with a different rows" in capsys.readouterr().err
