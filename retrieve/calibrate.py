"""The one decision: each candidate's distance distribution, and the answer of highest expected GeoScore.

    model = fit(features, dist_km, fitted_on)        # retrieve.tuning, on the tuning images' candidates
    within = model.within(table.features)            # (Q, C, levels) P(truth within 1/25/200/750/2500 km)
    pred = decide(model, table)                      # the candidate of highest expected GeoScore answers

The distribution. For each distance of LEVELS_KM, P(truth within d of the candidate | its features,
retrieve.candidates.FEATURES, read by name), one boosted-tree classifier each (scikit-learn's
HistGradientBoostingClassifier: shallow trees, log loss), made non-decreasing in d. Trees, because which
evidence counts depends on the rest: the nearest image's similarity says much where it is high and
little on a far place, the vote's share the other way round, interactions a logistic regression (what
geovote used before) cannot hold. Fitted where the engine is tuned (val, and val_far where the dataset
has one, else train images held out of their own search at several radii, so it exists on every
dataset) on every candidate of every tuning image. Stored as plain arrays in calibration.json; applied by
walking the trees in numpy, so a query never imports scikit-learn, and nothing is unpickled.

The decision. A candidate's expected GeoScore, E[5000 exp(-D / 1492.7 km)] under its CDF interpolated
linearly in log(1 + d) between the levels (0 at 0 km, 1 at half the Earth's circumference, as
radius_km reads it), is a fixed linear function of its five probabilities (EXPECTED_WEIGHTS). The
candidate where it is highest answers; within_km, radius_km and confidence (P(within 200 km)) are its
own; the other candidates follow in that order, each with its own probabilities.
"""
from __future__ import annotations

import functools
import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from geovote.geo import EARTH_RADIUS_KM
from geovote.metrics import geoscore

LEVELS_KM = (1, 25, 200, 750, 2500)
RADIUS_PROBABILITY = 0.9
FARTHEST_KM = math.pi * EARTH_RADIUS_KM  # nothing on Earth is further from an answer
CONFIDENCE_KM = 200  # `confidence` is P(within 200 km)
MODEL_VERSION = 2
TREES = {"max_iter": 150, "max_depth": 3, "learning_rate": 0.1, "min_samples_leaf": 40,
         "l2_regularization": 1.0}


class CalibrationError(ValueError):
    pass


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-np.clip(z, -50, 50)))


def _knots(levels_km) -> np.ndarray:
    return np.log1p(np.array([0.0, *levels_km, FARTHEST_KM]))


def expected_weights(levels_km=LEVELS_KM) -> tuple[np.ndarray, float]:
    """(a, b): expected GeoScore = a . P(within levels) + b, under the CDF of the module's doc. Each
    segment between knots contributes (F(end) - F(start)) x the mean GeoScore over it (uniform in
    log(1 + d)); integrated once per set of levels."""
    return _expected_weights(tuple(levels_km))


@functools.lru_cache(maxsize=8)
def _expected_weights(levels_km: tuple) -> tuple[np.ndarray, float]:
    u = _knots(levels_km)
    mean_g = np.empty(len(u) - 1)
    for i in range(len(u) - 1):
        t = np.linspace(u[i], u[i + 1], 2001)
        mean_g[i] = np.trapezoid(geoscore(np.expm1(t)), t) / (u[i + 1] - u[i])
    # sum_i (P_{i+1} - P_i) mean_g[i] with P_0 = 0 and P_last = 1: the inner P's get mean_g[i-1] - mean_g[i]
    a = mean_g[:-1] - mean_g[1:]
    a.setflags(write=False)  # shared by every caller
    return a, float(mean_g[-1])


