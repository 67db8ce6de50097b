"""Backbones by name: an open_clip image tower, its preprocessing and a name that identifies its weights.

    default                 the bundled model (embed/default_model/, trained by finetune on the sample)
    vit-b-32-openai         ViT-B-32 with OpenAI's weights (QuickGELU, as they were trained)
    vit-l-14-datacomp       ViT-L-14, datacomp_xl_s13b_b90k: the OSV-5M paper's backbone
    ARCH:TAG                any open_clip pretrained pair, e.g. ViT-B-16:laion2b_s34b_b88k
    ARCH:/path/file         a local weights file (.bin, .pt, .pth, .safetensors) for open_clip's ARCH
    osv5m-baseline          the OSV-5M paper's released model (hub osv5m/baseline; embed.osv5m)
    hf-hub:ORG/REPO         an open_clip model on the hub (config + weights), or one in osv5m/baseline's
                            layout, from the cache or the hub
    FOLDER                  a checkpoint folder written by finetune (manifest.json + visual.pt), a folder
                            with open_clip_config.json and weights (a hub snapshot), or a snapshot of
                            osv5m/baseline (config.json + pytorch_model.bin)
    random:ARCH             an open_clip architecture (or `default`) with random weights, seeded
    pixels:N                raw pixels: the image at 4N px, area-averaged to N x N x 3 (a baseline)
    pixels:N@D              those pixels through a fixed random projection to D dims (rehearsals)

`python -m embed.build --model list` prints them and what each resolves to. Pretrained towers are
resolved as open_clip resolves them (embed.pretrained): the tag's QuickGELU, mean, std, interpolation and
resize mode. Weights come from the Hugging Face cache, else the hub; offline and not cached, loading
fails within a few seconds with a message naming the repo, the files and how to fetch them.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from embed.pretrained import Resolved, WeightsMissing
from geovote.paths import file_sha256

CHECKPOINT_FORMAT = "geovote-checkpoint"
CHECKPOINT_VERSION = 1
DEFAULT_MODEL_DIR = Path(__file__).resolve().parent / "default_model"  # package data: in every install
_OPENAI_MEAN_STD = {"mean": (0.48145466, 0.4578275, 0.40821073), "std": (0.26862954, 0.26130258, 0.27577711),
                    "interpolation": "bicubic", "resize_mode": "shortest"}
# What each alias resolves to, written out so that a missing download is reported before torch is
# imported; tests/test_models.py checks every entry against open_clip's own pretrained configuration.
ALIASES = {
    "vit-b-32-openai": Resolved("vit-b-32-openai", "ViT-B-32", "openai",
                                hf_repo="timm/vit_base_patch32_clip_224.openai", quick_gelu=True,
                                preprocess=_OPENAI_MEAN_STD),
    "vit-l-14-datacomp": Resolved("vit-l-14-datacomp", "ViT-L-14", "datacomp_xl_s13b_b90k",
                                  hf_repo="laion/CLIP-ViT-L-14-DataComp.XL-s13B-b90K",
                                  preprocess=_OPENAI_MEAN_STD),
}


class BackboneError(Exception):
    pass


PIL_FILTERS = {"bicubic": 3, "bilinear": 2}  # PIL.Image.Resampling values


def shortest_side_size(w: int, h: int, size: int) -> tuple[int, int]:
    """(width, height) of a w x h image with its shortest side resized to `size`, torchvision's rounding."""
    return (size, int(size * h / w)) if w <= h else (int(size * w / h), size)


def centre_crop_origin(w: int, h: int, size: int) -> tuple[int, int]:
    """(left, top) of the centred `size` x `size` crop of a w x h image, torchvision's rounding."""
    return int(round((w - size) / 2.0)), int(round((h - size) / 2.0))


