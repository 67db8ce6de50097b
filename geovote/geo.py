"""Geometry on the sphere: great-circle distances and conversions, vectorised over numpy arrays.

All angles in the public API are degrees; names say so (`lat_deg`, `lon_deg`).
"""
from __future__ import annotations

import numpy as np

EARTH_RADIUS_KM = 6371.0  # the radius OSV-5M's metrics use


def haversine_km(lat1_deg, lon1_deg, lat2_deg, lon2_deg) -> np.ndarray:
    """Great-circle distance in km between points given in degrees (broadcasts like numpy).

    Longitudes enter only through sin(dlon / 2)^2, so -179.9 and 179.9 are 0.2 degrees apart:
    the antimeridian needs no special case.
    """
    lat1 = np.radians(np.asarray(lat1_deg, dtype=np.float64))
    lat2 = np.radians(np.asarray(lat2_deg, dtype=np.float64))
    dlat = lat2 - lat1
    dlon = np.radians(np.asarray(lon2_deg, dtype=np.float64) - np.asarray(lon1_deg, dtype=np.float64))
    a = np.sin(dlat / 2) ** 2 + np.cos(lat1) * np.cos(lat2) * np.sin(dlon / 2) ** 2
    # clip: rounding can push a a hair above 1 for antipodal points
    return 2 * EARTH_RADIUS_KM * np.arcsin(np.sqrt(np.clip(a, 0.0, 1.0)))


def latlon_to_unit(lat_deg, lon_deg) -> np.ndarray:
    """(N,) degrees -> (N, 3) unit vectors on the sphere (x towards (0, 0), z towards the north pole)."""
    lat = np.radians(np.asarray(lat_deg, dtype=np.float64))
    lon = np.radians(np.asarray(lon_deg, dtype=np.float64))
    cos_lat = np.cos(lat)
    return np.stack([cos_lat * np.cos(lon), cos_lat * np.sin(lon), np.sin(lat)], axis=-1)


def unit_to_latlon(xyz) -> tuple[np.ndarray, np.ndarray]:
    """(N, 3) vectors (any non-zero length) -> (lat_deg, lon_deg), lon in [-180, 180]."""
    xyz = np.asarray(xyz, dtype=np.float64)
    x, y, z = xyz[..., 0], xyz[..., 1], xyz[..., 2]
    lat = np.degrees(np.arctan2(z, np.hypot(x, y)))
    lon = np.degrees(np.arctan2(y, x))
    return lat, lon


def chord_for_km(dist_km: float) -> float:
    """Euclidean distance between unit vectors whose great-circle distance is `dist_km`."""
    return 2.0 * np.sin(dist_km / (2.0 * EARTH_RADIUS_KM))


def wrap_lon_deg(lon_deg) -> np.ndarray:
    """Longitudes into [-180, 180)."""
    return (np.asarray(lon_deg, dtype=np.float64) + 180.0) % 360.0 - 180.0


def spherical_mean(lat_deg, lon_deg, weights=None) -> tuple[float, float]:
    """Mean location on the sphere (normalised mean of unit vectors): right across the antimeridian."""
    xyz = latlon_to_unit(lat_deg, lon_deg)
    w = np.ones(len(xyz)) if weights is None else np.asarray(weights, dtype=np.float64)
    mean = (xyz * w[:, None]).sum(axis=0)
    lat, lon = unit_to_latlon(mean[None])
    return float(lat[0]), float(lon[0])


def km_for_chord(chord) -> np.ndarray:
    """The great-circle distance (km) of a chord of the unit sphere: the inverse of chord_for_km."""
    return 2.0 * EARTH_RADIUS_KM * np.arcsin(np.clip(np.asarray(chord, np.float64) / 2.0, 0.0, 1.0))


def spacing_km(lat_deg, lon_deg, m: int = 8, batch: int = 1_000_000) -> np.ndarray:
    """(N,) the distance from each point to its m-th nearest other point (km): how densely the points
    cover each one's surroundings, on the scale of m points whatever their number. A k-d tree over unit
    vectors (SciPy's, queried on every core; SciPy comes with scikit-learn): O(N log N), independent of
    the density (counting within a radius is not: a city's point has thousands of others within 100 km
    at 5M). Duplicates count as other points."""
    from scipy.spatial import cKDTree

    xyz = latlon_to_unit(lat_deg, lon_deg)
    n = len(xyz)
    if n <= m:  # fewer other points than m: the farthest any can be
        return np.full(n, np.pi * EARTH_RADIUS_KM)
    tree = cKDTree(xyz)
    out = np.empty(n)
    for start in range(0, n, batch):
        chord, _ = tree.query(xyz[start:start + batch], k=m + 1, workers=-1)  # the point itself comes first
        out[start:start + batch] = km_for_chord(chord[:, -1])
    return out
