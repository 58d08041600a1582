"""Run pycromanager 1.0.2's Python-backend ``Acquisition`` on a pymmcore-plus core (e.g. the virtual one).

pycromanager's Python backend (``acq_eng_py``) normally drives a core made by ``mmpycorex``: a pymmcore
``CMMCore`` subclass with snake_case method names, registered in ``mmpycorex``'s list of headless cores,
with an ``Engine`` singleton around it. :func:`pycromanager_python_backend` provides the same for any
``CMMCorePlus`` without touching its class:

* :class:`PycromanagerCore` wraps the core (composition): ``snap_image`` -> ``snapImage`` and so on for
  every method, plus ``get_tagged_image`` / ``pop_next_tagged_image`` / ``TaggedImage`` as pycromanager
  expects them, implemented over pymmcore-plus's image API (Python cameras included);
* it registers the wrapper with ``mmpycorex`` (so ``pycromanager.Acquisition`` picks the Python backend)
  and starts ``acq_eng_py``'s ``Engine`` on it;
* closing shuts the engine's threads down, deregisters the core and forgets the engine singleton, so the
  process exits cleanly and a later session can start afresh.

Two pycromanager 1.0.2 defects are handled, both documented in docs/virtual-microscope.md:

* ``AcquisitionEvent.copy()`` / ``from_json`` call ``self.setTags(...)``, a method the class does not have
  (it has ``set_tags``), so any event with ``"tags"`` kills the event thread and the acquisition hangs.
  While a session is open the missing alias ``AcquisitionEvent.setTags = AcquisitionEvent.set_tags`` is
  added to that pycromanager class (only if absent) and removed on close. Nothing else is changed.
* an exception inside a ``notification_callback_fn`` kills pycromanager's notification thread and
  ``await_completion`` then waits forever. :meth:`PycromanagerSession.acquisition` wraps the callback:
  the exception is logged and aborts the acquisition, so it is raised to the caller instead.

Also, pycromanager only prints a failed stage move (six retries, then "Error executing event") and
carries on; acquisitions made with :meth:`PycromanagerSession.acquisition` check the x/y of events
given as dicts or lists against the stage travel first and raise a clear error.

Usage::

    with pycromanager_python_backend(core) as pm:
        with pm.acquisition(image_process_fn=on_image) as acq:     # or pycromanager.Acquisition(...)
            acq.acquire(multi_d_acquisition_events(xy_positions=[[0, 0], [100, 0]]))
"""

from __future__ import annotations

import atexit
import logging
import threading
import time
import weakref
from collections.abc import Callable
from contextlib import suppress
from typing import Any

__all__ = ["PycromanagerCore", "PycromanagerSession", "pycromanager_python_backend"]

log = logging.getLogger(__name__)

_SESSION_LOCK = threading.Lock()


