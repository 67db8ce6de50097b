"""The validation slice carved out of train (geovote.holdout) against a brute-force reading of its rule."""
import numpy as np
import pytest

from geovote.geo import haversine_km
from geovote.holdout import holdout


def test_holdout_excludes_exactly_the_rows_their_sequences_and_everything_within_1_km():
    rng = np.random.default_rng(1)
    n = 3000
    # clustered points, so that many rows sit within 1 km of others
    centers = rng.uniform([-50, -170], [60, 170], (150, 2))
    c = rng.integers(0, len(centers), n)
    lat = centers[c, 0] + rng.normal(0, 0.01, n)  # ~1 km spread
    lon = centers[c, 1] + rng.normal(0, 0.01, n)
    seq = np.array([f"s{i // 7}" for i in rng.permutation(n)])
    seq[::11] = ""  # rows without a sequence never join one another
    h = holdout(lat, lon, seq, n=100, seed=3)
    assert len(h.rows) == 100 and np.all(np.diff(h.rows) > 0)
    d_km = haversine_km(lat[:, None], lon[:, None], lat[h.rows][None], lon[h.rows][None])  # (N, 100)
    held_seqs = set(seq[h.rows]) - {""}
    expected = (d_km < 1.0).any(1) | np.isin(seq, list(held_seqs))
    expected[h.rows] = True
    # the boundary itself (float rounding at exactly 1 km) is not tested: no pair sits within 1 mm of it
    assert not np.any(np.abs(d_km - 1.0) < 1e-6)
    np.testing.assert_array_equal(h.excluded, expected)
    assert expected.sum() > 2 * len(h.rows)  # the rule removed neighbours, not only the rows
    np.testing.assert_array_equal(h.train_rows, np.flatnonzero(~expected))


def test_holdout_is_seeded_and_refuses_a_split_too_small():
    lat, lon = np.linspace(-60, 60, 50), np.linspace(-170, 170, 50)
    a, b = holdout(lat, lon, n=10, seed=0), holdout(lat, lon, n=10, seed=0)
    np.testing.assert_array_equal(a.rows, b.rows)
    assert len(holdout(lat, lon, n=1000).rows) == 5  # at most a tenth of train is held out
    with pytest.raises(ValueError, match="too few"):
        holdout(lat[:9], lon[:9])


def test_rows_without_a_sequence_share_none():
    """The CSV reader gives None for an empty `sequence`: those rows are not one shared sequence."""
    rng = np.random.default_rng(2)
    lat, lon = rng.uniform(-60, 60, 1000), rng.uniform(-180, 180, 1000)  # spread out: no one within 1 km
    seq = np.array([None if i % 2 else f"s{i}" for i in range(1000)], dtype=object)
    h = holdout(lat, lon, seq, n=20, seed=0)
    np.testing.assert_array_equal(np.flatnonzero(h.excluded), h.rows)  # the 20 rows and nothing else
