"""Failures with real processes: kill -9 of a worker or the sink, hung and poisoned analyzers, draining shutdown."""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

import pytest
from pipeline_support import PASSTHROUGH, fast_config, make_tile, wait_stored

from scope_stream.store import SlideStore
from scope_stream.transport import LocalPipeline

pytestmark = [
    pytest.mark.timeout(120),
    pytest.mark.skipif(sys.platform == "win32", reason="kill -9 / SIGTERM drills are POSIX"),
]


def held_by(pipe: LocalPipeline, name: str) -> int:
    return next((w["held"] for w in pipe.stats()["workers"] if w["name"] == name), 0)


def wait_until(cond, timeout: float = 20.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.02)


def assert_exactly_once(store_path: Path, n: int) -> SlideStore:
    store = SlideStore.open(store_path)
    ids = store.tile_ids()
    assert len(ids) == len(set(ids)) == n, f"{len(ids)} rows, {len(set(ids))} distinct, {n} expected"
    assert set(ids) == {f"t{i}" for i in range(n)}
    return store


def test_kill_9_worker_mid_stream_every_tile_once(tmp_path: Path) -> None:
    cfg = fast_config(tmp_path, n_workers=3, stage_options={"delay_ms": 40}, batch_max_tiles=2, batch_wait_ms=5)
    n = 60
    with LocalPipeline(cfg, analyzer_spec=PASSTHROUGH) as p:
        src = p.source()
        for i in range(n):
            src.send(make_tile(i, "k9"))
            if i == 20:
                wait_until(lambda: held_by(p, "worker-0") > 0)
                p.kill_worker(0)  # SIGKILL while it holds tiles
        summary = src.finish("k9", timeout=60)
        src.close()
        stats = p.stats()
    assert summary["n_tiles"] == n
    assert stats["counts"]["workers_lost"] == 1 and stats["redispatched"] >= 1
    assert_exactly_once(cfg.store.root / "k9.zarr", n)


def test_sink_killed_and_restarted_mid_scan_resumes(tmp_path: Path) -> None:
    cfg = fast_config(tmp_path, n_workers=2, stage_options={"delay_ms": 5})
    n = 40
    with LocalPipeline(cfg, analyzer_spec=PASSTHROUGH, sink_delay_ms=15) as p:
        src = p.source()
        for i in range(20):
            src.send(make_tile(i, "rs"))
        wait_stored(p, 8)
        p.kill_sink()  # SIGKILL, possibly mid-commit
        for i in range(20, n):  # the scan goes on; results wait in the broker
            src.send(make_tile(i, "rs"))
        src.flush()
        p.start_sink()  # resumes from the store
        summary = src.finish("rs", timeout=60)
        src.close()
        stats = p.stats()
    assert summary["n_tiles"] == n
    assert stats["counts"]["sinks_joined"] == 2
    assert_exactly_once(cfg.store.root / "rs.zarr", n)


def test_hung_worker_tiles_are_dispatched_again(tmp_path: Path) -> None:
    cfg = fast_config(tmp_path, n_workers=0, task_timeout_ms=1500, batch_max_tiles=1)
    n = 8
    with LocalPipeline(cfg, analyzer_spec=PASSTHROUGH) as p:
        p.start_worker(name="hung", stage_options={"hang_tile_ids": ["t2"]})
        p.wait_ready(n_workers=1)
        src = p.source()
        for i in range(n):
            src.send(make_tile(i, "hang"))
        wait_until(lambda: held_by(p, "hung") > 0 and p.stats()["stored"] >= 2)
        p.start_worker(name="ok")
        summary = src.finish("hang", timeout=60)
        src.close()
        stats = p.stats()
        assert next(w for w in stats["workers"] if w["name"] == "hung")  # alive (heartbeating) but stuck
        p.kill_worker(0)
    assert summary["n_tiles"] == n and stats["counts"]["task_timeouts"] >= 1
    assert_exactly_once(cfg.store.root / "hang.zarr", n)


def test_poison_tile_is_stored_as_failed_after_max_attempts(tmp_path: Path) -> None:
    cfg = fast_config(tmp_path, n_workers=3, max_attempts=2, stage_options={"crash_tile_ids": ["t4"]})
    n = 10
    with LocalPipeline(cfg, analyzer_spec=PASSTHROUGH) as p:
        with p.source() as src:
            for i in range(n):
                src.send(make_tile(i, "poison"))
            summary = src.finish("poison", timeout=60)
        stats = p.stats()
    assert stats["counts"]["workers_lost"] == 2 and stats["failed"] == 1
    assert summary["n_tiles"] == n and summary["n_failed_tiles"] == 1
    store = assert_exactly_once(cfg.store.root / "poison.zarr", n)
    row = next(r for r in store.tile_positions() if r["tile_id"] == "t4")
    assert row["status"] == "failed"
    assert "died" in store.tile_rows()["error"][store.tile_ids().index("t4")]


def test_failing_analyzer_tile_is_retried_then_stored_failed(tmp_path: Path) -> None:
    cfg = fast_config(tmp_path, n_workers=1, max_attempts=2, stage_options={"fail_tile_ids": ["t1"]})
    with LocalPipeline(cfg, analyzer_spec=PASSTHROUGH) as p:
        with p.source() as src:
            for i in range(4):
                src.send(make_tile(i, "fail"))
            summary = src.finish("fail", timeout=60)
        stats = p.stats()
    assert summary["n_failed_tiles"] == 1 and stats["counts"]["analysis_errors"] == 2
    store = assert_exactly_once(cfg.store.root / "fail.zarr", 4)
    assert "fail_tile_ids" in store.tile_rows()["error"][store.tile_ids().index("t1")]


def test_sigterm_worker_drains_its_tiles_and_stop_drains_the_pipeline(tmp_path: Path) -> None:
    cfg = fast_config(tmp_path, n_workers=2, stage_options={"delay_ms": 300}, batch_max_tiles=1)
    n = 24  # 3.6 s of work for two workers: worker-0 surely holds tiles when it is told to stop
    p = LocalPipeline(cfg, analyzer_spec=PASSTHROUGH).start()
    try:
        # both workers must be registered before the tiles go out: on a loaded machine a worker can take
        # seconds to start, and a lone early worker would take every tile
        wait_until(lambda: len(p.stats()["workers"]) == 2, timeout=60.0)
        src = p.source()
        for i in range(n):
            src.send(make_tile(i, "drain"))
        src.flush()
        wait_until(lambda: held_by(p, "worker-0") > 0)
        pid = p.workers[0].pid
        assert pid is not None
        os.kill(pid, signal.SIGTERM)  # drain: finish held tiles, say bye, exit 0
        p.workers[0].join(timeout=30)
        assert p.workers[0].exitcode == 0
        stats = p.stats()
        assert stats["counts"].get("workers_left") == 1 and not stats["counts"].get("workers_lost")
        assert stats["redispatched"] == 0
        src.close()
    finally:
        p.stop(drain=True)  # in-flight work is finished before the processes exit
    assert all(proc.exitcode == 0 for proc in p.workers)
    assert_exactly_once(cfg.store.root / "drain.zarr", n)
