"""Everything that needs a GPU, measured in one run and written as one JSON summary.

    python -m benchmark.gpu_check --out gpu.json             # full size, on a CUDA GPU (gpu_check.sh)
    python -m benchmark.gpu_check --small --out small.json       # toy size on any machine: proves the paths

    embed        ViT-L-14 (random weights, 224 px, bf16) end to end from 512x384 JPEGs (embed.split: decoding
                 workers, shards) against its forward-only ceiling on the same images pre-decoded
    decode       the same JPEGs in a zip archive: decode + preprocess per CPU core (PIL plain / draft) against
                 the batched decode on the GPU (torchvision's nvjpeg, embed.gpudecode); the stage end to end
                 from the archive with either path, and the cosine between their embeddings
    finetune     ViT-L-14 with the last 2 blocks trainable: optimiser steps/s and samples/s (finetune.trainer)
    search       1M x 768 clustered vectors: exact search on the GPU (torch, fp16) against our CPU index
                 (IVF-PQ + re-rank, FAISS), recall@10 against exact float32 search and queries/s
    engine       the query engine on the GPU (FeatureExtractor on CUDA + GeoIndex on CUDA) against the same
                 engine on the CPU: answers that agree, and images/s

Needs no dataset, no network and no scipy/reverse_geocoder: images are synthetic JPEGs with random
coordinates written to a temporary folder. Each figure is recorded with the card that produced it.
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

SIZES = {  # full: one H100 within ~8 minutes; small: seconds on a CPU
    "full": {"images": 8192, "jpeg": (512, 384), "model": "random:ViT-L-14", "batch": 256, "ft_steps": 30,
             "ft_batch": 64, "vectors": 1_000_000, "dim": 768, "queries": 10_000,
             "engine_model": "random:ViT-B-32"},
    "small": {"images": 96, "jpeg": (96, 72), "model": "random:default", "batch": 32, "ft_steps": 3,
              "ft_batch": 16, "vectors": 60_000, "dim": 64, "queries": 200, "engine_model": "random:default"},
}


def synthetic_dataset(root: Path, n: int, size: tuple[int, int], seed: int = 0) -> Path:
    """train/val/test CSVs and JPEGs: smooth random images (they compress like photos) at random places."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    w, h = size
    for split, count in (("train", n), ("val", max(16, n // 8)), ("test", max(16, n // 8))):
        (root / "images" / split).mkdir(parents=True, exist_ok=True)
        lat = np.degrees(np.arcsin(rng.uniform(-0.95, 0.95, count)))
        lon = rng.uniform(-180, 180, count)
        rows = ["id,latitude,longitude"]
        for i in range(count):
            small = rng.integers(0, 255, (h // 16 + 1, w // 16 + 1, 3), np.uint8)
            img = Image.fromarray(small).resize((w, h), Image.BILINEAR)
            img.save(root / "images" / split / f"{split}{i}.jpg", quality=90)
            rows.append(f"{split}{i},{lat[i]:.6f},{lon[i]:.6f}")
        (root / f"{split}.csv").write_text("\n".join(rows) + "\n")
    return root


def sync(cuda: bool) -> None:
    if cuda:
        import torch

        torch.cuda.synchronize()


def check_embed(root: Path, work: Path, s: dict) -> dict:
    import torch

    from embed.features import FeatureExtractor
    from embed.images import open_rgb
    from embed.models import load_backbone
    from embed.split import EmbedConfig, decode_workers, embed_split
    from geovote.data import read_split

    backbone = load_backbone(s["model"])
    fx = FeatureExtractor(backbone, batch_size=s["batch"])
    split = read_split(root, "train")
    tf = fx.transform()
    tensors = torch.stack([tf(open_rgb(p, backbone.image_size)) for p in split.image_paths()])
    if fx.cuda:
        tensors = tensors.pin_memory()
    fx(tensors[: s["batch"]])  # warm-up: kernels, autotuning
    sync(fx.cuda)
    t0 = time.perf_counter()
    for start in range(0, len(tensors), s["batch"]):
        fx(tensors[start:start + s["batch"]])
    sync(fx.cuda)
    ceiling = len(tensors) / (time.perf_counter() - t0)
    del tensors
    cfg = EmbedConfig(model=s["model"], batch_size=s["batch"],
                      shard_rows=max(s["batch"], len(split) // 4))
    t0 = time.perf_counter()
    embed_split(split, backbone, work / "emb", cfg, root, log=lambda *_: None)
    sync(fx.cuda)
    end_to_end = len(split) / (time.perf_counter() - t0)
    return {"model": backbone.name, "images": len(split), "jpeg": list(s["jpeg"]), "device": fx.device,
            "bf16": fx.bf16, "workers": decode_workers(-1), "forward_only_images_per_s": round(ceiling, 1),
            "end_to_end_images_per_s": round(end_to_end, 1),
            "end_to_end_share_of_ceiling": round(end_to_end / ceiling, 3)}


def check_finetune(root: Path, work: Path, s: dict) -> dict:
    from embed.split import decode_workers
    from finetune.trainer import TrainConfig, train

    cfg = TrainConfig(data=str(root), base=s["model"], train="last:2", epochs=1, max_steps=s["ft_steps"],
                      batch_size=s["ft_batch"], warmup_steps=2, workers=decode_workers(-1),
                      val_train_images=256,
                      quadtree_max_points=50, out=str(work / "ft"))
    t0 = time.perf_counter()
    state = train(cfg, log=lambda *_: None)
    wall = time.perf_counter() - t0
    record = state["history"][-1]
    return {"model": s["model"], "trainable": "last:2", "batch": s["ft_batch"], "steps": state["step"],
            "samples_per_s": round(record["samples_per_s"], 1),
            "steps_per_s": round(record["samples_per_s"] / s["ft_batch"], 2),
            "wall_s_with_validation": round(wall, 1)}


def check_search(s: dict) -> dict:
    import torch

    from geovote.distributed import pick_device
    from geovote.shards import write_shard
    from index.build import build_index
    from index.exact import exact_topk
    from index.search import GeoIndex
    from index.synthetic import clustered_vectors

    n, dim, nq, k = s["vectors"], s["dim"], s["queries"], 10
    base = clustered_vectors(n, dim, seed=1)
    queries = clustered_vectors(nq, dim, seed=2)
    truth = exact_topk(base, queries[:1000], k, device="cpu")[1]  # float32 ground truth

    def recall(rows):
        return float(np.mean([len(set(a) & set(b)) / k for a, b in zip(rows, truth)]))

    device = pick_device()
    out = {"vectors": n, "dim": dim, "queries": nq, "device": device}
    if device.startswith("cuda"):
        gpu_base = torch.from_numpy(base.astype(np.float16)).to(device)
        exact_topk(gpu_base, queries[:100], k, device=device)  # warm-up
        sync(True)
        t0 = time.perf_counter()
        _, rows = exact_topk(gpu_base, queries, k, device=device)
        sync(True)
        out["gpu_exact_queries_per_s"] = round(nq / (time.perf_counter() - t0), 1)
        out["gpu_exact_recall_at_10"] = recall(rows[:1000])
        del gpu_base
    with tempfile.TemporaryDirectory() as tmp:
        shards = Path(tmp) / "shards"
        shards.mkdir()
        for i, start in enumerate(range(0, n, 100_000)):
            part = base[start:start + 100_000]
            ids = [str(j) for j in range(start, start + len(part))]
            zeros = np.zeros(len(part))
            write_shard(shards / f"shard-{i:05d}.parquet", ids, zeros, zeros, part)
        (shards / "manifest.json").write_text(json.dumps({"backbone": "synthetic", "dim": dim}))
        t0 = time.perf_counter()
        info = build_index(shards, Path(tmp) / "index", log=lambda *_: None)
        out["cpu_index_build_s"] = round(time.perf_counter() - t0, 1)
        idx = GeoIndex(Path(tmp) / "index", device="cpu")
        idx.search(queries[:100], k)
        t0 = time.perf_counter()
        res = idx.search(queries, k)
        out["cpu_index"] = info["factory"]
        out["cpu_index_queries_per_s"] = round(nq / (time.perf_counter() - t0), 1)
        found = np.array([[int(i) if i else -1 for i in row] for row in res.ids[:1000]])  # ids: rows of base
        out["cpu_index_recall_at_10"] = recall(found)
    return out


def check_engine(root: Path, work: Path, s: dict) -> dict:
    from embed.images import open_rgb
    from geovote.data import read_split
    from geovote.geo import haversine_km
    from retrieve.engine import Engine
    from retrieve.pipeline import BuildConfig, build_engine

    folder = build_engine(BuildConfig(data=str(root), model=s["engine_model"], out=str(work / "engine"),
                                      batch_size=s["batch"]), log=lambda *_: None)
    test = read_split(root, "test")
    out = {"model": s["engine_model"]}
    answers = {}
    for device in ("cpu", "auto"):
        engine = Engine(folder / "index", device=device)
        imgs = [open_rgb(p, engine.backbone.image_size) for p in test.image_paths()]
        engine.locate(engine.embed_images(imgs[:8]))  # warm-up
        t0 = time.perf_counter()
        pred, _ = engine.locate(engine.embed_images(imgs))
        out[f"{engine.features.device}_images_per_s"] = round(len(imgs) / (time.perf_counter() - t0), 1)
        answers[device] = pred
    d = haversine_km(answers["cpu"].lat_deg, answers["cpu"].lon_deg, answers["auto"].lat_deg,
                     answers["auto"].lon_deg)
    out["answers_within_1_km_of_cpu"] = float(np.mean(d < 1.0))
    return out


def check_decode(root: Path, work: Path, s: dict) -> dict:
    """Feeding the GPU (issue #30): the train JPEGs put in one stored zip archive (OSV-5M as it ships);
    decode + preprocess per CPU core (PIL plain, PIL draft: embed.build's default path) against the
    batched decode on the device (torchvision/nvjpeg, embed.gpudecode); then the embedding stage end to
    end from the archive with each path, and the cosine between their embeddings."""
    import os
    import zipfile

    from embed.features import FeatureExtractor, ImageFiles
    from embed.gpudecode import DevicePreprocess, EncodedImages
    from embed.models import load_backbone
    from embed.split import EmbedConfig, decode_workers, embed_split
    from geovote.data import read_split
    from geovote.shards import read_embeddings

    zroot = work / "zipped"
    (zroot / "images" / "train").mkdir(parents=True)
    (zroot / "train.csv").write_bytes((root / "train.csv").read_bytes())
    with zipfile.ZipFile(zroot / "images" / "train" / "00.zip", "w", zipfile.ZIP_STORED) as zf:
        for f in sorted((root / "images" / "train").glob("*.jpg")):
            zf.write(f, f"00/{f.name}")
    split = read_split(zroot, "train")
    bb = load_backbone(s["model"])
    fx = FeatureExtractor(bb, batch_size=s["batch"])
    paths = split.image_paths()
    out = {"model": bb.name, "images": len(split), "jpeg": list(s["jpeg"]), "device": fx.device,
           "cpu_cores": os.cpu_count(), "workers": decode_workers(-1)}
    n_cpu = min(len(split), 1024)

    # PIL at full size (decode=pil-full: the obvious alternative) against reduced-size decoding
    for name, ds in (("pil_plain", ImageFiles(paths, fx.transform(), bb.image_size, reduced=False)),
                     ("pil_draft", ImageFiles(paths, fx.transform(), bb.image_size))):
        t0 = time.perf_counter()
        for i in range(n_cpu):
            ds[i]
        out[f"{name}_images_per_s_per_core"] = round(n_cpu / (time.perf_counter() - t0), 1)
    out["cores_for_2500_images_per_s_pil_draft"] = round(2500 / out["pil_draft_images_per_s_per_core"], 1)
    enc = EncodedImages(paths, bb.image_size)
    bs = s["batch"]
    batches = [[enc[i] for i in range(a, min(a + bs, len(enc)))] for a in range(0, len(enc), bs)]
    prep = DevicePreprocess(bb, fx.device)
    prep(*EncodedImages.collate(batches[0])[1:])  # warm-up: nvjpeg handles, kernels
    sync(fx.cuda)
    t0 = time.perf_counter()
    for b in batches:
        x, _ = prep(*EncodedImages.collate(b)[1:])
    sync(fx.cuda)
    out["device_decode_images_per_s"] = round(len(enc) / (time.perf_counter() - t0), 1)
    for decode in ("pil", "torchvision"):
        cfg = EmbedConfig(model=s["model"], batch_size=s["batch"], decode=decode,
                          shard_rows=max(s["batch"], len(split) // 4))
        t0 = time.perf_counter()
        embed_split(split, bb, work / f"emb-zip-{decode}", cfg, zroot, log=lambda *_: None)
        sync(fx.cuda)
        rate = len(split) / (time.perf_counter() - t0)
        out[f"end_to_end_from_archive_{decode}_images_per_s"] = round(rate, 1)
    a, b = read_embeddings(work / "emb-zip-pil"), read_embeddings(work / "emb-zip-torchvision")
    assert list(a.ids) == list(b.ids)
    cos = np.sum(a.embedding.astype(np.float32) * b.embedding.astype(np.float32), axis=1)
    out["cosine_torchvision_vs_pil"] = {"min": round(float(cos.min()), 5),
                                        "mean": round(float(cos.mean()), 5)}
    return out


def check_osv5m(root: Path, work: Path, s: dict) -> dict:
    """The OSV-5M paper's network (embed.osv5m) with random weights in the released layout (full: its
    released size): images/s on the device (float32, no autocast), and its head's answers there against
    the CPU's on the same images."""
    from benchmark.osv5m_full_size import RELEASED, SMALL, write_snapshot
    from embed.features import FeatureExtractor
    from embed.images import open_rgb
    from embed.models import load_backbone
    from geovote.data import read_split
    from geovote.geo import haversine_km

    shape = SMALL if s["images"] <= 96 else RELEASED
    folder = write_snapshot(work / "osv5m-baseline", shape)
    bb = load_backbone(str(folder))
    imgs = [open_rgb(p, bb.image_size) for p in read_split(root, "test").image_paths()]
    out = {"width": shape["width"], "layers": shape["layers"], "cells": shape["cells"]}
    fx = FeatureExtractor(bb, batch_size=s["batch"])
    fx.images(imgs[:8])  # warm-up
    sync(fx.cuda)
    t0 = time.perf_counter()
    emb = fx.images(imgs)
    sync(fx.cuda)
    out[f"{fx.device}_images_per_s"] = round(len(imgs) / (time.perf_counter() - t0), 1)
    out["bf16"] = fx.bf16
    lat, lon = bb.model.head_latlon(emb)
    cpu = FeatureExtractor(load_backbone(str(folder)), device="cpu", batch_size=s["batch"])
    few = min(len(imgs), 64 if shape is SMALL else 16)  # a CPU does the released size at ~1 image/s
    clat, clon = cpu.backbone.model.head_latlon(cpu.images(imgs[:few]))
    out["answers_within_1_km_of_cpu"] = float(np.mean(haversine_km(lat[:few], lon[:few], clat, clon) < 1.0))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmark.gpu_check", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--small", action="store_true", help="toy sizes, any machine: proves the code paths")
    ap.add_argument("--out", type=Path, default=Path("gpu_check.json"))
    ap.add_argument("--only", nargs="+", choices=("embed", "decode", "finetune", "search", "engine", "osv5m"))
    args = ap.parse_args(argv)
    import torch

    s = SIZES["small" if args.small else "full"]
    summary = {"size": "small" if args.small else "full", "python": platform.python_version(),
               "torch": torch.__version__,
               "card": torch.cuda.get_device_name() if torch.cuda.is_available() else "no CUDA GPU (CPU)",
               "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    checks = {"embed": check_embed, "decode": check_decode, "finetune": check_finetune,
              "search": check_search, "engine": check_engine, "osv5m": check_osv5m}
    with tempfile.TemporaryDirectory(prefix="geovote-gpu-check-") as tmp:
        work = Path(tmp)
        root = synthetic_dataset(work / "data", s["images"], s["jpeg"])
        for name, fn in checks.items():
            if args.only and name not in args.only:
                continue
            t0 = time.perf_counter()
            try:
                summary[name] = fn(s) if name == "search" else fn(root, work, s)
            except Exception as e:  # noqa: BLE001 - one failed check must not lose the others' figures
                summary[name] = {"error": f"{type(e).__name__}: {e}"}
            summary[name]["seconds"] = round(time.perf_counter() - t0, 1)
            print(json.dumps({name: summary[name]}), flush=True)
            args.out.write_text(json.dumps(summary, indent=2) + "\n")  # after each: a timeout keeps what ran
    failed = [n for n in checks if isinstance(summary.get(n), dict) and "error" in summary[n]]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
