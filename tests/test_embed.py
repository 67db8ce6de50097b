"""The embedding stage: backbones by name, image decoding, shards, failures, resume, torchrun, index."""
import csv
import re
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from embed.build import main as embed_main
from embed.images import ImageFailure, open_rgb, to_rgb
from embed.models import BackboneError, load_backbone
from geovote.shards import read_manifest, read_shard, shard_paths
from index.search import GeoIndex

ROOT = Path(__file__).resolve().parents[1]
def test_checkpoint_round_trip(tiny_model):
    import torch

    a, b = load_backbone(str(tiny_model)), load_backbone(str(tiny_model))
    assert a.name.startswith("tiny@") and a.name == b.name and a.dim == 16 and a.image_size == 32
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(a.model(x), b.model(x))
    assert a.preprocessing()["mean"] == [0.5, 0.5, 0.5]


def test_bad_model_names_are_refused(tmp_path):
    with pytest.raises(BackboneError, match="unknown model 'nope'"):
        load_backbone("nope")
    with pytest.raises(BackboneError, match="no pretrained weights 'nonexistent' for ViT-B-32; known: .*openai"):
        load_backbone("ViT-B-32:nonexistent")
    with pytest.raises(BackboneError, match="no architecture 'NoSuchNet'"):
        load_backbone("random:NoSuchNet")
    (tmp_path / "manifest.json").write_text("{}")
    with pytest.raises(BackboneError, match="not a geovote-checkpoint"):
        load_backbone(str(tmp_path))


def test_every_image_mode_becomes_rgb(tmp_path):
    rgb = Image.new("RGB", (40, 30), (200, 100, 50))
    assert to_rgb(rgb.convert("CMYK")).getpixel((0, 0)) == pytest.approx((200, 100, 50), abs=3)
    assert to_rgb(rgb.convert("L")).mode == "RGB"
    rgba = Image.new("RGBA", (4, 4), (0, 0, 0, 0))  # fully transparent: white, not black
    assert to_rgb(rgba).getpixel((0, 0)) == (255, 255, 255)
    g16 = Image.fromarray(np.full((8, 8), 65535, np.uint16))  # 16-bit white must stay white
    assert to_rgb(g16).getpixel((0, 0)) == (255, 255, 255)
    g16.save(tmp_path / "g16.png")
    assert open_rgb(tmp_path / "g16.png", 8).getpixel((3, 3)) == (255, 255, 255)
    assert to_rgb(rgb.convert("P")).mode == "RGB"


