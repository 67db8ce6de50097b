"""benchmark.run end to end on the small sample, and its parts against hand computations."""
import json
from pathlib import Path

import numpy as np
import pytest

from benchmark.methods import METHODS
from benchmark.report import bootstrap_ci
from benchmark.run import main as run_main
from geovote.data import read_split
from geovote.metrics import SCORE_KEYS


@pytest.fixture()
def engine_dir(tiny_engine):
    return tiny_engine


@pytest.mark.slow
def test_run_writes_every_file_and_scores_every_method(sample_root, engine_dir, tmp_path, capsys):
    from benchmark.score import score_file

    run = tmp_path / "run"
    assert run_main(["--data", str(sample_root), "--engine", str(engine_dir), "--out", str(run),
                     "--set", "bootstrap=50", "--set", "head_epochs=3"]) == 0
    printed = capsys.readouterr().out
    assert "| geovote |" in printed and "run folder" in printed
    # the sample has test_far: both splits are scored, each in its own folder, by the same trained heads
    far = json.loads((run / "test_far" / "results.json").read_text())
    n_far, n_test = (len(read_split(sample_root, s, check_images=False)) for s in ("test_far", "test"))
    assert far["split"] == "test_far" and all(m["n"] == n_far for m in far["methods"])
    out = run / "test"
    results = json.loads((out / "results.json").read_text())
    # the documented order, pinned: results.json, the CSV, the table and the plots keep it
    order = ["geovote", "geovote-within", "geovote-sequence", "1-nn", "knn-mean", "classification", "regression", "hybrid",
             "osv5m-baseline", "mean-location", "top-cell", "best-candidate", "best-of-k", "oracle"]
    assert list(METHODS) == order
    # the paper's released network runs only on an engine built with it: left out here, and said why
    assert [m["name"] for m in results["methods"]] == [m for m in order if m != "osv5m-baseline"]
    assert "osv5m-baseline: left out: the engine's model is not the OSV-5M paper's network" in printed
    for m in results["methods"]:
        assert set(SCORE_KEYS) <= set(m) and m["n"] == n_test
        lo, hi = m["geoscore_ci95"]
        assert lo <= m["geoscore"] <= hi
    by = {m["name"]: m for m in results["methods"]}
    # told the true country, the engine answers inside it: more countries right, and closer
    assert by["geovote-within"]["acc_country"] > by["geovote"]["acc_country"]
    assert by["geovote-within"]["geoscore"] > by["geovote"]["geoscore"]
    # the ceilings, image by image: the engine answers one of its candidates, the nearest neighbour is one
    # of the k, and every neighbour is a training image
    import pyarrow.parquet as pq

    from geovote.geo import haversine_km

    truth_all = read_split(sample_root, "test", check_images=False)
    at = {i: j for j, i in enumerate(truth_all.ids.astype(str))}
    d = {}
    for m in ("geovote", "1-nn", "best-candidate", "best-of-k", "oracle"):
        p = pq.read_table(out / "predictions" / f"{m}.parquet").to_pydict()
        r = [at[i] for i in p["id"]]
        d[m] = haversine_km(np.array(p["latitude"]), np.array(p["longitude"]), truth_all.lat_deg[r],
                            truth_all.lon_deg[r])
    assert np.all(d["best-candidate"] <= d["geovote"] + 1e-6) and np.all(d["best-of-k"] <= d["1-nn"] + 1e-6)
    assert np.all(d["oracle"] <= d["best-of-k"] + 1e-6)
    # geovote-sequence: an image in no sequence answers as geovote; a sequence's images share one answer,
    # and its probabilities are reported like geovote's
    seq_truth = read_split(sample_root, "test", columns=["sequence"], check_images=False)
    seq_of = dict(zip(seq_truth.ids.astype(str), seq_truth.column("sequence").astype(str)))
    alone = pq.read_table(out / "predictions" / "geovote.parquet").to_pydict()
    joint = pq.read_table(out / "predictions" / "geovote-sequence.parquet").to_pydict()
    assert joint["id"] == alone["id"]
    answers_of = {}
    for i, la, lo, la1, lo1 in zip(joint["id"], joint["latitude"], joint["longitude"], alone["latitude"],
                                   alone["longitude"]):
        if seq_of[i]:
            answers_of.setdefault(seq_of[i], set()).add((la, lo))
        else:
            assert (la, lo) == (la1, lo1)
    assert len(answers_of) == 20 and all(len(v) == 1 for v in answers_of.values())
    assert set(results["calibration_sequence"]["ece"]) == {"1", "25", "200", "750", "2500"}
    for name in ("geovote", "1-nn", "knn-mean"):
        assert by["oracle"]["mean_km"] <= by[name]["mean_km"]
        assert by["oracle"]["geoscore"] >= by[name]["geoscore"]
    for f in ("results.csv", "results.md", "accuracy_vs_distance.png", "error_map.png", "reliability.png",
              "accuracy_vs_coverage.png"):
        assert (out / f).stat().st_size > 0
    # the engine is calibrated: its report, recomputed here from its predictions file and the truth
    t = {k: np.asarray(v) for k, v in pq.read_table(out / "predictions" / "geovote.parquet").to_pydict().items()}
    truth = read_split(sample_root, "test", check_images=False)
    pos = {i: j for j, i in enumerate(truth.ids.astype(str))}
    rows = [pos[i] for i in t["id"]]
    d = haversine_km(t["latitude"], t["longitude"], truth.lat_deg[rows], truth.lon_deg[rows])
    cal = results["calibration"]
    assert cal["radius_coverage"] == pytest.approx(np.mean(d <= t["radius_km"]))
    for km in (1, 25, 200, 750, 2500):
        p, hit = t[f"within_{km}km"], d <= km
        bins = np.minimum((p * 10).astype(int), 9)
        ece = sum(abs(p[bins == b].mean() - hit[bins == b].mean()) * np.mean(bins == b) for b in set(bins))
        assert cal["ece"][str(km)] == pytest.approx(ece)
    conf = t["confidence"]
    assert np.array_equal(conf, t["within_200km"])
    top = np.argsort(-conf, kind="stable")[:int(np.ceil(len(conf) / 2))]  # the first half, by hand
    assert cal["acc_200km_most_confident_half"] == pytest.approx(np.mean(d[top] <= 200))
    # which candidates answered, as the predictions file says
    kinds = list(t["kind"])
    assert cal["answer_kinds"] == pytest.approx({k: kinds.count(k) / len(kinds)
                                                 for k in ("peak", "runner_up", "far_pick", "neighbour")})
    # the predictions files are what benchmark.score reads, and give the same scores
    again = score_file(out / "predictions" / "hybrid.parquet", sample_root / "test.csv")
    assert again["geoscore"] == pytest.approx(by["hybrid"]["geoscore"])
    assert again["acc_country"] == pytest.approx(by["hybrid"]["acc_country"])


