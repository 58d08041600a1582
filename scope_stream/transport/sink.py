"""The sink: commits analysed tiles to the slide stores and emits events.

It receives ``store`` messages (tile header, result, pixels, crops) from the broker, writes a group of
them to the :class:`~scope_stream.store.SlideStore` of their slide in one commit, and only then
answers ``stored`` (or ``duplicate`` for a tile already committed: a re-delivery after a worker or
sink failure). The store is the source of truth: a restarted sink reopens it and carries on. Events
(``tile.done``, ``reimage.done``, ``cell.flagged``, ``scan.started``, ``slide.done``) go to the broker,
which publishes them.
"""

from __future__ import annotations

import logging
import math
import os
import signal
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import zmq

from scope_stream.store import SlideStore, StoreError, StoreRefused, TileRecord, store_path_for
from scope_stream.vocabulary import TileResult

from .protocol import (
    ProtocolError,
    Rejections,
    as_buffer,
    decode_header,
    encode,
    parse_result,
    watch_parent,
)
from .security import client_security
from .validate import check_id, check_tile_header, is_safe_id

if TYPE_CHECKING:
    from scope_stream.config import ScopeStreamConfig

__all__ = ["Sink", "run_sink", "sink_main"]

log = logging.getLogger(__name__)


class Sink:
    """Routes tiles to one store per slide (or everything to one fixed ``store_path``)."""

    def __init__(self, config: ScopeStreamConfig, store_path: Path | str | None = None) -> None:
        self.config = config
        self.store_path = Path(store_path) if store_path is not None else None
        self.stores: dict[str, SlideStore] = {}
        self.pending_meta: dict[str, dict[str, Any]] = {}
        sc = config.scan
        self.region = (sc.x0_um, sc.y0_um, sc.x1_um, sc.y1_um)
        # one row counts per physical cell: copies in overlapping survey tiles are marked (docs/store.md)
        self.dedup_radius_um: float | None = float(config.segment.dedup_radius_um)
        self._warned: set[str] = set()

    def path_for(self, slide_id: str) -> Path:
        """``<store.root>/<slide_id>.zarr``, derived from a validated id (raises :class:`StoreRefused`)."""
        if self.store_path is not None:
            return self.store_path
        return store_path_for(self.config.store.root, slide_id)

    def store(self, slide_id: str) -> SlideStore:
        if not is_safe_id(slide_id):
            raise StoreRefused(f"slide id {str(slide_id)[:80]!r} is not a safe id")
        if self.store_path is not None:
            if not self.stores:
                exists = (self.store_path / "zarr.json").is_file()
                st = (
                    SlideStore(
                        self.store_path,
                        mode="r+",
                        config=self.config.store,
                        scan_region_um=self.region,
                        dedup_radius_um=self.dedup_radius_um,
                    )
                    if exists
                    else SlideStore.open_or_create(
                        self.store_path,
                        slide_id=slide_id,
                        config=self.config.store,
                        scan_region_um=self.region,
                        dedup_radius_um=self.dedup_radius_um,
                    )
                )
                self.stores[st.slide_id] = st
            st = next(iter(self.stores.values()))
            if st.slide_id != slide_id and slide_id not in self._warned:
                self._warned.add(slide_id)
                log.warning("slide %s goes to the fixed store %s of slide %s", slide_id, st.path, st.slide_id)
            return st
        found = self.stores.get(slide_id)
        if found is None:
            st = SlideStore.open_or_create(
                self.path_for(slide_id),
                slide_id=slide_id,
                config=self.config.store,
                scan_region_um=self.region,
                dedup_radius_um=self.dedup_radius_um,
            )
            self.stores[slide_id] = st
            if len(st):
                log.info("sink: resuming %s with %d tiles already stored", st.path, len(st))
            return st
        return found

    def close(self) -> None:
        self.stores.clear()