def test_bad_files_become_reasons_and_big_jpegs_decode_small(tmp_path):
    big = Image.fromarray(np.random.default_rng(0).integers(0, 255, (1600, 2400, 3), np.uint8))
    big.save(tmp_path / "big.jpg", quality=90)
    img = open_rgb(tmp_path / "big.jpg", 64)
    assert img.size == (300, 200)  # 1/8 scale: both sides still >= 64
    data = (tmp_path / "big.jpg").read_bytes()
    (tmp_path / "trunc.jpg").write_bytes(data[: len(data) // 3])
    with pytest.raises(ImageFailure, match="unreadable"):
        open_rgb(tmp_path / "trunc.jpg", 64)
    (tmp_path / "text.jpg").write_text("not a picture")
    with pytest.raises(ImageFailure, match="not an image"):
        open_rgb(tmp_path / "text.jpg", 64)
    with pytest.raises(ImageFailure, match="too large: 2400x1600"):
        open_rgb(tmp_path / "big.jpg", 2000, max_pixels=1_000_000)
    with pytest.raises(ImageFailure, match="file not found"):
        open_rgb(tmp_path / "none.jpg", 64)


def _dataset_with_bad_images(sample_root, dest):
    """A copy of the small sample's train split with 5 odd images: 2 unreadable, 3 convertible."""
    dest.mkdir()
    shutil.copy(sample_root / "train.csv", dest / "train.csv")
    shutil.copytree(sample_root / "images" / "train", dest / "images" / "train")
    with open(dest / "train.csv") as f:
        ids = [row["id"] for row in csv.DictReader(f)]
    path = {p.stem: p for p in (dest / "images" / "train").rglob("*.jpg")}
    data = path[ids[3]].read_bytes()
    path[ids[3]].write_bytes(data[: len(data) // 2])  # truncated
    path[ids[10]].write_text("html error page")  # not an image
    Image.open(path[ids[20]]).convert("CMYK").save(path[ids[20]], format="JPEG")
    Image.open(path[ids[30]]).convert("RGBA").save(path[ids[30]], format="PNG")
    arr = np.asarray(Image.open(path[ids[40]]).convert("L"), np.uint16) * 257
    Image.fromarray(arr).save(path[ids[40]], format="PNG")
    return ids, {ids[3]: "unreadable", ids[10]: "not an image"}


@pytest.mark.slow
def test_embed_build_end_to_end(sample_root, tiny_model, tmp_path, capsys):
    ids, bad = _dataset_with_bad_images(sample_root, tmp_path / "data")
    out = tmp_path / "out"
    assert embed_main(["--data", str(tmp_path / "data"), "--model", str(tiny_model), "--out", str(out),
                       "--workers", "0", "--set", "shard_rows=700", "--batch-size", "64"]) == 0
    printed = capsys.readouterr().out
    assert "1,998 images embedded, 2 failed (1 not an image PIL can read, 1 unreadable)" in printed
    shards = out / "embeddings" / "train"
    assert len(shard_paths(shards)) == 3
    manifest = read_manifest(shards)
    assert manifest["rows"] == 1998 and manifest["failures"] == 2 and manifest["dim"] == 16
    assert manifest["backbone"].startswith("tiny@") and manifest["preprocessing"]["image_size"] == 32
    assert manifest["config"]["shard_rows"] == 700 and manifest["code_version"]
    with open(shards / "failures.csv") as f:
        failures = {r["id"]: r["reason"] for r in csv.DictReader(f)}
    assert failures.keys() == bad.keys() and all(failures[k].startswith(v) for k, v in bad.items())
    got = [read_shard(p) for p in shard_paths(shards)]
    got_ids = np.concatenate([s.ids for s in got])
    assert list(got_ids) == [i for i in ids if i not in bad]  # every valid row once, in CSV order
    emb = np.concatenate([s.embedding for s in got]).astype(np.float32)
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1, atol=2e-3)
    with open(tmp_path / "data" / "train.csv") as f:
        truth = {r["id"]: (float(r["latitude"]), float(r["longitude"])) for r in csv.DictReader(f)}
    lat = np.concatenate([s.lat_deg for s in got])
    assert all(truth[i][0] == la for i, la in zip(got_ids, lat))
    # the index over them finds each training image at similarity 1 (a random 16-d model has ties)
    idx = GeoIndex(out / "index")
    assert idx.count == 1998 and idx.backbone == manifest["backbone"]
    res = idx.search(emb[:50], k=10, backbone=manifest["backbone"])
    assert np.all(res.similarity[:, 0] > 0.999)
    assert all(truth[i][0] == la for i, la in zip(res.ids.ravel(), res.lat_deg.ravel()))
    # a rerun is a no-op that changes nothing
    before = {p.name: p.stat().st_mtime_ns for p in shards.glob("shard-*.parquet")}
    assert embed_main(["--data", str(tmp_path / "data"), "--model", str(tiny_model), "--out", str(out),
                       "--workers", "0", "--set", "shard_rows=700", "--set", "index=false"]) == 0
    assert {p.name: p.stat().st_mtime_ns for p in shards.glob("shard-*.parquet")} == before
    # another model into the same folder is refused, naming what differs
    other = tmp_path / "other"
    shutil.copytree(tiny_model, other)
    manifest_other = json.loads((other / "manifest.json").read_text())
    manifest_other["name"] = "other"
    (other / "manifest.json").write_text(json.dumps(manifest_other))
    assert embed_main(["--data", str(tmp_path / "data"), "--model", str(other), "--out", str(out),
                       "--workers", "0", "--set", "shard_rows=700"]) == 2
    assert "different backbone" in capsys.readouterr().err


def _embed_cmd(data, model, out, extra=()):
    return [sys.executable, "-m", "embed.build", "--data", str(data), "--model", str(model), "--out", str(out),
            "--workers", "0", "--batch-size", "50", "--set", "shard_rows=200", "--set", "index=false", *extra]


@pytest.mark.slow
def test_a_killed_run_resumes_without_losing_or_repeating_rows(sample_root, tiny_model, tmp_path):
    out = tmp_path / "killed"
    shards = out / "embeddings" / "train"
    proc = subprocess.Popen(_embed_cmd(sample_root, tiny_model, out, ["--set", "pause_s=0.05"]), cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and len(list(shards.glob("shard-*.parquet"))) < 2:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    n_before = len(list(shards.glob("shard-*.parquet")))
    assert 2 <= n_before < 10  # killed midway, with work done and work left
    assert not (shards / "manifest.json").exists()
    r = subprocess.run(_embed_cmd(sample_root, tiny_model, out), cwd=ROOT, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr
    assert f"resuming, {n_before} of 10 shards already done" in r.stdout
    clean = tmp_path / "clean"
    subprocess.run(_embed_cmd(sample_root, tiny_model, clean), cwd=ROOT, check=True, capture_output=True,
                   timeout=300)
    a = [read_shard(p) for p in shard_paths(shards)]
    b = [read_shard(p) for p in shard_paths(clean / "embeddings" / "train")]
    assert list(np.concatenate([s.ids for s in a])) == list(np.concatenate([s.ids for s in b]))
    assert len(np.concatenate([s.ids for s in a])) == 2000
    np.testing.assert_allclose(np.concatenate([s.embedding for s in a]).astype(np.float32),
                               np.concatenate([s.embedding for s in b]).astype(np.float32), atol=1e-3)


@pytest.mark.slow
def test_torchrun_two_ranks_split_the_shards(sample_root, tiny_model, tmp_path):
    """2 gloo ranks share the shards; rank 0 then indexes and tunes alone, for longer than the process
    group's timeout (here 0.6 s): rank 1 has left instead of waiting, so nothing times out."""
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", "29561",
           *_embed_cmd(sample_root, tiny_model, out)[1:], "--set", "dist_timeout_min=0.01"]
    cmd[cmd.index("index=false")] = "index=true"
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    shards = out / "embeddings" / "train"
    manifest = read_manifest(shards)
    assert manifest["rows"] == 2000 and manifest["n_shards"] == 10
    ids = np.concatenate([read_shard(p).ids for p in shard_paths(shards)])
    assert len(set(ids)) == 2000
    assert GeoIndex(out / "index").count == 2000
    assert (out / "index" / "retrieve.json").exists()  # tuned, by rank 0 alone
    alone = re.search(r"rank 0 indexed and tuned alone in ([0-9.]+) s", r.stdout)
    assert alone and float(alone.group(1)) > 0.6  # the rank-0 phase outlasted the timeout


def test_pixels_baseline_backbone():
    import torch

    bb = load_backbone("pixels:16")
    assert bb.name == "pixels:16" and bb.dim == 768 and bb.image_size == 64
    x = torch.zeros(1, 3, 64, 64)
    x[:, 0, :32] = 1.0  # top half red
    out = bb.model(x)
    assert out.shape == (1, 768)
    assert out[0, :128].sum() == 128 and out[0, 128:256].sum() == 0  # the top 8 of 16 rows
    with pytest.raises(BackboneError, match="whole number"):
        load_backbone("pixels:x")


def test_projected_pixels_keep_the_pixels_geometry_at_any_width():
    """pixels:N@D: the pixels through a fixed random projection; cosines of the projected vectors are the
    raw pixels' cosines to within the projection's error (about 1 / sqrt(D)), and the same every load."""
    import torch

    raw, wide = load_backbone("pixels:4"), load_backbone("pixels:4@4096")
    assert wide.name == "pixels:4@4096" and wide.dim == 4096 and wide.image_size == raw.image_size
    torch.manual_seed(0)
    base = torch.rand(1, 3, 16, 16)
    x = base + 0.3 * torch.rand(12, 3, 16, 16)  # images alike in part: cosines spread over (0, 1)
    a, b = raw.model(x), wide.model(x)
    cos = lambda v: torch.nn.functional.normalize(v, dim=1) @ torch.nn.functional.normalize(v, dim=1).T  # noqa: E731
    assert (cos(a) - cos(b)).abs().max() < 4 / 4096 ** 0.5
    torch.testing.assert_close(load_backbone("pixels:4@4096").model(x), b)  # a fixed projection
    assert load_backbone("pixels:8@512").dim == 512
    with pytest.raises(BackboneError, match="at least 1"):
        load_backbone("pixels:4@0")


@pytest.mark.parametrize("size", [(64, 64), (80, 50), (50, 97), (513, 384), (33, 31)])
def test_our_preprocessing_equals_open_clip(size):
    import open_clip
    import torch

    from embed.models import ShortestSideTransform

    img = Image.fromarray(np.random.default_rng(size[0]).integers(0, 255, (size[1], size[0], 3), np.uint8))
    mean, std = open_clip.OPENAI_DATASET_MEAN, open_clip.OPENAI_DATASET_STD
    ref = open_clip.image_transform(64, is_train=False, mean=mean, std=std, resize_mode="shortest",
                                    interpolation="bicubic")(img)
    ours = ShortestSideTransform(64, mean, std, "bicubic")(img)
    assert ours.shape == ref.shape == (3, 64, 64)
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=0)


def test_pixel_backbones_use_open_clips_normalisation_without_importing_it():
    """pixels:N (the rehearsals' model) normalises as open_clip's OpenAI towers do, from our own copy of
    the constants: equal to open_clip's, to the last digit."""
    import open_clip

    from embed.models import _OPENAI_MEAN_STD, load_backbone

    bb = load_backbone("pixels:8")
    assert bb.mean == tuple(open_clip.OPENAI_DATASET_MEAN) == tuple(_OPENAI_MEAN_STD["mean"])
    assert bb.std == tuple(open_clip.OPENAI_DATASET_STD) == tuple(_OPENAI_MEAN_STD["std"])
