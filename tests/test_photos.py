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
    assert dms_to_deg((48.0, 51.0, 29.4), "N", "latitude") == pytest.approx(48 + 51 / 60 + 29.4 / 3600)
    assert dms_to_deg((2.0, 21.0, 5.0), b"W", "longitude") == pytest.approx(-(2 + 21 / 60 + 5 / 3600))
    assert dms_to_deg((33.0, 52.0, 0.0), " s\x00", "latitude") == -33 - 52 / 60  # padded, lower case
    assert dms_to_deg((33.0, 52.0, 0.0), b"e", "longitude") == 33 + 52 / 60


@pytest.mark.parametrize("dms,ref,axis,reason", [
    ((48.0, 51.0, 0.0), "South", "latitude", "latitude reference 'South' in its EXIF GPS is not N or S"),
    ((2.0, 21.0, 0.0), "West", "longitude", "longitude reference 'West' in its EXIF GPS is not E or W"),
    ((48.0, 51.0, 0.0), None, "latitude", "no latitude reference (N/S) in its EXIF GPS"),
    ((48.0, 51.0, 0.0), "X", "latitude", "latitude reference 'X' in its EXIF GPS is not N or S"),
    ((48.0, 51.0, 0.0), "W", "latitude", "latitude reference 'W' in its EXIF GPS is not N or S"),
    ((48.0, 51.0, 0.0), 83, "latitude", "latitude reference 83 in its EXIF GPS is not N or S"),  # a SHORT
    ((-32.0, 7.0, 48.0), "S", "latitude", "latitude in its EXIF GPS has a negative component"),
])
def test_gps_references_other_than_n_s_e_w_are_refused(dms, ref, axis, reason):
    with pytest.raises(ValueError) as e:
        dms_to_deg(dms, ref, axis)
    assert str(e.value).startswith(reason)


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
    assert "empty: no photos in it or its sub-folders (looked for jpg, jpeg, jpe, jfif, png" in capsys.readouterr().err
    assert not (tmp_path / "e").exists()


def test_a_bad_factory_is_refused_before_any_photo_is_embedded(photo_folder, tiny_model, tmp_path, capsys):
    from embed.build import main as embed_main

    root, _ = photo_folder
    assert embed_main(["--photos", str(root), "--model", str(tiny_model), "--out", str(tmp_path / "e"),
                       "--set", "index_factory=bogus"]) == 2
    assert "is not a FAISS factory string" in capsys.readouterr().err
    assert not (tmp_path / "e").exists()  # nothing embedded, no rejects file written


def _shard_vectors(folder):
    from geovote.shards import read_embeddings

    s = read_embeddings(folder, dtype=np.float16)
    return dict(zip(s.ids.astype(str), s.embedding))


def test_a_changed_folder_updates_the_engine_without_a_rebuild(photo_folder, tiny_model, tmp_path, capsys):
    """Photos added, removed and edited in place: a rerun embeds only the new and edited ones, keeps the
    index's training, and ends with exactly the vectors and search results of a build from scratch."""
    import faiss

    from embed.build import main as embed_main
    from index.search import GeoIndex

    root, _ = photo_folder
    mine = tmp_path / "photos"
    shutil.copytree(root, mine, ignore=shutil.ignore_patterns("trip2", "*.csv"))  # 200 of the 300
    out = tmp_path / "engine"
    args = ["--photos", str(mine), "--model", str(tiny_model), "--out", str(out), "--workers", "0",
            "--set", "tune=false", "--set", "index_factory=IVF4,Flat"]
    assert embed_main(args) == 0
    before = _shard_vectors(out / "embeddings" / "train")
    first = GeoIndex(out / "index")  # held: the quantizer below points into it
    centroids = faiss.downcast_index(faiss.extract_index_ivf(first.index).quantizer).reconstruct_n(0, 4)
    capsys.readouterr()
    assert embed_main(args) == 0  # the same folder again: nothing to redo
    assert "unchanged" not in capsys.readouterr().out

    shutil.copytree(root / "trip2", mine / "trip2")  # 100 added
    removed = sorted(p.relative_to(mine).as_posix() for p in (mine / "trip0").rglob("*.jpg"))[:7]
    for rel in removed:
        (mine / rel).unlink()
    edited = "trip1/day1/img_0001.jpg"  # the same path, another picture (and so another size)
    other = next(p for p in (root / "trip0").rglob("*.jpg") if p.name != "img_0001.jpg")
    with Image.open(other) as im:
        im.transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(mine / edited, "JPEG", exif=im.getexif(),
                                                           quality=60)
    capsys.readouterr()
    assert embed_main(args) == 0
    printed = capsys.readouterr().out
    assert ("192 of 293 images unchanged, 101 to embed (new, changed or failed before), 8 earlier ones "
            "dropped (removed or changed)") in printed, printed
    assert "its training for 200 kept" in printed

    after = _shard_vectors(out / "embeddings" / "train")
    fresh = tmp_path / "fresh"  # the same folder built from scratch
    assert embed_main(args[:5] + [str(fresh)] + args[6:]) == 0
    scratch = _shard_vectors(fresh / "embeddings" / "train")
    assert sorted(after) == sorted(scratch) and not set(removed) & set(after)
    for rel, vec in after.items():
        np.testing.assert_allclose(vec, scratch[rel], atol=2e-3)
        if rel in before and rel != edited:
            np.testing.assert_array_equal(vec, before[rel])  # kept, not embedded again
    assert np.abs(after[edited].astype(np.float32) - before[edited]).max() > 10 * 2e-3  # embedded anew

    updated, rebuilt = GeoIndex(out / "index"), GeoIndex(fresh / "index")
    quantizer = faiss.downcast_index(faiss.extract_index_ivf(updated.index).quantizer)
    np.testing.assert_array_equal(quantizer.reconstruct_n(0, 4), centroids)
    queries = np.stack(list(scratch.values())[::10]).astype(np.float32)
    a, b = updated.search(queries, k=10, nprobe=4), rebuilt.search(queries, k=10, nprobe=4)
    np.testing.assert_array_equal(a.ids, b.ids)  # every list probed: both exact over the same vectors


