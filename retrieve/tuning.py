"""Choose the voting parameters (k, T, cells and levels, bandwidth) on the validation split, never on test,
and store them with the index (retrieve.json). `python -m retrieve.tune` is its command; embed.build runs
it after indexing (retrieve.pipeline).

The validation images are embedded once (resumable) beside the index. One search at the largest k serves
every setting; the grid is small enough to be exhaustive. 1-NN and the weighted mean are scored too.

A dataset without val.csv (OSV-5M) is tuned on training images held out of their own search: 2,000
random train rows query the index, and every neighbour that is the query itself, lies within 1 km of it
(OSV-5M keeps train and test 1 km apart) or shares its capture `sequence` (when the CSV has one) is
removed before voting.

Then the one decision (retrieve.calibrate): every tuning image's candidate table (retrieve.candidates)
with each candidate's distance to the truth, and the distance model fitted on them. Far places are part
of it on every dataset: the split's far counterpart where the dataset has one (`val_far` for `val`:
views of places far from every training place, as the bundled sample has), else train images held out
of a whole neighbourhood (FAR_REMOVED_KM around them): without far places to learn from, a model has
only ever seen photos of covered places, and its probabilities stay high where the engine is lost. The
far pick's weights are chosen on those far images. The final answers' scores are cross-fitted (each
half of the images answered by a model fitted on the other half); with SHORTLIST > 1 the grid's best
settings are compared by them.
"""
from __future__ import annotations

import itertools
import json
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable

import numpy as np

from geovote.geo import haversine_km, latlon_to_unit, unit_to_latlon
from geovote.metrics import distance_metrics
from retrieve.calibrate import LEVELS_KM
from retrieve.embedded import embed_for_eval

GRID = {  # 700 settings, exhaustive; wide enough that the sample's val optimum lies inside it
    "k": (3, 5, 10, 20, 50),
    "temperature": (0.01, 0.03, 0.1, 0.3),
    "cells": (("h3", (0, 2)), ("h3", (1, 3)), ("h3", (1, 3, 5)), ("h3", (2, 4)),
              ("quadtree", (1, 3)), ("quadtree", (2, 4, 6)), ("quadtree", (3, 6))),
    "bandwidth_km": (25.0, 75.0, 200.0, 400.0, 800.0),
}


# 36 of GRID's settings: a tuning in about a second on 2,000 images (finetune's validation, val_grid small)
SMALL_GRID = {"k": (10, 20, 50), "temperature": (0.03, 0.1),
              "cells": (("h3", (1, 3)), ("quadtree", (1, 3))), "bandwidth_km": (75.0, 200.0, 400.0)}


class TooFewToTune(Exception):
    """Too few tuning images with neighbours for the grid's choice to mean anything."""


# the far pick's weights, chosen on the far images alone
FAR_TEMPERATURE = (0.01, 0.03, 0.1)
FAR_DENSITY_POWER = (0.0, 1.0, 2.0, 3.0, 4.0)
MIN_TUNE_QUERIES = 20  # fewer, and the choice among 700 settings is noise
CARVE_QUERIES = 2000
CARVE_EXCLUDE_KM = 1.0
CARVE_EXTRA = 50  # neighbours searched beyond k, to survive the exclusions
CARVE_ALBUMS = 150  # of the carved queries, whole capture sequences (the album model's tuning albums)
# far images where the dataset has no far split: train images held out of everything within one of these
# radii of them (cycled over the queries), searched this many neighbours deeper
FAR_QUERIES = 1000
FAR_REMOVED_KM = (100.0, 300.0, 1000.0)
FAR_EXTRA = 400
SHORTLIST = 1  # the grid's best settings whose cross-fitted answers are compared (each ~10 s at 1M)


