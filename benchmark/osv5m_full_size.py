"""The OSV-5M paper's network at its released size, with random weights: a snapshot in the released layout
(ViT-L/14 at 224 px, width 1024, 24 layers, MLP 4096; MLPCentroid 1024 -> 1024 -> 512 -> 11,399 cells
and 22,798 offsets; float64 cell tensors; every tensor under `model.` and bare) written to a temporary
folder, then loaded by `embed.models.load_backbone` as a user's download would be.

    python -m benchmark.osv5m_full_size [--images 32]

Prints the shape read off the file, the load time and peak memory, images/s through the tower on this
machine, and, where transformers is installed, how far our class tokens are from transformers'
CLIPVisionModel on the same weights (cosine of the standardised tokens; GELU, and QuickGELU beside it).
"""
from __future__ import annotations

import argparse
import json
import math
import resource
import tempfile
import time
from pathlib import Path

import numpy as np

RELEASED = {"width": 1024, "layers": 24, "mlp": 4096, "patch": 14, "size": 224, "cells": 11399,
            "hidden": (1024, 512)}
SMALL = {"width": 64, "layers": 2, "mlp": 256, "patch": 14, "size": 56, "cells": 300, "hidden": (64, 32)}
WIDTH, LAYERS, MLP, PATCH, SIZE, CELLS = (RELEASED[k] for k in ("width", "layers", "mlp", "patch", "size",
                                                                "cells"))
HIDDEN = RELEASED["hidden"]
TOWER = "backbone.clip.vision_model."


def write_snapshot(folder: Path, shape: dict = RELEASED, seed: int = 0) -> Path:
    """A snapshot in the released layout with random weights of `shape` (RELEASED or SMALL)."""
    import torch

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config(shape)))
    torch.save(released_state(seed, shape), folder / "pytorch_model.bin")
    return folder


