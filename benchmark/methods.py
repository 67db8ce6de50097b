"""Every method benchmark.run scores, as a registry: name -> function from the same embeddings to
predictions. A new method is one decorated function.

    @method("my-method")
    def my_method(inp: Inputs) -> tuple[np.ndarray, np.ndarray]:   # (lat_deg, lon_deg) of each test image
        ...

Methods:
    geovote         our engine: kNN voting over cells + density refinement (parameters tuned on val)
    1-nn            the nearest training image's location (the OSV-5M paper's retrieval baseline)
    knn-mean        the softmax-weighted spherical mean of the k neighbours (k, T tuned on val)
    geovote-within  our engine told each image's true country (`retrieve.query --within CC`): what a user
                    who knows the country gets; images of a country without training images answer freely
    geovote-sequence  our engine locating each image together with the other images of its capture
                    sequence (`retrieve.query --together`, retrieve.album); images in none answer alone
    classification  the paper's head over QuadTree cells, trained here on the frozen train embeddings
    regression      the paper's regression head (a point on the sphere, great-circle loss)
    hybrid          the paper's best head: hierarchical cells + per-cell offset
    osv5m-baseline  the paper's released model's own hybrid head (osv5m/baseline, embed.osv5m), on the
                    engine's embeddings of its tower: only for an engine built with that model
    mean-location   the training set's mean location on the sphere
    top-cell        the most populated QuadTree cell's mean location
    best-candidate  the candidate of the engine's table nearest the truth: the ceiling of its decision
    best-of-k       the nearest of the engine's k neighbours to the truth: the ceiling of a choice among them
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


class MethodUnavailable(Exception):
    """A method that cannot run on this dataset (benchmark.run leaves it out and says why)."""


def method(name: str):
    def register(fn):
        METHODS[name] = fn
        return fn
    return register


@dataclass
class HeadConfig:
    quadtree_max_points: int = 0  # the heads' cells; 0: N / 5,000, at least 100 (OSV-5M: 1000 at 5M)
    hidden: int = 512
    epochs: int = 60
    patience: int = 6  # validations without improvement before stopping
    lr: float = 1e-3
    batch: int = 512
    minutes: float = 3.0  # each head's training budget (wall clock): 5.1M rows do not fit 60 epochs on a CPU
    validate_every_rows: int = 500_000  # validate after this many training rows, and after every epoch
    seed: int = 0

    def max_points(self, n_train: int) -> int:
        return self.quadtree_max_points or max(100, round(n_train / 5000))


@dataclass
class Validation:
    """What the heads validate on: val, or a slice held out of train (`excluded` rows never trained on)."""

    emb: np.ndarray  # (V, dim) float32
    lat: np.ndarray
    lon: np.ndarray
    name: str
    excluded: np.ndarray | None = None  # (N,) bool over the train rows, None when val is its own split


@dataclass
class Inputs:
    """What every method sees: the engine, the train rows' locations and embedding shards (streamed, never
    all in memory), the test split's embeddings and truth. Validation is loaded when a method asks."""

    engine: object  # retrieve.engine.Engine
    train_shards: object  # Path: the train embedding shards (an IVF index numbers its rows its own way)
    train_lat: np.ndarray  # (N,) in shard order
    train_lon: np.ndarray
    test_emb: np.ndarray  # (Q, dim) float32
    test_lat: np.ndarray  # truth: only `oracle` may look
    test_lon: np.ndarray
    test_country: np.ndarray | None  # the truth's unique_country: only `geovote-within` may look
    tuned: dict  # retrieve.json
    heads: HeadConfig
    load_val: Callable[[], Validation]
    log: Callable = print
    _val: Validation | None = field(default=None, repr=False)
    test_sequence: np.ndarray | None = None  # each image's capture sequence ("" none): for geovote-sequence
    extras: dict = field(default_factory=dict)  # what a method reports besides its answers
    answered: dict = field(default_factory=dict)  # method -> its answers, for a method built on another

    @property
    def val(self) -> Validation:
        if self._val is None:
            self._val = self.load_val()
        return self._val

    @cached_property
    def tree(self):
        from geovote.cells import QuadTree

        return QuadTree.build(self.train_lat, self.train_lon, self.heads.max_points(len(self.train_lat)))