class Gallery:
    """Vectors held in memory, searched exactly (index.exact), with what tune() asks of an engine
    (search, cells, params): the same neighbours, ties and all, as an engine over a Flat index of them.
    finetune's validation tunes on one, so it scores the engine its checkpoint will become."""

    def __init__(self, emb: np.ndarray, lat_deg: np.ndarray, lon_deg: np.ndarray):
        from retrieve.predict import VoteConfig

        self.emb, self.lat_deg, self.lon_deg = emb, np.asarray(lat_deg), np.asarray(lon_deg)
        self.params = VoteConfig()
        self._cells: dict = {}

    def search(self, queries: np.ndarray, k: int):
        from index.exact import exact_topk
        from index.search import SearchResult

        q = np.asarray(queries, np.float32)
        norms = np.linalg.norm(q, axis=1, keepdims=True)
        if np.any(norms == 0):
            raise ValueError("a query embedding is all zeros")
        sim, rows = exact_topk(self.emb, q / norms, k)  # normalised as the index normalises every query
        found = rows >= 0  # fewer gallery vectors than k: the rest are missing, as the engine has them
        safe = np.maximum(rows, 0)
        return SearchResult(np.where(found, sim, -np.inf).astype(np.float32), np.where(found, rows, -1),
                            np.where(found, safe.astype(str), "").astype(object),
                            np.where(found, self.lat_deg[safe], np.nan),
                            np.where(found, self.lon_deg[safe], np.nan))

    def cells(self, params) -> np.ndarray:
        from retrieve.predict import cell_table

        if params.cell_spec not in self._cells:
            self._cells[params.cell_spec] = cell_table(self.lat_deg, self.lon_deg, params)
        return self._cells[params.cell_spec]


_SEQUENCES: dict = {}  # train.csv's id and sequence columns, by (path, mtime)
_INDEX_IDS: dict = {}  # an index's ids as text, by its build digest


def split_sequences(data: Path, ids, split: str = "train") -> np.ndarray | None:
    """The capture `sequence` of each of the `split` images `ids` ("" where unknown), from the split's
    CSV joined on id; None when the CSV has no such column. Arrays throughout: 5.1M rows in seconds."""
    import pyarrow as pa
    import pyarrow.compute as pc

    from geovote.data import DataError, csv_columns, read_split, split_csv

    try:
        csv_path = split_csv(data, split)
        if "sequence" not in csv_columns(csv_path):
            return None
    except DataError:  # a gallery of photos has no train.csv
        return None
    key = (str(csv_path), csv_path.stat().st_mtime_ns)
    if key not in _SEQUENCES:  # read once per process: both tuning sets ask (5.1M rows: seconds each)
        if len(_SEQUENCES) >= 4:
            _SEQUENCES.clear()
        _SEQUENCES[key] = read_split(data, split, columns=("sequence",), check_images=False)
    t = _SEQUENCES[key]
    pos = pc.index_in(pa.array(np.asarray(ids), pa.string()), value_set=t.table.column("id").combine_chunks())
    seq = t.table.column("sequence").combine_chunks().take(pos)
    return np.asarray(pc.fill_null(pc.cast(seq, pa.string()), "").to_numpy(zero_copy_only=False), dtype=str)


def carve_from_train(engine, data: Path, n: int = CARVE_QUERIES, seed: int = 0, removed_km=CARVE_EXCLUDE_KM):
    """(ids, emb, lat, lon, exclude): n train rows as queries, and the function that removes their own
    neighbourhood (itself, anything closer than `removed_km` (one radius, or one per query cycled), the
    same sequence) from a SearchResult."""
    return carve_sets(engine, data, [(n, seed, removed_km)])[0]


def carve_sets(engine, data: Path, specs: list) -> list:
    """carve_from_train for several (n, seed, removed_km[, albums]) at once: the shards are read in one
    pass for all their rows (a pass over 1M rows of 768-d shards takes ~20 s here). `albums`: of the n,
    the rows of up to that many whole capture sequences (at most TUNED_PHOTOS of each), so the album
    model has albums to learn from; the rest drawn at random."""
    from geovote.shards import read_embeddings, shard_sizes

    folder = engine.layout.embeddings("train")
    total = sum(shard_sizes(folder)[0])
    picks = []
    for n, seed, _, *albums in specs:
        rng = np.random.default_rng(seed)
        whole = (_sequence_rows(folder, data, albums[0], rng) if albums and albums[0]
                 else np.zeros(0, np.int64))
        rest = np.setdiff1d(np.arange(total), whole)
        extra = rng.choice(rest, min(max(n - len(whole), 0), len(rest)), replace=False)
        picks.append(np.sort(np.concatenate([whole, extra]).astype(np.int64)))
    union = np.unique(np.concatenate(picks))
    every = read_embeddings(folder, union)  # only the queries: never the whole train split in memory
    digest = engine.index.digest
    if digest not in _INDEX_IDS:  # decoded once per index build
        _INDEX_IDS.clear()
        _INDEX_IDS[digest] = np.char.decode(np.asarray(engine.index.ids), "utf-8")
    index_ids = _INDEX_IDS[digest]
    # one join for the neighbours (by index row) and the queries (by id: they are shard rows)
    all_ids = every.ids.astype(str)
    seq = split_sequences(data, np.concatenate([index_ids, all_ids]))
    out = []
    for (_, _, removed_km, *_), rows in zip(specs, picks):
        at = np.searchsorted(union, rows)
        q_ids, q_lat, q_lon, emb = all_ids[at], every.lat_deg[at], every.lon_deg[at], every.embedding[at]
        q_seq = None if seq is None else seq[len(index_ids):][at][:, None]
        index_seq = None if seq is None else seq[:len(index_ids)]
        out.append((q_ids, emb, q_lat, q_lon, _excluder(q_ids, q_lat, q_lon, removed_km, index_seq, q_seq)))
    return out


