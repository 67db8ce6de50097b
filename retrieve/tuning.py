"""Choose the voting parameters (k, T, cells and levels, bandwidth) on the validation split, never on test,
and store them with the index (retrieve.json). `python -m retrieve.tune` is its command; embed.build runs
it after indexing (retrieve.pipeline).

The validation images are embedded once (resumable) beside the index. One search at the largest k serves
every setting; the grid is small enough to be exhaustive. 1-NN and the weighted mean are scored too.

A dataset without val.csv (OSV-5M) is tuned on training images held out of their own search: 2,000
random train rows query the index, and every neighbour that is the query itself, lies within 1 km of it
(OSV-5M keeps train and test 1 km apart) or shares its capture `sequence` (when the CSV has one) is
removed before voting.

The answers' calibration (retrieve.calibrate) is fitted on the same images, and also on the split's far
counterpart when the dataset has one (`val_far` for `val`: views of places far from every training
place, as the bundled sample has): without far places to learn from, a calibration has only ever seen
photos of covered places, and its probabilities stay high where the engine is lost.
"""
from __future__ import annotations

import itertools
import json
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

from geovote.geo import haversine_km, latlon_to_unit, unit_to_latlon
from geovote.metrics import distance_metrics
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


HEDGE_BELOW = (0.2, 0.4, 0.6)  # tried with the best setting: the minimum-risk answer below this share
# with far places to tune on: the far pick's weights (chosen on the far places alone), then the P(far)
# above which it answers (on the tuning images and the far ones together)
FAR_TEMPERATURE = (0.01, 0.03, 0.1)
FAR_DENSITY_POWER = (0.0, 1.0, 2.0, 3.0, 4.0)
FAR_ABOVE = (0.3, 0.5, 0.7, 0.9)
MIN_TUNE_QUERIES = 20  # fewer, and the choice among 700 settings is noise
CARVE_QUERIES = 2000
CARVE_EXCLUDE_KM = 1.0
CARVE_EXTRA = 50  # neighbours searched beyond k, to survive the exclusions


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


def split_sequences(data: Path, ids) -> np.ndarray | None:
    """The capture `sequence` of each of the train images `ids` ("" where unknown), from the train CSV
    joined on id; None when the CSV has no such column. Arrays throughout: 5.1M rows in seconds."""
    import pyarrow as pa
    import pyarrow.compute as pc

    from geovote.data import DataError, csv_columns, read_split, split_csv

    try:
        if "sequence" not in csv_columns(split_csv(data, "train")):
            return None
    except DataError:  # a gallery of photos has no train.csv
        return None
    t = read_split(data, "train", columns=("sequence",), check_images=False)
    pos = pc.index_in(pa.array(np.asarray(ids), pa.string()), value_set=t.table.column("id").combine_chunks())
    seq = t.table.column("sequence").combine_chunks().take(pos)
    return np.asarray(pc.fill_null(pc.cast(seq, pa.string()), "").to_numpy(zero_copy_only=False), dtype=str)


