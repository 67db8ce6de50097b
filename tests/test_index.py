"""The FAISS index: search against brute force, alignment of coordinates and ids, every refusal."""
import json

import numpy as np
import pytest

from geovote.shards import write_shard
from index.build import build_index, choose_factory
from index.exact import exact_topk
from index.search import GeoIndex, INDEX_VERSION, IndexError_
from index.synthetic import clustered_vectors

DIM = 64


def _shards(folder, vectors, per_shard=3000, backbone="test-backbone"):
    folder.mkdir(parents=True)
    n = len(vectors)
    rng = np.random.default_rng(1)
    lat, lon = rng.uniform(-90, 90, n), rng.uniform(-180, 180, n)
    ids = np.array([f"img{i:06d}" for i in range(n)], dtype=object)
    for j, start in enumerate(range(0, n, per_shard)):
        sl = slice(start, start + per_shard)
        write_shard(folder / f"shard-{j:05d}.parquet", ids[sl], lat[sl], lon[sl], vectors[sl])
    (folder / "manifest.json").write_text(json.dumps({"backbone": backbone, "dim": vectors.shape[1],
                                                      "rows": n}))
    return ids, lat, lon


def _source(found):
    """Each result's row in the shards (ids are img<row>): an IVF index numbers its rows list by list."""
    return np.vectorize(lambda i: int(i[3:]) if i else -1, otypes=[np.int64])(found.ids)


