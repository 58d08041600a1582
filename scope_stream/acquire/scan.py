"""Scans run by scope-stream: survey plan -> backend -> tiles into the pipeline, adaptive re-imaging, control.

A :class:`ScanSession` runs one slide:

1. announces the scan to the pipeline (``scan.started``);
2. drives a backend (:class:`PymmcorePlusBackend` -- also the virtual microscope --,
   :class:`PycromanagerBackend` (Python or Java backend) or :class:`ReplayBackend`) through an
   :class:`EventScheduler` that hands out one acquisition *action* at a time: a survey field of the
   :class:`~scope_stream.acquire.plan.ScanPlan`, or -- first, between two survey fields -- a queued
   re-image (a position imaged again with the re-image objective, optionally as a focus stack);
3. subscribes to the pipeline's ``cell.flagged`` events and, in adaptive mode, queues a re-image
   of each flagged cell, within ``scan.reimage_budget`` positions per slide (nearby flags share one
   re-image field);
4. serves the control endpoint (:mod:`scope_stream.acquire.control`): re-image requests from
   napari or scanners, validated against the stage limits and objectives, executed between scan
   events and answered with the new tile ids;
5. after the survey, waits for the last analysis results (so their flags can still be
   re-imaged), then asks the pipeline to finish the slide (``slide.done``) and returns a
   :class:`ScanReport`.

Tiles go through a :class:`~scope_stream.acquire.listen.tiles.ThreadedSink` (one thread owns the
``TileSource``), so neither the acquisition thread nor the listeners ever block on the network.
"""

from __future__ import annotations

import contextlib
import logging
import math
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from .control import ControlError, ControlServer, ReimageRequest, ReimageResult
from .listen.tiles import SinkLike, ThreadedSink
from .plan import ScanPlan, ScanPosition, fov_for_objective

if TYPE_CHECKING:
    from scope_stream.callbacks import EventHub
    from scope_stream.config import ScopeStreamConfig
    from scope_stream.vocabulary import Tile

__all__ = [
    "EventScheduler",
    "PycromanagerBackend",
    "PymmcorePlusBackend",
    "ReimageJob",
    "ReplayBackend",
    "ScanBackend",
    "ScanError",
    "ScanReport",
    "ScanSession",
    "backend_from_config",
    "run_scan",
]

log = logging.getLogger(__name__)


class ScanError(RuntimeError):
    """A scan that cannot start or failed (the message says why)."""


# ------------------------------------------------------------------------------ jobs and actions
@dataclass
class ReimageJob:
    """One re-image position: where, with which objective, which focus offsets, and why."""

    number: int
    x_um: float
    y_um: float
    objective: str
    z_offsets_um: list[float]
    origin: str  # "adaptive" or "control"
    request_id: str
    reason: str = ""
    flag: dict[str, Any] | None = None
    future: Future[ReimageResult] = field(default_factory=Future)
    tile_ids: list[str] = field(default_factory=list)
    sent: set[str] = field(default_factory=set)
    pixel_size_um: float = 0.0
    z_um: list[float] = field(default_factory=list)

    def __post_init__(self) -> None:
        n = len(self.z_offsets_um)
        self.tile_ids = [f"r{self.number:04d}" + (f"-z{k}" if n > 1 else "") for k in range(n)]


@dataclass(frozen=True)
class ScanAction:
    position: ScanPosition


@dataclass(frozen=True)
class ReimageAction:
    job: ReimageJob


Action = ScanAction | ReimageAction


class EventScheduler:
    """Hands out acquisition actions in order: queued re-images first, then the next survey field.

    After the survey it keeps going while analysis results (and so flags) may still arrive
    (``results_timeout_s``) and while ``hold_open_s`` lasts, executing re-images as they come;
    then :meth:`next_action` returns None and the acquisition ends. Thread-safe.
    """

    def __init__(
        self,
        plan: ScanPlan | None,
        *,
        wait_for_results: bool,
        results_timeout_s: float,
        hold_open_s: float = 0.0,
    ) -> None:
        self.plan = plan
        self._positions: Iterator[ScanPosition] = iter(plan.positions if plan is not None else ())
        self._jobs: deque[ReimageJob] = deque()
        self._cv = threading.Condition()
        self._closed = False
        self._survey_done = False
        self.wait_for_results = wait_for_results
        self.results_timeout_s = results_timeout_s
        self.hold_open_s = hold_open_s
        self._results_deadline: float | None = None
        self._hold_deadline: float | None = None
        self.results_complete: Callable[[], bool] = lambda: True
        self.state = "scanning"
        self.scan_issued = 0  # survey fields handed to the backend

    # ---- producers
    def add_job(self, job: ReimageJob) -> None:
        with self._cv:
            if self._closed:
                raise ControlError("closed", "the scan is over; nothing more is acquired", job.request_id)
            self._jobs.append(job)
            self._cv.notify_all()

    def poke(self) -> None:
        """Re-check the end conditions (called when results arrive)."""
        with self._cv:
            self._cv.notify_all()

    def close(self) -> list[ReimageJob]:
        """Stop handing out actions; returns the jobs that were still queued."""
        with self._cv:
            self._closed = True
            left = list(self._jobs)
            self._jobs.clear()
            self.state = "closed"
            self._cv.notify_all()
        return left

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def queued(self) -> int:
        with self._cv:
            return len(self._jobs)

    # ---- consumer (the acquisition thread)
    def next_action(self) -> Action | None:
        with self._cv:
            while True:
                if self._closed:
                    return None
                if self._jobs:
                    return ReimageAction(self._jobs.popleft())
                if not self._survey_done:
                    pos = next(self._positions, None)
                    if pos is not None:
                        self.scan_issued += 1
                        return ScanAction(pos)
                    self._survey_done = True
                    self._results_deadline = time.monotonic() + self.results_timeout_s
                    self.state = "waiting for results"
                now = time.monotonic()
                assert self._results_deadline is not None
                if self.wait_for_results and not self.results_complete() and now < self._results_deadline:
                    self._cv.wait(min(0.1, self._results_deadline - now))
                    continue
                if self._hold_deadline is None:
                    self._hold_deadline = now + self.hold_open_s
                    self.state = "holding" if self.hold_open_s > 0 else "finishing"
                if now < self._hold_deadline:
                    self._cv.wait(min(0.1, self._hold_deadline - now))
                    continue
                self._closed = True
                self.state = "finishing"
                return None


