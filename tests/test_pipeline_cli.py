"""``scope-stream run`` / ``worker`` / ``keys`` from the shell: SIGINT drains a running pipeline."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from pipeline_support import make_tile
from typer.testing import CliRunner

from scope_stream.cli import app
from scope_stream.store import SlideStore
from scope_stream.transport import TileSource

pytestmark = pytest.mark.timeout(120)
runner = CliRunner()


def test_keys_commands(tmp_path: Path) -> None:
    res = runner.invoke(app, ["keys", "generate", str(tmp_path / "k")])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "k" / "server.key_secret").exists()
    res = runner.invoke(app, ["keys", "add-client", str(tmp_path / "k"), "scanner2"])
    assert res.exit_code == 0 and (tmp_path / "k" / "authorized" / "scanner2.key").exists()
    res = runner.invoke(app, ["keys", "generate", str(tmp_path / "k")])
    assert res.exit_code != 0 and "already holds keys" in res.output


def test_worker_refuses_a_remote_broker_without_keys() -> None:
    res = runner.invoke(app, ["worker", "--connect", "tcp://10.1.2.3:5556"])
    assert res.exit_code == 2 and "--keys" in res.output


def test_run_refuses_to_bind_beyond_loopback_without_keys() -> None:
    res = runner.invoke(app, ["run", "--host", "0.0.0.0"])
    assert res.exit_code == 2 and "CurveZMQ" in res.output


@pytest.mark.skipif(sys.platform == "win32", reason="SIGINT to a child process is POSIX")
def test_run_serves_until_sigint_then_drains(tmp_path: Path) -> None:
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(
        "pipeline:\n  device: cpu\n  heartbeat_ms: 100\n  worker_timeout_ms: 1000\n"
        "  stage_options: {delay_ms: 20}\n"
        f"store:\n  root: {tmp_path / 'scans'}\n"
    )
    exe = Path(sys.executable).parent / "scope-stream"
    proc = subprocess.Popen(
        [str(exe), "run", "-c", str(cfg), "--workers", "2", "--analyzer", "scope_stream.transport.stages:passthrough"],
        stderr=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        text=True,
        env={**os.environ, "COLUMNS": "200"},
    )
    try:
        frontend = None
        lines = []
        deadline = time.monotonic() + 60
        assert proc.stderr is not None
        while frontend is None and time.monotonic() < deadline:
            line = proc.stderr.readline()
            lines.append(line)
            if m := re.search(r"frontend\s+(tcp://\S+)", line):
                frontend = m.group(1)
            if not line and proc.poll() is not None:
                break
        assert frontend, "".join(lines)
        with TileSource(frontend) as src:
            for i in range(12):
                src.send(make_tile(i, "cli"))
            src.flush()
        proc.send_signal(signal.SIGINT)  # in-flight tiles are finished, slides finalised, then it exits
        out = proc.communicate(timeout=60)[1]
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, out
    store = SlideStore.open(tmp_path / "scans" / "cli.zarr")
    assert len(store) == 12 and store.status == "done"


def test_a_pipeline_whose_workers_cannot_start_leaves_no_process(tmp_path: Path) -> None:
    import multiprocessing as mp

    from scope_stream.config import ScopeStreamConfig
    from scope_stream.transport import LocalPipeline
    from scope_stream.transport.pipeline import PipelineError

    cfg = ScopeStreamConfig.model_validate({"pipeline": {"n_workers": 1}})
    pipe = LocalPipeline(
        cfg, tmp_path / "s.zarr", analyzer_spec="scope_stream.no_such_module:factory", start_timeout=30
    )
    with pytest.raises(PipelineError):
        pipe.start()
    procs = [pipe.broker_proc, pipe.sink_proc, *pipe.workers]
    assert all(p is None or not p.is_alive() for p in procs)
    assert not [c for c in mp.active_children() if c.name.startswith("scope-stream")]


def test_pipeline_on_calls_python_callbacks(tmp_path: Path) -> None:
    import threading

    from scope_stream.config import ScopeStreamConfig
    from scope_stream.transport import LocalPipeline

    cfg = ScopeStreamConfig.model_validate({"slide_id": "cb", "pipeline": {"n_workers": 1}})
    seen: list[str] = []
    done = threading.Event()
    with LocalPipeline(cfg, tmp_path / "cb.zarr", analyzer_spec="scope_stream.transport.stages:passthrough") as pipe:

        @pipe.on("tile.done")
        def _tile(event: dict) -> None:
            seen.append(event["tile_id"])

        pipe.on("slide.done", lambda event: done.set())
        src = pipe.source()
        for i in range(3):
            src.send(make_tile(i, "cb"))
        src.flush()
        pipe.drain(timeout=60)
        assert done.wait(10), "slide.done was not delivered to the callback"
        src.close()
    assert sorted(seen) == sorted(make_tile(i, "cb").tile_id for i in range(3))
