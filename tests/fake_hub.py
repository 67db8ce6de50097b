"""Builds fake Hugging Face caches and open_clip folders with random weights in real architectures, and
compares geovote's towers with open_clip's own on them. Run as a script by tests/test_models.py, in a
process whose HF_HOME points at the fake cache (huggingface_hub reads it at import).

    python tests/fake_hub.py OUT_JSON
"""
import json
import os
import sys
from pathlib import Path

import numpy as np
import open_clip
import torch
from PIL import Image

ARCH = "ViT-B-32-quickgelu"
REPO = "timm/vit_base_patch32_clip_224.openai"


def cache_file(repo: str, filename: str) -> Path:
    """Where huggingface_hub keeps `filename` of model `repo` (one snapshot, refs/main naming it)."""
    base = Path(os.environ["HF_HOME"]) / "hub" / f"models--{repo.replace('/', '--')}"
    (base / "refs").mkdir(parents=True, exist_ok=True)
    (base / "refs" / "main").write_text("0" * 40)
    path = base / "snapshots" / ("0" * 40) / filename
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def random_weights() -> dict:
    """A random ViT-B-32 CLIP whose MLPs weigh in, with pre-activations around -1 where GELU and
    QuickGELU differ most: the two towers then agree only to cosine ~0.994 (at init, 0.99996: the wrong
    activation would hide; measured when this was written)."""
    torch.manual_seed(0)
    model = open_clip.create_model(ARCH, pretrained=None)
    with torch.no_grad():
        for block in model.visual.transformer.resblocks:
            block.mlp.c_fc.weight.mul_(2.0)
            block.mlp.c_fc.bias.sub_(1.0)
            block.mlp.c_proj.weight.mul_(10.0)
    return {k: v.half() for k, v in model.state_dict().items()}


def images(n: int = 6) -> list:
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 255, (180 + 13 * i, 240, 3), np.uint8)) for i in range(n)]


def open_clip_embeddings(name: str, pretrained: str | None) -> np.ndarray:
    model, _, preprocess = open_clip.create_model_and_transforms(name, pretrained=pretrained)
    model.eval()
    with torch.no_grad():
        e = model.encode_image(torch.stack([preprocess(i) for i in images()])).float()
    return torch.nn.functional.normalize(e, dim=1).numpy()


def ours(name: str):
    from embed.features import FeatureExtractor
    from embed.models import load_backbone

    bb = load_backbone(name)
    act = type(bb.model.transformer.resblocks[0].mlp.gelu).__name__
    return bb, act, FeatureExtractor(bb, device="cpu").images(images())


def main(out: str) -> None:
    weights = random_weights()
    torch.save(weights, cache_file(REPO, "open_clip_pytorch_model.bin"))
    reference = open_clip_embeddings(ARCH, "openai")
    gelu = open_clip_embeddings("ViT-B-32", "openai")  # open_clip's own path with the plain name: GELU
    result = {"gelu_vs_quickgelu": float(np.min(np.sum(reference * gelu, 1)))}
    bb, act, e = ours("vit-b-32-openai")
    result["alias"] = {"activation": act, "cosine": float(np.min(np.sum(reference * e, 1))), "name": bb.name,
                       "image_size": bb.image_size, "mean": list(bb.mean), "interpolation": bb.interpolation}
    path = cache_file(REPO, "open_clip_pytorch_model.bin")
    bb, act, e = ours(f"{ARCH}:{path}")
    result["file"] = {"activation": act, "cosine": float(np.min(np.sum(reference * e, 1))), "name": bb.name}
    # an open_clip folder (what `hf download` leaves), and the same on the hub as hf-hub:ORG/REPO
    config = {"model_cfg": open_clip.get_model_config(ARCH),
              "preprocess_cfg": {k: v for k, v in open_clip.get_pretrained_cfg(ARCH, "openai").items()
                                 if k in ("mean", "std", "interpolation", "resize_mode")}}
    folder = Path(os.environ["HF_HOME"]).parent / "snapshot"
    folder.mkdir(exist_ok=True)
    (folder / "open_clip_config.json").write_text(json.dumps(config))
    torch.save(weights, folder / "open_clip_pytorch_model.bin")
    bb, act, e = ours(str(folder))
    result["folder"] = {"activation": act, "cosine": float(np.min(np.sum(reference * e, 1))), "name": bb.name}
    cache_file("geovote-test/street-clip", "open_clip_config.json").write_text(json.dumps(config))
    torch.save(weights, cache_file("geovote-test/street-clip", "open_clip_pytorch_model.bin"))
    bb, act, e = ours("hf-hub:geovote-test/street-clip")
    result["hf_hub"] = {"activation": act, "cosine": float(np.min(np.sum(reference * e, 1))), "name": bb.name}
    Path(out).write_text(json.dumps(result))


if __name__ == "__main__":
    main(sys.argv[1])
