"""A benchmark run: every method of benchmark.methods on a split, from the same embeddings, scored with
OSV-5M's metrics (benchmark.report). `python -m benchmark.run` is its command."""
from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from benchmark.methods import METHODS, HeadConfig, Inputs, MethodUnavailable, Validation
from geovote.config import ConfigError


@dataclass
class RunConfig:
    data: str = ""  # dataset root; "" = the bundled sample
    engine: str = ""  # the folder embed.build wrote (embeddings/ and index/); "" = <data>/geovote/default
    split: str = ""  # "test,test_far"; "": test, and test_far where the dataset has one
    methods: tuple[str, ...] = tuple(METHODS)
    out: str = ""  # "" = runs/benchmark-<UTC time>
    bootstrap: int = 1000
    quadtree_max_points: int = HeadConfig.quadtree_max_points  # the heads' cells
    head_hidden: int = HeadConfig.hidden
    head_epochs: int = HeadConfig.epochs
    head_patience: int = HeadConfig.patience
    head_lr: float = HeadConfig.lr
    head_batch: int = HeadConfig.batch
    head_minutes: float = HeadConfig.minutes
    head_validate_every_rows: int = HeadConfig.validate_every_rows
    seed: int = 0

    def head_config(self) -> HeadConfig:
        return HeadConfig(self.quadtree_max_points, self.head_hidden, self.head_epochs, self.head_patience,
                          self.head_lr, self.head_batch, self.head_minutes, self.head_validate_every_rows,
                          self.seed)


def splits_to_score(cfg: RunConfig, root: Path) -> list[str]:
    """cfg.split as a list: "test,test_far", or "" for test plus test_far where the dataset has it."""
    from geovote.data import DataError, split_csv

    if cfg.split:
        names = [s.strip() for s in cfg.split.split(",") if s.strip()]
    else:
        names = ["test"]
        try:
            split_csv(root, "test_far")
            names.append("test_far")
        except DataError:
            pass
    if "val" in names:
        raise ConfigError("val chooses the parameters; score on another split")
    if len(set(names)) != len(names) or not names:
        raise ConfigError(f"split: name each split once, got {cfg.split!r}")
    return names


@dataclass
class Scored:
    """One split's images among the concatenated queries every method answers at once."""

    name: str
    rows: slice
    ids: np.ndarray
    lat: np.ndarray
    lon: np.ndarray
    keys: dict
    sequence: np.ndarray  # each image's capture sequence, "" for none


