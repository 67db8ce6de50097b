"""Calibrated answers: from what the vote saw (retrieve.predict.FEATURES) to the probability that the true
place lies within 1, 25, 200, 750 and 2500 km of an answer, and the radius that holds it with 90%.

One logistic regression per distance (scikit-learn's, fitted by retrieve.tuning on the tuning split: val,
or train images held out of their own search), over standardised features. When the tuning also has views
of far places (val_far: places far from every training place), the probability is a mixture of experts:
    P(within d) = (1 - P(far)) P_near(within d) + P(far) P_far(within d)
with a third logistic regression, P(far), telling the two kinds of photo apart (fitted with them in the
proportion the tuning has them), and each expert fitted on its own kind only. One regression over both
kinds cannot do this: the vote's shares say much about a covered place's answer and little about a far
one's, and a linear model must give a feature one weight for both.
Stored as plain JSON beside retrieve.json (`calibration.json`): applying it is dot products and sigmoids in
numpy, so a query never imports scikit-learn, and nothing is unpickled. Probabilities are made
non-decreasing in the distance.

The radius: P(within d) is interpolated linearly in log(1 + d) between the levels, with P(0) = 0 and
P(half the Earth's circumference) = 1; the radius is where it reaches 90%.
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np

from geovote.geo import EARTH_RADIUS_KM

LEVELS_KM = (1, 25, 200, 750, 2500)
RADIUS_PROBABILITY = 0.9
FARTHEST_KM = math.pi * EARTH_RADIUS_KM  # nothing on Earth is further from an answer
CONFIDENCE_KM = 200  # `confidence` is P(within 200 km)


class CalibrationError(ValueError):
    pass


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-np.clip(z, -50, 50)))


@dataclass
class Calibration:
    features: list[str]
    mean: list[float]
    scale: list[float]
    coef: list[list[float]]  # (levels, features)
    intercept: list[float]
    fitted_on: str
    images: int
    levels_km: list[int] = None  # type: ignore[assignment]
    # the far expert and the detector (None: fitted without far places, `coef` answers alone)
    far_coef: list[list[float]] | None = None  # (levels, features)
    far_intercept: list[float] | None = None
    far_odds_coef: list[float] | None = None  # (features,): P(far)
    far_odds_intercept: float | None = None

    def __post_init__(self):
        self.levels_km = list(self.levels_km or LEVELS_KM)

    def _standardised(self, features: np.ndarray) -> np.ndarray:
        return (np.asarray(features, np.float64) - np.asarray(self.mean)) / np.asarray(self.scale)

    def within(self, features: np.ndarray) -> np.ndarray:
        """(..., F) features -> (..., levels) probabilities, non-decreasing along the levels."""
        x = self._standardised(features)
        p = _sigmoid(x @ np.asarray(self.coef).T + np.asarray(self.intercept))
        if self.far_coef is not None:
            far = self.far_probability(features)[..., None]
            p_far = _sigmoid(x @ np.asarray(self.far_coef).T + np.asarray(self.far_intercept))
            p = (1.0 - far) * p + far * p_far
        return np.maximum.accumulate(p, axis=-1)

    def far_probability(self, features: np.ndarray) -> np.ndarray | None:
        """(...) P(far) of each candidate: that its photo is of a place far from every training place;
        None without a far expert."""
        if self.far_odds_coef is None:
            return None
        x = self._standardised(features)
        return _sigmoid(x @ np.asarray(self.far_odds_coef) + self.far_odds_intercept)

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        tmp = path.with_name(path.name + ".partial")
        tmp.write_text(json.dumps(asdict(self), indent=1) + "\n")
        tmp.replace(path)
        return path

    @classmethod
    def load(cls, path: str | Path, features: tuple[str, ...]) -> "Calibration":
        path = Path(path)
        try:
            cal = cls(**json.loads(path.read_text()))
        except (OSError, ValueError, TypeError) as e:
            raise CalibrationError(f"{path}: unreadable ({e}); rerun `python -m retrieve.tune`") from None
        if list(cal.features) != list(features):
            raise CalibrationError(f"{path} was fitted on other features ({', '.join(cal.features)}); rerun "
                                   "`python -m retrieve.tune`")
        return cal


def training_rows(pred, true_lat, true_lon) -> tuple[np.ndarray, np.ndarray]:
    """(features, distance to the truth in km) of every candidate of a Prediction: the answers, their
    alternatives and the far picks where computed, so that each one's probability is calibrated
    (`is_alternative` and `is_far_pick` tell them apart)."""
    from geovote.geo import haversine_km

    true_lat, true_lon = np.asarray(true_lat), np.asarray(true_lon)
    has = np.isfinite(pred.alt_lat_deg)
    x = [pred.features, pred.alt_features[has]]
    d = [haversine_km(pred.lat_deg, pred.lon_deg, true_lat, true_lon),
         haversine_km(pred.alt_lat_deg, pred.alt_lon_deg, true_lat[:, None], true_lon[:, None])[has]]
    if pred.far_lat_deg is not None:
        x.append(pred.far_features)
        d.append(haversine_km(pred.far_lat_deg, pred.far_lon_deg, true_lat, true_lon))
    return np.concatenate(x), np.concatenate(d)


def _logistic(xs: np.ndarray, y: np.ndarray) -> tuple[list[float], float]:
    """(coef, intercept) of P(y | xs); with one class, a constant pulled off 0 and 1 by one pseudo-count
    each."""
    from sklearn.linear_model import LogisticRegression

    if y.all() or not y.any():
        p = (y.sum() + 0.5) / (len(y) + 1.0)
        return [0.0] * xs.shape[1], float(np.log(p / (1 - p)))
    model = LogisticRegression(C=1.0, max_iter=2000).fit(xs, y)
    return model.coef_[0].tolist(), float(model.intercept_[0])


def _levels(xs: np.ndarray, d: np.ndarray) -> tuple[list[list[float]], list[float]]:
    """One logistic regression per level of LEVELS_KM, P(d <= level | xs)."""
    fitted = [_logistic(xs, d <= level) for level in LEVELS_KM]
    return [c for c, _ in fitted], [b for _, b in fitted]


def fit(features: np.ndarray, dist_km: np.ndarray, names: tuple[str, ...], fitted_on: str,
        is_far: np.ndarray | None = None) -> Calibration:
    """P(dist_km <= level | features) for each level of LEVELS_KM. `is_far`: which rows are views of far
    places (the tuning split's far counterpart); with any, the mixture of experts of the module's doc."""
    x = np.asarray(features, np.float64)
    d = np.asarray(dist_km, np.float64)
    far = np.zeros(len(d), bool) if is_far is None else np.asarray(is_far, bool)
    ok = np.all(np.isfinite(x), axis=1) & np.isfinite(d)
    x, d, far = x[ok], d[ok], far[ok]
    mean, scale = x.mean(0), x.std(0)
    scale = np.where(scale > 1e-12, scale, 1.0)
    xs = (x - mean) / scale
    if not far.any():
        coef, intercept = _levels(xs, d)
        return Calibration(list(names), mean.tolist(), scale.tolist(), coef, intercept, fitted_on,
                           int(len(d)))
    coef, intercept = _levels(xs[~far], d[~far])
    far_coef, far_intercept = _levels(xs[far], d[far])
    odds_coef, odds_intercept = _logistic(xs, far)
    return Calibration(list(names), mean.tolist(), scale.tolist(), coef, intercept, fitted_on, int(len(d)),
                       far_coef=far_coef, far_intercept=far_intercept, far_odds_coef=odds_coef,
                       far_odds_intercept=odds_intercept)


def radius_km(within: np.ndarray, levels_km=LEVELS_KM, probability: float = RADIUS_PROBABILITY) -> np.ndarray:
    """(..., levels) probabilities -> (...) the distance where P(within) reaches `probability`."""
    p = np.asarray(within, np.float64)
    shape = p.shape[:-1]
    p = p.reshape(-1, p.shape[-1])
    grid_p = np.concatenate([np.zeros((len(p), 1)), p, np.ones((len(p), 1))], axis=1)
    grid_x = np.log1p(np.array([0.0, *levels_km, FARTHEST_KM]))
    out = np.empty(len(p))
    for i, row in enumerate(grid_p):  # np.interp needs increasing x: the probabilities are non-decreasing
        j = int(np.argmax(row >= probability))
        lo, hi = row[j - 1], row[j]
        t = 1.0 if hi <= lo else (probability - lo) / (hi - lo)
        out[i] = np.expm1(grid_x[j - 1] + t * (grid_x[j] - grid_x[j - 1]))
    return out.reshape(shape)


def apply(cal: Calibration, pred, far_above: float = 1.0):
    """The Prediction with calibrated probabilities: within_km, radius_km, confidence = P(within 200 km),
    and the same measure for every alternative (alt_score). The answer is the most probable candidate:
    the vote's peak, unless a runner-up peak is more likely within 200 km, when the two change
    places. Alternatives best first.
    Far places: where the calibration has a far expert and puts P(far) of that answer above `far_above`,
    the far pick (retrieve.predict.VoteConfig.far_above) answers instead, ahead of every candidate: the
    choice of the expected GeoScore, not of P(within 200 km), so an alternative can then be more likely
    within 200 km than the answer (each keeps its own probability); a candidate on the same point is
    dropped. `far_probability` is the P(far) that decides: that of the most probable candidate (None
    without a far expert); `far_answered` where the far pick answers."""
    from geovote.geo import haversine_km

    c = cal.levels_km.index(CONFIDENCE_KM)
    none = ~np.isfinite(pred.lat_deg)
    # candidates side by side: 0 the vote's peak, 1.. its runner-ups
    lat = np.concatenate([pred.lat_deg[:, None], pred.alt_lat_deg], 1)
    lon = np.concatenate([pred.lon_deg[:, None], pred.alt_lon_deg], 1)
    feats = np.concatenate([pred.features[:, None], pred.alt_features], 1)
    within = cal.within(feats)
    score = np.where(np.isfinite(lat), within[..., c], -1.0)
    order = np.argsort(-score, axis=1, kind="stable")  # the peak first among equals
    take = lambda a: np.take_along_axis(a, order if a.ndim == 2 else order[:, :, None], 1)  # noqa: E731
    lat, lon, feats, within, score = take(lat), take(lon), take(feats), take(within), take(score)
    p_far = cal.far_probability(feats[:, 0])
    go = np.zeros(len(lat), bool)
    if p_far is not None and far_above < 1.0 and pred.far_lat_deg is not None:
        go = (p_far > far_above) & np.isfinite(pred.far_lat_deg)
        far_within = cal.within(pred.far_features)

        def ahead(first, rest):  # one more column: the far pick first where it answers, else a missing last
            where = go.reshape(-1, *[1] * (rest.ndim - 1))
            return np.where(where, np.concatenate([first[:, None], rest], 1),
                            np.concatenate([rest, np.full_like(first[:, None], np.nan)], 1))

        lat, lon = ahead(pred.far_lat_deg, lat), ahead(pred.far_lon_deg, lon)
        feats, within = ahead(pred.far_features, feats), ahead(far_within, within)
        # a candidate on the far pick itself (an answer moved onto a neighbour) is not listed twice
        same = go[:, None] & (haversine_km(lat[:, :1], lon[:, :1], lat, lon) < 0.001)
        same[:, 0] = False
        lat, lon = np.where(same, np.nan, lat), np.where(same, np.nan, lon)
        score = np.where(np.isfinite(lat), within[..., c], -1.0)
    within[none, 0] = 0.0
    return replace(pred, lat_deg=lat[:, 0], lon_deg=lon[:, 0], confidence=within[:, 0, c],
                   within_km=within[:, 0], features=feats[:, 0],
                   radius_km=np.where(none, np.nan, radius_km(within[:, 0], cal.levels_km)),
                   alt_lat_deg=lat[:, 1:], alt_lon_deg=lon[:, 1:], alt_score=np.maximum(score[:, 1:], 0.0),
                   alt_features=feats[:, 1:], alt_within_km=within[:, 1:], far_probability=p_far,
                   far_answered=go)
