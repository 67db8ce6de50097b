"""Score every method on a test split with OSV-5M's metrics, on the same embeddings.

    python -m benchmark.run                                   # the bundled sample (after embed.build)
    python -m benchmark.run --data data/osv5m --engine data/osv5m/geovote/vit-l-14-datacomp
    python -m benchmark.run --methods geovote 1-nn hybrid

Methods:
    geovote         our engine: kNN voting over cells + density refinement (parameters tuned on val)
    1-nn            the nearest training image's location (the OSV-5M paper's retrieval baseline)
    knn-mean        the softmax-weighted spherical mean of the k neighbours (k, T tuned on val)
    classification  the paper's head over QuadTree cells, trained here on the frozen train embeddings
    regression      the paper's regression head (a point on the sphere, great-circle loss)
    hybrid          the paper's best head: hierarchical cells + per-cell offset
    mean-location   the training set's mean location on the sphere
    top-cell        the most populated QuadTree cell's mean location
    oracle          the training location nearest the truth: the ceiling of any retrieval method here

Writes a run folder: results.json (`methods`: a list of {name, the keys of benchmark.score --json, 95%
bootstrap intervals}), results.csv, results.md, predictions/<method>.parquet (readable by
benchmark.score), accuracy_vs_distance.png and error_map.png.
"""
from __future__ import annotations

import argparse
import csv
import json
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from geovote.config import ConfigError, add_config_args, load_config, overrides_from_args
from geovote.geo import haversine_km, latlon_to_unit, spherical_mean, unit_to_latlon
from geovote.metrics import ADMIN_LEVELS, SCORE_KEYS, geoscore, score

METHODS = ("geovote", "1-nn", "knn-mean", "classification", "regression", "hybrid", "mean-location",
           "top-cell", "oracle")


@dataclass
class RunConfig:
    data: str = ""  # dataset root; "" = the bundled sample
    engine: str = ""  # the folder embed.build wrote (embeddings/ and index/); "" = <data>/geovote/default
    split: str = "test"
    methods: tuple[str, ...] = METHODS
    out: str = ""  # "" = runs/benchmark-<UTC time>
    bootstrap: int = 1000
    quadtree_max_points: int = 100  # the heads' cells (OSV-5M used 1000 on 5M images)
    head_hidden: int = 512
    head_epochs: int = 60
    head_patience: int = 6
    head_lr: float = 1e-3
    head_batch: int = 512
    seed: int = 0


# ------------------------------------------------------------------------------------------------ heads
def train_head(kind: str, tr, va, tree, cfg: RunConfig, log=print):
    """Train one of the paper's heads on frozen embeddings; keep the epoch best on validation GeoScore.
    tr, va: (emb float32, lat, lon). Returns a function emb -> (lat, lon)."""
    import torch
    from torch import nn

    from geovote.heads import CellGeometry, CellHead, RegressionHead, unit_targets

    torch.manual_seed(cfg.seed)
    emb, lat, lon = tr
    dim = emb.shape[1]
    trunk = nn.Sequential(nn.Linear(dim, cfg.head_hidden), nn.GELU())
    if kind == "regression":
        head = RegressionHead(cfg.head_hidden)
        target = unit_targets(lat, lon)

        def loss_fn(h, idx):
            return head.loss(h, target[idx])
    else:
        geometry = CellGeometry(tree)
        hybrid = kind == "hybrid"
        head = CellHead(cfg.head_hidden, geometry, hybrid=hybrid, hierarchical=hybrid)
        leaf = torch.as_tensor(geometry.leaf_of(lat, lon))
        offset = torch.as_tensor(geometry.offset_targets(leaf.numpy(), lat, lon), dtype=torch.float32)

        def loss_fn(h, idx):
            return head.loss(h, leaf[idx], offset[idx] if hybrid else None)

    model = nn.Sequential(trunk, head)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.head_lr, weight_decay=1e-4)
    x = torch.as_tensor(emb)
    xv = torch.as_tensor(va[0])

    def predict(e):
        model.eval()
        with torch.no_grad():
            out = head.predict(trunk(torch.as_tensor(e)))
        model.train()
        return out

    best, best_state, bad, epochs_run = -1.0, None, 0, 0
    gen = torch.Generator().manual_seed(cfg.seed)
    for _ in range(cfg.head_epochs):
        epochs_run += 1
        for idx in torch.randperm(len(x), generator=gen).split(cfg.head_batch):
            opt.zero_grad()
            loss_fn(trunk(x[idx]), idx).backward()
            opt.step()
        plat, plon = predict(xv)
        val = float(np.mean(geoscore(haversine_km(plat, plon, va[1], va[2]))))
        if val > best:
            best, bad = val, 0
            best_state = {k: v.clone() for k, v in model.state_dict().items()}
        else:
            bad += 1
            if bad >= cfg.head_patience:
                break
    model.load_state_dict(best_state)
    log(f"  {kind} head: validation GeoScore {best:.0f} after {epochs_run} epochs")
    return predict


