"""The widget's *start demo*: a local pipeline scanning the virtual microscope, started off the GUI thread.

Starting a pipeline spawns processes and loading a model takes seconds, so :class:`DemoRunner`
does it on a thread of its own and reports back through callbacks (the widget wraps them with
superqt's ``ensure_main_thread``). The scan session keeps its control endpoint open for
``hold_open_s`` after the survey, so the operator can re-image and review; :meth:`DemoRunner.stop`
ends everything.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

__all__ = ["DemoRunner", "demo_config"]

log = logging.getLogger(__name__)

_REPO_DEMO = Path(__file__).resolve().parent.parent / "configs" / "demo.yaml"


def demo_config(path: str | Path | None = None) -> Any:
    """The demo configuration: ``path``, ``$SCOPE_STREAM_DEMO_CONFIG``, the repository's ``configs/demo.yaml``,
    or the defaults (a virtual-microscope scan)."""
    from scope_stream.config import load_scope_config

    for cand in (path, os.environ.get("SCOPE_STREAM_DEMO_CONFIG"), _REPO_DEMO):
        if cand and Path(cand).is_file():
            return load_scope_config(cand)
    return load_scope_config(None)


class DemoRunner:
    """A LocalPipeline + ScanSession (virtual backend) run for the widget.

    Parameters
    ----------
    config:
        a ``ScopeStreamConfig`` (default: :func:`demo_config`); its scan backend is forced to ``virtual``.
    analyzer_spec:
        the workers' analyzer (default: the configuration's, i.e. segmentation + the diffusion classifier).
    hold_open_s:
        how long the microscope keeps taking re-image requests after the survey.
    store_root:
        where the slide store is written (default: the configuration's ``store.root``).
    """

    def __init__(
        self,
        config: Any = None,
        *,
        analyzer_spec: str | None = None,
        hold_open_s: float = 900.0,
        store_root: str | Path | None = None,
    ) -> None:
        self.config = config
        self.analyzer_spec = analyzer_spec or os.environ.get("SCOPE_STREAM_DEMO_ANALYZER") or None
        self.hold_open_s = hold_open_s
        self.store_root = store_root
        self.pipeline: Any = None
        self.session: Any = None
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()

    def start(self, on_ready: Callable[[dict[str, Any]], object], on_error: Callable[[str], object]) -> None:
        """Start in the background; ``on_ready({"events", "control", "store", "slide_id"})`` or ``on_error(msg)``."""
        self._thread = threading.Thread(
            target=self._run, args=(on_ready, on_error), name="scope-stream-demo", daemon=True
        )
        self._thread.start()

    def _run(self, on_ready: Callable[[dict[str, Any]], object], on_error: Callable[[str], object]) -> None:
        from scope_stream.acquire.scan import PymmcorePlusBackend, ScanSession
        from scope_stream.transport import LocalPipeline

        try:
            cfg = self.config if self.config is not None else demo_config()
            cfg = cfg.model_copy(deep=True)
            cfg.scan.backend = "virtual"
            cfg.scan.control = True
            cfg.scan.hold_open_s = max(cfg.scan.hold_open_s, self.hold_open_s)
            if self.store_root is not None:
                cfg.store.root = Path(self.store_root)
            store = Path(cfg.store.root) / f"{cfg.slide_id}.zarr"
            self.pipeline = LocalPipeline(cfg, store_path=store, analyzer_spec=self.analyzer_spec).start()
            if self._stopping.is_set():
                raise RuntimeError("stopped")
            backend = PymmcorePlusBackend.virtual(cfg)
            self.session = ScanSession(
                cfg, backend, self.pipeline.endpoints.frontend, events_endpoint=self.pipeline.events_endpoint
            )
            info = {
                "events": self.pipeline.events_endpoint,
                "control": None,
                "store": str(store),
                "slide_id": self.session.slide_id,
            }
            self.session.start()
            info["control"] = self.session.control_endpoint
        except Exception as exc:
            log.exception("the demo could not start")
            self.stop()
            if not self._stopping.is_set():
                on_error(f"the demo could not start: {type(exc).__name__}: {exc}")
            return
        on_ready(info)

    def stop(self, timeout: float = 60.0) -> None:
        """Cancel the scan and stop the pipeline (safe to call twice, from any thread)."""
        self._stopping.set()
        session, self.session = self.session, None
        if session is not None:
            try:
                session.cancel()
                session.wait(timeout)
            except Exception as exc:
                log.info("demo scan ended with: %s", exc)
        pipeline, self.pipeline = self.pipeline, None
        if pipeline is not None:
            pipeline.stop(drain=False, timeout=timeout)
