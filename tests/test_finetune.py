"""finetune: each objective trains, a resumed run equals an uninterrupted one, validation agrees with the
engine, torchrun splits the batches, checkpoints load."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from embed.models import load_backbone
from finetune.train import main as train_main
from finetune.trainer import TrainConfig, supcon_loss, train
from geovote.cells import QuadTree
from finetune.heads import CellGeometry, CellHead, RegressionHead, unit_targets

ROOT = Path(__file__).resolve().parents[1]
TINY = json.dumps({"embed_dim": 16, "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 32, "layers": 1,
                                                   "head_width": 16}})


def _cfg(sample_root, out, **kw):
    base = dict(data=str(sample_root), arch=TINY, epochs=1, batch_size=128, workers=0, warmup_steps=2,
                out=str(out), quadtree_max_points=200, lr=3e-3, val_grid="small")
    return TrainConfig(**{**base, **kw})


@pytest.mark.parametrize("weights", [dict(hybrid_weight=1.0, retrieval_weight=0.0, region_weight=0.0),
                                     dict(hybrid_weight=0.0, retrieval_weight=1.0, region_weight=0.0,
                                          views=2, rotate_deg=180.0, zoom=0.25),
                                     dict(hybrid_weight=0.0, retrieval_weight=0.0, region_weight=1.0)])
def test_each_objective_changes_the_tower_and_writes_a_loadable_checkpoint(sample_root, tmp_path, weights):
    out = tmp_path / "run"
    state = train(_cfg(sample_root, out, **weights), log=lambda *_: None)
    assert state["epoch"] == 1 and len(state["history"]) == 1
    assert np.isfinite(state["history"][0]["loss"])
    bb = load_backbone(str(out / "best"))
    manifest = json.loads((out / "best" / "manifest.json").read_text())
    assert manifest["config"]["views"] == weights.get("views", 1)
    assert manifest["objectives"] == {"hybrid": weights["hybrid_weight"], "region": weights["region_weight"],
                                      "retrieval": weights["retrieval_weight"]}
    assert manifest["epochs"] == 1 and manifest["val_geoscore"] == pytest.approx(state["best"])
    torch.manual_seed(0)  # the same seed builds the same initial tower: training must have moved it
    from embed.models import build_tower

    init = build_tower(json.loads(TINY))
    moved = [not torch.equal(a, b.float()) for a, b in zip(init.state_dict().values(),
                                                             bb.model.state_dict().values())]
    assert any(moved)


@pytest.mark.slow
def test_validation_geoscore_is_the_engines_tuned_score_on_val(sample_root, tmp_path):
    """finetune's per-epoch validation scores val as the engine built from its checkpoint does: embed.build
    tunes that engine on val (retrieve.json), and validation_score on the engine's own fp16 embeddings
    finds the same neighbours (one exact search, ties and all), the same settings and the same GeoScore
    to the bit; finetune's own embeddings are those to fp16 rounding, and its recorded score and settings
    are validation_score's on them."""
    from dataclasses import asdict

    from embed.build import main as embed_main
    from embed.features import FeatureExtractor, ImageFiles
    from finetune.trainer import validation_score
    from geovote.data import read_split
    from geovote.shards import read_embeddings
    from retrieve.embedded import embed_for_eval
    from retrieve.engine import Engine
    from retrieve.tuning import Gallery

    state = train(_cfg(sample_root, tmp_path / "run", val_grid="full"), log=lambda *_: None)
    engine_dir = tmp_path / "engine"
    assert embed_main(["--data", str(sample_root), "--model", str(tmp_path / "run" / "best"), "--out",
                       str(engine_dir), "--workers", "0"]) == 0
    engine = Engine(engine_dir / "index")
    tuned = json.loads((engine_dir / "index" / "retrieve.json").read_text())
    _, lat, lon, val16 = embed_for_eval(engine, sample_root, "val", workers=0, log=lambda *_: None)
    train16 = read_embeddings(engine_dir / "embeddings" / "train")
    gallery = Gallery(train16.embedding, train16.lat_deg, train16.lon_deg)
    np.testing.assert_array_equal(gallery.search(val16, 50).rows, engine.search(val16, 50).rows)
    score16, params16 = validation_score(train16.embedding, train16.lat_deg, train16.lon_deg, val16, lat, lon)
    assert score16 == tuned["validation"]["voting"]["geoscore"]
    grid_keys = ("k", "temperature", "cells", "levels", "bandwidth_km")
    assert {key: asdict(params16)[key] for key in grid_keys} == {
        key: tuple(v) if isinstance(v, list) else v for key, v in tuned["grid_best"].items() if key in grid_keys}

    fx = FeatureExtractor(load_backbone(str(tmp_path / "run" / "best")), device="cpu")
    fp32 = {}
    for name in ("train", "val"):
        split = read_split(sample_root, name)
        fp32[name] = np.concatenate([e for _, e, _ in fx.dataset(ImageFiles(split.image_paths(), fx.transform(),
                                                                             fx.backbone.image_size))])
    np.testing.assert_allclose(fp32["train"], train16.embedding, atol=2e-3)
    np.testing.assert_allclose(fp32["val"], val16, atol=2e-3)
    score32, params32 = validation_score(fp32["train"], train16.lat_deg, train16.lon_deg, fp32["val"], lat, lon)
    assert state["history"][0]["val_geoscore"] == pytest.approx(score32, rel=1e-9)
    assert state["history"][0]["val_vote"] == {key: asdict(params32)[key] for key in grid_keys}


