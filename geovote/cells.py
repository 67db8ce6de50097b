"""Cells over the globe: OSV-5M's adaptive QuadTree and H3, behind one small interface.

Both answer `assign(lat_deg, lon_deg) -> (N, n_levels)` cell ids, coarse to fine, and `centers(cells,
level)`. The kNN vote and the paper's heads use only that.

QuadTree, as OSV-5M builds `quadtree_10_1000`: the root box is the training points' bounding box; a box
holding at least `max_points` points and shallower than `max_depth` is split at its midpoint into four
(lat < mid or not, lon < mid or not); empty children are dropped; leaves are the classes, numbered in
depth-first order (children in the order lat<,lon< / lat<,lon>= / lat>=,lon< / lat>=,lon>=). Each node
keeps its box and the count, min, max and mean of the latitudes and longitudes of its points.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

from geovote.geo import haversine_km


class CellSystem(Protocol):
    n_levels: int

    def assign(self, lat_deg, lon_deg) -> np.ndarray:
        """(N,) points -> (N, n_levels) int64 cell ids, coarse to fine."""

    def centers(self, cells: np.ndarray, level: int) -> tuple[np.ndarray, np.ndarray]:
        """Representative (lat_deg, lon_deg) of cells of `level`."""


_NODE_ARRAYS = (
    "box", "depth", "parent", "children", "path_code", "count",
    "lat_min", "lat_max", "lat_mean", "lon_min", "lon_max", "lon_mean", "leaves",
)


@dataclass
class QuadTree:
    """Nodes in arrays; node 0 is the root. `leaves[i]` is the node of class i."""

    max_points: int
    max_depth: int
    box: np.ndarray  # (n_nodes, 4) float64: lat_lo, lon_lo, lat_hi, lon_hi (the split geometry)
    depth: np.ndarray  # (n_nodes,) int64
    parent: np.ndarray  # (n_nodes,) int64, -1 for the root
    children: np.ndarray  # (n_nodes, 4) int64, -1 where a quadrant held no point
    path_code: np.ndarray  # (n_nodes,) int64: the quadrant path in base 5, for depth-first order
    count: np.ndarray  # (n_nodes,) points in the node
    lat_min: np.ndarray
    lat_max: np.ndarray
    lat_mean: np.ndarray
    lon_min: np.ndarray
    lon_max: np.ndarray
    lon_mean: np.ndarray
    leaves: np.ndarray  # (n_leaves,) node ids, depth-first

    @property
    def n_leaves(self) -> int:
        return len(self.leaves)

    @property
    def n_levels(self) -> int:
        return int(self.depth.max()) + 1

    @property
    def leaf_of_node(self) -> np.ndarray:
        out = np.full(len(self.depth), -1, np.int64)
        out[self.leaves] = np.arange(self.n_leaves)
        return out

    # --- building -------------------------------------------------------------------------------
    @classmethod
    def build(cls, lat_deg, lon_deg, max_points: int = 1000, max_depth: int = 10) -> "QuadTree":
        lat = np.asarray(lat_deg, np.float64)
        lon = np.asarray(lon_deg, np.float64)
        if lat.size == 0:
            raise ValueError("cannot build a QuadTree from no points")
        if max_depth > 25:  # path_code is base 5 in an int64
            raise ValueError(f"max_depth {max_depth} > 25")
        box = [np.array([[lat.min(), lon.min(), lat.max(), lon.max()]])]
        depth, parent, path = [np.array([0])], [np.array([-1])], [np.array([0])]
        children = [np.full((1, 4), -1, np.int64)]
        node_of = np.zeros(lat.size, np.int64)  # each point's node at the current depth
        frontier = np.array([0])  # nodes created at the current depth
        n_nodes = 1
        for d in range(max_depth):
            counts = np.bincount(node_of, minlength=n_nodes)
            splitting = frontier[counts[frontier] >= max_points]
            if splitting.size == 0:
                break
            boxes = np.concatenate(box)
            is_split = np.zeros(n_nodes, bool)
            is_split[splitting] = True
            pts = np.flatnonzero(is_split[node_of])
            b = boxes[node_of[pts]]
            mid_lat, mid_lon = (b[:, 0] + b[:, 2]) / 2, (b[:, 1] + b[:, 3]) / 2
            quadrant = (lat[pts] >= mid_lat) * 2 + (lon[pts] >= mid_lon)
            keys, inverse = np.unique(node_of[pts] * 4 + quadrant, return_inverse=True)
            par, q = keys // 4, keys % 4
            new = n_nodes + np.arange(keys.size)
            pb = boxes[par]
            pmid_lat, pmid_lon = (pb[:, 0] + pb[:, 2]) / 2, (pb[:, 1] + pb[:, 3]) / 2
            upper, right = q >= 2, q % 2 == 1
            box.append(np.stack([
                np.where(upper, pmid_lat, pb[:, 0]), np.where(right, pmid_lon, pb[:, 1]),
                np.where(upper, pb[:, 2], pmid_lat), np.where(right, pb[:, 3], pmid_lon),
            ], axis=1))
            all_children = np.concatenate(children)
            all_children[par, q] = new
            children = [all_children, np.full((keys.size, 4), -1, np.int64)]
            depth.append(np.full(keys.size, d + 1))
            parent.append(par)
            all_path = np.concatenate(path)
            path.append(all_path[par] + (q + 1) * 5 ** (max_depth - d - 1))
            node_of[pts] = new[inverse]
            frontier = new
            n_nodes += keys.size
        tree = cls._from_parts(
            max_points, max_depth, np.concatenate(box), np.concatenate(depth), np.concatenate(parent),
            np.concatenate(children), np.concatenate(path),
        )
        tree._fill_stats(lat, lon, node_of)
        return tree

    @classmethod
    def _from_parts(cls, max_points, max_depth, box, depth, parent, children, path_code) -> "QuadTree":
        is_leaf = (children < 0).all(axis=1)
        leaves = np.flatnonzero(is_leaf)
        leaves = leaves[np.argsort(path_code[leaves], kind="stable")]
        n = len(depth)
        nan = np.full(n, np.nan)
        return cls(max_points, max_depth, box, depth, parent, children, path_code, np.zeros(n, np.int64),
                   nan.copy(), nan.copy(), nan.copy(), nan.copy(), nan.copy(), nan.copy(), leaves)

    def _fill_stats(self, lat: np.ndarray, lon: np.ndarray, leaf_node: np.ndarray) -> None:
        """Per node statistics of its points, from each point's leaf up through its ancestors."""
        n = len(self.depth)
        node = leaf_node.copy()
        count = np.zeros(n, np.int64)
        s_lat, s_lon = np.zeros(n), np.zeros(n)
        lat_min, lat_max = np.full(n, np.inf), np.full(n, -np.inf)
        lon_min, lon_max = np.full(n, np.inf), np.full(n, -np.inf)
        live = np.ones(node.size, bool)
        while live.any():
            nd = node[live]
            count += np.bincount(nd, minlength=n)
            s_lat += np.bincount(nd, lat[live], minlength=n)
            s_lon += np.bincount(nd, lon[live], minlength=n)
            np.minimum.at(lat_min, nd, lat[live])
            np.maximum.at(lat_max, nd, lat[live])
            np.minimum.at(lon_min, nd, lon[live])
            np.maximum.at(lon_max, nd, lon[live])
            node[live] = self.parent[nd]
            live = node >= 0
        with np.errstate(invalid="ignore", divide="ignore"):
            self.count, self.lat_mean, self.lon_mean = count, s_lat / count, s_lon / count
        self.lat_min, self.lat_max, self.lon_min, self.lon_max = lat_min, lat_max, lon_min, lon_max

    # --- querying -------------------------------------------------------------------------------
    def leaf_nodes(self, lat_deg, lon_deg) -> np.ndarray:
        """The leaf node of each point, descending by midpoints. A point whose quadrant held no
        training point goes to the sibling whose mean location is nearest."""
        lat = np.asarray(lat_deg, np.float64).reshape(-1)
        lon = np.asarray(lon_deg, np.float64).reshape(-1)
        node = np.zeros(lat.size, np.int64)
        while True:
            inner = np.flatnonzero((self.children[node] >= 0).any(axis=1))
            if inner.size == 0:
                return node
            nd = node[inner]
            b = self.box[nd]
            q = (lat[inner] >= (b[:, 0] + b[:, 2]) / 2) * 2 + (lon[inner] >= (b[:, 1] + b[:, 3]) / 2)
            child = self.children[nd, q]
            empty = child < 0
            if empty.any():
                kids = self.children[nd[empty]]  # (M, 4)
                safe = np.where(kids >= 0, kids, 0)
                dist = haversine_km(lat[inner][empty, None], lon[inner][empty, None],
                                    self.lat_mean[safe], self.lon_mean[safe])
                dist[kids < 0] = np.inf
                child[empty] = kids[np.arange(kids.shape[0]), dist.argmin(axis=1)]
            node[inner] = child

    def assign_leaf(self, lat_deg, lon_deg) -> np.ndarray:
        """Class (leaf index) of each point."""
        return self.leaf_of_node[self.leaf_nodes(lat_deg, lon_deg)]

    def assign(self, lat_deg, lon_deg) -> np.ndarray:
        """(N, n_levels) node ids at depths 0..max: a leaf shallower than a level stands for itself."""
        node = self.leaf_nodes(lat_deg, lon_deg)
        levels = self.n_levels
        out = np.empty((node.size, levels), np.int64)
        cur = node.copy()
        for level in range(levels - 1, -1, -1):
            deeper = self.depth[cur] > level
            cur = np.where(deeper, self.parent[cur], cur)
            out[:, level] = cur
        return out

    def centers(self, cells: np.ndarray, level: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Mean training location of nodes (node ids from `assign`, any level)."""
        cells = np.asarray(cells, np.int64)
        return self.lat_mean[cells], self.lon_mean[cells]

    # --- OSV-5M's cell table ---------------------------------------------------------------------
    def leaf_table(self) -> dict[str, np.ndarray]:
        """The leaves as OSV-5M lists its cells in `quadtree_<depth>_<max_points>.csv` (its
        scripts/preprocessing/preprocess.py, which the paper's hybrid head reads): `cluster_id` (the
        class), the split box (`min_lat`, `min_lon`, `max_lat`, `max_lon`) and the mean of the points."""
        b = self.box[self.leaves]
        return {"cluster_id": np.arange(self.n_leaves), "min_lat": b[:, 0], "min_lon": b[:, 1],
                "max_lat": b[:, 2], "max_lon": b[:, 3], "mean_lat": self.lat_mean[self.leaves],
                "mean_lon": self.lon_mean[self.leaves]}

    def write_csv(self, path: str | Path) -> None:
        """leaf_table as OSV-5M's CSV (read back by read_quadtree_csv, and by upstream's code)."""
        import pyarrow as pa
        import pyarrow.csv as pacsv

        pacsv.write_csv(pa.table(self.leaf_table()), str(path))

    # --- storage --------------------------------------------------------------------------------
    def save(self, path: str | Path) -> None:
        meta = {"kind": "quadtree", "max_points": self.max_points, "max_depth": self.max_depth}
        np.savez(path, meta=np.array(json.dumps(meta)), **{k: getattr(self, k) for k in _NODE_ARRAYS})

    @classmethod
    def load(cls, path: str | Path) -> "QuadTree":
        with np.load(path) as z:
            meta = json.loads(str(z["meta"]))
            if meta.get("kind") != "quadtree":
                raise ValueError(f"{path} is not a saved QuadTree")
            return cls(meta["max_points"], meta["max_depth"], **{k: z[k] for k in _NODE_ARRAYS})


@dataclass
class H3Cells:
    """H3 cells at a few resolutions, coarse to fine (mean edge: res 0 1,281 km, 1 483, 2 182, 3 69, 4 26,
    5 9.9 km; h3geo.org)."""

    resolutions: tuple[int, ...] = (1, 2, 3, 4)

    def __post_init__(self):
        self.resolutions = tuple(sorted(self.resolutions))
        if not self.resolutions or not all(0 <= r <= 15 for r in self.resolutions):
            raise ValueError(f"H3 resolutions must be in 0..15, got {self.resolutions}")

    @property
    def n_levels(self) -> int:
        return len(self.resolutions)

    def assign(self, lat_deg, lon_deg) -> np.ndarray:
        import h3.api.basic_int as h3i

        lat = np.asarray(lat_deg, np.float64).reshape(-1)
        lon = np.asarray(lon_deg, np.float64).reshape(-1)
        finest = self.resolutions[-1]
        out = np.empty((lat.size, self.n_levels), np.int64)
        # h3 has no array API: one C call per point. Its integer API skips making and parsing hex
        # strings for every cell; parents come from the finest cell
        to_cell, parent = h3i.latlng_to_cell, h3i.cell_to_parent
        fine = [to_cell(a, b, finest) for a, b in zip(lat.tolist(), lon.tolist())]
        for j, res in enumerate(self.resolutions):
            cells = fine if res == finest else [parent(c, res) for c in fine]
            out[:, j] = np.array(cells, dtype=np.uint64).view(np.int64)
        return out

    def centers(self, cells: np.ndarray, level: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        import h3

        ll = np.array([h3.cell_to_latlng(h3.int_to_str(int(c))) for c in
                       np.asarray(cells, np.int64).reshape(-1).view(np.uint64)]).reshape(-1, 2)
        return ll[:, 0], ll[:, 1]


QUADTREE_CSV_COLUMNS = ("cluster_id", "min_lat", "min_lon", "max_lat", "max_lon", "mean_lat", "mean_lon")


def read_quadtree_csv(path: str | Path) -> dict[str, np.ndarray]:
    """OSV-5M's cell table (`quadtree_10_1000.csv`, or QuadTree.write_csv's), float64 columns in class
    order; ValueError naming what is missing or out of order."""
    import pyarrow.csv as pacsv

    try:
        t = pacsv.read_csv(str(path))
    except Exception as e:  # noqa: BLE001 - pyarrow's ArrowInvalid and friends
        raise ValueError(f"{path}: not a CSV table ({e})") from None
    missing = [c for c in QUADTREE_CSV_COLUMNS if c not in t.column_names]
    if missing:
        raise ValueError(f"{path}: no column {', '.join(missing)} "
                         f"(expected {', '.join(QUADTREE_CSV_COLUMNS)})")
    out = {c: t.column(c).to_numpy().astype(np.float64) for c in QUADTREE_CSV_COLUMNS}
    if not np.array_equal(out["cluster_id"], np.arange(t.num_rows)):
        raise ValueError(f"{path}: cluster_id is not 0, 1, 2, ... in order")
    return out