class PycromanagerCore:
    """The core as pycromanager's Python backend sees it: snake_case names over a ``CMMCorePlus``.

    Attribute lookups are translated with pycromanager's own camel-to-snake rule
    (``get_xy_stage_device`` -> ``getXYStageDevice``); camelCase names pass straight through.
    """

    def __init__(self, core: Any) -> None:
        from mmpycorex.launcher import TaggedImage, _camel_to_snake

        self._core = core
        self.TaggedImage = TaggedImage
        names: dict[str, str] = {}
        for name in dir(type(core)):
            if not name.startswith("_"):
                names.setdefault(_camel_to_snake(name), name)
        self._names = names

    @property
    def wrapped(self) -> Any:
        """The pymmcore-plus core underneath."""
        return self._core

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        core = self.__dict__.get("_core")
        if core is None:
            raise AttributeError(name)
        target = self.__dict__["_names"].get(name, name)
        try:
            return getattr(core, target)
        except AttributeError:
            raise AttributeError(f"{type(core).__name__} has no method {name!r} (looked for {target!r})") from None

    # ---- what mmpycorex bolts onto its snake_case core
    def get_tagged_image(
        self,
        cam_index: int,
        camera: str,
        height: int,
        width: int,
        binning: Any = None,
        pixel_type: Any = None,
        roi_x_start: Any = None,
        roi_y_start: Any = None,
    ) -> Any:
        """The last snapped image with the tags pycromanager's engine reads."""
        pix = self._core.getImage()
        tags: dict[str, Any] = {
            "Camera": camera,
            "Height": height,
            "Width": width,
            "PixelType": pixel_type if pixel_type is not None else _pixel_type(pix),
            "CameraChannelIndex": cam_index,
        }
        if binning is not None:
            tags["Binning"] = binning
        if roi_x_start is not None:
            tags["ROI-X-start"] = roi_x_start
        if roi_y_start is not None:
            tags["ROI-Y-start"] = roi_y_start
        return self.TaggedImage(tags, pix)

    def pop_next_tagged_image(self) -> Any:
        """The next image of a running sequence, with its metadata as string tags."""
        pix, md = self._core.popNextImageAndMD()
        tags = {str(k): v for k, v in dict(md).items()}
        tags.setdefault("Camera", self._core.getCameraDevice())
        tags.setdefault("PixelType", _pixel_type(pix))
        return self.TaggedImage(tags, pix)

    def __repr__(self) -> str:
        return f"PycromanagerCore({self._core!r})"


def _pixel_type(pix: Any) -> str:
    if getattr(pix, "ndim", 2) == 3:
        return "RGB32"
    return f"GRAY{8 * int(getattr(getattr(pix, 'dtype', None), 'itemsize', 1))}"


class PycromanagerSession:
    """An open pycromanager Python backend on one core; a context manager. See the module docstring."""

    def __init__(self, core: Any) -> None:
        from mmpycorex.launcher import _PYMMCORES
        from pycromanager.acquisition.acq_eng_py.internal.engine import Engine
        from pycromanager.acquisition.acq_eng_py.main.acquisition_event import AcquisitionEvent

        if not _SESSION_LOCK.acquire(blocking=False):
            raise RuntimeError("a pycromanager Python-backend session is already open in this process; close it first")
        try:
            existing = getattr(Engine, "singleton", None)
            if existing is not None:
                raise RuntimeError(
                    "pycromanager's acquisition engine is already running on another core "
                    f"({getattr(existing, 'core', None)!r}); stop it (or close its session) first"
                )
            self.core = PycromanagerCore(core)
            self._registry = _PYMMCORES
            self._registry.insert(0, self.core)  # pycromanager's Core() and Acquisition() take [0]
            self._added_set_tags = not hasattr(AcquisitionEvent, "setTags")
            if self._added_set_tags:
                AcquisitionEvent.setTags = AcquisitionEvent.set_tags  # pycromanager 1.0.2 defect, see module doc
            self._event_cls = AcquisitionEvent
            self._engine_cls = Engine
            self.engine = Engine(self.core)
            self.closed = False
            # if the session is never closed, close it at exit: before mmpycorex's own exit hook (registered
            # earlier, so run later) unloads the core's devices with MMCore callbacks still live, which
            # aborted the process ("FATAL: exception not rethrown") in trials
            ref = weakref.ref(self)
            atexit.register(_close_at_exit, ref)
        except BaseException:
            _SESSION_LOCK.release()
            raise

    # ---- acquisitions
    def acquisition(self, **kwargs: Any) -> Any:
        """A pycromanager Python-backend ``Acquisition`` on this core (same arguments as pycromanager's).

        ``notification_callback_fn`` is wrapped so that an exception in it aborts the acquisition
        (and is raised by ``await_completion`` / the ``with`` block) instead of hanging it.
        """
        if self.closed:
            raise RuntimeError("this pycromanager session is closed")
        from pycromanager.acquisition.python_backend_acquisitions import PythonBackendAcquisition

        holder: dict[str, Any] = {}
        user_fn = kwargs.get("notification_callback_fn")
        if user_fn is not None:
            kwargs["notification_callback_fn"] = _guarded(user_fn, holder)
        check = _position_check(self.core.wrapped)

        class CheckedAcquisition(PythonBackendAcquisition):
            """Refuses events whose x/y lie past the stage travel (pycromanager would only print them)."""

            def acquire(self, event_or_events: Any) -> Any:
                if check is not None:
                    events = [event_or_events] if isinstance(event_or_events, dict) else event_or_events
                    if isinstance(events, list):
                        for ev in events:
                            if isinstance(ev, dict) and ev.get("x") is not None and ev.get("y") is not None:
                                check(float(ev["x"]), float(ev["y"]))
                return super().acquire(event_or_events)

        acq = CheckedAcquisition(**kwargs)
        holder["acq"] = acq
        return acq

    # ---- teardown
    def close(self, timeout_s: float = 10.0) -> None:
        """Stop the engine's threads, deregister the core and undo the ``setTags`` alias. Idempotent."""
        if self.closed:
            return
        self.closed = True
        try:
            for ex in (self.engine.acq_executor, self.engine.event_generator_executor):
                ex.shutdown(wait=False, cancel_futures=True)
            t_end = time.perf_counter() + timeout_s
            for ex in (self.engine.acq_executor, self.engine.event_generator_executor):
                for th in list(getattr(ex, "_threads", ())):
                    th.join(max(0.0, t_end - time.perf_counter()))
                    if th.is_alive():
                        log.warning("pycromanager engine thread %s did not stop within %.0f s", th.name, timeout_s)
            if getattr(self._engine_cls, "singleton", None) is self.engine:
                del self._engine_cls.singleton
            while self.core in self._registry:
                self._registry.remove(self.core)
            if self._added_set_tags and getattr(self._event_cls, "setTags", None) is not None:
                del self._event_cls.setTags
        finally:
            _SESSION_LOCK.release()

    def __enter__(self) -> PycromanagerSession:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:  # pragma: no cover - best effort if a user forgot close()
        if not getattr(self, "closed", True):
            with suppress(Exception):
                self.close(timeout_s=1.0)