QUERY_BATCH = 8192  # test queries per search: 210k at once would hold every shortlist in memory


def batched(fn, emb: np.ndarray, size: int = QUERY_BATCH) -> Prediction:
    """fn(emb) -> (lat, lon), applied to `size` rows at a time."""
    parts = [fn(emb[i:i + size]) for i in range(0, len(emb), size)] or [(np.zeros(0), np.zeros(0))]
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


# ------------------------------------------------------------------------------------------ retrieval
@method("geovote")
def geovote(inp: Inputs) -> Prediction:
    parts = []

    def answer(emb):
        pred, _ = inp.engine.locate(emb, alternatives=False)
        parts.append(pred)
        return pred.lat_deg, pred.lon_deg

    lat, lon = batched(answer, inp.test_emb)
    inp.answered["geovote"] = (lat, lon)
    if parts and parts[0].within_km is not None:  # a calibrated engine: benchmark.report scores it
        inp.extras["geovote"] = {"within_km": np.concatenate([p.within_km for p in parts]),
                                 "radius_km": np.concatenate([p.radius_km for p in parts]),
                                 "confidence": np.concatenate([p.confidence for p in parts])}
        inp.extras["geovote"]["kind"] = np.concatenate([p.answer_kind for p in parts])
    return lat, lon


@method("geovote-within")
def geovote_within(inp: Inputs) -> Prediction:
    from retrieve.region import Region, RegionError

    from dataclasses import replace

    if inp.test_country is None:
        raise MethodUnavailable("the split has no unique_country column to take the true country from")
    # the free answers (geovote's, when it ran), kept where a country has no training image
    free = inp.answered.get("geovote") or geovote(replace(inp, extras={}, answered={}))
    lat, lon = free[0].copy(), free[1].copy()
    countries = np.asarray(inp.test_country).astype(str)
    for cc in np.unique(countries):
        rows = np.flatnonzero(countries == cc)
        try:
            region = Region((cc,))
            inp.engine.region_rows(region)
        except RegionError:
            continue

        def answer(emb, region=region):
            pred, _ = inp.engine.locate(emb, alternatives=False, region=region)
            return pred.lat_deg, pred.lon_deg

        lat[rows], lon[rows] = batched(answer, inp.test_emb[rows])
    return lat, lon


@method("geovote-sequence")
def geovote_sequence(inp: Inputs) -> Prediction:
    from dataclasses import replace

    from retrieve.album import groups

    albums = [] if inp.test_sequence is None else [g for g in groups(inp.test_sequence) if len(g) > 1]
    if not albums:
        raise MethodUnavailable("no capture sequences of 2 or more images (a `sequence` column) to score")
    alone = replace(inp, extras={}, answered={})  # each image alone first: those in no sequence keep it
    lat, lon = (a.copy() for a in geovote(alone))
    extras = {k: v.copy() for k, v in alone.extras.get("geovote", {}).items() if k != "kind"}
    start = 0
    while start < len(albums):  # about QUERY_BATCH images at a time
        stop, n = start, 0
        while stop < len(albums) and (stop == start or n + len(albums[stop]) <= QUERY_BATCH):
            n += len(albums[stop])
            stop += 1
        batch = albums[start:stop]
        rows = np.concatenate(batch)
        local = np.split(np.arange(len(rows)), np.cumsum([len(a) for a in batch])[:-1])
        got, _ = inp.engine.locate_albums(inp.test_emb[rows], local)
        joint, sizes = got.joint, [len(a) for a in batch]
        lat[rows], lon[rows] = np.repeat(joint.lat_deg, sizes), np.repeat(joint.lon_deg, sizes)
        if extras and not got.calibrated.all():  # answers the album model was not fitted for: no report
            inp.log("  geovote-sequence: some sequences are beyond what the album model was fitted on (or it "
                    "is absent): their probabilities are not reported")
            extras = {}
        if extras:
            extras["within_km"][rows] = np.repeat(joint.within_km, sizes, axis=0)
            extras["radius_km"][rows] = np.repeat(joint.radius_km, sizes)
            extras["confidence"][rows] = np.repeat(joint.confidence, sizes)
        start = stop
    if extras:
        inp.extras["geovote-sequence"] = extras
    return lat, lon


