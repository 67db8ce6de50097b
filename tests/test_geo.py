import math

import numpy as np
import pytest

from geovote.geo import (EARTH_RADIUS_KM, chord_for_km, haversine_km, latlon_to_unit, spherical_mean,
                         unit_to_latlon, wrap_lon_deg)

ONE_DEGREE_KM = 2 * math.pi * EARTH_RADIUS_KM / 360  # 111.195 km


def test_haversine_hand_computed():
    assert haversine_km(0, 0, 0, 1) == pytest.approx(ONE_DEGREE_KM)
    assert haversine_km(0, 0, 1, 0) == pytest.approx(ONE_DEGREE_KM)
    assert haversine_km(90, 0, -90, 0) == pytest.approx(math.pi * EARTH_RADIUS_KM)
    assert haversine_km(0, 0, 0, 180) == pytest.approx(math.pi * EARTH_RADIUS_KM)
    assert haversine_km(12.3, 45.6, 12.3, 45.6) == 0.0
    # 60N: a degree of longitude is cos(60) as long, to first order
    assert haversine_km(60, 10, 60, 10.01) == pytest.approx(0.01 * ONE_DEGREE_KM * 0.5, rel=1e-4)


def test_haversine_across_the_antimeridian():
    assert haversine_km(0, 179.5, 0, -179.5) == pytest.approx(ONE_DEGREE_KM)
    assert haversine_km(-16.5, 179.9, -16.5, -179.9) == pytest.approx(haversine_km(-16.5, -0.1, -16.5, 0.1))
    # at the pole, every longitude is the same point
    assert haversine_km(90, -170, 90, 170) == pytest.approx(0.0, abs=1e-9)


def test_haversine_matches_the_angle_between_unit_vectors():
    rng = np.random.default_rng(0)
    lat1, lat2 = rng.uniform(-90, 90, (2, 5000))
    lon1, lon2 = rng.uniform(-180, 180, (2, 5000))
    cos = np.sum(latlon_to_unit(lat1, lon1) * latlon_to_unit(lat2, lon2), axis=1)
    brute = EARTH_RADIUS_KM * np.arccos(np.clip(cos, -1, 1))
    d = haversine_km(lat1, lon1, lat2, lon2)
    far = brute > 1  # arccos loses precision at tiny angles
    np.testing.assert_allclose(d[far], brute[far], rtol=1e-7)
    np.testing.assert_allclose(d, haversine_km(lat2, lon2, lat1, lon1))  # symmetric


def test_unit_vectors_round_trip_and_wrap():
    rng = np.random.default_rng(1)
    lat, lon = rng.uniform(-89, 89, 100), rng.uniform(-179, 179, 100)
    lat2, lon2 = unit_to_latlon(latlon_to_unit(lat, lon))
    np.testing.assert_allclose(lat2, lat, atol=1e-9)
    np.testing.assert_allclose(lon2, lon, atol=1e-9)
    np.testing.assert_allclose(wrap_lon_deg([180, 181, -181, 540]), [-180, -179, 179, -180])
    assert chord_for_km(math.pi * EARTH_RADIUS_KM) == pytest.approx(2.0)


def test_spherical_mean_across_the_antimeridian():
    lat, lon = spherical_mean([0, 0], [179, -179])
    assert lat == pytest.approx(0, abs=1e-9)
    assert abs(lon) == pytest.approx(180)
    lat, lon = spherical_mean([10, 20], [0, 0], weights=[1, 0])
    assert (lat, lon) == (pytest.approx(10), pytest.approx(0))


def test_spacing_is_the_distance_to_the_mth_nearest_other_point():
    from geovote.geo import spacing_km

    rng = np.random.default_rng(3)
    lat = np.r_[rng.uniform(-80, 80, 300), 10.0, 10.0]  # and a duplicate pair, which counts
    lon = np.r_[rng.uniform(-180, 180, 300), 20.0, 20.0]
    d = haversine_km(lat[:, None], lon[:, None], lat[None], lon[None])
    np.fill_diagonal(d, np.inf)
    for m in (1, 4):
        want = np.sort(d, axis=1)[:, m - 1]
        np.testing.assert_allclose(spacing_km(lat, lon, m, batch=50), want, rtol=1e-6, atol=1e-6)
    assert spacing_km(lat, lon, 1)[-1] == pytest.approx(0.0, abs=1e-6)
    np.testing.assert_allclose(spacing_km(lat[:3], lon[:3], 4), np.pi * 6371.0)  # fewer than m others
