"""The OSV-5M data layer: reading, streaming and every bad input a user can give."""
import csv

import numpy as np
import pytest
from PIL import Image

from geovote.data import DataError, iter_csv_batches, read_split, read_table

HEADER = ["id", "latitude", "longitude", "unique_country", "city"]


def _dataset(root, rows, header=HEADER, images=None, split="train"):
    """A dataset in OSV-5M layout: `<split>.csv` and one real JPEG per id in `images`."""
    root.mkdir(parents=True, exist_ok=True)
    with open(root / f"{split}.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        for r in rows:
            f.write(r + "\n") if isinstance(r, str) else w.writerow(r)
    folder = root / "images" / split / "00"
    folder.mkdir(parents=True, exist_ok=True)
    for image_id in images if images is not None else [r[0] for r in rows if not isinstance(r, str)]:
        Image.new("RGB", (8, 8), (10, 20, 30)).save(folder / f"{image_id}.jpg")
    return root


def test_reads_the_sample(sample_root):
    split = read_split(sample_root, "train", columns=["unique_country"])
    assert len(split) == 2000 and split.report.valid == 2000 and not split.report.rejected
    assert split.ids.dtype == object and all(isinstance(i, str) and len(i) == 15 for i in split.ids[:10])
    assert split.lat_deg.dtype == np.float64
    assert all(p.is_file() for p in split.image_paths()[:50])
    assert split.image_paths()[0].stem == split.ids[0]
    assert "rejected" in split.report.summary() and "rejects written" not in split.report.summary()


def test_every_bad_row_is_rejected_with_its_reason(tmp_path):
    rows = [
        ["0001", 10.0, 20.0, "NA", "Windhoek"],     # valid; Namibia's "NA" is not missing
        ["0002", 91.0, 20.0, "FR", "x"],            # latitude out of range
        ["0003", 10.0, -180.5, "FR", "x"],          # longitude out of range
        ["0004", "NaN", 20.0, "FR", "x"],           # NaN coordinate
        ["0005", "north", 20.0, "FR", "x"],         # not a number
        ["", 10.0, 20.0, "FR", "x"],                # missing id
        ["0001", 11.0, 21.0, "FR", "x"],            # duplicate id (first kept)
        ["0008", 12.0, 22.0, "NaN", "x"],           # valid; missing country key
        ["0009", 13.0, 23.0, "DE", "x"],            # image missing
        "0010,1,2,FR,x,surplus",                    # malformed line
        ["0011", -90.0, 180.0, "AQ", "x"],          # valid: the limits are inside the ranges
    ]
    root = _dataset(tmp_path / "ds", rows, images=["0001", "0002", "0004", "0008", "0011", "0003"])
    split = read_split(root, "train", columns=["unique_country"], rejects_path=tmp_path / "out" / "rejects.csv")
    assert list(split.ids) == ["0001", "0008", "0011"]
    assert list(split.column("unique_country")) == ["NA", None, "AQ"]
    rep = split.report
    assert rep.rows == 11 and rep.valid == 3
    assert dict(rep.rejected) == {
        "latitude outside [-90, 90]": 1, "longitude outside [-180, 180]": 1, "NaN coordinates": 1,
        "coordinates not numbers": 1, "missing id": 1, "duplicate id": 1, "image missing": 1,
        "malformed line": 1,
    }
    with open(rep.rejects_path, newline="") as f:
        rejects = list(csv.DictReader(f))
    assert len(rejects) == 8
    by_id = {r["id"]: r for r in rejects if r["id"]}
    assert by_id["0002"]["reason"] == "latitude outside [-90, 90]" and by_id["0002"]["row"] == "1"
    assert by_id["0001"]["reason"] == "duplicate id" and by_id["0001"]["row"] == "6"
    assert by_id["0009"]["reason"] == "image missing"
    assert any(r["reason"] == "malformed line" and "surplus" in r["text"] for r in rejects)
    summary = rep.summary()
    assert "11 rows, 3 valid, 8 rejected" in summary and str(rep.rejects_path) in summary


def test_missing_columns_files_and_empty_csv(tmp_path, capsys):
    root = _dataset(tmp_path / "a", [["1", "2"]], header=["id", "lat"])
    with pytest.raises(DataError, match="lacks column.*latitude, longitude"):
        read_split(root, "train")
    with pytest.raises(DataError, match="no test.csv.*train.csv"):
        read_split(root, "test")
    (root / "val.csv").write_text("")
    with pytest.raises(DataError, match="empty"):
        read_split(root, "val")
    with pytest.raises(DataError, match="no such CSV"):
        read_table(tmp_path / "nowhere.csv")


def test_ids_stay_text_and_only_nan_strings_are_missing(tmp_path):
    rows = [["000123", 1.0, 2.0, "NA", ""], ["4e5", 1.0, 2.0, "nan", "NA"]]
    root = _dataset(tmp_path / "ds", rows)
    split = read_split(root, "train", columns=["unique_country", "city"])
    assert list(split.ids) == ["000123", "4e5"]
    assert list(split.column("unique_country")) == ["NA", None]
    assert list(split.column("city")) == [None, "NA"]


def test_streams_in_blocks_and_keeps_only_asked_columns(sample_root):
    batches = list(iter_csv_batches(sample_root / "train.csv", ["id", "latitude"], block_bytes=1 << 14))
    assert len(batches) > 5
    assert sum(b.num_rows for b in batches) == 2000
    assert all(b.schema.names == ["id", "latitude"] for b in batches)


def test_reading_without_images(tmp_path):
    root = _dataset(tmp_path / "ds", [["1", 1.0, 2.0, "FR", "x"]], images=[])
    assert len(read_split(root, "train")) == 0
    split = read_split(root, "train", check_images=False)
    assert len(split) == 1 and "path" not in split.table.column_names


def test_every_extra_copy_of_an_id_is_rejected_and_the_first_kept(tmp_path):
    rows = [["b", 1.0, 1.0, "FR", "first b"], ["a", 2.0, 2.0, "FR", "a"], ["b", 3.0, 3.0, "FR", "x"],
            ["c", 4.0, 4.0, "FR", "c"], ["b", 5.0, 5.0, "FR", "x"], ["a", 6.0, 6.0, "FR", "x"]]
    split = read_split(_dataset(tmp_path / "ds", rows), "train", columns=["city"],
                       rejects_path=tmp_path / "rejects.csv")
    assert list(split.ids) == ["b", "a", "c"] and list(split.column("city")) == ["first b", "a", "c"]
    with open(split.report.rejects_path, newline="") as f:
        assert sorted(int(r["row"]) for r in csv.DictReader(f)) == [2, 4, 5]


def test_an_unwritable_rejects_path_is_a_clear_error(tmp_path):
    root = _dataset(tmp_path / "ds", [["1", 95.0, 2.0, "FR", "x"]])
    (tmp_path / "file").write_text("not a folder")
    with pytest.raises(DataError, match="cannot write the rejects file"):
        read_split(root, "train", rejects_path=tmp_path / "file" / "rejects.csv")


def test_count_rows_equals_counting_lines_whatever_the_block_size(tmp_path):
    """The fast line count (numpy over blocks) against splitting the text, at every block size."""
    from geovote.data import count_rows

    cases = [b"h\na\n\n\n\nb\n", b"h\r\na\r\n\r\n\r\nb\r\n", b"\n\nh\na\nb", b"h\na\n", b"h\n", b"h", b"",
             b"h\n\r\n\n\r\na\r\n\n"]
    for data in cases:
        path = tmp_path / "f.csv"
        path.write_bytes(data)
        want = max(0, len([line for line in data.replace(b"\r\n", b"\n").split(b"\n") if line.strip()]) - 1)
        assert [count_rows(path, size) for size in range(1, 9)] == [want] * 8, data


def test_image_paths_are_a_lazy_sequence_of_the_same_paths(sample_root):
    split = read_split(sample_root, "val")
    paths = split.image_paths()
    want = [sample_root / p for p in split.table.column("path").to_pylist()]
    assert len(paths) == len(want) == len(split) and list(paths) == want
    assert paths[0] == want[0] and paths[-1] == want[-1] and paths[10:13] == want[10:13]
    with pytest.raises(IndexError):
        paths[len(split)]