def _sequence_rows(folder: Path, data: Path, albums: int, rng: np.random.Generator) -> np.ndarray:
    """Shard rows of up to `albums` random capture sequences of 2 or more train images (at most
    TUNED_PHOTOS of each); none when train.csv has no `sequence` column."""
    from geovote.shards import read_coordinates
    from retrieve.album import TUNED_PHOTOS, groups

    seq = split_sequences(data, read_coordinates(folder).ids.astype(str))
    if seq is None:
        return np.zeros(0, np.int64)
    found = [g for g in groups(seq) if len(g) > 1]
    chosen = rng.choice(len(found), min(albums, len(found)), replace=False) if found else []
    rows = [found[i] if len(found[i]) <= TUNED_PHOTOS
            else rng.choice(found[i], TUNED_PHOTOS, replace=False) for i in chosen]
    return np.concatenate(rows).astype(np.int64) if rows else np.zeros(0, np.int64)


def _excluder(q_ids, q_lat, q_lon, removed_km, seq, q_seq):
    """The function that removes each query's own neighbourhood from a SearchResult (carve_from_train)."""
    radius = np.resize(np.asarray(removed_km, np.float64), len(q_ids))[:, None]

    def exclude(res):
        own = (res.ids == q_ids[:, None]) | (haversine_km(res.lat_deg, res.lon_deg, q_lat[:, None],
                                                           q_lon[:, None]) < radius)
        if seq is not None:
            own |= (seq[np.maximum(res.rows, 0)] == q_seq) & (q_seq != "") & (res.rows >= 0)
        order = np.argsort(own, axis=1, kind="stable")  # kept neighbours first, in rank order
        keep = ~np.take_along_axis(own, order, 1)
        pick = lambda a, fill: np.where(keep, np.take_along_axis(a, order, 1), fill)  # noqa: E731
        return replace(res, similarity=pick(res.similarity, -np.inf).astype(np.float32),
                       rows=pick(res.rows, -1), ids=pick(res.ids, ""), lat_deg=pick(res.lat_deg, np.nan),
                       lon_deg=pick(res.lon_deg, np.nan))

    return exclude


def score(lat, lon, true_lat, true_lon) -> dict:
    """The metrics tuning reports (geovote.metrics: the one GeoScore)."""
    m = distance_metrics(haversine_km(lat, lon, true_lat, true_lon))
    return {key: m[key] for key in ("geoscore", "acc_25km", "median_km")}