def released_state(seed: int = 0, shape: dict = RELEASED) -> dict:
    """Random tensors under the released names (transformers' CLIPVisionModel layout for the tower)."""
    import torch

    WIDTH, LAYERS, MLP, PATCH, SIZE, CELLS = (shape[k] for k in ("width", "layers", "mlp", "patch", "size",  # noqa: N806
                                                                "cells"))
    HIDDEN = shape["hidden"]  # noqa: N806

    g = torch.Generator().manual_seed(seed)
    t = lambda *shape, std=0.02: torch.randn(*shape, generator=g) * std  # noqa: E731
    s = {TOWER + "embeddings.class_embedding": t(WIDTH),
         TOWER + "embeddings.patch_embedding.weight": t(WIDTH, 3, PATCH, PATCH),
         TOWER + "embeddings.position_embedding.weight": t((SIZE // PATCH) ** 2 + 1, WIDTH),
         TOWER + "embeddings.position_ids": torch.arange((SIZE // PATCH) ** 2 + 1)[None]}
    for ln in ("pre_layrnorm", "post_layernorm"):
        s[f"{TOWER}{ln}.weight"], s[f"{TOWER}{ln}.bias"] = 1 + t(WIDTH), t(WIDTH)
    for i in range(LAYERS):
        p = f"{TOWER}encoder.layers.{i}."
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            s[f"{p}self_attn.{proj}.weight"], s[f"{p}self_attn.{proj}.bias"] = t(WIDTH, WIDTH), t(WIDTH)
        for ln in ("layer_norm1", "layer_norm2"):
            s[f"{p}{ln}.weight"], s[f"{p}{ln}.bias"] = 1 + t(WIDTH), t(WIDTH)
        s[f"{p}mlp.fc1.weight"], s[f"{p}mlp.fc1.bias"] = t(MLP, WIDTH, std=2 / math.sqrt(WIDTH)), t(MLP) - 1
        s[f"{p}mlp.fc2.weight"], s[f"{p}mlp.fc2.bias"] = t(WIDTH, MLP, std=2 / math.sqrt(MLP)), t(WIDTH)
    for name, out in (("classif", CELLS), ("reg", 2 * CELLS)):
        dims = [WIDTH, *HIDDEN, out]
        s[f"mid.{name}.0.weight"], s[f"mid.{name}.0.bias"] = 1 + t(WIDTH), t(WIDTH)
        idx = 1
        for a, b in zip(dims[:-1], dims[1:]):
            s[f"mid.{name}.{idx}.weight"], s[f"mid.{name}.{idx}.bias"] = t(b, a, std=1 / math.sqrt(a)), t(b)
            if b != out:
                s[f"mid.{name}.{idx + 1}.weight"], s[f"mid.{name}.{idx + 1}.bias"] = 1 + t(b), t(b)
                idx += 3
    rng = np.random.default_rng(seed)
    lo = np.stack([rng.uniform(-0.9, 0.8, CELLS), rng.uniform(-0.95, 0.9, CELLS)], 1)
    hi = lo + rng.uniform(0.001, 0.1, (CELLS, 2))
    mean = lo + (hi - lo) * rng.uniform(0.2, 0.8, (CELLS, 2))
    s["head.cell_center"] = torch.from_numpy(mean)
    s["head.cell_size_up"] = torch.from_numpy(hi - mean)
    s["head.cell_size_down"] = torch.from_numpy(mean - lo)
    return {**{f"model.{k}": v for k, v in s.items()}, **s}  # the same tensors twice, as upstream's file


def config(shape: dict = RELEASED) -> dict:
    WIDTH, CELLS, HIDDEN = shape["width"], shape["cells"], shape["hidden"]  # noqa: N806
    return {"model": {
        "backbone": {"instance": {"_target_": "models.networks.backbones.CLIP",
                                  "path": "laion/CLIP-ViT-L-14-DataComp.XL-s13B-b90K"}, "output_dim": WIDTH},
        "mid": {"instance": {"_target_": "models.networks.mlp.MLPCentroid", "initial_dim": WIDTH,
                             "hidden_dim": list(HIDDEN), "final_dim": 3 * CELLS,
                             "norm": {"_target_": "torch.nn.GroupNorm", "_partial_": True},
                             "activation": {"_target_": "torch.nn.GELU", "_partial_": True}}},
        "head": {"final_dim": 3 * CELLS, "instance": {
            "_target_": "models.networks.heads.hybrid.HybridHeadCentroid", "final_dim": CELLS,
            "use_tanh": True, "scale_tanh": 1.2, "quadtree_path": "utils/quadtree_10_1000.csv"}}}}


def transformers_tokens(state: dict, x, act: str):
    """transformers' CLIPVisionModel class token, standardised, on the same weights (None without it)."""
    try:
        from transformers import CLIPVisionConfig, CLIPVisionModel
    except ImportError:
        return None
    import torch

    cfg = CLIPVisionConfig(hidden_size=WIDTH, intermediate_size=MLP, num_hidden_layers=LAYERS,
                           num_attention_heads=WIDTH // 64, image_size=SIZE, patch_size=PATCH, hidden_act=act)
    model = CLIPVisionModel(cfg).eval()
    keys = {k: "backbone.clip." + (k if k.startswith("vision_model.") else "vision_model." + k)
            for k in model.state_dict()}
    model.load_state_dict({k: state[keys[k]] for k in keys})
    with torch.no_grad():
        cls = model(pixel_values=x)["last_hidden_state"][:, 0]
    return torch.nn.functional.layer_norm(cls, (WIDTH,)).numpy()


def main(argv: list[str] | None = None) -> int:
    import torch

    from embed.features import FeatureExtractor
    from embed.models import load_backbone
    from geovote.bundled_sample import ensure_sample
    from geovote.data import read_split

    ap = argparse.ArgumentParser(prog="python -m benchmark.osv5m_full_size", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=32)
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "baseline"
        folder.mkdir()
        write_snapshot(folder)
        state = torch.load(folder / "pytorch_model.bin", weights_only=True)
        size_gb = (folder / "pytorch_model.bin").stat().st_size / 1e9
        rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6
        t0 = time.perf_counter()
        bb = load_backbone(str(folder))
        load_s = time.perf_counter() - t0
        shape = bb.source
        layers = len(bb.model.backbone.transformer.resblocks)
        print(f"snapshot {size_gb:.2f} GB; loaded in {load_s:.1f} s: width {bb.dim}, {layers} layers, "
              f"{bb.image_size} px, {shape['cells']:,} cells, tower activation {shape['tower_activation']} "
              f"(from {shape['activation_from']})")
        paths = read_split(ensure_sample(), "test").image_paths()[:args.images]
        from PIL import Image

        images = [Image.open(p) for p in paths]
        fx = FeatureExtractor(bb, device="cpu", batch_size=16)
        t0 = time.perf_counter()
        emb = fx.images(images)
        rate = len(images) / (time.perf_counter() - t0)
        lat, lon = bb.model.head_latlon(emb)
        ok = bool(np.all(np.abs(lat) <= 90) and np.all(np.abs(lon) <= 180))
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6
        print(f"{rate:.1f} images/s through the tower on the CPU ({torch.get_num_threads()} threads); head "
              f"answers in range: {ok}; peak RSS {peak:.2f} GB ({peak - rss0:+.2f} GB since the snapshot "
              "was written)")
        x = torch.stack([bb.transform()(im) for im in images[:4]])
        with torch.no_grad():
            ours = bb.model(x).numpy()
        for act in ("gelu", "quick_gelu"):
            ref = transformers_tokens(state, x, act)
            if ref is None:
                print("transformers is not installed: no reference comparison")
                break
            cos = np.sum(ours * ref, 1) / np.linalg.norm(ours, axis=1) / np.linalg.norm(ref, axis=1)
            print(f"class token against transformers' CLIPVisionModel ({act}): cosine min {cos.min():.6f}")
    return 0


if __name__ == "__main__":
    from geovote.cli import exit_now

    exit_now(main())