# ------------------------------------------------------------------------------ report
@dataclass
class ScanReport:
    """What a scan did: tiles sent, re-images (with their origin and tile ids), the pipeline's summary."""

    slide_id: str
    backend: str
    n_scan_tiles: int
    n_reimage_tiles: int
    reimages: list[dict[str, Any]]
    skipped_flags: dict[str, int]
    summary: dict[str, Any]
    control_endpoint: str | None
    duration_s: float
    errors: int
    error: str | None = None


# ------------------------------------------------------------------------------ backends
class ScanBackend(Protocol):
    """Runs the acquisition of a session until its scheduler has no more actions."""

    name: str

    def objectives(self) -> list[str] | None:
        """Objectives it can switch to (None: not known / not applicable)."""
        ...

    def run(self, session: ScanSession) -> None: ...

    def cancel(self) -> None: ...

    def close(self) -> None: ...


def objective_properties(core: Any, group: str, name: str) -> list[tuple[str, str, str]]:
    """The (device, property, value) settings of preset ``name`` in config group ``group``."""
    if group and core.isGroupDefined(group) and core.isConfigDefined(group, name):
        return [(str(d), str(p), str(v)) for d, p, v in core.getConfigData(group, name)]
    for dev in core.guessObjectiveDevices():
        labels = list(core.getStateLabels(dev))
        if name in labels:
            return [(str(dev), "Label", name)]
    raise ScanError(
        f"cannot switch to objective {name!r}: no preset {name!r} in config group {group!r} and no objective "
        "device with that label"
    )


class _Focus:
    """Where the focus should be: the survey's z, moved for focus stacks and restored afterwards."""

    def __init__(self, survey_z: float | None, fixed: bool) -> None:
        self.survey_z = survey_z
        self.fixed = fixed  # the plan sets z on every survey field
        self.dirty = False  # a re-image moved the focus away from survey_z

    def for_scan(self) -> float | None:
        z = self.survey_z if (self.fixed or self.dirty) else None
        self.dirty = False
        return z

    def for_reimage(self, dz: float) -> tuple[float | None, float]:
        """(z to command or None, the z the frame is taken at)."""
        if self.survey_z is None:
            return None, dz
        if dz != 0:
            self.dirty = True
            return self.survey_z + dz, self.survey_z + dz
        if self.dirty:
            self.dirty = False
            return self.survey_z, self.survey_z
        return None, self.survey_z


class PymmcorePlusBackend:
    """Scans on any ``CMMCorePlus`` through its MDA runner (the virtual microscope is one).

    Events come from the session's scheduler one at a time (``core.mda.run(iterator)``), so a
    re-image slips in between two survey fields; frames reach the listener through pymmcore-plus's
    ``mda_listeners_connected`` relay thread, never on the acquisition thread.
    """

    name = "pymmcore-plus"

    def __init__(self, core: Any, *, objective_group: str = "Objective", owns_core: bool = False) -> None:
        self.core = core
        self.objective_group = objective_group
        self.owns_core = owns_core
        self._props: dict[str, list[tuple[str, str, str]]] = {}

    @classmethod
    def virtual(cls, cfg: ScopeStreamConfig) -> PymmcorePlusBackend:
        """The virtual microscope of ``cfg.microscope`` (closed with the backend)."""
        from .virtual import build_virtual_core

        b = cls(build_virtual_core(cfg.microscope), owns_core=True)
        b.name = "virtual"
        return b

    def objectives(self) -> list[str] | None:
        g = self.objective_group
        if g and self.core.isGroupDefined(g):
            return [str(c) for c in self.core.getAvailableConfigs(g)]
        return None

    def _objective_props(self, name: str) -> list[tuple[str, str, str]]:
        if name not in self._props:
            self._props[name] = objective_properties(self.core, self.objective_group, name)
        return self._props[name]

    def _events(self, session: ScanSession) -> Iterator[Any]:
        from useq import MDAEvent

        from .listen.pymmcore_plus import SCOPE_STREAM_KEY

        core = self.core
        plan = session.plan
        survey_z = plan.z_um if plan is not None and plan.z_um is not None else None
        if survey_z is None and core.getFocusDevice():
            survey_z = float(core.getPosition())
        focus = _Focus(survey_z, fixed=plan is not None and plan.z_um is not None)
        current_obj: str | None = None
        while True:
            action = session.scheduler.next_action()
            if action is None:
                return
            if isinstance(action, ScanAction):
                p = action.position
                obj = plan.objective if plan is not None else ""
                props = self._objective_props(obj) if obj and obj != current_obj else []
                current_obj = obj or current_obj
                yield MDAEvent(
                    x_pos=p.x_um,
                    y_pos=p.y_um,
                    z_pos=focus.for_scan(),
                    index={"p": p.index},
                    properties=props,
                    metadata={SCOPE_STREAM_KEY: {"tile_id": p.tile_id, "kind": "scan", "objective": obj}},
                )
                continue
            job = action.job
            session.job_started(job)
            props = self._objective_props(job.objective) if job.objective != current_obj else []
            current_obj = job.objective
            for k, dz in enumerate(job.z_offsets_um):
                z, z_at = focus.for_reimage(dz)
                job.z_um.append(float(z_at))
                yield MDAEvent(
                    x_pos=job.x_um,
                    y_pos=job.y_um,
                    z_pos=z,
                    index={"r": job.number, "z": k},
                    properties=props if k == 0 else [],
                    metadata={SCOPE_STREAM_KEY: session.reimage_tile_info(job, k)},
                )

    def run(self, session: ScanSession) -> None:
        from .listen.pymmcore_plus import PymmcorePlusListener

        listener = PymmcorePlusListener(session.sink, slide_id=session.slide_id)
        session.listener_stats = listener.stats
        # output=listener: pymmcore-plus connects it through mda_listeners_connected (a relay thread)
        self.core.mda.run(self._events(session), output=listener)

    def cancel(self) -> None:
        try:
            if self.core.mda.is_running():
                self.core.mda.cancel()
        except Exception:
            pass

    def close(self) -> None:
        if self.owns_core:
            from .virtual import close_core

            close_core(self.core)