def tune(engine, emb, true_lat, true_lon, grid=GRID, log=print, exclude=None) -> tuple[object, dict, list]:
    """Score every setting of `grid`; `exclude` (carve_from_train) filters each query's neighbours."""
    from retrieve.predict import VoteConfig, one_nn, vote, weighted_mean

    if exclude is None:
        res = engine.search(emb, max(grid["k"]))
    else:
        res = exclude(engine.search(emb, max(grid["k"]) + CARVE_EXTRA))
    found = np.isfinite(res.similarity[:, 0])  # a held-out query may have lost every neighbour
    if found.sum() < MIN_TUNE_QUERIES:
        raise TooFewToTune(f"only {int(found.sum())} of {len(found)} tuning images have neighbours in the "
                           f"index: too few to tune (at least {MIN_TUNE_QUERIES})")
    if not found.all():
        log(f"{int((~found).sum())} of {len(found)} tuning images have no neighbour left; "
            "tuning on the others")
        res = replace(res, **{f: getattr(res, f)[found] for f in ("similarity", "rows", "ids", "lat_deg",
                                                                  "lon_deg")})
        true_lat, true_lon, emb = true_lat[found], true_lon[found], emb[found]
    trials = []
    t0 = time.perf_counter()
    # the far pick's weights start from the defaults: not inherited from an earlier tuning's retrieve.json
    default = VoteConfig()
    start = replace(engine.params, far_temperature=default.far_temperature,
                    far_density_power=default.far_density_power)
    for cells, levels in grid["cells"]:
        base = replace(start, cells=cells, levels=tuple(levels))
        table = np.asarray(engine.cells(base))[np.maximum(res.rows, 0)]
        for k, temp, bw in itertools.product(grid["k"], grid["temperature"], grid["bandwidth_km"]):
            p = replace(base, k=k, temperature=temp, bandwidth_km=bw)
            # the runner-up peaks do not move the answer: not computed while choosing (2.4x less voting)
            pred = vote(res.similarity, res.lat_deg, res.lon_deg, table, replace(p, n_alternatives=0))
            trials.append((p, score(pred.lat_deg, pred.lon_deg, true_lat, true_lon)))
    best, best_score = max(trials, key=lambda t: t[1]["geoscore"])
    baselines = {"1-nn": score(*one_nn(res.similarity, res.lat_deg, res.lon_deg), true_lat, true_lon)}
    for k in grid["k"]:
        for temp in grid["temperature"]:
            s = score(*weighted_mean(res.similarity[:, :k], res.lat_deg[:, :k], res.lon_deg[:, :k], temp),
                      true_lat, true_lon)
            if s["geoscore"] > baselines.get("weighted mean", {"geoscore": -1})["geoscore"]:
                baselines["weighted mean"] = {**s, "k": k, "temperature": temp}
    log(f"tuned {len(trials)} settings on {len(emb):,} validation images in {time.perf_counter() - t0:.1f} s")
    return best, {"voting": best_score, **baselines}, trials


def tune_and_save(engine, data: Path, split: str = "val", workers: int = -1, log=print):
    """Embed `split`, tune on it, store the choice in the index folder. Returns (params, scores, path).
    Without a val split, tunes on train images held out of their own search (carve_from_train). Holds
    the engine's write lock (geovote.lock) throughout."""
    from geovote.lock import engine_lock

    with engine_lock(engine.layout.root, "tuning", log=log):
        return _tune_and_save(engine, data, split, workers, log)


@dataclass
class TuningSet:
    """Images the engine is tuned on, with what their searches leave out (None: nothing)."""

    name: str
    emb: np.ndarray
    lat: np.ndarray
    lon: np.ndarray
    exclude: Callable | None = None
    extra: int = 0  # neighbours searched beyond k, for the exclusions to leave k
    sequence: np.ndarray | None = None  # each image's capture sequence ("" none): the tuning albums

    def search(self, engine, k: int):
        if self.exclude is None:
            return engine.search(self.emb, k)
        return self.exclude(engine.search(self.emb, k + self.extra))


def tuning_sets(engine, data: Path, split: str, workers: int, log) -> tuple[TuningSet, TuningSet]:
    """(the tuning images, the far images): `split` (or train held out of its own search), and its far
    counterpart (or train held out of a whole neighbourhood, FAR_REMOVED_KM)."""
    from geovote.data import split_csv

    has_split = _has_split(data, split)
    if not has_split and split != "val":
        split_csv(data, split)  # the error that names it
    far = f"{split}_far"
    has_far = has_split and _has_split(data, far)
    specs = ([] if has_split else [(CARVE_QUERIES, 0, CARVE_EXCLUDE_KM, CARVE_ALBUMS)]) + \
        ([] if has_far else [(FAR_QUERIES, 1, FAR_REMOVED_KM)])
    carved = carve_sets(engine, data, specs) if specs else []
    if has_split:
        ids, lat, lon, emb = embed_for_eval(engine, data, split, workers, log)
        main = TuningSet(split, emb, lat, lon, sequence=split_sequences(data, ids.astype(str), split))
    else:
        ids, emb, lat, lon, exclude = carved.pop(0)
        log(f"{data} has no val split: tuning on {len(emb):,} train images held out of their own search")
        main = TuningSet("train (held out of its own search)", emb, lat, lon, exclude, CARVE_EXTRA,
                         split_sequences(data, ids))
    if has_far:
        ids, lat, lon, emb = embed_for_eval(engine, data, far, workers, log)
        return main, TuningSet(far, emb, lat, lon, sequence=split_sequences(data, ids.astype(str), far))
    ids, emb, lat, lon, exclude = carved.pop(0)
    radii = "/".join(f"{r:g}" for r in FAR_REMOVED_KM)
    log(f"far places: {len(emb):,} train images held out of everything within {radii} km of them")
    return main, TuningSet(f"train held out within {radii} km", emb, lat, lon, exclude, FAR_EXTRA,
                           split_sequences(data, ids))


