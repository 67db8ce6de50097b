"""Several photos of one place answered together: an album (one trip, the frames of a clip) or a capture
sequence (OSV-5M's `sequence` column).

    table = album_table(photos, within, albums, spread_km, [model])   # the albums' pooled candidates
    pred = decide(album_model, table)                                 # retrieve.calibrate's decision

Each photo alone has its candidates (retrieve.candidates) and its distance model (retrieve.calibrate),
which can be asked about any point as one of its candidates (Candidates.features_at): P(the photo's place
within d of x). The album's candidates are all its photos' candidates; each is described by every
photo's probabilities there, at d + spread_km (how far apart the album's photos may be taken: within d
of the album's place, each photo is within d + spread of it), summarised over the photos
(SUPPORT_STATS: the mean, the least, the most, the mean without the least, the mean log, and the
expected GeoScore under each), the number of photos and what the candidate was for the photo it came
from (its kind, its expected GeoScore) (ALBUM_FEATURES). A second distance model, fitted like the first
(retrieve.calibrate.fit, smaller trees: ALBUM_TREES) on tuning albums, gives each of them P(the album's
place within d); the candidate of highest expected GeoScore answers. It is the same decision as a
single photo's, on the album's evidence.

A photo of somewhere else slipped into an album supports none of the places the others agree on: the
statistics without the least supporting photo let the model discount it (tuning albums carry such
photos on purpose), and each photo's `agreement` (its probability within AGREEMENT_KM of the answer)
says which one it was. An album of one photo is that photo's own answer. Without a fitted album model (a
tuning split without sequences), albums are decided on the mean support, and say they are not
calibrated.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from retrieve.calibrate import FARTHEST_KM, LEVELS_KM, expected_weights
from retrieve.candidates import KINDS, Candidates

SUPPORT_STATS = ("mean", "min", "max", "trimmed", "meanlog")  # of the photos' probabilities at a candidate
# then the candidate's own expected GeoScore and kind for the photo it came from, and the expected GeoScore
# under each statistic (a linear function of its levels: trees approximate sums poorly)
ALBUM_FEATURES = (*(f"{stat}_support_{km}km" for stat in SUPPORT_STATS for km in LEVELS_KM), "log_photos",
                  "own_expected_geoscore", *(f"is_{kind}" for kind in KINDS),
                  *(f"{stat}_support_expected_geoscore" for stat in SUPPORT_STATS[:4]))
LOG_FLOOR = 1e-3  # a probability below this counts as this in the mean log: one photo cannot veto a place
ALBUM_TREES = {"max_iter": 100, "max_depth": 2, "learning_rate": 0.1, "min_samples_leaf": 200,
               "l2_regularization": 1.0}  # fewer albums than photos to learn from: smaller trees
AGREEMENT_KM = 200
DEFAULT_SPREAD_KM = 5.0  # before tuning chooses one on sequences (SPREADS_KM, retrieve.tuning)
SPREADS_KM = (0.0, 5.0, 25.0, 100.0)
TUNED_PHOTOS = 8  # tuning albums hold at most this many photos of a sequence (and maybe an outlier)


def cdf_at(within: np.ndarray, r_km: np.ndarray, levels_km=LEVELS_KM) -> np.ndarray:
    """P(distance <= r) under the CDF given by `within` (..., L) at LEVELS_KM, interpolated linearly in
    log(1 + d) between them (0 at 0 km, 1 at FARTHEST_KM: retrieve.calibrate.radius_km's reading),
    at each of r_km (..., M) (batch dims broadcast); 0 where r <= 0."""
    knots = np.log1p(np.array([0.0, *levels_km, FARTHEST_KM]))
    r = np.asarray(r_km, np.float64)
    v = np.asarray(within, np.float64)
    v = np.concatenate([np.zeros(v.shape[:-1] + (1,)), v, np.ones(v.shape[:-1] + (1,))], axis=-1)
    shape = np.broadcast_shapes(v.shape[:-1], r.shape[:-1])
    v = np.broadcast_to(v, shape + v.shape[-1:])
    r = np.broadcast_to(r, shape + r.shape[-1:])
    u = np.log1p(np.clip(r, 0.0, FARTHEST_KM))
    j = np.clip(np.searchsorted(knots, u, side="right"), 1, len(knots) - 1)
    lo, hi = np.take_along_axis(v, j - 1, -1), np.take_along_axis(v, j, -1)
    t = (u - knots[j - 1]) / (knots[j] - knots[j - 1])
    return np.where(r > 0, lo + t * (hi - lo), 0.0)


def photo_within(table, within, rows, lat_deg, lon_deg, own, own_col, models, model_index=None) -> np.ndarray:
    """(N, X, L) each photo's (rows of `table`) P(its place within each level of each point (X,)):
    its own distance model asked about the point as one of its candidates (Candidates.features_at);
    where the point is one of the photo's own candidates (`own` (X,): the photo row it came from, -1
    none; `own_col`: its column there), that candidate's own probabilities (`within`)."""
    rows = np.asarray(rows)
    feats = table.features_at(rows, lat_deg, lon_deg)
    idx = np.zeros(len(rows), np.int64) if model_index is None else np.asarray(model_index)[rows]
    out = np.empty(feats.shape[:2] + (len(LEVELS_KM),))
    for m in np.unique(idx):
        out[idx == m] = models[m].within(feats[idx == m])
    for i, r in enumerate(rows):
        mine = own == r
        out[i, mine] = within[r][own_col[mine]]
    return np.nan_to_num(out)


