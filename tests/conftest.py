"""Shared fixtures: a small bundled sample, generated once per test session (about a second)."""
from __future__ import annotations

import pytest

from geovote.sample import generate

SMALL = {"n_train": 2000, "n_val": 200, "n_test": 200, "seed": 0}


@pytest.fixture(scope="session")
def sample_root(tmp_path_factory):
    return generate(tmp_path_factory.mktemp("data") / "sample", quiet=True, **SMALL)
