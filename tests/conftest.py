"""Shared pytest fixtures and settings for scope-stream's tests."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# Keep numerical libraries to one thread per test process: the CI machine has 2 cores.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")

from scope_stream.datasets import data_root

REPO = Path(__file__).resolve().parent.parent


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skip tests marked ``data`` cleanly when ../shared/data is absent."""
    if (data_root() / "pbc" / "labels.csv").is_file() and (data_root() / "bccd").is_dir():
        return
    skip = pytest.mark.skip(reason=f"real data not found at {data_root()} (set SCOPE_STREAM_DATA)")
    for item in items:
        if "data" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO


@pytest.fixture(scope="session")
def shared_data() -> Path:
    root = data_root()
    if not (root / "pbc" / "labels.csv").is_file():
        pytest.skip(f"real data not found at {root}")
    return root
