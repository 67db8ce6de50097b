"""Datasets without a val split (OSV-5M has train and test only): benchmark.run and finetune.train validate
on a slice held out of train, and nothing of that slice is trained on."""
import csv
import json
import os
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from geovote.data import read_split
from geovote.geo import haversine_km
from geovote.holdout import HOLDOUT_NAME

TINY = json.dumps({"embed_dim": 16, "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 32, "layers": 1,
                                                   "head_width": 16}})


@pytest.fixture(scope="module")
def noval_root(sample_root, tmp_path_factory):
    """The small sample without val.csv, its train.csv with capture sequences of 5 images."""
    root = tmp_path_factory.mktemp("noval")
    with open(sample_root / "train.csv", newline="") as f, open(root / "train.csv", "w", newline="") as g:
        reader = csv.DictReader(f)
        writer = csv.DictWriter(g, [*reader.fieldnames, "sequence"])
        writer.writeheader()
        for i, row in enumerate(reader):
            writer.writerow({**row, "sequence": f"seq{i // 5}"})
    (root / "test.csv").write_bytes((sample_root / "test.csv").read_bytes())
    os.symlink(sample_root / "images", root / "images")
    return root


@pytest.fixture(scope="module")
def noval_engine(noval_root, tiny_model, tmp_path_factory):
    from embed.build import main as embed_main

    out = tmp_path_factory.mktemp("noval-engine")
    assert embed_main(["--data", str(noval_root), "--model", str(tiny_model), "--out", str(out),
                       "--workers", "0", "--splits", "train"]) == 0
    return out


@pytest.mark.slow
def test_benchmark_run_without_val(noval_root, noval_engine, tmp_path, capsys):
    from benchmark.run import main as run_main

    out = tmp_path / "run"
    assert run_main(["--data", str(noval_root), "--engine", str(noval_engine), "--out", str(out),
                     "--set", "bootstrap=20", "--set", "head_epochs=2"]) == 0
    printed = capsys.readouterr().out
    results = json.loads((out / "results.json").read_text())
    assert results["validation"] == {"voting": "train (held out of its own search)", "heads": HOLDOUT_NAME}
    from benchmark.methods import METHODS

    # every method but the paper's released network, which needs an engine built with it (and says so)
    assert [m["name"] for m in results["methods"]] == [m for m in METHODS if m != "osv5m-baseline"]
    assert "osv5m-baseline: left out" in printed
    n_test = len(read_split(noval_root, "test", check_images=False))
    assert all(m["n"] == n_test for m in results["methods"])
    assert printed.count("head: validation GeoScore") == 3 and "train images held out" in printed


@pytest.mark.slow
def test_heads_never_train_on_the_held_out_rows(noval_root, noval_engine):
    """The stream the heads train on yields every kept row exactly once an epoch, and no excluded one."""
    from benchmark.evaluate import load_validation
    from benchmark.methods import train_batches
    from geovote.shards import read_coordinates, read_embeddings
    from retrieve.engine import Engine

    engine = Engine(Path(noval_engine) / "index", load_model=False)
    val = load_validation(engine, noval_root, seed=0, log=lambda m: None)
    n = engine.index.count
    assert val.excluded.shape == (n,) and 0 < val.excluded.sum() < n // 2
    seen = []
    all_emb = read_embeddings(engine.layout.embeddings("train")).embedding
    for rows, x in train_batches(engine.layout.embeddings("train"), ~val.excluded, 64, np.random.default_rng(0),
                                 buffer_shards=1):
        np.testing.assert_array_equal(x, all_emb[rows])  # each batch's vectors are its rows' own
        seen.append(rows)
    seen = np.concatenate(seen)
    np.testing.assert_array_equal(np.sort(seen), np.flatnonzero(~val.excluded))
    # the validation rows are the held-out ones: their vectors, at their truth
    held = np.flatnonzero(val.excluded)
    lat = read_coordinates(engine.layout.embeddings("train")).lat_deg  # shard order, as `excluded`
    assert np.isin(val.lat, lat[held]).all()