def run_sink(
    connect: str,
    config: ScopeStreamConfig,
    *,
    store_path: Path | str | None = None,
    stop: threading.Event | None = None,
    debug_delay_ms: float = 0.0,
    context: zmq.Context[Any] | None = None,
) -> int:
    """Serve the broker's sink socket at ``connect`` until shut down; returns an exit code."""
    from .peer import PeerLink

    pc = config.pipeline
    stop = stop or threading.Event()
    sink = Sink(config, store_path)
    wants_pixels = bool(config.store.save_tiles)
    credit = min(pc.sink_credit, pc.tile_hwm) if wants_pixels else pc.sink_credit
    ctx = context or zmq.Context()
    link = PeerLink(
        ctx,
        connect,
        name="sink",
        capacity=credit,
        accept_types=("store", "scan", "finalize", "shutdown"),
        work_types=("store",),
        done_types=("stored",),
        heartbeat_ms=pc.heartbeat_ms,
        timeout_ms=pc.worker_timeout_ms,
        hwm=max(pc.tile_hwm, credit),
        max_message_bytes=pc.max_message_bytes,
        security=client_security(pc.curve_keys_dir),
        ready_fields=lambda: {"wants_pixels": wants_pixels},
    ).start()
    rejections = Rejections("sink")
    commit_every = max(1, min(config.store.commit_every, credit))
    try:
        while not stop.is_set():
            batch: list[tuple[dict[str, Any], list[Any]]] = []
            deadline: float | None = None
            shutdown = False
            while len(batch) < commit_every:
                timeout = 100 if deadline is None else max(0, int((deadline - time.monotonic()) * 1000))
                frames = link.recv(timeout)
                if frames is None:
                    break
                try:
                    header = decode_header(frames[0], ("store", "scan", "finalize", "shutdown"))
                except ProtocolError as exc:
                    rejections.add(exc.reason, exc.detail)
                    continue
                kind = header["type"]
                if kind == "store":
                    batch.append((header, frames[1:]))
                    if deadline is None:
                        deadline = time.monotonic() + pc.commit_wait_ms / 1000.0
                    if header.get("backlog", 1) == 0:
                        deadline = time.monotonic()  # nothing more is waiting in the broker: commit now
                    continue
                # control messages: commit what we have first (ordering), then handle
                _commit(link, sink, batch, rejections, debug_delay_ms)
                batch = []
                if kind == "shutdown":
                    shutdown = True
                    break
                _control(link, sink, header)
            if batch:
                _commit(link, sink, batch, rejections, debug_delay_ms)
            if shutdown:
                break
    finally:
        link.bye()
        link.close()
        sink.close()
        if context is None:
            ctx.term()
    return 0


def _control(link: Any, sink: Sink, header: dict[str, Any]) -> None:
    kind = header["type"]
    slide_id = header.get("slide_id")
    if not is_safe_id(slide_id):
        log.warning("sink: %s without a valid slide_id ignored", kind)
        return
    assert isinstance(slide_id, str)
    try:
        store = sink.store(slide_id)
        if kind == "scan":
            meta = header.get("metadata") or {}
            if not isinstance(meta, dict):
                raise ProtocolError("schema", "scan metadata must be an object")
            store.set_metadata(**meta)
            _event(link, "scan.started", slide_id=slide_id, metadata=store.metadata, store=str(store.path))
        elif kind == "finalize":
            extra = header.get("summary") or {}
            if not isinstance(extra, dict):
                raise ProtocolError("schema", "finalize summary must be an object")
            summary = store.mark_done(extra)
            _event(link, "slide.done", slide_id=slide_id, store=str(store.path), summary=summary)
            link.send([encode("finalized", slide_id=slide_id, summary=summary, req=header.get("req"))])
    except Exception as exc:  # one slide's trouble must not stop the sink
        log.error("sink: %s for slide %s failed: %s", kind, slide_id, exc)
        if kind == "finalize":  # answer, so that whoever waits on finish gets an error instead of hanging
            error = f"{type(exc).__name__}: {exc}"[:2000]
            link.send([encode("finalized", slide_id=slide_id, summary={}, req=header.get("req"), error=error)])