@method("1-nn")
def one_nearest(inp: Inputs) -> Prediction:
    from retrieve.predict import one_nn

    def answer(emb):
        res = inp.engine.search(emb, 1)
        return one_nn(res.similarity, res.lat_deg, res.lon_deg)

    return batched(answer, inp.test_emb)


@method("knn-mean")
def knn_mean(inp: Inputs) -> Prediction:
    from retrieve.predict import VoteConfig, weighted_mean

    default = VoteConfig()
    wm = inp.tuned.get("validation", {}).get("weighted mean", {})
    k, temp = wm.get("k", default.k), wm.get("temperature", default.temperature)
    def answer(emb):
        res = inp.engine.search(emb, k)
        return weighted_mean(res.similarity, res.lat_deg, res.lon_deg, temp)

    return batched(answer, inp.test_emb)


# ------------------------------------------------------------------------------------------------ heads
def train_batches(folder, keep: np.ndarray, batch: int, rng: np.random.Generator, buffer_shards: int = 4):
    """One epoch of (rows, float32 embeddings) batches from the train shards: shards in random order, read
    `buffer_shards` at a time and shuffled together, rows outside `keep` dropped. Memory: the buffer."""
    from geovote.shards import read_shard, shard_paths, shard_sizes

    paths = shard_paths(folder)
    sizes, _ = shard_sizes(folder)
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    order = rng.permutation(len(paths))
    for g in range(0, len(order), buffer_shards):
        rows, embs = [], []
        for s in order[g:g + buffer_shards]:
            r = starts[s] + np.arange(sizes[s])
            mine = keep[r]
            if mine.any():
                rows.append(r[mine])
                embs.append(read_shard(paths[s]).embedding[mine])
        if not rows:
            continue
        rows, embs = np.concatenate(rows), np.concatenate(embs)
        perm = rng.permutation(len(rows))
        for i in range(0, len(perm), batch):
            pick = perm[i:i + batch]
            yield rows[pick], embs[pick].astype(np.float32)


def train_head(kind: str, inp: Inputs):
    """Train one of the paper's heads on frozen embeddings streamed from the shards, within the budget
    (epochs and minutes), on the GPU when torch sees one; keep the state best on validation GeoScore.
    Returns a function emb -> (lat, lon)."""
    import time

    import torch
    from torch import nn

    from finetune.heads import CellGeometry, CellHead, RegressionHead, unit_targets
    from geovote.distributed import pick_device

    cfg = inp.heads
    device = pick_device()
    torch.manual_seed(cfg.seed)
    lat, lon = inp.train_lat, inp.train_lon
    val = inp.val
    keep = np.ones(len(lat), bool) if val.excluded is None else ~val.excluded
    trunk = nn.Sequential(nn.Linear(val.emb.shape[1], cfg.hidden), nn.GELU())
    if kind == "regression":
        head = RegressionHead(cfg.hidden)
        target = unit_targets(lat, lon)

        def loss_fn(h, rows):
            return head.loss(h, target[rows].to(device))
    else:
        geometry = CellGeometry(inp.tree)
        hybrid = kind == "hybrid"
        head = CellHead(cfg.hidden, geometry, hybrid=hybrid, hierarchical=hybrid)
        leaf = torch.as_tensor(geometry.leaf_of(lat, lon))
        offset = torch.as_tensor(geometry.offset_targets(leaf.numpy(), lat, lon), dtype=torch.float32)

        def loss_fn(h, rows):
            return head.loss(h, leaf[rows].to(device), offset[rows].to(device) if hybrid else None)

    model = nn.Sequential(trunk, head).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=1e-4)

    def predict(e):
        model.eval()
        out = []
        with torch.no_grad():
            for i in range(0, len(e), QUERY_BATCH):  # a (batch x cells) logit matrix, not (Q x cells)
                out.append(head.predict(trunk(torch.as_tensor(e[i:i + QUERY_BATCH]).to(device))))
        model.train()
        return np.concatenate([o[0] for o in out]), np.concatenate([o[1] for o in out])

    state = {"best": -1.0, "weights": None, "bad": 0, "validations": 0}

    def validate() -> bool:
        """Score on validation, keep the best weights; False when patience has run out."""
        score = mean_geoscore(*predict(val.emb), val.lat, val.lon)
        state["validations"] += 1
        if score > state["best"]:
            weights = {k: v.detach().clone() for k, v in model.state_dict().items()}
            state.update(best=score, bad=0, weights=weights)
        else:
            state["bad"] += 1
        return state["bad"] < cfg.patience

    t0 = time.perf_counter()
    rng = np.random.default_rng(cfg.seed)
    rows_seen, since_val, epochs_run, steps, going = 0, 0, 0, 0, True
    budget_s = cfg.minutes * 60
    while going and epochs_run < cfg.epochs:
        for rows, x in train_batches(inp.train_shards, keep, cfg.batch, rng):
            opt.zero_grad()
            loss_fn(trunk(torch.as_tensor(x).to(device)), torch.as_tensor(rows)).backward()
            opt.step()
            steps += 1
            rows_seen += len(rows)
            since_val += len(rows)
            if time.perf_counter() - t0 > budget_s:
                going = False
                break
            if since_val >= cfg.validate_every_rows:
                since_val = 0
                if not (going := validate()):
                    break
        else:
            epochs_run += 1
            if since_val:  # not when the epoch's last batch was just validated
                since_val = 0
                going = validate()
    if since_val:  # rows trained since the last validation count too
        validate()
    if state["weights"] is not None:  # None only if every validation score was NaN: keep the last
        model.load_state_dict(state["weights"])
    why = ("budget of {:g} min".format(cfg.minutes) if time.perf_counter() - t0 > budget_s else
           "patience" if state["bad"] >= cfg.patience else f"{cfg.epochs} epochs")
    inp.log(f"  {kind} head: validation GeoScore {state['best']:.0f} on {val.name}; {rows_seen:,} rows in "
            f"{steps:,} steps ({epochs_run} full epochs, {time.perf_counter() - t0:.0f} s on {device}, "
            f"stopped by {why})")
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


