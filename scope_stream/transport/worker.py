"""A pipeline worker: receives tiles from the broker, runs the analyzer on batches, returns results.

``run_worker`` is the whole process: it builds the analyzer from its import spec (in this process),
announces ``pipeline.worker_credit`` slots to the broker, gathers up to ``pipeline.batch_max_tiles``
tiles with a bounded wait of ``pipeline.batch_wait_ms``, and sends one ``result`` (or ``failed``)
per tile. Heartbeats run in an I/O thread (:class:`~scope_stream.transport.peer.PeerLink`). SIGTERM
(and SIGINT when run standalone) drains: no new tiles, finish the held ones, say ``bye``, exit.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
import traceback
from typing import TYPE_CHECKING, Any

import zmq

from .protocol import ProtocolError, Rejections, decode_header, encode, parse_tile, result_frames, watch_parent
from .security import client_security
from .stages import Analyzer, load_analyzer
from .validate import optional_int

if TYPE_CHECKING:
    from scope_stream.config import ScopeStreamConfig
    from scope_stream.vocabulary import Tile

__all__ = ["resolve_device", "run_worker", "worker_main"]

log = logging.getLogger(__name__)


def resolve_device(device: str, index: int = 0) -> str:
    """``auto`` -> ``cuda:<index mod n>`` when torch sees GPUs, else ``cpu``; ``cuda`` -> ``cuda:<index mod n>``.

    Only ``auto``/``cuda`` import torch (and only if it is installed), so cpu workers start fast.
    """
    if device not in ("auto", "cuda"):
        return device
    if os.environ.get("CUDA_VISIBLE_DEVICES", None) == "":
        return "cpu"
    try:
        import torch

        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    except ImportError:
        n = 0
    if n == 0:
        if device == "cuda":
            raise RuntimeError("device 'cuda' asked for, but torch sees no GPU")
        return "cpu"
    return f"cuda:{index % n}"


def run_worker(
    connect: str,
    config: ScopeStreamConfig,
    *,
    analyzer_spec: str | None = None,
    device: str | None = None,
    name: str | None = None,
    keys_client: str = "client",
    stop: threading.Event | None = None,
    handle_signals: bool = True,
    context: zmq.Context[Any] | None = None,
    device_index: int = 0,
) -> int:
    """Serve tiles from the broker backend at ``connect`` until shut down; returns an exit code."""
    pc = config.pipeline
    stop = stop or threading.Event()
    name = name or f"worker-{os.getpid()}"
    dev = resolve_device(device or pc.device, device_index)
    spec = analyzer_spec or pc.analyzer
    if handle_signals:
        _install_signals(stop)
    analyzer: Analyzer = load_analyzer(spec, config, dev)
    ctx = context or zmq.Context()
    link = PeerLinkFactory.make(ctx, connect, config, name=name, device=dev, analyzer=spec, keys_client=keys_client)
    link.start()
    log.info("%s: serving %s on %s with %s", name, connect, dev, spec)
    rejections = Rejections(name)
    draining = False
    try:
        while True:
            if stop.is_set() and not draining:
                draining = True
                link.drain()
                log.info("%s: draining", name)
            batch, shutdown = _gather(link, pc.batch_max_tiles, pc.batch_wait_ms, rejections, pc.max_tile_bytes)
            if batch:
                _analyze(link, analyzer, batch, name)
            if shutdown:
                stop.set()
                draining = True
            if draining and not batch and link.held == 0:
                break
    finally:
        try:
            analyzer.close()
        finally:
            link.bye()
            link.close()
            if context is None:
                ctx.term()
    log.info("%s: stopped", name)
    return 0


class PeerLinkFactory:
    """Builds the worker's :class:`PeerLink` from the configuration."""

    @staticmethod
    def make(
        ctx: zmq.Context[Any],
        connect: str,
        config: ScopeStreamConfig,
        *,
        name: str,
        device: str,
        analyzer: str,
        keys_client: str = "client",
    ) -> Any:
        from .peer import PeerLink

        pc = config.pipeline
        credit = min(pc.worker_credit, pc.tile_hwm)
        return PeerLink(
            ctx,
            connect,
            name=name,
            capacity=credit,
            accept_types=("tile", "shutdown"),
            work_types=("tile",),
            done_types=("result", "failed"),
            heartbeat_ms=pc.heartbeat_ms,
            timeout_ms=pc.worker_timeout_ms,
            hwm=pc.tile_hwm,
            max_message_bytes=pc.max_message_bytes,
            security=client_security(pc.curve_keys_dir, keys_client),
            ready_fields=lambda: {"device": device, "analyzer": analyzer},
        )