# ------------------------------------------------------------------------------------------- scoring
def bootstrap_ci(values: np.ndarray, n: int, seed: int) -> list[float]:
    """95% percentile interval of the mean of `values` over `n` resamples (NaN rows left out)."""
    v = np.asarray(values, float)
    v = v[np.isfinite(v)]
    if len(v) == 0 or n <= 0:
        return [float("nan"), float("nan")]
    rng = np.random.default_rng(seed)
    means = np.array([v[rng.integers(0, len(v), len(v))].mean() for _ in range(n)])
    return [float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))]


def score_method(plat, plon, tlat, tlon, true_keys: dict, cfg: RunConfig) -> dict:
    from geovote.geocode import reverse_geocode_keys

    pred_keys = reverse_geocode_keys(np.nan_to_num(plat), np.nan_to_num(plon))
    out = score(plat, plon, tlat, tlon, true_keys, pred_keys)
    d = haversine_km(plat, plon, tlat, tlon)
    out["geoscore_ci95"] = bootstrap_ci(geoscore(d), cfg.bootstrap, cfg.seed)
    col = ADMIN_LEVELS["country"]
    if col in true_keys:
        true = np.asarray(true_keys[col], dtype=object)
        present = np.array([k is not None and k == k for k in true])
        hit = np.where(present, pred_keys[col] == true, np.nan).astype(float)
        out["acc_country_ci95"] = bootstrap_ci(hit, cfg.bootstrap, cfg.seed)
    return out


