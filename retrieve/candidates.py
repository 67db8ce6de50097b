"""The candidate table: for each query, the places its answer is chosen among, each with the features the
distance model (retrieve.calibrate) reads by name.

    table = candidate_table(sim, lat, lon, vote_prediction, params, spacing_km)   -> Candidates

Candidates of one query, in this order (absent ones NaN):
    peak        the vote's density peak in the winning cell (retrieve.predict.vote)
    runner_up   the peaks of the runner-up cells of the first level
    far_pick    the neighbour of highest expected GeoScore under density-corrected weights
    neighbour   the nearest gallery locations themselves, in search order, one per place: a neighbour
                within MERGE_KM of an earlier one is left out
Features (FEATURES) are of the query (its neighbours' similarities, the vote's shares) and of the
candidate point among the neighbours (weight shares near it at several radii, the best and mean
similarity near it, the distances, the gallery's spacing there, its kind and rank). A region keeps the
rows inside it (`restrict`), and no feature is computed from anything outside.
Pure numpy: a query never imports scikit-learn.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from geovote.geo import km_for_chord, latlon_to_unit
from geovote.metrics import geoscore

KINDS = ("peak", "runner_up", "far_pick", "neighbour")
N_NEIGHBOURS = 3  # nearest distinct gallery places that are candidates themselves
MERGE_KM = 1.0  # neighbours closer than this to an earlier one are the same place
SHARE_RADII_KM = (25.0, 200.0, 750.0)
NEAR_KM = 25.0  # "near a candidate": for the best and mean similarity of the neighbours there
QUERY_FEATURES = ("top_similarity", "mean_similarity", "similarity_gap", "first_level_share",
                  "final_cell_share", "cell_entropy", "log_gallery_spacing_km")
POINT_FEATURES = ("share_25km", "share_200km", "share_750km", "share_2h", "far_share_200km",
                  "vote_expected_geoscore", "far_expected_geoscore",
                  "best_similarity_near", "mean_similarity_near", "count_near", "log_mean_distance_km",
                  "log_nearest_distance_km", "log_spacing_at_km", "rank")
FEATURES = QUERY_FEATURES + POINT_FEATURES + tuple(f"is_{k}" for k in KINDS)


@dataclass
class Neighbours:
    """What a candidate's features are computed from: each query's neighbours and its own features."""

    lat_deg: np.ndarray  # (Q, K)
    lon_deg: np.ndarray
    valid: np.ndarray  # (Q, K) bool
    similarity: np.ndarray  # (Q, K), -inf where not valid
    weight: np.ndarray  # (Q, K) the vote's weights
    far_weight: np.ndarray  # (Q, K) the far pick's
    spacing_km: np.ndarray  # (Q, K), NaN where unknown
    query_features: np.ndarray  # (Q, len(QUERY_FEATURES))
    bandwidth_km: float


@dataclass
class Candidates:
    lat_deg: np.ndarray  # (Q, C), NaN where absent
    lon_deg: np.ndarray
    kind: np.ndarray  # (Q, C) int: index into KINDS (-1 where absent)
    features: np.ndarray  # (Q, C, len(FEATURES)), NaN where absent
    neighbours: Neighbours | None = None  # for features_at (retrieve.album)

    @property
    def present(self) -> np.ndarray:
        return np.isfinite(self.lat_deg)

    def column(self, name: str) -> np.ndarray:
        return self.features[..., FEATURES.index(name)]

    def take(self, mask: np.ndarray) -> "Candidates":
        """Rows where `mask` (Q, C) holds; the others made absent."""
        keep = mask & self.present
        return Candidates(np.where(keep, self.lat_deg, np.nan), np.where(keep, self.lon_deg, np.nan),
                          np.where(keep, self.kind, -1), np.where(keep[..., None], self.features, np.nan),
                          self.neighbours)

    def features_at(self, rows: np.ndarray, lat_deg: np.ndarray, lon_deg: np.ndarray) -> np.ndarray:
        """(len(rows), X, len(FEATURES)): the features any points (X,) would have as candidates of the
        queries `rows`, each as a `neighbour` ranked after all of them (a place another photo of the same
        album found: retrieve.album asks each photo's distance model about it)."""
        n = self.neighbours
        rows = np.asarray(rows)
        r, x = len(rows), len(lat_deg)
        c_lat = np.broadcast_to(np.asarray(lat_deg, np.float64), (r, x))
        c_lon = np.broadcast_to(np.asarray(lon_deg, np.float64), (r, x))
        present = np.isfinite(c_lat) & n.valid[rows].any(1, keepdims=True)
        point = _point_features(c_lat, c_lon, present, n.lat_deg[rows], n.lon_deg[rows], n.valid[rows],
                                n.similarity[rows], n.weight[rows], n.far_weight[rows], n.spacing_km[rows],
                                n.bandwidth_km)
        rank = np.full((r, x), float(n.valid.shape[1]))
        kind = np.full((r, x), KINDS.index("neighbour"))
        return _assemble(n.query_features[rows], point, rank, kind, present)


def _neighbour_rows(lat: np.ndarray, lon: np.ndarray, valid: np.ndarray, n: int) -> np.ndarray:
    """(Q, n) the first n neighbours (search order) that are not within MERGE_KM of an earlier kept
    one; -1 where fewer."""
    q, k = lat.shape
    xyz = latlon_to_unit(np.where(valid, lat, 0.0), np.where(valid, lon, 0.0))
    d = km_for_chord(np.sqrt(np.maximum(np.sum((xyz[:, :, None] - xyz[:, None]) ** 2, axis=3), 0.0)))
    close = (d < MERGE_KM) & valid[:, :, None] & valid[:, None, :]
    keep = valid.copy()
    for j in range(1, k):  # a neighbour is dropped when an earlier *kept* one is that close
        if np.all(keep[:, :j].sum(1) >= n):  # every query has its n: later ones are never listed
            keep[:, j:] = False
            break
        keep[:, j] &= ~np.any(close[:, j, :j] & keep[:, :j], axis=1)
    order = np.argsort(~keep, axis=1, kind="stable")[:, :n]
    rows = np.where(np.take_along_axis(keep, order, 1), order, -1)
    if rows.shape[1] < n:
        rows = np.concatenate([rows, np.full((q, n - rows.shape[1]), -1)], 1)
    return rows


def candidate_table(sim: np.ndarray, lat_deg: np.ndarray, lon_deg: np.ndarray, pred, params,
                    spacing_km: np.ndarray | None = None) -> Candidates:
    """The table of each query's candidates. sim, lat_deg, lon_deg: (Q, K) its neighbours (the first
    params.k used), best first; pred: retrieve.predict.vote's Prediction of them (the peak, its
    runner-ups, its far pick and the query features); spacing_km: (Q, K) each neighbour's gallery
    spacing (NaN features without it)."""
    from retrieve.predict import far_weights, softmax_weights

    k = min(params.k, sim.shape[1])
    sim = np.asarray(sim[:, :k], np.float64)
    lat, lon = np.asarray(lat_deg[:, :k], np.float64), np.asarray(lon_deg[:, :k], np.float64)
    valid = np.isfinite(sim) & np.isfinite(lat)
    sim = np.where(valid, sim, -np.inf)
    q = len(sim)
    spacing = (np.full((q, k), np.nan) if spacing_km is None
               else np.asarray(spacing_km, np.float64)[:, :k])
    w = softmax_weights(sim, params.temperature)
    wf = far_weights(sim, spacing_km, params) if spacing_km is not None else w
    rows = _neighbour_rows(lat, lon, valid, N_NEIGHBOURS)
    has_n = rows >= 0
    safe = np.maximum(rows, 0)
    n_alt = pred.alt_lat_deg.shape[1]
    far_lat = pred.far_lat_deg if pred.far_lat_deg is not None else np.full(q, np.nan)
    far_lon = pred.far_lon_deg if pred.far_lon_deg is not None else np.full(q, np.nan)
    c_lat = np.concatenate([pred.lat_deg[:, None], pred.alt_lat_deg, far_lat[:, None],
                            np.where(has_n, np.take_along_axis(lat, safe, 1), np.nan)], 1)
    c_lon = np.concatenate([pred.lon_deg[:, None], pred.alt_lon_deg, far_lon[:, None],
                            np.where(has_n, np.take_along_axis(lon, safe, 1), np.nan)], 1)
    kind = np.concatenate([np.zeros((q, 1)), np.ones((q, n_alt)), np.full((q, 1), 2),
                           np.full((q, rows.shape[1]), 3)], 1).astype(np.int64)
    rank = np.concatenate([np.zeros((q, 1)), np.tile(np.arange(1, n_alt + 1), (q, 1)), np.zeros((q, 1)),
                           rows.astype(np.float64)], 1)
    present = np.isfinite(c_lat) & valid.any(1, keepdims=True)
    kind = np.where(present, kind, -1)
    point = _point_features(c_lat, c_lon, present, lat, lon, valid, sim, w, wf, spacing,
                            params.bandwidth_km)
    feats = _assemble(pred.query_features, point, rank, kind, present)
    context = Neighbours(lat, lon, valid, sim, w, wf, spacing, pred.query_features, params.bandwidth_km)
    return Candidates(np.where(present, c_lat, np.nan), np.where(present, c_lon, np.nan), kind, feats,
                      context)


def _assemble(query_features, point, rank, kind, present) -> np.ndarray:
    """(Q, C, len(FEATURES)) in FEATURES' order: each query's own features (Q, F_q), the points' (Q, C, F_p),
    their rank and kind (Q, C); NaN where not `present`. The one place that order is written."""
    q, c = rank.shape
    query = np.broadcast_to(query_features[:, None, :], (q, c, len(QUERY_FEATURES)))
    onehot = (kind[..., None] == np.arange(len(KINDS))).astype(np.float64)
    feats = np.concatenate([query, point, rank[..., None], onehot], axis=2)
    return np.where(present[..., None], feats, np.nan)


def _point_features(c_lat, c_lon, present, lat, lon, valid, sim, w, wf, spacing, bandwidth_km):
    """(Q, C, len(POINT_FEATURES) - 1): every candidate's features among its query's neighbours (the
    rank is added by the caller)."""
    c_xyz = latlon_to_unit(np.where(present, c_lat, 0.0), np.where(present, c_lon, 0.0))  # (Q, C, 3)
    n_xyz = latlon_to_unit(np.where(valid, lat, 0.0), np.where(valid, lon, 0.0))  # (Q, K, 3)
    diff = c_xyz[:, :, None] - n_xyz[:, None]  # (Q, C, K, 3): differences, so a point on a neighbour is 0 km
    d = km_for_chord(np.sqrt(np.maximum(np.sum(diff ** 2, axis=3), 0.0)))
    d = np.where(valid[:, None, :], d, np.inf)
    wq, wfq = w[:, None, :], wf[:, None, :]
    shares = [np.sum(wq * (d <= r), 2) for r in SHARE_RADII_KM]
    share_2h = np.sum(wq * (d <= 2.0 * bandwidth_km), 2)
    far_share = np.sum(wfq * (d <= 200.0), 2)
    # the expected GeoScore were the truth one of the neighbours, drawn by the vote's weights and by the
    # far pick's (the criteria of the minimum-risk point and of the far pick)
    fin = np.where(np.isfinite(d), d, 0.0)
    g = np.where(np.isfinite(d), geoscore(fin), 0.0)
    vote_expected, far_expected = np.sum(wq * g, 2), np.sum(wfq * g, 2)
    near = d <= NEAR_KM
    s = np.broadcast_to(sim[:, None, :], d.shape)
    count = near.sum(2)
    top = np.max(np.where(valid, sim, -np.inf), 1)[:, None]
    best_near = np.where(count > 0, np.max(np.where(near, s, -np.inf), 2), top - 1.0)
    mean_near = np.where(count > 0, np.sum(np.where(near, s, 0.0), 2) / np.maximum(count, 1), top - 1.0)
    mean_d = np.sum(wq * fin, 2)
    nearest_j = np.argmin(d, axis=2)
    nearest = np.take_along_axis(d, nearest_j[..., None], 2)[..., 0]
    spacing_at = np.take_along_axis(spacing, nearest_j, 1)  # (Q, C): the spacing of each one's nearest
    k = max(valid.shape[1], 1)
    return np.stack([*shares, share_2h, far_share, vote_expected, far_expected, best_near, mean_near,
                     count / k, np.log1p(mean_d), np.log1p(np.where(np.isfinite(nearest), nearest, 2e4)),
                     np.log1p(spacing_at)], axis=2)


def restrict(table: Candidates, region) -> Candidates:
    """The rows inside `region` (retrieve.region.Region): the others absent. The neighbours of a region
    search are all inside it, so every query with one keeps a candidate."""
    inside = np.zeros(table.lat_deg.shape, bool)
    p = table.present
    inside[p] = region.contains(table.lat_deg[p], table.lon_deg[p])
    return table.take(inside)


__all__ = ["Candidates", "FEATURES", "KINDS", "candidate_table", "restrict"]
