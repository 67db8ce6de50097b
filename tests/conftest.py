"""Shared fixtures: a small bundled sample, generated once per test session (about a second); every
test runs in a temporary working folder with GEOVOTE_DATA inside it, so no default path (./data,
./runs) can be written in the checkout; and on the CPU (GEOVOTE_DEVICE=cpu), so that exact comparisons
hold on a GPU machine too: the CUDA tests ask for their device by name."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from geovote.bundled_sample import generate

ROOT = Path(__file__).resolve().parents[1]


SKIP_DIRS = {".git", ".venv", "__pycache__", ".pytest_cache", ".gpu-wheels"}


def _checkout_files() -> set[str]:
    out = set()
    for folder, dirs, files in os.walk(ROOT):
        dirs[:] = [d for d in dirs if d not in SKIP_DIRS and not d.endswith(".egg-info")]
        out.update(os.path.relpath(os.path.join(folder, f), ROOT) for f in files)
    return out


@pytest.fixture(scope="session", autouse=True)
def _outside_the_checkout(tmp_path_factory):
    work = tmp_path_factory.mktemp("cwd")
    before = _checkout_files()
    saved = {k: os.environ.get(k) for k in ("GEOVOTE_DATA", "GEOVOTE_DEVICE")}
    old_cwd = os.getcwd()
    os.chdir(work)
    os.environ["GEOVOTE_DATA"] = str(work / "data")
    os.environ["GEOVOTE_DEVICE"] = "cpu"
    yield work
    os.chdir(old_cwd)
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    new = sorted(_checkout_files() - before)
    assert not new, f"tests wrote {len(new)} files into the checkout, e.g. {new[:5]}"


SMALL = {"n_train": 2000, "n_val": 200, "n_test": 200, "n_test_far": 100, "n_val_far": 100, "seed": 0}


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