@dataclass
class Calibration:
    """The distance model: per level, boosted trees as arrays (feature < 0: a leaf)."""

    features: list[str]
    levels_km: list[int]
    baseline: list[float]  # (levels,) raw score before the trees
    feature: list  # (levels, trees, nodes) int
    threshold: list  # (levels, trees, nodes): x <= threshold goes left
    missing_left: list  # (levels, trees, nodes) bool: where NaN goes
    left: list
    right: list
    value: list  # (levels, trees, nodes): a leaf's contribution to the raw score
    depth: int
    fitted_on: str
    images: int
    version: int = MODEL_VERSION

    def __post_init__(self):
        self._arrays = [self._flat(i) for i in range(len(self.levels_km))]

    def _flat(self, level: int) -> tuple:
        """One level's trees as flat arrays over all their nodes (tree t's node j at t * width + j), a
        leaf's children the leaf itself: a walk is one take per array per step, whatever the node."""
        feat = np.asarray(self.feature[level], np.int64)
        if feat.size == 0:
            return None
        trees, width = feat.shape
        start = np.arange(trees, dtype=np.int64)[:, None] * width
        here = start + np.arange(width)[None, :]
        leaf = feat < 0
        left = np.where(leaf, here, start + np.asarray(self.left[level], np.int64))
        right = np.where(leaf, here, start + np.asarray(self.right[level], np.int64))
        return (np.maximum(feat, 0).ravel(), np.asarray(self.threshold[level], np.float64).ravel(),
                np.asarray(self.missing_left[level], bool).ravel(), left.ravel(), right.ravel(),
                np.asarray(self.value[level], np.float64).ravel(), start.ravel())

    def raw(self, x: np.ndarray) -> np.ndarray:
        """(R, F) features -> (R, levels) the trees' raw scores (log-odds)."""
        x = np.ascontiguousarray(x, np.float64)
        flat_x = x.ravel()
        row_start = (np.arange(len(x), dtype=np.int64) * x.shape[1])[:, None]
        any_nan = bool(np.isnan(flat_x).any())
        out = np.empty((len(x), len(self.levels_km)))
        for level, arrays in enumerate(self._arrays):
            if arrays is None:
                out[:, level] = self.baseline[level]
                continue
            feat, thr, miss, left, right, value, start = arrays
            node = np.broadcast_to(start, (len(x), len(start)))
            for _ in range(self.depth):  # a leaf goes to itself: depth steps reach every leaf
                v = flat_x.take(row_start + feat.take(node))
                go_left = v <= thr.take(node)
                if any_nan:
                    nan = np.isnan(v)
                    go_left = np.where(nan, miss.take(node), go_left)
                node = np.where(go_left, left.take(node), right.take(node))
            out[:, level] = self.baseline[level] + value.take(node).sum(1)
        return out

    def within(self, features: np.ndarray) -> np.ndarray:
        """(..., F) features -> (..., levels) P(within each level), non-decreasing along the levels;
        NaN for absent rows (all features NaN)."""
        f = np.asarray(features, np.float64)
        flat = f.reshape(-1, f.shape[-1])
        absent = np.all(np.isnan(flat), axis=1)
        p = np.full((len(flat), len(self.levels_km)), np.nan)
        if (~absent).any():
            p[~absent] = np.maximum.accumulate(_sigmoid(self.raw(flat[~absent])), axis=1)
        return p.reshape(*f.shape[:-1], len(self.levels_km))

    def expected_geoscore(self, within: np.ndarray) -> np.ndarray:
        a, b = expected_weights(self.levels_km)
        return np.asarray(within) @ a + b

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        tmp = path.with_name(path.name + ".partial")
        tmp.write_text(json.dumps({k: v for k, v in asdict(self).items()}) + "\n")
        tmp.replace(path)
        return path

    @classmethod
    def load(cls, path: str | Path, features: tuple[str, ...]) -> "Calibration":
        path = Path(path)
        try:
            data = json.loads(path.read_text())
            if data.get("version") != MODEL_VERSION:
                raise CalibrationError(f"{path} is an older calibration (not the candidate table's); rerun "
                                       "`python -m retrieve.tune`")
            cal = cls(**data)
        except CalibrationError:
            raise
        except (OSError, ValueError, TypeError, IndexError) as e:
            raise CalibrationError(f"{path}: unreadable ({e}); rerun `python -m retrieve.tune`") from None
        if list(cal.features) != list(features):
            raise CalibrationError(f"{path} was fitted on other features ({', '.join(cal.features)}); rerun "
                                   "`python -m retrieve.tune`")
        return cal