def candidate_rows(engine, params, ts: TuningSet):
    """(Candidates, true lat, lon) of a tuning set's images under `params` (an image whose search kept
    no neighbour has no candidate)."""
    _, table = engine.vote_on(ts.search(engine, params.k), params)
    return table, ts.lat, ts.lon


def _rows(tables) -> tuple[np.ndarray, np.ndarray]:
    """(features, distance to the truth km) of every present candidate of [(Candidates, lat, lon)]."""
    xs, ds = [], []
    for table, lat, lon in tables:
        p = table.present
        d = haversine_km(table.lat_deg, table.lon_deg, np.asarray(lat)[:, None], np.asarray(lon)[:, None])
        xs.append(table.features[p])
        ds.append(d[p])
    return np.concatenate(xs), np.concatenate(ds)


def fit_model(tables, fitted_on: str):
    from retrieve.calibrate import fit
    from retrieve.candidates import FEATURES

    x, d = _rows(tables)
    return fit(x, d, FEATURES, fitted_on, images=sum(len(t.lat_deg) for t, _, _ in tables))


def _split_table(table, keep: np.ndarray):
    from retrieve.candidates import Candidates

    return Candidates(table.lat_deg[keep], table.lon_deg[keep], table.kind[keep], table.features[keep])


@dataclass
class CrossFit:
    """Each tuning image's candidates' probabilities from a model fitted on the other folds only (what
    the engine would say of images it was not fitted on), with the models and each image's fold."""

    within: list  # per tuning set, (Q, C, levels)
    fold: list  # per tuning set, (Q,) int: the image's fold, which model may speak of it (models[fold])
    models: list


def group_folds(n: int, sequence: np.ndarray | None, folds: int, rng: np.random.Generator) -> np.ndarray:
    """(n,) a fold for each image, the same for every image of a capture sequence (an image in none is
    its own group): near-copies of a view never answer for each other across folds."""
    from retrieve.album import groups

    fold = rng.integers(0, folds, n)
    for rows in groups(sequence) if sequence is not None else []:
        fold[rows] = fold[rows[0]]
    return fold


def crossfit_within(tables, folds: int = 2, seed: int = 0, sequences=None) -> CrossFit:
    """CrossFit of `tables` [(Candidates, lat, lon)], images in folds by their `sequences` (one array
    per table, or None)."""
    rng = np.random.default_rng(seed)
    sequences = sequences or [None] * len(tables)
    fold = [group_folds(len(t.lat_deg), seq, folds, rng) for (t, _, _), seq in zip(tables, sequences)]
    out = [np.full(t.features.shape[:2] + (len(LEVELS_KM),), np.nan) for t, _, _ in tables]
    models = []
    for f in range(folds):
        train = [(_split_table(t, fo != f), la[fo != f], lo[fo != f])
                 for (t, la, lo), fo in zip(tables, fold)]
        models.append(fit_model(train, "cross-fit"))
        for (t, _, _), fo, w in zip(tables, fold, out):
            w[fo == f] = models[f].within(t.features[fo == f])
    return CrossFit(out, fold, models)


