"""The virtual microscope on a real MMCore (pymmcore-plus UniMMCore): devices, MDA grids, truthful tiles."""

from __future__ import annotations

import math
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import useq
from scipy import ndimage as ndi

from scope_stream.acquire.devices import StageLimitError, move_time_s
from scope_stream.acquire.slide import VirtualSlide
from scope_stream.acquire.virtual import VirtualMMCore, build_virtual_core, close_core
from scope_stream.config.microscope import MicroscopeConfig
from scope_stream.vocabulary import Tile

CFG = MicroscopeConfig(seed=11, camera_width=192, camera_height=160)


@pytest.fixture(scope="module")
def slide() -> VirtualSlide:
    return VirtualSlide(CFG)


@pytest.fixture(scope="module")
def core(slide: VirtualSlide) -> Iterator[VirtualMMCore]:
    c = build_virtual_core(CFG, slide)
    yield c
    close_core(c)


@pytest.fixture(autouse=True)
def _reset(request: pytest.FixtureRequest) -> None:
    if "core" in request.fixturenames:
        c = request.getfixturevalue("core")
        c.setAutoShutter(True)
        c.setExposure(CFG.exposure_ms)
        c.set_objective("20x")
        c.setPosition(0.0)
        c.waitForSystem()


def run_mda(core: VirtualMMCore, seq: useq.MDASequence) -> list[tuple[np.ndarray, useq.MDAEvent, dict[str, Any]]]:
    frames: list[tuple[np.ndarray, useq.MDAEvent, dict[str, Any]]] = []

    def on_frame(img: np.ndarray, event: useq.MDAEvent, meta: dict[str, Any]) -> None:
        frames.append((np.array(img, copy=True), event, dict(meta)))

    core.mda.events.frameReady.connect(on_frame)
    try:
        core.mda.run(seq)
    finally:
        core.mda.events.frameReady.disconnect(on_frame)
    return frames


def locate(image: np.ndarray, keep: np.ndarray, near_rc: tuple[float, float], search: int = 8) -> tuple[float, float]:
    """Where (row, col of the centre pixel) a cell's transmission template best matches the image."""
    from skimage.feature import match_template

    img = ndi.uniform_filter(image.astype(np.float64), (3, 3, 1)) + 0.5  # tame the camera noise
    bg = np.percentile(img.reshape(-1, 3), 90, axis=0)
    absorb = (-np.log(np.clip(img / bg, 1e-3, 1.0))).sum(axis=2)
    tmpl = ndi.uniform_filter((-np.log(np.clip(keep.astype(np.float64), 1e-3, 1.0))).sum(axis=2), 3)
    half = tmpl.shape[0] // 2
    r, c = round(near_rc[0]), round(near_rc[1])
    r0, c0 = r - half - search, c - half - search
    win = absorb[max(0, r0) : r + half + search + 1, max(0, c0) : c + half + search + 1]
    score = match_template(win, tmpl)
    pr, pc = np.unravel_index(int(np.argmax(score)), score.shape)
    return float(pr + max(0, r0) + half), float(pc + max(0, c0) + half)


# ----------------------------------------------------------------------------- devices
def test_devices_objectives_and_pixel_sizes(core: VirtualMMCore) -> None:
    assert set(core.getLoadedDevices()) >= {"XYStage", "Z", "Camera", "Shutter", "Objective", "Core"}
    assert core.getCameraDevice() == "Camera" and core.getShutterDevice() == "Shutter"
    assert core.getXYStageDevice() == "XYStage" and core.getFocusDevice() == "Z"
    assert core.getAutoShutter()
    assert core.getCurrentPixelSizeConfig() == "Res-20x" and core.getPixelSizeUm() == pytest.approx(0.5)
    seen: list[float] = []
    core.events.pixelSizeChanged.connect(seen.append)
    try:
        core.setConfig("Objective", "50x")
        core.waitForSystem()
    finally:
        core.events.pixelSizeChanged.disconnect(seen.append)
    assert core.getProperty("Objective", "Label") == "50x"
    assert core.getCurrentPixelSizeConfig() == "Res-50x" and core.getPixelSizeUm() == pytest.approx(0.2)
    assert core.getPixelSizeAffine() == pytest.approx((0.2, 0.0, 0.0, 0.0, 0.2, 0.0))
    assert 0.2 in seen
    assert [tuple(s) for s in core.getPixelSizeConfigData("Res-50x")] == [("Objective", "Label", "50x")]
    core.setPixelSizeConfig("Res-20x")
    core.waitForSystem()
    assert core.getPixelSizeUm() == pytest.approx(0.5)
    with pytest.raises(KeyError, match="unknown objective"):
        core.set_objective("100x")


