"""OSV-5M as it ships: images read straight from their zip archives (geovote.data.index_images,
embed.images.archive_member), never extracted: the same embeddings as from extracted files, partly
extracted splits, and a damaged member failing only its own image, with the reason."""
import shutil
import zipfile

import numpy as np
import pytest

from embed.models import load_backbone
from embed.split import EmbedConfig, embed_split
from geovote.archives import ARCHIVE_SEP
from geovote.data import index_images, read_split
from geovote.shards import read_embeddings


def _dataset(sample_root, out, n=40):
    """The sample's first n test rows as a dataset's test split; (root, the rows' ids, their files)."""
    out.mkdir()
    lines = (sample_root / "test.csv").read_text().splitlines()[: n + 1]
    (out / "test.csv").write_text("\n".join(lines) + "\n")
    split = read_split(sample_root, "test")
    ids = split.ids.astype(str)[:n]
    files = list(split.image_paths()[:n])
    return out, ids, files


def _files(root, ids, files):
    folder = root / "images" / "test" / "00"
    folder.mkdir(parents=True)
    for i, f in zip(ids, files):
        shutil.copyfile(f, folder / f"{i}.jpg")


def _archived(root, ids, files, extracted: int):
    """The first `extracted` images as files, the rest in two archives: one with nested member folders
    (compressed), one flat (stored)."""
    folder = root / "images" / "test"
    folder.mkdir(parents=True)
    (folder / "00").mkdir()
    for i, f in zip(ids[:extracted], files[:extracted]):
        shutil.copyfile(f, folder / "00" / f"{i}.jpg")
    rest = list(zip(ids[extracted:], files[extracted:]))
    half = len(rest) // 2
    with zipfile.ZipFile(folder / "00.zip", "w", zipfile.ZIP_DEFLATED) as zf:
        for i, f in rest[:half]:
            zf.write(f, f"train/images/{i[:2]}/{i}.jpg")
    with zipfile.ZipFile(folder / "01.zip", "w", zipfile.ZIP_STORED) as zf:
        for i, f in rest[half:]:
            zf.write(f, f"{i}.jpg")
        zf.writestr("README.txt", "not an image")


def _embed(root, tiny_model, out):
    split = read_split(root, "test")
    cfg = EmbedConfig(model=str(tiny_model), batch_size=8, workers=2, shard_rows=16)
    embed_split(split, load_backbone(str(tiny_model)), out, cfg, root, log=lambda *a: None)
    return read_embeddings(out)


def test_archives_read_in_place_embed_as_extracted_files(sample_root, tiny_model, tmp_path):
    files_root, ids, files = _dataset(sample_root, tmp_path / "files")
    _files(files_root, ids, files)
    zip_root, _, _ = _dataset(sample_root, tmp_path / "zips")
    _archived(zip_root, ids, files, extracted=10)
    listed = index_images(zip_root, "test")
    paths = dict(zip(listed.column("id").to_pylist(), listed.column("path").to_pylist()))
    assert set(paths) == set(ids)  # README.txt is not an image
    assert sum(ARCHIVE_SEP in p for p in paths.values()) == 30 and not any(
        ARCHIVE_SEP in paths[i] for i in ids[:10])
    a = _embed(files_root, tiny_model, tmp_path / "emb-files")
    b = _embed(zip_root, tiny_model, tmp_path / "emb-zips")  # two workers, each opening the archives
    assert list(a.ids) == list(b.ids) == list(ids)
    np.testing.assert_array_equal(a.embedding, b.embedding)  # bit for bit
    assert not any(p.suffix == ".jpg" for p in (zip_root / "images" / "test").iterdir())  # nothing extracted


def test_a_file_extracted_beside_its_archive_is_read_as_the_file(sample_root, tmp_path):
    root, ids, files = _dataset(sample_root, tmp_path / "both", n=6)
    _archived(root, ids, files, extracted=0)
    shutil.copyfile(files[5], root / "images" / "test" / "00" / f"{ids[5]}.jpg")
    listed = index_images(root, "test")
    paths = dict(zip(listed.column("id").to_pylist(), listed.column("path").to_pylist()))
    assert len(listed) == 6 and paths[ids[5]] == f"images/test/00/{ids[5]}.jpg"


