"""embed.osv5m: the OSV-5M paper's released model (osv5m/baseline), loaded offline from a snapshot in the
released layout, against a reference forward written apart from ours: transformers' CLIPVisionModel
with the same weights, and line-for-line ports of upstream's MLPCentroid and HybridHeadCentroid
(gastruc/osv5m, models/networks/mlp.py and heads/hybrid.py, MIT)."""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from embed.models import BackboneError, load_backbone
from geovote.cells import QuadTree, read_quadtree_csv
from geovote.geo import haversine_km

ROOT = Path(__file__).resolve().parents[1]
WIDTH, LAYERS, MLP_WIDTH, PATCH, SIZE = 64, 2, 256, 14, 56  # a CLIP ViT/14, small
HIDDEN = [64, 32]
TOWER_REPO = "laion/CLIP-ViT-L-14-DataComp.XL-s13B-b90K"


# ------------------------------------------------------------------ the reference, apart from embed.osv5m
class RefMLPCentroid(nn.Module):
    """upstream's MLPCentroid (without auxiliary data), line for line."""

    def __init__(self, initial_dim, hidden_dim, final_dim, norm, activation):
        super().__init__()
        dim = [initial_dim] + hidden_dim + [final_dim // 3]
        self.classif = nn.Sequential(*self.init_layers(dim, norm, activation))
        dim = [initial_dim] + hidden_dim + [2 * final_dim // 3]
        self.reg = nn.Sequential(*self.init_layers(dim, norm, activation))

    def init_layers(self, dim, norm, activation):
        args = [nn.LayerNorm(dim[0])]
        for i in range(len(dim) - 1):
            args.append(nn.Linear(dim[i], dim[i + 1]))
            if i < len(dim) - 2:
                args.append(norm(4, dim[i + 1]))
                args.append(activation())
        return args

    def forward(self, x):
        return torch.cat([self.classif(x[:, 0, :]), self.reg(x[:, 0, :])], dim=1)


class RefHybridHeadCentroid(nn.Module):
    """upstream's HybridHeadCentroid in eval mode, line for line, its cells from the CSV's columns."""

    def __init__(self, final_dim, use_tanh, scale_tanh, table):
        super().__init__()
        self.final_dim, self.use_tanh, self.scale_tanh = final_dim, use_tanh, scale_tanh
        lat = lambda c: torch.tensor(table[c] / 90.0)  # noqa: E731
        lon = lambda c: torch.tensor(table[c] / 180.0)  # noqa: E731
        mean = torch.stack([lat("mean_lat"), lon("mean_lon")], 1)
        self.cell_center = mean
        self.cell_size_up = torch.stack([lat("max_lat"), lon("max_lon")], 1) - mean
        self.cell_size_down = mean - torch.stack([lat("min_lat"), lon("min_lon")], 1)

    def forward(self, x):
        classification_logits = x[..., : self.final_dim]
        classification = classification_logits.argmax(dim=-1)
        regression = x[..., self.final_dim:]
        if self.use_tanh:
            regression = self.scale_tanh * torch.tanh(regression)
        regression = regression.view(regression.shape[0], -1, 2)
        regression = torch.gather(regression, 1, classification.unsqueeze(-1).unsqueeze(-1)
                                  .expand(regression.shape[0], 1, 2))[:, 0, :]
        size = torch.where(regression > 0, self.cell_size_up[classification], self.cell_size_down[classification])
        gps = self.cell_center[classification] + regression * size
        gps = torch.clamp(gps, -1, 1)  # UnormGPS
        return gps * torch.Tensor([np.pi * 0.5, np.pi]).unsqueeze(0).to(gps.device)


def reference_clip(act: str):
    from transformers import CLIPVisionConfig, CLIPVisionModel

    cfg = CLIPVisionConfig(hidden_size=WIDTH, intermediate_size=MLP_WIDTH, num_hidden_layers=LAYERS,
                           num_attention_heads=WIDTH // 64, image_size=SIZE, patch_size=PATCH, hidden_act=act)
    return CLIPVisionModel(cfg).eval()


def _clip_keys(model) -> dict:
    """transformers' parameter names -> the released file's (`backbone.clip.vision_model.*`)."""
    return {k: "backbone.clip." + (k if k.startswith("vision_model.") else "vision_model." + k)
            for k in model.state_dict()}


def released_state(table: dict, seed: int = 0) -> dict:
    """Random weights in the released layout: each tensor under `model.X` and bare `X`, a position_ids
    buffer (older transformers saved one), the cells as float64 tensors. The tower's MLPs work where
    GELU and QuickGELU part most (pre-activations around -3, where QuickGELU is 4x GELU) and outweigh
    the rest of the residual stream, so that the two towers answer in other cells (tested below)."""
    torch.manual_seed(seed)
    clip = reference_clip("gelu")
    with torch.no_grad():
        for name, p in clip.named_parameters():
            if name.endswith("fc1.weight"):
                p.normal_(0, 1.0 / math.sqrt(p.shape[1]))
            elif name.endswith("fc1.bias"):
                p.fill_(-3.0)
            elif name.endswith("fc2.weight"):
                p.normal_(0, 50.0 / math.sqrt(p.shape[1]))
            elif name.endswith("proj.weight") or "patch_embedding" in name:
                p.normal_(0, 2.0 / math.sqrt(p[0].numel()))
    mid = RefMLPCentroid(WIDTH, list(HIDDEN), 3 * len(table["cluster_id"]), nn.GroupNorm, nn.GELU)
    with torch.no_grad():  # no tensor left at its init value: a swapped norm or bias would show
        for name, p in [*clip.named_parameters(), *mid.named_parameters()]:
            if p.dim() == 1 and name.endswith("weight"):  # LayerNorm and GroupNorm scales
                p.copy_(1 + 0.2 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.add_(0.1 * torch.randn_like(p))
    state = {_clip_keys(clip)[k]: v for k, v in clip.state_dict().items()}
    state["backbone.clip.vision_model.embeddings.position_ids"] = torch.arange((SIZE // PATCH) ** 2 + 1)[None]
    state.update({f"mid.{k}": v for k, v in mid.state_dict().items()})
    head = RefHybridHeadCentroid(len(table["cluster_id"]), True, 1.2, table)
    for name in ("cell_center", "cell_size_up", "cell_size_down"):
        state[f"head.{name}"] = getattr(head, name)
    return {**{f"model.{k}": v for k, v in state.items()}, **{k: v.clone() for k, v in state.items()}}


def released_config(n_cells: int) -> dict:
    """config.json as upstream's Geolocalizer reads it (hydra targets, interpolations resolved)."""
    openai = {"mean": [0.48145466, 0.4578275, 0.40821073], "std": [0.26862954, 0.26130258, 0.27577711]}
    return {
        "transform": {"_target_": "torchvision.transforms.Compose", "transforms": [
            {"_target_": "torchvision.transforms.Resize", "size": 224, "interpolation": 3, "antialias": True},
            {"_target_": "torchvision.transforms.CenterCrop", "size": 224},
            {"_target_": "torchvision.transforms.ToTensor"},
            {"_target_": "torchvision.transforms.Normalize", **openai}]},
        "model": {
            "_target_": "models.networks.network.HybridUnFrozenBackbone",
            "backbone": {"instance": {"_target_": "models.networks.backbones.CLIP", "path": TOWER_REPO},
                         "output_dim": WIDTH},
            "mid": {"instance": {"_target_": "models.networks.mlp.MLPCentroid", "initial_dim": WIDTH,
                                 "hidden_dim": list(HIDDEN), "final_dim": 3 * n_cells,
                                 "norm": {"_target_": "torch.nn.GroupNorm", "_partial_": True},
                                 "activation": {"_target_": "torch.nn.GELU", "_partial_": True}}},
            "head": {"target_key": "label", "final_dim": 3 * n_cells,
                     "instance": {"_target_": "models.networks.heads.hybrid.HybridHeadCentroid",
                                  "final_dim": n_cells, "use_tanh": True, "scale_tanh": 1.2,
                                  "quadtree_path": "utils/quadtree_10_1000.csv"}},
            "mode": "eval"}}


def write_snapshot(folder: Path, table: dict) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(released_config(len(table["cluster_id"]))))
    torch.save(released_state(table), folder / "pytorch_model.bin")
    return folder


def reference_answers(state: dict, table: dict, images, act: str) -> np.ndarray:
    """(N, 2) radians from transformers' tower with `act`, the ported mid and head, and torchvision's
    transform (upstream's: Resize 224-bicubic-antialias of the short side, centre crop, normalise)."""
    from torchvision import transforms

    clip = reference_clip(act)
    keys = _clip_keys(clip)
    clip.load_state_dict({k: state[keys[k]] for k in clip.state_dict()})
    mid = RefMLPCentroid(WIDTH, list(HIDDEN), 3 * len(table["cluster_id"]), nn.GroupNorm, nn.GELU).eval()
    mid.load_state_dict({k[4:]: v for k, v in state.items() if k.startswith("mid.")})
    head = RefHybridHeadCentroid(len(table["cluster_id"]), True, 1.2, table)
    tf = transforms.Compose([transforms.Resize(SIZE, interpolation=transforms.InterpolationMode.BICUBIC,
                                               antialias=True), transforms.CenterCrop(SIZE), transforms.ToTensor(),
                             transforms.Normalize([0.48145466, 0.4578275, 0.40821073],
                                                  [0.26862954, 0.26130258, 0.27577711])])
    with torch.no_grad():
        x = torch.stack([tf(im.convert("RGB")) for im in images])
        return head(mid(clip(pixel_values=x)["last_hidden_state"])).numpy()


# --------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def table(sample_root):
    """The sample's train QuadTree in OSV-5M's cell table (what the released file's cells come from)."""
    from geovote.data import read_split

    train = read_split(sample_root, "train")
    return QuadTree.build(train.lat_deg, train.lon_deg, max_points=10, max_depth=10).leaf_table()


@pytest.fixture(scope="module")
def snapshot(tmp_path_factory, table):
    return write_snapshot(tmp_path_factory.mktemp("osv5m") / "baseline", table)


def _images(sample_root, split="test", n=None):
    from PIL import Image

    from geovote.data import read_split

    s = read_split(sample_root, split)
    paths = s.image_paths()[:n]
    return s, [Image.open(p) for p in paths]


# ------------------------------------------------------------------------------------------------ tests
def test_the_network_is_read_off_the_snapshot_and_answers_as_the_reference(snapshot, table, sample_root):
    """Shape from the tensors (width, layers, patch, positions, MLPs, cells); the answers of the
    network equal transformers' tower + the ported head, GELU, to float noise; a QuickGELU tower
    answers otherwise."""
    bb = load_backbone(str(snapshot))
    net = bb.model
    assert (bb.dim, bb.image_size, net.width) == (WIDTH, SIZE, WIDTH)
    assert len(net.backbone.transformer.resblocks) == LAYERS
    assert bb.source["tower_activation"] == "gelu" and bb.source["cells"] == len(table["cluster_id"])
    assert type(net.backbone.transformer.resblocks[0].mlp.gelu) is nn.GELU
    _, images = _images(sample_root, n=40)
    state = torch.load(snapshot / "pytorch_model.bin", weights_only=True)
    state = {k: v for k, v in state.items() if not k.startswith("model.")}
    ref = reference_answers(state, table, images, "gelu")
    quick = reference_answers(state, table, images, "quick_gelu")
    tf = bb.transform()
    with torch.no_grad():
        x = torch.stack([tf(im) for im in images])
        ours = net.head_radians(net(x)).numpy()
    assert ours.dtype == np.float64
    np.testing.assert_allclose(ours, ref, atol=1e-5)
    # the activation matters on these weights: the other one moves the median answer by tens of km
    km = haversine_km(*np.degrees(ref).T, *np.degrees(quick).T)
    assert np.median(km) > 20


def test_the_head_decodes_each_branch_and_the_clamp_by_hand(snapshot):
    net = load_backbone(str(snapshot)).model
    n = net.cell_center.shape[0]
    with torch.no_grad():
        net.cell_center[:2] = torch.tensor([[0.5, -0.25], [0.9, 0.95]], dtype=torch.float64)
        net.cell_size_up[:2] = torch.tensor([[0.1, 0.2], [0.2, 0.2]], dtype=torch.float64)
        net.cell_size_down[:2] = torch.tensor([[0.3, 0.4], [0.1, 0.1]], dtype=torch.float64)
    logits = torch.full((2, n), -5.0)
    logits[0, 0] = logits[1, 1] = 5.0
    reg = torch.zeros(2, 2 * n)
    reg[0, 0:2] = torch.tensor([1.0, -2.0])  # cell 0: lat up (r > 0), lon down (r < 0)
    reg[1, 2:4] = torch.tensor([3.0, 3.0])  # cell 1: both up, past 1: clamped
    out = net.decode(logits, reg).numpy()
    r0, r1 = 1.2 * math.tanh(1.0), 1.2 * math.tanh(-2.0)
    assert out[0, 0] == pytest.approx((0.5 + r0 * 0.1) * math.pi / 2, abs=1e-6)
    assert out[0, 1] == pytest.approx((-0.25 + r1 * 0.4) * math.pi, abs=1e-6)
    assert 0.9 + 1.2 * math.tanh(3.0) * 0.2 > 1 and out[1, 0] == pytest.approx(math.pi / 2)
    assert out[1, 1] == pytest.approx(math.pi)


def _hub_env(tmp_path, cache: bool):
    env = {k: v for k, v in os.environ.items() if k not in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY",
                                                            "http_proxy")}
    return {**env, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1"}


def _cache(tmp_path, snapshot: Path) -> None:
    base = tmp_path / "hf" / "hub" / "models--osv5m--baseline"
    (base / "refs").mkdir(parents=True)
    (base / "refs" / "main").write_text("0" * 40)
    snap = base / "snapshots" / ("0" * 40)
    snap.mkdir(parents=True)
    for f in ("config.json", "pytorch_model.bin"):
        (snap / f).symlink_to(snapshot / f)


def test_three_spellings_load_the_same_network_offline_and_a_missing_one_says_how(tmp_path, snapshot,
                                                                                  sample_root):
    code = ("import sys, json, numpy as np\nfrom embed.models import load_backbone, BackboneError\n"
            "from embed.features import FeatureExtractor\nfrom PIL import Image\n"
            "out = {}\nfor spec in sys.argv[2:]:\n    try:\n        bb = load_backbone(spec)\n"
            "    except BackboneError as e:\n        out[spec] = str(e); continue\n"
            "    e = FeatureExtractor(bb, device='cpu').images([Image.open(sys.argv[1])])\n"
            "    out[spec] = [bb.name, e.tolist()]\nprint(json.dumps(out))\n")
    _, images = _images(sample_root, n=1)
    image = images[0].filename
    specs = ["osv5m-baseline", "hf-hub:osv5m/baseline", str(snapshot)]
    r = subprocess.run([sys.executable, "-c", code, image, *specs], env=_hub_env(tmp_path, False), cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    missing = json.loads(r.stdout)
    for spec in specs[:2]:  # not cached, offline: the message says where it looked and what to fetch
        assert "osv5m/baseline" in missing[spec] and "hf download osv5m/baseline config.json " \
            "pytorch_model.bin" in missing[spec] and str(tmp_path / "hf" / "hub") in missing[spec]
    _cache(tmp_path, snapshot)
    r = subprocess.run([sys.executable, "-c", code, image, *specs], env=_hub_env(tmp_path, True), cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    got = json.loads(r.stdout)
    assert got["osv5m-baseline"][0] == "osv5m-baseline" and got[specs[1]][0] == specs[1]
    assert got[specs[2]][0].startswith("baseline@")
    first = np.array(got[specs[0]][1])
    for spec in specs[1:]:
        np.testing.assert_array_equal(np.array(got[spec][1]), first)


def test_a_snapshot_that_does_not_fit_is_refused_with_the_reason(tmp_path, snapshot, table):
    state = torch.load(snapshot / "pytorch_model.bin", weights_only=True)
    cases = {
        "differ": ({**state, "mid.classif.1.bias": state["mid.classif.1.bias"] + 1}, "copies of mid.classif.1.bias differ"),
        "missing": ({k: v for k, v in state.items() if "layers.1.mlp.fc2.weight" not in k}, "missing 1 tensor"),
        "extra": ({**state, "model.loss.weight": torch.zeros(1), "loss.weight": torch.zeros(1)},
                  "no place for, e.g. loss.weight"),
    }
    for name, (bad, why) in cases.items():
        folder = tmp_path / name
        folder.mkdir()
        (folder / "config.json").write_text((snapshot / "config.json").read_text())
        torch.save(bad, folder / "pytorch_model.bin")
        with pytest.raises(BackboneError, match=why):
            load_backbone(str(folder))
    # without the cell tensors: upstream's CSV beside the weights gives the same cells
    folder = tmp_path / "csv"
    folder.mkdir()
    (folder / "config.json").write_text((snapshot / "config.json").read_text())
    torch.save({k: v for k, v in state.items() if ".cell_" not in k}, folder / "pytorch_model.bin")
    with pytest.raises(BackboneError, match="quadtree_10_1000.csv"):
        load_backbone(str(folder))
    QuadTree_csv = folder / "quadtree_10_1000.csv"
    import pyarrow as pa
    import pyarrow.csv as pacsv

    pacsv.write_csv(pa.table(table), str(QuadTree_csv))
    net = load_backbone(str(folder)).model
    for name in ("cell_center", "cell_size_up", "cell_size_down"):
        np.testing.assert_array_equal(getattr(net, name).numpy(), state[f"head.{name}"].numpy())


@pytest.mark.slow
def test_an_engine_of_the_network_answers_queries_and_benchmark_scores_its_head(tmp_path, snapshot, table,
                                                                               sample_root, capsys):
    """embed.build with the snapshot folder, benchmark.run --methods osv5m-baseline geovote: the head's
    answers from the engine's stored embeddings equal the reference forward (median under 0.5 km, and
    nearer GELU's than QuickGELU's); retrieve.query answers with the same engine."""
    import pyarrow.parquet as pq

    from benchmark.run import main as run_main
    from embed.build import main as embed_main
    from retrieve.query import main as query_main

    engine = tmp_path / "engine"
    assert embed_main(["--data", str(sample_root), "--model", str(snapshot), "--out", str(engine),
                       "--splits", "train", "--workers", "0"]) == 0
    run = tmp_path / "run"
    assert run_main(["--data", str(sample_root), "--engine", str(engine), "--out", str(run), "--split", "test",
                     "--methods", "geovote", "osv5m-baseline", "--set", "bootstrap=20"]) == 0
    pred = pq.read_table(run / "predictions" / "osv5m-baseline.parquet").to_pydict()
    split, images = _images(sample_root)
    assert pred["id"] == list(split.ids.astype(str))
    state = {k: v for k, v in torch.load(snapshot / "pytorch_model.bin", weights_only=True).items()
             if not k.startswith("model.")}
    ref = np.degrees(reference_answers(state, table, images, "gelu"))
    quick = np.degrees(reference_answers(state, table, images, "quick_gelu"))
    lat, lon = np.array(pred["latitude"]), np.array(pred["longitude"])
    to_ref, to_quick = haversine_km(lat, lon, ref[:, 0], ref[:, 1]), haversine_km(lat, lon, *quick.T)
    # fp16 shards move answers by metres; a cell can flip where two logits are that close (rarely)
    assert np.median(to_ref) < 0.5 and np.mean(to_ref < 1.0) >= 0.98
    assert np.median(to_quick) > 20 and np.mean(to_ref < to_quick) > 0.9
    results = json.loads((run / "results.json").read_text())
    assert [m["name"] for m in results["methods"]] == ["geovote", "osv5m-baseline"]
    capsys.readouterr()
    assert query_main([images[0].filename, "--index", str(engine / "index"), "--json"]) == 0
    answer = json.loads(capsys.readouterr().out)
    # the answer a user gets is the benchmark's for that image (there from its stored fp16 embedding)
    voted = pq.read_table(run / "predictions" / "geovote.parquet").to_pydict()
    assert answer["calibrated"] and voted["id"][0] == split.ids.astype(str)[0]
    assert haversine_km(answer["latitude"], answer["longitude"], voted["latitude"][0], voted["longitude"][0]) < 1


def test_our_quadtree_is_upstreams_rule(tmp_path):
    """geovote's QuadTree and OSV-5M's preprocess.py rule (root box = the points' extent; split at the
    midpoints while depth > 0 and count >= do_split; non-empty quadrants in order lat<, lon< / lat<,
    lon>= / lat>=, lon< / lat>=, lon>=; leaves depth first; mean of the points), written here directly
    from that rule, give the same table on clustered points, and it reads back from its CSV."""
    rng = np.random.default_rng(3)
    centres = rng.uniform([-60, -180], [70, 180], (40, 2))
    pts = centres[rng.integers(0, 40, 20000)] + rng.normal(0, 3, (20000, 2))
    lat, lon = np.clip(pts[:, 0], -89, 89), (pts[:, 1] + 180) % 360 - 180

    leaves = []

    def rule(idx, mins, maxs, depth, do_split):
        mids = 0.5 * (mins + maxs)
        if depth > 0 and len(idx) >= do_split:
            la, lo = lat[idx], lon[idx]
            quads = [(la < mids[0]) & (lo < mids[1]), (la < mids[0]) & (lo >= mids[1]),
                     (la >= mids[0]) & (lo < mids[1]), (la >= mids[0]) & (lo >= mids[1])]
            boxes = [([mins[0], mins[1]], [mids[0], mids[1]]), ([mins[0], mids[1]], [mids[0], maxs[1]]),
                     ([mids[0], mins[1]], [maxs[0], mids[1]]), ([mids[0], mids[1]], [maxs[0], maxs[1]])]
            for q, (lo_, hi_) in zip(quads, boxes):
                if q.any():
                    rule(idx[q], np.array(lo_), np.array(hi_), depth - 1, do_split)
        else:
            leaves.append((*mins, *maxs, lat[idx].mean(), lon[idx].mean()))

    for depth, do_split in ((10, 1000), (4, 300)):
        leaves.clear()
        all_idx = np.arange(len(lat))
        rule(all_idx, np.array([lat.min(), lon.min()]), np.array([lat.max(), lon.max()]), depth, do_split)
        expected = np.array(leaves)
        tree = QuadTree.build(lat, lon, max_points=do_split, max_depth=depth)
        t = tree.leaf_table()
        got = np.stack([t[c] for c in ("min_lat", "min_lon", "max_lat", "max_lon", "mean_lat", "mean_lon")], 1)
        assert got.shape == expected.shape and len(expected) > 50
        np.testing.assert_array_equal(got[:, :4], expected[:, :4])
        np.testing.assert_allclose(got[:, 4:], expected[:, 4:], rtol=0, atol=1e-9)
        tree.write_csv(tmp_path / f"quadtree_{depth}_{do_split}.csv")
        back = read_quadtree_csv(tmp_path / f"quadtree_{depth}_{do_split}.csv")
        for c, v in t.items():
            np.testing.assert_array_equal(back[c], v)