def _close_at_exit(ref: weakref.ref[PycromanagerSession]) -> None:
    session = ref()
    if session is not None and not session.closed:
        with suppress(Exception):
            session.close(timeout_s=2.0)


def _position_check(core: Any) -> Callable[[float, float], None] | None:
    """The XY stage's ``check_target`` when the core's stage has one (the virtual stage does)."""
    try:
        label = core.getXYStageDevice()
        dev = core._pydevices[label] if label and label in core._pydevices else None
    except Exception:
        return None
    fn = getattr(dev, "check_target", None)
    return fn if callable(fn) else None


def _guarded(fn: Callable[[Any], Any], holder: dict[str, Any]) -> Callable[[Any], None]:
    failed: list[BaseException] = []

    def callback(notification: Any) -> None:
        try:
            fn(notification)
        except Exception as exc:
            if failed:  # already aborting: say it once
                log.debug("notification_callback_fn raised again: %s", exc)
                return
            log.exception("notification_callback_fn raised; aborting the acquisition")
            failed.append(exc)
            acq = holder.get("acq")
            if acq is not None:
                acq.abort(exc)
                # abort() empties the event queue, and with it the end-of-events marker if the caller had
                # already finished: the event thread would then wait forever. Put the marker back.
                acq.mark_finished()

    return callback


def pycromanager_python_backend(core: Any) -> PycromanagerSession:
    """Open pycromanager's Python backend on ``core`` (any ``CMMCorePlus``); use it as a context manager.

    Inside, ``pycromanager.Acquisition(...)`` and :meth:`PycromanagerSession.acquisition` run on ``core``.
    Only one session may be open per process (pycromanager's engine is a singleton).
    """
    return PycromanagerSession(core)