class ShortestSideTransform:
    """Resize the shortest side to `size` (torchvision's rounding), centre-crop `size` x `size`, scale to
    [0, 1], normalise: open_clip's evaluation transform for resize_mode 'shortest'."""

    def __init__(self, size: int, mean, std, interpolation: str = "bicubic"):
        import numpy as np

        self.size, self.filter = int(size), PIL_FILTERS[interpolation]
        self.mean = np.asarray(mean, np.float32)[:, None, None]
        self.std = np.asarray(std, np.float32)[:, None, None]

    def shrink(self, img):
        """The resize step alone: `img` with its shortest side at `size`. The transform of the result is
        the transform of `img` to the bit, so a server can drop a large decoded image's pixels early."""
        w, h = img.size
        if (w, h) != (self.size, self.size):
            new = shortest_side_size(w, h, self.size)
            if new != (w, h):
                img = img.resize(new, self.filter)
        return img

    def __call__(self, img):
        import numpy as np
        import torch

        s = self.size
        if img.size != (s, s):
            img = self.shrink(img)
            left, top = centre_crop_origin(*img.size, s)
            img = img.crop((left, top, left + s, top + s))
        x = np.asarray(img.convert("RGB"), np.float32).transpose(2, 0, 1) / 255.0
        return torch.from_numpy((x - self.mean) / self.std)


@dataclass
class Backbone:
    name: str  # identifies architecture and weights; recorded in shard and index manifests
    model: object  # torch.nn.Module: images (B, 3, S, S) normalised -> embeddings (B, dim)
    image_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    dim: int
    resize_mode: str = "shortest"
    interpolation: str = "bicubic"
    source: dict = field(default_factory=dict)  # how it was made: arch, tag, checkpoint manifest
    precision: str = "auto"  # "fp32": never under bf16 autocast (embed.features)

    def transform(self):
        """PIL image -> normalised tensor, open_clip's evaluation preprocessing. The common case (shortest
        side resized, centre crop) is done here with PIL and numpy, equal to open_clip's to the float
        (tested), so answering a query needs neither torchvision nor open_clip imported."""
        if self.resize_mode == "shortest" and self.interpolation in PIL_FILTERS:
            return ShortestSideTransform(self.image_size, self.mean, self.std, self.interpolation)
        import open_clip

        return open_clip.image_transform(self.image_size, is_train=False, mean=self.mean, std=self.std,
                                         resize_mode=self.resize_mode, interpolation=self.interpolation)

    def shrink(self, img):
        """A decoded image made as small as its preprocessing allows without changing the model's input:
        the shortest side resized first (ShortestSideTransform.shrink); other modes keep it whole."""
        t = self.transform()
        return t.shrink(img) if isinstance(t, ShortestSideTransform) else img

    def preprocessing(self) -> dict:
        return {"image_size": self.image_size, "mean": list(self.mean), "std": list(self.std),
                "resize_mode": self.resize_mode, "interpolation": self.interpolation}


def _image_size(visual) -> int:
    size = getattr(visual, "image_size", None)
    if size is None:  # timm towers
        size = visual.trunk.default_cfg.get("input_size", (3, 224, 224))[-1]
    return int(size[0] if isinstance(size, (tuple, list)) else size)


def _embed_dim(visual, image_size: int) -> int:
    import torch

    out = getattr(visual, "output_dim", None)
    if out:
        return int(out)
    with torch.no_grad():
        return int(visual(torch.zeros(1, 3, image_size, image_size)).shape[-1])