def crossfit_scores(tables, names, folds: int = 2, seed: int = 0, sequences=None) -> tuple[dict, CrossFit]:
    """(the final answers' metrics on each tuning set, every image answered by a model fitted on the
    other folds only (so the score is not the fit's own; a sequence's images in one fold); the CrossFit
    they came from)."""
    from retrieve.calibrate import decide

    crossfit = crossfit_within(tables, folds, seed, sequences)
    out = {}
    for name, (t, la, lo), w in zip(names, tables, crossfit.within):
        pred = decide(None, t, 0, within=w)
        ok = np.isfinite(pred.lat_deg)
        out[name] = score(pred.lat_deg[ok], pred.lon_deg[ok], np.asarray(la)[ok], np.asarray(lo)[ok])
    return out, crossfit


def _tune_and_save(engine, data: Path, split: str, workers: int, log):
    from retrieve.engine import save_params

    t0 = time.perf_counter()
    main, far = tuning_sets(engine, data, split, workers, log)
    t_sets = time.perf_counter()
    best, scores, trials = tune(engine, main.emb, main.lat, main.lon, log=log, exclude=main.exclude)
    grid_best = best  # what `voting` scores, and finetune's validation reproduces
    best, far_grid = tune_far_weights(engine, best, far, log)
    t_grid = time.perf_counter()
    # the grid's best few settings, each judged by its final answers (the far weights kept)
    ranked = sorted(trials, key=lambda t: -t[1]["geoscore"])
    shortlist = [best] + [replace(p, far_temperature=best.far_temperature,
                                  far_density_power=best.far_density_power)
                          for p, _ in ranked[1:SHORTLIST]]
    judged = []
    for params in shortlist:
        tables = [candidate_rows(engine, params, ts) for ts in (main, far)]
        answered, crossfit = crossfit_scores(tables, (main.name, far.name),
                                             sequences=[main.sequence, far.sequence])
        both = answered[main.name]["geoscore"] * len(main.lat) + answered[far.name]["geoscore"] * len(far.lat)
        judged.append((both / (len(main.lat) + len(far.lat)), params, tables, answered, crossfit))
        log(f"k={params.k}, T={params.temperature}, {params.cells} {params.levels}, {params.bandwidth_km:g} "
            f"km: answers {answered[main.name]['geoscore']:.0f} on {main.name}, "
            f"{answered[far.name]['geoscore']:.0f} on {far.name} (cross-fitted)")
    _, best, tables, answered, crossfit = max(judged, key=lambda j: j[0])
    far_weights_of_best = {"far_temperature": best.far_temperature,
                           "far_density_power": best.far_density_power}
    # the chosen setting's plain vote (`voting` is the grid's best)
    scores["chosen voting"] = next(s for p, s in trials if replace(p, **far_weights_of_best) == best)
    fitted_on = f"{main.name} + {far.name}"
    cal = fit_model(tables, fitted_on)
    scores |= {f"answer on {name}": got for name, got in answered.items()}
    t_cal = time.perf_counter()
    album_tuning, album_record = tune_albums(tables, crossfit, (main, far), log)
    t_albums = time.perf_counter()
    cal.save(engine.layout.calibration)  # first: an engine counts as tuned once retrieve.json is there
    if album_tuning.model is not None:
        album_tuning.model.save(engine.layout.album_calibration)
    else:  # never one left from an earlier tuning of other photos
        engine.layout.album_calibration.unlink(missing_ok=True)
    validation = {"split": main.name, "far": far.name, "data": str(data), "images": len(main.emb),
                  "far_images": len(far.emb), **scores}
    path = save_params(engine.index_dir, best, {"validation": validation, "albums": album_record,
                                                "grid": json.loads(json.dumps(GRID)), "trials": len(trials),
                                                "grid_best": json.loads(json.dumps(asdict(grid_best))),
                                                "far_pick": far_grid,
                                                "seconds": round(time.perf_counter() - t0, 1)})
    log(f"answers (cross-fitted): {answered[main.name]['geoscore']:.0f} on {main.name}, "
        f"{answered[far.name]['geoscore']:.0f} on {far.name}; the distance model fitted on {fitted_on}")
    log(f"tuning took {time.perf_counter() - t0:.1f} s: images {t_sets - t0:.1f} s, grid and far weights "
        f"{t_grid - t_sets:.1f} s, candidate tables and distance models {t_cal - t_grid:.1f} s, albums "
        f"{t_albums - t_cal:.1f} s")
    return best, scores, path


def _has_split(data: Path, split: str) -> bool:
    from geovote.data import DataError, split_csv

    try:
        split_csv(data, split)
        return True
    except DataError:
        return False


