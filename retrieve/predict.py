"""From each query's k nearest training images to one location: kNN voting over cells, then refinement.

Pure numpy, vectorised over a batch of queries. Inputs per query: the neighbours' similarities, their
locations (degrees) and their cell ids at each level, coarse to fine (from a QuadTree or H3; the index
stores them per training row, so voting never recomputes a cell).

    w_j      = softmax(sim_j / T) over the valid neighbours
    level 0  : the cell with the most weight wins; the next level only counts neighbours inside it, ...
    refine   : of the heaviest neighbours inside the final cell, the location with the highest weighted
               kernel density (Gaussian kernel, bandwidth h km, over *all* neighbours, so support just
               across the cell's border counts), then a few mean-shift steps: the answer sits on a density
               peak, not on a mean that can fall in the sea between two cities.
    score    : of the answer and of every alternative alike, the share of the weight within 2h of it
               (`confidence`, `alt_score`): an uncalibrated engine's answer.
    alternatives: the same peak inside each runner-up cell of the first level, best score first.
    far pick : the neighbour of highest expected GeoScore under density-corrected weights (far_weights).
The peak, its runner-ups and the far pick are candidates of the table (retrieve.candidates) a calibrated
engine chooses its answer from (retrieve.calibrate.decide).

Also the simple variants: 1-NN and the weighted spherical mean of the k neighbours.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from geovote.geo import EARTH_RADIUS_KM, chord_for_km, km_for_chord, latlon_to_unit, unit_to_latlon


@dataclass
class VoteConfig:
    """The one set of voting parameters: the engine's defaults, what retrieve.tune chooses and stores in
    retrieve.json, and what finetune's validation scores with."""

    cells: str = "h3"  # h3 | quadtree: the cells the neighbours vote over
    levels: tuple[int, ...] = (1, 3)  # H3 resolutions, or QuadTree depths, coarse to fine
    quadtree_max_points: int = 100  # QuadTree cells split while they hold more training images
    k: int = 20  # neighbours used (the first k of those searched)
    temperature: float = 0.05  # T of softmax(sim / T)
    bandwidth_km: float = 50.0  # h: kernel of the refinement and radius (2h) of the confidence
    mean_shift_steps: int = 3
    n_alternatives: int = 3
    n_starts: int = 8  # the refinement starts from the best of the 8 heaviest neighbours in the cell
    # the far pick (a candidate): the neighbour of highest expected GeoScore under the weights
    # softmax(sim / far_temperature) x spacing_km ** far_density_power. The vote's weights estimate where
    # the photo is under the gallery's own prior (where training images are), right for a covered place;
    # for a place no training image covers, that prior sends the answer to the densest region of
    # look-alikes. Dividing by the gallery's density (~ 1 / spacing^2 on a surface) undoes it.
    # retrieve.tune chooses both on far places (val_far, or train held out of a wide neighbourhood).
    far_temperature: float = 0.03
    far_density_power: float = 2.0

    def __post_init__(self):
        self.levels = tuple(int(v) for v in self.levels)
        if self.cells not in CELL_SYSTEMS:
            raise ValueError(f"cells must be one of {', '.join(CELL_SYSTEMS)}, got {self.cells!r}")
        if not self.levels or list(self.levels) != sorted(set(self.levels)) or min(self.levels) < 0:
            raise ValueError(f"levels must be distinct, increasing and >= 0, got {self.levels}")
        if self.k < 1 or self.temperature <= 0 or self.bandwidth_km <= 0 or self.n_starts < 1:
            raise ValueError("k and n_starts must be >= 1, temperature and bandwidth_km > 0")
        if self.far_temperature <= 0 or self.far_density_power < 0:
            raise ValueError("need far_temperature > 0 and far_density_power >= 0; got "
                             f"{self.far_temperature}, {self.far_density_power}")
        if self.mean_shift_steps < 0 or self.n_alternatives < 0:
            raise ValueError("mean_shift_steps and n_alternatives must be >= 0")

    @property
    def cell_spec(self) -> str:
        """Names the cell table these settings vote over (its cache file in the index folder)."""
        levels = "-".join(map(str, self.levels))
        return f"h3_{levels}" if self.cells == "h3" else f"quadtree{self.quadtree_max_points}_{levels}"


