"""finetune: each objective trains, a run resumes, torchrun splits the batches, checkpoints load."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from embed.models import load_backbone
from finetune.train import TrainConfig, main as train_main, supcon_loss, train
from geovote.cells import QuadTree
from geovote.heads import CellGeometry, CellHead, RegressionHead, unit_targets

ROOT = Path(__file__).resolve().parents[1]
TINY = json.dumps({"embed_dim": 16, "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 32, "layers": 1,
                                                   "head_width": 16}})


def _cfg(sample_root, out, **kw):
    base = dict(data=str(sample_root), arch=TINY, epochs=1, batch_size=128, workers=0, warmup_steps=2,
                out=str(out), val_k=5, quadtree_max_points=200, lr=3e-3)
    return TrainConfig(**{**base, **kw})


@pytest.mark.parametrize("weights", [dict(hybrid_weight=1.0, retrieval_weight=0.0, region_weight=0.0),
                                     dict(hybrid_weight=0.0, retrieval_weight=1.0, region_weight=0.0,
                                          views=2, rotate_deg=180.0, zoom=0.25),
                                     dict(hybrid_weight=0.0, retrieval_weight=0.0, region_weight=1.0)])
def test_each_objective_changes_the_tower_and_writes_a_loadable_checkpoint(sample_root, tmp_path, weights):
    out = tmp_path / "run"
    state = train(_cfg(sample_root, out, **weights), log=lambda *_: None)
    assert state["epoch"] == 1 and len(state["history"]) == 1
    assert np.isfinite(state["history"][0]["loss"]) and state["history"][0]["val_geoscore"] > 0
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


def test_resume_continues_from_the_last_epoch(sample_root, tmp_path):
    out = tmp_path / "run"
    train(_cfg(sample_root, out, epochs=1), log=lambda *_: None)
    logs = []
    state = train(_cfg(sample_root, out, epochs=2), log=logs.append)
    assert any("resuming from" in m and "epoch 1" in m for m in logs)
    assert [h["epoch"] for h in state["history"]] == [1, 2]


def test_command_and_bad_config(sample_root, tmp_path, capsys):
    assert train_main(["--set", f"data={json.dumps(str(sample_root))}", "--set", f"arch={json.dumps(TINY)}",
                       "--set", "epochs=1", "--set", "workers=0", "--set", f"out={json.dumps(str(tmp_path))}",
                       "--set", "quadtree_max_points=200", "--set", "val_k=5"]) == 0
    assert "best validation GeoScore" in capsys.readouterr().out
    assert train_main(["--set", "train=half"]) == 2


def test_torchrun_two_processes(sample_root, tmp_path):
    sets = {"data": str(sample_root), "arch": TINY, "epochs": 1, "workers": 0, "out": str(tmp_path),
            "quadtree_max_points": 200, "val_k": 5, "batch_size": 64}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", "29563",
           "-m", "finetune.train"]
    for k, v in sets.items():
        cmd += ["--set", f"{k}={json.dumps(v)}"]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    history = json.loads((tmp_path / "history.json").read_text())
    assert len(history) == 1 and history[0]["val_geoscore"] > 0
    assert load_backbone(str(tmp_path / "best")).dim == 16


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
    assert reg.loss(x[:5], unit_targets(lat, lon)) > 0
