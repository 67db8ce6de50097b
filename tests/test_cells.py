"""QuadTree and H3 cells against brute force and hand-computed cases."""
import h3
import numpy as np
import pytest

from geovote.cells import H3Cells, QuadTree


def _brute_quadtree(lat, lon, max_points, max_depth):
    """OSV-5M's recursive algorithm, point lists and all: leaves as (path, box, indices), depth first."""
    leaves = []

    def split(idx, box, path, depth_left):
        lat_lo, lon_lo, lat_hi, lon_hi = box
        if depth_left > 0 and len(idx) >= max_points:
            mid_lat, mid_lon = (lat_lo + lat_hi) / 2, (lon_lo + lon_hi) / 2
            quads = [
                ((lat[idx] < mid_lat) & (lon[idx] < mid_lon), (lat_lo, lon_lo, mid_lat, mid_lon)),
                ((lat[idx] < mid_lat) & (lon[idx] >= mid_lon), (lat_lo, mid_lon, mid_lat, lon_hi)),
                ((lat[idx] >= mid_lat) & (lon[idx] < mid_lon), (mid_lat, lon_lo, lat_hi, mid_lon)),
                ((lat[idx] >= mid_lat) & (lon[idx] >= mid_lon), (mid_lat, mid_lon, lat_hi, lon_hi)),
            ]
            for q, (mask, child) in enumerate(quads):
                if mask.any():
                    split(idx[mask], child, path + str(q), depth_left - 1)
        else:
            leaves.append((path, box, idx))

    split(np.arange(lat.size), (lat.min(), lon.min(), lat.max(), lon.max()), "", max_depth)
    return leaves


def _clustered(n, seed=0):
    rng = np.random.default_rng(seed)
    centers = np.stack([rng.uniform(-50, 65, 30), rng.uniform(-170, 170, 30)], 1)
    pick = centers[rng.integers(0, 30, n)]
    return (np.clip(pick[:, 0] + rng.normal(0, 3, n), -89, 89),
            np.clip(pick[:, 1] + rng.normal(0, 5, n), -180, 179.99))


@pytest.mark.parametrize("max_points, max_depth", [(100, 10), (500, 3), (20000, 10), (1, 4)])
def test_quadtree_equals_the_recursive_algorithm(max_points, max_depth):
    lat, lon = _clustered(6000)
    tree = QuadTree.build(lat, lon, max_points, max_depth)
    brute = _brute_quadtree(lat, lon, max_points, max_depth)
    assert tree.n_leaves == len(brute)
    leaf_of_point = tree.assign_leaf(lat, lon)
    for i, (path, box, idx) in enumerate(brute):
        node = tree.leaves[i]
        assert tree.depth[node] == len(path)
        np.testing.assert_allclose(tree.box[node], box)
        assert tree.count[node] == idx.size
        assert tree.lat_mean[node] == pytest.approx(lat[idx].mean())
        assert tree.lon_min[node] == lon[idx].min() and tree.lat_max[node] == lat[idx].max()
        assert np.all(leaf_of_point[idx] == i)  # training points fall in their own leaf
    assert tree.count[0] == lat.size and tree.count[tree.leaves].sum() == lat.size


def test_quadtree_hand_computed():
    # one point per quadrant of the box [0, 10] x [0, 10]
    lat = np.array([0.0, 1.0, 9.0, 10.0])
    lon = np.array([0.0, 9.0, 1.0, 10.0])
    tree = QuadTree.build(lat, lon, max_points=4, max_depth=10)
    assert tree.n_leaves == 4
    np.testing.assert_array_equal(tree.assign_leaf(lat, lon), [0, 1, 2, 3])
    np.testing.assert_allclose(tree.box[tree.leaves[1]], [0, 5, 5, 10])
    # a point in the lower-right quadrant, wherever: class 1
    assert tree.assign_leaf([2.0], [7.0])[0] == 1
    # fewer points than max_points: one cell, the root
    assert QuadTree.build(lat, lon, max_points=5).n_leaves == 1


def test_empty_quadrant_goes_to_the_nearest_sibling():
    # three clusters; the upper-right quadrant of the root box has no point
    lat = np.array([0.0, 0.1, 0.0, 0.1, 10.0, 10.0])
    lon = np.array([0.0, 0.1, 10.0, 9.9, 0.0, 0.1])
    tree = QuadTree.build(lat, lon, max_points=3, max_depth=1)
    assert tree.n_leaves == 3
    # the empty quadrant's points go to whichever sibling's mean location is nearer
    assert tree.assign_leaf([9.5, 6.0], [6.0, 9.5]).tolist() == [2, 1]
    assert tree.assign_leaf([9.0], [1.0])[0] == 2 and tree.assign_leaf([1.0], [1.0])[0] == 0


def test_levels_are_ancestors_and_storage_round_trips(tmp_path):
    lat, lon = _clustered(4000, seed=2)
    tree = QuadTree.build(lat, lon, 200, 10)
    levels = tree.assign(lat, lon)
    assert levels.shape == (lat.size, tree.n_levels)
    assert np.all(levels[:, 0] == 0)
    np.testing.assert_array_equal(tree.leaf_of_node[levels[:, -1]], tree.assign_leaf(lat, lon))
    for j in range(1, tree.n_levels):
        moved = levels[:, j] != levels[:, j - 1]
        np.testing.assert_array_equal(tree.parent[levels[moved, j]], levels[moved, j - 1])
    tree.save(tmp_path / "qt.npz")
    back = QuadTree.load(tmp_path / "qt.npz")
    np.testing.assert_array_equal(back.assign(lat, lon), levels)
    assert (back.max_points, back.max_depth) == (200, 10)
    lat_c, lon_c = back.centers(levels[:, -1])
    assert np.all(np.isfinite(lat_c)) and np.all(np.isfinite(lon_c))


def test_h3_cells_match_h3_point_by_point():
    lat = np.array([0.0, 89.9, -89.9, 10.0, -16.5, -16.5, 51.5])
    lon = np.array([0.0, 45.0, -120.0, 179.99, -179.99, 179.99, -0.1])
    cells = H3Cells((1, 3, 5))
    out = cells.assign(lat, lon)
    assert out.shape == (7, 3) and out.dtype == np.int64
    for i in range(7):
        for j, res in enumerate((1, 3, 5)):
            assert h3.int_to_str(int(np.int64(out[i, j]).view(np.uint64))) == h3.latlng_to_cell(
                lat[i], lon[i], res)
    # centres lie in their cells
    c_lat, c_lon = cells.centers(out[:, 2])
    for a, b, cell in zip(c_lat, c_lon, out[:, 2]):
        assert h3.latlng_to_cell(a, b, 5) == h3.int_to_str(int(np.int64(cell).view(np.uint64)))
    with pytest.raises(ValueError):
        H3Cells((16,))