def build_tower(arch: dict, weights_follow: bool = False):
    """An image tower with random weights from an architecture spec: {"open_clip": NAME, "quick_gelu":
    bool} for a named open_clip model, or {"embed_dim": D, "vision_cfg": {...}} for a custom
    CLIPVisionCfg. `weights_follow`: the caller loads weights next, so open_clip's "initialized
    randomly" warning would be false and is not shown, and a custom tower embed.vit reproduces is built
    without importing open_clip (a query with the bundled model then imports torch alone)."""
    if "open_clip" not in arch and weights_follow:
        from embed import vit

        if vit.supports(arch.get("vision_cfg", {})):
            try:
                return vit.VisionTransformer(int(arch["embed_dim"]), arch["vision_cfg"],
                                             bool(arch.get("quick_gelu", False)))
            except (KeyError, TypeError, ValueError) as e:
                raise BackboneError(f"bad architecture spec {arch}: {e}") from None
    import logging

    import open_clip
    from open_clip.model import CLIPVisionCfg, _build_vision_tower

    if "open_clip" in arch:
        name = arch["open_clip"]
        if name not in open_clip.list_models():
            raise BackboneError(f"open_clip has no architecture {name!r}")
        if weights_follow:
            logging.disable(logging.WARNING)
        try:
            return open_clip.create_model(name, pretrained=None,
                                          force_quick_gelu=bool(arch.get("quick_gelu", False))).visual
        finally:
            logging.disable(logging.NOTSET)
    try:
        return _build_vision_tower(int(arch["embed_dim"]), CLIPVisionCfg(**arch["vision_cfg"]),
                                   quick_gelu=bool(arch.get("quick_gelu", False)))
    except (KeyError, TypeError) as e:
        raise BackboneError(f"bad architecture spec {arch}: {e}") from None


def wrap_tower(name: str, visual, mean, std, source: dict, resize_mode="shortest",
               interpolation="bicubic") -> Backbone:
    """A Backbone around an image tower (put in eval mode; size and dimension read off it)."""
    visual.eval()
    size = _image_size(visual)
    return Backbone(name=name, model=visual, image_size=size, mean=tuple(mean), std=tuple(std),
                    dim=_embed_dim(visual, size), resize_mode=resize_mode, interpolation=interpolation,
                    source=source)


def load_pretrained(r: Resolved, name: str | None = None) -> Backbone:
    """A pretrained tower (an alias, ARCH:TAG or ARCH:file) built as open_clip builds it."""
    from embed import pretrained

    try:
        pretrained.locate_weights(r)  # an alias fails here, before torch is imported, when offline
        visual, pre = pretrained.create_tower(r)
    except WeightsMissing as e:
        raise BackboneError(str(e)) from None
    except Exception as e:  # noqa: BLE001 - a file that does not fit, a corrupt pickle or safetensors, a download
        what = f"the weights file {r.weights}" if r.weights else f"{r.arch}:{r.tag}"
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
        raise BackboneError(f"{r.name}: open_clip could not load {what} ({type(e).__name__}: {first}); is it "
                            f"a {r.arch} checkpoint in open_clip's format?") from None
    if r.weights:  # a file: its content is its identity
        name = name or f"{r.arch}:{Path(r.weights).name}@{file_sha256(Path(r.weights))[:12]}"
    return _wrap_open_clip(name or r.name, visual, pre, {"arch": r.arch, "pretrained": r.tag or r.weights,
                                                          "quick_gelu": r.quick_gelu})


def _wrap_open_clip(name: str, visual, pre: dict, source: dict) -> Backbone:
    import open_clip

    return wrap_tower(name, visual, pre.get("mean") or open_clip.OPENAI_DATASET_MEAN,
                      pre.get("std") or open_clip.OPENAI_DATASET_STD, source,
                      pre.get("resize_mode", "shortest"), pre.get("interpolation", "bicubic"))


