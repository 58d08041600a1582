"""``LocalPipeline``: broker + N workers + sink as spawned processes on this machine.

Usable from Python, the demo and ``scope-stream run``::

    spec = "scope_stream.transport.stages:threshold"
    with LocalPipeline(config, store_path="scans/s1.zarr", analyzer_spec=spec) as p:
        src = p.source()
        for tile in tiles:
            src.send(tile)            # blocks / raises BackpressureError when the pipeline is full
        summaries = p.drain()         # every tile stored, slides marked done -> {slide_id: summary}

Processes are spawned (never forked) and talk over tcp loopback by default (``pipeline.transport:
ipc`` on POSIX), so this works on Windows. Everything that crosses a process boundary is plain data
(the configuration as JSON, strings); analyzers are built inside the workers from their import spec.
"""

from __future__ import annotations

import itertools
import logging
import multiprocessing as mp
import os
import queue
import signal
import threading
import time
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import TYPE_CHECKING, Any

import zmq

from .protocol import Endpoints, ProtocolError, decode_header, encode, set_common, watch_parent
from .security import ClientSecurity, client_security

if TYPE_CHECKING:
    from scope_stream.config import ScopeStreamConfig

    from .events import EventSubscriber
    from .source import TileSource

__all__ = ["ControlClient", "LocalPipeline", "PipelineError", "broker_main"]

log = logging.getLogger(__name__)


class PipelineError(RuntimeError):
    """A pipeline process did not start, answer or stop as expected."""


# ------------------------------------------------------------------------------ processes
def broker_main(config_json: dict[str, Any], out: Any, ipc_dir: str | None, log_level: int = logging.WARNING) -> None:
    """Entry point of the spawned broker: binds, reports its endpoints on ``out``, serves."""
    from scope_stream.config import ScopeStreamConfig

    from .broker import Broker

    logging.basicConfig(level=log_level, format="%(asctime)s broker %(name)s: %(message)s")
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent drains us on Ctrl-C
    cfg = ScopeStreamConfig.model_validate(config_json)
    try:
        broker = Broker(cfg.pipeline)
        endpoints = broker.bind(Path(ipc_dir) if ipc_dir else None)
    except Exception as exc:
        out.put({"error": f"{type(exc).__name__}: {exc}"})
        raise SystemExit(2) from exc
    if hasattr(signal, "SIGTERM"):
        signal.signal(signal.SIGTERM, lambda *_: broker.request_stop(drain=True))
    out.put({"endpoints": endpoints.to_dict(), "pid": os.getpid()})
    watch_parent(lambda: broker.request_stop(drain=True, deadline_s=30.0))
    broker.run()


class ControlClient:
    """Requests to the broker's control socket: ``stats``, ``finish``, ``scan``, ``shutdown``, ``ping``."""

    def __init__(
        self, endpoint: str, security: ClientSecurity | None = None, context: zmq.Context[Any] | None = None
    ) -> None:
        self._own_ctx = context is None
        self.ctx = context or zmq.Context()
        self.sock = self.ctx.socket(zmq.DEALER)
        set_common(self.sock, hwm=64)
        if security is not None:
            security.apply(self.sock)
        self.sock.connect(endpoint)
        self.endpoint = endpoint
        self._ids = itertools.count(1)
        self._lock = threading.Lock()

    def request(self, type_: str, timeout: float | None = 10.0, **fields: Any) -> dict[str, Any]:
        with self._lock:
            req = f"c{next(self._ids)}"
            self.sock.send_multipart([encode(type_, req=req, **fields)])
            deadline = None if timeout is None else time.monotonic() + timeout
            while True:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    raise PipelineError(f"the broker at {self.endpoint} did not answer {type_!r} within {timeout} s")
                if not self.sock.poll(100 if left is None else max(1, min(100, int(left * 1000))), zmq.POLLIN):
                    continue
                try:
                    header = decode_header(self.sock.recv_multipart()[0])
                except ProtocolError as exc:
                    log.warning("bad control reply ignored: %s", exc)
                    continue
                if header.get("req") != req:
                    continue  # a late answer to an earlier request that timed out
                if header["type"] == "reject":
                    raise PipelineError(f"the broker refused {type_!r}: {header.get('reason')}: {header.get('detail')}")
                return header

    def stats(self, timeout: float | None = 10.0) -> dict[str, Any]:
        return dict(self.request("stats", timeout)["stats"])

    def finish(
        self, slide_id: str, summary: dict[str, Any] | None = None, timeout: float | None = 300.0
    ) -> dict[str, Any]:
        return dict(self.request("finish", timeout, slide_id=slide_id, summary=summary or {}).get("summary") or {})

    def close(self) -> None:
        self.sock.close(linger=0)
        if self._own_ctx:
            self.ctx.term()


