"""The embedding stage's second decode path (embed.gpudecode, `decode = "torchvision"`), run here on the
CPU (the same code decodes with nvjpeg on CUDA): the same images embedded and the same failures as the
PIL path, embeddings within the resize filters' difference of it (cosine), and never mixed with the PIL
path's in one run."""
import numpy as np
import pytest
from PIL import Image

from embed.models import load_backbone
from embed.split import EmbedConfig, embed_split
from geovote.data import read_split
from geovote.shards import read_embeddings


def _street_view_dataset(sample_root, out, n=24):
    """n test images re-encoded at 512x384 (one at 384x512), plus a PNG, a greyscale and a CMYK JPEG,
    a truncated JPEG and a text file named .jpg: (root, ids of the images that should fail)."""
    split = read_split(sample_root, "test")
    ids = list(split.ids.astype(str)[:n])
    folder = out / "images" / "test"
    folder.mkdir(parents=True)
    for k, (i, path) in enumerate(zip(ids, split.image_paths()[:n])):
        img = Image.open(path).convert("RGB").resize((384, 512) if k == 1 else (512, 384), Image.BICUBIC)
        if k == 2:
            img.save(folder / f"{i}.jpg", format="PNG")  # a PNG named .jpg: nvjpeg refuses it, PIL reads it
        elif k == 3:
            img.convert("L").save(folder / f"{i}.jpg", quality=90)
        elif k == 4:
            img.convert("CMYK").save(folder / f"{i}.jpg", quality=90)
        else:
            img.save(folder / f"{i}.jpg", quality=90)
    data = (folder / f"{ids[5]}.jpg").read_bytes()
    (folder / f"{ids[5]}.jpg").write_bytes(data[: len(data) // 3])  # truncated
    (folder / f"{ids[6]}.jpg").write_text("not an image")
    lat, lon = split.lat_deg[:n], split.lon_deg[:n]
    (out / "test.csv").write_text("id,latitude,longitude\n" + "".join(
        f"{i},{float(a)!r},{float(o)!r}\n" for i, a, o in zip(ids, lat, lon)))
    return out, {ids[5], ids[6]}


def _embed(root, model, out, decode, workers=0):
    cfg = EmbedConfig(model=model, batch_size=8, workers=workers, shard_rows=64, decode=decode)
    embed_split(read_split(root, "test"), load_backbone(model), out, cfg, root, log=lambda *a: None)
    return read_embeddings(out)


def _failures(folder):
    import csv

    with open(folder / "failures.csv", newline="") as f:
        return {r["id"]: r["reason"] for r in csv.DictReader(f)}


@pytest.mark.parametrize("model, n, min_cos", [("default", 24, 0.995), ("random:ViT-B-32", 10, 0.995)])
def test_device_decode_embeds_what_pil_embeds(sample_root, tmp_path, model, n, min_cos):
    root, bad = _street_view_dataset(sample_root, tmp_path / "data", n)
    pil = _embed(root, model, tmp_path / "pil", "pil")
    dev = _embed(root, model, tmp_path / "tv", "torchvision", workers=2 if model == "default" else 0)
    assert list(pil.ids) == list(dev.ids) and len(dev.ids) == n - 2
    assert set(_failures(tmp_path / "pil")) == set(_failures(tmp_path / "tv")) == bad
    cos = np.sum(pil.embedding.astype(np.float32) * dev.embedding.astype(np.float32), axis=1)
    assert cos.min() >= min_cos, cos
    # and not the same vectors by accident: another image's embedding is further away
    other = np.sum(pil.embedding[:-1].astype(np.float32) * dev.embedding[1:].astype(np.float32), axis=1)
    assert np.median(other) < cos.min()


def test_both_paths_refuse_the_same_images_and_a_batch_is_one_tensor(sample_root, tmp_path):
    """The pixel limit is the PIL path's (after reduced-size decoding): a 512x384 JPEG with a limit of
    20,000 pixels is embedded by both (the 64 px model decodes it at 128x96); and a batch's bytes come
    from its worker as one tensor, not one per image (a file descriptor each, by default)."""
    from embed.gpudecode import EncodedImages

    root, bad = _street_view_dataset(sample_root, tmp_path / "data", 10)
    png = str(read_split(root, "test").ids[2])  # no reduced-size decoding for a PNG: 196,608 pixels
    for decode in ("pil", "torchvision"):
        cfg = EmbedConfig(model="default", batch_size=8, workers=0, shard_rows=64, decode=decode,
                          max_pixels=20_000)
        embed_split(read_split(root, "test"), load_backbone("default"), tmp_path / decode, cfg, root,
                    log=lambda *a: None)
        failures = _failures(tmp_path / decode)
        assert set(failures) == bad | {png} and failures[png].startswith("too large: 512x384")
    ds = EncodedImages(read_split(root, "test").image_paths(), 64)
    rows, (flat, lengths, pixels), reasons = EncodedImages.collate([ds[i] for i in range(len(ds))])
    assert flat.ndim == 1 and int(lengths.sum()) == len(flat) and pixels[0] == 512 * 384
    # the text file is refused from its header; the truncated JPEG only when it is decoded
    assert [i for i, r in enumerate(reasons) if r] == [6] and reasons[6] == "not an image PIL can read"


def test_the_device_preprocessing_matches_the_pil_transform(sample_root):
    """The same decoded pixels through DevicePreprocess and ShortestSideTransform: only the resize
    filter's implementation differs (a level or two of 255 where edges are), never the crop or scale."""
    import torch

    from embed.gpudecode import DevicePreprocess

    bb = load_backbone("random:ViT-B-32")
    tf, prep = bb.transform(), DevicePreprocess(bb, "cpu")
    path = read_split(sample_root, "test").image_paths()[0]
    for size in [(512, 384), (384, 512), (224, 224), (300, 224), (100, 80)]:
        img = Image.open(path).convert("RGB").resize(size, Image.BICUBIC)
        a = tf(img)
        b = prep._prepare(torch.from_numpy(np.asarray(img).transpose(2, 0, 1).copy()))
        assert a.shape == b.shape == (3, 224, 224)
        diff_levels = ((a - b) * torch.tensor(bb.std)[:, None, None] * 255).abs()
        assert diff_levels.mean() < 1.0 and diff_levels.max() <= 12, (size, diff_levels.mean(), diff_levels.max())
        if size == (224, 224):  # nothing resized: the same numbers
            torch.testing.assert_close(a, b, atol=1e-6, rtol=0)


def test_a_run_never_mixes_the_two_decode_paths(sample_root, tmp_path):
    from embed.split import plan_for

    root, _ = _street_view_dataset(sample_root, tmp_path / "data", 10)
    split, bb = read_split(root, "test"), load_backbone("default")
    assert "decode" not in plan_for(split, bb, EmbedConfig(), root)  # plans from before the option match
    assert plan_for(split, bb, EmbedConfig(decode="torchvision"), root)["decode"] == "torchvision"
    _embed(root, "default", tmp_path / "emb", "pil")
    from geovote.data import DataError

    with pytest.raises(DataError, match="different decode"):
        _embed(root, "default", tmp_path / "emb", "torchvision")
    from geovote.config import ConfigError

    with pytest.raises(ConfigError, match="decode must be one of pil, pil-full, torchvision"):
        EmbedConfig(decode="nvjpeg")


def test_the_full_size_pil_path_is_the_plain_decode_exactly(sample_root, tmp_path):
    """decode = "pil-full": every JPEG decoded at full size, as a plain PIL open + convert would, to the
    bit; the default's reduced-size decoding differs (the images are 512x384 and the model's input 64)."""
    import torch

    from embed.features import FeatureExtractor

    root, bad = _street_view_dataset(sample_root, tmp_path / "data", 10)
    full = _embed(root, "default", tmp_path / "full", "pil-full")
    reduced = _embed(root, "default", tmp_path / "reduced", "pil")
    bb = load_backbone("default")
    fx = FeatureExtractor(bb, device="cpu")
    split = read_split(root, "test")
    keep = [i for i, k in enumerate(split.ids.astype(str)) if k not in bad]
    tf = bb.transform()
    plain = fx(torch.stack([tf(Image.open(split.image_paths()[i]).convert("RGB")) for i in keep]))
    np.testing.assert_array_equal(full.embedding, plain.astype(np.float16))
    assert not np.array_equal(reduced.embedding, full.embedding)
