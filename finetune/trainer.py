"""Training an open_clip image tower for geolocation, in named steps (`python -m finetune.train` runs it).

    train(cfg) = load_data -> build_model -> make_optimizer -> resume -> (train_epoch -> validate ->
                 save_best, save_last) per epoch

Objectives, combined with weights (0 turns one off):
    hybrid     the OSV-5M paper's head: hierarchical QuadTree cross-entropy + L2 on the cell offset
    region     supervised contrastive loss, positives share `unique_region` (the paper's, T = 0.1)
    retrieval  supervised contrastive loss, positives share the fine QuadTree cell: shapes the embedding
               for kNN directly; in-batch negatives
After each epoch: the GeoScore of the voting predictor (retrieve.predict) on the validation split with
neighbours from train, its settings tuned there as embed.build tunes the engine; the best epoch is kept
as a checkpoint folder that `embed.build --model` loads. Every epoch reseeds its shuffle and
augmentations from (seed, epoch), so a run resumed from `last.pt` continues exactly as an uninterrupted
one (with workers = 0; persistent decoding workers keep their own random streams across epochs).
Under torchrun each rank trains on its share of every epoch (DDP).
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from geovote.config import ConfigError

FROM_SCRATCH = ""
SAVE_DTYPES = ("float32", "float16", "bfloat16")  # an integer dtype would round every weight away


@dataclass
class TrainConfig:
    data: str = ""  # dataset root in OSV-5M layout; "" = the bundled sample
    base: str = FROM_SCRATCH  # a backbone name (embed.models) to fine-tune; "" = `arch` from scratch
    arch: str = ('{"embed_dim": 128, "vision_cfg": {"image_size": 64, "patch_size": 8, "width": 192, '
                 '"layers": 6, "head_width": 64, "mlp_ratio": 4.0}}')  # JSON; used when base is ""
    name: str = "geovote-model"
    train: str = "all"  # all | last:N (the last N blocks and the projection) | frozen (heads only)
    hybrid_weight: float = 1.0
    region_weight: float = 0.0
    retrieval_weight: float = 1.0
    contrastive_temperature: float = 0.1
    quadtree_max_points: int = 100  # QuadTree leaves of at most this many training images
    quadtree_max_depth: int = 10
    epochs: int = 10
    batch_size: int = 256
    lr: float = 1e-3  # heads, and a tower trained from scratch
    backbone_lr: float = 2e-5  # a pretrained tower (the paper's)
    weight_decay: float = 1e-4
    warmup_steps: int = 100
    crop_scale_min: float = 0.6
    color_jitter: float = 0.2
    hflip: bool = False  # street views carry text and drive sides: no flips by default
    rotate_deg: float = 0.0  # random rotation up to +-this (reflect-padded first: no empty corners)
    zoom: float = 0.0  # with rotate_deg: random scale in [1 / (1 + zoom), 1 + zoom]
    views: int = 1  # augmented views of each image per batch; >1 makes each image its own positive
    workers: int = 1
    grad_checkpointing: bool = True  # on CUDA
    max_minutes: float = 0.0  # stop at the first epoch end past this budget (0: no limit); rank 0's clock
    max_steps: int = 0  # stop after this many optimiser steps (0: no limit), beside the epoch limit
    val_grid: str = "full"  # validation tunes the voting as embed.build will: full (retrieve.tuning.GRID,
    #                          ~13 s on 2,000 images on 2 cores) or small (SMALL_GRID, ~1 s)
    val_train_images: int = 20000  # validation's gallery: a fixed sample of train (embedding all 5M each
    #                                epoch would take longer than the epoch); val is used whole
    dist_timeout_min: float = 120.0  # under torchrun: how long a collective may wait for a slow rank
    save_dtype: str = "float32"  # of the saved tower: float32, float16 or bfloat16
    seed: int = 0
    out: str = "runs/finetune"

    def __post_init__(self):
        n = self.train.split(":", 1)[1] if self.train.startswith("last:") else ""
        if self.train not in ("all", "frozen") and not (n.isdigit() and int(n) >= 1):
            raise ConfigError(f"train: expected all, frozen or last:N, got {self.train!r}")
        for name in ("batch_size", "views", "quadtree_max_points", "quadtree_max_depth"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1, got {getattr(self, name)}")
        if min(self.epochs, self.workers, self.warmup_steps, self.max_minutes, self.max_steps) < 0:
            raise ConfigError("epochs, workers, warmup_steps, max_minutes and max_steps must be >= 0")
        if self.val_train_images < 1 or self.dist_timeout_min <= 0:
            raise ConfigError("val_train_images must be >= 1 and dist_timeout_min > 0")
        if min(self.lr, self.backbone_lr, self.contrastive_temperature) <= 0:
            raise ConfigError("lr, backbone_lr and contrastive_temperature must be positive")
        if self.base == FROM_SCRATCH:
            try:
                arch = json.loads(self.arch)
            except json.JSONDecodeError as e:
                raise ConfigError(f"arch: not JSON ({e}); e.g. {TrainConfig.arch}") from None
            named, custom = {"open_clip"}, {"embed_dim", "vision_cfg"}
            if not isinstance(arch, dict) or not (named <= set(arch) or custom <= set(arch)):
                raise ConfigError('arch: expected {"open_clip": NAME} or {"embed_dim": D, "vision_cfg": '
                                  f"{{...}}}}, got {self.arch}")
        if self.val_grid not in ("full", "small"):
            raise ConfigError(f"val_grid must be full or small, got {self.val_grid!r}")
        if self.save_dtype not in SAVE_DTYPES:
            raise ConfigError(f"save_dtype must be one of {', '.join(SAVE_DTYPES)}, got {self.save_dtype!r}")


# ---------------------------------------------------------------------------------------------- data
class ImageDataset:
    """(image tensor, row, reason) triples; every row's targets live in arrays indexed by row. With
    views > 1 the tensor is (views, 3, H, W): independent augmentations of one image. Images are read as
    embed reads them (embed.images.open_rgb: every mode to RGB, large JPEGs decoded small); one that
    cannot be read is a zero tensor with the reason, and the epoch skips it."""

    def __init__(self, paths: list[Path], transform, views: int = 1, min_side_px: int = 64):
        self.paths, self.transform, self.views = paths, transform, views
        self.min_side_px = min_side_px

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        import torch

        from embed.images import open_rgb

        from embed.images import ImageFailure

        try:
            img = open_rgb(self.paths[i], self.min_side_px)
        except ImageFailure as e:
            shape = (3, self.min_side_px, self.min_side_px) if self.views == 1 else \
                (self.views, 3, self.min_side_px, self.min_side_px)
            return torch.zeros(shape), i, str(e)
        if self.views == 1:
            return self.transform(img), i, ""
        return torch.stack([self.transform(img) for _ in range(self.views)]), i, ""


def train_transform(cfg: TrainConfig, backbone):
    from torchvision import transforms as T

    size = backbone.image_size
    ops = []
    if cfg.rotate_deg > 0:
        zoom = (1 / (1 + cfg.zoom), 1 + cfg.zoom) if cfg.zoom > 0 else None
        ops += [T.Pad(size // 2, padding_mode="reflect"),
                T.RandomAffine(cfg.rotate_deg, scale=zoom, interpolation=T.InterpolationMode.BILINEAR),
                T.CenterCrop(size)]
    ops.append(T.RandomResizedCrop(size, scale=(cfg.crop_scale_min, 1.0), ratio=(0.9, 1.1),
                                   interpolation=T.InterpolationMode.BICUBIC))
    if cfg.hflip:
        ops.append(T.RandomHorizontalFlip())
    if cfg.color_jitter > 0:
        j = cfg.color_jitter
        ops.append(T.ColorJitter(j, j, j, j / 10))
    ops += [T.ToTensor(), T.Normalize(backbone.mean, backbone.std)]
    return T.Compose(ops)


@dataclass
class Data:
    root: Path
    train: object  # geovote.data.Split
    val: object
    tree: object  # geovote.cells.QuadTree over the training locations
    leaf: np.ndarray  # (N,) QuadTree leaf of each training row
    offset: np.ndarray  # (N, 2) normalised offset of each row within its leaf (hybrid target)
    region: np.ndarray  # (N,) region label of each row (zeros when the region objective is off)


def load_data(cfg: TrainConfig, rank: int = 0, log=print) -> Data:
    """The splits (rejected rows written beside the run's outputs, by rank 0 only), the QuadTree and
    each training row's targets."""
    from finetune.heads import CellGeometry
    from geovote.bundled_sample import ensure_sample
    from geovote.cells import QuadTree
    from geovote.data import DataError, Split, csv_columns, read_split, split_csv
    from geovote.holdout import HOLDOUT_NAME, holdout

    root = Path(cfg.data) if cfg.data else ensure_sample()
    extra = ("unique_region",) if cfg.region_weight > 0 else ()
    out = Path(cfg.out) if rank == 0 else None
    try:
        split_csv(root, "val")
        has_val = True
    except DataError:
        has_val = False
    if not has_val:
        extra = (*extra, "sequence") if "sequence" in csv_columns(split_csv(root, "train")) else extra
    train_split = read_split(root, "train", columns=extra,
                             rejects_path=out / "rejects-train.csv" if out else None).require_rows()
    if has_val:
        val_split = read_split(root, "val",
                               rejects_path=out / "rejects-val.csv" if out else None).require_rows()
    else:  # OSV-5M has no val: validate on train rows held out of training (geovote.holdout)
        seq = train_split.column("sequence") if "sequence" in extra else None
        h = holdout(train_split.lat_deg, train_split.lon_deg, seq, seed=cfg.seed)
        val_split = Split(root, HOLDOUT_NAME, train_split.table.take(h.rows), train_split.report)
        train_split = Split(root, "train", train_split.table.take(h.train_rows), train_split.report)
        if rank == 0:
            log(f"{root} has no val split: validating on {len(h.rows):,} train images held out "
                f"({int(h.excluded.sum()):,} rows left out of training)")
    lat, lon = train_split.lat_deg, train_split.lon_deg
    tree = QuadTree.build(lat, lon, cfg.quadtree_max_points, cfg.quadtree_max_depth)
    geometry = CellGeometry(tree)
    leaf = geometry.leaf_of(lat, lon)
    region = (np.unique(train_split.column("unique_region").astype(str), return_inverse=True)[1]
              if cfg.region_weight > 0 else np.zeros(len(train_split), np.int64))
    return Data(root, train_split, val_split, tree, leaf, geometry.offset_targets(leaf, lat, lon), region)


# ----------------------------------------------------------------------------------------------- model
@dataclass
class Model:
    backbone: object  # embed.models.Backbone (its .model is the tower being trained)
    arch: dict  # what save_checkpoint records to rebuild the tower
    head: object  # finetune.heads.CellHead
    module: object  # tower + head in one nn.Module (what DDP wraps)
    tower_lr: float


def geo_model(visual, head):
    """Tower + cell head in one module, so that DDP sees every parameter in one forward."""
    import torch

    class GeoModel(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.visual, self.head = visual, head

        def forward(self, x):
            feat = self.visual(x).float()
            logits, offsets = self.head(feat)
            return feat, logits, offsets

    return GeoModel()


def build_model(cfg: TrainConfig, data: Data, device: str) -> Model:
    from embed.models import build_tower, load_backbone, wrap_tower
    from finetune.heads import CellGeometry, CellHead

    if cfg.base == FROM_SCRATCH:
        import open_clip

        arch = json.loads(cfg.arch)
        backbone = wrap_tower(cfg.name, build_tower(arch), open_clip.OPENAI_DATASET_MEAN,
                              open_clip.OPENAI_DATASET_STD, {"arch": arch})
        tower_lr = cfg.lr
    else:
        backbone = load_backbone(cfg.base)
        src = backbone.source
        if "manifest" in src:
            arch = src["manifest"]["arch"]
        elif "arch" in src:  # an alias, ARCH:TAG or ARCH:file: rebuilt later as open_clip built it
            arch = {"open_clip": src["arch"], "quick_gelu": bool(src.get("quick_gelu", False))}
        else:
            raise ConfigError(f"base={cfg.base!r}: fine-tuning starts from an alias, ARCH:TAG, "
                              "ARCH:/path/weights or a geovote checkpoint folder")
        tower_lr = cfg.backbone_lr
    visual = backbone.model.to(device)
    if device.startswith("cuda") and cfg.grad_checkpointing and hasattr(visual, "set_grad_checkpointing"):
        visual.set_grad_checkpointing(True)
    head = CellHead(backbone.dim, CellGeometry(data.tree), hybrid=True).to(device)
    return Model(backbone, arch, head, geo_model(visual, head), tower_lr)


def trainable_parameters(visual, mode: str) -> list:
    """Freeze the tower per `mode` and return the parameters that train."""
    for p in visual.parameters():
        p.requires_grad_(mode == "all")
    if mode == "all":
        return list(visual.parameters())
    if mode == "frozen":
        return []
    if not mode.startswith("last:"):
        raise ConfigError(f"train: expected all, frozen or last:N, got {mode!r}")
    n = int(mode.split(":", 1)[1])
    blocks = None
    for attr in ("transformer.resblocks", "trunk.blocks", "trunk.stages"):
        obj = visual
        try:
            for part in attr.split("."):
                obj = getattr(obj, part)
            blocks = list(obj)
            break
        except AttributeError:
            continue
    if blocks is None:
        raise ConfigError("train=last:N: this tower has no block list I know")
    modules = blocks[-n:] + [m for name, m in visual.named_children()
                             if name in ("ln_post", "proj", "head", "attn_pool")]
    params = [p for m in modules for p in m.parameters()]
    proj = getattr(visual, "proj", None)
    if proj is not None and not hasattr(proj, "parameters"):  # a bare nn.Parameter (open_clip ViT)
        params.append(proj)
    for p in params:
        p.requires_grad_(True)
    return params


def make_optimizer(cfg: TrainConfig, model: Model, total_steps: int):
    """AdamW (tower and head at their own learning rates), linear warm-up then cosine decay."""
    import torch

    groups = [{"params": trainable_parameters(model.backbone.model, cfg.train), "lr": model.tower_lr},
              {"params": list(model.head.parameters()), "lr": cfg.lr}]
    opt = torch.optim.AdamW([g for g in groups if g["params"]], weight_decay=cfg.weight_decay)

    def lr_factor(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        done = (step - cfg.warmup_steps) / max(1, total_steps - cfg.warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, done)))

    return opt, torch.optim.lr_scheduler.LambdaLR(opt, lr_factor)


# ------------------------------------------------------------------------------------------ objectives
def supcon_loss(z, labels, temperature: float):
    """Supervised contrastive loss over a batch of L2-normalised embeddings: for each anchor with at
    least one positive (same label), the mean log-probability of its positives against all others."""
    import torch

    sim = z @ z.T / temperature
    n = len(z)
    eye = torch.eye(n, dtype=torch.bool, device=z.device)
    sim = sim.masked_fill(eye, float("-inf"))
    log_prob = sim - torch.logsumexp(sim, dim=1, keepdim=True)
    pos = (labels[:, None] == labels[None, :]) & ~eye
    n_pos = pos.sum(1)
    has = n_pos > 0
    if not has.any():
        return z.sum() * 0.0
    mean_pos = torch.where(pos, log_prob, torch.zeros_like(log_prob)).sum(1)[has] / n_pos[has]
    return -mean_pos.mean()


def batch_loss(cfg: TrainConfig, model: Model, forward, x, rows, targets: dict):
    """The weighted sum of the objectives on one batch (rows index the training split)."""
    from torch.nn import functional as F

    feat, logits, offsets = forward(x)
    loss = feat.new_zeros(())
    if cfg.hybrid_weight:
        loss = loss + cfg.hybrid_weight * model.head.loss_from(logits.float(), offsets.float(),
                                                               targets["leaf"][rows], targets["offset"][rows])
    z = F.normalize(feat, dim=1)
    if cfg.retrieval_weight:
        loss = loss + cfg.retrieval_weight * supcon_loss(z, targets["leaf"][rows],
                                                         cfg.contrastive_temperature)
    if cfg.region_weight:
        loss = loss + cfg.region_weight * supcon_loss(z, targets["region"][rows], cfg.contrastive_temperature)
    return loss


# ---------------------------------------------------------------------------------------------- epochs
def epoch_seed(cfg: TrainConfig, epoch: int, rank: int = 0) -> int:
    """Every epoch's randomness (shuffle, augmentations) comes from this, so resuming is exact."""
    return cfg.seed + 1000 * epoch + rank


def train_epoch(cfg: TrainConfig, model: Model, forward, loader, sampler, opt, sched, targets: dict,
                state: dict, device: str, rank: int, world: int) -> dict:
    import torch

    epoch = state["epoch"]
    torch.manual_seed(epoch_seed(cfg, epoch, rank))
    loader.generator.manual_seed(epoch_seed(cfg, epoch))
    if sampler is not None:
        sampler.set_epoch(epoch)
    model.module.train()
    t0, seen, losses = time.perf_counter(), 0, []
    for x, rows, reasons in loader:
        ok = torch.tensor([r == "" for r in reasons])
        weight = 1.0
        if not ok.all():  # unreadable images (validation lists them in failures.csv) are left out
            if not ok.any():  # keep one, weighted 0: under DDP every rank must still step together
                ok[0], weight = True, 0.0
            x, rows = x[ok], rows[ok]
        if x.ndim == 5:  # (B, views, 3, H, W): the views of one image share its targets
            rows = rows.repeat_interleave(x.shape[1])
            x = x.flatten(0, 1)
        x, rows = x.to(device, non_blocking=True), rows.to(device)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.startswith("cuda")):
            loss = weight * batch_loss(cfg, model, forward, x, rows, targets)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        state["step"] += 1
        seen += len(x) * world
        losses.append(float(loss.detach()))
        if cfg.max_steps and state["step"] >= cfg.max_steps:  # every rank counts the same steps
            break
    else:  # the epoch ran to its end; one cut by max_steps is not counted (a longer rerun redoes it)
        state["epoch"] += 1
    return {"epoch": state["epoch"], "loss": float(np.mean(losses)) if losses else float("nan"),
            "samples_per_s": seen / (time.perf_counter() - t0), "steps": state["step"]}