def test_an_interrupted_update_is_finished_or_undone(tmp_path):
    """The update replaces the embeddings folder by two renames; a crash between them leaves the old
    folder renamed away: the next run puts back the finished new one, or else the old one."""
    from embed.split import _finish_swap, _staged
    from geovote.shards import MANIFEST

    out = tmp_path / "train"
    for finished, expect in ((True, "new"), (False, "old")):
        stage, replaced = _staged(out)
        stage.mkdir(parents=True)
        (stage / "which").write_text("new")
        if finished:
            (stage / MANIFEST).write_text("{}")
        replaced.mkdir()
        (replaced / "which").write_text("old")
        _finish_swap(out)
        assert (out / "which").read_text() == expect and not stage.exists() and not replaced.exists()
        shutil.rmtree(out)


def test_an_index_outgrowing_its_training_is_built_anew(tmp_path):
    from geovote.shards import write_shard
    from index.build import refresh_index

    rng = np.random.default_rng(0)

    def shards(n):
        folder = tmp_path / f"shards{n}"
        folder.mkdir()
        emb = rng.normal(size=(n, 16)).astype(np.float32)
        emb /= np.linalg.norm(emb, axis=1, keepdims=True)
        write_shard(folder / "shard-00000.parquet", [str(i) for i in range(n)], np.zeros(n), np.zeros(n), emb)
        (folder / "manifest.json").write_text(json.dumps({"dim": 16, "backbone": "b", "rows": n}))
        return folder

    said = []
    refresh_index(shards(1000), tmp_path / "index", factory="IVF8,Flat", log=said.append)
    assert refresh_index(shards(3000), tmp_path / "index", factory="IVF8,Flat", log=said.append)[
        "trained_count"] == 1000
    info = refresh_index(shards(5000), tmp_path / "index", log=said.append)  # the factory named before
    assert info["trained_count"] == 5000 and info["count"] == 5000
    assert info["factory"] == "IVF8,Flat" and not info["factory_chosen"]  # kept, though not named again
    said = [line for line in said if not line.startswith("index: measured on ")]  # one a build, each
    assert said[1].endswith("IVF8,Flat, its training for 1,000 kept in " + said[1].split(" kept in ")[1])
    assert said[2] == "index: building anew: 5,000 vectors, more than 4x the 1,000 it was trained on"


def _dataset_images(sample_root, root, n: int):
    """The first n train images of the sample copied into root/images/train: (the CSV's header line and
    n row lines, the header's column names). The caller writes whichever rows it wants as train.csv."""
    lines = (sample_root / "train.csv").read_text().splitlines()[:n + 1]
    header = next(csv.reader([lines[0]]))
    (root / "images" / "train").mkdir(parents=True)
    for line in lines[1:]:
        i = next(csv.reader([line]))[header.index("id")]
        shutil.copy(next((sample_root / "images" / "train").rglob(f"{i}.jpg")), root / "images" / "train")
    return lines, header


def test_a_dataset_whose_csv_gained_rows_is_updated(sample_root, tiny_model, tmp_path, capsys):
    """The same update for a dataset in OSV-5M's layout: rows appended to train.csv are embedded, the
    others kept, and the result equals a build from scratch."""
    from embed.build import main as embed_main

    root = tmp_path / "ds"
    lines, _ = _dataset_images(sample_root, root, 120)
    (root / "train.csv").write_text("\n".join(lines[:81]) + "\n")  # 80 rows first
    args = ["--data", str(root), "--model", str(tiny_model), "--out", str(tmp_path / "e"), "--workers", "0",
            "--set", "tune=false"]
    assert embed_main(args) == 0
    before = _shard_vectors(tmp_path / "e" / "embeddings" / "train")
    (root / "train.csv").write_text("\n".join(lines[:1] + lines[11:]) + "\n")  # 10 gone, 40 added
    capsys.readouterr()
    assert embed_main(args) == 0
    assert "70 of 110 images unchanged, 40 to embed (new, changed or failed before), 10 earlier ones dropped" \
        in capsys.readouterr().out
    after = _shard_vectors(tmp_path / "e" / "embeddings" / "train")
    assert embed_main(args[:5] + [str(tmp_path / "fresh")] + args[6:]) == 0
    scratch = _shard_vectors(tmp_path / "fresh" / "embeddings" / "train")
    assert sorted(after) == sorted(scratch) and len(after) == 110
    for i, vec in after.items():
        np.testing.assert_allclose(vec, scratch[i], atol=2e-3)
        if i in before:
            np.testing.assert_array_equal(vec, before[i])


