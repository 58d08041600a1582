"""Helpers for the pipeline tests: small tiles, a fast configuration, waiting on events."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np

from scope_stream.config import ScopeStreamConfig
from scope_stream.transport.events import EventSubscriber
from scope_stream.vocabulary import Tile

PASSTHROUGH = "scope_stream.transport.stages:passthrough"
THRESHOLD = "scope_stream.transport.stages:threshold"


def make_tile(i: int, slide: str = "s", *, kind: str = "scan", size: int = 64) -> Tile:
    rng = np.random.default_rng(i)
    px = rng.integers(150, 255, (size, size, 3), dtype=np.uint8)
    px[10:22, 12:26] = 25  # a dark blob: one cell for the threshold stage
    return Tile(
        px,
        slide_id=slide,
        tile_id=f"t{i}",
        seq=i,
        x_um=32.0 * (i % 10),
        y_um=32.0 * (i // 10),
        pixel_size_um=0.5 if kind == "scan" else 0.2,
        kind=kind,  # type: ignore[arg-type]
    )


def fast_config(tmp_path: Path, **pipeline: Any) -> ScopeStreamConfig:
    """Short heartbeats and timeouts so that failover happens within a second; cpu workers."""
    cfg = ScopeStreamConfig()
    cfg.store.root = tmp_path / "scans"
    cfg.scan.x0_um, cfg.scan.y0_um, cfg.scan.x1_um, cfg.scan.y1_um = 0.0, 0.0, 320.0, 320.0
    p = cfg.pipeline
    p.device = "cpu"
    p.n_workers = 2
    p.heartbeat_ms = 100
    p.worker_timeout_ms = 1000
    p.stats_interval_ms = 200
    p.ack_timeout_ms = 5000
    p.send_timeout_s = 30.0
    for k, v in pipeline.items():
        setattr(p, k, v)
    return cfg


def wait_subscribed(sub: EventSubscriber, timeout: float = 10.0) -> None:
    """SUB sockets join late: wait for the first periodic pipeline.stats event."""
    ev = sub.wait_for(lambda t, p: t == "pipeline.stats", timeout)
    assert ev is not None, "no pipeline.stats event: the subscription did not come up"


def collect(sub: EventSubscriber, until: Any, timeout: float = 30.0) -> list[tuple[str, dict[str, Any]]]:
    """Events until ``until(events)`` holds (or the timeout)."""
    out: list[tuple[str, dict[str, Any]]] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and not until(out):
        ev = sub.recv(0.2)
        if ev is not None:
            out.append(ev)
    return out


def wait_stored(pipe: Any, n: int, timeout: float = 30.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        s = pipe.stats()
        if s["stored"] >= n or time.monotonic() > deadline:
            return s
        time.sleep(0.05)