def test_pixel_size_can_be_read_from_a_property_handler(core: VirtualMMCore) -> None:
    """Handlers run while the objective holds its lock: asking for the pixel size there must not deadlock."""
    seen: list[float] = []

    def on_property(dev: str, prop: str, value: object) -> None:
        if dev == "Objective":
            seen.append(core.getPixelSizeUm())

    core.events.propertyChanged.connect(on_property)
    try:
        core.set_objective("50x")
    finally:
        core.events.propertyChanged.disconnect(on_property)
    assert seen and core.getPixelSizeUm() == pytest.approx(0.2)


def test_snap_is_rgb8_with_exposure_dependent_brightness(core: VirtualMMCore) -> None:
    core.setXYPosition(2000.0, 1500.0)
    core.waitForSystem()
    core.snapImage()
    img = core.getImage()
    assert img.shape == (160, 192, 3) and img.dtype == np.uint8
    bright = np.median(img.reshape(-1, 3), axis=0)
    assert np.all(np.abs(bright - np.array(CFG.background_rgb)) < 12)  # empty glass dominates the median
    core.setExposure(CFG.exposure_ms / 2)
    core.snapImage()
    half = np.median(core.getImage().reshape(-1, 3), axis=0)
    assert np.allclose(half, bright / 2, rtol=0.08, atol=3)
    core.setExposure(CFG.exposure_ms * 3)
    core.snapImage()
    assert np.median(core.getImage()) == 255  # saturated


def test_frames_carry_shot_noise(core: VirtualMMCore) -> None:
    core.snapImage()
    a = core.getImage().astype(int)
    core.snapImage()
    b = core.getImage().astype(int)
    d = a - b
    assert 1.0 < d.std() < 10.0  # noise, not a different field


def test_shutter_gates_the_light(core: VirtualMMCore) -> None:
    core.setAutoShutter(False)
    core.setShutterOpen(False)
    core.snapImage()
    assert core.getImage().mean() < 8
    core.setShutterOpen(True)
    core.snapImage()
    assert core.getImage().mean() > 100
    core.setShutterOpen(False)


def test_stage_limits_are_a_clear_error(core: VirtualMMCore) -> None:
    _, y0, x1, _ = CFG.stage_limits()
    core.setXYPosition(1000.0, 1000.0)
    core.waitForSystem()
    with pytest.raises(StageLimitError, match=r"outside the stage travel x in \[-500\.0, 4500\.0\]"):
        core.setXYPosition(x1 + 1.0, 1000.0)
    with pytest.raises(ValueError, match="outside the stage travel"):
        core.setXYPosition(1000.0, y0 - 0.5)
    assert core.getXYPosition() == pytest.approx((1000.0, 1000.0))  # it did not move
    with pytest.raises(StageLimitError, match="focus travel"):
        core.setPosition(CFG.z_limits_um[1] + 1)
    # an MDA over a position past the travel fails before the first frame
    frames: list[Any] = []
    core.mda.events.frameReady.connect(frames.append)
    try:
        with pytest.raises(StageLimitError):
            core.mda.run(useq.MDASequence(stage_positions=[(1000.0, 1000.0), (x1 + 100.0, 1000.0)]))
    finally:
        core.mda.events.frameReady.disconnect(frames.append)
    assert frames == []


