"""The ZeroMQ pipeline: endpoints, workers, flow control and security."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field

from .base import Section


class PipelineConfig(Section):
    """Broker, workers and sink on one machine or several."""

    transport: Literal["tcp", "ipc"] = "tcp"  # ipc is POSIX-only; tcp works everywhere
    host: str = "127.0.0.1"
    base_port: int = Field(default=0, ge=0, le=65535)  # 0: pick free ports
    n_workers: int = Field(default=2, ge=0, le=256)
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    tile_hwm: int = Field(default=8, ge=1, le=10000)
    max_message_bytes: int = Field(default=256 * 1024 * 1024, ge=1024)
    memory_queue_tiles: int = Field(default=64, ge=1)
    spool_dir: Path | None = None  # tiles beyond the in-memory queue wait here
    heartbeat_ms: int = Field(default=500, ge=10)
    worker_timeout_ms: int = Field(default=3000, ge=50)
    worker_credit: int = Field(default=2, ge=1, le=64)
    batch_max_cells: int = Field(default=64, ge=1)
    batch_wait_ms: int = Field(default=50, ge=0)
    curve_keys_dir: Path | None = None  # required when binding beyond loopback
