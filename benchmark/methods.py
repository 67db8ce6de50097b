"""Every method benchmark.run scores, as a registry: name -> function from the same embeddings to
predictions. A new method is one decorated function.

    @method("my-method")
    def my_method(inp: Inputs) -> tuple[np.ndarray, np.ndarray]:   # (lat_deg, lon_deg) of each test image
        ...

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
"""
from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from typing import Callable

import numpy as np

from geovote.geo import latlon_to_unit, spherical_mean, unit_to_latlon
from geovote.metrics import mean_geoscore

Prediction = tuple[np.ndarray, np.ndarray]
METHODS: dict[str, Callable[["Inputs"], Prediction]] = {}


def method(name: str):
    def register(fn):
        METHODS[name] = fn
        return fn
    return register


@dataclass
class HeadConfig:
    quadtree_max_points: int = 100  # the heads' cells (OSV-5M used 1000 on 5M images)
    hidden: int = 512
    epochs: int = 60
    patience: int = 6
    lr: float = 1e-3
    batch: int = 512
    seed: int = 0


@dataclass
class Inputs:
    """What every method sees: the engine, train embeddings, the test split's embeddings and truth.
    Validation embeddings are loaded only when a method asks for them (the heads' early stopping)."""

    engine: object  # retrieve.engine.Engine
    train_emb: np.ndarray  # (N, dim) float32
    train_lat: np.ndarray
    train_lon: np.ndarray
    test_emb: np.ndarray  # (Q, dim) float32
    test_lat: np.ndarray  # truth: only `oracle` may look
    test_lon: np.ndarray
    tuned: dict  # retrieve.json
    heads: HeadConfig
    load_val: Callable[[], tuple[np.ndarray, np.ndarray, np.ndarray]]  # -> (emb, lat, lon)
    log: Callable = print
    _val: tuple | None = field(default=None, repr=False)

    @property
    def val(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        if self._val is None:
            self._val = self.load_val()
        return self._val

    @cached_property
    def tree(self):
        from geovote.cells import QuadTree

        return QuadTree.build(self.train_lat, self.train_lon, self.heads.quadtree_max_points)


# ------------------------------------------------------------------------------------------ retrieval
@method("geovote")
def geovote(inp: Inputs) -> Prediction:
    pred, _ = inp.engine.locate(inp.test_emb, alternatives=False)
    return pred.lat_deg, pred.lon_deg


@method("1-nn")
def one_nearest(inp: Inputs) -> Prediction:
    from retrieve.predict import one_nn

    res = inp.engine.search(inp.test_emb, 1)
    return one_nn(res.similarity, res.lat_deg, res.lon_deg)


@method("knn-mean")
def knn_mean(inp: Inputs) -> Prediction:
    from retrieve.predict import VoteConfig, weighted_mean

    default = VoteConfig()
    wm = inp.tuned.get("validation", {}).get("weighted mean", {})
    k, temp = wm.get("k", default.k), wm.get("temperature", default.temperature)
    res = inp.engine.search(inp.test_emb, k)
    return weighted_mean(res.similarity, res.lat_deg, res.lon_deg, temp)


# ------------------------------------------------------------------------------------------------ heads
def train_head(kind: str, inp: Inputs):
    """Train one of the paper's heads on frozen embeddings; keep the epoch best on validation GeoScore.
    Returns a function emb -> (lat, lon)."""
    import torch
    from torch import nn

    from finetune.heads import CellGeometry, CellHead, RegressionHead, unit_targets

    cfg = inp.heads
    torch.manual_seed(cfg.seed)
    emb, lat, lon = inp.train_emb, inp.train_lat, inp.train_lon
    trunk = nn.Sequential(nn.Linear(emb.shape[1], cfg.hidden), nn.GELU())
    if kind == "regression":
        head = RegressionHead(cfg.hidden)
        target = unit_targets(lat, lon)

        def loss_fn(h, idx):
            return head.loss(h, target[idx])
    else:
        geometry = CellGeometry(inp.tree)
        hybrid = kind == "hybrid"
        head = CellHead(cfg.hidden, geometry, hybrid=hybrid, hierarchical=hybrid)
        leaf = torch.as_tensor(geometry.leaf_of(lat, lon))
        offset = torch.as_tensor(geometry.offset_targets(leaf.numpy(), lat, lon), dtype=torch.float32)

        def loss_fn(h, idx):
            return head.loss(h, leaf[idx], offset[idx] if hybrid else None)

    model = nn.Sequential(trunk, head)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=1e-4)
    x = torch.as_tensor(emb)
    va_emb, va_lat, va_lon = inp.val
    xv = torch.as_tensor(va_emb)

    def predict(e):
        model.eval()
        with torch.no_grad():
            out = head.predict(trunk(torch.as_tensor(e)))
        model.train()
        return out

    best, best_state, bad, epochs_run = -1.0, None, 0, 0
    gen = torch.Generator().manual_seed(cfg.seed)
    for _ in range(cfg.epochs):
        epochs_run += 1
        for idx in torch.randperm(len(x), generator=gen).split(cfg.batch):
            opt.zero_grad()
            loss_fn(trunk(x[idx]), idx).backward()
            opt.step()
        val = mean_geoscore(*predict(xv), va_lat, va_lon)
        if val > best:
            best, bad = val, 0
            best_state = {k: v.clone() for k, v in model.state_dict().items()}
        else:
            bad += 1
            if bad >= cfg.patience:
                break
    model.load_state_dict(best_state)
    inp.log(f"  {kind} head: validation GeoScore {best:.0f} after {epochs_run} epochs")
    return predict


@method("classification")
def classification(inp: Inputs) -> Prediction:
    return train_head("classification", inp)(inp.test_emb)


@method("regression")
def regression(inp: Inputs) -> Prediction:
    return train_head("regression", inp)(inp.test_emb)


@method("hybrid")
def hybrid(inp: Inputs) -> Prediction:
    return train_head("hybrid", inp)(inp.test_emb)


# ------------------------------------------------------------------------------------------ constants
@method("mean-location")
def mean_location(inp: Inputs) -> Prediction:
    mlat, mlon = spherical_mean(inp.train_lat, inp.train_lon)
    return np.full(len(inp.test_emb), mlat), np.full(len(inp.test_emb), mlon)


@method("top-cell")
def top_cell(inp: Inputs) -> Prediction:
    tree = inp.tree
    top = tree.leaves[np.argmax(tree.count[tree.leaves])]
    return np.full(len(inp.test_emb), tree.lat_mean[top]), np.full(len(inp.test_emb), tree.lon_mean[top])


# --------------------------------------------------------------------------------------------- ceiling
@method("oracle")
def oracle(inp: Inputs) -> Prediction:
    from scipy.spatial import cKDTree

    _, nearest = cKDTree(latlon_to_unit(inp.train_lat, inp.train_lon)).query(
        latlon_to_unit(inp.test_lat, inp.test_lon))
    return unit_to_latlon(latlon_to_unit(inp.train_lat[nearest], inp.train_lon[nearest]))