def test_move_time_grows_with_distance(core: VirtualMMCore) -> None:
    def move(x: float, y: float) -> float:
        t0 = time.perf_counter()
        core.setXYPosition(x, y)
        assert core.deviceBusy("XYStage")
        core.waitForDevice("XYStage")
        return time.perf_counter() - t0

    core.setXYPosition(200.0, 1500.0)
    core.waitForSystem()
    long = move(3800.0, 1500.0)  # 3.6 mm: ramps to 20 mm/s at 200 mm/s^2, cruises: 0.28 s + settle
    short = move(3750.0, 1500.0)  # 50 µm never reaches full speed: 32 ms + settle
    settle = CFG.stage_settle_ms / 1000
    assert move_time_s(3600, 20000, 200000) == pytest.approx(2 * 0.1 + (3600 - 2000) / 20000)
    assert move_time_s(50, 20000, 200000) == pytest.approx(2 * math.sqrt(50 / 200000))
    assert long >= move_time_s(3600, 20000, 200000) + settle - 0.005
    assert short >= move_time_s(50, 20000, 200000) + settle - 0.005
    assert short < long < 2.0
    assert core.getXYPosition() == pytest.approx((3750.0, 1500.0))
    # the stage reports where it is along the way
    core.setXYPosition(200.0, 1500.0)
    time.sleep(0.05)
    x_mid, _ = core.getXYPosition()
    core.waitForDevice("XYStage")
    assert 200.0 < x_mid < 3750.0


def test_focus_away_from_the_slide_blurs(core: VirtualMMCore) -> None:
    def snap_sharpness(z: float) -> float:
        core.setPosition(z)
        core.waitForSystem()
        core.snapImage()
        g = ndi.gaussian_filter(core.getImage().astype(float).mean(axis=2), 1.0)
        return float(np.abs(ndi.laplace(g)).mean())

    core.setXYPosition(1500.0, 1500.0)
    assert snap_sharpness(0.0) > snap_sharpness(4.0) > snap_sharpness(12.0)


# ----------------------------------------------------------------------------- MDA
def test_mda_3x3_grid_gives_nine_distinct_tiles_with_true_positions(core: VirtualMMCore, slide: VirtualSlide) -> None:
    centre = (1500.0, 1200.0)
    seq = useq.MDASequence(stage_positions=[centre], grid_plan=useq.GridRowsColumns(rows=3, columns=3, overlap=10))
    frames = run_mda(core, seq)
    assert len(frames) == 9
    fov_w, fov_h = 192 * 0.5, 160 * 0.5
    xs = sorted({round(ev.x_pos, 3) for _, ev, _ in frames})
    ys = sorted({round(ev.y_pos, 3) for _, ev, _ in frames})
    assert np.allclose(np.diff(xs), fov_w * 0.9) and np.allclose(np.diff(ys), fov_h * 0.9)
    assert np.isclose(np.mean(xs), centre[0]) and np.isclose(np.mean(ys), centre[1])
    for i, (img, ev, meta) in enumerate(frames):
        assert img.shape == (160, 192, 3) and img.dtype == np.uint8
        assert meta["position"]["x"] == pytest.approx(ev.x_pos) and meta["position"]["y"] == pytest.approx(ev.y_pos)
        assert meta["pixel_size_um"] == pytest.approx(0.5)
        # the tile shows the slide at its metadata position (and not at a neighbour's)
        here = slide.render(ev.x_pos, ev.y_pos, 192, 160, 0.5).astype(float)
        there = slide.render(ev.x_pos + fov_w * 0.9, ev.y_pos, 192, 160, 0.5).astype(float)
        err_here = np.abs(img - here).mean()
        assert err_here < 4.0 and np.abs(img - there).mean() > 2 * err_here
        for other, _, _ in frames[:i]:
            assert np.abs(img.astype(int) - other.astype(int)).mean() > 5  # distinct tiles