@pytest.mark.slow
def test_an_index_in_its_own_row_order_changes_nothing_the_heads_see(noval_root, noval_engine, tiny_model,
                                                                   tmp_path):
    """An IVF index numbers its rows list by list, the shards keep theirs: the holdout, its exclusions and
    the heads' labels (all in shard order) must be what they are over a Flat index of the same shards,
    so the heads' predictions are the same to the bit (their training is seeded)."""
    from benchmark.evaluate import load_validation
    from benchmark.run import main as run_main
    from embed.build import main as embed_main
    from retrieve.engine import Engine

    ivf_engine = tmp_path / "ivf"
    assert embed_main(["--data", str(noval_root), "--model", str(tiny_model), "--out", str(ivf_engine),
                       "--workers", "0", "--splits", "train", "--set", "index_factory='IVF16,Flat'"]) == 0
    flat, ivf = (Engine(Path(e) / "index", load_model=False) for e in (noval_engine, ivf_engine))
    assert sorted(ivf.index.ids) == sorted(flat.index.ids) and list(ivf.index.ids) != list(flat.index.ids)
    # tuning's carve drops each query's own sequence from its neighbours, whatever the index's row order
    from retrieve.tuning import carve_from_train, split_sequences

    q_ids, emb, _, _, exclude = carve_from_train(ivf, noval_root, n=200)
    kept = exclude(ivf.search(emb, 60))
    all_ids = np.char.decode(np.asarray(ivf.index.ids), "utf-8")
    seq_of = dict(zip(all_ids, split_sequences(noval_root, all_ids)))
    shared = [seq_of[q] == seq_of[i] for q, row in zip(q_ids, kept.ids) for i in row if i]
    assert len(shared) > 0 and not any(shared)
    a, b = (load_validation(e, noval_root, seed=0, log=lambda m: None) for e in (flat, ivf))
    np.testing.assert_array_equal(a.excluded, b.excluded)
    np.testing.assert_array_equal(a.lat, b.lat)
    predicted = []
    for engine in (noval_engine, ivf_engine):
        out = tmp_path / f"run-{len(predicted)}"
        assert run_main(["--data", str(noval_root), "--engine", str(engine), "--out", str(out), "--methods",
                         "regression", "classification", "--set", "bootstrap=5", "--set", "head_epochs=1"]) == 0
        predicted.append([pq.read_table(out / "predictions" / f"{m}.parquet")
                          for m in ("regression", "classification")])
    for x, y in zip(*predicted):
        for column in ("id", "latitude", "longitude"):
            np.testing.assert_array_equal(x.column(column).to_numpy(), y.column(column).to_numpy())


@pytest.mark.slow
def test_tuning_without_val_carves_whole_sequences_for_the_album_model(noval_root, noval_engine):
    """Without val, the album model's tuning albums are train sequences carved whole: of 300 carved rows,
    20 sequences complete (5 images each) beside random rows, which would almost never complete one; the
    engine's album model is fitted on the held-out train images' albums."""
    from retrieve.engine import Engine
    from retrieve.tuning import carve_sets, split_sequences

    engine = Engine(Path(noval_engine) / "index", load_model=False)
    (q_ids, *_), = carve_sets(engine, noval_root, [(300, 3, 1.0, 20)])
    assert len(q_ids) == 300
    seq = split_sequences(noval_root, q_ids)
    names, counts = np.unique(seq, return_counts=True)
    assert (counts == 5).sum() >= 20
    (plain_ids, *_), = carve_sets(engine, noval_root, [(300, 3, 1.0)])
    assert (np.unique(split_sequences(noval_root, plain_ids), return_counts=True)[1] == 5).sum() <= 2
    saved = json.loads((Path(noval_engine) / "index" / "retrieve.json").read_text())["albums"]
    assert saved["fitted"] and saved["albums"]["train (held out of its own search)"] >= 20
    assert engine.albums.model is not None


def test_finetune_validates_on_held_out_train_rows(noval_root, tmp_path, capsys):
    from finetune.trainer import TrainConfig, load_data, train

    cfg = TrainConfig(data=str(noval_root), arch=TINY, epochs=1, batch_size=128, workers=0, warmup_steps=2,
                      out=str(tmp_path / "ft"), quadtree_max_points=200, lr=3e-3)
    data = load_data(cfg, log=lambda m: None)
    assert data.val.name == HOLDOUT_NAME and len(data.val) == 200  # a tenth of the 2,000 train rows
    tr, va = data.train, data.val
    assert not set(va.ids.astype(str)) & set(tr.ids.astype(str))
    assert not set(va.column("sequence").astype(str)) & set(tr.column("sequence").astype(str))
    d_km = haversine_km(tr.lat_deg[:, None], tr.lon_deg[:, None], va.lat_deg[None], va.lon_deg[None])
    assert d_km.min() >= 1.0
    assert len(tr) + len(va) <= 2000 and len(tr) >= 2000 - 5 * 200 - 50  # sequences of 5, a few near-twins
    state = train(cfg)
    assert 0 < state["best"] <= 5000 and state["history"][0]["val_geoscore"] == state["best"]
    assert "no val split: validating on 200 train images held out" in capsys.readouterr().out