# ------------------------------------------------------------------------------------------ outputs
def write_outputs(out: Path, results: list[dict], preds: dict, ids, tlat, tlon, meta: dict) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    (out / "predictions").mkdir(parents=True, exist_ok=True)
    for name, (plat, plon) in preds.items():
        table = pa.table({"id": pa.array(list(ids), pa.string()), "latitude": plat, "longitude": plon})
        pq.write_table(table, out / "predictions" / f"{name}.parquet")
    (out / "results.json").write_text(json.dumps({**meta, "methods": results}, indent=2) + "\n")
    cols = ["name", *SCORE_KEYS, "geoscore_ci95", "acc_country_ci95"]
    with open(out / "results.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(cols)
        for r in results:
            w.writerow([json.dumps(r.get(c)) if isinstance(r.get(c), list) else r.get(c) for c in cols])
    (out / "results.md").write_text(markdown_table(results, meta) + "\n")
    plot(out, preds, tlat, tlon)


def markdown_table(results: list[dict], meta: dict) -> str:
    head = ("| method | GeoScore (95% CI) | mean km | median km | 1 km | 25 km | 200 km | 750 km | 2500 km "
            "| country (95% CI) | region | area | city |")
    lines = [f"{meta['split']} split of {meta['data']}: {meta['n']:,} images; engine {meta['engine']}", "",
             head, "|" + "---|" * 13]

    def pct(v):
        return "" if v is None or v != v else f"{100 * v:.1f}"

    for r in results:
        g, c = r["geoscore_ci95"], r.get("acc_country_ci95", [float("nan")] * 2)
        lines.append(
            f"| {r['name']} | {r['geoscore']:.0f} ({g[0]:.0f}-{g[1]:.0f}) | {r['mean_km']:,.0f} | "
            f"{r['median_km']:,.0f} | " + " | ".join(pct(r[f"acc_{k}km"]) for k in (1, 25, 200, 750, 2500))
            + f" | {pct(r['acc_country'])} ({pct(c[0])}-{pct(c[1])}) | {pct(r['acc_region'])} | "
            f"{pct(r['acc_area'])} | {pct(r['acc_city'])} |")
    return "\n".join(lines)


def plot(out: Path, preds: dict, tlat, tlon) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    radii = np.logspace(0, np.log10(20_000), 200)
    fig, ax = plt.subplots(figsize=(8, 5))
    for name, (plat, plon) in preds.items():
        d = haversine_km(plat, plon, tlat, tlon)
        ax.plot(radii, [(d < r).mean() for r in radii], label=name, lw=2 if name == "geovote" else 1)
    ax.set_xscale("log")
    ax.set_xlabel("distance to the truth (km)")
    ax.set_ylabel("share of images within")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "accuracy_vs_distance.png", dpi=110)
    plt.close(fig)
    if "geovote" in preds:
        from geovote.sample import blue_marble

        plat, plon = preds["geovote"]
        d = haversine_km(plat, plon, tlat, tlon)
        fig, ax = plt.subplots(figsize=(10, 5.2))
        ax.imshow(blue_marble(), extent=(-180, 180, -90, 90), alpha=0.6)
        sc = ax.scatter(tlon, tlat, c=np.log10(np.maximum(d, 1)), s=6, cmap="plasma", vmin=0, vmax=4.3)
        fig.colorbar(sc, ax=ax, label="log10 error (km)", fraction=0.025)
        ax.set_title("geovote: error at each test image's true location")
        ax.set_xlim(-180, 180)
        ax.set_ylim(-90, 90)
        fig.tight_layout()
        fig.savefig(out / "error_map.png", dpi=110)
        plt.close(fig)


