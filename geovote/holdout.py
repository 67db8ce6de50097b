"""A validation slice carved out of train, for datasets without a val split (OSV-5M has train and test
only).

`holdout(lat, lon, sequence, n)` picks `n` random train rows to validate on and marks what must leave
training with them: the rows themselves, every row of their capture sequences, and every row within
1 km of one of them (OSV-5M keeps train and test at least 1 km apart, so a validation image must not
have a near-twin in training that a test image could not have). The heads of benchmark.run and
finetune.train train on `~excluded` and validate on `rows`. (retrieve.tuning does the same per query,
inside the search: tuning queries the whole index.)
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from geovote.geo import chord_for_km, latlon_to_unit

HOLDOUT_ROWS = 2000
HOLDOUT_EXCLUDE_KM = 1.0
HOLDOUT_NAME = "train (held out: the rows, their sequences and everything within 1 km left out of training)"


@dataclass
class Holdout:
    rows: np.ndarray  # (n,) sorted train rows to validate on
    excluded: np.ndarray  # (N,) bool: rows that must not be trained on (includes `rows`)

    @property
    def train_rows(self) -> np.ndarray:
        return np.flatnonzero(~self.excluded)


def holdout(lat_deg, lon_deg, sequence=None, n: int = HOLDOUT_ROWS, seed: int = 0,
            exclude_km: float = HOLDOUT_EXCLUDE_KM) -> Holdout:
    """`n` random rows (at most a tenth of them all) and everything that leaves training with them."""
    from scipy.spatial import cKDTree

    lat = np.asarray(lat_deg, np.float64)
    total = len(lat)
    n = min(int(n), total // 10)
    if n < 1:
        raise ValueError(f"{total} training rows: too few to hold any out for validation")
    rows = np.sort(np.random.default_rng(seed).choice(total, n, replace=False))
    excluded = np.zeros(total, bool)
    excluded[rows] = True
    if sequence is not None:
        # a missing sequence (None or NaN from the CSV reader) is no sequence, not one shared by all
        seq = np.array(["" if s is None or s != s else str(s) for s in sequence], dtype=str)
        held = np.unique(seq[rows])
        excluded |= np.isin(seq, held[held != ""])
    # within exclude_km of a held-out row: a ball query around the n rows, not an N x n distance matrix
    lon = np.asarray(lon_deg, np.float64)
    tree = cKDTree(latlon_to_unit(lat, lon))
    near = tree.query_ball_point(latlon_to_unit(lat[rows], lon[rows]), chord_for_km(exclude_km))
    hits = np.concatenate([np.asarray(h, np.int64) for h in near]) if len(near) else np.zeros(0, np.int64)
    excluded[hits] = True
    return Holdout(rows, excluded)
