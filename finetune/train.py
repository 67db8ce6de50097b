"""Fine-tune an open_clip image tower for geolocation (or train a small one from scratch).

    python -m finetune.train --config configs/default_model.toml          # the bundled default model
    python -m finetune.train --set base=vit-l-14-datacomp --set train=last:1 --set data=data/osv5m

Objectives, combined with weights (0 turns one off):
    hybrid     the OSV-5M paper's head: hierarchical QuadTree cross-entropy + L2 on the cell offset
    region     supervised contrastive loss, positives share `unique_region` (the paper's, T = 0.1)
    retrieval  supervised contrastive loss, positives share the fine QuadTree cell: shapes the embedding
               for kNN directly; in-batch negatives
After each epoch: the GeoScore of the voting predictor on the validation split (neighbours from train),
and the best checkpoint is kept as a folder `embed.build --model` loads. Interrupted runs resume from
`last.pt`. Under torchrun each rank trains on its share of every epoch (DDP).
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from geovote.config import ConfigError, add_config_args, load_config

FROM_SCRATCH = ""


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
    max_minutes: float = 0.0  # stop at the first epoch end past this budget (0: no limit)
    val_k: int = 20
    val_temperature: float = 0.05
    save_dtype: str = "float32"
    seed: int = 0
    out: str = "runs/finetune"


# ---------------------------------------------------------------------------------------------- data
class ImageDataset:
    """(image tensor, row) pairs; every row's targets live in arrays indexed by row. With views > 1 the
    tensor is (views, 3, H, W): independent augmentations of one image. Images are read as embed reads
    them (embed.images.open_rgb: every mode to RGB, large JPEGs decoded small)."""

    def __init__(self, paths: list[Path], transform, views: int = 1, min_side_px: int = 64):
        self.paths, self.transform, self.views = paths, transform, views
        self.min_side_px = min_side_px

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        import torch

        from embed.images import open_rgb

        img = open_rgb(self.paths[i], self.min_side_px)
        if self.views == 1:
            return self.transform(img), i
        return torch.stack([self.transform(img) for _ in range(self.views)]), i


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


# ---------------------------------------------------------------------------------------- validation
def embed_paths(visual, paths: list[Path], transform, image_size: int, batch_size: int = 512,
                workers: int = 0, device="cpu"):
    """L2-normalised float32 embeddings of images (evaluation preprocessing)."""
    import torch
    from torch.nn import functional as F

    loader = torch.utils.data.DataLoader(ImageDataset(paths, transform, min_side_px=image_size),
                                         batch_size=batch_size, num_workers=workers)
    out = []
    visual.eval()
    with torch.inference_mode():
        for x, _ in loader:
            out.append(F.normalize(visual(x.to(device)).float(), dim=1).cpu())
    return torch.cat(out).numpy()


def knn_geoscore(train_emb, train_lat, train_lon, train_cells, query_emb, query_lat, query_lon,
                 k: int, temperature: float) -> float:
    """GeoScore of the voting predictor, neighbours by exact search."""
    from geovote.metrics import geoscore
    from geovote.geo import haversine_km
    from index.store import exact_search_torch
    from retrieve.predict import VoteParams, vote

    sim, rows = exact_search_torch(train_emb, query_emb, k)
    levels = tuple(range(train_cells.shape[1]))
    pred = vote(sim, train_lat[rows], train_lon[rows], train_cells[rows],
                VoteParams(k=k, temperature=temperature, levels=levels))
    return float(np.mean(geoscore(haversine_km(pred.lat_deg, pred.lon_deg, query_lat, query_lon))))


# ------------------------------------------------------------------------------------------ training
def train(cfg: TrainConfig, log=print) -> dict:
    import torch
    from torch.nn import functional as F

    from embed.models import build_tower, load_backbone, save_checkpoint, wrap_tower
    from geovote import distributed
    from geovote.cells import QuadTree
    from geovote.data import read_split
    from geovote.heads import CellGeometry, CellHead
    from geovote.sample import ensure_sample

    rank, world = distributed.init()
    device = distributed.local_device()
    torch.manual_seed(cfg.seed + rank)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    root = Path(cfg.data) if cfg.data else ensure_sample()
    extra = ("unique_region",) if cfg.region_weight > 0 else ()
    train_split, val_split = read_split(root, "train", columns=extra), read_split(root, "val")
    t_lat, t_lon = train_split.lat_deg, train_split.lon_deg

    # model
    if cfg.base == FROM_SCRATCH:
        arch = json.loads(cfg.arch)
        import open_clip

        backbone = wrap_tower(cfg.name, build_tower(arch), open_clip.OPENAI_DATASET_MEAN,
                              open_clip.OPENAI_DATASET_STD, {"arch": arch})
        backbone.model.train()
        tower_lr = cfg.lr
    else:
        backbone = load_backbone(cfg.base)
        arch = backbone.source.get("manifest", {}).get("arch") or {"open_clip": backbone.source["arch"]}
        tower_lr = cfg.backbone_lr
    visual = backbone.model.to(device)
    if device.startswith("cuda") and cfg.grad_checkpointing and hasattr(visual, "set_grad_checkpointing"):
        visual.set_grad_checkpointing(True)
    tree = QuadTree.build(t_lat, t_lon, cfg.quadtree_max_points, cfg.quadtree_max_depth)
    geometry = CellGeometry(tree)
    head = CellHead(backbone.dim, geometry, hybrid=True).to(device)
    leaf = geometry.leaf_of(t_lat, t_lon)
    offset = geometry.offset_targets(leaf, t_lat, t_lon)
    region = (np.unique(train_split.column("unique_region").astype(str), return_inverse=True)[1]
              if cfg.region_weight > 0 else np.zeros(len(train_split), np.int64))
    leaf_t, offset_t, region_t = (torch.as_tensor(leaf), torch.as_tensor(offset, dtype=torch.float32),
                                  torch.as_tensor(region))
    params = [{"params": trainable_parameters(visual, cfg.train), "lr": tower_lr},
              {"params": list(head.parameters()), "lr": cfg.lr}]
    opt = torch.optim.AdamW([g for g in params if g["params"]], weight_decay=cfg.weight_decay)
    loader_ds = ImageDataset(train_split.image_paths(), train_transform(cfg, backbone), cfg.views,
                             backbone.image_size)
    sampler = (torch.utils.data.DistributedSampler(loader_ds, world, rank, seed=cfg.seed)
               if world > 1 else None)
    loader = torch.utils.data.DataLoader(loader_ds, batch_size=cfg.batch_size, sampler=sampler,
                                         shuffle=sampler is None, drop_last=True, num_workers=cfg.workers,
                                         pin_memory=device.startswith("cuda"),
                                         persistent_workers=cfg.workers > 0,
                                         generator=torch.Generator().manual_seed(cfg.seed))
    total_steps = max(1, cfg.epochs * len(loader))

    def lr_factor(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        done = (step - cfg.warmup_steps) / max(1, total_steps - cfg.warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, done)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor)
    model = geo_model(visual, head)
    ddp = torch.nn.parallel.DistributedDataParallel(model) if world > 1 else model

    state = {"epoch": 0, "step": 0, "best": -1.0, "history": []}
    last = out / "last.pt"
    if last.exists():
        ck = torch.load(last, map_location=device, weights_only=False)
        model.load_state_dict(ck["model"])
        opt.load_state_dict(ck["opt"])
        sched.load_state_dict(ck["sched"])
        state = ck["state"]
        log(f"resuming from {last}: epoch {state['epoch']}, best validation GeoScore {state['best']:.0f}")

    eval_tf = backbone.transform()
    cells = tree.assign(t_lat, t_lon)[:, 1:]
    t_start = time.perf_counter()
    while state["epoch"] < cfg.epochs:
        epoch = state["epoch"]
        if sampler is not None:
            sampler.set_epoch(epoch)
        model.train()
        t0, seen, losses = time.perf_counter(), 0, []
        for x, rows in loader:
            if x.ndim == 5:  # (B, views, 3, H, W): the views of one image share its targets
                rows = rows.repeat_interleave(x.shape[1])
                x = x.flatten(0, 1)
            x = x.to(device, non_blocking=True)
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.startswith("cuda")):
                feat, logits, offsets = ddp(x)
                loss = feat.new_zeros(())
                if cfg.hybrid_weight:
                    loss = loss + cfg.hybrid_weight * head.loss_from(
                        logits.float(), offsets.float(), leaf_t[rows].to(device), offset_t[rows].to(device))
                z = F.normalize(feat, dim=1)
                if cfg.retrieval_weight:
                    loss = loss + cfg.retrieval_weight * supcon_loss(z, leaf_t[rows].to(device),
                                                                     cfg.contrastive_temperature)
                if cfg.region_weight:
                    loss = loss + cfg.region_weight * supcon_loss(z, region_t[rows].to(device),
                                                                  cfg.contrastive_temperature)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            state["step"] += 1
            seen += len(x) * world
            losses.append(float(loss.detach()))
        rate = seen / (time.perf_counter() - t0)
        state["epoch"] += 1
        record = {"epoch": state["epoch"], "loss": float(np.mean(losses)) if losses else None,
                  "samples_per_s": rate}
        if rank == 0:
            tr = embed_paths(visual, train_split.image_paths(), eval_tf, backbone.image_size, device=device)
            va = embed_paths(visual, val_split.image_paths(), eval_tf, backbone.image_size, device=device)
            score = knn_geoscore(tr, t_lat, t_lon, cells, va, val_split.lat_deg, val_split.lon_deg,
                                 cfg.val_k, cfg.val_temperature)
            record["val_geoscore"] = score
            state["history"].append(record)
            log(f"epoch {state['epoch']}/{cfg.epochs}: loss {record['loss']:.3f}, {rate:.0f} samples/s, "
                f"validation GeoScore {score:.0f}")
            if score > state["best"]:
                state["best"] = score
                save_checkpoint(out / "best", backbone, arch, cfg.name, {
                    "base": cfg.base or "scratch", "objectives": {"hybrid": cfg.hybrid_weight,
                                                                  "region": cfg.region_weight,
                                                                  "retrieval": cfg.retrieval_weight},
                    "data": str(root), "epochs": state["epoch"], "val_geoscore": score,
                    "config": asdict(cfg)}, dtype=cfg.save_dtype)
            torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict(),
                        "state": state}, out / "last.pt.partial")
            (out / "last.pt.partial").replace(last)
        if cfg.max_minutes and time.perf_counter() - t_start > cfg.max_minutes * 60:
            log(f"stopping after epoch {state['epoch']}: the {cfg.max_minutes} minute budget is spent")
            break
    if rank == 0:
        (out / "history.json").write_text(json.dumps(state["history"], indent=2) + "\n")
    return state


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m finetune.train", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(ap)
    args = ap.parse_args(argv)
    from embed.models import BackboneError
    from geovote.data import DataError

    try:
        cfg = load_config(TrainConfig, args.config, args.overrides)
        state = train(cfg)
    except (ConfigError, DataError, BackboneError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"best validation GeoScore {state['best']:.0f}; checkpoint: {Path(cfg.out) / 'best'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
