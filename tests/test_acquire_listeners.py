"""Listeners on the real MMCore (virtual microscope): pymmcore-plus, pycromanager (Python backend, Java-backend
metadata, image_saved_fn), the datastore follower, and replay folders."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import useq

from scope_stream.acquire.listen import (
    DatasetFeed,
    DatastoreFollower,
    PycromanagerListener,
    PymmcorePlusListener,
    ReplayError,
    ReplaySource,
    ThreadedSink,
    default_namer,
    stream_to_scope_stream,
    tile_from_pycromanager,
    write_replay_folder,
)
from scope_stream.acquire.virtual import build_virtual_core, close_core
from scope_stream.config.microscope import MicroscopeConfig
from scope_stream.vocabulary import Tile

CAM = 96


class Collect:
    """A sink that keeps tiles (optionally slowly, like a pipeline under load)."""

    def __init__(self, delay_s: float = 0.0) -> None:
        self.tiles: list[Tile] = []
        self.delay_s = delay_s
        self.lock = threading.Lock()

    def send(self, tile: Tile) -> None:
        if self.delay_s:
            time.sleep(self.delay_s)
        with self.lock:
            self.tiles.append(tile)

    def by_id(self) -> dict[str, Tile]:
        return {t.tile_id: t for t in self.tiles}


@pytest.fixture(scope="module")
def core() -> Iterator[Any]:
    c = build_virtual_core(MicroscopeConfig(camera_width=CAM, camera_height=CAM, seed=3))
    yield c
    close_core(c)


def grid_sequence(x: float, y: float) -> useq.MDASequence:
    # a napari-micromanager-style sequence: one position with a 2x2 grid (explicit fov)
    return useq.MDASequence(
        stage_positions=[useq.AbsolutePosition(x=x, y=y)],
        grid_plan=useq.GridRowsColumns(rows=2, columns=2, overlap=10, fov_width=CAM * 0.5, fov_height=CAM * 0.5),
    )


# ------------------------------------------------------------------------------ pymmcore-plus
def test_pymmcore_plus_listener_attached_to_a_core(core: Any) -> None:
    sink = Collect(delay_s=0.3)  # slower than the camera: the scan must not wait for it
    frames: list[tuple[float, float, np.ndarray]] = []
    core.mda.events.frameReady.connect(lambda img, ev, meta: frames.append((ev.x_pos, ev.y_pos, img)))
    listener = PymmcorePlusListener(sink, slide_id="user-mda").connect(core)
    try:
        t0 = time.monotonic()
        core.mda.run(grid_sequence(1500, 1200))
        mda_s = time.monotonic() - t0
        received_when_done = len(sink.tiles)
        assert listener.close(30)
    finally:
        core.mda.events.frameReady.disconnect()
    assert received_when_done < 4, f"the MDA ({mda_s:.2f} s) waited for the slow sink"
    assert len(sink.tiles) == 4 and listener.stats.errors == 0
    for tile, (x, y, img) in zip(sink.tiles, frames, strict=True):
        assert (tile.x_um, tile.y_um) == (x, y)  # the event's position: the frame centre
        assert tile.pixel_size_um == 0.5 and tile.objective == "20x" and tile.kind == "scan"
        assert tile.slide_id == "user-mda" and tile.pixels.shape == (CAM, CAM, 3)
        assert np.array_equal(tile.pixels, img)
    assert len({t.tile_id for t in sink.tiles}) == 4
    assert [t.seq for t in sink.tiles] == [0, 1, 2, 3]


def test_pymmcore_plus_listener_as_mda_output_and_objective_switch(core: Any) -> None:
    sink = Collect()
    listener = PymmcorePlusListener(sink, slide_id="s")
    events = [
        useq.MDAEvent(x_pos=1000, y_pos=1000, index={"p": 0}),
        useq.MDAEvent(
            x_pos=1010,
            y_pos=1000,
            index={"p": 1},
            properties=[("Objective", "Label", "50x")],
            metadata={"scope_stream": {"tile_id": "r0001", "kind": "reimage", "objective": "50x", "request_id": "q"}},
        ),
        useq.MDAEvent(x_pos=1000, y_pos=1000, index={"p": 2}, properties=[("Objective", "Label", "20x")]),
    ]
    core.mda.run(iter(events), output=listener)  # pymmcore-plus relays frames to the listener off its thread
    tiles = sink.tiles
    assert [t.kind for t in tiles] == ["scan", "reimage", "scan"]
    assert [t.pixel_size_um for t in tiles] == [0.5, 0.2, 0.5]
    assert tiles[1].tile_id == "r0001" and tiles[1].objective == "50x" and tiles[1].metadata["request_id"] == "q"


def test_pymmcore_plus_listener_reports_unusable_frames(core: Any) -> None:
    sink = Collect()
    listener = PymmcorePlusListener(sink, slide_id="s")
    img = np.zeros((8, 8, 3), np.uint8)
    listener.frameReady(img, useq.MDAEvent(index={"t": 0}), {"pixel_size_um": 0.5})  # nowhere
    listener.frameReady(img, useq.MDAEvent(x_pos=1, y_pos=2), {"pixel_size_um": 0.0})  # no calibration
    listener.frameReady(np.zeros((8, 8, 2), np.uint8), useq.MDAEvent(x_pos=1, y_pos=2), {"pixel_size_um": 0.5})
    listener.frameReady(img, useq.MDAEvent(x_pos=1, y_pos=2), {"pixel_size_um": 0.5})  # fine
    assert listener.stats.errors == 3 and len(sink.tiles) == 1
    assert "stage position" in str(listener.stats.last_error) or "shape" in str(listener.stats.last_error)


# ------------------------------------------------------------------------------ pycromanager
def test_pycromanager_python_backend_streams_and_passes_images_on(core: Any) -> None:
    from scope_stream.acquire.pycromanager_compat import pycromanager_python_backend

    sink = Collect()
    positions = [(1000.0, 1000.0), (1040.0, 1000.0), (1040.0, 1040.0), (1000.0, 1040.0)]
    listener = PycromanagerListener(sink, slide_id="pm", namer=default_namer("acq"))
    with pycromanager_python_backend(core) as pm:
        with pm.acquisition(image_process_fn=listener) as acq:
            acq.acquire([{"axes": {"position": i}, "x": x, "y": y} for i, (x, y) in enumerate(positions)])
        dataset = acq.get_dataset()
        assert listener.close(30)
        saved = {i: np.asarray(dataset.read_image(position=i)) for i in range(4)}
    assert listener.backend == "auto" and listener._resolved == "python"
    tiles = sink.by_id()
    assert sorted(tiles) == [f"acq-position{i}" for i in range(4)]
    for i, (x, y) in enumerate(positions):
        t = tiles[f"acq-position{i}"]
        assert (t.x_um, t.y_um, t.pixel_size_um) == (x, y, 0.5)
        assert t.pixels.shape == (CAM, CAM, 3) and t.metadata["axes"] == {"position": i}
        assert np.array_equal(t.pixels, saved[i])  # pycromanager stored the very image we streamed


def test_image_saved_fn_reads_the_saved_dataset(core: Any) -> None:
    # pycromanager's Python backend saves RGB frames only in RAM (ndstorage's NDTiff writer takes 2-D images);
    # the Java backend writes NDTiff. Either way image_saved_fn reads the image back from the dataset.
    from scope_stream.acquire.pycromanager_compat import pycromanager_python_backend

    sink = Collect()
    listener = stream_to_scope_stream(sink, slide_id="saved", namer=default_namer("sv"))
    with pycromanager_python_backend(core) as pm:
        with pm.acquisition(image_saved_fn=listener.image_saved_fn) as acq:
            acq.acquire([{"axes": {"position": i}, "x": 1200.0 + 30 * i, "y": 900.0} for i in range(3)])
        stored = {i: np.asarray(acq.get_dataset().read_image(position=i)) for i in range(3)}
    assert listener.close(30)
    assert sorted(t.tile_id for t in sink.tiles) == ["sv-position0", "sv-position1", "sv-position2"]
    assert sorted(t.x_um for t in sink.tiles) == [1200.0, 1230.0, 1260.0]
    for t in sink.tiles:
        assert np.array_equal(t.pixels, stored[int(t.metadata["axes"]["position"])])


def java_backend_image(rgb: np.ndarray, x: float, y: float, pos: int) -> tuple[np.ndarray, dict[str, Any]]:
    """What pycromanager's Java backend hands image_process_fn for an RGB32 camera: AcqEngJ's tags, and the
    pixels as ``np.reshape(BGRA bytes, [H, W, 4])[..., :3]`` (java_backend_acquisitions._run_image_processor)."""
    h, w, _ = rgb.shape
    bgra = np.zeros((h, w, 4), np.uint8)
    bgra[..., 0], bgra[..., 1], bgra[..., 2] = rgb[..., 2], rgb[..., 1], rgb[..., 0]
    pixels = np.frombuffer(bgra.tobytes(), np.uint8)
    image = np.reshape(pixels, [h, w, 4])[..., :3]
    metadata = {
        "Axes": {"position": pos},
        "PixelType": "RGB32",
        "Width": w,
        "Height": h,
        "PixelSize_um": 0.345,
        "XPosition_um_Intended": x,
        "YPosition_um_Intended": y,
        "ZPosition_um_Intended": 12.5,
        "Camera": "HamamatsuHam_DCAM",
        "Core-Camera": "HamamatsuHam_DCAM",
        "Core-XYStage": "XYStage",
        "Objective-Label": "Nikon 20X Plan Apo",
        "XPositionUm": str(x + 0.3),  # the stage's own report (a string, as MMCore tags are)
        "ElapsedTime-ms": 120.0,
        "Exposure": 5.0,
    }
    return image, metadata


def test_java_backend_metadata_and_bgr_pixels() -> None:
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 255, (6, 5, 3), dtype=np.uint8)
    image, meta = java_backend_image(rgb, 1500.0, 2500.0, 3)
    sink = Collect()
    listener = PycromanagerListener(
        sink, slide_id="java", backend="java", namer=default_namer("mm"), asynchronous=False
    )
    out_image, out_meta = listener(image, meta)
    assert out_image is image and out_meta is meta  # handed back unchanged for pycromanager's saving
    (tile,) = sink.tiles
    assert np.array_equal(tile.pixels, rgb)  # BGR -> RGB
    assert (tile.x_um, tile.y_um, tile.z_um, tile.pixel_size_um) == (1500.0, 2500.0, 12.5, 0.345)
    assert tile.objective == "Nikon 20X Plan Apo" and tile.tile_id == "mm-position3"
    assert tile.metadata["source"] == "pycromanager-java" and tile.metadata["Camera"] == "HamamatsuHam_DCAM"
    # older tags / 16-bit gray: XPositionUm strings and PixelSizeUm
    gray = np.arange(12, dtype=np.uint16).reshape(3, 4)
    t16 = tile_from_pycromanager(
        gray,
        {"PixelType": "GRAY16", "XPositionUm": "10.5", "YPositionUm": "-3", "PixelSizeUm": "0.1", "Axes": {"z": 2}},
        slide_id="java",
        seq=1,
        namer=default_namer("mm"),
        backend="java",
    )
    assert (t16.x_um, t16.y_um, t16.pixel_size_um, t16.tile_id) == (10.5, -3.0, 0.1, "mm-z2")
    assert np.array_equal(t16.pixels, gray)


def test_bad_pycromanager_images_never_reach_pycromanager() -> None:
    sink = Collect()
    listener = PycromanagerListener(sink, slide_id="java", backend="java", asynchronous=False)
    img = np.zeros((4, 4), np.uint8)
    for meta in ({"PixelSize_um": 0.5}, {"XPosition_um_Intended": 1, "YPosition_um_Intended": 2, "PixelSize_um": 0}):
        out = listener(img, meta)  # no exception escapes into pycromanager
        assert out[0] is img
    assert listener.stats.errors == 2 and not sink.tiles
    assert "calibrate" in str(listener.stats.last_error)


# ------------------------------------------------------------------------------ follower
def test_datastore_follower_streams_a_dataset_while_it_is_written(core: Any) -> None:
    from scope_stream.acquire.pycromanager_compat import pycromanager_python_backend

    sink = Collect()
    arrived: dict[int, float] = {}

    def note(image: np.ndarray, metadata: dict[str, Any]) -> tuple[np.ndarray, dict[str, Any]]:
        arrived[int(metadata["Axes"]["position"])] = time.monotonic()
        return image, metadata

    sent_at: dict[str, float] = {}
    with pycromanager_python_backend(core) as pm:
        acq = pm.acquisition(image_process_fn=note)
        follower = DatastoreFollower(
            DatasetFeed(acq.get_dataset()),
            sink,
            slide_id="gui",
            poll_ms=20,
            backend="python",
            namer=default_namer("g"),
            on_tile=lambda t: sent_at.setdefault(t.tile_id, time.monotonic()),
        ).start()
        for i in range(6):
            acq.acquire({"axes": {"position": i}, "x": 2000.0 + 40 * i, "y": 1500.0})
            time.sleep(0.05)
        acq.mark_finished()
        acq.await_completion()
        assert follower.wait_finished(30)
        follower.stop()
    assert sorted(t.tile_id for t in sink.tiles) == [f"g-position{i}" for i in range(6)]
    assert len(sink.tiles) == 6 and follower.stats.errors == 0  # each image once
    assert sorted(t.x_um for t in sink.tiles) == [2000.0 + 40 * i for i in range(6)]
    lat = [sent_at[f"g-position{i}"] - arrived[i] for i in range(6)]
    assert max(lat) < 5.0, lat


# ------------------------------------------------------------------------------ replay
def _tiles(n: int) -> list[Tile]:
    rng = np.random.default_rng(1)
    return [
        Tile(
            rng.integers(0, 255, (20, 30, 3), dtype=np.uint8),
            slide_id="orig",
            tile_id=f"t{i}",
            seq=i,
            x_um=100.0 * i,
            y_um=50.0,
            z_um=1.5,
            pixel_size_um=0.5,
            objective="20x",
        )
        for i in range(n)
    ] + [
        Tile(
            np.arange(600, dtype=np.uint16).reshape(20, 30),
            slide_id="orig",
            tile_id="g16",
            seq=n,
            x_um=7.0,
            y_um=8.0,
            pixel_size_um=0.25,
            kind="reimage",
            objective="50x",
        )
    ]


def test_replay_folder_roundtrip_and_rate(tmp_path: Path) -> None:
    tiles = _tiles(5)
    folder = write_replay_folder(tiles, tmp_path / "run")
    src = ReplaySource(folder, slide_id="again")
    assert len(src) == 6
    sink = Collect()
    t0 = time.monotonic()
    assert src.run(sink, rate_tiles_per_s=25.0) == 6
    elapsed = time.monotonic() - t0
    assert elapsed >= 5 / 25.0 - 0.01, elapsed  # 6 tiles at 25/s: the last leaves 0.2 s after the first
    for a, b in zip(tiles, sink.tiles, strict=True):
        assert b.slide_id == "again" and b.tile_id == a.tile_id and b.kind == a.kind
        assert (b.x_um, b.y_um, b.z_um, b.pixel_size_um, b.objective) == (
            a.x_um,
            a.y_um,
            a.z_um,
            a.pixel_size_um,
            a.objective,
        )
        assert np.array_equal(a.pixels, b.pixels) and b.pixels.dtype == a.pixels.dtype


def test_replay_folder_errors_name_the_problem(tmp_path: Path) -> None:
    with pytest.raises(ReplayError, match="does not exist"):
        ReplaySource(tmp_path / "nothing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ReplayError, match=r"tiles\.csv"):
        ReplaySource(tmp_path / "empty")
    folder = write_replay_folder(_tiles(2), tmp_path / "f")
    csv_path = folder / "tiles.csv"
    text = csv_path.read_text()
    csv_path.write_text(text.replace("100.0", "left", 1))
    with pytest.raises(ReplayError, match=r"line 3: x_um='left' is not a number"):
        ReplaySource(folder)
    csv_path.write_text(text.replace("t1.png", "missing.png"))
    with pytest.raises(ReplayError, match=r"missing\.png"):
        ReplaySource(folder)
    csv_path.write_text("file,x_um\nt0.png,1\n")
    with pytest.raises(ReplayError, match="missing columns"):
        ReplaySource(folder)
    csv_path.write_text("file,x_um,y_um\nt0.png,1,2\n")
    with pytest.raises(ReplayError, match="pixel_size_um"):
        ReplaySource(folder)
    assert len(ReplaySource(folder, pixel_size_um=0.5)) == 1


def test_threaded_sink_serialises_calls_and_pushes_back() -> None:
    class Target:
        def __init__(self) -> None:
            self.thread_ids: set[int] = set()
            self.log: list[str] = []
            self.fail_once = True

        def send(self, tile: Tile) -> None:
            self.thread_ids.add(threading.get_ident())
            if self.fail_once:
                self.fail_once = False
                raise TimeoutError("pipeline full")  # backpressure: retried, not lost
            self.log.append(tile.tile_id)

        def finish(self, slide_id: str) -> str:
            self.thread_ids.add(threading.get_ident())
            return f"finished {slide_id} after {len(self.log)}"

    target = Target()
    sent: list[str] = []
    sink = ThreadedSink(lambda: target, max_queue_bytes=2000, on_sent=lambda t: sent.append(t.tile_id))
    tiles = _tiles(4)
    threads = [threading.Thread(target=sink.send, args=(t,)) for t in tiles[:4]]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sink.call("finish", "s", timeout=10) == "finished s after 4"
    sink.close()
    assert sorted(target.log) == ["t0", "t1", "t2", "t3"] and sorted(sent) == sorted(target.log)
    assert len(target.thread_ids) == 1 and threading.get_ident() not in target.thread_ids
    assert sink.stats.retries >= 1 and sink.stats.errors == 0
    with pytest.raises(RuntimeError, match="closed"):
        sink.send(tiles[0])
