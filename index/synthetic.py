"""Clustered synthetic embeddings with a low intrinsic dimension, as real image embeddings have.

Random isotropic vectors are useless for recall tests (every neighbour is nearly as far as any other):
these are a mixture of Gaussian clusters in a `latent_dim`-dimensional space, mapped into `dim`
dimensions by a random linear map, plus a little isotropic noise, then L2-normalised.
"""
from __future__ import annotations

import numpy as np


def clustered_vectors(n: int, dim: int = 512, n_clusters: int = 1000, latent_dim: int = 32,
                      spread: float = 0.35, noise: float = 0.02, seed: int = 0,
                      chunk: int = 100_000) -> np.ndarray:
    """(n, dim) float32 unit vectors; deterministic in `seed`, built in chunks to bound memory."""
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(n_clusters, latent_dim)).astype(np.float32)
    lift = (rng.normal(size=(latent_dim, dim)) / np.sqrt(latent_dim)).astype(np.float32)
    out = np.empty((n, dim), np.float32)
    for start in range(0, n, chunk):
        m = min(chunk, n - start)
        z = centers[rng.integers(0, n_clusters, m)]
        z = z + spread * rng.normal(size=(m, latent_dim)).astype(np.float32)
        x = z @ lift + noise * rng.normal(size=(m, dim)).astype(np.float32)
        out[start:start + m] = x / np.linalg.norm(x, axis=1, keepdims=True)
    return out
