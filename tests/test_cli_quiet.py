"""The CLI is quiet unless asked (-v), prints where a scan's store is, shows flags as flags in --help, and
leaves no signal handlers behind when a command runs in-process."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from scope_stream.cli import app

REPO = Path(__file__).resolve().parent.parent
runner = CliRunner()


def _cli_handler() -> logging.Handler:
    handlers = [h for h in logging.getLogger().handlers if getattr(h, "_scope_stream_cli", False)]
    assert len(handlers) == 1, logging.getLogger().handlers
    return handlers[0]


def _passes(handler: logging.Handler, name: str, level: int) -> bool:
    record = logging.LogRecord(name, level, __file__, 1, "key=%s", ("x",), None)
    return bool(handler.filter(record))


def _invoke(*args: str) -> None:
    res = runner.invoke(app, [*args, "config", "check", str(REPO / "configs" / "demo.yaml")])
    assert res.exit_code == 0, res.output


def test_libraries_stay_at_warning_without_v() -> None:
    _invoke()
    logging.getLogger().setLevel(logging.DEBUG)  # what importing pymmcore-plus does
    h = _cli_handler()
    for lib in ("zarr.group", "numcodecs", "asyncio", "napari", "pymmcore-plus"):
        assert not _passes(h, lib, logging.DEBUG) and not _passes(h, lib, logging.INFO)
        assert _passes(h, lib, logging.WARNING)
    assert not _passes(h, "scope_stream.store", logging.INFO)
    assert _passes(h, "scope_stream.store", logging.WARNING)
    from scope_stream.cli.app import child_log_level

    assert child_log_level() == logging.WARNING  # pipeline processes: not the root logger's DEBUG


def test_v_turns_up_scope_stream_only() -> None:
    _invoke("-v")
    h = _cli_handler()
    assert _passes(h, "scope_stream.transport.broker", logging.INFO)
    assert not _passes(h, "scope_stream.transport.broker", logging.DEBUG)
    assert not _passes(h, "zarr.group", logging.INFO) and not _passes(h, "zarr.group", logging.DEBUG)
    from scope_stream.cli.app import child_log_level

    assert child_log_level() == logging.INFO


def test_vv_adds_library_info_and_vvv_library_debug() -> None:
    _invoke("-vv")
    h = _cli_handler()
    assert _passes(h, "scope_stream.x", logging.DEBUG)
    assert _passes(h, "zarr.group", logging.INFO) and not _passes(h, "zarr.group", logging.DEBUG)
    _invoke("-vvv")
    assert _passes(_cli_handler(), "zarr.group", logging.DEBUG)  # one handler: the earlier one was replaced


def test_help_shows_no_bool_metavar_on_flags() -> None:
    res = runner.invoke(app, ["scan", "--help"], env={"COLUMNS": "200"})
    assert res.exit_code == 0
    assert "--no-adaptive" in res.output and "--json" in res.output
    assert "<bool>" not in res.output
    assert "<path>" in res.output  # options that take a value keep their type


# ------------------------------------------------------------------ signal handlers
@pytest.fixture
def handlers() -> Iterator[dict[int, Any]]:
    assert threading.current_thread() is threading.main_thread()
    saved = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    yield saved
    for s, h in saved.items():
        signal.signal(s, h)


def _unchanged(saved: dict[int, Any]) -> None:
    for s, h in saved.items():
        assert signal.getsignal(s) is h, f"{signal.Signals(s).name} handler left installed: {signal.getsignal(s)}"


def test_run_that_fails_to_start_leaves_no_signal_handlers(
    monkeypatch: pytest.MonkeyPatch, handlers: dict[int, Any]
) -> None:
    import scope_stream.transport.pipeline as tp

    class FailingPipeline:
        def __init__(self, *a: Any, **k: Any) -> None:
            pass

        def start(self) -> None:
            raise tp.PipelineError("no broker today")

    monkeypatch.setattr(tp, "LocalPipeline", FailingPipeline)
    res = runner.invoke(app, ["run"])
    assert res.exit_code == 2 and "no broker today" in res.output
    _unchanged(handlers)


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
def test_run_stopped_by_sigint_in_process_leaves_no_signal_handlers(
    monkeypatch: pytest.MonkeyPatch, handlers: dict[int, Any]
) -> None:
    import scope_stream.transport.pipeline as tp

    calls: list[str] = []

    class Endpoints:
        def to_dict(self) -> dict[str, str]:
            return {"frontend": "tcp://127.0.0.1:1"}

    class ServingPipeline:
        endpoints = Endpoints()

        def __init__(self, *a: Any, **k: Any) -> None:
            pass

        def start(self) -> None:
            calls.append("start")

        def restart_dead_workers(self) -> None:
            if "sigint" not in calls:
                calls.append("sigint")
                os.kill(os.getpid(), signal.SIGINT)  # as Ctrl-C: `run` drains and returns

        def stats(self) -> dict[str, Any]:
            keys = ("queue_depth", "in_flight", "stored", "rejected_total", "rate_tiles_per_s")
            return {"workers": [], **dict.fromkeys(keys, 0)}

        def drain(self, timeout: float) -> dict[str, Any]:
            calls.append("drain")
            return {}

        def stop(self, drain: bool = True) -> None:
            calls.append("stop")

    monkeypatch.setattr(tp, "LocalPipeline", ServingPipeline)
    res = runner.invoke(app, ["run"])
    assert res.exit_code == 0, res.output
    assert calls == ["start", "sigint", "drain", "stop"]
    _unchanged(handlers)


def test_worker_leaves_no_signal_handlers(monkeypatch: pytest.MonkeyPatch, handlers: dict[int, Any]) -> None:
    import scope_stream.transport.worker as tw

    def fake_run_worker(*a: Any, **k: Any) -> int:
        tw._install_signals(threading.Event())  # what the real one does before serving
        return 0

    monkeypatch.setattr(tw, "run_worker", fake_run_worker)
    res = runner.invoke(app, ["worker", "--connect", "tcp://127.0.0.1:5556"])
    assert res.exit_code == 0, res.output
    _unchanged(handlers)


# ------------------------------------------------------------------ a real scan from the shell
@pytest.mark.slow
@pytest.mark.timeout(240)
def test_scan_is_quiet_and_ends_with_the_store_path(tmp_path: Path) -> None:
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(
        "slide_id: tiny\n"
        "microscope: {camera_width: 128, camera_height: 128, realtime: false}\n"
        "scan: {x0_um: 0, y0_um: 0, x1_um: 100, y1_um: 100, adaptive: false}\n"
        "pipeline: {n_workers: 1, device: cpu}\n"
        f"store: {{root: {tmp_path / 'scans'}}}\n"
    )
    exe = Path(sys.executable).parent / "scope-stream"
    proc = subprocess.run(
        [str(exe), "scan", "-c", str(cfg), "--analyzer", "scope_stream.transport.stages:threshold"],
        capture_output=True,
        text=True,
        timeout=200,
        env={**os.environ, "COLUMNS": "200", "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == f"store: {tmp_path / 'scans' / 'tiny.zarr'}"
    assert (tmp_path / "scans" / "tiny.zarr").is_dir()
    noisy = [line for line in proc.stderr.splitlines() if "zarr" in line or "DEBUG" in line or "numcodecs" in line]
    assert not noisy, "\n".join(noisy[:20])
    assert len(proc.stderr.splitlines()) < 10, proc.stderr
