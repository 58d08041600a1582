"""The broker's per-tile records are bounded (issue #21): a finished slide's records go, and there is a cap.

End to end with real sockets (broker, a passthrough worker and the sink as threads of this process), then the
bookkeeping alone on a broker object.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from pipeline_support import PASSTHROUGH, fast_config, make_tile

from scope_stream.config import PipelineConfig
from scope_stream.store import SlideStore
from scope_stream.transport import TileSource
from scope_stream.transport.broker import DONE_RECORDS_MAX, FINISHED_SLIDES_MAX, Broker
from scope_stream.transport.sink import run_sink
from scope_stream.transport.worker import run_worker

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def running(tmp_path: Path) -> Iterator[Broker]:
    """A broker with one passthrough worker and the sink, all threads of this process."""
    cfg = fast_config(tmp_path, n_workers=1)
    broker = Broker(cfg.pipeline)
    eps = broker.bind()
    stop = threading.Event()
    threads = [
        threading.Thread(target=broker.run, name="test-broker", daemon=True),
        threading.Thread(
            target=run_worker,
            args=(eps.backend, cfg),
            kwargs={"analyzer_spec": PASSTHROUGH, "stop": stop, "handle_signals": False, "name": "w0"},
            daemon=True,
        ),
        threading.Thread(target=run_sink, args=(eps.sink, cfg), kwargs={"stop": stop}, daemon=True),
    ]
    for t in threads:
        t.start()
    try:
        yield broker
    finally:
        broker.request_stop(drain=False)
        stop.set()
        for t in threads:
            t.join(15)
        assert not threads[0].is_alive(), "the broker did not stop"


def _send(broker: Broker, slide: str, ids: range) -> None:
    assert broker.endpoints is not None
    with TileSource(broker.endpoints.frontend) as src:
        for i in ids:
            src.send(make_tile(i, slide))
        src.flush(30)


def _wait(cond: Callable[[], bool], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "not in time"
        time.sleep(0.02)


def test_a_finished_slide_leaves_no_per_tile_records(running: Broker, tmp_path: Path) -> None:
    broker = running
    assert broker.endpoints is not None
    _send(broker, "open", range(4))
    _send(broker, "closing", range(10, 16))
    _wait(lambda: broker.counts["stored"] == 10)
    assert set(broker.done["closing"]) == {f"t{i}" for i in range(10, 16)}
    assert broker.done_records == 10

    # a resend of a stored tile is still recognised (its record is there): answered duplicate, not stored again
    _send(broker, "closing", range(10, 11))
    assert broker.counts["duplicates_in"] == 1

    with TileSource(broker.endpoints.frontend) as src:
        summary = src.finish("closing", timeout=30)
    assert summary["n_tiles"] == 6
    _wait(lambda: "closing" not in broker.done)
    assert "closing" not in broker.scans and broker.done_records == 4
    assert set(broker.done["open"]) == {f"t{i}" for i in range(4)}  # an unfinished slide keeps its records
    assert not broker.jobs and not broker.finish_waiters and not broker.finish_summary and not broker.finalize_sent
    with TileSource(broker.endpoints.frontend) as src:
        stats = src.stats()
    assert stats["slides"]["closing"] == {"pending": 0, "finished": True}
    assert stats["done_records"] == 4

    with TileSource(broker.endpoints.frontend) as src:
        src.finish("open", timeout=30)
    _wait(lambda: not broker.done)
    assert broker.done_records == 0
    assert len(SlideStore.open(tmp_path / "scans" / "closing.zarr")) == 6
    assert len(SlideStore.open(tmp_path / "scans" / "open.zarr")) == 4


def test_records_of_a_slide_never_finished_stay_within_the_cap(running: Broker, tmp_path: Path) -> None:
    broker = running
    broker.done_records_max = 5  # set before any tile: the loop reads it at each stored tile
    _send(broker, "endless", range(8))
    _wait(lambda: broker.counts["stored"] == 8)
    _wait(lambda: broker.done_records == 5)
    assert len(broker.done["endless"]) == 5 and broker.counts["done_records_evicted"] == 3
    assert len(SlideStore.open(tmp_path / "scans" / "endless.zarr")) == 8  # nothing lost, only forgotten


# ---------------------------------------------------------------------------- the bookkeeping alone
@pytest.fixture
def broker() -> Iterator[Broker]:
    b = Broker(PipelineConfig())
    try:
        yield b
    finally:
        b.close()


def test_defaults_are_bounded(broker: Broker) -> None:
    assert broker.done_records_max == DONE_RECORDS_MAX <= 1_000_000
    assert broker.finished_slides_max == FINISHED_SLIDES_MAX <= 10_000


def test_the_cap_forgets_the_oldest_records_first(broker: Broker) -> None:
    broker.done_records_max = 4
    for slide, n in (("a", 3), ("b", 3)):
        for i in range(n):
            broker._mark_done((slide, f"t{i}"))
    assert broker.done_records == 4
    assert "a" in broker.done and list(broker.done["a"]) == ["t2"]
    assert list(broker.done["b"]) == ["t0", "t1", "t2"]
    broker._mark_done(("b", "t3"))
    assert "a" not in broker.done and broker.done_records == 4
    broker._mark_done(("b", "t3"))  # again: no double count
    assert broker.done_records == 4
    assert broker._is_done(("b", "t3")) and not broker._is_done(("a", "t0"))


def test_finished_slides_are_remembered_up_to_a_limit(broker: Broker) -> None:
    broker.finished_slides_max = 2
    for k in range(4):
        slide = f"s{k}"
        broker.pending[slide] += 1
        broker.pending[slide] -= 1
        broker.scans[slide] = {"operator": "x"}
        broker._mark_done((slide, "t0"))
        broker.finished[slide] = {"n_tiles": 1}
        broker._answer_finish(slide, broker.finished[slide])
    assert list(broker.finished) == ["s2", "s3"]
    assert set(broker.pending) == {"s2", "s3"}
    assert not broker.done and not broker.scans and broker.done_records == 0
    assert set(broker.stats()["slides"]) == {"s2", "s3"}