def embed_paths(model: Model, paths: list, device: str, batch_size: int = 512):
    """Evaluation embeddings of images through the one feature extractor: (embeddings of the images
    that decoded, their mask, [(path, reason)] of the others)."""
    from embed.features import FeatureExtractor, ImageFiles

    fx = FeatureExtractor(model.backbone, device=device, batch_size=batch_size)
    out, ok, failed = [], np.zeros(len(paths), bool), []
    for rows, emb, reasons in fx.dataset(ImageFiles(paths, fx.transform(), model.backbone.image_size)):
        for r, why in zip(rows, reasons):
            if why:
                failed.append((str(paths[r]), why))
            else:
                ok[r] = True
        out.append(emb)
    dim = model.backbone.dim
    return (np.concatenate(out) if out else np.zeros((0, dim), np.float32)), ok, failed


def validation_rows(cfg: TrainConfig, data: Data) -> tuple[np.ndarray, np.ndarray]:
    """The train rows of validation's gallery (a fixed sample, the same every epoch) and the val rows."""
    n = len(data.train)
    train_rows = np.arange(n) if n <= cfg.val_train_images else np.sort(
        np.random.default_rng(cfg.seed).choice(n, cfg.val_train_images, replace=False))
    return train_rows, np.arange(len(data.val))