def load_osv5m(spec: str) -> Backbone:
    """The OSV-5M paper's network (embed.osv5m): its alias, its hub repo or a folder of its snapshot.
    Its output, what an engine indexes, is the standardised class token; `model.head_latlon` is the
    paper's head on those embeddings."""
    from embed import osv5m

    try:
        repo = osv5m.hub_repo(spec)
        folder = osv5m.snapshot_folder(repo) if repo else Path(spec).expanduser().resolve()
        net, built = osv5m.build_network(folder)
    except WeightsMissing as e:
        raise BackboneError(str(e)) from None
    except (ValueError, OSError, RuntimeError) as e:  # a damaged or foreign file (SnapshotError included)
        raise BackboneError(f"{spec}: {str(e).splitlines()[0][:400]}") from None
    # the alias and the hub name their own weights; a folder is named by its weights' content
    name = spec if repo else f"{folder.name}@{file_sha256(folder / osv5m.WEIGHTS_FILE)[:12]}"
    shape = built["shape"]
    source = {"osv5m": str(folder), "hub": repo or "", "tower_activation": built["tower_activation"],
              "activation_from": built["activation_from"], "cells": shape["cells"],
              "embedding": "the class token standardised (LayerNorm without affine)"}
    return Backbone(name=name, model=net, image_size=shape["image_size"], mean=built["mean"],
                    std=built["std"], dim=shape["width"], source=source, precision="fp32")


def load_hub_or_folder(spec: str) -> Backbone:
    """hf-hub:ORG/REPO, or a folder with open_clip_config.json and weights."""
    from embed import pretrained

    try:
        if spec.startswith("hf-hub:"):
            r = pretrained.resolve_hub_repo(spec)
            visual, pre = pretrained.create_hub_tower(r)
            return _wrap_open_clip(spec, visual, pre, {"hf_hub": r.hf_repo})
        folder = Path(spec).resolve()
        visual, pre = pretrained.create_folder_tower(folder)
        weights = next(folder / f for f in pretrained.HF_WEIGHT_FILES if (folder / f).is_file())
        name = f"{folder.name}@{file_sha256(weights)[:12]}"
        return _wrap_open_clip(name, visual, pre, {"folder": str(folder)})
    except WeightsMissing as e:
        raise BackboneError(str(e)) from None
    except (ValueError, RuntimeError, FileNotFoundError) as e:
        raise BackboneError(f"{spec}: {str(e).splitlines()[0][:300]}") from None


def read_checkpoint_manifest(folder: str | Path) -> dict:
    folder = Path(folder)
    path = folder / "manifest.json"
    if not path.is_file():
        raise BackboneError(f"{folder} is not a geovote checkpoint: no manifest.json")
    manifest = json.loads(path.read_text())
    if manifest.get("format") != CHECKPOINT_FORMAT or manifest.get("version") != CHECKPOINT_VERSION:
        raise BackboneError(f"{folder}: not a {CHECKPOINT_FORMAT} v{CHECKPOINT_VERSION} manifest")
    return manifest


def load_checkpoint(folder: str | Path) -> Backbone:
    """A finetune checkpoint folder: manifest.json (architecture, preprocessing, training record) and
    visual.pt (the image tower's state dict)."""
    import torch

    folder = Path(folder)
    manifest = read_checkpoint_manifest(folder)
    weights = folder / manifest.get("weights", "visual.pt")
    if not weights.is_file():
        raise BackboneError(f"{folder}: missing weights file {weights.name}")
    visual = build_tower(manifest["arch"], weights_follow=True)
    state = torch.load(weights, map_location="cpu", weights_only=True)
    try:
        visual.load_state_dict({k: v.float() for k, v in state.items()})
    except RuntimeError as e:
        raise BackboneError(f"{weights}: does not fit the architecture in its manifest: {e}") from None
    pre = manifest["preprocessing"]
    # the name changes whenever the weights do, so an index never meets queries from other weights
    name = f"{manifest.get('name', folder.name)}@{file_sha256(weights)[:12]}"
    source = {"checkpoint": str(folder), "manifest": manifest}
    return wrap_tower(name, visual, pre["mean"], pre["std"], source, pre.get("resize_mode", "shortest"),
                      pre.get("interpolation", "bicubic"))


