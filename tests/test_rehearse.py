"""benchmark.rehearse end to end at a small size: every stage after embedding, each in its own process, on a
fabricated OSV-5M-shaped dataset without val."""
import json

import pytest

from benchmark.rehearse import STAGES, main


def test_rehearsal_runs_every_stage_and_reports_them(tmp_path, capsys):
    out = tmp_path / "rehearse"
    assert main(["--train", "20000", "--test", "2000", "--dim", "48", "--out", str(out), "--head-minutes", "0.1",
                 "--bootstrap", "20"]) == 0
    printed = capsys.readouterr().out
    summary = json.loads(printed.strip().splitlines()[-1])
    assert list(summary["stages"]) == list(STAGES)
    for name, s in summary["stages"].items():
        assert s["rc"] == 0 and s["wall_s"] > 0, name
        assert 0.05 < s["peak_rss_gb"] < 16, (name, s)  # a real process's peak, within the machine
        # what it held privately, sampled: part of its RSS (which adds the mapped files' pages)
        assert 0.02 < s["peak_private_gb"] <= s["peak_rss_gb"], (name, s)
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
    assert results["n"] == 2000 and results["validation"]["heads"].startswith("train (held out")
    # the vectors carry geography: the nearest image alone already beats the mean location
    assert g["1-nn"] > g["mean-location"]


def test_rehearsal_refuses_a_dimension_no_pixels_model_has(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["--train", "200", "--test", "10", "--dim", "64", "--out", str(tmp_path / "r")])
    assert e.value.code == 2 and "--dim must be 3 N^2" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()  # refused before anything was written
