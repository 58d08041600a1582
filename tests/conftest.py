"""Shared pytest fixtures and settings for scope-stream's tests."""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

# Keep numerical libraries to one thread per test process: the CI machine has 2 cores.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")

from scope_stream.datasets import data_root

REPO = Path(__file__).resolve().parent.parent


#: Qt platforms that draw without a display server
_HEADLESS_QT = ("offscreen", "minimal", "vnc", "eglfs", "linuxfb")


def qt_display_problem() -> str | None:
    """Why Qt cannot open a window here (None: it can). Asked after pytest-xvfb's start-up: when Xvfb is
    installed that plugin has started one and set DISPLAY. Without any display, creating the QApplication
    aborts the whole pytest process, so the napari tests are skipped instead."""
    if not sys.platform.startswith("linux"):
        return None
    if os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY"):
        return None
    if os.environ.get("QT_QPA_PLATFORM", "").split(":")[0] in _HEADLESS_QT:
        return None
    return (
        "no display for Qt: DISPLAY is unset and Xvfb is not installed (Debian/Ubuntu: apt-get install xvfb xauth; "
        "pytest-xvfb then starts it), or it was disabled (--no-xvfb)"
    )


def pytest_report_header(config: pytest.Config) -> str:
    problem = qt_display_problem()
    return f"napari tests: skipped, {problem}" if problem else f"napari tests: display {os.environ.get('DISPLAY')}"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skip tests marked ``napari`` without a display, and tests marked ``data`` when ../shared/data is absent."""
    problem = qt_display_problem()
    if problem:
        skip_qt = pytest.mark.skip(reason=problem)
        for item in items:
            if item.get_closest_marker("napari") is not None:
                item.add_marker(skip_qt)
    if (data_root() / "pbc" / "labels.csv").is_file() and (data_root() / "bccd").is_dir():
        return
    skip = pytest.mark.skip(reason=f"real data not found at {data_root()} (set SCOPE_STREAM_DATA)")
    for item in items:
        if "data" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _restore_logging() -> Iterator[None]:
    """CLI commands run in-process configure logging (a stderr handler, levels) as they do in a shell;
    undo that after each test so that one test's ``-v`` does not change what the next one logs."""
    root, package = logging.getLogger(), logging.getLogger("scope_stream")
    levels, handlers = (root.level, package.level), list(root.handlers)
    yield
    for h in list(root.handlers):
        if getattr(h, "_scope_stream_cli", False) and h not in handlers:
            root.removeHandler(h)
    root.setLevel(levels[0])
    package.setLevel(levels[1])


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO


@pytest.fixture(scope="session")
def shared_data() -> Path:
    root = data_root()
    if not (root / "pbc" / "labels.csv").is_file():
        pytest.skip(f"real data not found at {root}")
    return root