CELL_SYSTEMS = ("h3", "quadtree")


def cell_table(lat_deg: np.ndarray, lon_deg: np.ndarray, cfg: VoteConfig) -> np.ndarray:
    """(N, L) cell id of each point at each of `cfg.levels`: what `vote` takes, row by neighbour."""
    from geovote.cells import H3Cells, QuadTree

    if cfg.cells == "h3":
        return H3Cells(tuple(cfg.levels)).assign(lat_deg, lon_deg)
    tree = QuadTree.build(lat_deg, lon_deg, cfg.quadtree_max_points)
    table = tree.assign(lat_deg, lon_deg)
    return table[:, [min(level, table.shape[1] - 1) for level in cfg.levels]]


SPACING_NEIGHBOURS = 8  # the m of the gallery spacing: the distance to the m-th nearest other image


@dataclass
class Prediction:
    lat_deg: np.ndarray  # (Q,)
    lon_deg: np.ndarray
    confidence: np.ndarray  # (Q,) in [0, 1]: the weight share within 2h, or calibrated P(within 200 km)
    alt_lat_deg: np.ndarray  # (Q, A) alternatives (NaN where fewer)
    alt_lon_deg: np.ndarray
    alt_score: np.ndarray  # (Q, A) the same measure as `confidence`, of each alternative (0 where none)
    within_km: np.ndarray | None = None  # (Q, len(calibrate.LEVELS_KM)): P(truth within d km), calibrated
    radius_km: np.ndarray | None = None  # (Q,) radius holding the truth with 90% probability, calibrated
    alt_within_km: np.ndarray | None = None  # (Q, A, levels)
    expected_geoscore: np.ndarray | None = None  # (Q,) of the answer under its own distribution
    answer_kind: np.ndarray | None = None  # (Q,) index into retrieve.candidates.KINDS
    far_answered: np.ndarray | None = None  # (Q,) bool: the far pick answers
    # what the vote hands the candidate table
    query_features: np.ndarray | None = None  # (Q, len(candidates.QUERY_FEATURES))
    far_lat_deg: np.ndarray | None = None  # (Q,) the far pick
    far_lon_deg: np.ndarray | None = None


def softmax_weights(sim: np.ndarray, temperature: float) -> np.ndarray:
    """(Q, k) softmax over valid (finite) similarities; invalid neighbours get weight 0."""
    sim = np.asarray(sim, np.float64)
    valid = np.isfinite(sim)
    z = np.where(valid, sim / temperature, -np.inf)
    top = np.max(z, axis=1, keepdims=True)
    top = np.where(np.isfinite(top), top, 0.0)
    e = np.where(valid, np.exp(z - top), 0.0)
    total = e.sum(1, keepdims=True)
    return np.divide(e, total, out=np.zeros_like(e), where=total > 0)


def one_nn(sim, lat_deg, lon_deg) -> tuple[np.ndarray, np.ndarray]:
    best = np.argmax(np.where(np.isfinite(sim), sim, -np.inf), axis=1)[:, None]
    return np.take_along_axis(lat_deg, best, 1)[:, 0], np.take_along_axis(lon_deg, best, 1)[:, 0]


def weighted_mean(sim, lat_deg, lon_deg, temperature: float) -> tuple[np.ndarray, np.ndarray]:
    w = softmax_weights(sim, temperature)
    xyz = latlon_to_unit(np.nan_to_num(lat_deg), np.nan_to_num(lon_deg))
    return unit_to_latlon(np.einsum("qk,qkc->qc", w, xyz))


