"""OSV-5M download: the unzip/verify half on local archives, file selection, and failing fast offline."""
import time
import zipfile

import pytest

from geovote.data import DataError
from geovote.download import extract_archives, main, select_files, verify


def _archive(path, members):
    path.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(path, "w") as zf:
        for name in members:
            zf.writestr(name, b"\xff\xd8 not really a jpeg")


def _osv5m_like(root, n_per_zip=30, zips=3):
    """test.csv and images/test/NN.zip, each archive holding a folder of <id>.jpg."""
    ids = [f"{z}{i:05d}" for z in range(zips) for i in range(n_per_zip)]
    (root / "test.csv").parent.mkdir(parents=True, exist_ok=True)
    (root / "test.csv").write_text("id,latitude,longitude\n" + "".join(f"{i},1.0,2.0\n" for i in ids))
    for z in range(zips):
        _archive(root / "images" / "test" / f"{z:02d}.zip",
                 [f"{z:02d}/{i}.jpg" for i in ids[z * n_per_zip:(z + 1) * n_per_zip]])
    return ids


def test_extract_verify_and_rerun(tmp_path, capsys):
    ids = _osv5m_like(tmp_path)
    assert main(["--out", str(tmp_path), "--split", "test", "--no-download", "--extract"]) == 0
    out = capsys.readouterr().out
    assert "90 rows in test.csv, 90 images" in out and "(complete)" in out
    assert not list((tmp_path / "images" / "test").glob("*.zip"))  # deleted once extracted
    assert len(list((tmp_path / "images" / "test").glob("*.zip.done"))) == 3
    assert (tmp_path / "images" / "test" / "01" / f"{ids[40]}.jpg").is_file()
    assert extract_archives(tmp_path, "test") == (0, 0)  # idempotent: nothing left to do
    v = verify(tmp_path, "test")
    assert (v.csv_rows, v.images, v.missing, v.extra) == (90, 90, 0, 0)


def test_no_extract_keeps_the_archives_and_counts_their_members(tmp_path, capsys):
    """OSV-5M as it ships, read in place: nothing extracted, the images counted inside the archives."""
    _osv5m_like(tmp_path)
    before = sorted(p.name for p in (tmp_path / "images" / "test").iterdir())
    assert main(["--out", str(tmp_path), "--split", "test", "--no-download"]) == 0  # the default
    assert "90 rows in test.csv, 90 images" in capsys.readouterr().out
    assert sorted(p.name for p in (tmp_path / "images" / "test").iterdir()) == before  # the 3 zips alone
    assert main(["--out", str(tmp_path), "--split", "test", "--no-download", "--no-extract"]) == 0  # as before
    assert sorted(p.name for p in (tmp_path / "images" / "test").iterdir()) == before
    with pytest.raises(SystemExit):
        main(["--out", str(tmp_path), "--no-download", "--keep-archives"])  # only with --extract
    assert "--keep-archives goes with --extract" in capsys.readouterr().err


def test_keep_archives_skips_done_ones_and_counts_gaps(tmp_path):
    ids = _osv5m_like(tmp_path)
    assert extract_archives(tmp_path, "test", keep_archives=True) == (3, 0)
    assert extract_archives(tmp_path, "test", keep_archives=True) == (0, 3)
    (tmp_path / "images" / "test" / "00" / f"{ids[0]}.jpg").unlink()
    (tmp_path / "images" / "test" / "00" / "stray.jpg").write_bytes(b"x")
    v = verify(tmp_path, "test")
    assert (v.missing, v.extra) == (0, 1)  # the deleted file's image is still in its kept archive
    (tmp_path / "images" / "test" / "00.zip").unlink()
    v = verify(tmp_path, "test")
    assert (v.missing, v.extra) == (1, 1)
    assert "1 rows without an image, 1 images without a row" in v.summary()


def test_unsafe_and_broken_archives_are_refused(tmp_path, capsys):
    _archive(tmp_path / "images" / "test" / "00.zip", ["../escape.jpg"])
    with pytest.raises(DataError, match="outside"):
        extract_archives(tmp_path, "test")
    assert not (tmp_path / "images" / "escape.jpg").exists()
    (tmp_path / "images" / "test" / "00.zip").write_bytes(b"PK\x03\x04 truncated")
    (tmp_path / "test.csv").write_text("id,latitude,longitude\n")
    assert main(["--out", str(tmp_path), "--split", "test", "--no-download", "--extract"]) == 1
    assert "not a complete zip" in capsys.readouterr().err
    # kept (the default), it is found when the images are counted
    assert main(["--out", str(tmp_path), "--split", "test", "--no-download"]) == 1
    err = capsys.readouterr().err
    assert "00.zip: not a readable zip archive" in err and "delete it and rerun to download it again" in err


def test_select_files_for_subsets():
    repo = ["README.md", "train.csv", "test.csv", "images/test/00.zip", "images/test/01.zip",
            *(f"images/train/{i:02d}.zip" for i in range(5))]
    assert select_files(repo, ("test",), None) == ["test.csv", "images/test/00.zip", "images/test/01.zip"]
    assert select_files(repo, ("train", "test"), 2) == [
        "train.csv", "images/train/00.zip", "images/train/01.zip",
        "test.csv", "images/test/00.zip", "images/test/01.zip"]


@pytest.mark.parametrize("env", [{"HF_ENDPOINT": "http://127.0.0.1:9"}, {"HF_HUB_OFFLINE": "1"}])
def test_offline_fails_fast_and_says_so(tmp_path, monkeypatch, capsys, env):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    t0 = time.monotonic()
    assert main(["--out", str(tmp_path / "osv5m"), "--split", "test"]) == 2
    assert time.monotonic() - t0 < 5
    err = capsys.readouterr().err
    assert "HF_HUB_OFFLINE" in err or "cannot reach the Hugging Face hub" in err