@method("osv5m-baseline")
def osv5m_baseline(inp: Inputs) -> Prediction:
    """The released network's head answers from the engine's test embeddings (its standardised class
    tokens), so the tower runs once, while embedding."""
    net = getattr(inp.engine.backbone, "model", None)
    if not hasattr(net, "head_latlon"):
        raise MethodUnavailable("the engine's model is not the OSV-5M paper's network: build one with "
                                "`embed.build --model osv5m-baseline` (or its hub repo or folder)")
    return batched(net.head_latlon, inp.test_emb)


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
def _nearest_to_truth(lat: np.ndarray, lon: np.ndarray, true_lat, true_lon) -> Prediction:
    """Of each row's points (Q, P; NaN where none), the one nearest the truth: the ceilings below."""
    from geovote.geo import haversine_km

    d = haversine_km(lat, lon, np.asarray(true_lat)[:, None], np.asarray(true_lon)[:, None])
    best = np.argmin(np.where(np.isfinite(d), d, np.inf), axis=1)[:, None]
    return np.take_along_axis(lat, best, 1)[:, 0], np.take_along_axis(lon, best, 1)[:, 0]


@method("best-candidate")
def best_candidate(inp: Inputs) -> Prediction:
    """Looks at the truth: the ceiling of geovote's decision (how much a better choice could gain)."""
    def answer(rows):
        table, _ = inp.engine.candidates(inp.test_emb[rows])
        return _nearest_to_truth(table.lat_deg, table.lon_deg, inp.test_lat[rows], inp.test_lon[rows])

    return batched(answer, np.arange(len(inp.test_emb)))


@method("best-of-k")
def best_of_k(inp: Inputs) -> Prediction:
    """Looks at the truth: the nearest of the k neighbours the engine votes with (k tuned)."""
    def answer(rows):
        res = inp.engine.search(inp.test_emb[rows], inp.engine.params.k)
        return _nearest_to_truth(res.lat_deg, res.lon_deg, inp.test_lat[rows], inp.test_lon[rows])

    return batched(answer, np.arange(len(inp.test_emb)))


@method("oracle")
def oracle(inp: Inputs) -> Prediction:
    from scipy.spatial import cKDTree

    _, nearest = cKDTree(latlon_to_unit(inp.train_lat, inp.train_lon)).query(
        latlon_to_unit(inp.test_lat, inp.test_lon))
    return unit_to_latlon(latlon_to_unit(inp.train_lat[nearest], inp.train_lon[nearest]))