def validation_score(train_emb, train_lat, train_lon, val_emb, val_lat, val_lon, grid: str = "full"):
    """(GeoScore, VoteConfig): the voting tuned on val with neighbours from `train_emb` searched exactly,
    as embed.build tunes the engine built from the checkpoint (retrieve.tuning.tune over its grid, GRID
    or SMALL_GRID); with too few images to tune, the default settings, as that engine then answers."""
    from geovote.metrics import mean_geoscore
    from retrieve.predict import vote
    from retrieve.tuning import GRID, SMALL_GRID, Gallery, TooFewToTune, tune

    gallery = Gallery(train_emb, train_lat, train_lon)
    try:
        best, scores, _ = tune(gallery, val_emb, val_lat, val_lon,
                               grid=GRID if grid == "full" else SMALL_GRID, log=_quiet)
        return scores["voting"]["geoscore"], best
    except TooFewToTune:
        p = gallery.params
        res = gallery.search(val_emb, p.k)
        pred = vote(res.similarity, res.lat_deg, res.lon_deg, gallery.cells(p)[np.maximum(res.rows, 0)], p)
        ok = np.isfinite(pred.lat_deg)
        return mean_geoscore(pred.lat_deg[ok], pred.lon_deg[ok], val_lat[ok], val_lon[ok]), p


