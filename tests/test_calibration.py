"""The one decision: the metrics against hand computations, the distance model against known probabilities
and against scikit-learn's own predictions, the expected GeoScore against a numerical integral, the radius
against its definition, the choice among candidates by hand."""
import numpy as np
import pytest

from geovote.metrics import accuracy_vs_coverage, calibration_error, reliability
from retrieve.calibrate import LEVELS_KM, TREES, Calibration, CalibrationError, decide, expected_weights, fit, radius_km


def test_calibration_error_by_hand():
    p = np.array([0.05, 0.05, 0.95, 0.95, 0.55])
    y = np.array([0, 1, 1, 1, 0])
    # bins: [0,.1): mean p .05, freq .5 (n 2); [.5,.6): .55 vs 0 (n 1); [.9,1]: .95 vs 1 (n 2)
    want = (2 * 0.45 + 1 * 0.55 + 2 * 0.05) / 5
    assert calibration_error(p, y) == pytest.approx(want)
    mp, freq, n = reliability(p, y)
    assert n.tolist() == [2, 0, 0, 0, 0, 1, 0, 0, 0, 2] and freq[0] == 0.5 and np.isnan(mp[1])


def test_accuracy_vs_coverage_by_hand():
    cov, acc, auc = accuracy_vs_coverage([0.9, 0.1, 0.5, 0.7], [1, 0, 0, 1])
    # most confident first: 0.9 (hit), 0.7 (hit), 0.5 (miss), 0.1 (miss)
    np.testing.assert_allclose(cov, [0.25, 0.5, 0.75, 1.0])
    np.testing.assert_allclose(acc, [1, 1, 2 / 3, 0.5])
    assert auc == pytest.approx((1 + 1 + 2 / 3 + 0.5) / 4)


def test_fit_recovers_known_probabilities():
    """Distances drawn so that P(d <= level) is a known logistic function of one feature: the fitted
    model gives those probabilities back (to the steps of its trees), calibrated on fresh draws."""
    rng = np.random.default_rng(0)

    def draw(n):
        x = rng.normal(0, 1, (n, 2))  # the second feature is noise
        u = rng.uniform(0, 1, n)
        # P(d <= 200) = sigmoid(2 x0); d = 200 * exp(logit(u) - 2 x0) puts the truth within 200 km exactly then
        d = 200 * np.exp(np.log(u / (1 - u)) - 2 * x[:, 0])
        return x, d

    x, d = draw(20000)
    cal = fit(x, d, ("a", "b"), "test")
    xt, dt = draw(20000)
    p = cal.within(xt)
    c = LEVELS_KM.index(200)
    err = np.abs(p[:, c] - 1 / (1 + np.exp(-2 * xt[:, 0])))
    assert err.mean() < 0.02 and np.percentile(err, 99) < 0.08
    for j, level in enumerate(LEVELS_KM):
        assert calibration_error(p[:, j], dt <= level) < 0.02, level
    assert np.all(np.diff(p, axis=1) >= 0)  # never less likely within a larger distance


def test_the_numpy_trees_are_scikit_learns_model(tmp_path):
    """The stored arrays, walked in numpy, give scikit-learn's own probabilities (missing values
    included), through a JSON round trip; a level with one class is a constant."""
    from sklearn.ensemble import HistGradientBoostingClassifier

    rng = np.random.default_rng(1)
    x = rng.normal(0, 1, (3000, 3))
    x[rng.uniform(size=x.shape) < 0.05] = np.nan  # missing values take the trees' own side
    d = np.exp(rng.normal(5 - x[:, 0] - np.nan_to_num(x[:, 1]) * x[:, 2] ** 2, 1.5))
    d[np.isnan(d)] = 50.0
    cal = Calibration.load(fit(x, d, ("a", "b", "c"), "t").save(tmp_path / "c.json"), ("a", "b", "c"))
    for j, level in enumerate(LEVELS_KM):
        y = d <= level
        if y.all() or not y.any():
            continue
        model = HistGradientBoostingClassifier(**TREES, early_stopping=False, random_state=0).fit(x, y)
        ours = 1 / (1 + np.exp(-cal.raw(x)[:, j]))
        np.testing.assert_allclose(ours, model.predict_proba(x)[:, 1], rtol=0, atol=1e-12)
    everywhere = fit(x[:50], np.full(50, 100.0), ("a", "b", "c"), "t").within(x[:50])  # within 200, not 25
    assert np.all(everywhere[:, 0] < 0.02) and np.all(everywhere[:, 2] > 0.98)
    with pytest.raises(CalibrationError, match="other features"):
        Calibration.load(tmp_path / "c.json", ("a", "b"))
    old = tmp_path / "old.json"
    old.write_text('{"features": ["a"], "mean": [0], "scale": [1], "coef": [[0]], "intercept": [0]}')
    with pytest.raises(CalibrationError, match="older calibration"):
        Calibration.load(old, ("a",))