def _trees(model, depth: int) -> tuple[float, list]:
    """(baseline, [feature, threshold, missing_left, left, right, value] each (trees, nodes)) of a
    fitted HistGradientBoostingClassifier, padded to the widest tree."""
    trees = [p[0].nodes for p in model._predictors]
    width = max(len(t) for t in trees)
    out = []
    for name, fill in (("feature_idx", -1), ("num_threshold", 0.0), ("missing_go_to_left", 0), ("left", 0),
                       ("right", 0), ("value", 0.0)):
        a = np.full((len(trees), width), fill, dtype=np.float64)
        for i, t in enumerate(trees):
            col = t[name].astype(np.float64)
            if name == "feature_idx":
                col = np.where(t["is_leaf"], -1, col)
            a[i, :len(t)] = col
        out.append(a.tolist())
    return float(np.ravel(model._baseline_prediction)[0]), out


def fit(features: np.ndarray, dist_km: np.ndarray, names: tuple[str, ...], fitted_on: str,
        images: int = 0, trees: dict = TREES) -> Calibration:
    """P(dist_km <= level | features) for each level of LEVELS_KM: boosted trees (`trees`) per level."""
    from sklearn.ensemble import HistGradientBoostingClassifier

    x = np.asarray(features, np.float64)
    d = np.asarray(dist_km, np.float64)
    ok = ~np.all(np.isnan(x), axis=1) & np.isfinite(d)
    x, d = x[ok], d[ok]
    baseline, arrays = [], {k: [] for k in ("feature", "threshold", "missing_left", "left", "right", "value")}
    for level in LEVELS_KM:
        y = d <= level
        if y.all() or not y.any():  # one class: a constant pulled off 0 and 1 by a pseudo-count each
            p = (y.sum() + 0.5) / (len(y) + 1.0)
            baseline.append(float(np.log(p / (1 - p))))
            for key in arrays:
                arrays[key].append([])
            continue
        model = HistGradientBoostingClassifier(**trees, early_stopping=False, random_state=0).fit(x, y)
        b, parts = _trees(model, trees["max_depth"])
        baseline.append(b)
        for key, part in zip(arrays, parts):
            arrays[key].append(part)
    return Calibration(list(names), list(LEVELS_KM), baseline, depth=trees["max_depth"], fitted_on=fitted_on,
                       images=int(images), **arrays)


def radius_km(within: np.ndarray, levels_km=LEVELS_KM, probability: float = RADIUS_PROBABILITY) -> np.ndarray:
    """(..., levels) probabilities -> (...) the distance where P(within) reaches `probability`."""
    p = np.asarray(within, np.float64)
    shape = p.shape[:-1]
    p = p.reshape(-1, p.shape[-1])
    grid_p = np.concatenate([np.zeros((len(p), 1)), p, np.ones((len(p), 1))], axis=1)
    grid_x = _knots(levels_km)
    out = np.full(len(p), np.nan)
    for i, row in enumerate(grid_p):  # np.interp needs increasing x: the probabilities are non-decreasing
        if not np.all(np.isfinite(row)):
            continue
        j = int(np.argmax(row >= probability))
        lo, hi = row[j - 1], row[j]
        t = 1.0 if hi <= lo else (probability - lo) / (hi - lo)
        out[i] = np.expm1(grid_x[j - 1] + t * (grid_x[j] - grid_x[j - 1]))
    return out.reshape(shape)


