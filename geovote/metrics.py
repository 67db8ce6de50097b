"""OSV-5M's metrics, as its code computes them, minus its quirks (upstream's missing-value mask tests
"nan" while missing values read as NaN, so rows with a missing truth count as wrong).

- distances: haversine on a 6371 km sphere;
- GeoScore: mean of 5000 * exp(-d_km / 1492.7);
- accuracy within r km: share of images with d < r (strict, as upstream);
- country / region / area / city accuracy: reverse-geocode the *prediction* into OSV-5M's `unique_*`
  keys and compare with the truth's keys. Rows whose truth key is missing are left out of that level's
  denominator (upstream counts them as wrong), and the count used is reported.
"""
from __future__ import annotations

from typing import Mapping

import numpy as np

from geovote.geo import haversine_km

GEOSCORE_MAX = 5000.0
GEOSCORE_SCALE_KM = 1492.7
ACCURACY_RADII_KM = (1, 25, 200, 750, 2500)
# our metric name -> OSV-5M truth column
ADMIN_LEVELS = {
    "country": "unique_country",
    "region": "unique_region",
    "area": "unique_sub-region",
    "city": "unique_city",
}
# the keys of `benchmark.score --json`, in the order tables print them
SCORE_KEYS = (
    "n", "geoscore", "mean_km", "median_km",
    *(f"acc_{r}km" for r in ACCURACY_RADII_KM),
    *(f"acc_{level}" for level in ADMIN_LEVELS),
)


def geoscore(dist_km) -> np.ndarray:
    """Per-image GeoGuessr score in [0, 5000]."""
    return GEOSCORE_MAX * np.exp(-np.asarray(dist_km, dtype=np.float64) / GEOSCORE_SCALE_KM)


def mean_geoscore(pred_lat_deg, pred_lon_deg, true_lat_deg, true_lon_deg) -> float:
    """GeoScore of aligned predictions and truths: the one number tuning and validation maximise."""
    return float(geoscore(haversine_km(pred_lat_deg, pred_lon_deg, true_lat_deg, true_lon_deg)).mean())


def distance_metrics(dist_km) -> dict[str, float]:
    """n, GeoScore, mean and median km, and accuracy within each radius of ACCURACY_RADII_KM."""
    d = np.asarray(dist_km, dtype=np.float64)
    if d.size == 0:
        raise ValueError("no predictions to score")
    if not np.all(np.isfinite(d)):
        raise ValueError(f"{int((~np.isfinite(d)).sum())} distances are not finite")
    out = {
        "n": int(d.size),
        "geoscore": float(geoscore(d).mean()),
        "mean_km": float(d.mean()),
        "median_km": float(np.median(d)),
    }
    for r in ACCURACY_RADII_KM:
        out[f"acc_{r}km"] = float((d < r).mean())
    return out


def key_accuracy(pred_keys, true_keys) -> tuple[float, int]:
    """Share of rows whose predicted key equals the truth's, over rows whose truth is present.

    A truth key is missing when it is None or NaN (pyarrow nulls arrive as None). Returns
    (accuracy, rows counted); accuracy is NaN when no row has a truth key.
    """
    true = np.asarray(true_keys, dtype=object)
    pred = np.asarray(pred_keys, dtype=object)
    present = np.array([k is not None and k == k for k in true], dtype=bool)  # k == k is False for NaN
    n = int(present.sum())
    if n == 0:
        return float("nan"), 0
    return float((pred[present] == true[present]).mean()), n


def score(
    pred_lat_deg, pred_lon_deg, true_lat_deg, true_lon_deg,
    true_keys: Mapping[str, np.ndarray] | None = None,
    pred_keys: Mapping[str, np.ndarray] | None = None,
) -> dict[str, float]:
    """All OSV-5M metrics for aligned arrays of predictions and truths.

    `true_keys` maps OSV-5M columns (`unique_country`, ...) to arrays; levels absent from it score NaN
    with a count of 0. `pred_keys` (same columns) skips reverse geocoding, e.g. when it was done already.
    Adds `n_<level>`: the rows each admin accuracy was computed over.
    """
    dist = haversine_km(pred_lat_deg, pred_lon_deg, true_lat_deg, true_lon_deg)
    out = distance_metrics(dist)
    true_keys = dict(true_keys or {})
    wanted = [col for col in ADMIN_LEVELS.values() if col in true_keys]
    if wanted and pred_keys is None:
        from geovote.geocode import reverse_geocode_keys  # lazy: loads 144k places

        pred_keys = reverse_geocode_keys(pred_lat_deg, pred_lon_deg)
    for level, col in ADMIN_LEVELS.items():
        if col in true_keys:
            acc, n = key_accuracy(pred_keys[col], true_keys[col])
        else:
            acc, n = float("nan"), 0
        out[f"acc_{level}"] = acc
        out[f"n_{level}"] = n
    return out


# ------------------------------------------------------------------------------ calibrated answers
def calibration_error(prob, hit, bins: int = 10) -> float:
    """Expected calibration error: the mean over equal-width probability bins of |mean predicted
    probability - observed frequency|, weighted by the share of answers in the bin."""
    p = np.asarray(prob, np.float64)
    y = np.asarray(hit, np.float64)
    if p.size == 0:
        return float("nan")
    b = np.clip((p * bins).astype(int), 0, bins - 1)
    count = np.bincount(b, minlength=bins)
    gap = np.abs(np.bincount(b, p, bins) - np.bincount(b, y, bins))  # per bin: n * |mean p - mean y|
    return float(gap.sum() / count.sum())


def reliability(prob, hit, bins: int = 10) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per equal-width bin: (mean predicted probability, observed frequency, count); NaN where empty."""
    p = np.asarray(prob, np.float64)
    y = np.asarray(hit, np.float64)
    b = np.clip((p * bins).astype(int), 0, bins - 1)
    count = np.bincount(b, minlength=bins).astype(float)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.bincount(b, p, bins) / count, np.bincount(b, y, bins) / count, count


def accuracy_vs_coverage(confidence, hit) -> tuple[np.ndarray, np.ndarray, float]:
    """Answering only the most confident share c of images: (coverage c, accuracy among them, the area
    under that curve). Ties in confidence are answered together, in input order."""
    conf = np.asarray(confidence, np.float64)
    y = np.asarray(hit, np.float64)
    if conf.size == 0:
        return np.zeros(0), np.zeros(0), float("nan")
    order = np.argsort(-conf, kind="stable")
    n = np.arange(1, len(y) + 1)
    coverage, accuracy = n / len(y), np.cumsum(y[order]) / n
    return coverage, accuracy, float(np.mean(accuracy))  # the mean over the n steps of width 1/n
