"""``scope-stream sink``: the sink on its own, joined to a running broker (real sockets, a real process).

A broker and a passthrough worker run in this process (threads); the sink is the command, started as a
child process. It connects, stores the tiles of a slide through to ``finish``, and a SIGTERM or Ctrl-C
(SIGINT) stops it within a few seconds, after which the broker no longer counts a sink.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pipeline_support import PASSTHROUGH, fast_config, make_tile
from typer.testing import CliRunner

from scope_stream.cli import app
from scope_stream.store import SlideStore
from scope_stream.transport import TileSource
from scope_stream.transport.broker import Broker
from scope_stream.transport.pipeline import ControlClient
from scope_stream.transport.protocol import Endpoints
from scope_stream.transport.worker import run_worker

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def broker_and_worker(tmp_path: Path) -> Iterator[tuple[Endpoints, Path]]:
    """A broker (no sink) and one passthrough worker, in threads; yields the endpoints and a sink config file."""
    cfg = fast_config(tmp_path, n_workers=1)
    broker = Broker(cfg.pipeline)
    eps = broker.bind()
    b_thread = threading.Thread(target=broker.run, name="test-broker", daemon=True)
    b_thread.start()
    w_stop = threading.Event()
    w_thread = threading.Thread(
        target=run_worker,
        args=(eps.backend, cfg),
        kwargs={"analyzer_spec": PASSTHROUGH, "stop": w_stop, "handle_signals": False, "name": "w0"},
        name="test-worker",
        daemon=True,
    )
    w_thread.start()
    cfg_file = tmp_path / "sink.yaml"
    cfg_file.write_text(
        "pipeline:\n  heartbeat_ms: 100\n  worker_timeout_ms: 1000\n"
        f"store:\n  root: {cfg.store.root}\n"
        f"scan: {{x0_um: 0.0, y0_um: 0.0, x1_um: 320.0, y1_um: 320.0}}\n"
    )
    try:
        yield eps, cfg_file
    finally:
        broker.request_stop(drain=False)
        w_stop.set()
        b_thread.join(15)
        w_thread.join(15)
        assert not b_thread.is_alive(), "the broker did not stop"


def _wait_for_sink(ctl: ControlClient, present: bool, timeout: float = 30.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        stats = ctl.stats()
        if (stats["sink"] is not None) == present or time.monotonic() > deadline:
            return stats
        time.sleep(0.05)


@pytest.mark.skipif(sys.platform == "win32", reason="signals to a child process are POSIX")
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["sigterm", "ctrl-c"])
def test_sink_command_stores_a_slide_and_stops_on_a_signal(
    broker_and_worker: tuple[Endpoints, Path], tmp_path: Path, sig: int
) -> None:
    eps, cfg_file = broker_and_worker
    exe = Path(sys.executable).parent / "scope-stream"
    proc = subprocess.Popen(
        [str(exe), "sink", "--connect", eps.sink, "-c", str(cfg_file)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    ctl = ControlClient(eps.control)
    try:
        stats = _wait_for_sink(ctl, present=True, timeout=60)
        assert stats["sink"] is not None, "the sink command did not connect to the broker"
        assert stats["sink"]["pid"] == proc.pid
        with TileSource(eps.frontend) as src:
            src.start_scan("cmd", {"operator": "test"})
            for i in range(6):
                src.send(make_tile(i, "cmd"))
            summary = src.finish("cmd", timeout=60)
        assert summary.get("n_tiles") == 6, summary
        store = SlideStore.open(tmp_path / "scans" / "cmd.zarr")
        assert len(store) == 6 and store.status == "done"

        t0 = time.monotonic()
        proc.send_signal(sig)
        err = proc.communicate(timeout=10)[1]
        took = time.monotonic() - t0
        assert proc.returncode == 0, err
        assert took < 5.0, f"the sink took {took:.1f} s to stop"
        assert "sink: stopped" in err
        assert _wait_for_sink(ctl, present=False, timeout=10)["sink"] is None, "the broker still counts the sink"
    finally:
        ctl.close()
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


def test_sink_command_refuses_a_remote_broker_without_keys() -> None:
    res = CliRunner().invoke(app, ["sink", "--connect", "tcp://10.1.2.3:5557"])
    assert res.exit_code == 2 and "--keys" in res.output


def test_sink_command_is_listed() -> None:
    res = CliRunner().invoke(app, ["sink", "--help"])
    assert res.exit_code == 0 and "--connect" in res.output and "sink endpoint" in res.output