def save_checkpoint(folder: str | Path, backbone: Backbone, arch: dict, name: str, record: dict,
                    dtype: str = "float32") -> Path:
    """Write `backbone`'s tower as a checkpoint folder that `load_backbone(folder)` reads back."""
    import torch

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to("cpu", getattr(torch, dtype) if v.is_floating_point() else v.dtype)
             for k, v in backbone.model.state_dict().items()}
    tmp = folder / "visual.pt.partial"
    torch.save(state, tmp)
    tmp.replace(folder / "visual.pt")
    manifest = {"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, "name": name, "arch": arch,
                "preprocessing": backbone.preprocessing(), "dim": backbone.dim, "weights": "visual.pt",
                "weights_dtype": dtype, **record}
    tmp = folder / "manifest.json.partial"
    tmp.write_text(json.dumps(manifest, indent=2) + "\n")
    tmp.replace(folder / "manifest.json")
    return folder


def random_backbone(arch_name: str, seed: int = 0) -> Backbone:
    """`random:ARCH`: an open_clip architecture, or the bundled default's, with seeded random weights."""
    import open_clip
    import torch

    torch.manual_seed(seed)
    if arch_name == "default":
        manifest = read_checkpoint_manifest(DEFAULT_MODEL_DIR)
        pre = manifest["preprocessing"]
        return wrap_tower("random:default", build_tower(manifest["arch"]), pre["mean"], pre["std"],
                          {"arch": manifest["arch"], "random": seed})
    return wrap_tower(f"random:{arch_name}", build_tower({"open_clip": arch_name}),
                      open_clip.OPENAI_DATASET_MEAN, open_clip.OPENAI_DATASET_STD,
                      {"arch": arch_name, "random": seed})


def pixels_backbone(side_px: int, dim: int | None = None) -> Backbone:
    """`pixels:N`: the image itself, N x N x 3, as the embedding (the raw-pixel kNN baseline).
    `pixels:N@D`: those pixels times a fixed random projection to D dimensions (seed 0, Gaussian: inner
    products kept in expectation), a model of any width for rehearsals at the dims of real towers.
    open_clip is not imported (seconds of every stage that loads it): its OpenAI mean and std are
    _OPENAI_MEAN_STD's, equal to open_clip's (tests/test_embed.py)."""
    import torch
    from torch.nn import functional as F

    raw = 3 * side_px * side_px

    class Pixels(torch.nn.Module):
        def __init__(self):
            super().__init__()
            if dim is not None:
                g = torch.Generator().manual_seed(0)
                self.register_buffer("projection", torch.randn(raw, dim, generator=g) / dim ** 0.5)

        def forward(self, x):
            x = F.adaptive_avg_pool2d(x, side_px).flatten(1)
            return x if dim is None else x @ self.projection.to(x.dtype)

    name = f"pixels:{side_px}" if dim is None else f"pixels:{side_px}@{dim}"
    return Backbone(name=name, model=Pixels(), image_size=4 * side_px,
                    mean=tuple(_OPENAI_MEAN_STD["mean"]), std=tuple(_OPENAI_MEAN_STD["std"]),
                    dim=dim or raw, source={"pixels": side_px, **({"projected_to": dim} if dim else {})})


def canonical_name(name: str) -> str:
    """`name` with any path in it made absolute (a folder, or ARCH:/path): the form an index records, so
    that queries find the model from any working directory. Registry names come first, as in
    load_backbone: a folder called `default` in the working directory is not the bundled model."""
    if name in NAMED or name in ALIASES or name.startswith(("random:", "pixels:", "hf-hub:")):
        return name
    if Path(name).expanduser().exists():
        return str(Path(name).expanduser().resolve())
    if ":" in name and not name.startswith(("hf-hub:", "random:", "pixels:")):
        arch, rest = name.split(":", 1)
        if Path(rest).expanduser().exists():
            return f"{arch}:{Path(rest).expanduser().resolve()}"
    return name


NAMED = ("default", "osv5m-baseline")  # registry names that are not open_clip aliases
MODEL_FORMS = ("default", *ALIASES, "osv5m-baseline", "ARCH:TAG", "ARCH:/path/weights", "hf-hub:ORG/REPO",
               "a folder",
               "random:ARCH", "pixels:N", "pixels:N@D")


