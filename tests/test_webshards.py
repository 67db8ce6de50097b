"""A gallery as img2dataset downloads it: webdataset tar shards (written here with webdataset's TarWriter,
sample by sample as img2dataset's WebDatasetSampleWriter does) and a parquet of every sample tried beside
each, read in place (geovote.webshards, geovote.archives): the same rows and embeddings as the same
images from files, every dropped sample counted with its reason, and `embed.build --data` on the folder."""
import csv
import json
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from embed.models import load_backbone
from embed.split import EmbedConfig, embed_split
from geovote.archives import ARCHIVE_SEP
from geovote.data import DataError, read_split
from geovote.shards import read_embeddings

META_SCHEMA = pa.schema([("url", pa.string()), ("key", pa.string()), ("status", pa.string()),
                         ("error_message", pa.string()), ("width", pa.int64()), ("height", pa.int64()),
                         ("latitude", pa.float64()), ("longitude", pa.float64())])


def _write_shards(out, images, per_shard=25, failed_every=0, parquet=True, bad=None):
    """img2dataset's webdataset output for `images` [(file, lat, lon)]: shard s holds keys
    f"{s:05d}{i:04d}" (its shard number, then its place in the shard), each sample a .jpg, a .txt and a
    .json of its metadata; every `failed_every`-th sample failed to download (a parquet row, no files).
    `bad`: key -> metadata overrides. Returns [(key, file, lat, lon)] of the samples written."""
    from webdataset.writer import TarWriter

    out.mkdir(parents=True, exist_ok=True)
    written = []
    for s in range(0, (len(images) + per_shard - 1) // per_shard):
        rows = {f.name: [] for f in META_SCHEMA}
        with open(out / f"{s:05d}.tar", "wb") as fd:
            tar = TarWriter(fd)
            for i, (path, lat, lon) in enumerate(images[s * per_shard:(s + 1) * per_shard]):
                key = f"{s:05d}{i:04d}"
                failed = failed_every and i % failed_every == failed_every - 1
                meta = {"url": f"https://example.org/{key}.jpg", "key": key,
                        "status": "failed_to_download" if failed else "success",
                        "error_message": "HTTP 404" if failed else None, "width": 64, "height": 64,
                        "latitude": float(lat), "longitude": float(lon), **(bad or {}).get(key, {})}
                for k in rows:
                    rows[k].append(meta[k])
                if not failed:
                    tar.write({"__key__": key, "jpg": path.read_bytes(), "txt": "a street",
                               "json": json.dumps(meta, indent=4)})
                    written.append((key, path, lat, lon))
            tar.close()
        if parquet:
            if bad:  # coordinates that are not numbers: a column of text
                rows.update({c: [str(v) for v in rows[c]] for c in ("latitude", "longitude")})
            schema = META_SCHEMA if not bad else pa.schema([pa.field(f.name, pa.string()) if f.name in (
                "latitude", "longitude") else f for f in META_SCHEMA])
            pq.write_table(pa.table(rows, schema=schema), out / f"{s:05d}.parquet")
    return written


@pytest.fixture(scope="module")
def train_images(sample_root):
    split = read_split(sample_root, "train")
    files = list(split.image_paths()[:100])
    return [(f, la, lo) for f, la, lo in zip(files, split.lat_deg[:100], split.lon_deg[:100])]


def _embed(split, model, out):
    cfg = EmbedConfig(model=str(model), batch_size=8, workers=2, shard_rows=16)
    embed_split(split, load_backbone(str(model)), out, cfg, split.root, log=lambda *a: None)
    return read_embeddings(out)


def test_shards_read_in_place_give_the_rows_and_embeddings_of_the_files(train_images, tiny_model, tmp_path):
    written = _write_shards(tmp_path / "wds", train_images, per_shard=20, failed_every=10)
    split = read_split(tmp_path / "wds", "train", rejects_path=tmp_path / "rejects.csv")
    assert split.images == "shards" and len(written) == 90
    assert list(split.ids.astype(str)) == [k for k, *_ in written]  # shard order, keys as ids
    np.testing.assert_array_equal(split.lat_deg, [la for *_, la, _ in written])
    np.testing.assert_array_equal(split.lon_deg, [lo for *_, lo in written])
    assert split.table.column("path")[0].as_py() == f"00000.tar{ARCHIVE_SEP}000000000.jpg"
    assert split.report.rows == 100 and split.report.rejected == {"not downloaded (img2dataset status)": 10}
    with open(tmp_path / "rejects.csv", newline="") as f:
        rejected = list(csv.DictReader(f))
    assert [r["id"] for r in rejected][:2] == ["000000009", "000000019"] and rejected[0]["text"] == \
        "failed_to_download"
    # the same images as files, in a dataset in OSV-5M layout: bit-identical embeddings
    files = tmp_path / "files"
    (files / "images" / "train").mkdir(parents=True)
    with open(files / "train.csv", "w") as f:
        f.write("id,latitude,longitude\n")
        for key, path, lat, lon in written:
            shutil.copyfile(path, files / "images" / "train" / f"{key}.jpg")
            f.write(f"{key},{float(lat)!r},{float(lon)!r}\n")
    a = _embed(read_split(files, "train"), tiny_model, tmp_path / "emb-files")
    b = _embed(split, tiny_model, tmp_path / "emb-shards")  # two workers, each reading the tars
    assert list(a.ids) == list(b.ids) and len(b.ids) == 90
    np.testing.assert_array_equal(a.embedding, b.embedding)
    np.testing.assert_array_equal(a.lat_deg, b.lat_deg)
    np.testing.assert_array_equal(a.lon_deg, b.lon_deg)
    assert sorted(p.name for p in (tmp_path / "wds").iterdir()) == (
        sorted(f"{s:05d}.{ext}" for s in range(5) for ext in ("parquet", "tar")))  # nothing extracted


def test_without_the_parquet_the_json_of_each_sample_gives_the_same_rows(train_images, tmp_path):
    _write_shards(tmp_path / "pq", train_images[:40], failed_every=7)
    _write_shards(tmp_path / "json", train_images[:40], failed_every=7, parquet=False)
    a, b = read_split(tmp_path / "pq", "train"), read_split(tmp_path / "json", "train")
    assert a.table.drop_columns(["path", "mtime_ns"]).equals(b.table.drop_columns(["path", "mtime_ns"]))
    assert len(b) == 35 and b.report.rows == 35 and not b.report.rejected  # the tars hold no failed sample
    assert a.report.rows == 40


def test_bad_samples_are_rejected_with_their_reason(train_images, tmp_path, capsys):
    bad = {"000000001": {"latitude": "north"}, "000000002": {"latitude": 95.0}}
    for parquet in (True, False):
        root = tmp_path / f"bad-{parquet}"
        _write_shards(root, train_images[:50], bad=bad, parquet=parquet)
        split = read_split(root, "train")
        assert split.report.rejected == {"coordinates not numbers": 1, "latitude outside [-90, 90]": 1}
        assert len(split) == 48
    # a truncated shard: the samples before the damage are read, one cut off fails with the reason
    from embed.images import ImageFailure, open_rgb

    root = tmp_path / "truncated"
    keys = [k for k, *_ in _write_shards(root, train_images[:20], per_shard=20, parquet=False)]
    tar = root / "00000.tar"
    tar.write_bytes(tar.read_bytes()[: tar.stat().st_size // 2])
    split = read_split(root, "train")
    assert 0 < len(split) < 20 and list(split.ids) == keys[:len(split)]  # the samples before the cut
    assert "00000.tar: damaged after" in capsys.readouterr().err
    failed = []
    for path in split.image_paths():
        try:
            open_rgb(path, 32)
        except ImageFailure as e:
            failed.append(str(e))
    assert len(failed) <= 1 and all("truncated" in why for why in failed)
    # a shard without coordinates in its metadata is refused, naming what it has
    root = tmp_path / "nocoords"
    _write_shards(root, train_images[:3], parquet=False)
    import tarfile

    from webdataset.writer import TarWriter

    with open(root / "00000.tar", "wb") as fd:
        tw = TarWriter(fd)
        tw.write({"__key__": "a", "jpg": train_images[0][0].read_bytes(), "json": json.dumps({"url": "u"})})
        tw.close()
    assert tarfile.is_tarfile(root / "00000.tar")
    with pytest.raises(DataError, match="lacks latitude, longitude; it has: url"):
        read_split(root, "train")
    with pytest.raises(DataError, match="one gallery, read as the train split; it has no val"):
        read_split(root, "val")


@pytest.mark.slow
def test_embed_build_indexes_a_folder_of_shards(sample_root, tiny_model, tmp_path, capsys):
    from embed.build import main as embed_main
    from retrieve.engine import Engine

    split = read_split(sample_root, "train")
    images = list(zip(split.image_paths()[:400], split.lat_deg[:400], split.lon_deg[:400]))
    written = _write_shards(tmp_path / "wds", images, per_shard=100, failed_every=20)
    out = tmp_path / "engine"
    assert embed_main(["--data", str(tmp_path / "wds"), "--model", str(tiny_model), "--out", str(out),
                       "--workers", "0"]) == 0
    printed = capsys.readouterr().out
    assert "400 rows, 380 valid, 20 rejected (20 not downloaded (img2dataset status))" in printed
    engine = Engine(out / "index")
    ids = np.char.decode(np.asarray(engine.index.ids), "utf-8")
    assert sorted(ids) == sorted(k for k, *_ in written)
    truth = {k: la for k, _, la, _ in written}
    assert all(float(la) == truth[i] for i, la in zip(ids, np.asarray(engine.index.lat)))
    tuned = json.loads((out / "index" / "retrieve.json").read_text())["validation"]
    assert tuned["split"] == "train (held out of its own search)"
    # the evidence behind an answer: read from its shard, served byte for byte
    from fastapi.testclient import TestClient

    from retrieve.app import create_app

    key, image, *_ = written[123]
    path, why = engine.gallery_lookup(key)
    assert why == "" and str(path) == f"{(tmp_path / 'wds' / '00001.tar').resolve()}{ARCHIVE_SEP}{key}.jpg"
    client = TestClient(create_app(engine), base_url="http://127.0.0.1")  # the app serves local hosts only
    r = client.get(f"/gallery/{key}")
    assert r.status_code == 200 and r.content == image.read_bytes() and r.headers["content-type"] == "image/jpeg"
    assert client.get("/gallery/000000019").status_code == 404  # failed to download: not in the gallery
    (tmp_path / "wds" / "00001.tar").unlink()
    assert "is gone" in engine.gallery_lookup(key)[1]


def test_the_rows_add_up_and_odd_member_names_are_read(train_images, tmp_path):
    """A key given twice in a parquet is two rows (one a duplicate), `./` before a member's name is not
    part of its key, a key column that is not text is refused, and a folder with a test.csv beside a
    stray tar reads its CSV."""
    import tarfile

    root = tmp_path / "odd"
    root.mkdir()
    rows = {"key": ["k1", "k1", "k2"], "status": ["success"] * 3, "latitude": [1.0, 1.0, 2.0],
            "longitude": [3.0, 3.0, 4.0]}
    pq.write_table(pa.table(rows), root / "00000.parquet")
    with tarfile.open(root / "00000.tar", "w") as tf:
        for key in ("k1", "k2"):
            tf.add(train_images[0][0], f"./{key}.jpg")
    split = read_split(root, "train")
    assert sorted(split.ids) == ["k1", "k2"] and split.report.rows == 3
    assert split.report.rejected == {"duplicate id": 1}
    pq.write_table(pa.table({**rows, "key": [1, 1, 2]}), root / "00000.parquet")
    with pytest.raises(DataError, match="`key` column is int64, not text"):
        read_split(root, "train")
    # a sample's mask before its photo: the photo is the image; a.b.jpg alone is its sample's image
    with tarfile.open(root / "00000.tar", "w") as tf:
        tf.add(train_images[1][0], "k1.seg.png")
        tf.add(train_images[0][0], "k1.jpg")
        tf.add(train_images[0][0], "k2.b.jpg")
    pq.write_table(pa.table(rows), root / "00000.parquet")
    paths = dict(zip(*(read_split(root, "train").table.column(c).to_pylist() for c in ("id", "path"))))
    assert paths == {"k1": "00000.tar::k1.jpg", "k2": "00000.tar::k2.b.jpg"}
    # compressed shards cannot be read in place: said so
    gz = tmp_path / "gz"
    gz.mkdir()
    (gz / "00000.tar.gz").write_bytes(b"\x1f\x8b")
    with pytest.raises(DataError, match="gzip-compressed webdataset shards"):
        read_split(gz, "train")
    (root / "test.csv").write_text("id,latitude,longitude\nt1,1,2\n")
    (root / "images" / "test").mkdir(parents=True)
    (root / "images" / "test" / "t1.jpg").write_bytes(train_images[0][0].read_bytes())
    assert list(read_split(root, "test").ids) == ["t1"]