def carve_from_train(engine, data: Path, n: int = CARVE_QUERIES, seed: int = 0):
    """(ids, emb, lat, lon, exclude): n train rows as queries, and the function that removes their own
    neighbourhood (itself, < 1 km, same sequence) from a SearchResult."""
    from geovote.shards import read_embeddings, shard_sizes

    folder = engine.layout.embeddings("train")
    total = sum(shard_sizes(folder)[0])
    rows = np.sort(np.random.default_rng(seed).choice(total, min(n, total), replace=False))
    picked = read_embeddings(folder, rows)  # only the queries: never the whole train split in memory
    q_ids, q_lat, q_lon = picked.ids.astype(str), picked.lat_deg, picked.lon_deg
    # one join for the neighbours (by index row) and the queries (by id: they are shard rows)
    index_ids = np.char.decode(np.asarray(engine.index.ids), "utf-8")
    seq = split_sequences(data, np.concatenate([index_ids, q_ids]))
    if seq is not None:
        seq, q_seq = seq[:len(index_ids)], seq[len(index_ids):, None]

    def exclude(res):
        own = (res.ids == q_ids[:, None]) | (haversine_km(res.lat_deg, res.lon_deg, q_lat[:, None],
                                                           q_lon[:, None]) < CARVE_EXCLUDE_KM)
        if seq is not None:
            own |= (seq[np.maximum(res.rows, 0)] == q_seq) & (q_seq != "") & (res.rows >= 0)
        order = np.argsort(own, axis=1, kind="stable")  # kept neighbours first, in rank order
        keep = ~np.take_along_axis(own, order, 1)
        pick = lambda a, fill: np.where(keep, np.take_along_axis(a, order, 1), fill)  # noqa: E731
        return replace(res, similarity=pick(res.similarity, -np.inf).astype(np.float32),
                       rows=pick(res.rows, -1), ids=pick(res.ids, ""), lat_deg=pick(res.lat_deg, np.nan),
                       lon_deg=pick(res.lon_deg, np.nan))

    return q_ids, picked.embedding, q_lat, q_lon, exclude


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
    # the decisions tuned after the grid start off: not inherited from an earlier tuning's retrieve.json
    default = VoteConfig()
    start = replace(engine.params, hedge_below=0.0, far_above=1.0, far_temperature=default.far_temperature,
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
    # the minimum-risk answer for hard photos, kept only where it raises the tuning GeoScore
    table = np.asarray(engine.cells(best))[np.maximum(res.rows, 0)]
    for hedge in HEDGE_BELOW:
        p = replace(best, hedge_below=hedge)
        pred = vote(res.similarity, res.lat_deg, res.lon_deg, table, p)
        s = score(pred.lat_deg, pred.lon_deg, true_lat, true_lon)
        trials.append((p, s))
        if s["geoscore"] > best_score["geoscore"]:
            best, best_score = p, s
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


def _tune_and_save(engine, data: Path, split: str, workers: int, log):
    from geovote.data import split_csv
    from retrieve.engine import save_params

    exclude = None
    has_split = _has_split(data, split)
    if not has_split and split != "val":
        split_csv(data, split)  # the error that names it
    if has_split:
        _, lat, lon, emb = embed_for_eval(engine, data, split, workers, log)
    else:
        _, emb, lat, lon, exclude = carve_from_train(engine, data)
        log(f"{data} has no val split: tuning on {len(emb):,} train images held out of their own search")
        split = "train (held out of its own search)"
    best, scores, trials = tune(engine, emb, lat, lon, log=log, exclude=exclude)
    far = f"{split}_far"
    far_grid = None
    if has_split and _has_split(data, far):  # the far pick's weights first: its candidates are calibrated too
        _, far_lat, far_lon, far_emb = embed_for_eval(engine, data, far, workers, log)
        best, far_grid = tune_far_weights(engine, best, far_emb, far_lat, far_lon, log)
    # one search and vote of each split serve the fit, the far pick's threshold and the scores
    fitted, fitted_on = [(_vote_on(engine, best, emb, exclude), lat, lon)], split
    if far_grid is not None:
        fitted.append((_vote_on(engine, best, far_emb, None), far_lat, far_lon))
        fitted_on = f"{split} + {far}"
        log(f"calibration: fitted on {split} and {far} ({len(far_emb):,} views of far places)")
    cal = fit_calibration(fitted, fitted_on)
    if far_grid is not None:
        best, far_grid["above"] = tune_far_above(best, cal, fitted, log)
        far_voted, far_lat, far_lon = fitted[1]
        scores[f"calibrated {far}"] = calibrated_scores(far_voted, cal, far_lat, far_lon, best.far_above)
    voted = fitted[0][0]
    scores["calibrated"] = calibrated_scores(voted, cal, lat, lon, best.far_above)
    cal.save(engine.layout.calibration)  # first: an engine counts as tuned once retrieve.json is there
    path = save_params(engine.index_dir, best, {"validation": {"split": split, "data": str(data),
                                                               "images": len(emb), **scores},
                                                "grid": json.loads(json.dumps(GRID)), "trials": len(trials),
                                                **({"far_pick": far_grid} if far_grid else {})})
    return best, scores, path


def _has_split(data: Path, split: str) -> bool:
    from geovote.data import DataError, split_csv

    try:
        split_csv(data, split)
        return True
    except DataError:
        return False


def _vote_on(engine, params, emb, exclude):
    from retrieve.predict import vote

    if exclude is None:
        res = engine.search(emb, params.k)
    else:  # the neighbours tune() saw: the same search, the same exclusions
        res = exclude(engine.search(emb, max(params.k, *GRID["k"]) + CARVE_EXTRA))
    rows = np.maximum(res.rows, 0)[:, :params.k]
    return vote(res.similarity[:, :params.k], res.lat_deg[:, :params.k], res.lon_deg[:, :params.k],
                np.asarray(engine.cells(params))[rows], params, np.asarray(engine.spacing())[rows],
                far_pick=True)


def fit_calibration(voted: list, fitted_on: str):
    """The answers' calibration (retrieve.calibrate), fitted on the tuning images' votes (the chosen
    settings' Predictions, each with its images' true lat and lon: [(Prediction, lat, lon), ...]); a
    second one, when given, is of the far places."""
    from retrieve.calibrate import fit, training_rows
    from retrieve.predict import FEATURES

    parts = [training_rows(pred, lat, lon) for pred, lat, lon in voted]
    is_far = np.concatenate([np.full(len(d), i > 0) for i, (_, d) in enumerate(parts)])
    return fit(np.concatenate([x for x, _ in parts]), np.concatenate([d for _, d in parts]), FEATURES,
               fitted_on, is_far)


def tune_far_weights(engine, best, emb, lat, lon, log) -> tuple[object, dict]:
    """(params, record): best with the far pick's weights (VoteConfig.far_temperature and
    far_density_power) that give its highest GeoScore on the far places `emb` (val_far), and each
    setting's GeoScore (keyed "T=..., power=...")."""
    from retrieve.predict import far_weights, min_risk_point

    res = engine.search(emb, best.k)
    rows = np.maximum(res.rows, 0)
    spacing = np.asarray(engine.spacing())[rows]
    valid = np.isfinite(res.similarity) & np.isfinite(res.lat_deg)
    xyz = latlon_to_unit(np.where(valid, res.lat_deg, 0.0), np.where(valid, res.lon_deg, 0.0))
    ok = valid.any(1)
    sim = np.where(valid, res.similarity, -np.inf)
    no_alternatives = np.full((len(emb), 0, 2), np.nan)
    record, chosen, top = {}, best, -1.0
    for temp, power in itertools.product(FAR_TEMPERATURE, FAR_DENSITY_POWER):
        p = replace(best, far_temperature=temp, far_density_power=power)
        point, _ = min_risk_point(xyz, far_weights(sim, spacing, p), valid, None, no_alternatives)
        plat, plon = unit_to_latlon(point)
        got = score(plat[ok], plon[ok], lat[ok], lon[ok])["geoscore"]
        record[f"T={temp}, power={power}"] = got
        if got > top:
            chosen, top = p, got
    log(f"far pick: weights softmax(sim / {chosen.far_temperature}) x spacing^{chosen.far_density_power:g}, "
        f"GeoScore {top:.1f} on the far places (best of {len(record)} settings)")
    return chosen, {"weights": record}


def tune_far_above(best, cal, voted: list, log) -> tuple[object, dict]:
    """(params, record): best with the threshold of the far pick (VoteConfig.far_above) that gives the
    highest calibrated GeoScore over the tuning images and the far ones together, as they come
    (`voted`: [(Prediction with its far picks, lat, lon), ...]: the threshold only decides which answers,
    so one vote serves every threshold); best unchanged (far_above 1: never) where none raises it."""
    from retrieve.calibrate import apply

    true_lat = np.concatenate([la for _, la, _ in voted])
    true_lon = np.concatenate([lo for _, _, lo in voted])

    def geoscores(params) -> list:
        """[both together, then each group of `voted`]"""
        preds = [apply(cal, v, params.far_above) for v, _, _ in voted]
        lat, lon = np.concatenate([p.lat_deg for p in preds]), np.concatenate([p.lon_deg for p in preds])
        ok = np.isfinite(lat)  # as tune() does: an image whose search found nothing has no answer
        out = [score(lat[ok], lon[ok], true_lat[ok], true_lon[ok])["geoscore"]]
        for p, (_, la, lo) in zip(preds, voted):
            ok = np.isfinite(p.lat_deg)
            out.append(score(p.lat_deg[ok], p.lon_deg[ok], la[ok], lo[ok])["geoscore"])
        return out

    # each threshold's GeoScore over both, and over each (the trade-off, for a user who expects fewer or
    # more far photos than the tuning has)
    record = {"without": geoscores(best)}
    chosen, top = best, record["without"][0]
    for above in FAR_ABOVE:
        p = replace(best, far_above=above)
        record[f"above {above}"] = got = geoscores(p)
        if got[0] > top:
            chosen, top = p, got[0]
    log(f"far pick: {'never' if chosen.far_above >= 1 else f'where P(far) > {chosen.far_above}'}; GeoScore "
        f"over both {top:.1f} (without: {record['without'][0]:.1f})")
    return chosen, record


def calibrated_scores(voted, cal, lat, lon, far_above: float = 1.0) -> dict:
    """The tuning images' metrics with the calibrated decision (the most probable candidate answers, or
    the far pick where it answers)."""
    from retrieve.calibrate import apply

    pred = apply(cal, voted, far_above)
    ok = np.isfinite(pred.lat_deg)  # as tune() does: a held-out query may have lost every neighbour
    return score(pred.lat_deg[ok], pred.lon_deg[ok], lat[ok], lon[ok])