def test_command_and_bad_config(sample_root, tmp_path, capsys):
    assert train_main(["--set", f"data={json.dumps(str(sample_root))}", "--set", f"arch={json.dumps(TINY)}",
                       "--set", "epochs=1", "--set", "workers=0", "--set", f"out={json.dumps(str(tmp_path))}",
                       "--set", "quadtree_max_points=200"]) == 0
    assert "best validation GeoScore" in capsys.readouterr().out
    assert train_main(["--set", "train=half"]) == 2
    for dtype in ("int8", "uint8", "bool"):
        assert train_main(["--set", f"save_dtype={json.dumps(dtype)}"]) == 2
        assert "save_dtype must be one of float32, float16, bfloat16" in capsys.readouterr().err


def _torchrun(sets: dict, port: int):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(port),
           "-m", "finetune.train"]
    for k, v in sets.items():
        cmd += ["--set", f"{k}={json.dumps(v)}"]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})


@pytest.mark.slow
def test_torchrun_two_processes_validate_together_and_stop_together(sample_root, tmp_path):
    """2 gloo ranks: validation embedded in shares and scored once; rank 0's clock stops both after
    epoch 1 of 3 (each rank on its own clock could disagree and hang); only rank 0 reports a score;
    the validation equals a single process's on the same weights."""
    from finetune.trainer import validation_score

    sets = {"data": str(sample_root), "arch": TINY, "epochs": 3, "workers": 0, "out": str(tmp_path),
            "quadtree_max_points": 200, "batch_size": 64, "max_minutes": 1e-9, "dist_timeout_min": 1.0,
            "val_grid": "small"}
    r = _torchrun(sets, 29563)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.count("best validation GeoScore") == 1 and "rank 1: done after epoch 1" in r.stdout
    history = json.loads((tmp_path / "history.json").read_text())
    manifest = json.loads((tmp_path / "best" / "manifest.json").read_text())
    assert len(history) == 1 and manifest["val_geoscore"] == history[0]["val_geoscore"]
    assert manifest["epochs"] == 1
    # the shared validation is what one process computes with the saved weights
    from embed.features import FeatureExtractor, ImageFiles
    from geovote.data import read_split

    bb = load_backbone(str(tmp_path / "best"))
    fx = FeatureExtractor(bb, device="cpu")
    emb = {}
    for name in ("train", "val"):
        split = read_split(sample_root, name)
        emb[name] = (np.concatenate([e for _, e, _ in fx.dataset(ImageFiles(split.image_paths(), fx.transform(),
                                                                            bb.image_size))]), split)
    score, _ = validation_score(emb["train"][0], emb["train"][1].lat_deg, emb["train"][1].lon_deg,
                                emb["val"][0], emb["val"][1].lat_deg, emb["val"][1].lon_deg, "small")
    assert history[0]["val_geoscore"] == pytest.approx(score, rel=1e-4)


@pytest.mark.slow
def test_torchrun_without_the_hybrid_head_and_with_a_step_limit(sample_root, tmp_path):
    """DDP with a head that gets no gradient (hybrid off) must not crash; max_steps stops both ranks."""
    sets = {"data": str(sample_root), "arch": TINY, "epochs": 5, "workers": 0, "out": str(tmp_path),
            "quadtree_max_points": 200, "batch_size": 64, "hybrid_weight": 0.0, "retrieval_weight": 1.0,
            "max_steps": 3, "val_grid": "small"}
    r = _torchrun(sets, 29564)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "rank 1: done after epoch 0 (step 3)" in r.stdout  # the cut epoch is not counted
    import torch as _torch

    assert _torch.load(tmp_path / "last.pt", weights_only=False)["state"]["step"] == 3


def test_supcon_loss_prefers_embeddings_that_group_labels():
    labels = torch.tensor([0, 0, 1, 1])
    good = torch.nn.functional.normalize(torch.tensor([[1.0, 0.1], [1.0, -0.1], [-1.0, 0.1], [-1.0, -0.1]]), dim=1)
    bad = good[[0, 2, 1, 3]]
    assert supcon_loss(good, labels, 0.1) < supcon_loss(bad, labels, 0.1)
    assert supcon_loss(good, torch.tensor([0, 1, 2, 3]), 0.1) == 0  # no positives: nothing to learn