def run(cfg: RunConfig, log=print) -> tuple[Path, dict[str, list[dict]]]:
    """Every method on every split of `cfg.split`, answered at once (the heads train once) and scored
    split by split: the run folder holds one split's files, or one sub-folder per split."""
    from benchmark.report import (calibration_report, markdown_table, plot_calibration, score_method,
                                  write_outputs)
    from geovote.bundled_sample import ensure_sample
    from geovote.data import csv_columns, read_split, split_csv
    from geovote.layout import EngineLayout
    from geovote.metrics import ADMIN_LEVELS
    from geovote.shards import read_coordinates
    from retrieve.engine import Engine
    from retrieve.embedded import embed_for_eval
    from retrieve.tuning import tune_and_save

    unknown = [m for m in cfg.methods if m not in METHODS]
    if unknown:
        raise ConfigError(f"unknown methods {unknown}; known: {', '.join(METHODS)}")
    root = Path(cfg.data) if cfg.data else ensure_sample()
    names = splits_to_score(cfg, root)
    layout = EngineLayout(Path(cfg.engine)) if cfg.engine else EngineLayout.for_dataset(root)
    engine = Engine(layout.require_index())
    if not engine.tuned:
        log("no tuned parameters with the index: tuning on val first")
        tune_and_save(engine, root, "val", log=log)
        engine = Engine(layout.index, backbone=engine.backbone)
    tuned = json.loads(layout.params.read_text())
    t0 = time.perf_counter()
    # the train rows' locations in shard order (the index numbers its rows its own way): their embeddings
    # are streamed from the shards by the methods that need them, never loaded whole (5.1M x 768 float32
    # is 15.7 GB)
    train = read_coordinates(layout.embeddings("train"))
    train_lat, train_lon = train.lat_deg, train.lon_deg
    scored, embs, start = [], [], 0
    key_cols = list(ADMIN_LEVELS.values())
    for name in names:
        ids, _, _, emb = embed_for_eval(engine, root, name, log=log)
        have = csv_columns(split_csv(root, name))
        cols = [c for c in key_cols if c in have]
        truth = read_split(root, name, columns=cols + (["sequence"] if "sequence" in have else []),
                           check_images=False)
        pos = {i: j for j, i in enumerate(truth.ids.astype(str))}
        rows = [pos[i] for i in ids.astype(str)]
        if len(rows) < len(truth):
            log(f"{len(truth) - len(rows)} {name} images could not be embedded (see failures.csv); "
                "they are left out of every method's score")
        # sequences named per split: two splits' sequences never merge
        seq = (np.array([f"{name}/{v}" if v else "" for v in truth.text_column("sequence")[rows]])
               if "sequence" in have else np.full(len(rows), ""))
        scored.append(Scored(name, slice(start, start + len(ids)), ids, truth.lat_deg[rows],
                             truth.lon_deg[rows], {c: truth.column(c)[rows] for c in cols}, seq))
        embs.append(emb)
        start += len(ids)
    log(f"{', '.join(f'{len(s.ids):,} {s.name}' for s in scored)} images, {len(train_lat):,} training images "
        f"({time.perf_counter() - t0:.1f} s to load)")

    country_col = ADMIN_LEVELS["country"]
    country = (np.concatenate([s.keys[country_col] for s in scored])
               if all(country_col in s.keys for s in scored) else None)
    inp = Inputs(engine, layout.embeddings("train"), train_lat, train_lon, np.concatenate(embs),
                 np.concatenate([s.lat for s in scored]), np.concatenate([s.lon for s in scored]), country,
                 tuned, cfg.head_config(), lambda: load_validation(engine, root, cfg.seed, log), log,
                 test_sequence=np.concatenate([s.sequence for s in scored]))
    preds = {}
    for name in cfg.methods:
        t = time.perf_counter()
        try:
            preds[name] = METHODS[name](inp)
        except MethodUnavailable as e:
            log(f"  {name}: left out: {e}")
            continue
        log(f"  {name}: predicted in {time.perf_counter() - t:.1f} s")
    out = Path(cfg.out) if cfg.out else Path("runs") / time.strftime("benchmark-%Y%m%d-%H%M%S", time.gmtime())
    # what chose each method's settings: the voting's tuning split, and the heads' early-stopping split
    validation = {"voting": (tuned.get("validation") or {}).get("split"),
                  "heads": inp._val.name if inp._val is not None else None}
    all_results = {}
    for s in scored:
        mine = {m: (lat[s.rows], lon[s.rows]) for m, (lat, lon) in preds.items()}
        extras = {m: {k: v[s.rows] for k, v in e.items()} for m, e in inp.extras.items()}
        results = [{"name": m, **score_method(plat, plon, s.lat, s.lon, s.keys, cfg.bootstrap, cfg.seed)}
                   for m, (plat, plon) in mine.items()]
        folder = out if len(scored) == 1 else out / s.name
        meta = {"data": str(root), "split": s.name, "validation": validation, "n": int(len(s.lat)),
                "engine": str(layout.root), "backbone": engine.index.backbone,
                "retrieve_params": tuned.get("params"), "config": asdict(cfg)}
        if "geovote" in extras:
            meta["calibration"] = calibration_report(extras["geovote"], *mine["geovote"], s.lat, s.lon)
        if "geovote-sequence" in extras:  # the same report for the answers of sequences
            meta["calibration_sequence"] = calibration_report(extras["geovote-sequence"],
                                                              *mine["geovote-sequence"], s.lat, s.lon)
        write_outputs(folder, results, mine, s.ids, s.lat, s.lon, meta, extras)
        if "geovote" in extras:
            plot_calibration(folder, extras["geovote"], *mine["geovote"], s.lat, s.lon, s.name)
        log(markdown_table(results, meta))
        all_results[s.name] = results
    return out, all_results


def load_validation(engine, root: Path, seed: int = 0, log=print) -> Validation:
    """The heads' validation: the val split when the dataset has one, else a slice held out of train
    (geovote.holdout: those rows, their sequences and everything within 1 km are never trained on)."""
    from geovote.data import DataError, split_csv
    from geovote.holdout import HOLDOUT_NAME, holdout
    from geovote.shards import read_coordinates, read_embeddings
    from retrieve.embedded import embed_for_eval
    from retrieve.tuning import split_sequences

    try:
        split_csv(root, "val")
    except DataError:
        train = read_coordinates(engine.layout.embeddings("train"))  # shard order, as read_embeddings
        h = holdout(train.lat_deg, train.lon_deg, split_sequences(root, train.ids), seed=seed)
        held = read_embeddings(engine.layout.embeddings("train"), h.rows)
        log(f"no val split: the heads validate on {len(h.rows):,} train images held out "
            f"({int(h.excluded.sum()):,} rows left out of their training)")
        return Validation(held.embedding, held.lat_deg, held.lon_deg, HOLDOUT_NAME, h.excluded)
    _, lat, lon, emb = embed_for_eval(engine, root, "val", log=log)
    return Validation(emb, lat, lon, "val")