def test_expected_geoscore_is_the_integral_over_the_interpolated_cdf():
    """a . p + b against a direct numerical integral of 5000 exp(-d / 1492.7) dF, F interpolated
    linearly in log(1 + d) between the levels (0 at 0 km, 1 at half the circumference)."""
    a, b = expected_weights()
    knots = np.log1p([0.0, *LEVELS_KM, np.pi * 6371.0])
    for p in ([0.1, 0.5, 0.8, 0.95, 0.99], [0.0, 0.0, 0.0, 0.0, 0.0], [1.0] * 5, [0.01, 0.2, 0.3, 0.6, 0.9]):
        u = np.linspace(0, knots[-1], 400001)
        f = np.interp(u, knots, [0.0, *p, 1.0])
        mid = np.expm1((u[1:] + u[:-1]) / 2)
        want = np.sum(np.diff(f) * 5000 * np.exp(-mid / 1492.7))
        assert np.dot(a, p) + b == pytest.approx(want, abs=0.05)
    assert np.dot(a, [1.0] * 5) + b > 4990  # all within 1 km: nearly the full 5000


def test_radius_is_where_the_probability_reaches_90_percent():
    levels = np.log1p([0.0, *LEVELS_KM, np.pi * 6371.0])
    within = np.array([[0.1, 0.5, 0.8, 0.95, 0.99],  # crosses between 200 and 750
                       [0.95, 0.96, 0.97, 0.98, 0.99],  # already at 1 km
                       [0.0, 0.0, 0.1, 0.2, 0.5]])  # beyond 2500 km: up to the far side of the Earth
    r = radius_km(within)
    t = (0.9 - 0.8) / (0.95 - 0.8)
    assert r[0] == pytest.approx(np.expm1(levels[3] + t * (levels[4] - levels[3])))
    assert 0 < r[1] < 1
    assert 2500 < r[2] < np.pi * 6371.0


def _stump(feature: int, threshold: float, low: float, high: float) -> Calibration:
    """A model of one tree per level: feature <= threshold -> raw `low`, else `high` (the same at every
    level, so P is equal across levels)."""
    n = len(LEVELS_KM)
    tree = lambda values: [[values]] * n  # noqa: E731
    return Calibration(features=["f0", "f1"], levels_km=list(LEVELS_KM), baseline=[0.0] * n,
                       feature=tree([feature, -1, -1]), threshold=tree([threshold, 0.0, 0.0]),
                       missing_left=tree([1, 0, 0]), left=tree([1, 0, 0]), right=tree([2, 0, 0]),
                       value=tree([0.0, low, high]), depth=1, fitted_on="hand", images=0)


def test_the_candidate_of_highest_expected_geoscore_answers_with_its_own_probabilities():
    """Query 0: the third candidate scores highest (feature 0 high), then the first; the second is the
    first's very place and is not listed again. Query 1: no candidate (no neighbours): no answer.
    Without a model the table's first candidate answers with its raw share."""
    from retrieve.candidates import FEATURES, Candidates

    cal = _stump(0, 0.5, -1.0, 2.0)
    nf = len(FEATURES)
    feats = np.full((2, 3, nf), np.nan)
    feats[0] = 0.0
    feats[0, :, 0] = [0.2, 0.1, 0.9]  # column 0 of FEATURES (top_similarity) stands for the stump's feature
    feats[0, :, FEATURES.index("share_2h")] = [0.6, 0.6, 0.3]
    table = Candidates(np.array([[10.0, 10.0, 30.0], [np.nan] * 3]), np.array([[20.0, 20.0, 40.0], [np.nan] * 3]),
                       np.array([[0, 3, 3], [-1, -1, -1]]), feats)
    cal.features = list(FEATURES)
    out = decide(cal, table, n_alternatives=2)
    assert (out.lat_deg[0], out.lon_deg[0]) == (30.0, 40.0) and out.answer_kind[0] == 3
    p_hi, p_lo = 1 / (1 + np.exp(-2.0)), 1 / (1 + np.exp(1.0))
    np.testing.assert_allclose(out.within_km[0], p_hi)
    assert out.confidence[0] == pytest.approx(p_hi)
    a, b = expected_weights()
    assert out.expected_geoscore[0] == pytest.approx(p_hi * a.sum() + b)
    assert out.alt_lat_deg[0].tolist()[0] == 10.0 and np.isnan(out.alt_lat_deg[0, 1])  # 10/20 once
    assert out.alt_score[0, 0] == pytest.approx(p_lo)
    assert np.isnan(out.lat_deg[1]) and out.confidence[1] == 0 and np.isnan(out.radius_km[1])
    raw = decide(None, table, n_alternatives=2)
    assert (raw.lat_deg[0], raw.confidence[0]) == (10.0, 0.6) and raw.alt_lat_deg[0, 0] == 30.0
    assert raw.within_km is None