# --------------------------------------------------------------------------------------------- run
def run(cfg: RunConfig, log=print) -> tuple[Path, list[dict]]:
    from scipy.spatial import cKDTree

    from geovote.cells import QuadTree
    from geovote.data import csv_columns, read_split, split_csv
    from geovote.sample import ensure_sample
    from geovote.shards import iter_shards
    from retrieve.engine import Engine, PARAMS_FILE
    from retrieve.predict import one_nn, weighted_mean
    from retrieve.tune import embed_for_eval, tune_and_save

    unknown = [m for m in cfg.methods if m not in METHODS]
    if unknown:
        raise ConfigError(f"unknown methods {unknown}; known: {', '.join(METHODS)}")
    if cfg.split == "val":
        raise ConfigError("val chooses the parameters; score on another split")
    root = Path(cfg.data) if cfg.data else ensure_sample()
    engine_dir = Path(cfg.engine) if cfg.engine else root / "geovote" / "default"
    engine = Engine(engine_dir / "index")
    if not (engine.index_dir / PARAMS_FILE).exists():
        log("no tuned parameters with the index: tuning on val first")
        tune_and_save(engine, root, "val", log=log)
        engine = Engine(engine_dir / "index")
    tuned = json.loads((engine.index_dir / PARAMS_FILE).read_text())
    t0 = time.perf_counter()
    train = list(iter_shards(engine_dir / "embeddings" / "train"))
    tr = (np.concatenate([s.embedding for s in train]).astype(np.float32),
          np.concatenate([s.lat_deg for s in train]), np.concatenate([s.lon_deg for s in train]))
    va = embed_for_eval(engine, root, "val")[1:]
    va = (va[2], va[0], va[1])
    test_ids, _, _, test_emb = embed_for_eval(engine, root, cfg.split)
    key_cols = [c for c in ADMIN_LEVELS.values() if c in csv_columns(split_csv(root, cfg.split))]
    truth = read_split(root, cfg.split, columns=key_cols, check_images=False)
    pos = {i: j for j, i in enumerate(truth.ids.astype(str))}
    rows = np.array([pos[i] for i in test_ids.astype(str)])
    if len(rows) < len(truth):
        log(f"{len(truth) - len(rows)} {cfg.split} images could not be embedded (see failures.csv); "
            "they are left out of every method's score")
    tlat, tlon = truth.lat_deg[rows], truth.lon_deg[rows]
    true_keys = {c: truth.column(c)[rows] for c in key_cols}
    log(f"{len(test_ids):,} {cfg.split} images, {len(tr[0]):,} training embeddings "
        f"({time.perf_counter() - t0:.1f} s to load)")

    preds: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    tree = QuadTree.build(tr[1], tr[2], cfg.quadtree_max_points)
    for name in cfg.methods:
        t = time.perf_counter()
        if name == "geovote":
            pred, _ = engine.locate(test_emb)
            preds[name] = (pred.lat_deg, pred.lon_deg)
        elif name == "1-nn":
            res = engine.search(test_emb, 1)
            preds[name] = one_nn(res.similarity, res.lat_deg, res.lon_deg)
        elif name == "knn-mean":
            wm = tuned.get("validation", {}).get("weighted mean", {})
            k, temp = wm.get("k", 20), wm.get("temperature", 0.05)
            res = engine.search(test_emb, k)
            preds[name] = weighted_mean(res.similarity, res.lat_deg, res.lon_deg, temp)
        elif name in ("classification", "regression", "hybrid"):
            predict = train_head(name, tr, va, tree, cfg, log)
            preds[name] = predict(test_emb)
        elif name == "mean-location":
            mlat, mlon = spherical_mean(tr[1], tr[2])
            preds[name] = (np.full(len(tlat), mlat), np.full(len(tlat), mlon))
        elif name == "top-cell":
            top = tree.leaves[np.argmax(tree.count[tree.leaves])]
            preds[name] = (np.full(len(tlat), tree.lat_mean[top]), np.full(len(tlat), tree.lon_mean[top]))
        elif name == "oracle":
            _, nearest = cKDTree(latlon_to_unit(tr[1], tr[2])).query(latlon_to_unit(tlat, tlon))
            preds[name] = unit_to_latlon(latlon_to_unit(tr[1][nearest], tr[2][nearest]))
        log(f"  {name}: predicted in {time.perf_counter() - t:.1f} s")
    results = []
    for name, (plat, plon) in preds.items():
        results.append({"name": name, **score_method(plat, plon, tlat, tlon, true_keys, cfg)})
    out = Path(cfg.out) if cfg.out else Path("runs") / time.strftime("benchmark-%Y%m%d-%H%M%S", time.gmtime())
    meta = {"data": str(root), "split": cfg.split, "n": int(len(tlat)), "engine": str(engine_dir),
            "backbone": engine.index.backbone, "retrieve_params": tuned.get("params"), "config": asdict(cfg)}
    write_outputs(out, results, preds, test_ids, tlat, tlon, meta)
    log(markdown_table(results, meta))
    return out, results


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmark.run", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data")
    ap.add_argument("--engine", help="folder written by embed.build (embeddings/ and index/)")
    ap.add_argument("--split")
    ap.add_argument("--methods", nargs="+")
    ap.add_argument("--out")
    add_config_args(ap)
    args = ap.parse_args(argv)
    overrides = overrides_from_args(args, ("data", "engine", "split", "out", "methods"))
    from embed.models import BackboneError
    from geovote.data import DataError
    from geovote.shards import ShardError
    from index.store import IndexError_

    try:
        cfg = load_config(RunConfig, args.config, overrides)
        out, _ = run(cfg)
    except (ConfigError, DataError, BackboneError, ShardError, IndexError_) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"run folder: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