def _brute(vectors16, queries, k):
    sim = queries @ vectors16.astype(np.float32).T
    rows = np.argsort(-sim, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(sim, rows, 1), rows


def test_choose_factory():
    assert choose_factory(10_000, 512) == "Flat"
    assert choose_factory(1_000_000, 512) == "IVF1024_HNSW32,PQ128x4fs"
    assert choose_factory(200_000, 512) == "IVF512,PQ128x4fs"
    assert choose_factory(5_000_000, 768) == "IVF2048_HNSW32,PQ192x4fs"


def test_shortlist_fallback_grows_with_the_index():
    from index.build import default_shortlist

    assert default_shortlist(20_000) == default_shortlist(1_000_000) == 30
    assert default_shortlist(5_000_000) == 100
    assert default_shortlist(2_000_000) == 50


def test_refine_file_is_what_faiss_itself_writes(tmp_path):
    """refine.faiss is streamed by hand in FAISS's layout; it must be byte for byte faiss.write_index's."""
    import faiss

    vectors = clustered_vectors(700, DIM, seed=3)
    _shards(tmp_path / "shards", vectors, per_shard=300)
    build_index(tmp_path / "shards", tmp_path / "index", log=lambda *_: None)
    sq = faiss.IndexScalarQuantizer(DIM, faiss.ScalarQuantizer.QT_fp16, faiss.METRIC_INNER_PRODUCT)
    sq.add(vectors.astype(np.float16).astype(np.float32))
    faiss.write_index(sq, str(tmp_path / "reference.faiss"))
    assert (tmp_path / "index" / "refine.faiss").read_bytes() == (tmp_path / "reference.faiss").read_bytes()
    np.testing.assert_array_equal(GeoIndex(tmp_path / "index").vectors, vectors.astype(np.float16))


def test_exact_index_equals_brute_force_and_keeps_coordinates(tmp_path):
    vectors = clustered_vectors(7000, DIM, n_clusters=50, latent_dim=8, seed=0)
    ids, lat, lon = _shards(tmp_path / "shards", vectors)
    info = build_index(tmp_path / "shards", tmp_path / "index", log=lambda *_: None)
    assert info["factory"] == "Flat" and info["count"] == 7000 and info["backbone"] == "test-backbone"
    idx = GeoIndex(tmp_path / "index")
    queries = clustered_vectors(50, DIM, n_clusters=50, latent_dim=8, seed=0)  # same distribution
    res = idx.search(queries, k=10)
    b_sim, b_rows = _brute(vectors.astype(np.float16), queries, 10)
    assert (res.rows == b_rows).mean() > 0.99  # ties in fp16 may swap neighbours of equal score
    np.testing.assert_allclose(res.similarity, b_sim, atol=2e-3)
    # coordinates and ids travel with each row
    np.testing.assert_array_equal(res.ids, ids[res.rows])
    np.testing.assert_array_equal(res.lat_deg, lat[res.rows])
    np.testing.assert_array_equal(res.lon_deg, lon[res.rows])


def test_ivfpq_with_rerank_matches_brute_force(tmp_path):
    both = clustered_vectors(60_200, DIM, n_clusters=200, latent_dim=12, seed=2)
    vectors, queries = both[:60_000], both[60_000:]  # queries from the same distribution, not in the index
    ids, lat, lon = _shards(tmp_path / "shards", vectors, per_shard=25_000)
    info = build_index(tmp_path / "shards", tmp_path / "index", log=lambda *_: None)
    assert info["factory"] == "IVF256,PQ16x4fs"
    idx = GeoIndex(tmp_path / "index")
    v32 = vectors.astype(np.float16).astype(np.float32)
    _, b_rows = _brute(vectors.astype(np.float16), queries, 10)
    recall = lambda src: np.mean([len(set(a) & set(b)) / 10 for a, b in zip(src, b_rows)])  # noqa: E731
    reranked = idx.search(queries, k=10, nprobe=32)
    pq_only = idx.search(queries, k=10, nprobe=32, rerank=False)
    assert recall(_source(reranked)) > recall(_source(pq_only)) + 0.2  # exact re-ranking buys the recall
    assert np.all(np.diff(reranked.similarity, axis=1) <= 1e-6)  # best first
    # re-ranked similarities are the exact fp16 inner products, and the best of the shortlist
    exact = np.einsum("qkd,qd->qk", v32[_source(reranked)], queries)
    np.testing.assert_allclose(reranked.similarity, exact, atol=1e-4)
    cand = _source(idx.search(queries, k=10 * idx.info["shortlist"], nprobe=32, rerank=False))
    best_of_cand = -np.sort(-np.einsum("qcd,qd->qc", v32[cand], queries), axis=1)[:, :10]
    np.testing.assert_allclose(reranked.similarity, best_of_cand, atol=1e-4)
    np.testing.assert_array_equal(reranked.ids, np.char.decode(np.asarray(idx.ids)[reranked.rows], "utf-8"))
    np.testing.assert_array_equal(reranked.lat_deg, lat[_source(reranked)])
    np.testing.assert_array_equal(reranked.lon_deg, lon[_source(reranked)])
    # every list probed and a long shortlist: the exact answer (similarities equal, so ties may swap rows)
    full = idx.search(queries, k=10, nprobe=256, shortlist=200)
    b_sim = -np.sort(-(v32 @ queries.T).T, axis=1)[:, :10]
    np.testing.assert_allclose(full.similarity, b_sim, atol=1e-5)
    assert recall(_source(full)) >= 0.995


def test_ivf_rows_run_in_list_order_with_their_vectors_coordinates_and_ids(tmp_path):
    """build_index numbers an IVF index's rows list by list (so a query's re-rank reads nprobe runs of the
    copy): every row must still carry its own vector, coordinates and id, and each list be one run."""
    import faiss

    vectors = clustered_vectors(60_000, DIM, n_clusters=200, latent_dim=12, seed=2)
    ids, lat, lon = _shards(tmp_path / "shards", vectors, per_shard=25_000)
    build_index(tmp_path / "shards", tmp_path / "index", log=lambda *_: None)
    idx = GeoIndex(tmp_path / "index")
    src = np.array([int(i[3:]) for i in np.char.decode(np.asarray(idx.ids), "utf-8")])
    assert sorted(src) == list(range(60_000)) and not np.array_equal(src, np.arange(60_000))
    np.testing.assert_array_equal(idx.vectors, vectors[src].astype(np.float16))
    np.testing.assert_array_equal(idx.lat, lat[src])
    np.testing.assert_array_equal(idx.lon, lon[src])
    invlists = faiss.extract_index_ivf(idx.index).invlists
    runs = [faiss.rev_swig_ptr(invlists.get_ids(j), invlists.list_size(j)).copy()
            for j in range(invlists.nlist) if invlists.list_size(j)]
    for run in runs:
        np.testing.assert_array_equal(run, np.arange(run[0], run[0] + len(run)))
    assert sum(map(len, runs)) == 60_000


def test_the_one_exact_search_equals_brute_force_on_both_routes(monkeypatch):
    """index.exact: the CPU route (FAISS over blocks of rows, merged) and the torch route (a tensor,
    batches of queries), each against a brute-force pass, on all rows and on a subset."""
    import torch

    import index.exact

    vectors = clustered_vectors(3000, DIM, n_clusters=30, latent_dim=8, seed=4)
    queries = clustered_vectors(20, DIM, n_clusters=30, latent_dim=8, seed=5)
    subset = np.sort(np.random.default_rng(0).choice(3000, 700, replace=False))
    monkeypatch.setattr(index.exact, "SCORE_BYTES", 7 * 3000 * 4)  # torch: 7 queries a batch
    monkeypatch.setattr(index.exact, "BLOCK_ROWS", 256)  # numpy: many blocks to merge
    for rows in (None, subset):
        base = vectors if rows is None else vectors[rows]
        b_sim, b_rows = _brute(base, queries, 5)
        b_rows = b_rows if rows is None else rows[b_rows]
        for given in (vectors, torch.from_numpy(vectors)):
            sim, found = exact_topk(given, queries, k=5, rows=rows, device="cpu")
            np.testing.assert_allclose(sim, b_sim, atol=1e-5)
            assert (found == b_rows).mean() > 0.99


def test_a_query_finds_the_same_neighbours_alone_or_in_a_batch():
    """FAISS searches one query with another kernel than several, and with 2 threads the last bits
    differ: index.exact searches a lone query as one of two, so a server's answer does not depend on the
    batch it was put in."""
    import faiss

    rng = np.random.default_rng(7)
    vectors = rng.normal(size=(40_000, 256)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    queries = rng.normal(size=(8, 256)).astype(np.float32)
    threads = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(2)
    try:
        batch_sim, batch_rows = exact_topk(vectors, queries, 20, device="cpu")
        for i in range(len(queries)):
            sim, rows = exact_topk(vectors, queries[i:i + 1], 20, device="cpu")
            np.testing.assert_array_equal(sim[0], batch_sim[i])  # to the bit
            np.testing.assert_array_equal(rows[0], batch_rows[i])
    finally:
        faiss.omp_set_num_threads(threads)


def test_ties_keep_the_lowest_rows_whatever_the_blocks(monkeypatch):
    """3,000 rows made of 5 distinct vectors: every query's top 30 are tied in groups, and which tied rows
    survive must not depend on how the rows were split into blocks: the lowest, in order."""
    import index.exact

    rng = np.random.default_rng(3)
    distinct = rng.normal(size=(5, 16)).astype(np.float32)
    distinct /= np.linalg.norm(distinct, axis=1, keepdims=True)
    which = rng.integers(0, 5, 3000)
    vectors = distinct[which]
    queries = rng.normal(size=(50, 16)).astype(np.float32)
    one_sim, one_rows = exact_topk(vectors, queries, 30, device="cpu")
    monkeypatch.setattr(index.exact, "BLOCK_ROWS", 64)
    sim, rows = exact_topk(vectors, queries, 30, device="cpu")
    np.testing.assert_array_equal(rows, one_rows)
    np.testing.assert_array_equal(sim, one_sim)
    for q in range(len(queries)):  # by hand: the best vector's rows, lowest first, then the next's
        order = np.argsort(-(distinct @ queries[q]), kind="stable")
        want = np.concatenate([np.flatnonzero(which == v) for v in order])[:30]
        np.testing.assert_array_equal(rows[q], want)


def test_a_deeper_search_begins_with_the_shallower_one():
    """Tuning searches 50 deep and a query 20: the first 20 must be the same rows, ties included (faiss
    keeps any k of equal similarities; with TIE_MARGIN more asked, the lowest rows win). Near-copies of
    40 vectors make such ties at rank 20; without the margin 4 of these 200 queries differed."""
    rng = np.random.default_rng(3)
    distinct = rng.normal(size=(40, 16)).astype(np.float32)
    vectors = distinct[rng.integers(0, 40, 3000)] + rng.normal(scale=1e-4, size=(3000, 16)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    queries = rng.normal(size=(200, 16)).astype(np.float32)
    sim20, rows20 = exact_topk(vectors, queries, 20, device="cpu")
    sim50, rows50 = exact_topk(vectors, queries, 50, device="cpu")
    np.testing.assert_array_equal(rows20, rows50[:, :20])
    np.testing.assert_array_equal(sim20, sim50[:, :20])


@pytest.fixture(scope="module")
def small_index(tmp_path_factory):
    root = tmp_path_factory.mktemp("idx")
    _shards(root / "shards", clustered_vectors(500, DIM, n_clusters=10, latent_dim=4, seed=6))
    build_index(root / "shards", root / "index", log=lambda *_: None)
    return root / "index"


def test_refusals(small_index, tmp_path):
    idx = GeoIndex(small_index)
    with pytest.raises(IndexError_, match="dimension 32 does not match the index's 64"):
        idx.search(np.ones((1, 32)), k=3)
    q = np.ones((2, DIM))
    q[1, 3] = np.nan
    with pytest.raises(IndexError_, match="NaN"):
        idx.search(q, k=3)
    with pytest.raises(IndexError_, match="all zeros"):
        idx.search(np.zeros(DIM), k=3)
    with pytest.raises(IndexError_, match="embedded with 'other'"):
        idx.search(np.ones(DIM), k=3, backbone="other")
    assert idx.search(np.ones(DIM), k=3, backbone="test-backbone").rows.shape == (1, 3)
    # more neighbours asked than vectors: the rest are marked missing
    res = idx.search(np.ones(DIM), k=600)
    assert (res.rows[0] >= 0).sum() == 500 and res.ids[0, -1] == "" and np.isnan(res.lat_deg[0, -1])


def test_incomplete_or_foreign_folders_are_refused(small_index, tmp_path):
    import shutil

    with pytest.raises(IndexError_, match="no index folder"):
        GeoIndex(tmp_path / "nothing")
    broken = tmp_path / "broken"
    shutil.copytree(small_index, broken)
    (broken / "latitude.npy").unlink()
    with pytest.raises(IndexError_, match="incomplete: missing latitude.npy"):
        GeoIndex(broken)
    old = tmp_path / "old"
    shutil.copytree(small_index, old)
    info = json.loads((old / "index.json").read_text())
    info["version"] = 0
    (old / "index.json").write_text(json.dumps(info))
    with pytest.raises(IndexError_, match="version 0"):
        GeoIndex(old)
    info["version"], info["count"] = INDEX_VERSION, 499
    (old / "index.json").write_text(json.dumps(info))
    with pytest.raises(IndexError_, match="499"):
        GeoIndex(old)


def test_bad_shards_are_refused(tmp_path):
    v = clustered_vectors(100, DIM, seed=7)
    v[5, 0] = np.nan
    _shards(tmp_path / "shards", v)
    with pytest.raises(IndexError_, match="NaN"):
        build_index(tmp_path / "shards", tmp_path / "index", log=lambda *_: None)
    assert not (tmp_path / "index").exists()


@pytest.mark.slow
def test_an_opq_rotated_index_takes_nprobe_and_reranks_exactly(tmp_path):
    """An OPQ rotation in front of the IVF (an IndexPreTransform, as index_bench --factories builds) still
    gets nprobe through the re-rank stage's parameters, and re-ranks exactly."""
    both = clustered_vectors(10_100, DIM, n_clusters=300, latent_dim=12, seed=7)
    vectors, queries = both[:10_000], both[10_000:]
    _shards(tmp_path / "shards", vectors, per_shard=5_000)
    info = build_index(tmp_path / "shards", tmp_path / "index", factory="OPQ8_64,IVF64,PQ16x4fs",
                       log=lambda *_: None)
    assert info["factory"] == "OPQ8_64,IVF64,PQ16x4fs"
    idx = GeoIndex(tmp_path / "index")
    b_sim, b_rows = _brute(vectors.astype(np.float16), queries, 10)
    recall = lambda rows: np.mean([len(set(a) & set(b)) / 10 for a, b in zip(rows, b_rows)])  # noqa: E731
    one, every = idx.search(queries, 10, nprobe=1), idx.search(queries, 10, nprobe=64, shortlist=100)
    assert recall(_source(one)) < recall(_source(every)) - 0.05  # nprobe reached the IVF level
    np.testing.assert_allclose(every.similarity, b_sim, atol=1e-4)  # every list, long shortlist: exact