def _gather(
    link: Any,
    max_tiles: int,
    wait_ms: int,
    rejections: Rejections,
    max_tile_bytes: int,
) -> tuple[list[tuple[Tile, int]], bool]:
    """Up to ``max_tiles`` tiles: block briefly for the first, then wait at most ``wait_ms`` for more
    (not at all when the broker said it had nothing more queued)."""
    batch: list[tuple[Tile, int]] = []
    shutdown = False
    deadline: float | None = None
    while len(batch) < max_tiles:
        timeout = 100 if deadline is None else max(0, int((deadline - time.monotonic()) * 1000))
        frames = link.recv(timeout)
        if frames is None:
            break
        try:
            header = decode_header(frames[0], ("tile", "shutdown"))
            if header["type"] == "shutdown":
                shutdown = True
                break
            tile = parse_tile(header, frames[1:], max_tile_bytes)
        except ProtocolError as exc:
            rejections.add(exc.reason, exc.detail)
            # answer it so that the broker's credit and the tile's fate stay accounted for
            hdr = _safe_header(frames[0])
            tile_info: dict[str, Any] = hdr["tile"] if isinstance(hdr.get("tile"), dict) else {}
            if isinstance(tile_info.get("slide_id"), str) and isinstance(tile_info.get("tile_id"), str):
                link.send(
                    [
                        encode(
                            "failed",
                            slide_id=tile_info["slide_id"],
                            tile_id=tile_info["tile_id"],
                            error=f"worker rejected the tile ({exc.reason}): {exc.detail}",
                        )
                    ]
                )
            continue
        try:
            attempt = optional_int(header.get("attempt"), "attempt", 1, lo=1, hi=1_000_000)
        except ProtocolError:
            attempt = 1
        batch.append((tile, attempt))
        if deadline is None:
            deadline = time.monotonic() + wait_ms / 1000.0
        if header.get("queued", 1) == 0:
            deadline = time.monotonic()  # the broker had nothing more queued: take what has arrived, no waiting
    return batch, shutdown


def _safe_header(frame: Any) -> dict[str, Any]:
    try:
        return decode_header(frame)
    except ProtocolError:
        return {}


def _analyze(link: Any, analyzer: Analyzer, batch: list[tuple[Tile, int]], name: str) -> None:
    tiles = [t for t, _ in batch]
    t0 = time.perf_counter()
    try:
        results = analyzer.analyze(tiles)
        if len(results) != len(tiles) or any(r.tile_id != t.tile_id for r, t in zip(results, tiles, strict=False)):
            raise RuntimeError(
                f"analyzer returned {len(results)} results for {len(tiles)} tiles (or out of order); "
                "retrying tile by tile"
            )
    except Exception as exc:
        if len(tiles) > 1:
            log.warning("%s: batch of %d failed (%s); analysing tile by tile", name, len(tiles), exc)
            for item in batch:
                _analyze(link, analyzer, [item], name)
            return
        tile = tiles[0]
        log.error("%s: analysis of tile %s failed: %s", name, tile.tile_id, exc)
        detail = "".join(traceback.format_exception_only(type(exc), exc)).strip()
        link.send([encode("failed", slide_id=tile.slide_id, tile_id=tile.tile_id, error=detail[:2000])])
        return
    per_tile = (time.perf_counter() - t0) * 1000.0 / len(tiles)
    for (tile, attempt), result in zip(batch, results, strict=True):
        result.timings_ms.setdefault("worker_ms", per_tile)
        if not result.worker:
            result.worker = name
        try:
            frames = result_frames(result, attempt=attempt)
        except Exception as exc:  # an unsendable result must not kill the worker
            log.error("%s: result of tile %s cannot be sent: %s", name, tile.tile_id, exc)
            frames = [encode("failed", slide_id=tile.slide_id, tile_id=tile.tile_id, error=f"bad result: {exc}")]
        link.send(frames)


def _install_signals(stop: threading.Event) -> None:
    if threading.current_thread() is not threading.main_thread():
        return
    count = {"n": 0}

    def handler(signum: int, _frame: Any) -> None:
        count["n"] += 1
        if count["n"] > 1:
            log.error("second signal: exiting now")
            os._exit(130)
        stop.set()

    signal.signal(signal.SIGINT, handler)
    if hasattr(signal, "SIGTERM"):
        signal.signal(signal.SIGTERM, handler)


def worker_main(
    connect: str,
    config_json: dict[str, Any],
    analyzer_spec: str | None,
    device: str | None,
    name: str | None,
    log_level: int = logging.WARNING,
    index: int = 0,
) -> None:
    """Entry point of a spawned worker process (picklable arguments only)."""
    from scope_stream.config import ScopeStreamConfig

    logging.basicConfig(level=log_level, format=f"%(asctime)s {name or 'worker'} %(name)s: %(message)s")
    # the parent handles Ctrl-C and drains us with a shutdown message; SIGTERM drains directly
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    stop = threading.Event()
    if hasattr(signal, "SIGTERM"):
        signal.signal(signal.SIGTERM, lambda *_: stop.set())
    cfg = ScopeStreamConfig.model_validate(config_json)
    watch_parent(stop.set, grace_s=45.0, hard_exit_s=30.0)  # the broker normally shuts us down first
    code = run_worker(
        connect,
        cfg,
        analyzer_spec=analyzer_spec,
        device=device,
        name=name,
        stop=stop,
        handle_signals=False,
        device_index=index,
    )
    raise SystemExit(code)