def test_updates_that_only_remove_replace_everything_retry_failures_or_move_coordinates(sample_root, tiny_model,
                                                                                     tmp_path, capsys):
    """Each update ends where a build from scratch of the same CSV ends: the same vectors, failures and
    coordinates in the shards and in the index."""
    from embed.build import main as embed_main
    from index.search import GeoIndex

    root = tmp_path / "ds"
    lines, header = _dataset_images(sample_root, root, 100)
    broken = next(csv.reader([lines[3]]))[header.index("id")]
    (root / "images" / "train" / f"{broken}.jpg").write_bytes(b"\xff\xd8 not a whole jpeg")
    lat_col = header.index("latitude")

    def moved(line):  # the same image a degree further north
        cells = next(csv.reader([line]))
        cells[lat_col] = str(float(cells[lat_col]) + 1.0)
        return ",".join(cells)

    args = ["--model", str(tiny_model), "--workers", "0", "--set", "tune=false"]
    steps = [lines[:41],  # 40 rows, one image broken
             lines[:1] + lines[11:41] + lines[41:51],  # some removed, some added: the failure retried
             lines[:1] + lines[21:31],  # removed only, fewer rows than a shard before
             lines[:1] + lines[51:101],  # every row new
             lines[:1] + lines[51:60] + [moved(lines[60])] + lines[61:101]]  # one row's coordinates moved
    for n, step in enumerate(steps):
        (root / "train.csv").write_text("\n".join(step) + "\n")
        assert embed_main(["--data", str(root), "--out", str(tmp_path / "e")] + args) == 0
        assert embed_main(["--data", str(root), "--out", str(tmp_path / f"fresh{n}")] + args) == 0
        after = _shard_vectors(tmp_path / "e" / "embeddings" / "train")
        scratch = _shard_vectors(tmp_path / f"fresh{n}" / "embeddings" / "train")
        assert sorted(after) == sorted(scratch), n
        for i, vec in after.items():
            np.testing.assert_allclose(vec, scratch[i], atol=2e-3)
        for name in ("failures.csv",):
            assert (tmp_path / "e" / "embeddings" / "train" / name).read_text() == \
                (tmp_path / f"fresh{n}" / "embeddings" / "train" / name).read_text().replace(
                    f"fresh{n}", "e"), n
        a, b = GeoIndex(tmp_path / "e" / "index"), GeoIndex(tmp_path / f"fresh{n}" / "index")
        order_a, order_b = np.argsort(np.asarray(a.ids)), np.argsort(np.asarray(b.ids))
        np.testing.assert_array_equal(np.asarray(a.ids)[order_a], np.asarray(b.ids)[order_b])
        np.testing.assert_array_equal(np.asarray(a.lat)[order_a], np.asarray(b.lat)[order_b])
    printed = capsys.readouterr().out
    assert "49 of 50 images unchanged, 1 to embed" in printed  # the moved row alone


def test_an_index_keeps_the_factory_it_was_asked_for(tmp_path):
    """An index whose factory was chosen from the data (Flat), then named by the user after growing past
    the size where the data would choose IVF: the string it records is the one it is built with."""
    from geovote.shards import write_shard
    from index.build import refresh_index
    from index.search import GeoIndex

    rng = np.random.default_rng(1)
    for n in (20_000, 60_000):
        folder = tmp_path / f"s{n}"
        folder.mkdir()
        emb = rng.normal(size=(n, 16)).astype(np.float32)
        emb /= np.linalg.norm(emb, axis=1, keepdims=True)
        write_shard(folder / "shard-00000.parquet", [str(i) for i in range(n)], np.zeros(n), np.zeros(n), emb)
        (folder / "manifest.json").write_text(json.dumps({"dim": 16, "backbone": "b", "rows": n}))
    assert refresh_index(tmp_path / "s20000", tmp_path / "index", log=lambda *_: None)["factory"] == "Flat"
    info = refresh_index(tmp_path / "s60000", tmp_path / "index", factory="Flat", log=lambda *_: None)
    assert info["factory"] == "Flat" and not info["factory_chosen"] and info["trained_count"] == 20_000
    assert GeoIndex(tmp_path / "index").exact
