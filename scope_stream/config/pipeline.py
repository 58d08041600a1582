"""The ZeroMQ pipeline: endpoints, workers, flow control, backpressure and security (``docs/protocol.md``)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from .base import Section


class PipelineConfig(Section):
    """Broker, workers and sink on one machine or several."""

    transport: Literal["tcp", "ipc"] = "tcp"  # ipc is POSIX-only; tcp works everywhere
    host: str = "127.0.0.1"  # where the broker binds; anything but loopback needs curve_keys_dir
    base_port: int = Field(default=0, ge=0, le=65530)  # 0: free ports; else frontend=B, backend=B+1, ... control=B+4
    n_workers: int = Field(
        default=2, ge=0, le=256, description='local analysis worker processes; "auto": one per CPU core'
    )
    device: str = "auto"  # auto | cpu | cuda | cuda:N (cuda: workers take cuda:0..N-1 in turn)
    devices: list[str] = Field(default_factory=list)  # per-worker devices; overrides `device` when given
    analyzer: str = "auto"  # "package.module:factory"; auto: scope_stream.analysis:build_analyzer if present
    stage_options: dict[str, Any] = Field(default_factory=dict)  # options of the stand-in stages
    tile_hwm: int = Field(default=8, ge=1, le=10000)  # high-water mark of every tile-carrying socket
    max_tile_bytes: int = Field(default=192 * 1024 * 1024, ge=1024)  # larger tiles are rejected ("size")
    max_message_bytes: int = Field(default=256 * 1024 * 1024, ge=1024)  # ZMQ_MAXMSGSIZE of receiving sockets
    memory_queue_tiles: int = Field(default=64, ge=1)  # tiles waiting in broker memory
    memory_queue_bytes: int = Field(default=2 * 1024**3, ge=1024)  # tile bytes (pixels + headers) held in memory
    spool_dir: Path | None = None  # tiles beyond the memory queue wait here (None: a temporary folder)
    spool_max_bytes: int = Field(default=4 * 1024**3, ge=0)  # 0: no disk spool
    store_backlog_tiles: int = Field(default=64, ge=1)  # analysed tiles waiting for the sink before dispatch pauses
    heartbeat_ms: int = Field(default=500, ge=10, description="heartbeat interval between broker, workers and sink")
    worker_timeout_ms: int = Field(default=3000, ge=50)  # a silent worker (or sink) is dead after this
    task_timeout_ms: int = Field(default=120_000, ge=100)  # a tile held longer is dispatched again (hung analyzer)
    max_attempts: int = Field(default=3, ge=1, le=100)  # dispatches before a tile is stored as failed
    ack_timeout_ms: int = Field(default=10_000, ge=100)  # a source resends tiles not acknowledged by then
    send_timeout_s: float | None = Field(default=60.0, gt=0)  # TileSource.send raises BackpressureError after this
    worker_credit: int = Field(default=4, ge=1, le=64, description="tiles a worker may hold at once")
    batch_max_tiles: int = Field(default=4, ge=1, le=256)  # tiles handed to the analyzer at once
    batch_max_cells: int = Field(default=64, ge=1)  # for analyzers: cells per classifier batch
    batch_wait_ms: int = Field(default=50, ge=0)  # bounded wait for a fuller batch
    sink_credit: int = Field(default=32, ge=1, le=4096, description="analysed tiles the sink may hold at once")
    commit_wait_ms: int = Field(default=20, ge=0)  # the sink waits this long for more tiles to commit together
    stats_interval_ms: int = Field(default=1000, ge=50, description="how often pipeline.stats is published")
    io_threads: int = Field(default=2, ge=1, le=16, description="ZeroMQ I/O threads per process")
    curve_keys_dir: Path | None = None  # CurveZMQ keys (scope-stream keys generate); required beyond loopback

    @field_validator("n_workers", mode="before")
    @classmethod
    def _auto_workers(cls, v: Any) -> Any:
        if isinstance(v, str) and v.strip().lower() == "auto":
            return max(1, min(256, os.cpu_count() or 1))
        return v

    @model_validator(mode="after")
    def _limits(self) -> PipelineConfig:
        if self.max_message_bytes < self.max_tile_bytes:
            raise ValueError(
                f"max_message_bytes ({self.max_message_bytes}) must be >= max_tile_bytes ({self.max_tile_bytes})"
            )
        if self.worker_timeout_ms < 2 * self.heartbeat_ms:
            raise ValueError(
                f"worker_timeout_ms ({self.worker_timeout_ms}) must be at least twice "
                f"heartbeat_ms ({self.heartbeat_ms})"
            )
        return self
