"""A benchmark run: every method of benchmark.methods on a split, from the same embeddings, scored with
OSV-5M's metrics (benchmark.report). `python -m benchmark.run` is its command."""
from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from benchmark.methods import METHODS, HeadConfig, Inputs
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
    seed: int = 0

    def head_config(self) -> HeadConfig:
        return HeadConfig(self.quadtree_max_points, self.head_hidden, self.head_epochs, self.head_patience,
                          self.head_lr, self.head_batch, self.seed)


def run(cfg: RunConfig, log=print) -> tuple[Path, list[dict]]:
    from benchmark.report import markdown_table, score_method, write_outputs
    from geovote.bundled_sample import ensure_sample
    from geovote.data import csv_columns, read_split, split_csv
    from geovote.layout import EngineLayout
    from geovote.metrics import ADMIN_LEVELS
    from geovote.shards import read_embeddings
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
    train = read_embeddings(layout.embeddings("train"))
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
    log(f"{len(test_ids):,} {cfg.split} images, {len(train):,} training embeddings "
        f"({time.perf_counter() - t0:.1f} s to load)")

    def load_val():
        _, lat, lon, emb = embed_for_eval(engine, root, "val", log=log)
        return emb, lat, lon

    inp = Inputs(engine, train.embedding, train.lat_deg, train.lon_deg, test_emb, tlat, tlon, tuned,
                 cfg.head_config(), load_val, log)
    preds = {}
    for name in cfg.methods:
        t = time.perf_counter()
        preds[name] = METHODS[name](inp)
        log(f"  {name}: predicted in {time.perf_counter() - t:.1f} s")
    results = [{"name": name, **score_method(plat, plon, tlat, tlon, true_keys, cfg.bootstrap, cfg.seed)}
               for name, (plat, plon) in preds.items()]
    out = Path(cfg.out) if cfg.out else Path("runs") / time.strftime("benchmark-%Y%m%d-%H%M%S", time.gmtime())
    meta = {"data": str(root), "split": cfg.split, "n": int(len(tlat)), "engine": str(layout.root),
            "backbone": engine.index.backbone, "retrieve_params": tuned.get("params"), "config": asdict(cfg)}
    write_outputs(out, results, preds, test_ids, tlat, tlon, meta)
    log(markdown_table(results, meta))
    return out, results