def validate(cfg: TrainConfig, model: Model, data: Data, device: str, rank: int = 0, world: int = 1,
             out: Path | None = None, log=print) -> tuple[float, dict]:
    """(validation GeoScore, the voting settings tuned for it), the same on every rank: each rank embeds
    its share of the gallery sample and of val, rank 0 tunes and scores on them all (validation_score)
    and tells the others. Unreadable images are skipped and listed in <out>/failures.csv."""
    from geovote import distributed

    train_rows, val_rows = validation_rows(cfg, data)
    splits = {"train": (data.train, train_rows), "val": (data.val, val_rows)}
    mine = {}
    for name, (split, rows) in splits.items():
        paths = split.image_paths()
        mine[name] = embed_paths(model, [paths[r] for r in rows[rank::world]], device)
    parts = distributed.all_gather(mine)
    score = None
    if rank == 0:
        full, failed = {}, {}
        for name, (_, rows) in splits.items():
            emb = np.zeros((len(rows), model.backbone.dim), np.float32)
            ok = np.zeros(len(rows), bool)
            failed[name] = []
            for r, part in enumerate(parts):
                e, o, f = part[name]
                share = np.arange(len(rows))[r::world]
                ok[share] = o
                emb[share[o]] = e
                failed[name] += f
            full[name] = (emb[ok], rows[ok])
        if (failed["train"] or failed["val"]) and out is not None:
            import csv

            from geovote import csvsafe

            with open(out / "failures.csv", "w", newline="", encoding="utf-8") as f:
                w = csv.writer(f)
                w.writerow(["split", "path", "reason"])
                w.writerows([csvsafe.row((name, *x)) for name in ("train", "val") for x in failed[name]])
            log(f"{len(failed['train'])} train and {len(failed['val'])} val images could not be read and are "
                f"skipped (listed in {out / 'failures.csv'})")
        (tr, tr_rows), (va, va_rows) = full["train"], full["val"]
        if len(tr) == 0 or len(va) == 0:
            score = f"no readable {'val' if len(va) == 0 else 'train'} image to validate with"
        else:
            score, params = validation_score(tr, data.train.lat_deg[tr_rows], data.train.lon_deg[tr_rows],
                                             va, data.val.lat_deg[va_rows], data.val.lon_deg[va_rows],
                                             cfg.val_grid)
            chosen = asdict(params)
            score = (score, {k: chosen[k] for k in ("k", "temperature", "cells", "levels", "bandwidth_km")})
    score = distributed.broadcast(score)
    if isinstance(score, str):
        from geovote.data import DataError

        raise DataError(f"{score} (see {out / 'failures.csv' if out else 'the images'})")
    return score


