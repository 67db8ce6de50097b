"""The OSV-5M paper's released model, `osv5m/baseline` (Astruc et al., "OpenStreetView-5M: The Many
Roads to Global Visual Geolocation", CVPR 2024; github.com/gastruc/osv5m, MIT), in plain torch: neither
hydra, omegaconf, transformers nor upstream's code is needed to run it.

    --model osv5m-baseline | hf-hub:osv5m/baseline | FOLDER     ->  load_osv5m(spec) -> Backbone

A snapshot is `config.json` (the dict upstream's `Geolocalizer` builds its network from with hydra) and
`pytorch_model.bin` (a plain dict of tensors, each under `model.<name>` and again under `<name>`).
The network, read off the tensors (width, layers, patch, positions, MLP widths, cells) and the config:
    tower  a CLIP ViT in transformers' CLIPVisionModel layout (`backbone.clip.vision_model.*`), heads =
           width / 64, its MLP activation the one its own hub config names (`hidden_act`); its output
           is the last hidden state, before `post_layernorm` (in the file, unused)
    mid    MLPCentroid on the class token: `classif` (cell logits) and `reg` (two offsets per cell), each
           LayerNorm, then (Linear, GroupNorm(4), activation) per hidden layer, then Linear
    head   HybridHeadCentroid: the best cell c; r = scale * tanh(reg[c]) (lat, lon), times the cell's
           extent above (r > 0) or below its mean point, added to that mean (in units of 90 and 180
           degrees), clamped to [-1, 1]; the cells are the file's float64 `head.cell_*` tensors, or
           upstream's QuadTree CSV (`quadtree_10_1000.csv`) in the snapshot folder

What geovote indexes from it (the Backbone's output, `dim` = width): the class token standardised, that
is LayerNorm without its affine (zero mean, unit variance over the width). Both of the head's MLPs begin
with a LayerNorm, which sees nothing of the token but this, so the features retrieval compares are the
ones the fine-tuning on OSV-5M shaped, without either MLP's own per-dimension rescaling; and since a
LayerNorm ignores scale, the head's answer is a function of the stored, L2-normalised embedding alone:
`OSV5MNetwork.head_latlon` runs the head on an engine's embeddings without running the tower again. The
shards store them in fp16 (a relative rounding of at most 2^-11): the answers move little, except where
two cells' logits are that close, when the cell can change (tests/test_osv5m.py asks, on random weights,
a median under 0.5 km and 98% of the answers within 1 km of the float32 reference). The network
always runs in float32 (Backbone.precision), never bf16 autocast.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from embed import vit

OSV5M_REPO = "osv5m/baseline"
ALIAS = "osv5m-baseline"
CONFIG_FILE, WEIGHTS_FILE = "config.json", "pytorch_model.bin"
FILES = (CONFIG_FILE, WEIGHTS_FILE)
TOWER = "backbone.clip.vision_model."
# the MLP activation of each tower the released configs name, as that tower's own config.json on the hub
# says (`vision_config.hidden_act`); read from the cache instead when it is there
TOWER_ACTIVATIONS = {"laion/CLIP-ViT-L-14-DataComp.XL-s13B-b90K": "gelu"}
ACTIVATIONS = {"gelu": nn.GELU, "quick_gelu": vit.QuickGELU, "torch.nn.GELU": nn.GELU,
               "torch.nn.ReLU": nn.ReLU}
LN_EPS = 1e-5  # transformers' CLIPVisionConfig.layer_norm_eps, and torch's LayerNorm and GroupNorm default
GROUPS = 4  # MLPCentroid's GroupNorm(4, C)
HEAD_WIDTH = 64
_OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
_OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


class SnapshotError(ValueError):
    """A snapshot that is not the released layout, or does not fit itself; the message says what."""


def targets(config, suffix: str) -> list[dict]:
    """Every dict of `config` (nested) whose hydra `_target_` ends with `suffix`."""
    found = []
    if isinstance(config, dict):
        if str(config.get("_target_", "")).endswith(suffix):
            found.append(config)
        for v in config.values():
            found += targets(v, suffix)
    elif isinstance(config, list):
        for v in config:
            found += targets(v, suffix)
    return found


def is_osv5m_folder(path: Path) -> bool:
    """A folder holding the released layout: config.json naming HybridHeadCentroid, and the weights."""
    path = Path(path)
    if not all((path / f).is_file() for f in FILES):
        return False
    try:
        return bool(targets(json.loads((path / CONFIG_FILE).read_text()), "HybridHeadCentroid"))
    except (OSError, ValueError):
        return False


def _mlp(dims: list[int], act) -> nn.Sequential:
    layers = [nn.LayerNorm(dims[0], eps=LN_EPS)]
    for i in range(len(dims) - 1):
        layers.append(nn.Linear(dims[i], dims[i + 1]))
        if i < len(dims) - 2:
            layers += [nn.GroupNorm(GROUPS, dims[i + 1], eps=LN_EPS), act()]
    return nn.Sequential(*layers)


class ClipTower(nn.Module):
    """transformers' CLIPVisionModel forward up to its last hidden state, in embed.vit's modules (the
    same attention and MLP blocks as open_clip's): (B, 3, S, S) -> (B, tokens, width)."""

    def __init__(self, width: int, layers: int, mlp_width: int, patch: int, positions: int, act):
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, kernel_size=patch, stride=patch, bias=False)
        self.class_embedding = nn.Parameter(torch.zeros(width))
        self.positional_embedding = nn.Parameter(torch.zeros(positions, width))
        self.ln_pre = vit.LayerNorm(width, eps=LN_EPS)
        self.transformer = vit.Transformer(width, layers, width // HEAD_WIDTH, mlp_width, act)
        self.ln_post = vit.LayerNorm(width, eps=LN_EPS)  # post_layernorm: loaded, unused (as upstream)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.transformer(self.ln_pre(vit.patch_tokens(self, x)))


class OSV5MNetwork(nn.Module):
    """Images -> the standardised class token (forward, what an engine indexes); embeddings -> the
    hybrid head's answer (head_latlon)."""

    def __init__(self, shape: dict, tower_act, mid_act, scale_tanh: float, use_tanh: bool):
        super().__init__()
        self.width, self.image_size = shape["width"], shape["image_size"]
        self.backbone = ClipTower(shape["width"], shape["layers"], shape["mlp_width"], shape["patch"],
                                  shape["positions"], tower_act)
        self.mid = nn.Module()
        self.mid.classif = _mlp(shape["classif_dims"], mid_act)
        self.mid.reg = _mlp(shape["reg_dims"], mid_act)
        n = shape["cells"]
        for name in ("cell_center", "cell_size_up", "cell_size_down"):  # (lat/90, lon/180), float64
            self.register_buffer(name, torch.zeros(n, 2, dtype=torch.float64))
        self.scale_tanh, self.use_tanh = float(scale_tanh), bool(use_tanh)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        cls = self.backbone(x)[:, 0]
        return F.layer_norm(cls.float(), (self.width,), eps=LN_EPS)

    @torch.no_grad()
    def head_radians(self, features: torch.Tensor) -> torch.Tensor:
        """(B, 2) float64 (lat, lon) in radians on the CPU, as upstream's Geolocalizer returns:
        `features` are any positive multiple of the standardised class token (the MLPs' LayerNorms
        ignore the scale), on any device (the network's is used)."""
        z = features.to(self.cell_center.device, torch.float32)
        logits, reg = self.mid.classif(z), self.mid.reg(z)
        return self.decode(logits, reg).cpu()

    def decode(self, logits: torch.Tensor, reg: torch.Tensor) -> torch.Tensor:
        """HybridHeadCentroid in eval mode: logits (B, C), reg (B, 2C) -> (B, 2) radians, float64."""
        c = logits.argmax(dim=-1)
        r = reg.view(reg.shape[0], -1, 2)[torch.arange(len(c), device=c.device), c]
        if self.use_tanh:
            r = self.scale_tanh * torch.tanh(r)
        size = torch.where(r > 0, self.cell_size_up[c], self.cell_size_down[c])
        gps = self.cell_center[c] + r * size  # float32 r with float64 cells: float64, as upstream
        # upstream's UnormGPS: a float32 constant (torch.Tensor) times the float64 point
        return gps.clamp(-1, 1) * torch.tensor([math.pi / 2, math.pi], dtype=torch.float32, device=gps.device)

    def head_latlon(self, emb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The head's answers (lat, lon in degrees) for L2-normalised embeddings of this network."""
        z = torch.from_numpy(np.ascontiguousarray(emb, np.float32)) * math.sqrt(self.width)
        out = np.degrees(self.head_radians(z).numpy())
        return out[:, 0], out[:, 1]


# ------------------------------------------------------------------------------------------ loading
def read_state(path: Path) -> dict:
    """The file's tensors by their bare names: the `model.` copy, checked equal to the bare one where
    the file has both (upstream's hub mixin saves each module twice); a `position_ids` buffer dropped."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict):
        raise SnapshotError(f"{path}: expected a dict of tensors, got {type(state).__name__}")
    # transformers 5 saves CLIPVisionModel without its `vision_model.` level: both spellings are read
    state = {("backbone.clip.vision_model." + k.split("backbone.clip.", 1)[1]
              if "backbone.clip." in k and "backbone.clip.vision_model." not in k else k): v
             for k, v in state.items()}
    prefixed = {k[len("model."):]: v for k, v in state.items() if k.startswith("model.")}
    bare = {k: v for k, v in state.items() if not k.startswith("model.")}
    if prefixed and bare:
        only = sorted(set(prefixed) ^ set(bare))
        if only:
            raise SnapshotError(f"{path}: {len(only)} tensor(s) in one copy only (`model.` and bare), e.g. "
                                f"{only[0]}")
        differ = [k for k in bare if not torch.equal(bare[k], prefixed[k])]
        if differ:
            raise SnapshotError(f"{path}: the `model.` and bare copies of {differ[0]} differ "
                                f"({len(differ)} tensor(s))")
    out = prefixed or bare
    return {k: v for k, v in out.items() if not k.endswith("position_ids")}


def _mlp_dims(state: dict, prefix: str) -> list[int]:
    linear = sorted(int(k.split(".")[2]) for k in state
                    if k.startswith(prefix) and k.endswith(".weight") and state[k].dim() == 2)
    if not linear:
        raise SnapshotError(f"no {prefix}* linear layers in the weights")
    dims = [state[f"{prefix}{linear[0]}.weight"].shape[1]]
    return dims + [state[f"{prefix}{i}.weight"].shape[0] for i in linear]


def read_shape(state: dict) -> dict:
    """The network's shape, from its tensors alone."""
    try:
        width = state[TOWER + "embeddings.class_embedding"].shape[0]
        patch = state[TOWER + "embeddings.patch_embedding.weight"].shape[-1]
        positions = state[TOWER + "embeddings.position_embedding.weight"].shape[0]
        layers = 1 + max(int(k[len(TOWER + "encoder.layers."):].split(".")[0]) for k in state
                         if k.startswith(TOWER + "encoder.layers."))
        mlp_width = state[TOWER + "encoder.layers.0.mlp.fc1.weight"].shape[0]
    except (KeyError, ValueError) as e:
        raise SnapshotError(f"not a CLIP vision tower under {TOWER}: missing {e}") from None
    grid = math.isqrt(positions - 1)
    if grid * grid != positions - 1:
        raise SnapshotError(f"{positions} positions is not a square grid of patches plus the class token")
    if width % HEAD_WIDTH:
        raise SnapshotError(f"width {width} is not a multiple of the head width {HEAD_WIDTH}")
    classif, reg = _mlp_dims(state, "mid.classif."), _mlp_dims(state, "mid.reg.")
    if classif[0] != width or reg[0] != width or reg[-1] != 2 * classif[-1]:
        raise SnapshotError(f"the head's MLPs ({classif}, {reg}) do not fit a tower of width {width} "
                            "with two offsets per cell")
    return {"width": width, "patch": patch, "positions": positions, "image_size": grid * patch,
            "layers": layers, "mlp_width": mlp_width, "classif_dims": classif, "reg_dims": reg,
            "cells": classif[-1]}


def tower_keys(layers: int) -> dict:
    """Our parameter name -> the file's (without the `backbone.clip.vision_model.` prefix)."""
    m = {"conv1.weight": "embeddings.patch_embedding.weight", "class_embedding": "embeddings.class_embedding",
         "positional_embedding": "embeddings.position_embedding.weight"}
    for ours, theirs in (("ln_pre", "pre_layrnorm"), ("ln_post", "post_layernorm")):
        m.update({f"{ours}.weight": f"{theirs}.weight", f"{ours}.bias": f"{theirs}.bias"})
    for i in range(layers):
        a, b = f"transformer.resblocks.{i}.", f"encoder.layers.{i}."
        for ours, theirs in (("ln_1", "layer_norm1"), ("ln_2", "layer_norm2"), ("mlp.c_fc", "mlp.fc1"),
                             ("attn.out_proj", "self_attn.out_proj"), ("mlp.c_proj", "mlp.fc2")):
            for p in ("weight", "bias"):
                m[f"{a}{ours}.{p}"] = f"{b}{theirs}.{p}"
    return m


def _cells(state: dict, folder: Path, config: dict, n: int) -> dict:
    """cell_center, cell_size_up, cell_size_down (n, 2) float64: the file's tensors, else upstream's
    QuadTree CSV in the folder (geovote.cells.read_quadtree_csv)."""
    names = ("head.cell_center", "head.cell_size_up", "head.cell_size_down")
    if all(k in state for k in names):
        cells = {k.split(".", 1)[1]: state[k].to(torch.float64) for k in names}
    else:
        from geovote.cells import read_quadtree_csv

        head = (targets(config, "HybridHeadCentroid") or [{}])[0]
        name = Path(str(head.get("quadtree_path") or "quadtree_10_1000.csv")).name
        if not (folder / name).is_file():
            raise SnapshotError(f"{folder}: the weights carry no cell tensors ({', '.join(names)}) and there "
                                f"is no {name} beside them: copy upstream's utils/{name} (github.com/gastruc/"
                                "osv5m) into the folder")
        try:
            t = read_quadtree_csv(folder / name)
        except ValueError as e:
            raise SnapshotError(str(e)) from None
        center = np.stack([t["mean_lat"] / 90.0, t["mean_lon"] / 180.0], 1)
        hi = np.stack([t["max_lat"] / 90.0, t["max_lon"] / 180.0], 1)
        lo = np.stack([t["min_lat"] / 90.0, t["min_lon"] / 180.0], 1)
        cells = {"cell_center": torch.from_numpy(center), "cell_size_up": torch.from_numpy(hi - center),
                 "cell_size_down": torch.from_numpy(center - lo)}
    for k, v in cells.items():
        if tuple(v.shape) != (n, 2):
            raise SnapshotError(f"{k}: shape {tuple(v.shape)}, the head has {n} cells")
    return cells


def tower_activation(config: dict) -> tuple[str, str]:
    """(activation, where it was read): the tower's hub config.json in the cache, else TOWER_ACTIVATIONS.
    Never transformers' default (quick_gelu), which DataComp's ViT-L/14 was not trained with."""
    clip = (targets(config, "backbones.CLIP") or [{}])[0]
    repo = str(clip.get("path", ""))
    if not repo:
        raise SnapshotError("config.json names no models.networks.backbones.CLIP tower (its `path`)")
    from embed.pretrained import cached_file

    cached = cached_file(repo, ("config.json",)) if "/" in repo else None
    if cached:
        cfg = json.loads(Path(cached).read_text())
        act = (cfg.get("vision_config") or cfg).get("hidden_act")
        if act:
            return act, f"{cached}"
    if repo in TOWER_ACTIVATIONS:
        return TOWER_ACTIVATIONS[repo], f"{repo}'s config.json (hidden_act)"
    raise SnapshotError(f"the tower {repo} is not one whose activation geovote knows, and its config.json "
                        f"is not in the Hugging Face cache: fetch it with `hf download {repo} config.json`")


def build_network(folder: Path) -> tuple[OSV5MNetwork, dict]:
    """(the network with the snapshot's weights, in eval mode; what it was built from)."""
    folder = Path(folder)
    try:
        config = json.loads((folder / CONFIG_FILE).read_text())
    except (OSError, ValueError) as e:
        raise SnapshotError(f"{folder / CONFIG_FILE}: cannot be read as JSON ({e})") from None
    state = read_state(folder / WEIGHTS_FILE)
    shape = read_shape(state)
    act, act_from = tower_activation(config)
    mid = (targets(config, "MLPCentroid") or [None])[0]
    head = (targets(config, "HybridHeadCentroid") or [None])[0]
    if mid is None or head is None:
        raise SnapshotError(f"{folder / CONFIG_FILE}: names no MLPCentroid and HybridHeadCentroid")
    mid_act = str((mid.get("activation") or {}).get("_target_", "torch.nn.GELU"))
    norm = str((mid.get("norm") or {}).get("_target_", "torch.nn.GroupNorm"))
    if act not in ACTIVATIONS or mid_act not in ACTIVATIONS or norm != "torch.nn.GroupNorm":
        raise SnapshotError(f"unsupported activation or norm (tower {act}, head {mid_act}, norm {norm})")
    try:
        cells, use_tanh = int(head.get("final_dim", shape["cells"])), head["use_tanh"]
        scale_tanh = float(head["scale_tanh"]) if use_tanh else 1.0
    except KeyError as e:  # upstream has no default for either
        raise SnapshotError(f"config.json's HybridHeadCentroid sets no {e}") from None
    except (TypeError, ValueError) as e:  # an unresolved ${...} interpolation, say
        raise SnapshotError(f"config.json's HybridHeadCentroid: {e}") from None
    if cells != shape["cells"]:
        raise SnapshotError(f"config.json's head has {cells} cells, the weights {shape['cells']}")
    net = OSV5MNetwork(shape, ACTIVATIONS[act], ACTIVATIONS[mid_act], scale_tanh, bool(use_tanh))
    ours = tower_keys(shape["layers"])
    weights = {}
    for name, theirs in ours.items():
        weights[name] = state.get(TOWER + theirs)
    for i in range(shape["layers"]):  # q, k, v in one in-projection, as torch's attention holds them
        for p in ("weight", "bias"):
            qkv = [state.get(f"{TOWER}encoder.layers.{i}.self_attn.{x}_proj.{p}") for x in "qkv"]
            weights[f"backbone.transformer.resblocks.{i}.attn.in_proj_{p}"] = (
                None if any(t is None for t in qkv) else torch.cat(qkv))
    weights = {(k if k.startswith("backbone.") else f"backbone.{k}"): v for k, v in weights.items()}
    weights.update({k: v for k, v in state.items() if k.startswith("mid.")})
    weights.update(_cells(state, folder, config, shape["cells"]))
    missing = sorted(k for k, v in weights.items() if v is None)
    if missing:
        raise SnapshotError(f"{folder / WEIGHTS_FILE}: missing {len(missing)} tensor(s), e.g. {missing[0]}")
    used = {TOWER + t for t in ours.values()} | {k for k in state if k.startswith(("mid.", "head.cell_"))}
    used |= {f"{TOWER}encoder.layers.{i}.self_attn.{x}_proj.{p}" for i in range(shape["layers"])
             for x in "qkv" for p in ("weight", "bias")}
    left = sorted(set(state) - used)
    if left:
        raise SnapshotError(f"{folder / WEIGHTS_FILE}: {len(left)} tensor(s) this network has no place for, "
                            f"e.g. {left[0]}")
    try:
        net.load_state_dict({k: v.to(torch.float64) if k.startswith("cell_") else v.float()
                             for k, v in weights.items()}, strict=True)
    except RuntimeError as e:
        raise SnapshotError(f"{folder / WEIGHTS_FILE}: does not fit its own shape: {str(e)[:300]}") from None
    net.eval()
    mean, std = _normalisation(config)
    return net, {"tower_activation": act, "activation_from": act_from, "shape": shape, "mean": mean,
                 "std": std}


def _normalisation(config: dict) -> tuple[tuple, tuple]:
    """The config's transform Normalize mean and std, else OpenAI CLIP's (upstream's)."""
    norm = (targets(config, "Normalize") or [{}])[0]
    mean, std = norm.get("mean"), norm.get("std")
    if mean and std and len(mean) == 3 and len(std) == 3:
        return tuple(float(m) for m in mean), tuple(float(s) for s in std)
    return _OPENAI_MEAN, _OPENAI_STD


# ------------------------------------------------------------------------------------------ where
def hub_repo(spec: str) -> str | None:
    """The hub repo `spec` names when it is the released model (the alias, or hf-hub:REPO whose cached
    config.json is in its layout, or osv5m/baseline itself); None for other specs."""
    from embed.pretrained import HF_CONFIG_FILE, cached_file

    if spec == ALIAS:
        return OSV5M_REPO
    if not spec.startswith("hf-hub:"):
        return None
    repo = spec.split(":", 1)[1].strip("/")
    if repo == OSV5M_REPO:
        return repo
    if cached_file(repo, (HF_CONFIG_FILE,)):  # open_clip's layout
        return None
    config = cached_file(repo, (CONFIG_FILE,))
    return repo if config and is_osv5m_folder(Path(config).parent) else None


def snapshot_folder(repo: str) -> Path:
    """The folder of a hub snapshot holding both files: from the Hugging Face cache, else downloaded;
    offline and not cached, WeightsMissing within seconds, saying how to fetch them."""
    from embed.pretrained import WeightsMissing, _hub_cache, cached_file
    from geovote.hub import OfflineError, check_online

    cached = [cached_file(repo, (f,)) for f in FILES]
    if all(cached) and Path(cached[0]).parent == Path(cached[1]).parent:
        return Path(cached[0]).parent
    try:
        check_online()
    except OfflineError as e:
        raise WeightsMissing(
            f"the OSV-5M paper's model (hub repo {repo}, files {' and '.join(FILES)}) is not in the Hugging "
            f"Face cache ({_hub_cache()}) and cannot be downloaded: {e}. On a machine with a network, fetch "
            f"it with `hf download {repo} {' '.join(FILES)}` (HF_HOME or HF_HUB_CACHE choose the cache) and "
            "copy the cache here; or pass the folder holding both files: --model /path/to/folder") from None
    from huggingface_hub import hf_hub_download

    paths = [Path(hf_hub_download(repo, f)) for f in FILES]
    return paths[0].parent
