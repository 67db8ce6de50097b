"""The one feature extractor: the same vectors as the tower itself, failures marked, CUDA when present."""
import numpy as np
import pytest
import torch
from PIL import Image

from embed.features import FeatureExtractor, ImageFiles
from geovote.distributed import pick_device
from embed.models import load_backbone


def _images(n, size=80, seed=0):
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 255, (size, size + 7 * i % 13, 3), np.uint8)) for i in range(n)]


def test_images_equal_the_towers_own_output_normalised():
    bb = load_backbone("random:default")
    imgs = _images(5)
    fx = FeatureExtractor(bb, device="cpu", batch_size=2)  # 3 batches
    got = fx.images(imgs)
    tf = bb.transform()
    with torch.no_grad():
        raw = bb.model.eval()(torch.stack([tf(i) for i in imgs])).numpy().astype(np.float64)
    want = raw / np.linalg.norm(raw, axis=1, keepdims=True)
    assert got.dtype == np.float32 and got.shape == (5, bb.dim)
    np.testing.assert_allclose(got, want, atol=1e-5)
    assert fx.images([]).shape == (0, bb.dim)


def test_dataset_embeds_the_readable_files_and_names_the_rest(tmp_path):
    bb = load_backbone("random:default")
    paths = []
    for i, img in enumerate(_images(4)):
        paths.append(tmp_path / f"{i}.png")
        img.save(paths[-1])
    (tmp_path / "bad.jpg").write_text("not an image")
    paths.insert(2, tmp_path / "bad.jpg")
    fx = FeatureExtractor(bb, device="cpu", batch_size=3)
    out = list(fx.dataset(ImageFiles(paths, fx.transform(), bb.image_size)))
    rows = np.concatenate([r for r, _, _ in out])
    reasons = [why for _, _, rs in out for why in rs]
    emb = np.concatenate([e for _, e, _ in out])
    assert rows.tolist() == [0, 1, 2, 3, 4] and reasons[2] == "not an image PIL can read"
    assert [bool(r) for r in reasons] == [False, False, True, False, False]
    good = [Image.open(p).convert("RGB") for p in paths if p.suffix == ".png"]
    np.testing.assert_allclose(emb, fx.images(good), atol=1e-6)


def test_devices_and_precisions_are_checked():
    bb = load_backbone("random:default")
    with pytest.raises(ValueError, match="precision"):
        FeatureExtractor(bb, device="cpu", precision="fp8")
    assert pick_device() == "cpu"  # no GPU, or GEOVOTE_DEVICE=cpu (the tests set it: see conftest)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="sees no CUDA GPU"):
            pick_device("cuda")
        with pytest.raises(ValueError, match="bf16 is for CUDA"):
            FeatureExtractor(bb, device="cpu", precision="bf16")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_engine_embeds_and_searches_on_the_gpu(tiny_engine, sample_root):
    """On a GPU the engine embeds with bf16 autocast and searches exactly on the GPU; its answers match
    the CPU engine's to bf16 rounding."""
    from embed.images import open_rgb
    from retrieve.engine import Engine

    gpu, cpu = Engine(tiny_engine / "index", device="cuda"), Engine(tiny_engine / "index", device="cpu")
    assert gpu.features.device.startswith("cuda") and gpu.features.bf16 and gpu.index.device.startswith("cuda")
    imgs = [open_rgb(p, 32) for p in sorted((sample_root / "images" / "test").rglob("*.jpg"))[:64]]
    e_gpu, e_cpu = gpu.embed_images(imgs), cpu.embed_images(imgs)
    assert np.min(np.sum(e_gpu * e_cpu, axis=1)) > 0.99  # cosine: bf16 against fp32
    r_gpu, r_cpu = gpu.search(e_cpu, 10), cpu.search(e_cpu, 10)
    np.testing.assert_allclose(r_gpu.similarity, r_cpu.similarity, atol=2e-3)  # fp16 matmul on the GPU