def _event(link: Any, topic: str, **payload: Any) -> None:
    link.send([encode("event", topic=topic, payload=payload)])


def _commit(
    link: Any,
    sink: Sink,
    batch: list[tuple[dict[str, Any], list[Any]]],
    rejections: Rejections,
    delay_ms: float,
) -> None:
    """Write a group of tiles per slide in one commit each, then answer and emit events."""
    if not batch:
        return
    if delay_ms:
        time.sleep(delay_ms * len(batch) / 1000.0)
    by_slide: dict[str, list[tuple[TileRecord, dict[str, Any]]]] = {}
    answers: list[tuple[str, str, str, str]] = []  # slide, tile, status, error
    for header, payload in batch:
        try:
            rec, info = _record(header, payload, sink.config.pipeline.max_tile_bytes)
        except ProtocolError as exc:
            # malformed: it would be malformed next time too, so refuse it for good (no retry loop)
            rejections.add(exc.reason, exc.detail)
            tile: dict[str, Any] = header["tile"] if isinstance(header.get("tile"), dict) else {}
            sid, tid = tile.get("slide_id"), tile.get("tile_id")
            if isinstance(sid, str) and isinstance(tid, str):
                answers.append((sid[:256], tid[:256], "refused", f"malformed: {exc.reason}: {exc.detail}"))
            continue
        by_slide.setdefault(str(rec.header["slide_id"]), []).append((rec, info))
    for slide_id, items in by_slide.items():
        try:
            store = sink.store(slide_id)
            flags = store.write_records([r for r, _ in items])
        except StoreRefused as exc:  # not our store, or an unsafe path: never touched, never retried
            log.error("sink: refusing %d tiles of slide %s: %s", len(items), slide_id, exc)
            answers.extend((slide_id, r.tile_id, "refused", str(exc)) for r, _ in items)
            continue
        except (StoreError, OSError) as exc:  # perhaps passing (disk full...): the broker retries
            log.error("sink: could not commit %d tiles of slide %s: %s", len(items), slide_id, exc)
            answers.extend((slide_id, r.tile_id, "error", str(exc)) for r, _ in items)
            continue
        except Exception as exc:  # values the store cannot take: retrying would fail the same way
            log.exception("sink: tiles of slide %s cannot be stored; refusing them", slide_id)
            answers.extend((slide_id, r.tile_id, "refused", f"{type(exc).__name__}: {exc}") for r, _ in items)
            continue
        dups, replaced = dict(store.last_duplicates), dict(store.last_replaced)
        for (rec, info), fresh in zip(items, flags, strict=True):
            answers.append((slide_id, rec.tile_id, "stored" if fresh else "duplicate", ""))
            if fresh:
                _tile_events(link, store, rec, info, dups, replaced)
    for slide_id, tile_id, status, error in answers:
        link.send([encode("stored", slide_id=slide_id, tile_id=tile_id, status=status, error=error)])


def _record(header: dict[str, Any], payload: list[Any], max_tile_bytes: int) -> tuple[TileRecord, dict[str, Any]]:
    if len(payload) != 2:
        raise ProtocolError("frames", f"a store message has 2 payload frames, got {len(payload)}")
    tile = header.get("tile")
    pix = as_buffer(payload[0])
    pixels = None
    dtype, shape = check_tile_header(tile, pix.nbytes or None, max_tile_bytes)
    if pix.nbytes:
        pixels = np.frombuffer(pix, dtype=dtype).reshape(shape)
    assert isinstance(tile, dict)
    result: TileResult | None = None
    if header.get("result") is not None:
        result = parse_result({"result": header["result"]}, [payload[1]])
        check_id(result.tile_id, "result tile_id")
        if (result.slide_id, result.tile_id) != (tile["slide_id"], tile["tile_id"]):
            raise ProtocolError("schema", "the result does not belong to the tile", tile["tile_id"])
    now = time.time()
    sent_at = header.get("sent_at")
    latency = (now - float(sent_at)) * 1000.0 if isinstance(sent_at, (int, float)) else math.nan
    error = header.get("error") or ""
    rec = TileRecord(header=tile, pixels=pixels, result=result, error=str(error), latency_ms=latency)
    return rec, {"latency_ms": latency, "attempts": header.get("attempts", 1)}


