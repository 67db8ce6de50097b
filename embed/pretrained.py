"""Pretrained open_clip towers, resolved as open_clip resolves them, from the cache, the hub or a file.

    ARCH:TAG              open_clip's pretrained configuration for the pair decides everything it sets:
                          QuickGELU (OpenAI's weights were trained with it: ViT-B-32:openai runs as
                          ViT-B-32-quickgelu), mean, std, interpolation, resize mode; weights from the
                          Hugging Face cache when there, else downloaded by open_clip
    ARCH:/path/file       a local weights file in open_clip's formats (.bin, .pt, .pth, .safetensors);
                          preprocessing from ARCH's own configuration
    hf-hub:ORG/REPO       open_clip's hub syntax: open_clip_config.json and weights from the cache or the hub
    a folder              holding open_clip_config.json and weights (a hub snapshot, `hf download REPO`)

Offline, a missing download fails within seconds with a message naming the repo, the files, the cache
folder looked in, and how to fetch them elsewhere (geovote.hub decides whether the hub can be reached
the way huggingface_hub would: HF_HUB_OFFLINE, HF_ENDPOINT, HTTPS_PROXY).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

# open_clip's weights files on the hub, the preferred first
HF_WEIGHT_FILES = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")
HF_CONFIG_FILE = "open_clip_config.json"
WEIGHT_SUFFIXES = (".bin", ".pt", ".pth", ".safetensors")


class WeightsMissing(Exception):
    """Weights neither cached nor downloadable; the message says how to get them."""


@dataclass
class Resolved:
    """What a pretrained name stands for, before anything heavy is loaded."""

    name: str  # as the user wrote it, or the alias
    arch: str  # open_clip architecture (or `hf-hub:...` / `local-dir:...`)
    tag: str = ""  # pretrained tag, when there is one
    weights: str = ""  # a local file, when known
    hf_repo: str = ""  # where the weights live on the hub
    hf_files: tuple[str, ...] = HF_WEIGHT_FILES
    quick_gelu: bool = False
    preprocess: dict = field(default_factory=dict)  # mean, std, interpolation, resize_mode (from the tag)

    def describe(self) -> str:
        parts = [f"open_clip {self.arch}"] + ([f"tag {self.tag}"] if self.tag else [])
        if self.weights or self.hf_repo:
            parts.append(f"weights {self.weights}" if self.weights else f"hub {self.hf_repo}")
        parts += ["QuickGELU"] if self.quick_gelu else []
        return ", ".join(parts)


def _hub_cache() -> str:
    from huggingface_hub import constants

    return str(constants.HF_HUB_CACHE)


def cached_file(repo: str, files=HF_WEIGHT_FILES) -> str | None:
    """The first of `files` of hub `repo` in the local Hugging Face cache, or None (no network)."""
    from huggingface_hub import try_to_load_from_cache

    for filename in files:
        path = try_to_load_from_cache(repo.rstrip("/"), filename)
        if isinstance(path, str):
            return path
    return None


def resolve_tag(arch: str, tag: str, name: str | None = None) -> Resolved:
    """ARCH:TAG through open_clip's own tables (imports open_clip, not torch's heavy parts)."""
    import open_clip

    if arch not in open_clip.list_models():
        raise ValueError(f"open_clip has no architecture {arch!r} (see open_clip.list_models())")
    cfg = open_clip.get_pretrained_cfg(arch, tag)
    if not cfg:
        tags = ", ".join(open_clip.list_pretrained_tags_by_model(arch)) or "none"
        raise ValueError(f"open_clip has no pretrained weights {tag!r} for {arch}; known: {tags}")
    hub = cfg.get("hf_hub", "")
    repo, filename = os.path.split(hub) if hub else ("", "")
    files = (filename,) if filename else HF_WEIGHT_FILES
    keys = ("mean", "std", "interpolation", "resize_mode")
    preprocess = {k: cfg[k] for k in keys if cfg.get(k) is not None}
    return Resolved(name or f"{arch}:{tag}", arch, tag, hf_repo=repo, hf_files=files,
                    quick_gelu=bool(cfg.get("quick_gelu", False)), preprocess=preprocess)


def resolve_file(arch: str, path: str) -> Resolved:
    import open_clip

    if arch not in open_clip.list_models():
        raise ValueError(f"open_clip has no architecture {arch!r} (see open_clip.list_models())")
    p = Path(path).expanduser()
    if not p.is_file():
        raise ValueError(f"no weights file {p}")
    if p.suffix not in WEIGHT_SUFFIXES:
        raise ValueError(f"{p}: expected an open_clip weights file ({', '.join(WEIGHT_SUFFIXES)})")
    return Resolved(f"{arch}:{p.resolve()}", arch, weights=str(p.resolve()))


def weights_message(r: Resolved, why: str) -> str:
    if HF_CONFIG_FILE in r.hf_files:  # an hf-hub model needs its config and one weights file
        files = f"{HF_CONFIG_FILE} and {' or '.join(f for f in r.hf_files if f != HF_CONFIG_FILE)}"
        fetch = f"{HF_CONFIG_FILE} {HF_WEIGHT_FILES[0]}"
    else:
        files = " or ".join(r.hf_files)
        fetch = r.hf_files[0]
    what = f"{r.name} (open_clip {r.arch}:{r.tag}, " if r.tag else f"{r.name} ("
    return (f"the weights of {what}hub repo {r.hf_repo}, file {files}) are not in the Hugging Face "
            f"cache ({_hub_cache()}) and cannot be downloaded: {why}. On a machine with a network, fetch "
            f"them with `hf download {r.hf_repo} {fetch}` (HF_HOME or HF_HUB_CACHE choose the cache) and "
            f"copy the cache here; or pass the file itself: --model {_quick(r)}:/path/to/{fetch.split()[-1]}")


def _quick(r: Resolved) -> str:
    return r.arch if (not r.quick_gelu or r.arch.endswith("-quickgelu")) else f"{r.arch}-quickgelu"


def locate_weights(r: Resolved) -> str | None:
    """The cached weights file of a tag, None when open_clip must download them (the hub answers),
    or WeightsMissing right away (within seconds) when neither."""
    from geovote.hub import OfflineError, check_online

    if r.weights:
        return r.weights
    cached = cached_file(r.hf_repo, r.hf_files) if r.hf_repo else None
    if cached:
        return cached
    try:
        check_online()
    except OfflineError as e:
        raise WeightsMissing(weights_message(r, str(e))) from None
    return None


def create_tower(r: Resolved):
    """(image tower, preprocessing dict) built as open_clip builds ARCH with TAG (or the file)."""
    import open_clip

    weights = locate_weights(r)
    model = open_clip.create_model(r.arch, pretrained=weights or r.tag or None,
                                   force_quick_gelu=r.quick_gelu)
    pre = dict(getattr(model.visual, "preprocess_cfg", {}) or {})
    pre.update(r.preprocess)  # the tag's own settings win, as in create_model_and_transforms
    return model.visual, pre


def resolve_hub_repo(spec: str) -> Resolved:
    """hf-hub:ORG/REPO."""
    repo = spec.split(":", 1)[1].strip("/")
    if not repo or "/" not in repo:
        raise ValueError(f"{spec!r}: expected hf-hub:ORG/REPO")
    return Resolved(spec, spec, hf_repo=repo)


def create_hub_tower(r: Resolved):
    """A hub repo in open_clip's format (config + weights), from the cache when both are there."""
    import open_clip

    from geovote.hub import OfflineError, check_online

    config = cached_file(r.hf_repo, (HF_CONFIG_FILE,))
    weights = cached_file(r.hf_repo)
    if config and weights:  # all local: open_clip reads the snapshot folder itself
        return create_folder_tower(Path(config).parent)
    try:
        check_online()
    except OfflineError as e:
        r = Resolved(r.name, r.arch, hf_repo=r.hf_repo, hf_files=(HF_CONFIG_FILE, *HF_WEIGHT_FILES))
        raise WeightsMissing(weights_message(r, str(e))) from None
    model = open_clip.create_model(r.arch)
    return model.visual, dict(getattr(model.visual, "preprocess_cfg", {}) or {})


def is_open_clip_folder(path: Path) -> bool:
    return (path / HF_CONFIG_FILE).is_file()


def create_folder_tower(path: Path):
    """A folder holding open_clip_config.json and weights (open_clip's `local-dir:` schema)."""
    import open_clip

    if not any((path / f).is_file() for f in HF_WEIGHT_FILES):
        raise WeightsMissing(f"{path} has {HF_CONFIG_FILE} but no weights file "
                             f"({' or '.join(HF_WEIGHT_FILES)})")
    model = open_clip.create_model(f"local-dir:{path}")
    return model.visual, dict(getattr(model.visual, "preprocess_cfg", {}) or {})