def _stats(s: np.ndarray) -> np.ndarray:
    """(N, X, L) probabilities of N photos -> (X, len(SUPPORT_STATS) * L) in ALBUM_FEATURES' order."""
    n = len(s)
    least = s.min(0)
    trimmed = (s.sum(0) - least) / (n - 1) if n > 1 else least
    meanlog = np.log(np.maximum(s, LOG_FLOOR)).mean(0)
    return np.concatenate([s.mean(0), least, s.max(0), trimmed, meanlog], axis=1)


def album_table(table, within: np.ndarray, albums: list, spread_km: float, models, model_index=None):
    """The candidate table of albums (retrieve.candidates.Candidates, one row per album): every
    candidate of every photo of the album, with ALBUM_FEATURES. `table`: the photos' candidates (Q, C);
    `within`: their probabilities (Q, C, L); `albums`: one array of photo rows (into Q) each; `models`:
    the photos' distance models (one, or one per fold with `model_index` (Q,) in tuning)."""
    c = table.lat_deg.shape[1]
    width = max((len(a) * c if len(a) == 1 else min(len(a) * c, MAX_POOL) for a in albums), default=0)
    n_feat = len(ALBUM_FEATURES)
    lat = np.full((len(albums), width), np.nan)
    lon, kind = lat.copy(), np.full((len(albums), width), -1)
    feats = np.full((len(albums), width, n_feat), np.nan)
    a, b = expected_weights(LEVELS_KM)
    radii = np.asarray(LEVELS_KM, np.float64) + spread_km
    for i, rows in enumerate(albums):
        rows = np.asarray(rows)
        p = table.present[rows]
        x_lat, x_lon, x_kind = table.lat_deg[rows][p], table.lon_deg[rows][p], table.kind[rows][p]
        if not len(x_lat):
            continue
        own = np.broadcast_to(rows[:, None], p.shape)[p]
        own_col = np.broadcast_to(np.arange(p.shape[1])[None], p.shape)[p]
        own_eg = within[rows][p] @ a + b
        if len(rows) > 1:  # one place each, the most promising first, at most MAX_POOL
            keep = _pool(x_lat, x_lon, own_eg)
            x_lat, x_lon, x_kind, own, own_col, own_eg = (
                v[keep] for v in (x_lat, x_lon, x_kind, own, own_col, own_eg))
        s = photo_within(table, within, rows, x_lat, x_lon, own, own_col, models, model_index)
        if spread_km:  # within d of the album's place: its photo within d + spread of it
            s = cdf_at(s, np.broadcast_to(radii, s.shape))
        n, n_stats = len(x_lat), len(SUPPORT_STATS) * len(LEVELS_KM)
        lat[i, :n], lon[i, :n], kind[i, :n] = x_lat, x_lon, x_kind
        feats[i, :n, :n_stats] = _stats(s)
        feats[i, :n, n_stats] = np.log(len(rows))
        feats[i, :n, n_stats + 1] = own_eg
        feats[i, :n, n_stats + 2:n_stats + 2 + len(KINDS)] = x_kind[:, None] == np.arange(len(KINDS))
        stats = feats[i, :n, :n_stats].reshape(n, len(SUPPORT_STATS), len(LEVELS_KM))[:, :4]
        feats[i, :n, n_stats + 2 + len(KINDS):] = stats @ a + b
    return Candidates(lat, lon, kind, feats)


MAX_POOL = 64  # an album's candidates: a query of 50 photos asks 50 models about 64 places, not 400
POOL_MERGE_KM = 1.0  # candidates closer than this to a more promising one are the same place


def _pool(lat_deg, lon_deg, expected) -> np.ndarray:
    """Indices of the pooled candidates kept: by their own photo's expected GeoScore, best first, each
    at least POOL_MERGE_KM from every better one kept, at most MAX_POOL."""
    from geovote.geo import haversine_km

    kept = []
    for j in np.argsort(-expected, kind="stable"):  # against the kept ones only: memory O(MAX_POOL)
        near = haversine_km(lat_deg[j], lon_deg[j], lat_deg[kept], lon_deg[kept]) if kept else np.zeros(0)
        if np.any(near < POOL_MERGE_KM):
            continue
        kept.append(j)
        if len(kept) == MAX_POOL:
            break
    return np.array(kept, np.int64)