def decide(cal: Calibration | None, table, n_alternatives: int = 3, within: np.ndarray | None = None):
    """The Prediction of the candidate table (retrieve.candidates): each candidate's probabilities,
    the one of highest expected GeoScore answering (the vote's peak first among equals), the next
    `n_alternatives` distinct places after it, in that order. `within` (Q, C, levels): the candidates'
    probabilities when they are already known (cross-fitted ones in tuning, an album's), else the
    model's. `cal` and `within` None (an engine not tuned yet): the candidates in the table's order
    (the peak, then its runner-ups; a region keeps those inside), each scored by its raw vote share
    within 2 bandwidths."""
    from geovote.geo import haversine_km
    from retrieve.candidates import KINDS
    from retrieve.predict import Prediction

    present = table.present
    q, n = present.shape
    levels = list(cal.levels_km) if cal is not None else list(LEVELS_KM)
    if within is None and cal is not None:
        within = cal.within(table.features)  # (Q, C, L)
    if within is not None:
        a, b = expected_weights(levels)
        score = np.where(present, np.nan_to_num(within) @ a + b, -np.inf)
    else:
        score = np.where(present, -np.arange(n, dtype=np.float64)[None, :], -np.inf)
    order = np.argsort(-score, axis=1, kind="stable")

    def take(a):
        return np.take_along_axis(a, order if a.ndim == 2 else order[..., None], 1)

    lat, lon, kind, score = (take(a) for a in (table.lat_deg, table.lon_deg, table.kind, score))
    none = ~np.isfinite(score[:, 0])
    # alternatives: the next candidates that are not the same place as one listed before them
    alt = np.full((q, n_alternatives), -1, np.int64)
    listed = [np.zeros(q, np.int64)]
    for a in range(n_alternatives):
        free = np.isfinite(score)
        for j in listed:
            d = haversine_km(lat, lon, np.take_along_axis(lat, j[:, None], 1),
                             np.take_along_axis(lon, j[:, None], 1))
            free &= ~(d < MERGE_ALTERNATIVES_KM)
        free[:, 0] = False
        nxt = np.where(free.any(1), np.argmax(free, axis=1), -1)
        alt[:, a] = nxt
        listed.append(np.maximum(nxt, 0))
    has, idx = alt >= 0, np.maximum(alt, 0)

    def pick(a):
        got = np.take_along_axis(a, idx if a.ndim == 2 else idx[..., None], 1)
        return np.where(has if a.ndim == 2 else has[..., None], got, np.nan)

    kinds = dict(far_answered=kind[:, 0] == KINDS.index("far_pick"),
                 answer_kind=np.where(none, -1, kind[:, 0]))
    answer_lat, answer_lon = np.where(none, np.nan, lat[:, 0]), np.where(none, np.nan, lon[:, 0])
    if within is None:
        raw_share = take(table.column("share_2h"))
        return Prediction(answer_lat, answer_lon, np.where(none, 0.0, raw_share[:, 0]), pick(lat), pick(lon),
                          np.nan_to_num(pick(raw_share)), **kinds)
    within = take(within)
    c = levels.index(CONFIDENCE_KM)
    w0 = np.where(none[:, None], 0.0, np.nan_to_num(within[:, 0]))
    alt_within = pick(within)
    return Prediction(
        answer_lat, answer_lon, confidence=w0[:, c], alt_lat_deg=pick(lat), alt_lon_deg=pick(lon),
        alt_score=np.nan_to_num(alt_within[..., c]), within_km=w0,
        radius_km=np.where(none, np.nan, radius_km(w0, levels)), alt_within_km=alt_within,
        expected_geoscore=np.where(none, np.nan, score[:, 0]), **kinds)


MERGE_ALTERNATIVES_KM = 1.0  # alternatives closer than this to an earlier listed candidate are the same place

__all__ = ["Calibration", "CalibrationError", "LEVELS_KM", "decide", "expected_weights", "fit", "radius_km"]