# ------------------------------------------------------------------------------------------ checkpoints
def save_best(cfg: TrainConfig, model: Model, data: Data, state: dict, out: Path, score: float) -> None:
    from embed.models import save_checkpoint

    save_checkpoint(out / "best", model.backbone, model.arch, cfg.name, {
        "base": cfg.base or "scratch",
        "objectives": {"hybrid": cfg.hybrid_weight, "region": cfg.region_weight,
                       "retrieval": cfg.retrieval_weight},
        "data": str(data.root), "epochs": state["epoch"], "val_geoscore": score, "config": asdict(cfg)},
        dtype=cfg.save_dtype)


def save_last(path: Path, model: Model, opt, sched, state: dict) -> None:
    import torch

    tmp = path.with_name(path.name + ".partial")
    torch.save({"model": model.module.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict(),
                "state": state}, tmp)
    tmp.replace(path)


def resume(path: Path, model: Model, opt, sched, device: str, log) -> dict:
    """The training state saved in `path` (last.pt), loaded into model, optimiser and schedule; a fresh
    state when there is none."""
    import torch

    if not path.exists():
        return {"epoch": 0, "step": 0, "best": -1.0, "history": []}
    ck = torch.load(path, map_location=device, weights_only=False)
    model.module.load_state_dict(ck["model"])
    opt.load_state_dict(ck["opt"])
    sched.load_state_dict(ck["sched"])
    state = ck["state"]
    log(f"resuming from {path}: epoch {state['epoch']}, best validation GeoScore {state['best']:.0f}")
    return state


