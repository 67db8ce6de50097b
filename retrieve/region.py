"""Region constraints: answer only from training images inside some countries and/or a box, and answer
inside it (`retrieve.query --within FR,BE --bbox S,W,N,E`, the same form fields of `POST /locate`).

Countries are ISO 3166 alpha-2 codes, decided as OSV-5M's labels and metrics decide them: the country of
the nearest GeoNames place (`reverse_geocoder`, geovote.geocode). A box is south, west, north, east in
degrees; west > east is a box across the antimeridian (e.g. 50,170,60,-170 spans 20 degrees of
longitude around 180). Both given: the intersection.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


class RegionError(ValueError):
    """A region that cannot be searched: unknown codes, a malformed box, no training image inside."""


@dataclass(frozen=True)
class Region:
    countries: tuple[str, ...] = ()
    bbox: tuple[float, float, float, float] | None = None  # south, west, north, east (degrees)

    def __bool__(self) -> bool:
        return bool(self.countries) or self.bbox is not None

    def describe(self) -> str:
        parts = []
        if self.countries:
            parts.append(",".join(self.countries))
        if self.bbox is not None:
            parts.append("box " + ",".join(f"{v:g}" for v in self.bbox))
        return " and ".join(parts)

    def in_box(self, lat_deg, lon_deg) -> np.ndarray:
        lat, lon = np.asarray(lat_deg, float), np.asarray(lon_deg, float)
        if self.bbox is None:
            return np.ones(lat.shape, bool)
        s, w, n, e = self.bbox
        in_lon = (lon >= w) & (lon <= e) if w <= e else (lon >= w) | (lon <= e)  # across the antimeridian
        return (lat >= s) & (lat <= n) & in_lon

    def contains(self, lat_deg, lon_deg, country_of=None) -> np.ndarray:
        """Which points lie inside. `country_of(lat, lon) -> codes` (default: reverse geocoding)."""
        inside = self.in_box(lat_deg, lon_deg)
        if self.countries:
            lat, lon = np.asarray(lat_deg, float), np.asarray(lon_deg, float)
            finite = np.isfinite(lat) & np.isfinite(lon)
            codes = np.full(lat.shape, "", object)
            if finite.any():
                codes[finite] = (country_of or country_codes)(lat[finite], lon[finite])
            inside &= np.isin(codes.astype(str), list(self.countries))
        return inside


def country_codes(lat_deg, lon_deg) -> np.ndarray:
    from geovote.geocode import reverse_geocode

    return reverse_geocode(lat_deg, lon_deg)["country"].astype(str)


def known_countries() -> set[str]:
    from geovote.geocode import places

    return set(places().cc.astype(str))


def parse_region(within: str | None = None, bbox: str | None = None) -> Region:
    """A Region from the command line's or the form's text, or RegionError saying what is wrong."""
    countries: tuple[str, ...] = ()
    if within is not None:  # given, so it must name a country: an empty one would answer from anywhere
        codes = [c.strip().upper() for c in within.split(",") if c.strip()]
        if not codes:
            raise RegionError(f"--within {within!r} names no country: give ISO 3166 alpha-2 codes (e.g. "
                              "FR,DE), or leave it out to answer from anywhere")
        bad_form = [c for c in codes if len(c) != 2 or not c.isalpha()]
        if bad_form:
            raise RegionError(f"--within takes ISO 3166 alpha-2 country codes (e.g. FR,DE), not "
                              f"{', '.join(bad_form)}")
        unknown = sorted(set(codes) - known_countries())
        if unknown:
            raise RegionError(f"unknown country codes {', '.join(unknown)}: no GeoNames place has them "
                              "(ISO 3166 alpha-2, e.g. GB not UK)")
        countries = tuple(dict.fromkeys(codes))
    box = None
    if bbox is not None:
        try:
            s, w, n, e = (float(v) for v in bbox.split(","))
        except ValueError:
            raise RegionError(f"--bbox takes four numbers south,west,north,east in degrees, got "
                              f"{bbox!r}") from None
        if not all(np.isfinite([s, w, n, e])):
            raise RegionError(f"--bbox {bbox}: not finite numbers")
        if not (-90 <= s <= 90 and -90 <= n <= 90):
            raise RegionError(f"--bbox {bbox}: latitudes must be within [-90, 90]")
        if not (-180 <= w <= 180 and -180 <= e <= 180):
            raise RegionError(f"--bbox {bbox}: longitudes must be within [-180, 180]")
        if s >= n:
            raise RegionError(f"--bbox {bbox}: south ({s:g}) must be below north ({n:g})")
        if w == e:
            raise RegionError(f"--bbox {bbox}: west and east are equal: an empty box (west > east "
                              "crosses the antimeridian)")
        box = (s, w, n, e)
    return Region(countries, box)