def mean_support(table) -> np.ndarray:
    """(A, X, L) the mean support columns of an album table: the uncalibrated albums' probabilities."""
    return table.features[..., [ALBUM_FEATURES.index(f"mean_support_{km}km") for km in LEVELS_KM]]


def agreement(lat_deg: float, lon_deg: float, table, within, rows, spread_km: float, model) -> np.ndarray:
    """(N,) each photo's probability of lying within AGREEMENT_KM + spread_km of a point (the answer):
    how much it agrees with it. The photo the point came from (one of its own candidates, the same
    coordinates) speaks of it with that candidate's own probabilities."""
    if not np.isfinite(lat_deg):
        return np.zeros(len(rows))
    own, own_col = np.array([-1]), np.array([0])
    for r in rows:
        same = np.flatnonzero((table.lat_deg[r] == lat_deg) & (table.lon_deg[r] == lon_deg))
        if same.size:
            own, own_col = np.array([r]), same[:1]
            break
    p = photo_within(table, within, rows, np.array([lat_deg]), np.array([lon_deg]), own, own_col, [model])
    return cdf_at(p[:, 0], np.array([AGREEMENT_KM + spread_km]))[:, 0]


@dataclass
class AlbumTuning:
    """What retrieve.tune fitted for albums: the album model (None: decided on the mean support) and
    the photos' spread it was fitted with."""

    model: object = None  # retrieve.calibrate.Calibration over ALBUM_FEATURES
    spread_km: float = DEFAULT_SPREAD_KM


@dataclass
class AlbumAnswers:
    joint: object  # retrieve.predict.Prediction: one answer per album
    single: object  # Prediction: each photo alone
    agreement: list  # per album, (N,) each photo's support within AGREEMENT_KM of the joint answer
    calibrated: np.ndarray  # (A,) bool: the joint probabilities are calibrated
    albums: list  # per album, its photo rows
    spread_km: float


def album_within(model, atable, table, within: np.ndarray, albums: list) -> np.ndarray:
    """(A, X, L) the album candidates' (`atable`) probabilities: the album model's (without one, the mean
    support); an album of one photo keeps the photo's own (its row of `table`, `within`)."""
    out = model.within(atable.features) if model is not None else mean_support(atable).copy()
    for i, rows in enumerate(albums):
        if len(rows) == 1:
            own = within[rows[0]][table.present[rows[0]]]  # album_table's order: the present ones
            out[i] = np.nan
            out[i, :len(own)] = own
    return out


def answer_albums(album_model, model, table, within, single, albums: list, spread_km: float,
                  n_alternatives: int = 3, tuned_spread_km: float | None = None):
    """AlbumAnswers of `albums` (arrays of rows into the photos' candidate table `table`, with their
    distance model `model`, their probabilities `within` and single answers `single`), decided by
    `album_model` (None: on the mean support). An answer is `calibrated` where the album model was
    fitted for it: at `tuned_spread_km` (default: spread_km), with at most TUNED_PHOTOS photos and an
    outlier."""
    from retrieve.calibrate import decide

    tuned_spread_km = spread_km if tuned_spread_km is None else tuned_spread_km
    albums = [np.asarray(a, np.int64) for a in albums]
    atable = album_table(table, within, albums, spread_km, [model])
    probabilities = album_within(album_model, atable, table, within, albums)
    joint = decide(None, atable, n_alternatives, within=probabilities)
    agree = [agreement(joint.lat_deg[i], joint.lon_deg[i], table, within, rows, spread_km, model)
             for i, rows in enumerate(albums)]
    # the album model holds where it was fitted: its spread, albums of at most TUNED_PHOTOS (+ an outlier)
    fits = album_model is not None and spread_km == tuned_spread_km
    calibrated = np.array([len(a) == 1 or (fits and len(a) <= TUNED_PHOTOS + 1) for a in albums], bool)
    return AlbumAnswers(joint, single, agree, calibrated, albums, spread_km)


def groups(sequence: np.ndarray) -> list[np.ndarray]:
    """The rows of each non-empty value of `sequence`, in order of first appearance."""
    sequence = np.asarray(sequence)
    if sequence.dtype == object:  # a blank CSV cell read as null: no sequence, never one named "None"
        null = np.array([v is None or (isinstance(v, float) and v != v) for v in sequence], bool)
        sequence = np.where(null, "", sequence)
    sequence = sequence.astype(str)
    named = np.flatnonzero(sequence != "")
    if not named.size:
        return []
    _, first, inverse = np.unique(sequence[named], return_index=True, return_inverse=True)
    order = np.argsort(inverse, kind="stable")  # each group's rows together, in row order
    parts = np.split(named[order], np.cumsum(np.bincount(inverse))[:-1])
    return [parts[k] for k in np.argsort(first)]

__all__ = ["ALBUM_FEATURES", "AlbumAnswers", "AlbumTuning", "DEFAULT_SPREAD_KM", "SPREADS_KM", "agreement",
           "album_table", "answer_albums", "cdf_at", "groups", "photo_within"]
