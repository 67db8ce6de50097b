"""The bundled sample: real Blue Marble crops, OSV-5M layout, held-out places >= 1 km from train."""
import csv
import hashlib
import shutil

import numpy as np
import pytest
from PIL import Image

from geovote.cells import QuadTree
from geovote.data import read_split
from geovote.geo import haversine_km
from geovote.geocode import reverse_geocode_keys
from geovote.bundled_sample import (TILE_PX, blue_marble, ensure_sample, generate, lonlat_to_px, plain_crop,
                            view_crop)


@pytest.fixture(scope="module")
def mosaic():
    return blue_marble()


def test_layout_columns_and_counts(sample_root):
    for split, n in (("train", 2000), ("val", 200), ("test", 200), ("test_far", 100), ("val_far", 100)):
        cols = ["country", "unique_city", "quadtree_10_500"] + (["sequence"] if split != "train" else [])
        s = read_split(sample_root, split, columns=cols)
        assert not s.report.rejected
        if split == "train":
            assert len(s) == n
            continue
        # the split's own n rows, then the new views of its round(0.1 n) sequences (2-8 views each,
        # the first one of the split's own rows)
        seq = s.column("sequence").astype(str)
        names = sorted(set(seq) - {""})
        assert len(names) == round(0.1 * n) and (seq[n:] != "").all()
        sizes = np.array([(seq == name).sum() for name in names])
        assert sizes.min() >= 2 and sizes.max() <= 8 and len(s) == n + (sizes - 1).sum()
        assert all(np.flatnonzero(seq == name)[0] < n for name in names)
        assert all((np.flatnonzero(seq == name)[1:] >= n).all() for name in names)
    with open(sample_root / "train.csv", newline="") as f:
        header = next(csv.reader(f))
    assert header[:11] == ["id", "latitude", "longitude", "country", "region", "sub-region", "city",
                           "unique_country", "unique_region", "unique_sub-region", "unique_city"]
    # quadtree_10_<n> for the sizes that split 2,000 training points, and no others
    assert header[11:] == ["quadtree_10_500", "quadtree_10_1000"]


def test_heldout_places_are_at_least_1km_from_every_train_place(sample_root):
    train = read_split(sample_root, "train", check_images=False)
    ids = set(train.ids)
    for split in ("val", "test"):
        s = read_split(sample_root, split, check_images=False)
        d = haversine_km(s.lat_deg[:, None], s.lon_deg[:, None], train.lat_deg[None], train.lon_deg[None])
        assert d.min() >= 1.0
        assert not ids & set(s.ids)


def test_place_keys_and_quadtree_columns(sample_root):
    s = read_split(sample_root, "test", columns=["unique_country", "unique_city", "quadtree_10_500"])
    keys = reverse_geocode_keys(s.lat_deg, s.lon_deg)
    np.testing.assert_array_equal(s.column("unique_country"), keys["unique_country"])
    np.testing.assert_array_equal(s.column("unique_city"), keys["unique_city"])
    train = read_split(sample_root, "train", check_images=False, columns=["quadtree_10_500"])
    tree = QuadTree.load(sample_root / "quadtree_10_500.npz")
    np.testing.assert_array_equal(tree.assign_leaf(train.lat_deg, train.lon_deg),
                                  train.column("quadtree_10_500"))
    np.testing.assert_array_equal(tree.assign_leaf(s.lat_deg, s.lon_deg), s.column("quadtree_10_500"))
    assert tree.count[tree.leaves].sum() == 2000


def test_train_images_are_the_plain_crops(sample_root, mosaic):
    s = read_split(sample_root, "train")
    for i in range(0, 2000, 400):
        img = np.asarray(Image.open(s.image_paths()[i]))
        assert img.shape == (TILE_PX, TILE_PX, 3)
        want = plain_crop(mosaic, s.lat_deg[i], s.lon_deg[i]).astype(float)
        assert np.abs(img - want).mean() < 4  # JPEG quality 90