def test_hybrid_offset_decoding_by_hand():
    # two clusters -> a root split into two leaves; check centroid + offset * extent by hand
    lat = np.array([10.0, 12.0, 14.0, -10.0, -20.0])
    lon = np.array([100.0, 110.0, 120.0, -50.0, -40.0])
    tree = QuadTree.build(lat, lon, max_points=3, max_depth=2)
    geo = CellGeometry(tree)
    leaf = geo.leaf_of(lat, lon)
    north = leaf[0]
    assert geo.center[north] == pytest.approx([12.0, 110.0])
    assert geo.extent_pos[north] == pytest.approx([2.0, 10.0]) and geo.extent_neg[north] == pytest.approx([2, 10])
    off = geo.offset_targets(leaf, lat, lon)
    assert off[0] == pytest.approx([-1.0, -1.0]) and off[2] == pytest.approx([1.0, 1.0])
    la, lo = geo.decode(np.array([north, north]), np.array([[0.5, -0.25], [1.2, 1.2]]))
    assert la == pytest.approx([13.0, 14.4]) and lo == pytest.approx([107.5, 122.0])
    # the heads learn a toy problem: embeddings that encode the location
    x = torch.as_tensor(np.c_[lat / 10, lon / 100, np.ones(5)], dtype=torch.float32).repeat(40, 1)
    y = torch.as_tensor(np.tile(leaf, 40))
    head = CellHead(3, geo)
    opt = torch.optim.Adam(head.parameters(), 0.05)
    off_t = torch.as_tensor(np.tile(off, (40, 1)), dtype=torch.float32)
    for _ in range(600):
        opt.zero_grad()
        head.loss(x, y, off_t).backward()
        opt.step()
    plat, plon = head.predict(x[:5])
    assert np.abs(plat - lat).max() < 1.0 and np.abs(plon - lon).max() < 3.0
    reg = RegressionHead(3)
    target = unit_targets(lat, lon)
    with torch.no_grad():
        out = torch.nn.functional.normalize(reg.fc(x[:5]), dim=1).numpy()
    angle = np.arccos(np.clip((out * target.numpy()).sum(1), -1, 1)).mean()  # great-circle radians
    assert float(reg.loss(x[:5], target).detach()) == pytest.approx(angle, rel=1e-5)


def test_a_step_limit_ends_the_schedule_and_leaves_the_cut_epoch_uncounted(sample_root, tmp_path):
    state = train(_cfg(sample_root, tmp_path / "run", epochs=3, max_steps=5, warmup_steps=2), log=lambda *_: None)
    assert state["step"] == 5 and state["epoch"] == 0  # 15 batches an epoch: the first one was cut
    ck = torch.load(tmp_path / "run" / "last.pt", weights_only=False)
    assert ck["sched"]["last_epoch"] == 5
    assert ck["opt"]["param_groups"][0]["lr"] == pytest.approx(0.0, abs=1e-9)  # cosine decayed over 5 steps


@pytest.mark.slow
def test_finetune_killed_mid_epoch_resumes_to_the_uninterrupted_weights(sample_root, tmp_path):
    """The one resume test: a run killed mid-epoch (SIGKILL), rerun, ends with the weights, optimizer
    state, schedule and validation history of a run never interrupted; random augmentations included,
    whose streams must resume too."""
    def cmd(out):
        sets = {"data": str(sample_root), "arch": TINY, "epochs": 3, "workers": 0, "out": str(out),
                "quadtree_max_points": 200, "batch_size": 64, "warmup_steps": 2, "views": 2,
                "rotate_deg": 30.0, "zoom": 0.1, "val_grid": "small"}
        return [sys.executable, "-m", "finetune.train", *[x for k, v in sets.items()
                                                          for x in ("--set", f"{k}={json.dumps(v)}")]]

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    killed = tmp_path / "killed"
    proc = subprocess.Popen(cmd(killed), cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    deadline = time.time() + 300
    while time.time() < deadline and not (killed / "last.pt").exists():
        time.sleep(0.01)
    time.sleep(0.5)  # into epoch 2
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert torch.load(killed / "last.pt", weights_only=False)["state"]["epoch"] == 1
    subprocess.run(cmd(killed), cwd=ROOT, check=True, capture_output=True, timeout=600, env=env)
    whole = tmp_path / "whole"
    subprocess.run(cmd(whole), cwd=ROOT, check=True, capture_output=True, timeout=600, env=env)
    a = torch.load(killed / "last.pt", weights_only=False)
    b = torch.load(whole / "last.pt", weights_only=False)
    assert a["state"]["step"] == b["state"]["step"] and a["state"]["epoch"] == 3
    for key in b["model"]:
        torch.testing.assert_close(a["model"][key], b["model"][key], rtol=1e-5, atol=1e-6, msg=key)
    assert len(a["opt"]["state"]) == len(b["opt"]["state"]) > 0
    for i, st in b["opt"]["state"].items():
        for name, value in st.items():
            torch.testing.assert_close(a["opt"]["state"][i][name], value, rtol=1e-5, atol=1e-6)
    assert a["sched"]["last_epoch"] == b["sched"]["last_epoch"] == b["state"]["step"]
    assert [h["val_geoscore"] for h in a["state"]["history"]] == pytest.approx(
        [h["val_geoscore"] for h in b["state"]["history"]], rel=1e-6)