def test_a_damaged_member_fails_only_its_image_with_the_reason(sample_root, tiny_model, tmp_path, capsys):
    root, ids, files = _dataset(sample_root, tmp_path / "bad", n=12)
    _archived(root, ids, files, extracted=0)
    stored = root / "images" / "test" / "01.zip"
    with zipfile.ZipFile(stored) as zf:
        info = zf.getinfo(f"{ids[8]}.jpg")
    data = bytearray(stored.read_bytes())
    # the member's bytes start after its local header (30 bytes + name + extra): flip one in the middle
    start = info.header_offset + 30 + len(info.filename.encode()) + len(info.extra)
    data[start + info.compress_size // 2] ^= 0xFF
    stored.write_bytes(bytes(data))
    out = tmp_path / "emb"
    got = _embed(root, tiny_model, out)
    assert sorted(got.ids) == sorted(set(ids) - {ids[8]})
    failures = (out / "failures.csv").read_text()
    assert ids[8] in failures and "damaged archive member" in failures and "CRC" in failures
    # a truncated archive (no listing): its images are missing, and read_split says which archive
    (root / "images" / "test" / "00.zip").write_bytes(b"PK\x03\x04 truncated")
    split = read_split(root, "test")
    assert len(split) == 6 and "00.zip: not a readable zip archive" in capsys.readouterr().err


@pytest.mark.parametrize("member", ["no-such.jpg"])
def test_a_missing_member_is_a_reason_not_a_crash(sample_root, tmp_path, member):
    from embed.images import ImageFailure, open_rgb

    root, ids, files = _dataset(sample_root, tmp_path / "m", n=2)
    _archived(root, ids, files, extracted=0)
    with pytest.raises(ImageFailure, match="no member"):
        open_rgb(root / "images" / "test" / f"01.zip{ARCHIVE_SEP}{member}", 32)
    with pytest.raises(ImageFailure, match="not found"):
        open_rgb(root / "images" / "test" / f"09.zip{ARCHIVE_SEP}{member}", 32)


@pytest.mark.slow
def test_an_engine_built_from_archives_shows_its_evidence(sample_root, tiny_model, tmp_path):
    """OSV-5M kept in its zips (geovote.download's default): the engine's evidence images are read from
    the archives (archived-images.parquet beside the embeddings), byte for byte."""
    from embed.build import main as embed_main
    from retrieve.engine import Engine

    split = read_split(sample_root, "train")
    ids, files = split.ids.astype(str)[:300], list(split.image_paths()[:300])
    root = tmp_path / "osv"
    (root / "images" / "train").mkdir(parents=True)
    lines = (sample_root / "train.csv").read_text().splitlines()[:301]
    (root / "train.csv").write_text("\n".join(lines) + "\n")
    with zipfile.ZipFile(root / "images" / "train" / "00.zip", "w", zipfile.ZIP_STORED) as zf:
        for i, f in zip(ids, files):
            zf.write(f, f"00/{i}.jpg")
    out = tmp_path / "engine"
    assert embed_main(["--data", str(root), "--model", str(tiny_model), "--out", str(out), "--workers", "0"]) == 0
    engine = Engine(out / "index")
    path, why = engine.gallery_lookup(ids[7])
    assert why == "" and str(path) == f"{(root / 'images' / 'train' / '00.zip').resolve()}{ARCHIVE_SEP}00/{ids[7]}.jpg"
    from geovote.archives import read_member

    assert read_member(path.archive, path.name) == files[7].read_bytes()
    assert engine.gallery_lookup("not-an-id")[0] is None
    # extracted since (and the archive deleted): the file, found by name; and once the split is embedded
    # again (nothing to do), no archived-images file is left to point at the archive
    with zipfile.ZipFile(root / "images" / "train" / "00.zip") as zf:
        zf.extractall(root / "images" / "train")
    (root / "images" / "train" / "00.zip").unlink()
    assert engine.gallery_lookup(ids[7]) == ((root / "images" / "train" / "00" / f"{ids[7]}.jpg").resolve(), "")
    embed_split(read_split(root, "train"), load_backbone(str(tiny_model)), out / "embeddings" / "train",
                EmbedConfig(model=str(tiny_model)), root, log=lambda *a: None)
    assert not (out / "embeddings" / "train" / "archived-images.parquet").exists()


def test_a_replaced_tar_is_read_anew_not_through_the_old_handle(tmp_path):
    """A shard rewritten in place (a new download): its new index and its new bytes, never the new
    index read through the handle of the old file."""
    import io
    import os
    import tarfile

    from geovote.archives import read_member

    def write(path, members):
        with tarfile.open(path, "w") as tf:
            for name, data in members:
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))

    shard = tmp_path / "00000.tar"
    write(shard, [("a.jpg", b"A" * 3000), ("b.jpg", b"OLD-B")])
    assert read_member(shard, "b.jpg") == b"OLD-B"
    write(tmp_path / "new.tar", [("b.jpg", b"NEW-B"), ("c.jpg", b"C")])
    os.replace(tmp_path / "new.tar", shard)
    assert read_member(shard, "b.jpg") == b"NEW-B" and read_member(shard, "c.jpg") == b"C"


def test_archived_gallery_ids_are_found_whatever_their_characters(tmp_path):
    """archived-images.parquet sorted as pyarrow sorts text, bisected as UTF-8 bytes: ids with accents
    and other scripts are found, and a path whose folder holds "::" is not taken for an archive."""
    import types

    import pyarrow as pa

    from embed.split import write_archived_images
    from geovote.data import Report, Split
    from geovote.layout import EngineLayout
    from retrieve.engine import Engine

    ids = ["b1", "é1", "z9", "日本", "a"]
    paths = [f"images/train/00.zip::{i}.jpg" for i in ids[:4]] + ["images/train/a::b/a.jpg"]
    split = Split(tmp_path, "train", pa.table({"id": ids, "path": paths}), Report(tmp_path / "train.csv"))
    layout = EngineLayout(tmp_path / "engine")
    layout.embeddings("train").mkdir(parents=True)
    write_archived_images(layout.embeddings("train"), split)
    (tmp_path / "images" / "train").mkdir(parents=True)
    (tmp_path / "images" / "train" / "00.zip").write_bytes(b"")  # there (its members are not read here)
    fake = types.SimpleNamespace(layout=layout, _archived=None)
    for i in ids[:4]:
        member, why = Engine._archived_image(fake, i, tmp_path, "train", "dataset")
        assert why == "" and member.name == f"{i}.jpg" and member.archive.endswith("00.zip"), i
    assert Engine._archived_image(fake, "a", tmp_path, "train", "dataset") == (None, "")  # a file
    assert Engine._archived_image(fake, "nope", tmp_path, "train", "dataset") == (None, "")
    (tmp_path / "images" / "train" / "00.zip").unlink()
    assert "is gone" in Engine._archived_image(fake, "é1", tmp_path, "train", "dataset")[1]