def _cell_votes(cells: np.ndarray, w: np.ndarray, allowed: np.ndarray) -> np.ndarray:
    """(Q, k): total allowed weight in each neighbour's cell. Sort each row, number its runs of equal
    cells, sum the weights per run with one bincount: O(k log k) a query, not O(k^2)."""
    q, k = cells.shape
    order = np.argsort(cells, axis=1, kind="stable")
    sorted_cells = np.take_along_axis(cells, order, 1)
    new_run = np.ones((q, k), bool)
    new_run[:, 1:] = sorted_cells[:, 1:] != sorted_cells[:, :-1]
    run = np.cumsum(new_run, axis=1) - 1 + (np.arange(q) * k)[:, None]
    totals = np.bincount(run.ravel(), weights=np.take_along_axis(w * allowed, order, 1).ravel(),
                         minlength=q * k)
    votes = np.empty((q, k))
    np.put_along_axis(votes, order, totals[run], 1)
    return votes


def _peak(xyz: np.ndarray, w: np.ndarray, candidate: np.ndarray, bandwidth_km: float, steps: int,
          n_starts: int) -> np.ndarray:
    """(Q, 3) unit vector of the density peak: of the `n_starts` heaviest candidate neighbours, the one
    where the weighted kernel density of all neighbours is highest, then moved by mean shift.
    Densities at n_starts points, not all k: O(k * n_starts) a query. float64 on purpose: in float32,
    latitudes recovered from unit vectors near the poles are off by kilometres."""
    q, k = w.shape
    m = min(n_starts, k)
    score = np.where(candidate, w, -1.0)
    pick = np.argpartition(-score, m - 1, axis=1)[:, :m] if m < k else np.broadcast_to(np.arange(k), (q, k))
    # heaviest first, ties by neighbour rank: the order the search returned them in
    pick = np.take_along_axis(pick, np.lexsort((pick, -np.take_along_axis(score, pick, 1))), 1)
    ok = np.take_along_axis(candidate, pick, 1)
    starts = np.take_along_axis(xyz, pick[:, :, None], 1)  # (Q, M, 3)
    inv_two_h2 = 1.0 / (2.0 * (bandwidth_km / EARTH_RADIUS_KM) ** 2)
    xyz_t = xyz.transpose(0, 2, 1)  # (Q, 3, K): batched matmuls below, faster than the einsums they replaced
    d2 = np.maximum(2.0 - 2.0 * (starts @ xyz_t), 0.0)  # (Q, M, K) chord^2
    density = (np.exp(-d2 * inv_two_h2) @ w[:, :, None])[:, :, 0]
    best = np.argmax(np.where(ok, density, -1.0), axis=1)
    point = starts[np.arange(q), best]
    for _ in range(steps):  # mean shift on the sphere: weighted mean of kernel-weighted neighbours
        d2 = np.maximum(2.0 - 2.0 * (point[:, None, :] @ xyz_t)[:, 0], 0.0)  # chord^2 ~ angle^2 here
        kw = w * np.exp(-d2 * inv_two_h2)
        moved = (kw[:, None, :] @ xyz)[:, 0]
        norm = np.linalg.norm(moved, axis=1, keepdims=True)
        point = np.where(norm > 1e-12, moved / np.maximum(norm, 1e-12), point)
    return point