def _tile_events(
    link: Any,
    store: SlideStore,
    rec: TileRecord,
    info: dict[str, Any],
    duplicates: dict[str, str] | None = None,
    replaced: dict[str, str] | None = None,
) -> None:
    """``tile.done``/``reimage.done`` and ``cell.flagged`` for one committed tile.

    A cell that is a second copy of a cell already stored from an overlapping tile (``duplicates``)
    raises no ``cell.flagged``: the physical cell was announced with its counted copy. A better-centred
    copy that takes over (``replaced``) names the earlier cell id in ``replaces``.
    """
    duplicates = duplicates or {}
    replaced = replaced or {}
    h = rec.header
    res = rec.result
    kind = str(h.get("kind", "scan"))
    shape = h.get("shape", [0, 0])
    payload: dict[str, Any] = {
        "slide_id": h["slide_id"],
        "tile_id": h["tile_id"],
        "seq": h.get("seq", 0),
        "kind": kind,
        "x_um": h["x_um"],
        "y_um": h["y_um"],
        "pixel_size_um": h["pixel_size_um"],
        "height": shape[0],
        "width": shape[1] if len(shape) > 1 else 0,
        "n_cells": len(res.cells) if res else 0,
        "n_flagged": len(res.flags) if res else 0,
        "n_duplicates": sum(c.cell_id in duplicates for c in res.cells) if res else 0,
        "status": "ok" if res is not None else "failed",
        "error": rec.error if res is None else "",
        "latency_ms": None if math.isnan(info["latency_ms"]) else round(info["latency_ms"], 3),
        "attempts": info["attempts"],
        "worker": res.worker if res else "",
        "timings_ms": res.timings_ms if res else {},
        "store": str(store.path),
    }
    if kind == "reimage":
        flagged = {f.cell_id for f in res.flags} if res else set()
        calls = {c.cell_id: c for c in res.calls} if res else {}
        payload["cells"] = [
            {
                "cell_id": c.cell_id,
                "label": calls[c.cell_id].label if c.cell_id in calls else "",
                "x_um": c.x_um,
                "y_um": c.y_um,
                "flagged": c.cell_id in flagged,
            }
            for c in (res.cells if res else [])
        ]
    _event(link, "reimage.done" if kind == "reimage" else "tile.done", **payload)
    if res is None:
        return
    calls = {c.cell_id: c for c in res.calls}
    for flag in res.flags:
        if flag.cell_id in duplicates:
            continue
        call = calls.get(flag.cell_id)
        body = {**flag.to_wire(), "kind": kind}
        if flag.cell_id in replaced:
            body["replaces"] = replaced[flag.cell_id]
        if call is not None:
            body.update(
                probabilities=call.probabilities,
                uncertainty=call.uncertainty,
                margin=call.margin,
                anomaly_score=call.anomaly_score,
                model_id=call.model_id,
            )
        _event(link, "cell.flagged", **body)


def sink_main(
    connect: str,
    config_json: dict[str, Any],
    store_path: str | None,
    debug_delay_ms: float = 0.0,
    log_level: int = logging.WARNING,
) -> None:
    """Entry point of a spawned sink process (picklable arguments only)."""
    from scope_stream.config import ScopeStreamConfig

    logging.basicConfig(level=log_level, format="%(asctime)s sink %(name)s: %(message)s")
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    stop = threading.Event()
    if hasattr(signal, "SIGTERM"):
        signal.signal(signal.SIGTERM, lambda *_: stop.set())
    cfg = ScopeStreamConfig.model_validate(config_json)
    watch_parent(stop.set, grace_s=45.0)  # the broker normally shuts us down first
    log.info("sink %d: serving %s", os.getpid(), connect)
    raise SystemExit(run_sink(connect, cfg, store_path=store_path, stop=stop, debug_delay_ms=debug_delay_ms))
