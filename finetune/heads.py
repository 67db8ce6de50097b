"""The OSV-5M paper's prediction heads over QuadTree cells, in torch (Astruc et al., "OpenStreetView-5M",
CVPR 2024: its classification, regression and hybrid heads).

- classification: logits over the QuadTree's leaves; the answer is the leaf's mean training location.
- hybrid: the same logits plus, per leaf, an offset `1.2*tanh(.)` in (-1.2, 1.2)^2, scaled by the leaf's
  extent from its centroid (centroid-to-max when positive, centroid-to-min when negative), in degrees.
  Loss: cross-entropy on the leaf and on each ancestor level of the tree (hierarchical), plus L2 between
  the true leaf's predicted offset and the normalised offset of the true location.
- regression: a 3-d vector, normalised onto the unit sphere; loss = great-circle angle to the truth. On
  the sphere rather than lat/lon, so that no loss jumps at the antimeridian or squashes near the poles.

`finetune.trainer` puts these on the image tower; `benchmark.methods` trains them on frozen embeddings.
"""
from __future__ import annotations

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from geovote.cells import QuadTree
from geovote.geo import latlon_to_unit, unit_to_latlon

OFFSET_SCALE = 1.2
MIN_EXTENT_DEG = 1e-6  # a leaf whose images all share a latitude has no extent on that side


class CellGeometry:
    """Per-leaf centroids and extents, and each leaf's ancestor group at every tree level."""

    def __init__(self, tree: QuadTree):
        self.tree = tree
        leaves = tree.leaves
        self.n_leaves = len(leaves)
        self.center = np.stack([tree.lat_mean[leaves], tree.lon_mean[leaves]], 1)  # (C, 2) degrees
        hi = np.stack([tree.lat_max[leaves], tree.lon_max[leaves]], 1) - self.center
        lo = self.center - np.stack([tree.lat_min[leaves], tree.lon_min[leaves]], 1)
        self.extent_pos = np.maximum(hi, MIN_EXTENT_DEG)
        self.extent_neg = np.maximum(lo, MIN_EXTENT_DEG)
        # ancestors: node of each leaf at depths 1..depth-1 (the root holds everything: no information)
        groups = []
        node = leaves.copy()
        chain = [node]
        while np.any(tree.depth[node] > 0):
            node = np.where(tree.depth[node] > 0, tree.parent[node], node)
            chain.append(node)
        for level_nodes in chain[1:-1]:
            _, group = np.unique(level_nodes, return_inverse=True)
            groups.append(group)
        self.ancestor_groups = groups  # list of (C,) int64 group id per leaf, fine to coarse

    def leaf_of(self, lat_deg, lon_deg) -> np.ndarray:
        return self.tree.assign_leaf(lat_deg, lon_deg)

    def offset_targets(self, leaf: np.ndarray, lat_deg, lon_deg) -> np.ndarray:
        """(N, 2) offset of each point from its leaf's centroid, divided by the extent on its side."""
        d = np.stack([np.asarray(lat_deg, float), np.asarray(lon_deg, float)], 1) - self.center[leaf]
        ext = np.where(d >= 0, self.extent_pos[leaf], self.extent_neg[leaf])
        return d / ext

    def decode(self, leaf: np.ndarray, offset: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
        """Location of a leaf plus a normalised offset (None: the centroid)."""
        center = self.center[leaf]
        if offset is None:
            return center[:, 0], center[:, 1]
        ext = np.where(offset >= 0, self.extent_pos[leaf], self.extent_neg[leaf])
        out = center + offset * ext
        return np.clip(out[:, 0], -90, 90), (out[:, 1] + 180) % 360 - 180


class CellHead(nn.Module):
    """Classification over leaves; `hybrid=True` adds the per-leaf offsets."""

    def __init__(self, dim: int, geometry: CellGeometry, hybrid: bool = True, hierarchical: bool = True):
        super().__init__()
        self.geometry, self.hybrid, self.hierarchical = geometry, hybrid, hierarchical
        self.logits = nn.Linear(dim, geometry.n_leaves)
        self.offsets = nn.Linear(dim, 2 * geometry.n_leaves) if hybrid else None
        for j, g in enumerate(geometry.ancestor_groups):
            self.register_buffer(f"group{j}", torch.as_tensor(g, dtype=torch.long), persistent=False)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        logits = self.logits(x)
        if self.offsets is None:
            return logits, None
        return logits, OFFSET_SCALE * torch.tanh(self.offsets(x).view(x.shape[0], -1, 2))

    def loss(self, x: torch.Tensor, leaf: torch.Tensor, offset_target: torch.Tensor | None = None):
        return self.loss_from(*self(x), leaf, offset_target)

    def loss_from(self, logits: torch.Tensor, offsets: torch.Tensor | None, leaf: torch.Tensor,
                  offset_target: torch.Tensor | None = None) -> torch.Tensor:
        loss = F.cross_entropy(logits, leaf)
        if self.hierarchical and self.geometry.ancestor_groups:
            prob = logits.float().softmax(1)
            for j in range(len(self.geometry.ancestor_groups)):
                group = getattr(self, f"group{j}")
                g_prob = torch.zeros(prob.shape[0], int(group.max()) + 1, device=prob.device)
                g_prob.index_add_(1, group, prob)
                loss = loss + F.nll_loss(g_prob.clamp_min(1e-12).log(), group[leaf])
        if offsets is not None and offset_target is not None:
            mine = offsets[torch.arange(len(leaf), device=leaf.device), leaf]
            loss = loss + ((mine - offset_target) ** 2).sum(1).mean()
        return loss

    @torch.no_grad()
    def predict(self, x: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        logits, offsets = self(x)
        leaf = logits.argmax(1)
        off = None
        if offsets is not None:
            off = offsets[torch.arange(len(leaf), device=leaf.device), leaf].float().cpu().numpy()
        return self.geometry.decode(leaf.cpu().numpy(), off)


class RegressionHead(nn.Module):
    """A point on the unit sphere; loss = the great-circle angle (radians) to the truth."""

    def __init__(self, dim: int):
        super().__init__()
        self.fc = nn.Linear(dim, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.fc(x), dim=1)

    def loss(self, x: torch.Tensor, target_unit: torch.Tensor) -> torch.Tensor:
        cos = (self(x) * target_unit).sum(1).clamp(-1 + 1e-6, 1 - 1e-6)
        return torch.acos(cos).mean()

    @torch.no_grad()
    def predict(self, x: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        return unit_to_latlon(self(x).double().cpu().numpy())


def unit_targets(lat_deg, lon_deg) -> torch.Tensor:
    return torch.as_tensor(latlon_to_unit(lat_deg, lon_deg), dtype=torch.float32)