class PycromanagerBackend:
    """Scans through pycromanager's ``Acquisition``: Python backend (on a pymmcore-plus core, via
    :func:`~scope_stream.acquire.pycromanager_compat.pycromanager_python_backend`) or Java backend
    (a running Micro-Manager with its ZMQ server on ``port``).

    Events are submitted with ``acq.acquire`` one action at a time, at most one action ahead of the
    images received, so re-images are inserted into the running acquisition's event queue between
    survey fields. ``transfer="saved"`` (Java backend) streams from ``image_saved_fn``: pixels are
    read from the dataset Java wrote instead of crossing the bridge (needs ``directory``).
    """

    def __init__(
        self,
        core: Any | None = None,
        *,
        port: int = 4827,
        directory: Path | str | None = None,
        objective_group: str = "Objective",
        transfer: str = "process",
        owns_core: bool = False,
        name: str = "acquisition",
    ) -> None:
        self.core = core
        self.port = port
        self.directory = Path(directory) if directory is not None else None
        self.objective_group = objective_group
        self.transfer = transfer
        self.owns_core = owns_core
        self.acq_name = name
        self.name = "pycromanager" if core is not None else "pycromanager-java"
        self.stall_timeout_s = 120.0  # no image for this long while events are pending: the scan fails
        self._acq: Any = None
        self._cancelled = threading.Event()
        if transfer == "saved" and self.directory is None:
            raise ScanError("pycromanager transfer 'saved' reads the saved dataset: set scan.pycromanager_directory")
        if core is not None and self.directory is not None and int(core.getNumberOfComponents()) > 1:
            raise ScanError(
                "pycromanager's Python backend cannot save an RGB camera's images to disk (its NDTiff writer takes "
                "2-D images only, and the failure hangs the acquisition): leave scan.pycromanager_directory unset"
            )

    def objectives(self) -> list[str] | None:
        if self.core is not None and self.core.isGroupDefined(self.objective_group):
            return [str(c) for c in self.core.getAvailableConfigs(self.objective_group)]
        return None

    def _event(self, x: float, y: float, axes: dict[str, int], obj: str | None, z: float | None) -> dict[str, Any]:
        ev: dict[str, Any] = {"axes": axes, "x": x, "y": y}
        if z is not None:
            ev["z"] = z
        if obj:
            ev["config_group"] = [self.objective_group, obj]
        return ev

    def _namer(self, session: ScanSession) -> Callable[[Mapping[str, Any]], tuple[str, str, dict[str, Any]]]:
        plan = session.plan

        def name(axes: Mapping[str, Any]) -> tuple[str, str, dict[str, Any]]:
            if "reimage" in axes:
                job = session.job_by_number(int(axes["reimage"]))
                k = int(axes.get("z", 0))
                if job is not None:
                    info = session.reimage_tile_info(job, k)
                    keys = (
                        "request_id",
                        "reason",
                        "z_offset_um",
                        "flag_cell_id",
                        "objective",
                        "origin",
                        "reimage_number",
                    )
                    extra = {key: info[key] for key in keys if key in info}
                    return info["tile_id"], "reimage", extra
                return f"r{int(axes['reimage']):04d}-z{k}", "reimage", {}
            if "position" in axes and plan is not None:
                i = int(axes["position"])
                return plan.positions[i].tile_id, "scan", {"objective": plan.objective}
            parts = "-".join(f"{k}{v}" for k, v in sorted(axes.items()))
            return f"x-{parts}", "scan", {}

        return name

    def run(self, session: ScanSession) -> None:
        from .listen.pycromanager import PycromanagerListener

        received = threading.Condition()
        counts = {"images": 0}

        def on_image(_meta: dict[str, Any]) -> None:
            with received:
                counts["images"] += 1
                received.notify_all()

        listener = PycromanagerListener(
            session.sink,
            slide_id=session.slide_id,
            backend="python" if self.core is not None else "java",
            namer=self._namer(session),
            on_image=on_image,
        )
        session.listener_stats = listener.stats
        kwargs: dict[str, Any] = {"name": self.acq_name}
        if self.directory is not None:
            self.directory.mkdir(parents=True, exist_ok=True)
            kwargs["directory"] = str(self.directory)
        if self.transfer == "saved":
            kwargs["image_saved_fn"] = listener.image_saved_fn
        else:
            kwargs["image_process_fn"] = listener
        if self.core is not None:
            from .pycromanager_compat import pycromanager_python_backend

            with pycromanager_python_backend(self.core) as pm:
                survey_z = self._survey_z(session)
                acq = pm.acquisition(**kwargs)
                self._drive(session, acq, received, counts, survey_z)
        else:
            from pycromanager import Acquisition

            kwargs["port"] = self.port
            acq = Acquisition(**kwargs)
            self._drive(session, acq, received, counts, self._survey_z(session))
        if not listener.close(120.0):
            log.warning("pycromanager listener: not every image was sent before the timeout")

    def _survey_z(self, session: ScanSession) -> float | None:
        plan = session.plan
        if plan is not None and plan.z_um is not None:
            return plan.z_um
        if self.core is not None and self.core.getFocusDevice():
            return float(self.core.getPosition())
        return None

    def _drive(
        self,
        session: ScanSession,
        acq: Any,
        received: threading.Condition,
        counts: dict[str, int],
        survey_z: float | None,
    ) -> None:
        self._acq = acq
        plan = session.plan
        submitted: list[int] = []  # cumulative images after each action
        current_obj: str | None = None
        focus = _Focus(survey_z, fixed=plan is not None and plan.z_um is not None)
        try:
            while not self._cancelled.is_set():
                # keep at most one action queued ahead of the images received
                if len(submitted) >= 2:
                    last, since = counts["images"], time.monotonic()
                    with received:
                        while counts["images"] < submitted[-2] and not self._cancelled.is_set():
                            if received.wait(1.0) or counts["images"] != last:
                                last, since = counts["images"], time.monotonic()
                                continue
                            check = getattr(acq, "_check_for_exceptions", None)
                            if callable(check):
                                check()  # raises what went wrong in pycromanager's threads
                            if time.monotonic() - since > self.stall_timeout_s:
                                raise ScanError(
                                    f"pycromanager delivered no image for {self.stall_timeout_s:.0f} s "
                                    f"({counts['images']} of {submitted[-2]} expected so far)"
                                )
                action = session.scheduler.next_action()
                if action is None:
                    break
                events: list[dict[str, Any]] = []
                if isinstance(action, ScanAction):
                    p = action.position
                    obj = plan.objective if plan is not None else ""
                    z = focus.for_scan()
                    events.append(
                        self._event(p.x_um, p.y_um, {"position": p.index}, obj if obj != current_obj else None, z)
                    )
                    current_obj = obj or current_obj
                else:
                    job = action.job
                    session.job_started(job)
                    for k, dz in enumerate(job.z_offsets_um):
                        z, z_at = focus.for_reimage(dz)
                        job.z_um.append(float(z_at))
                        switch = job.objective if (k == 0 and job.objective != current_obj) else None
                        events.append(self._event(job.x_um, job.y_um, {"reimage": job.number, "z": k}, switch, z))
                    current_obj = job.objective
                for ev in events:  # one acquire per event: no hardware sequencing across fields
                    acq.acquire(ev)
                submitted.append((submitted[-1] if submitted else 0) + len(events))
        finally:
            acq.mark_finished()
            acq.await_completion()
            self._acq = None

    def cancel(self) -> None:
        self._cancelled.set()
        acq = self._acq
        if acq is not None:
            with contextlib.suppress(Exception):
                acq.abort()

    def close(self) -> None:
        if self.owns_core and self.core is not None:
            from .virtual import close_core

            close_core(self.core)


