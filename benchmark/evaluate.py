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
    split: str = "test"
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


def run(cfg: RunConfig, log=print) -> tuple[Path, list[dict]]:
    from benchmark.report import (calibration_report, markdown_table, plot_calibration, score_method,
                                  write_outputs)
    from geovote.bundled_sample import ensure_sample
    from geovote.data import csv_columns, read_split, split_csv
    from geovote.layout import EngineLayout
    from geovote.metrics import ADMIN_LEVELS
    from retrieve.engine import Engine
    from retrieve.tuning import embed_for_eval, tune_and_save

    unknown = [m for m in cfg.methods if m not in METHODS]
    if unknown:
        raise ConfigError(f"unknown methods {unknown}; known: {', '.join(METHODS)}")
    if cfg.split == "val":
        raise ConfigError("val chooses the parameters; score on another split")
    root = Path(cfg.data) if cfg.data else ensure_sample()
    layout = EngineLayout(Path(cfg.engine)) if cfg.engine else EngineLayout.for_dataset(root)
    engine = Engine(layout.require_index())
    if not engine.tuned:
        log("no tuned parameters with the index: tuning on val first")
        tune_and_save(engine, root, "val", log=log)
        engine = Engine(layout.index, backbone=engine.backbone)
    tuned = json.loads(layout.params.read_text())
    t0 = time.perf_counter()
    # the train rows' locations from the index (row-aligned with the train shards); their embeddings are
    # streamed by the methods that need them, never loaded whole (5.1M x 768 float32 is 15.7 GB)
    train_lat, train_lon = np.array(engine.index.lat), np.array(engine.index.lon)
    test_ids, _, _, test_emb = embed_for_eval(engine, root, cfg.split, log=log)
    key_cols = [c for c in ADMIN_LEVELS.values() if c in csv_columns(split_csv(root, cfg.split))]
    truth = read_split(root, cfg.split, columns=key_cols, check_images=False)
    pos = {i: j for j, i in enumerate(truth.ids.astype(str))}
    rows = [pos[i] for i in test_ids.astype(str)]
    if len(rows) < len(truth):
        log(f"{len(truth) - len(rows)} {cfg.split} images could not be embedded (see failures.csv); "
            "they are left out of every method's score")
    tlat, tlon = truth.lat_deg[rows], truth.lon_deg[rows]
    true_keys = {c: truth.column(c)[rows] for c in key_cols}
    log(f"{len(test_ids):,} {cfg.split} images, {len(train_lat):,} training images "
        f"({time.perf_counter() - t0:.1f} s to load)")

    country = true_keys.get(ADMIN_LEVELS["country"])
    inp = Inputs(engine, layout.embeddings("train"), train_lat, train_lon, test_emb, tlat, tlon, country,
                 tuned, cfg.head_config(), lambda: load_validation(engine, root, cfg.seed, log), log)
    preds = {}
    for name in cfg.methods:
        t = time.perf_counter()
        try:
            preds[name] = METHODS[name](inp)
        except MethodUnavailable as e:
            log(f"  {name}: left out: {e}")
            continue
        log(f"  {name}: predicted in {time.perf_counter() - t:.1f} s")
    results = [{"name": name, **score_method(plat, plon, tlat, tlon, true_keys, cfg.bootstrap, cfg.seed)}
               for name, (plat, plon) in preds.items()]
    out = Path(cfg.out) if cfg.out else Path("runs") / time.strftime("benchmark-%Y%m%d-%H%M%S", time.gmtime())
    # what chose each method's settings: the voting's tuning split, and the heads' early-stopping split
    validation = {"voting": (tuned.get("validation") or {}).get("split"),
                  "heads": inp._val.name if inp._val is not None else None}
    meta = {"data": str(root), "split": cfg.split, "validation": validation, "n": int(len(tlat)),
            "engine": str(layout.root),
            "backbone": engine.index.backbone, "retrieve_params": tuned.get("params"), "config": asdict(cfg)}
    if "geovote" in inp.extras:
        meta["calibration"] = calibration_report(inp.extras["geovote"], *preds["geovote"], tlat, tlon)
    write_outputs(out, results, preds, test_ids, tlat, tlon, meta, inp.extras)
    if "geovote" in inp.extras:
        plot_calibration(out, inp.extras["geovote"], *preds["geovote"], tlat, tlon, cfg.split)
    log(markdown_table(results, meta))
    return out, results


def load_validation(engine, root: Path, seed: int = 0, log=print) -> Validation:
    """The heads' validation: the val split when the dataset has one, else a slice held out of train
    (geovote.holdout: those rows, their sequences and everything within 1 km are never trained on)."""
    from geovote.data import DataError, split_csv
    from geovote.holdout import HOLDOUT_NAME, holdout
    from geovote.shards import read_embeddings
    from retrieve.tuning import embed_for_eval, index_sequences

    try:
        split_csv(root, "val")
    except DataError:
        lat, lon = np.asarray(engine.index.lat), np.asarray(engine.index.lon)
        h = holdout(lat, lon, index_sequences(engine, root), seed=seed)
        held = read_embeddings(engine.layout.embeddings("train"), h.rows)
        log(f"no val split: the heads validate on {len(h.rows):,} train images held out "
            f"({int(h.excluded.sum()):,} rows left out of their training)")
        return Validation(held.embedding, held.lat_deg, held.lon_deg, HOLDOUT_NAME, h.excluded)
    _, lat, lon, emb = embed_for_eval(engine, root, "val", log=log)
    return Validation(emb, lat, lon, "val")