# ---------------------------------------------------------------------------- the pipeline
class LocalPipeline:
    """Broker + ``n_workers`` workers + sink on this machine, as spawned processes (a context manager)."""

    def __init__(
        self,
        config: ScopeStreamConfig | None = None,
        store_path: Path | str | None = None,
        analyzer_spec: str | None = None,
        *,
        n_workers: int | None = None,
        log_level: int = logging.WARNING,
        start_timeout: float = 60.0,
        sink_delay_ms: float = 0.0,
    ) -> None:
        from scope_stream.config import ScopeStreamConfig

        self.config = config or ScopeStreamConfig()
        self.store_path = Path(store_path) if store_path is not None else None
        self.analyzer_spec = analyzer_spec or self.config.pipeline.analyzer
        self.n_workers = self.config.pipeline.n_workers if n_workers is None else int(n_workers)
        self.log_level = log_level
        self.start_timeout = start_timeout
        self.sink_delay_ms = sink_delay_ms
        self._mp = mp.get_context("spawn")
        self._config_json = self.config.model_dump(mode="json")
        self.broker_proc: BaseProcess | None = None
        self.sink_proc: BaseProcess | None = None
        self.workers: list[BaseProcess] = []
        self.endpoints: Endpoints | None = None
        self._control: ControlClient | None = None
        self._security = client_security(self.config.pipeline.curve_keys_dir)
        self._ipc_dir: str | None = None
        self._worker_ids = itertools.count()
        self._callbacks: Any = None

    # ------------------------------------------------------------------------- start
    def start(self) -> LocalPipeline:
        """Start the broker, the sink and the workers; returns once all have registered."""
        if self.broker_proc is not None:
            raise PipelineError("this pipeline is already started")
        if self.config.pipeline.transport == "ipc":
            if os.name == "nt":
                raise PipelineError("pipeline.transport 'ipc' is not available on Windows; use 'tcp'")
            import tempfile

            self._ipc_dir = tempfile.mkdtemp(prefix="scope-stream-ipc-")
        out = self._mp.Queue()
        self.broker_proc = self._mp.Process(
            target=broker_main,
            args=(self._config_json, out, self._ipc_dir, self.log_level),
            name="scope-stream-broker",
        )
        self.broker_proc.start()
        deadline = time.monotonic() + self.start_timeout
        while True:
            try:
                msg = out.get(timeout=0.2)
                break
            except queue.Empty:
                if self.broker_proc.exitcode is not None:
                    code = self.broker_proc.exitcode
                    self._kill_all()
                    raise PipelineError(f"the broker process exited with code {code} during start-up") from None
                if time.monotonic() > deadline:
                    self._kill_all()
                    raise PipelineError(f"the broker did not start within {self.start_timeout} s") from None
        if "error" in msg:
            self._kill_all()
            raise PipelineError(f"the broker could not start: {msg['error']}")
        self.endpoints = Endpoints.from_dict(msg["endpoints"])
        self._control = ControlClient(self.endpoints.control, self._security)
        try:
            self.start_sink()
            for _ in range(self.n_workers):
                self.start_worker()
            self.wait_ready(self.start_timeout)
        except BaseException:
            # a worker or the sink that cannot start (a missing model, say) must not leave the rest running
            self._kill_all()
            self._control.close()
            self._control = None
            raise
        return self

    def wait_ready(self, timeout: float = 60.0, n_workers: int | None = None) -> dict[str, Any]:
        """Wait until ``n_workers`` (default: all started) workers and the sink are registered."""
        want = sum(1 for p in self.workers if p.is_alive()) if n_workers is None else n_workers
        deadline = time.monotonic() + timeout
        stats: dict[str, Any] = {}
        while time.monotonic() < deadline:
            stats = self.stats(timeout=max(1.0, deadline - time.monotonic()))
            if stats["sink"] is not None and len(stats["workers"]) >= want:
                return stats
            dead = [p.name for p in [self.sink_proc, *self.workers] if p is not None and p.exitcode not in (None, 0)]
            if dead:
                raise PipelineError(f"pipeline processes exited during start-up: {dead}")
            time.sleep(0.05)
        raise PipelineError(
            f"pipeline not ready after {timeout} s: {len(stats.get('workers', []))}/{want} workers, "
            f"sink {'connected' if stats.get('sink') else 'missing'}"
        )

    def start_worker(
        self,
        device: str | None = None,
        name: str | None = None,
        analyzer_spec: str | None = None,
        stage_options: dict[str, Any] | None = None,
    ) -> BaseProcess:
        """Start one more worker process (it joins the running pipeline).

        ``stage_options`` are merged over ``pipeline.stage_options`` for this worker only (drills, tests).
        """
        from .worker import worker_main

        assert self.endpoints is not None, "start the pipeline first"
        i = next(self._worker_ids)
        pc = self.config.pipeline
        dev = device or (pc.devices[i % len(pc.devices)] if pc.devices else pc.device)
        name = name or f"worker-{i}"
        config_json = self._config_json
        if stage_options:
            import copy

            config_json = copy.deepcopy(config_json)
            config_json["pipeline"]["stage_options"].update(stage_options)
        proc = self._mp.Process(
            target=worker_main,
            args=(
                self.endpoints.backend,
                config_json,
                analyzer_spec or self.analyzer_spec,
                dev,
                name,
                self.log_level,
                i,
            ),
            name=f"scope-stream-{name}",
        )
        proc.start()
        self.workers.append(proc)
        return proc

    def start_sink(self, delay_ms: float | None = None) -> BaseProcess:
        """Start the sink process (again, after :meth:`kill_sink`: it resumes from the store)."""
        from .sink import sink_main

        assert self.endpoints is not None, "start the pipeline first"
        self.sink_proc = self._mp.Process(
            target=sink_main,
            args=(
                self.endpoints.sink,
                self._config_json,
                str(self.store_path) if self.store_path else None,
                self.sink_delay_ms if delay_ms is None else delay_ms,
                self.log_level,
            ),
            name="scope-stream-sink",
        )
        self.sink_proc.start()
        return self.sink_proc

    def restart_dead_workers(self) -> int:
        """Start a replacement for every worker process that has exited; returns how many."""
        n = 0
        for i, p in enumerate(self.workers):
            if p.exitcode is not None:
                log.warning("worker %s exited with code %s; starting a replacement", p.name, p.exitcode)
                self.workers.pop(i)
                self.start_worker()
                n += 1
                return n + self.restart_dead_workers()
        return n

    def kill_worker(self, index: int, sig: int | None = None) -> None:
        """Kill a worker hard (``SIGKILL`` by default; on Windows ``terminate()``) — for failover drills."""
        _kill(self.workers[index], sig)

    def kill_sink(self, sig: int | None = None) -> None:
        assert self.sink_proc is not None
        _kill(self.sink_proc, sig)

    # ------------------------------------------------------------------------- use
    @property
    def events_endpoint(self) -> str:
        assert self.endpoints is not None, "start the pipeline first"
        return self.endpoints.events

    def source(self, **kw: Any) -> TileSource:
        """A new :class:`TileSource` connected to this pipeline (one per thread)."""
        from .source import TileSource

        assert self.endpoints is not None, "start the pipeline first"
        return TileSource.from_config(self.endpoints, self.config, **kw)

    def subscribe(self, topics: Any = None) -> EventSubscriber:
        """An :class:`EventSubscriber` on this pipeline's events."""
        from .events import EventSubscriber

        return EventSubscriber(self.events_endpoint, topics, security=self._security)

    def on(self, topic: str, fn: Any = None) -> Any:
        """Call ``fn(event)`` for every event on ``topic`` (``"cell.flagged"``, ``"tile.*"``, ``"*"``).

        Also usable as a decorator. Callbacks run on a thread of their own, never on the pipeline's;
        the webhooks of ``config.callbacks`` are delivered alongside. See ``docs/callbacks.md``.
        """
        if self._callbacks is None:
            from scope_stream.callbacks import Callbacks

            self._callbacks = Callbacks(self.config, self.events_endpoint, slide_id=self.config.slide_id).start()
        return self._callbacks.on(topic, fn)

    def stats(self, timeout: float = 10.0) -> dict[str, Any]:
        """The broker's statistics (queue depths, workers, sink, counts, rejections, rates)."""
        assert self._control is not None, "start the pipeline first"
        return self._control.stats(timeout)

    def start_scan(self, slide_id: str, metadata: dict[str, Any] | None = None, timeout: float = 10.0) -> None:
        assert self._control is not None, "start the pipeline first"
        self._control.request("scan", timeout, slide_id=slide_id, metadata=metadata or {})

    def wait_idle(self, timeout: float = 60.0) -> bool:
        """True once every accepted tile is stored (queue, spool, workers and sink empty); False on timeout."""
        deadline = time.monotonic() + timeout
        while True:
            s = self.stats(timeout=max(1.0, min(10.0, deadline - time.monotonic())))
            if s["pending"] == 0:
                return True
            if time.monotonic() > deadline:
                return False
            time.sleep(0.05)

    def finish(self, slide_id: str, summary: dict[str, Any] | None = None, timeout: float = 300.0) -> dict[str, Any]:
        """Ask the sink to finalise a slide once all its tiles are stored; its summary (``slide.done``)."""
        assert self._control is not None, "start the pipeline first"
        return self._control.finish(slide_id, summary, timeout)

    def drain(self, timeout: float = 300.0, summary: dict[str, Any] | None = None) -> dict[str, dict[str, Any]]:
        """Wait until idle, then finalise every slide that is not yet: ``{slide_id: summary}``."""
        if not self.wait_idle(timeout):
            raise PipelineError(f"the pipeline did not become idle within {timeout} s: {self.stats()}")
        out = {}
        for slide_id, info in self.stats()["slides"].items():
            if not info["finished"]:
                out[slide_id] = self.finish(slide_id, summary, timeout)
        return out

    # ------------------------------------------------------------------------- stop
    def stop(self, drain: bool = True, timeout: float = 60.0) -> None:
        """Shut down: with ``drain`` the broker first gets every accepted tile stored, then stops workers and sink."""
        if self.broker_proc is None:
            return
        try:
            if self._control is not None and self.broker_proc.is_alive():
                self._control.request("shutdown", timeout=5.0, drain=drain)
        except PipelineError as exc:
            log.warning("shutdown request failed: %s", exc)
        deadline = time.monotonic() + timeout
        for p in [self.broker_proc, self.sink_proc, *self.workers]:
            if p is not None:
                p.join(timeout=max(0.1, deadline - time.monotonic()))
        self._kill_all()
        if self._callbacks is not None:  # after the pipeline: the last events (slide.done) are dispatched
            self._callbacks.close()
            self._callbacks = None
        if self._control is not None:
            self._control.close()
            self._control = None
        if self._ipc_dir:
            import shutil

            shutil.rmtree(self._ipc_dir, ignore_errors=True)
        self.broker_proc = None

    def _kill_all(self) -> None:
        for p in [self.broker_proc, self.sink_proc, *self.workers]:
            if p is not None and p.is_alive():
                log.info("terminating process %s", p.name)
                p.terminate()
                p.join(timeout=5)
                if p.is_alive():
                    p.kill()
                    p.join(timeout=5)

    def __enter__(self) -> LocalPipeline:
        return self.start()

    def __exit__(self, exc_type: object, *exc: object) -> None:
        self.stop(drain=exc_type is None)


def _kill(proc: BaseProcess, sig: int | None) -> None:
    if proc.pid is None:
        return
    if os.name == "nt":
        proc.terminate()
    else:
        os.kill(proc.pid, signal.SIGKILL if sig is None else sig)
    if sig is None:
        proc.join(timeout=10)