def test_test_images_are_other_views(sample_root, mosaic):
    s = read_split(sample_root, "test")
    diffs = []
    for i in range(0, 200, 20):
        img = np.asarray(Image.open(s.image_paths()[i])).astype(float)
        assert img.shape == (TILE_PX, TILE_PX, 3)
        diffs.append(np.abs(img - plain_crop(mosaic, s.lat_deg[i], s.lon_deg[i])).mean())
    assert np.mean(diffs) > 4  # rotated, scaled, jittered: not the plain crop


def test_crops_wrap_at_the_antimeridian_and_reflect_at_the_poles(mosaic):
    h, w = mosaic.shape[:2]
    x, y = lonlat_to_px(0.0, 180.0, h, w)
    assert (x, y) == (w, h / 2)
    crop = plain_crop(mosaic, 0.0, 180.0)  # centred on the seam: half from each edge
    np.testing.assert_array_equal(crop[:, :32], mosaic[h // 2 - 32:h // 2 + 32, w - 32:])
    np.testing.assert_array_equal(crop[:, 32:], mosaic[h // 2 - 32:h // 2 + 32, :32])
    crop = plain_crop(mosaic, 90.0, 0.0)  # the north pole: rows above row 0 mirror rows below it
    np.testing.assert_array_equal(crop[:32][::-1], crop[32:])
    np.testing.assert_array_equal(crop[32:], mosaic[:32, w // 2 - 32:w // 2 + 32])


def test_unrotated_view_is_the_plain_crop(mosaic):
    for lat, lon in ((48.85, 2.35), (-33.9, 151.2), (0.0, 180.0), (89.9, 10.0)):
        np.testing.assert_array_equal(view_crop(mosaic, lat, lon, 0.0, 1.0, (0.0, 0.0)),
                                      plain_crop(mosaic, lat, lon))


def _digest(root):
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        if p.is_file():
            h.update(str(p.relative_to(root)).encode())
            h.update(p.read_bytes())
    return h.hexdigest()


@pytest.mark.slow
def test_generation_is_deterministic_and_ensure_is_idempotent(tmp_path):
    a = generate(tmp_path / "a", 300, 30, 30, seed=7, quiet=True)
    b = generate(tmp_path / "b", 300, 30, 30, seed=7, quiet=True)
    assert _digest(a) == _digest(b)
    assert _digest(generate(tmp_path / "c", 300, 30, 30, seed=8, quiet=True)) != _digest(a)
    before = (a / "train.csv").stat().st_mtime_ns
    assert ensure_sample(a, n_train=300, n_val=30, n_test=30, seed=7) == a
    assert (a / "train.csv").stat().st_mtime_ns == before  # already there: not regenerated
    ensure_sample(a, n_train=301, n_val=30, n_test=30, seed=7)  # made differently: regenerated
    assert len(read_split(a, "train")) == 301


@pytest.mark.parametrize("split", ["test_far", "val_far"])
def test_far_places_are_land_100km_from_every_sample_place(sample_root, mosaic, split):
    from geovote.bundled_sample import is_land

    far = read_split(sample_root, split, columns=["unique_country"])
    assert len(far) >= 100 and not far.report.rejected  # 100 and their sequences' views
    others = [read_split(sample_root, s, check_images=False) for s in ("train", "val", "test")]
    lat = np.concatenate([o.lat_deg for o in others])
    lon = np.concatenate([o.lon_deg for o in others])
    d = haversine_km(far.lat_deg[:, None], far.lon_deg[:, None], lat[None], lon[None])
    assert d.min() >= 100.0
    assert is_land(mosaic, far.lat_deg, far.lon_deg).all() and np.all(np.abs(far.lat_deg) <= 72)
    # the land test itself, at hand-picked points: open ocean is not land, Paris and the Sahara are
    np.testing.assert_array_equal(is_land(mosaic, np.array([0.0, 30, -10, 48.85, 23]),
                                          np.array([-150.0, -40, 80, 2.35, 10])), [False, False, False, True, True])
    # labelled as OSV-5M labels: the nearest GeoNames place's keys
    np.testing.assert_array_equal(far.column("unique_country"),
                                  reverse_geocode_keys(far.lat_deg, far.lon_deg)["unique_country"])
    assert not set(far.ids) & set(np.concatenate([o.ids for o in others]))
    other_far = read_split(sample_root, ({"test_far", "val_far"} - {split}).pop(), check_images=False)
    assert not set(far.ids) & set(other_far.ids) and not np.isin(far.lat_deg, other_far.lat_deg).any()


def test_val_far_leaves_every_other_split_as_it_was(tmp_path):
    """val_far comes from its own generator: the splits before it (the engines and results built on
    them) are byte for byte what a sample without it has."""
    with_it = generate(tmp_path / "a", 300, 30, 30, n_test_far=20, n_val_far=20, seed=7, quiet=True)
    without = generate(tmp_path / "b", 300, 30, 30, n_test_far=20, n_val_far=0, seed=7, quiet=True)
    for root in (with_it, without):
        (root / "sample.json").unlink()
    shutil.rmtree(with_it / "images" / "val_far")
    (with_it / "val_far.csv").unlink()
    assert _digest(with_it) == _digest(without)


def test_sequences_leave_every_other_row_as_it_was_and_stay_near_their_anchor(tmp_path):
    """Sequences are appended from their own generators: the split's own rows and images are byte for
    byte those of a sample without them; each sequence's views lie within 3 km of its first row, as
    far from train (1 km) and, for the far splits, from every covered row (100 km) as the others."""
    import pyarrow.csv as pacsv

    with_seq = generate(tmp_path / "a", 300, 30, 30, n_test_far=20, n_val_far=20, seed=7, quiet=True)
    without = generate(tmp_path / "b", 300, 30, 30, n_test_far=20, n_val_far=20, sequence_share=0.0, seed=7,
                       quiet=True)
    assert (with_seq / "train.csv").read_bytes() == (without / "train.csv").read_bytes()
    covered = []
    for split, n in (("val", 30), ("test", 30), ("test_far", 20), ("val_far", 20)):
        a = pacsv.read_csv(with_seq / f"{split}.csv")
        b = pacsv.read_csv(without / f"{split}.csv")
        assert "sequence" not in b.column_names
        assert a.drop_columns(["sequence"]).slice(0, n).equals(b)
        got = read_split(with_seq, split, columns=["sequence"])
        paths = got.image_paths()
        for i in range(n):  # the split's own images, unchanged
            assert paths[i].read_bytes() == (without / paths[i].relative_to(with_seq)).read_bytes()
        seq = got.column("sequence").astype(str)
        for name in set(seq) - {""}:
            rows = np.flatnonzero(seq == name)
            d = haversine_km(got.lat_deg[rows], got.lon_deg[rows], got.lat_deg[rows[0]], got.lon_deg[rows[0]])
            assert d.max() <= 3.0 + 1e-6
            # a new view is a new photo: not the anchor's image again
            first = np.asarray(Image.open(paths[rows[0]])).astype(float)
            assert all(np.abs(np.asarray(Image.open(paths[r])).astype(float) - first).mean() > 1 for r in rows[1:])
        if split in ("val", "test"):
            covered.append(got)
            train = read_split(with_seq, "train", check_images=False)
            d = haversine_km(got.lat_deg[:, None], got.lon_deg[:, None], train.lat_deg[None], train.lon_deg[None])
            assert d.min() >= 1.0
        else:
            lat = np.concatenate([c.lat_deg for c in covered])
            lon = np.concatenate([c.lon_deg for c in covered])
            assert haversine_km(got.lat_deg[:, None], got.lon_deg[:, None], lat[None], lon[None]).min() >= 100.0