# ------------------------------------------------------------------------------------------------ train
def train(cfg: TrainConfig, log=print) -> dict:
    import torch

    from geovote import distributed

    rank, world = distributed.init(cfg.dist_timeout_min)
    device = distributed.pick_device()
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    if rank != 0:  # one voice: rank 0 reports; the others say only what is theirs
        log = _quiet
    data = load_data(cfg, rank, log)
    torch.manual_seed(cfg.seed)  # the same initial tower on every rank and in every run of this config
    model = build_model(cfg, data, device)
    dataset = ImageDataset(data.train.image_paths(), train_transform(cfg, model.backbone), cfg.views,
                           model.backbone.image_size)
    sampler = torch.utils.data.DistributedSampler(dataset, world, rank, seed=cfg.seed) if world > 1 else None
    loader = torch.utils.data.DataLoader(dataset, batch_size=cfg.batch_size, sampler=sampler,
                                         shuffle=sampler is None, drop_last=True, num_workers=cfg.workers,
                                         pin_memory=device.startswith("cuda"),
                                         persistent_workers=cfg.workers > 0,
                                         generator=torch.Generator().manual_seed(cfg.seed))
    if len(loader) == 0:
        raise ConfigError(f"batch_size {cfg.batch_size} is more than the {len(dataset) // world:,} training "
                          f"images each of the {world} process(es) gets: no full batch to train on; lower it")
    total_steps = cfg.epochs * len(loader)
    if cfg.max_steps:  # the schedule decays over the steps that will run
        total_steps = min(total_steps, cfg.max_steps)
    opt, sched = make_optimizer(cfg, model, max(1, total_steps))
    # without the hybrid objective the head's parameters get no gradient: DDP must be told
    forward = model.module
    if world > 1:
        forward = torch.nn.parallel.DistributedDataParallel(model.module,
                                                            find_unused_parameters=not cfg.hybrid_weight)
    targets = {"leaf": torch.as_tensor(data.leaf).to(device),
               "offset": torch.as_tensor(data.offset, dtype=torch.float32).to(device),
               "region": torch.as_tensor(data.region).to(device)}
    last = out / "last.pt"
    state = resume(last, model, opt, sched, device, log)
    t_start = time.perf_counter()
    while state["epoch"] < cfg.epochs and not (cfg.max_steps and state["step"] >= cfg.max_steps):
        record = train_epoch(cfg, model, forward, loader, sampler, opt, sched, targets, state, device,
                             rank, world)
        score, record["val_vote"] = validate(cfg, model, data, device, rank, world, out, log)
        record["val_geoscore"] = score
        state["history"].append(record)
        log(f"epoch {state['epoch']}/{cfg.epochs} (step {state['step']}): loss {record['loss']:.3f}, "
            f"{record['samples_per_s']:.0f} samples/s, validation GeoScore {score:.0f}")
        if score > state["best"]:
            state["best"] = score
            if rank == 0:
                save_best(cfg, model, data, state, out, score)
        if rank == 0:
            save_last(last, model, opt, sched, state)
        # rank 0's clock decides for everyone: ranks that disagreed would wait on each other forever
        over = bool(cfg.max_minutes) and time.perf_counter() - t_start > cfg.max_minutes * 60
        spent = distributed.broadcast(over)
        if spent:
            log(f"stopping after epoch {state['epoch']}: the {cfg.max_minutes} minute budget is spent")
            break
    if cfg.max_steps and state["step"] >= cfg.max_steps:
        log(f"stopped at step {state['step']}: max_steps reached")
    if rank == 0:
        (out / "history.json").write_text(json.dumps(state["history"], indent=2) + "\n")
    distributed.leave()
    return {**state, "rank": rank}


def _quiet(*_args) -> None:
    pass