def tune_far_weights(engine, best, far: TuningSet, log) -> tuple[object, dict]:
    """(params, record): best with the far pick's weights (VoteConfig.far_temperature and
    far_density_power) that give its highest GeoScore on the far images, and each setting's GeoScore
    (keyed "T=..., power=...")."""
    from retrieve.predict import far_weights, min_risk_point

    res = far.search(engine, best.k)
    k = best.k
    rows = np.maximum(res.rows, 0)[:, :k]
    spacing = np.asarray(engine.spacing())[rows]
    sim, nlat, nlon = res.similarity[:, :k], res.lat_deg[:, :k], res.lon_deg[:, :k]
    valid = np.isfinite(sim) & np.isfinite(nlat)
    xyz = latlon_to_unit(np.where(valid, nlat, 0.0), np.where(valid, nlon, 0.0))
    ok = valid.any(1)
    sim = np.where(valid, sim, -np.inf)
    no_alternatives = np.full((len(sim), 0, 2), np.nan)
    record, chosen, top = {}, best, -1.0
    for temp, power in itertools.product(FAR_TEMPERATURE, FAR_DENSITY_POWER):
        p = replace(best, far_temperature=temp, far_density_power=power)
        point, _ = min_risk_point(xyz, far_weights(sim, spacing, p), valid, None, no_alternatives)
        plat, plon = unit_to_latlon(point)
        got = score(plat[ok], plon[ok], far.lat[ok], far.lon[ok])["geoscore"]
        record[f"T={temp}, power={power}"] = got
        if got > top:
            chosen, top = p, got
    log(f"far pick: weights softmax(sim / {chosen.far_temperature}) x spacing^{chosen.far_density_power:g}, "
        f"GeoScore {top:.1f} on {far.name} (best of {len(record)} settings)")
    return chosen, {"weights": record}


# albums (retrieve.album): made of the tuning sets' capture sequences, at most this many photos each; a
# share of them get a photo of somewhere else (OUTLIER_MIN_KM away) added, so the album model learns
# to discount it; at least MIN_ALBUMS, or no album model
OUTLIER_SHARE = 0.3
OUTLIER_MIN_KM = 2500.0
MIN_ALBUMS = 20


def tuning_albums(ts: TuningSet, rng: np.random.Generator) -> tuple[list, list, np.ndarray, np.ndarray]:
    """(albums: rows of ts, each album's own photos (the album without an added outlier), each album's
    place (lat, lon): the mean of its own photos' places) from the set's sequences."""
    from geovote.geo import spherical_mean
    from retrieve.album import TUNED_PHOTOS, groups

    albums, own, lat, lon = [], [], [], []
    for rows in groups(ts.sequence) if ts.sequence is not None else []:
        if len(rows) < 2:
            continue
        if len(rows) > TUNED_PHOTOS:
            rows = np.sort(rng.choice(rows, TUNED_PHOTOS, replace=False))
        a, b = spherical_mean(ts.lat[rows], ts.lon[rows])
        own.append(rows)
        if rng.random() < OUTLIER_SHARE:
            elsewhere = np.flatnonzero(haversine_km(ts.lat, ts.lon, a, b) >= OUTLIER_MIN_KM)
            if elsewhere.size:
                rows = np.append(rows, rng.choice(elsewhere))
        albums.append(rows)
        lat.append(a)
        lon.append(b)
    return albums, own, np.array(lat), np.array(lon)


def _album_rows(atables, made, keep_album=None) -> tuple[np.ndarray, np.ndarray]:
    """(features, distance to the album's place km) of the album candidates (of the albums kept)."""
    x, d = [], []
    for i, (at, (_, _, la, lo)) in enumerate(zip(atables, made)):
        keep = at.present if keep_album is None else keep_album[i][:, None] & at.present
        x.append(at.features[keep])
        d.append(haversine_km(at.lat_deg, at.lon_deg, la[:, None], lo[:, None])[keep])
    return np.concatenate(x), np.concatenate(d)


def _photo_scores(ts: TuningSet, own: list, lat, lon) -> dict:
    """The album answers (lat, lon per album) scored against each of the album's own photos' places."""
    n = np.array([len(r) for r in own])
    idx = np.concatenate(own)
    return score(np.repeat(lat, n), np.repeat(lon, n), ts.lat[idx], ts.lon[idx])


