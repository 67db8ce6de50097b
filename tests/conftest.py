"""Shared fixtures: a small bundled sample, generated once per test session (about a second)."""
from __future__ import annotations

import pytest

from geovote.bundled_sample import generate

SMALL = {"n_train": 2000, "n_val": 200, "n_test": 200, "seed": 0}


@pytest.fixture(scope="session")
def sample_root(tmp_path_factory):
    return generate(tmp_path_factory.mktemp("data") / "sample", quiet=True, **SMALL)


TINY_ARCH = {"embed_dim": 16, "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 32, "layers": 1,
                                             "head_width": 16}}


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    """A checkpoint folder with a tiny random ViT: the code path of every finetune checkpoint."""
    import torch

    from embed.models import build_tower, save_checkpoint, wrap_tower

    torch.manual_seed(0)
    bb = wrap_tower("tiny", build_tower(TINY_ARCH), (0.5, 0.5, 0.5), (0.25, 0.25, 0.25), {})
    return save_checkpoint(tmp_path_factory.mktemp("models") / "tiny", bb, TINY_ARCH, "tiny", {"base": "test"})


@pytest.fixture(scope="session")
def tiny_engine(sample_root, tiny_model, tmp_path_factory):
    """The small sample indexed by `embed.build` with the tiny model (train + val embedded, tuned)."""
    from embed.build import main as embed_main

    out = tmp_path_factory.mktemp("tiny-engine")
    assert embed_main(["--data", str(sample_root), "--model", str(tiny_model), "--out", str(out),
                       "--workers", "0"]) == 0
    return out
