"""Backbones by name: an open_clip image tower, its preprocessing and a name that identifies its weights.

    default                 the bundled model (embed/default_model/, trained by finetune on the sample)
    vit-b-32-openai         ViT-B-32, OpenAI's weights
    vit-l-14-datacomp       ViT-L-14, datacomp_xl_s13b_b90k: the OSV-5M paper's backbone
    ARCH:TAG                any open_clip pretrained pair, e.g. ViT-B-16:laion2b_s34b_b88k
    random:ARCH             an open_clip architecture (or `default`) with random weights, seeded
    pixels:N                raw pixels: the image at 4N px, area-averaged to N x N x 3 (a baseline)
    PATH                    a checkpoint folder written by finetune (manifest.json + visual.pt)

Pretrained weights come from the Hugging Face hub through open_clip and are cached there. When they are
not cached and the hub cannot be reached, loading fails within a few seconds with a message naming what
was missing, rather than retrying for a minute.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

CHECKPOINT_FORMAT = "geovote-checkpoint"
CHECKPOINT_VERSION = 1
DEFAULT_MODEL_DIR = Path(__file__).resolve().parent / "default_model"  # package data: in every install
ALIASES = {  # name: (open_clip architecture, pretrained tag, hub repo: checked before torch is imported)
    "vit-b-32-openai": ("ViT-B-32", "openai", "timm/vit_base_patch32_clip_224.openai"),
    "vit-l-14-datacomp": ("ViT-L-14", "datacomp_xl_s13b_b90k", "laion/CLIP-ViT-L-14-DataComp.XL-s13B-b90K"),
}
HF_WEIGHT_FILES = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")


class BackboneError(Exception):
    pass


PIL_FILTERS = {"bicubic": 3, "bilinear": 2}  # PIL.Image.Resampling values


class ShortestSideTransform:
    """Resize the shortest side to `size` (torchvision's rounding), centre-crop `size` x `size`, scale to
    [0, 1], normalise: open_clip's evaluation transform for resize_mode 'shortest'."""

    def __init__(self, size: int, mean, std, interpolation: str = "bicubic"):
        import numpy as np

        self.size, self.filter = int(size), PIL_FILTERS[interpolation]
        self.mean = np.asarray(mean, np.float32)[:, None, None]
        self.std = np.asarray(std, np.float32)[:, None, None]

    def __call__(self, img):
        import numpy as np
        import torch

        w, h = img.size
        s = self.size
        if (w, h) != (s, s):
            if w <= h:
                new = (s, int(s * h / w))
            else:
                new = (int(s * w / h), s)
            if new != (w, h):
                img = img.resize(new, self.filter)
            w, h = img.size
            top, left = int(round((h - s) / 2.0)), int(round((w - s) / 2.0))
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

    def transform(self):
        """PIL image -> normalised tensor, open_clip's evaluation preprocessing. The common case (shortest
        side resized, centre crop) is done here with PIL and numpy, equal to open_clip's to the float
        (tested), so answering a query needs neither torchvision nor open_clip imported."""
        if self.resize_mode == "shortest" and self.interpolation in PIL_FILTERS:
            return ShortestSideTransform(self.image_size, self.mean, self.std, self.interpolation)
        import open_clip

        return open_clip.image_transform(self.image_size, is_train=False, mean=self.mean, std=self.std,
                                         resize_mode=self.resize_mode, interpolation=self.interpolation)

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


def build_tower(arch: dict):
    """An image tower with random weights from an architecture spec: {"open_clip": NAME} for a named
    open_clip model, or {"embed_dim": D, "vision_cfg": {...}} for a custom CLIPVisionCfg."""
    import open_clip
    from open_clip.model import CLIPVisionCfg, _build_vision_tower

    if "open_clip" in arch:
        name = arch["open_clip"]
        if name not in open_clip.list_models():
            raise BackboneError(f"open_clip has no architecture {name!r}")
        return open_clip.create_model(name, pretrained=None).visual
    try:
        return _build_vision_tower(int(arch["embed_dim"]), CLIPVisionCfg(**arch["vision_cfg"]))
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


def _cached_weights(hf_repo: str) -> str | None:
    from huggingface_hub import try_to_load_from_cache

    for filename in HF_WEIGHT_FILES:
        path = try_to_load_from_cache(hf_repo.rstrip("/"), filename)
        if isinstance(path, str):
            return path
    return None


def _require_weights(arch: str, tag: str, hf_repo: str) -> str | None:
    """The cached weights file, or None when it must be downloaded and the hub answers; else raise."""
    from geovote.hub import OfflineError, check_online

    cached = _cached_weights(hf_repo) if hf_repo and "://" not in hf_repo else None
    if cached is None:
        try:
            check_online()
        except OfflineError as e:
            raise BackboneError(f"the weights of {arch}:{tag} (hub repo {hf_repo}) are not in the local "
                                f"cache and cannot be downloaded: {e}") from None
    return cached


def load_pretrained(arch: str, tag: str, name: str | None = None, hf_repo: str | None = None) -> Backbone:
    if hf_repo is not None:  # known up front: fail before paying for the torch import
        _require_weights(arch, tag, hf_repo)
    import open_clip
    from open_clip.pretrained import get_pretrained_cfg

    if arch not in open_clip.list_models():
        raise BackboneError(f"open_clip has no architecture {arch!r} (see open_clip.list_models())")
    cfg = get_pretrained_cfg(arch, tag)
    if not cfg:
        tags = ", ".join(open_clip.list_pretrained_tags_by_model(arch)) or "none"
        raise BackboneError(f"open_clip has no pretrained weights {tag!r} for {arch}; known: {tags}")
    cached = _require_weights(arch, tag, cfg.get("hf_hub", "").rstrip("/") or cfg.get("url", ""))
    pretrained = cached or tag  # a cached file path: open_clip loads it without touching the network
    model = open_clip.create_model(arch, pretrained=pretrained)
    mean = cfg.get("mean") or open_clip.OPENAI_DATASET_MEAN
    std = cfg.get("std") or open_clip.OPENAI_DATASET_STD
    return wrap_tower(name or f"{arch}:{tag}", model.visual, mean, std, {"arch": arch, "pretrained": tag},
                      cfg.get("resize_mode", "shortest"), cfg.get("interpolation", "bicubic"))


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


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
    visual = build_tower(manifest["arch"])
    state = torch.load(weights, map_location="cpu", weights_only=True)
    try:
        visual.load_state_dict({k: v.float() for k, v in state.items()})
    except RuntimeError as e:
        raise BackboneError(f"{weights}: does not fit the architecture in its manifest: {e}") from None
    pre = manifest["preprocessing"]
    # the name changes whenever the weights do, so an index never meets queries from other weights
    name = f"{manifest.get('name', folder.name)}@{_file_sha256(weights)[:12]}"
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


def pixels_backbone(side_px: int) -> Backbone:
    """`pixels:N`: the image itself, N x N x 3, as the embedding (the raw-pixel kNN baseline)."""
    import open_clip
    import torch
    from torch.nn import functional as F

    class Pixels(torch.nn.Module):
        def forward(self, x):
            return F.adaptive_avg_pool2d(x, side_px).flatten(1)

    return Backbone(name=f"pixels:{side_px}", model=Pixels(), image_size=4 * side_px,
                    mean=tuple(open_clip.OPENAI_DATASET_MEAN), std=tuple(open_clip.OPENAI_DATASET_STD),
                    dim=3 * side_px * side_px, source={"pixels": side_px})


def load_backbone(name: str = "default") -> Backbone:
    """The backbone a name stands for (see the module docstring). Raises BackboneError."""
    if name == "default":
        if not (DEFAULT_MODEL_DIR / "manifest.json").is_file():
            raise BackboneError(f"the bundled default model is missing from {DEFAULT_MODEL_DIR}; reinstall "
                                "geovote (it ships as package data) or train it (python -m finetune.train "
                                "--config configs/default_model.toml, see README)")
        return load_checkpoint(DEFAULT_MODEL_DIR)
    if name in ALIASES:
        arch, tag, repo = ALIASES[name]
        return load_pretrained(arch, tag, name=name, hf_repo=repo)
    if name.startswith("random:"):
        return random_backbone(name.split(":", 1)[1])
    if name.startswith("pixels:"):
        try:
            return pixels_backbone(int(name.split(":", 1)[1]))
        except ValueError:
            raise BackboneError(f"pixels:N needs a whole number of pixels, got {name!r}") from None
    path = Path(name)
    if path.is_dir():
        return load_checkpoint(path)
    if ":" in name and not path.exists():
        arch, tag = name.split(":", 1)
        return load_pretrained(arch, tag)
    known = ", ".join(["default", *ALIASES, "ARCH:TAG", "random:ARCH", "pixels:N", "a checkpoint folder"])
    raise BackboneError(f"unknown model {name!r}; expected one of: {known}")