def min_risk_point(xyz: np.ndarray, w: np.ndarray, valid: np.ndarray, answer: np.ndarray | None,
                   alt_latlon: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """((Q, 3) point, (Q,) its index) of the points (0 `answer`, 1..A `alt_latlon` (Q, A, 2) degrees,
    NaN where none, then the neighbours), the one whose expected GeoScore under the weights w,
    sum_j w_j 5000 exp(-d_j / 1492.7 km), is highest; the first wins ties. `answer` None: the
    neighbours only (index 0 the first neighbour), `alt_latlon` then (Q, 0, 2). The far pick."""
    from geovote.metrics import GEOSCORE_SCALE_KM

    finite = np.isfinite(alt_latlon).all(2)
    alt = latlon_to_unit(np.where(finite, alt_latlon[..., 0], 0.0), np.where(finite, alt_latlon[..., 1], 0.0))
    first = [] if answer is None else [answer[:, None]]
    cand = np.concatenate([*first, alt, xyz], axis=1)  # (Q, [1 +] A + K, 3)
    ok = np.concatenate([np.ones((len(w), len(first)), bool), finite, valid], axis=1)
    expected = np.empty(ok.shape)
    # in chunks of queries, the (rows, C, K, 3) differences under 128 MB; differences, not dot products:
    # a point's distance to itself is exactly 0, and equal candidates score exactly equal (ties matter)
    step = max(1, 2**24 // max(1, 3 * cand.shape[1] * xyz.shape[1]))
    for i in range(0, len(w), step):
        diff = cand[i:i + step, :, None] - xyz[i:i + step, None]  # (rows, C, K, 3)
        d_km = km_for_chord(np.sqrt(np.maximum(np.sum(diff ** 2, axis=3), 0.0)))
        expected[i:i + step] = np.sum(w[i:i + step, None, :] * np.exp(-d_km / GEOSCORE_SCALE_KM), axis=2)
    best = np.argmax(np.where(ok, expected, -1.0), axis=1)  # first of equals: the answer
    return cand[np.arange(len(w)), best], best


def far_weights(sim: np.ndarray, spacing_km: np.ndarray | None, params: VoteConfig) -> np.ndarray:
    """(Q, K) the far pick's weights: softmax(sim / far_temperature) x spacing ** far_density_power,
    normalised (VoteConfig); without spacing, the softmax alone."""
    w = softmax_weights(sim, params.far_temperature)
    if spacing_km is None or not params.far_density_power:
        return w
    k = sim.shape[1]
    spacing = np.nan_to_num(np.asarray(spacing_km, np.float64)[:, :k], nan=1.0)
    w = w * np.maximum(spacing, 1.0) ** params.far_density_power  # >= 1 km: no zero weight for duplicates
    total = w.sum(1, keepdims=True)
    return np.divide(w, total, out=np.zeros_like(w), where=total > 0)


def vote(sim: np.ndarray, lat_deg: np.ndarray, lon_deg: np.ndarray, cells: np.ndarray,
         params: VoteConfig, spacing_km: np.ndarray | None = None, far_pick: bool = False) -> Prediction:
    """sim, lat_deg, lon_deg: (Q, K) neighbours, best first (invalid: -inf/NaN); cells: (Q, K, L) each
    neighbour's cell at every voting level, coarse to fine (rows of `cell_table`); spacing_km: (Q, K)
    each neighbour's gallery spacing (geovote.geo.spacing_km), for the feature log_gallery_spacing_km
    and the far pick's weights; far_pick: compute the far pick (a candidate of the table). Uses
    params.k, temperature, bandwidth_km, mean_shift_steps, n_alternatives and n_starts; the cells and
    levels settings are those `cells` was made with."""
    k = min(params.k, sim.shape[1])
    sim, lat, lon = sim[:, :k], np.asarray(lat_deg[:, :k], float), np.asarray(lon_deg[:, :k], float)
    cells = np.asarray(cells)[:, :k]
    valid = np.isfinite(sim) & np.isfinite(lat)
    sim = np.where(valid, sim, -np.inf)
    w = softmax_weights(sim, params.temperature)
    q = len(sim)
    xyz = latlon_to_unit(np.where(valid, lat, 0.0), np.where(valid, lon, 0.0))

    allowed = valid.copy()
    first_votes = None
    for level in range(cells.shape[2]):
        votes = _cell_votes(cells[:, :, level], w, allowed)
        if first_votes is None:
            first_votes = votes
        best = np.argmax(np.where(allowed, votes, -1.0), axis=1)
        winner = cells[np.arange(q), best, level]
        allowed &= cells[:, :, level] == winner[:, None]
    point = _peak(xyz, w, allowed, params.bandwidth_km, params.mean_shift_steps, params.n_starts)
    lat_out, lon_out = unit_to_latlon(point)
    confidence = _share_within(point, xyz, w, 2.0 * params.bandwidth_km)

    # the query's own features (retrieve.candidates.QUERY_FEATURES), shared by all its candidates
    n_valid = valid.sum(1)
    ranked = np.sort(np.where(valid, sim, -np.inf), 1)[:, ::-1]  # best first
    top = np.where(n_valid > 0, ranked[:, 0], 0.0)
    mean_sim = np.sum(np.where(valid, sim, 0.0), 1) / np.maximum(n_valid, 1)
    gap = np.where(n_valid > 1, top - ranked[:, min(1, k - 1)], 0.0)
    first_share = np.max(np.where(valid, first_votes, 0.0), axis=1)
    final_share = np.sum(w * allowed, axis=1)
    # entropy of the first level's cell shares: each cell's share counted once (at its first neighbour)
    first_cells = cells[:, :, 0]
    order = np.argsort(first_cells, axis=1, kind="stable")
    head = np.ones(first_cells.shape, bool)
    head[:, 1:] = np.diff(np.take_along_axis(first_cells, order, 1), axis=1) != 0
    head &= np.take_along_axis(valid, order, 1)
    share = np.where(head, np.take_along_axis(first_votes, order, 1), 0.0)
    entropy = -np.sum(np.where(share > 0, share * np.log(np.maximum(share, 1e-300)), 0.0), axis=1)
    if spacing_km is None:
        log_spacing = np.full(q, np.nan)
    else:
        log_spacing = np.sum(np.where(valid, w * np.log1p(np.asarray(spacing_km, float)[:, :k]), 0.0), 1)
    query_features = np.stack([top, mean_sim, gap, first_share, final_share, entropy, log_spacing], axis=1)

    # alternatives: runner-up cells of the first level, best first
    n_alt = params.n_alternatives
    alt_lat = np.full((q, n_alt), np.nan)
    alt_lon = np.full((q, n_alt), np.nan)
    alt_score = np.zeros((q, n_alt))
    if n_alt and cells.shape[2]:
        first = cells[:, :, 0]
        top_first = first[np.arange(q), np.argmax(np.where(valid, first_votes, -1.0), 1)]
        taken = ~valid | (first == top_first[:, None])
        for a in range(n_alt):
            score = np.where(taken, -1.0, first_votes)
            best = np.argmax(score, axis=1)
            has = score[np.arange(q), best] > 0
            if not has.any():
                break
            cell = first[np.arange(q), best]
            members = (first == cell[:, None]) & ~taken
            p = _peak(xyz, w, members, params.bandwidth_km, params.mean_shift_steps, params.n_starts)
            la, lo = unit_to_latlon(p)
            alt_lat[has, a], alt_lon[has, a] = la[has], lo[has]
            alt_score[has, a] = _share_within(p, xyz, w, 2.0 * params.bandwidth_km)[has]
            taken |= members
    none = ~valid.any(1)
    lat_out[none], lon_out[none], confidence[none] = np.nan, np.nan, 0.0
    # alternatives best first by the answer's own measure
    order = np.argsort(-alt_score, axis=1, kind="stable")
    alt_lat, alt_lon, alt_score = (np.take_along_axis(a, order, 1) for a in (alt_lat, alt_lon, alt_score))
    pred = Prediction(lat_out, lon_out, confidence, alt_lat, alt_lon, alt_score,
                      query_features=query_features)
    if far_pick:
        wf = far_weights(sim, spacing_km, params)
        far, _ = min_risk_point(xyz, wf, valid, None, np.full((q, 0, 2), np.nan))
        pred.far_lat_deg, pred.far_lon_deg = unit_to_latlon(far)
        pred.far_lat_deg[none], pred.far_lon_deg[none] = np.nan, np.nan
    return pred


def _share_within(point: np.ndarray, xyz: np.ndarray, w: np.ndarray, radius_km: float) -> np.ndarray:
    """(Q,) the weight of the neighbours within radius_km of each query's point."""
    return np.sum(w * (np.sum((xyz - point[:, None]) ** 2, axis=2) <= chord_for_km(radius_km) ** 2), axis=1)