def tune_albums(tables, crossfit: CrossFit, sets, log, folds: int = 2, seed: int = 0):
    """(retrieve.album.AlbumTuning, record): the photos' spread (SPREADS_KM) whose album answers score
    best on the tuning sets' sequences, the album model cross-fitted (albums in folds) to choose it
    and then fitted on all of them; each album answer scored against its own photos' places, beside
    the same photos answered alone (cross-fitted too)."""
    from retrieve.album import ALBUM_FEATURES, ALBUM_TREES, SPREADS_KM, AlbumTuning, album_table
    from retrieve.calibrate import decide, fit

    rng = np.random.default_rng(seed)
    made = [tuning_albums(ts, rng) for ts in sets]
    n_albums = sum(len(m[0]) for m in made)
    if n_albums < MIN_ALBUMS:
        why = (f"{n_albums} capture sequences of 2 or more photos in the tuning images (at least "
               f"{MIN_ALBUMS} needed): albums are decided on their photos' mean support, uncalibrated")
        log(why)
        return AlbumTuning(), {"fitted": False, "why": why, "spread_km": AlbumTuning().spread_km}
    counts = {ts.name: len(m[0]) for ts, m in zip(sets, made)}
    # only the sets with albums (a far set of random train rows may hold no two of one sequence)
    have = [i for i, m in enumerate(made) if m[0]]
    sets, made, tables = [sets[i] for i in have], [made[i] for i in have], [tables[i] for i in have]
    within, image_fold = [crossfit.within[i] for i in have], [crossfit.fold[i] for i in have]
    fold = [rng.integers(0, folds, len(m[0])) for m in made]
    n_photos = [sum(len(r) for r in m[1]) for m in made]
    by_spread, best = {}, None
    for spread in SPREADS_KM:
        # each photo's model: the one its own probabilities came from (cross-fitted)
        atables = [album_table(t, w, m[0], spread, crossfit.models, fo)
                   for (t, _, _), w, fo, m in zip(tables, within, image_fold, made)]
        answers = [(np.full(len(m[0]), np.nan), np.full(len(m[0]), np.nan)) for m in made]
        for f in range(folds):
            model = fit(*_album_rows(atables, made, [fo != f for fo in fold]), ALBUM_FEATURES, "cross-fit",
                        trees=ALBUM_TREES)
            for at, fo, (plat, plon) in zip(atables, fold, answers):
                sel = fo == f
                if not sel.any():
                    continue
                pred = decide(model, _split_table(at, sel), 0)
                plat[sel], plon[sel] = pred.lat_deg, pred.lon_deg
        got = [_photo_scores(ts, m[1], *a) for ts, m, a in zip(sets, made, answers)]
        mean = sum(g["geoscore"] * n for g, n in zip(got, n_photos)) / max(sum(n_photos), 1)
        by_spread[f"{spread:g}"] = {**{ts.name: round(g["geoscore"], 1) for ts, g in zip(sets, got)},
                                    "all": round(mean, 2)}
        log(f"albums, spread {spread:g} km: GeoScore " + ", ".join(
            f"{g['geoscore']:.0f} on {len(m[0])} {ts.name} albums" for g, ts, m in zip(got, sets, made))
            + " (cross-fitted)")
        if best is None or mean > best[0]:
            best = (mean, spread, atables)
    _, spread, atables = best
    alone = {}
    for ts, (t, _, _), w, m in zip(sets, tables, within, made):
        single = decide(None, t, 0, within=w)
        idx = np.concatenate(m[1])
        alone[ts.name] = round(score(single.lat_deg[idx], single.lon_deg[idx], ts.lat[idx],
                                     ts.lon[idx])["geoscore"], 1)
    names = " + ".join(ts.name for ts in sets)
    model = fit(*_album_rows(atables, made), ALBUM_FEATURES, f"albums of {names}", images=n_albums,
                trees=ALBUM_TREES)
    log(f"albums: spread {spread:g} km chosen; their photos answered alone score " + ", ".join(
        f"{v:.0f} on {k}" for k, v in alone.items()))
    record = {"fitted": True, "spread_km": spread,
              "albums": counts, "geoscore_by_spread": by_spread,
              "photos_alone": alone, "outlier_share": OUTLIER_SHARE}
    return AlbumTuning(model, spread), record