def test_run_refuses_unknown_methods_and_the_val_split(sample_root, engine_dir, capsys):
    assert run_main(["--data", str(sample_root), "--engine", str(engine_dir), "--methods", "magic"]) == 2
    assert "unknown methods ['magic']" in capsys.readouterr().err
    assert run_main(["--data", str(sample_root), "--engine", str(engine_dir), "--split", "val"]) == 2


def test_bootstrap_interval_covers_the_mean_and_narrows_with_n():
    rng = np.random.default_rng(0)
    small, big = rng.normal(10, 2, 100), rng.normal(10, 2, 10_000)
    lo, hi = bootstrap_ci(small, 500, 0)
    assert lo < small.mean() < hi
    lo2, hi2 = bootstrap_ci(big, 500, 0)
    assert hi2 - lo2 < (hi - lo) / 5  # ~ 1 / sqrt(n)
    assert bootstrap_ci(np.array([np.nan, 1.0, 1.0]), 10, 0) == [1.0, 1.0]


@pytest.mark.slow
def test_the_gpu_check_runs_at_toy_size(tmp_path):
    """benchmark/gpu_check.py, run by benchmark/gpu_check.sh on GPU machines, must not rot between them:
    every check runs at toy size here, on the CPU, and reports its figures."""
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    out = tmp_path / "small.json"
    r = subprocess.run([sys.executable, "-m", "benchmark.gpu_check", "--small", "--out", str(out)], cwd=root,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    summary = json.loads(out.read_text())
    assert summary["embed"]["images"] == 96 and summary["embed"]["end_to_end_images_per_s"] > 0
    assert summary["finetune"]["steps"] == 3
    # the two decode paths from a zip archive: the same images, embeddings within the resize filters'
    # difference of each other
    assert summary["decode"]["images"] == 96 and summary["decode"]["cosine_torchvision_vs_pil"]["min"] >= 0.995
    assert summary["search"]["vectors"] == 60_000 and 0 <= summary["search"]["cpu_index_recall_at_10"] <= 1
    assert summary["engine"]["answers_within_1_km_of_cpu"] == 1.0  # here both engines run on the CPU
    # the paper's network, small, in float32 on both sides: the same answers
    assert summary["osv5m"]["width"] == 64 and summary["osv5m"]["bf16"] is False
    assert summary["osv5m"]["answers_within_1_km_of_cpu"] == 1.0
