"""benchmark.rehearse end to end at a small size: every stage after embedding, each in its own process, on a
fabricated OSV-5M-shaped dataset without val."""
import json

import pytest

from benchmark.rehearse import STAGES, main, run_stage


def test_a_stage_reports_the_memory_it_held(tmp_path):
    """Against a hand count: a child that holds 300 MiB of ones for a second."""
    code = "import time, numpy as np; a = np.ones(300 * 2**20 // 8); time.sleep(1.0)"
    s = run_stage("alloc", ["-c", code], tmp_path)
    assert s["rc"] == 0
    assert 300 / 1024 <= s["peak_rss_gb"] <= 400 / 1024  # plus the interpreter and numpy
    assert 290 / 1024 <= s["peak_private_gb"] <= s["peak_rss_gb"]  # anonymous pages, sampled


@pytest.mark.slow
def test_rehearsal_runs_every_stage_and_reports_them(tmp_path, capsys):
    """The smallest rehearsal that runs every stage, at a width no pixels:N has (512 = ViT-B's)."""
    out = tmp_path / "rehearse"
    assert main(["--train", "3000", "--test", "300", "--dim", "512", "--out", str(out), "--head-minutes", "0.05",
                 "--bootstrap", "20"]) == 0
    printed = capsys.readouterr().out
    summary = json.loads(printed.strip().splitlines()[-1])
    assert list(summary["stages"]) == list(STAGES)
    for name, s in summary["stages"].items():
        assert s["rc"] == 0, name
        # what it held privately, sampled: part of its RSS (which adds the mapped files' pages)
        assert s["peak_private_gb"] <= s["peak_rss_gb"], (name, s)
    assert summary["dim"] == 512 and (out / "geovote" / "pixels-8-512" / "index").is_dir()
    assert summary["max_peak_rss_gb"] == max(s["peak_rss_gb"] for s in summary["stages"].values())
    # the dataset is OSV-5M-shaped: train and test, no val
    assert (out / "train.csv").is_file() and (out / "test.csv").is_file() and not (out / "val.csv").exists()
    g = summary["geoscores"]
    assert set(g) >= {"tune (held-out train)", "query --split test", "geovote", "1-nn", "knn-mean", "classification",
                      "regression", "hybrid", "mean-location", "top-cell", "oracle"}
    # plausible: retrieval beats knowing nothing and stays below the retrieval ceiling
    assert g["mean-location"] < g["geovote"] < g["oracle"]
    # two processes, one engine: retrieve.query's predictions score as benchmark.run's geovote method
    assert g["query --split test"] == g["geovote"]
    results = json.loads((out / "run" / "results.json").read_text())
    assert results["n"] == 300 and results["validation"]["heads"].startswith("train (held out")
    # the vectors carry geography: the nearest image alone already beats the mean location
    assert g["1-nn"] > g["mean-location"]


def test_rehearsal_refuses_a_width_of_nothing(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["--train", "200", "--test", "10", "--dim", "0", "--out", str(tmp_path / "r")])
    assert e.value.code == 2 and "--dim must be at least 1" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()  # refused before anything was written