class ReplayBackend:
    """Streams a replay folder or an earlier slide store; there is no stage, so no re-imaging."""

    name = "replay"

    def __init__(self, path: Path | str, *, rate_tiles_per_s: float | None = None) -> None:
        from .listen.replay import ReplaySource

        self.path = Path(path)
        self.rate = rate_tiles_per_s
        self._source_cls = ReplaySource
        self._stop = threading.Event()
        ReplaySource(self.path)  # fail now, with the reason, rather than after the pipeline started

    def objectives(self) -> list[str] | None:
        return None

    def run(self, session: ScanSession) -> None:
        source = self._source_cls(self.path, slide_id=session.slide_id)
        session.listener_stats = source.stats
        source.run(session.sink, rate_tiles_per_s=self.rate, stop=self._stop)
        session.scheduler.close()

    def cancel(self) -> None:
        self._stop.set()

    def close(self) -> None:
        pass


def backend_from_config(cfg: ScopeStreamConfig, core: Any | None = None) -> ScanBackend:
    """The backend ``cfg.scan.backend`` names; ``core`` (a ``CMMCorePlus``) for pymmcore-plus/pycromanager.

    Without a core, ``pymmcore-plus`` and ``pycromanager`` run on the virtual microscope.
    """
    s = cfg.scan
    if s.backend == "virtual":
        return PymmcorePlusBackend.virtual(cfg)
    if s.backend == "pymmcore-plus":
        if core is None:
            return PymmcorePlusBackend.virtual(cfg)
        return PymmcorePlusBackend(core)
    if s.backend == "pycromanager":
        owns = core is None
        if core is None:
            from .virtual import build_virtual_core

            core = build_virtual_core(cfg.microscope)
        return PycromanagerBackend(
            core, directory=s.pycromanager_directory, owns_core=owns, name=cfg.slide_id, transfer="process"
        )
    if s.backend == "pycromanager-java":
        return PycromanagerBackend(
            None,
            port=s.pycromanager_port,
            directory=s.pycromanager_directory,
            transfer=s.java_transfer,
            name=cfg.slide_id,
        )
    if s.backend == "replay":
        if s.replay_path is None:
            raise ScanError("the replay backend needs scan.replay_path (a folder with tiles.csv or a <slide>.zarr)")
        return ReplayBackend(s.replay_path, rate_tiles_per_s=s.rate_limit_tiles_per_s)
    raise ScanError(f"unknown scan backend {s.backend!r}")


