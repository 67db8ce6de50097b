"""Calibrated answers: the metrics against hand computations, the calibration against known probabilities,
the radius against its definition."""
import numpy as np
import pytest

from geovote.metrics import accuracy_vs_coverage, calibration_error, reliability
from retrieve.calibrate import LEVELS_KM, Calibration, apply, fit, radius_km


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
    calibration gives those probabilities back, and is calibrated (small ECE) on fresh draws."""
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
    # 20,000 draws estimate the slope to about 1%: within 0.035 everywhere, within 0.02 for 99%
    err = np.abs(p[:, c] - 1 / (1 + np.exp(-2 * xt[:, 0])))
    assert err.max() < 0.035 and np.percentile(err, 99) < 0.02
    for j, level in enumerate(LEVELS_KM):
        assert calibration_error(p[:, j], dt <= level) < 0.02, level
    assert np.all(np.diff(p, axis=1) >= 0)  # never less likely within a larger distance


def test_one_class_level_is_a_constant_and_the_round_trip_is_exact(tmp_path):
    x = np.random.default_rng(1).normal(0, 1, (50, 3))
    d = np.full(50, 100.0)  # every truth within 200 km, none within 25
    cal = fit(x, d, ("a", "b", "c"), "t")
    p = cal.within(x)
    assert np.all(p[:, 0] < 0.02) and np.all(p[:, 2] > 0.98)
    back = Calibration.load(cal.save(tmp_path / "c.json"), ("a", "b", "c"))
    np.testing.assert_array_equal(back.within(x), p)
    with pytest.raises(ValueError, match="other features"):
        Calibration.load(tmp_path / "c.json", ("a", "b"))


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


def test_mixture_of_experts_recovers_both_kinds_of_photo(tmp_path):
    """Two kinds of photo, mostly told apart by feature 1: for near ones P(d <= 200) = sigmoid(2 x0), for
    far ones it is 5% whatever x0. One logistic regression over both cannot give both (x0 has one
    weight); the mixture is calibrated on fresh draws of the same population, recovers each kind's own
    probability where the kinds do not overlap, and round-trips through JSON."""
    rng = np.random.default_rng(0)

    def draw(n, far):
        x = np.c_[rng.normal(0, 1, n), rng.normal(4.0 if far else 0.0, 1, n)]
        p = np.full(n, 0.05) if far else 1 / (1 + np.exp(-2 * x[:, 0]))
        u = rng.uniform(0, 1, n)
        d = 200 * np.exp(np.log(u / (1 - u)) - np.log(p / (1 - p)))  # within 200 km with probability p
        return x, d, p

    def population(n):  # two near photos for every far one
        (xn, dn, pn), (xf, df, pf) = draw(2 * n // 3, False), draw(n // 3, True)
        return np.r_[xn, xf], np.r_[dn, df], np.r_[pn, pf], np.r_[np.zeros(len(xn), bool), np.ones(len(xf), bool)]

    x, d, _, is_far = population(30000)
    mixed, single = fit(x, d, ("a", "b"), "t", is_far), fit(x, d, ("a", "b"), "t")
    xt, dt, pt, far_t = population(30000)
    p = mixed.within(xt)
    for j, level in enumerate(LEVELS_KM):
        assert calibration_error(p[:, j], dt <= level) < 0.02, level
    c = LEVELS_KM.index(200)
    for clear in (far_t & (xt[:, 1] > 3.0), ~far_t & (xt[:, 1] < 1.0)):  # away from the other kind
        assert np.abs(p[clear, c] - pt[clear]).mean() < 0.02
        assert np.abs(single.within(xt[clear])[:, c] - pt[clear]).mean() > 0.05  # why the mixture exists
    back = Calibration.load(mixed.save(tmp_path / "m.json"), ("a", "b"))
    np.testing.assert_array_equal(back.within(xt), p)


def test_the_far_pick_answers_where_p_far_passes_the_threshold():
    """Features (a, b, is_alternative, is_far_pick); P(far) = sigmoid(5 a), the near expert's P(within) rises
    with b, the far expert's falls with is_far_pick. Query 0 looks far (a = 1): its far pick answers, ahead of the
    vote's peak and runner-up, with the probabilities of its own features. Query 1 looks near (a = -1):
    the most probable candidate answers and there is no far pick among its candidates."""
    from retrieve.predict import Prediction

    n_levels = len(LEVELS_KM)
    cal = Calibration(["a", "b", "is_alternative", "is_far_pick"], [0.0] * 4, [1.0] * 4,
                      [[0.0, 2.0, 0.0, 0.0]] * n_levels, [0.0] * n_levels, "hand", 0,
                      far_coef=[[0.0, 0.0, 0.0, -1.0]] * n_levels, far_intercept=[-2.0] * n_levels,
                      far_odds_coef=[5.0, 0.0, 0.0, 0.0], far_odds_intercept=0.0)
    feats = np.array([[1.0, 0.5, 0, 0], [-1.0, 0.2, 0, 0]])
    alt_feats = np.array([[[1.0, 0.9, 1, 0]], [[-1.0, 0.8, 1, 0]]])  # each runner-up more probable
    far_feats = np.array([[1.0, -1.0, 0, 1], [-1.0, -1.0, 0, 1]])
    pred = Prediction(np.array([10.0, 20.0]), np.array([11.0, 21.0]), np.zeros(2), np.array([[12.0], [22.0]]),
                      np.array([[13.0], [23.0]]), np.zeros((2, 1)), feats, alt_feats,
                      far_lat_deg=np.array([14.0, 24.0]), far_lon_deg=np.array([15.0, 25.0]),
                      far_features=far_feats)
    out = apply(cal, pred, far_above=0.5)
    # query 0: the far pick, then the runner-up (more probable within 200 km), then the peak
    assert out.far_answered.tolist() == [True, False]
    assert (out.lat_deg[0], out.lon_deg[0]) == (14.0, 15.0)
    np.testing.assert_array_equal(out.within_km[0], cal.within(far_feats[0]))
    assert out.alt_lat_deg[0].tolist() == [12.0, 10.0]
    p_far = 1 / (1 + np.exp(-5.0))
    near = 1 / (1 + np.exp(-2 * 0.9))
    assert out.alt_score[0, 0] == pytest.approx((1 - p_far) * near + p_far / (1 + np.exp(2.0)))
    assert out.far_probability[0] == pytest.approx(1 / (1 + np.exp(-5.0)))  # of the runner-up: a = 1 too
    assert out.alt_score[0, 0] > out.confidence[0]  # the far pick is chosen for GeoScore, not P(200 km)
    # query 1: the runner-up answers, the peak follows, the far pick is not a candidate
    assert (out.lat_deg[1], out.alt_lat_deg[1, 0]) == (22.0, 20.0) and np.isnan(out.alt_lat_deg[1, 1])
    # never answering (far_above 1): the candidates of the plain calibrated decision
    plain = apply(cal, pred)
    assert not plain.far_answered.any() and plain.lat_deg.tolist() == [12.0, 22.0]
    # a peak on the far pick's very point (an answer moved onto that neighbour) is not listed twice
    from dataclasses import replace

    on = apply(cal, replace(pred, lat_deg=np.array([14.0, 20.0]), lon_deg=np.array([15.0, 21.0])), 0.5)
    assert (on.lat_deg[0], on.lon_deg[0]) == (14.0, 15.0)
    assert on.alt_lat_deg[0, 0] == 12.0 and np.isnan(on.alt_lat_deg[0, 1:]).all() and on.alt_score[0, 1] == 0
