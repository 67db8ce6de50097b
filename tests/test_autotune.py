"""An IVF index measures its own nprobe and shortlist when built (index.autotune): the pick must hold
for queries it never saw (brute force), be the cheapest on its grid, and be what searches use."""
import json

import numpy as np

from geovote.shards import write_shard
from index.autotune import PLATEAU, _without_own_row
from index.build import build_index
from index.search import GeoIndex
from index.synthetic import clustered_vectors


def test_own_row_is_dropped_by_hand():
    found = np.array([[7, 3, 9], [1, 2, 4], [5, 6, 8]])
    own = np.array([3, 4, 0])  # second place, last place, absent (the last is dropped)
    np.testing.assert_array_equal(_without_own_row(found, own, 2), [[7, 9], [1, 2], [5, 6]])


def test_measured_settings_hold_for_new_queries_and_are_the_cheapest_on_the_grid(tmp_path):
    dim = 32
    both = clustered_vectors(40_300, dim, n_clusters=100, latent_dim=10, seed=11)
    vectors, held_out = both[:40_000], both[40_000:]
    shards = tmp_path / "shards"
    shards.mkdir()
    write_shard(shards / "shard-00000.parquet", [str(i) for i in range(40_000)], np.zeros(40_000),
                np.zeros(40_000), vectors)
    (shards / "manifest.json").write_text(json.dumps({"dim": dim}))
    info = build_index(shards, tmp_path / "index", factory="IVF128,PQ8x4fs", log=lambda *_: None)
    m = info["search_measured"]
    assert (info["nprobe"], info["shortlist"]) == (m["nprobe"], m["shortlist"]) and m["reached"]
    grid = {tuple(int(x) for x in key.removeprefix("nprobe ").split(" x")): r for key, r in m["grid"].items()}
    longest = max(s for _, s in grid)
    plateau = grid[(max(p for p, _ in grid), longest)]
    # the fewest lists within PLATEAU of the most (and at the target), then the shortest list reaching it
    floor = max(m["target_recall"], plateau - PLATEAU)
    assert grid[(m["nprobe"], longest)] >= floor
    assert all(grid[(p, longest)] < floor for p, s in grid if s == longest and p < m["nprobe"])
    assert all(r < m["target_recall"] for (p, s), r in grid.items() if p == m["nprobe"] and s < m["shortlist"])
    assert grid[(m["nprobe"], m["shortlist"])] >= m["target_recall"]
    # queries the measurement never saw, against brute force over the index's own vectors
    idx = GeoIndex(tmp_path / "index")
    base = np.asarray(idx.vectors, np.float32)
    truth = np.argsort(-(held_out @ base.T), axis=1)[:, :10]

    def recall(found):
        return np.mean([len(set(a) & set(b)) / 10 for a, b in zip(found, truth)])

    chosen = recall(idx.search(held_out, 10).rows)  # the stored settings
    assert chosen >= m["target_recall"] - 0.02, chosen
    shorter = max(s for p, s in grid if p == m["nprobe"] and s < m["shortlist"])
    assert recall(idx.search(held_out, 10, shortlist=shorter).rows) < chosen  # the measured pick mattered


def test_given_settings_override_the_measured_ones(tmp_path):
    vectors = clustered_vectors(20_000, 16, n_clusters=40, latent_dim=6, seed=2)
    shards = tmp_path / "shards"
    shards.mkdir()
    write_shard(shards / "shard-00000.parquet", [str(i) for i in range(20_000)], np.zeros(20_000),
                np.zeros(20_000), vectors)
    (shards / "manifest.json").write_text(json.dumps({"dim": 16}))
    info = build_index(shards, tmp_path / "index", factory="IVF64,PQ4x4fs", shortlist=77,
                       log=lambda *_: None)
    assert info["shortlist"] == 77 and info["nprobe"] == info["search_measured"]["nprobe"]
    assert GeoIndex(tmp_path / "index").info["shortlist"] == 77


def test_out_of_reach_keeps_the_defaults_and_says_so(tmp_path):
    """Near-isotropic vectors that 4-byte codes cannot order: no setting on the grid reaches the target,
    so the index keeps the defaults (not the most expensive settings for a little recall)."""
    from index.build import default_shortlist
    from index.search import DEFAULT_NPROBE

    n, dim = 20_000, 64
    vectors = np.random.default_rng(5).normal(size=(n, dim)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    shards = tmp_path / "shards"
    shards.mkdir()
    write_shard(shards / "shard-00000.parquet", [str(i) for i in range(n)], np.zeros(n), np.zeros(n), vectors)
    (shards / "manifest.json").write_text(json.dumps({"dim": dim}))
    said = []
    info = build_index(shards, tmp_path / "index", factory="IVF64,PQ8x4fs", log=said.append)
    m = info["search_measured"]
    assert not m["reached"] and max(m["grid"].values()) < m["target_recall"]
    assert (info["nprobe"], info["shortlist"]) == (DEFAULT_NPROBE, default_shortlist(n))
    assert m["grid"][f"nprobe {DEFAULT_NPROBE} x{default_shortlist(n)}"] == m["recall"]
    assert any("out of reach" in line for line in said)