# ------------------------------------------------------------------------------ the session
class ScanSession:
    """One slide scanned by scope-stream (see the module docstring).

    Parameters
    ----------
    cfg:
        The configuration (``scan``, ``microscope`` objectives and limits, ``pipeline`` keys).
    backend:
        A :class:`ScanBackend` (see :func:`backend_from_config`).
    sink:
        Where tiles go: a frontend endpoint (``tcp://...``; a ``TileSource`` is made on a thread of
        its own), an existing :class:`ThreadedSink`, or any object with ``send(tile)`` (then there is
        no ``scan.started`` / ``slide.done`` unless it also has ``start_scan`` / ``finish``).
    events_endpoint:
        The pipeline's events PUB endpoint; needed for adaptive re-imaging (flags) and to wait for
        the last results. None: no adaptive re-imaging.
    plan:
        The survey (default: :meth:`ScanPlan.from_config` with the backend's field of view).
    """

    def __init__(
        self,
        cfg: ScopeStreamConfig,
        backend: ScanBackend,
        sink: str | SinkLike,
        *,
        events_endpoint: str | None = None,
        plan: ScanPlan | None = None,
        slide_id: str | None = None,
        control: bool | None = None,
    ) -> None:
        from .plan import stage_limits

        self.cfg = cfg
        self.backend = backend
        self.slide_id = slide_id or cfg.slide_id
        self.events_endpoint = events_endpoint
        self.limits = stage_limits(cfg)
        is_replay = isinstance(backend, ReplayBackend)
        self.plan = None if is_replay else (plan if plan is not None else ScanPlan.from_config(cfg))
        self.adaptive = bool(cfg.scan.adaptive and not is_replay and cfg.scan.reimage_budget > 0)
        if self.adaptive and events_endpoint is None:
            log.warning("scan: adaptive re-imaging needs the pipeline's events endpoint; it is off")
            self.adaptive = False
        self._owns_sink = isinstance(sink, str)
        if isinstance(sink, str):
            endpoint = sink
            keys = cfg.pipeline.curve_keys_dir

            def factory() -> Any:
                from scope_stream.transport import TileSource

                return TileSource.from_config(endpoint, cfg, keys_dir=keys)

            self.sink: Any = ThreadedSink(factory, name="scope-stream-scan-sink", on_sent=self._on_sent)
        elif isinstance(sink, ThreadedSink):
            self.sink = sink
            if sink.on_sent is None:
                sink.on_sent = self._on_sent
            else:
                user = sink.on_sent

                def both(t: Tile) -> None:
                    user(t)
                    self._on_sent(t)

                sink.on_sent = both
        else:
            self.sink = _NotifyingSink(sink, self._on_sent)
        self.scheduler = EventScheduler(
            self.plan,
            wait_for_results=self.adaptive,
            results_timeout_s=cfg.scan.results_timeout_s,
            hold_open_s=cfg.scan.hold_open_s,
        )
        self.scheduler.results_complete = self._results_complete
        self.control_enabled = cfg.scan.control if control is None else control
        self.control: ControlServer | None = None
        self.hub: EventHub | None = None
        self.listener_stats: Any = None
        self._lock = threading.RLock()
        self._jobs: dict[int, ReimageJob] = {}
        self._job_by_tile: dict[str, ReimageJob] = {}
        self._job_numbers = iter(range(1, 10**6))
        self._budget_used = 0
        self.skipped_flags: dict[str, int] = {"budget": 0, "covered": 0, "score": 0, "outside": 0}
        self._scan_sent: set[str] = set()
        self._reimage_sent: set[str] = set()
        self._results: set[str] = set()
        self._reimage_results: set[str] = set()
        self._flags_expected = 0
        self._flags_seen = 0
        self._flagged: list[dict[str, Any]] = []
        self._t0 = 0.0
        self._thread: threading.Thread | None = None
        self._report: ScanReport | None = None
        self._error: BaseException | None = None
        self._reimage_fov = self._fov(cfg.scan.reimage_objective)
        sep = cfg.scan.reimage_min_separation_um
        self._min_sep = sep if sep is not None else (min(self._reimage_fov) / 2 if self._reimage_fov else 0.0)
        self.objective_names = [o.name for o in cfg.microscope.objectives]
        known = backend.objectives()
        if known is not None:
            self.objective_names = [n for n in self.objective_names if n in known] or list(known)
        if self.plan is not None and self.plan.objective and known is not None and self.plan.objective not in known:
            raise ScanError(f"scan objective {self.plan.objective!r} is not one of the microscope's {known}")

    def _fov(self, objective: str) -> tuple[float, float] | None:
        try:
            return fov_for_objective(self.cfg, objective)
        except ValueError:
            return None

    # ------------------------------------------------------------------ lifecycle
    @property
    def control_endpoint(self) -> str | None:
        return self.control.endpoint if self.control is not None else None

    def start(self) -> ScanSession:
        """Run the scan on a thread of its own; :meth:`wait` for the report. The control endpoint is
        up when this returns."""
        if self._thread is not None:
            raise ScanError("this scan session was already started")
        self._setup()
        self._thread = threading.Thread(target=self._run_guarded, name="scope-stream-scan", daemon=True)
        self._thread.start()
        return self

    def run(self) -> ScanReport:
        """Run the whole scan on this thread and return its report (raises :class:`ScanError` on failure)."""
        self._setup()
        self._run_guarded()
        return self.wait(0)

    def wait(self, timeout: float | None = None) -> ScanReport:
        """Wait for the scan to end; its report (raises :class:`ScanError` if it failed)."""
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                raise TimeoutError(f"the scan of {self.slide_id} did not end within {timeout} s")
        if self._report is None:
            raise ScanError(f"the scan of {self.slide_id} failed: {self._error}") from self._error
        if self._report.error is not None:
            raise ScanError(f"the scan of {self.slide_id} failed: {self._report.error}") from self._error
        return self._report

    def cancel(self) -> None:
        """Stop after the current event (queued re-images are answered ``closed``)."""
        for job in self.scheduler.close():
            self._fail_job(job, ControlError("closed", "the scan was cancelled before this re-image"))
        self.backend.cancel()

    def _setup(self) -> None:
        self._t0 = time.monotonic()
        if self.adaptive or self.events_endpoint is not None:
            from scope_stream.callbacks import EventHub

            self.hub = EventHub(self.events_endpoint, curve_keys_dir=self.cfg.pipeline.curve_keys_dir)
            self.hub.on("tile.done", self._on_tile_done)
            self.hub.on("reimage.done", self._on_tile_done)
            self.hub.on("cell.flagged", self._on_flag)
            self.hub.start()
        if self.control_enabled:
            s = self.cfg.scan
            keys = s.control_keys_dir or self.cfg.pipeline.curve_keys_dir
            from scope_stream.transport.security import is_loopback

            self.control = ControlServer(
                self,
                host=s.control_host,
                port=s.control_port,
                keys_dir=keys if not is_loopback(s.control_host) else None,
            ).start()
        start_scan = self._sink_call("start_scan")
        if start_scan is not None:
            start_scan(self.slide_id, self._scan_metadata())

    def _sink_call(self, method: str) -> Callable[..., Any] | None:
        if isinstance(self.sink, ThreadedSink):
            target = self.sink.target
            if not callable(getattr(target, method, None)):
                return None
            return lambda *a, **kw: self.sink.call(method, *a, **kw)
        fn = getattr(self.sink, method, None)
        return fn if callable(fn) else None

    def _scan_metadata(self) -> dict[str, Any]:
        s = self.cfg.scan
        md: dict[str, Any] = {
            "backend": self.backend.name,
            "region_um": [s.x0_um, s.y0_um, s.x1_um, s.y1_um],
            "objective": s.objective,
            "overlap": s.overlap,
            "adaptive": self.adaptive,
            "reimage_objective": s.reimage_objective,
            "reimage_budget": s.reimage_budget,
            "focus_stack_um": list(s.focus_stack),
            "stage_limits_um": list(self.limits),
            "control_endpoint": self.control_endpoint,
        }
        if self.plan is not None:
            md["n_fields"] = len(self.plan)
            md["fov_um"] = list(self.plan.fov_um)
            md["plan_bounds_um"] = list(self.plan.bounds_um)
        return md

    def _run_guarded(self) -> None:
        error: BaseException | None = None
        try:
            self.backend.run(self)
        except BaseException as exc:  # reported, never lost
            error = exc
            self._error = exc
            log.exception("scan of %s failed", self.slide_id)
        finally:
            for job in self.scheduler.close():
                self._fail_job(job, ControlError("closed", "the scan ended before this re-image"))
        summary: dict[str, Any] = {}
        try:
            if isinstance(self.sink, ThreadedSink):
                self.sink.flush(300.0)
            with self._lock:
                for job in self._jobs.values():  # acquired but not all sent (e.g. a failed frame)
                    if not job.future.done():
                        self._fail_job(
                            job,
                            ControlError(
                                "failed",
                                f"only {len(job.sent)} of {len(job.tile_ids)} "
                                "images of this re-image reached the pipeline",
                            ),
                        )
            if self.hub is not None:
                flush = self._sink_call("flush")
                if flush is not None:
                    flush()  # every tile acknowledged by the broker
                self._wait_all_results(self.cfg.scan.results_timeout_s)
            finish = self._sink_call("finish")
            if finish is not None:
                summary = dict(finish(self.slide_id, self._finish_summary(error)) or {})
        except BaseException as exc:
            log.exception("finishing the scan of %s failed", self.slide_id)
            if error is None:
                error = exc
                self._error = exc
        finally:
            self._teardown()
        self._report = ScanReport(
            slide_id=self.slide_id,
            backend=self.backend.name,
            n_scan_tiles=len(self._scan_sent),
            n_reimage_tiles=len(self._reimage_sent),
            reimages=self.reimages(),
            skipped_flags=dict(self.skipped_flags),
            summary=summary,
            control_endpoint=self.control_endpoint,
            duration_s=time.monotonic() - self._t0,
            errors=int(getattr(self.listener_stats, "errors", 0)),
            error=None if error is None else f"{type(error).__name__}: {error}",
        )

    def review_summary(self) -> dict[str, Any] | None:
        """The needs-review decision from the flags seen on the events socket (None without events)."""
        if self.hub is None:
            return None
        from collections import Counter

        with self._lock:
            flagged = list(self._flagged)
        return {
            "needs_review": bool(flagged),
            "n_flagged_cells": len(flagged),
            "flagged_labels": dict(Counter(str(f.get("label")) for f in flagged)),
            "flag_reasons": dict(Counter(str(r) for f in flagged for r in (f.get("reasons") or []))),
            "flagged_cells": sorted(flagged, key=lambda f: -float(f.get("score") or 0.0))[:50],
        }

    def _finish_summary(self, error: BaseException | None) -> dict[str, Any]:
        review = self.review_summary()
        return {
            **({"review": review} if review is not None else {}),
            "scan": {
                "backend": self.backend.name,
                "n_scan_tiles": len(self._scan_sent),
                "n_reimage_tiles": len(self._reimage_sent),
                "reimage_positions": len(self._jobs),
                "reimage_budget": self.cfg.scan.reimage_budget,
                "reimage_budget_used": self._budget_used,
                "skipped_flags": dict(self.skipped_flags),
                "error": None if error is None else f"{type(error).__name__}: {error}",
            },
        }

    def _teardown(self) -> None:
        if self.control is not None:
            self.control.close()
        if self.hub is not None:
            self.hub.close()
        if self._owns_sink and isinstance(self.sink, ThreadedSink):
            self.sink.close()
        try:
            self.backend.close()
        except Exception:
            log.exception("closing the %s backend failed", self.backend.name)

    # ------------------------------------------------------------------ tiles sent
    def _on_sent(self, tile: Tile) -> None:
        if tile.slide_id != self.slide_id:
            return
        if tile.kind == "scan":
            with self._lock:
                self._scan_sent.add(tile.tile_id)
            return
        with self._lock:
            self._reimage_sent.add(tile.tile_id)
            job = self._job_by_tile.get(tile.tile_id)
            if job is None:
                return
            job.sent.add(tile.tile_id)
            job.pixel_size_um = tile.pixel_size_um
            done = job.sent >= set(job.tile_ids)
        if done and not job.future.done():
            job.future.set_result(
                ReimageResult(
                    request_id=job.request_id,
                    slide_id=self.slide_id,
                    tile_ids=list(job.tile_ids),
                    x_um=job.x_um,
                    y_um=job.y_um,
                    objective=job.objective,
                    pixel_size_um=job.pixel_size_um,
                    z_um=list(job.z_um),
                )
            )

    # ------------------------------------------------------------------ results (events)
    def _on_tile_done(self, ev: dict[str, Any]) -> None:
        if ev.get("slide_id") != self.slide_id:
            return
        results = self._results if ev.get("kind", "scan") == "scan" else self._reimage_results
        with self._lock:
            if ev.get("tile_id") in results:
                return
            results.add(str(ev.get("tile_id")))
            self._flags_expected += int(ev.get("n_flagged", 0) or 0)
        self.scheduler.poke()

    def _wait_all_results(self, timeout: float) -> bool:
        """Wait until every tile sent has its result and its flags arrived (for the review summary)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:
                if (
                    self._scan_sent <= self._results
                    and self._reimage_sent <= self._reimage_results
                    and self._flags_seen >= self._flags_expected
                ):
                    return True
            time.sleep(0.02)
        log.warning("scan: not every result arrived within %.0f s; the review summary may miss flags", timeout)
        return False

    def _results_complete(self) -> bool:
        """Every survey field handed out has its result (or failed on the way) and its flags arrived."""
        failed = int(getattr(self.listener_stats, "errors", 0) or 0)
        with self._lock:
            return (
                len(self._results) + failed >= self.scheduler.scan_issued and self._flags_seen >= self._flags_expected
            )

    def _on_flag(self, ev: dict[str, Any]) -> None:
        if ev.get("slide_id") != self.slide_id:
            return
        with self._lock:
            self._flags_seen += 1
            self._flagged.append(
                {k: ev.get(k) for k in ("cell_id", "tile_id", "kind", "label", "score", "reasons", "x_um", "y_um")}
            )
        try:
            self._adapt(ev)
        finally:
            self.scheduler.poke()

    def _adapt(self, ev: dict[str, Any]) -> None:
        if not self.adaptive or ev.get("kind", "scan") != "scan" or self.scheduler.closed:
            return
        s = self.cfg.scan
        try:
            x, y = float(ev["x_um"]), float(ev["y_um"])
        except (KeyError, TypeError, ValueError):
            log.warning("scan: a cell.flagged event without x_um/y_um was ignored: %s", ev.get("cell_id"))
            return
        score = float(ev.get("score", 0.0) or 0.0)
        if s.reimage_min_score is not None and score < s.reimage_min_score:
            self.skipped_flags["score"] += 1
            return
        if not self._inside(x, y):
            self.skipped_flags["outside"] += 1
            return
        with self._lock:
            if any(math.hypot(j.x_um - x, j.y_um - y) <= self._min_sep for j in self._jobs.values()):
                self.skipped_flags["covered"] += 1
                return
            if self._budget_used >= s.reimage_budget:
                self.skipped_flags["budget"] += 1
                return
            self._budget_used += 1
            job = ReimageJob(
                number=next(self._job_numbers),
                x_um=x,
                y_um=y,
                objective=s.reimage_objective,
                z_offsets_um=list(s.focus_stack),
                origin="adaptive",
                request_id=f"adaptive-{ev.get('cell_id', '?')}",
                reason=",".join(str(r) for r in ev.get("reasons", []) or []),
                flag={k: ev.get(k) for k in ("cell_id", "tile_id", "label", "score", "reasons")},
            )
            self._add_job(job)
        try:
            self.scheduler.add_job(job)
            log.info("scan: re-imaging flagged cell %s at (%.1f, %.1f)", ev.get("cell_id"), x, y)
        except ControlError as exc:
            self._fail_job(job, exc)

    # ------------------------------------------------------------------ re-image bookkeeping
    def _inside(self, x: float, y: float) -> bool:
        x0, y0, x1, y1 = self.limits
        return x0 <= x <= x1 and y0 <= y <= y1

    def _add_job(self, job: ReimageJob) -> None:
        with self._lock:
            self._jobs[job.number] = job
            for tid in job.tile_ids:
                self._job_by_tile[tid] = job

    def job_by_number(self, number: int) -> ReimageJob | None:
        with self._lock:
            return self._jobs.get(number)

    def job_started(self, job: ReimageJob) -> None:
        log.debug("scan: executing re-image %d (%s) at (%.1f, %.1f)", job.number, job.origin, job.x_um, job.y_um)

    def reimage_tile_info(self, job: ReimageJob, k: int) -> dict[str, Any]:
        """What a re-image frame's tile is called and carries (event metadata / pycromanager namer)."""
        info: dict[str, Any] = {
            "tile_id": job.tile_ids[k],
            "kind": "reimage",
            "objective": job.objective,
            "request_id": job.request_id,
            "reason": job.reason,
            "z_offset_um": job.z_offsets_um[k],
            "reimage_number": job.number,
            "origin": job.origin,
        }
        if job.flag is not None:
            info["flag_cell_id"] = job.flag.get("cell_id")
        return info

    def _fail_job(self, job: ReimageJob, exc: Exception) -> None:
        if not job.future.done():
            job.future.set_exception(exc)

    def reimages(self) -> list[dict[str, Any]]:
        """Every re-image of this session: number, origin, position, objective, tile ids, state."""
        with self._lock:
            jobs = list(self._jobs.values())
        out = []
        for j in jobs:
            state = "queued"
            if j.future.done():
                state = "done" if j.future.exception() is None else f"error: {j.future.exception()}"
            out.append(
                {
                    "number": j.number,
                    "origin": j.origin,
                    "request_id": j.request_id,
                    "x_um": j.x_um,
                    "y_um": j.y_um,
                    "objective": j.objective,
                    "z_offsets_um": list(j.z_offsets_um),
                    "tile_ids": list(j.tile_ids),
                    "flag": j.flag,
                    "state": state,
                }
            )
        return out

    # ------------------------------------------------------------------ ControlHandler
    def submit_reimage(self, request: ReimageRequest) -> Future[ReimageResult]:
        """Validate a control request and queue it (the :class:`ControlHandler` protocol)."""
        rid = request.request_id
        if isinstance(self.backend, ReplayBackend):
            raise ControlError("closed", "a replay has no microscope to move; re-imaging is not available", rid)
        if request.slide_id is not None and request.slide_id != self.slide_id:
            raise ControlError("slide_mismatch", f"this scan is slide {self.slide_id!r}, not {request.slide_id!r}", rid)
        objective = request.objective or self.cfg.scan.reimage_objective
        if objective not in self.objective_names:
            raise ControlError(
                "unknown_objective", f"objective {objective!r} is not one of {self.objective_names}", rid
            )
        if not self._inside(request.x_um, request.y_um):
            x0, y0, x1, y1 = self.limits
            raise ControlError(
                "out_of_limits",
                f"({request.x_um:g}, {request.y_um:g}) µm is outside the stage limits x {x0:g}..{x1:g}, "
                f"y {y0:g}..{y1:g} µm",
                rid,
            )
        if self.scheduler.closed:
            raise ControlError("closed", "the scan is over; nothing more is acquired", rid)
        if self.scheduler.queued >= self.cfg.scan.control_max_pending:
            raise ControlError("busy", f"{self.scheduler.queued} re-images are already queued; try again later", rid)
        with self._lock:
            job = ReimageJob(
                number=next(self._job_numbers),
                x_um=request.x_um,
                y_um=request.y_um,
                objective=objective,
                z_offsets_um=list(request.z_offsets_um or self.cfg.scan.focus_stack),
                origin="control",
                request_id=rid,
                reason=request.reason,
            )
            self._add_job(job)
        self.scheduler.add_job(job)
        return job.future

    def control_status(self) -> dict[str, Any]:
        with self._lock:
            return {
                "state": self.scheduler.state,
                "slide_id": self.slide_id,
                "backend": self.backend.name,
                "stage_limits_um": list(self.limits),
                "objectives": self.objective_names,
                "reimage_objective": self.cfg.scan.reimage_objective,
                "queued": self.scheduler.queued,
                "scan_tiles_sent": len(self._scan_sent),
                "n_fields": len(self.plan) if self.plan is not None else None,
                "reimage_budget_left": max(0, self.cfg.scan.reimage_budget - self._budget_used),
            }


class _NotifyingSink:
    """Wraps a plain sink so the session learns which tiles were sent."""

    def __init__(self, sink: SinkLike, on_sent: Callable[[Tile], None]) -> None:
        self._sink = sink
        self._on_sent = on_sent

    def send(self, tile: Tile) -> None:
        send = getattr(self._sink, "send", None)
        (send if callable(send) else self._sink)(tile)  # type: ignore[operator]
        self._on_sent(tile)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._sink, name)


def run_scan(
    cfg: ScopeStreamConfig,
    frontend: str | SinkLike,
    *,
    events_endpoint: str | None = None,
    core: Any | None = None,
    plan: ScanPlan | None = None,
) -> ScanReport:
    """Scan ``cfg.slide_id`` with the configured backend into a running pipeline; the report."""
    backend = backend_from_config(cfg, core)
    try:
        session = ScanSession(cfg, backend, frontend, events_endpoint=events_endpoint, plan=plan)
    except BaseException:
        backend.close()
        raise
    return session.run()
