"""The engine behind `retrieve.query`, `retrieve.tune` and the server: model + index + cells + voting.

The index folder carries everything a query needs besides the model:
    index.json            its embedding manifest names the model (`config.model`) and its weights (`backbone`)
    retrieve.json         voting parameters chosen on validation by `retrieve.tune` (defaults if absent)
    cells-<spec>.npy      each training row's cell at every voting level, computed once and cached
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np

from index.store import GeoIndex
from retrieve.predict import Prediction, VoteParams, vote

PARAMS_FILE = "retrieve.json"


@dataclass
class RetrieveParams:
    cells: str = "h3"  # h3 | quadtree
    levels: tuple[int, ...] = (1, 3)  # H3 resolutions, or QuadTree depths, coarse to fine
    quadtree_max_points: int = 100
    k: int = 20
    temperature: float = 0.05
    bandwidth_km: float = 50.0
    mean_shift_steps: int = 3
    n_alternatives: int = 3

    @property
    def cell_spec(self) -> str:
        levels = "-".join(map(str, self.levels))
        return f"h3_{levels}" if self.cells == "h3" else f"quadtree{self.quadtree_max_points}_{levels}"

    def vote_params(self) -> VoteParams:
        return VoteParams(k=self.k, temperature=self.temperature, bandwidth_km=self.bandwidth_km,
                          levels=tuple(range(len(self.levels))), mean_shift_steps=self.mean_shift_steps,
                          n_alternatives=self.n_alternatives)

    @classmethod
    def from_dict(cls, d: dict) -> "RetrieveParams":
        known = {f.name for f in fields(cls)}
        d = {k: (tuple(v) if k == "levels" else v) for k, v in d.items() if k in known}
        return cls(**d)


def cell_table(lat_deg: np.ndarray, lon_deg: np.ndarray, params: RetrieveParams) -> np.ndarray:
    """(N, L) cell id of each point at each voting level."""
    from geovote.cells import H3Cells, QuadTree

    if params.cells == "h3":
        return H3Cells(tuple(params.levels)).assign(lat_deg, lon_deg)
    if params.cells == "quadtree":
        tree = QuadTree.build(lat_deg, lon_deg, params.quadtree_max_points)
        table = tree.assign(lat_deg, lon_deg)
        depth = [min(level, table.shape[1] - 1) for level in params.levels]
        return table[:, depth]
    raise ValueError(f"cells must be h3 or quadtree, got {params.cells!r}")


class Engine:
    def __init__(self, index_dir: str | Path, model: str | None = None, params: RetrieveParams | None = None,
                 load_model: bool = True):
        self.index_dir = Path(index_dir)
        self.index = GeoIndex(self.index_dir)
        manifest = self.index.info.get("embedding_manifest") or {}
        self.model_name = model or (manifest.get("config") or {}).get("model")
        self.backbone = None
        if load_model:
            from embed.models import load_backbone

            if not self.model_name:
                raise ValueError(f"{self.index_dir}: the index does not say which model embedded it; "
                                 "pass --model")
            self.backbone = load_backbone(self.model_name)
            self.index.check_queries(np.ones(self.index.dim), backbone=self.backbone.name)
            self.transform = self.backbone.transform()
        if params is None:
            path = self.index_dir / PARAMS_FILE
            params = RetrieveParams.from_dict(json.loads(path.read_text())["params"]) if path.exists() \
                else RetrieveParams()
        self.params = params
        self._cells: dict[str, np.ndarray] = {}

    def cells(self, params: RetrieveParams | None = None) -> np.ndarray:
        params = params or self.params
        spec = params.cell_spec
        if spec not in self._cells:
            path = self.index_dir / f"cells-{spec}.npy"
            if path.exists():
                table = np.load(path, mmap_mode="r")
            else:
                table = cell_table(np.asarray(self.index.lat), np.asarray(self.index.lon), params)
                tmp = path.with_name(path.name + ".partial.npy")
                try:
                    np.save(tmp, table)
                    tmp.replace(path)
                except OSError:  # a read-only index folder: keep it in memory only
                    pass
            self._cells[spec] = table
        return self._cells[spec]

    def embed_images(self, images: list) -> np.ndarray:
        """PIL images -> (N, dim) L2-normalised float32 embeddings."""
        import torch
        from torch.nn import functional as F

        x = torch.stack([self.transform(img) for img in images])
        with torch.inference_mode():
            return F.normalize(self.backbone.model(x).float(), dim=1).numpy()

    def search(self, emb: np.ndarray, k: int):
        return self.index.search(emb, k=k, backbone=self.backbone.name if self.backbone else None)

    def locate(self, emb: np.ndarray, params: RetrieveParams | None = None):
        """(Prediction, SearchResult) for a batch of query embeddings."""
        params = params or self.params
        res = self.search(emb, params.k)
        table = self.cells(params)
        cells = np.asarray(table)[np.maximum(res.rows, 0)]
        return vote(res.similarity, res.lat_deg, res.lon_deg, cells, params.vote_params()), res


def save_params(index_dir: str | Path, params: RetrieveParams, record: dict) -> Path:
    path = Path(index_dir) / PARAMS_FILE
    path.write_text(json.dumps({"params": asdict(params), **record}, indent=2) + "\n")
    return path


__all__ = ["Engine", "Prediction", "RetrieveParams", "cell_table", "save_params"]