def test_grid_iterated_before_the_run_keeps_its_step(core: VirtualMMCore) -> None:
    """useq caches grid positions: iterating first used to freeze them at a 1 µm field of view."""
    seq = useq.MDASequence(stage_positions=[(2000.0, 1000.0)], grid_plan=useq.GridRowsColumns(rows=1, columns=2))
    assert len(list(seq)) == 2  # iterate before running
    xs = sorted(ev.x_pos for _, ev, _ in run_mda(core, seq))
    assert xs[1] - xs[0] == pytest.approx(192 * 0.5)


def test_planted_cell_appears_within_one_pixel(core: VirtualMMCore, slide: VirtualSlide) -> None:
    """Acquire tiles over planted abnormal cells; each cell is found within 1 px of its stage position."""
    cells = [c for c in slide.ground_truth((400, 400, 3600, 2600), kinds=["WBC"]) if c.abnormal]
    assert len(cells) >= 3
    checked = 0
    for objective, ps in (("20x", 0.5), ("50x", 0.2)):
        core.set_objective(objective)
        for k, cell in enumerate(cells[:3]):
            sx, sy = cell.x_um + (17.3 - 6 * k) * ps, cell.y_um - (9.6 + 4 * k) * ps  # cell off-centre
            frames = run_mda(core, useq.MDASequence(stage_positions=[(sx, sy)]))
            assert len(frames) == 1
            img, _, meta = frames[0]
            tile = Tile(
                img, slide_id="virtual", tile_id=f"t{k}", seq=k, x_um=meta["position"]["x"],
                y_um=meta["position"]["y"], pixel_size_um=meta["pixel_size_um"], objective=objective,
            )  # fmt: skip
            assert tile.pixel_size_um == pytest.approx(ps)
            row, col = tile.stage_to_px(cell.x_um, cell.y_um)
            keep, _ = slide.cell_template(cell, ps)
            found = locate(img, keep, (row, col))
            assert math.hypot(found[0] - row, found[1] - col) <= 1.0, (objective, cell, found, (row, col))
            checked += 1
    assert checked == 6


def test_same_seed_gives_the_same_tiles() -> None:
    cfg = MicroscopeConfig(seed=21, camera_width=96, camera_height=80)
    seq = useq.MDASequence(stage_positions=[(900.0, 800.0), (1300.0, 1700.0)])

    def acquire(c: MicroscopeConfig) -> list[np.ndarray]:
        core = build_virtual_core(c)
        try:
            return [img for img, _, _ in run_mda(core, seq)]
        finally:
            close_core(core)

    a, b = acquire(cfg), acquire(cfg)
    other = acquire(cfg.model_copy(update={"seed": 22}))
    assert len(a) == len(b) == 2
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))  # noise included
    assert all(np.abs(x.astype(int) - y.astype(int)).mean() > 5 for x, y in zip(a, other, strict=True))


def test_close_core_is_idempotent_and_process_exits_cleanly() -> None:
    code = (
        "import useq\n"
        "from scope_stream.acquire.virtual import build_virtual_core, close_core\n"
        "from scope_stream.config.microscope import MicroscopeConfig\n"
        "core = build_virtual_core(MicroscopeConfig(camera_width=64, camera_height=64))\n"
        "n = []\n"
        "core.mda.events.frameReady.connect(lambda *a: n.append(1))\n"
        "grid = useq.GridRowsColumns(rows=2, columns=2)\n"
        "core.mda.run(useq.MDASequence(stage_positions=[(500, 500)], grid_plan=grid))\n"
        "close_core(core)\n"
        "close_core(core)\n"
        "print('frames', len(n))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "frames 4" in out.stdout
    assert "FATAL" not in out.stderr and "Traceback" not in out.stderr