def describe_models() -> str:
    """The registry, for `--model list`: each alias with what it resolves to, then the other forms."""
    lines = ["default              the bundled model: " + str(DEFAULT_MODEL_DIR)]
    lines += [f"{name:<20} {r.describe()}" for name, r in ALIASES.items()]
    lines += ["osv5m-baseline       the OSV-5M paper's released model (hub osv5m/baseline): a DataComp "
              "ViT-L/14 fine-tuned on OSV-5M, with its hybrid head",
              "ARCH:TAG             any open_clip pretrained pair (open_clip.list_pretrained()), by its tag",
              "ARCH:/path/weights   a local open_clip weights file (.bin, .pt, .pth, .safetensors)",
              "hf-hub:ORG/REPO      an open_clip model on the hub (open_clip_config.json + weights), or one "
              "in osv5m/baseline's layout",
              "FOLDER               a finetune checkpoint, a folder of open_clip_config.json + weights, or a "
              "snapshot of osv5m/baseline (config.json + pytorch_model.bin)",
              "random:ARCH          an open_clip architecture (or `default`) with seeded random weights",
              "pixels:N             raw pixels, N x N x 3 (a baseline)",
              "pixels:N@D           raw pixels projected to D dims (a fixed random projection; rehearsals)"]
    return "\n".join(lines)


def load_backbone(name: str = "default") -> Backbone:
    """The backbone a name stands for (see the module docstring). Raises BackboneError."""
    if name == "default":
        if not (DEFAULT_MODEL_DIR / "manifest.json").is_file():
            raise BackboneError(f"the bundled default model is missing from {DEFAULT_MODEL_DIR}; reinstall "
                                "geovote (it ships as package data) or train it (python -m finetune.train "
                                "--config configs/default_model.toml, see README)")
        return load_checkpoint(DEFAULT_MODEL_DIR)
    if name in ALIASES:
        return load_pretrained(ALIASES[name])
    if name == "osv5m-baseline":
        return load_osv5m(name)
    if name.startswith("random:"):
        return random_backbone(name.split(":", 1)[1])
    if name.startswith("pixels:"):
        side, _, dim = name.split(":", 1)[1].partition("@")
        try:
            side_px, width = int(side), int(dim) if dim else None
        except ValueError:
            raise BackboneError(f"pixels:N (or pixels:N@D) needs whole numbers, got {name!r}") from None
        if side_px < 1 or (width is not None and width < 1):
            raise BackboneError(f"pixels:N@D needs N and D of at least 1, got {name!r}")
        return pixels_backbone(side_px, width)
    if name.startswith("hf-hub:"):
        from embed import osv5m

        return load_osv5m(name) if osv5m.hub_repo(name) else load_hub_or_folder(name)
    path = Path(name).expanduser()
    if path.is_dir():
        from embed import osv5m
        from embed.pretrained import is_open_clip_folder

        if is_open_clip_folder(path) and not (path / "manifest.json").is_file():
            return load_hub_or_folder(str(path))
        if osv5m.is_osv5m_folder(path):
            return load_osv5m(str(path))
        return load_checkpoint(path)
    if path.is_file():
        raise BackboneError(f"{name} is a file: for a weights file, name its open_clip architecture too, "
                            f"e.g. --model ViT-B-32-quickgelu:{name}")
    if ":" in name:
        from embed import pretrained

        arch, rest = name.split(":", 1)
        looks_like_path = "/" in rest or rest.endswith(pretrained.WEIGHT_SUFFIXES) or Path(rest).exists()
        try:
            r = pretrained.resolve_file(arch, rest) if looks_like_path else pretrained.resolve_tag(arch, rest)
        except ValueError as e:
            raise BackboneError(str(e)) from None
        return load_pretrained(r)
    raise BackboneError(f"unknown model {name!r}; expected one of: {', '.join(MODEL_FORMS)} "
                        "(python -m embed.build --model list)")
