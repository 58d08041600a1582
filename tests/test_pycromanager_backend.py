"""pycromanager 1.0.2's Python-backend Acquisition running on the virtual microscope's real MMCore."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest

from scope_stream.acquire.devices import StageLimitError
from scope_stream.acquire.pycromanager_compat import PycromanagerCore, pycromanager_python_backend
from scope_stream.acquire.virtual import VirtualMMCore, build_virtual_core, close_core
from scope_stream.config.microscope import MicroscopeConfig

pytestmark = pytest.mark.timeout(120)

CFG = MicroscopeConfig(seed=13, camera_width=128, camera_height=96)


@pytest.fixture(scope="module")
def core() -> Iterator[VirtualMMCore]:
    c = build_virtual_core(CFG)
    yield c
    close_core(c)


def test_acquisition_over_four_positions_delivers_four_tiles(core: VirtualMMCore) -> None:
    from pycromanager import Acquisition, multi_d_acquisition_events

    positions = [[600.0, 700.0], [900.0, 700.0], [600.0, 1100.0], [1900.0, 2100.0]]
    got: list[tuple[np.ndarray, dict[str, Any]]] = []

    def image_process_fn(image: np.ndarray, metadata: dict[str, Any]) -> None:
        got.append((np.array(image, copy=True), dict(metadata)))
        return None  # the image is ours: pycromanager stores nothing

    with pycromanager_python_backend(core) as pm:
        assert isinstance(pm.core, PycromanagerCore)
        with Acquisition(image_process_fn=image_process_fn) as acq:
            acq.acquire(multi_d_acquisition_events(xy_positions=positions))
    assert len(got) == 4
    slide = core.virtual_slide
    assert slide is not None
    for (img, meta), (x, y) in zip(sorted(got, key=lambda g: g[1]["Axes"]["position"]), positions, strict=True):
        assert img.shape == (96, 128, 3) and img.dtype == np.uint8
        assert meta["XPosition_um_Intended"] == pytest.approx(x)
        assert meta["YPosition_um_Intended"] == pytest.approx(y)
        assert meta["PixelSize_um"] == pytest.approx(0.5)
        expected = slide.render(x, y, 128, 96, 0.5).astype(float)
        assert np.abs(img - expected).mean() < 4.0  # the tile shows the slide where the event says


def test_session_wrapper_tags_and_restart(core: VirtualMMCore) -> None:
    from pycromanager.acquisition.acq_eng_py.internal.engine import Engine
    from pycromanager.acquisition.acq_eng_py.main.acquisition_event import AcquisitionEvent

    got: list[dict[str, Any]] = []
    with pycromanager_python_backend(core) as pm:
        with pytest.raises(RuntimeError, match="already open"):
            pycromanager_python_backend(core)
        # events with "tags" work (pycromanager 1.0.2 calls a missing setTags; the session aliases it)
        with pm.acquisition(image_process_fn=lambda img, md: got.append(md)) as acq:
            acq.acquire([{"axes": {"position": 0}, "x": 1000.0, "y": 1000.0, "tags": {"slide": "s-1"}}])
        assert pm.core.get_pixel_size_um() == pytest.approx(0.5)  # snake_case over the real core
        assert pm.core.getCameraDevice() == "Camera"  # camelCase passes through
    assert [m.get("AcqEngMetadata.TAGS") for m in got] == [{"slide": "s-1"}]
    # closed: the engine singleton is gone, the alias is removed, and a new session starts afresh
    assert not hasattr(Engine, "singleton")
    assert not hasattr(AcquisitionEvent, "setTags")
    with pycromanager_python_backend(core) as pm2, pm2.acquisition(image_process_fn=lambda i, m: got.append(m)) as acq:
        acq.acquire({"axes": {"position": 1}, "x": 1100.0, "y": 1000.0})
    assert len(got) == 2


def test_notification_callback_error_raises_instead_of_hanging(core: VirtualMMCore) -> None:
    def notification_callback_fn(notification: Any) -> None:
        raise RuntimeError("broken notification handler")

    got: list[Any] = []
    for _ in range(5):  # the abort used to race with the end-of-events marker and hang now and then
        with (
            pycromanager_python_backend(core) as pm,
            pytest.raises(RuntimeError, match="broken notification handler"),
            pm.acquisition(
                image_process_fn=lambda img, md: got.append(md), notification_callback_fn=notification_callback_fn
            ) as acq,
        ):
            acq.acquire([{"axes": {"position": 0}, "x": 800.0, "y": 800.0}])


def test_position_past_the_stage_travel_is_a_clear_error(core: VirtualMMCore) -> None:
    got: list[Any] = []
    with (
        pycromanager_python_backend(core) as pm,
        pytest.raises(StageLimitError, match="outside the stage travel"),
        pm.acquisition(image_process_fn=lambda img, md: got.append(md)) as acq,
    ):
        acq.acquire([{"axes": {"position": 0}, "x": 1e6, "y": 800.0}])
    assert got == []


def test_process_exits_cleanly_after_pycromanager_runs() -> None:
    code = (
        "from pycromanager import Acquisition, multi_d_acquisition_events\n"
        "from scope_stream.acquire.pycromanager_compat import pycromanager_python_backend\n"
        "from scope_stream.acquire.virtual import build_virtual_core, close_core\n"
        "from scope_stream.config.microscope import MicroscopeConfig\n"
        "core = build_virtual_core(MicroscopeConfig(camera_width=64, camera_height=64))\n"
        "n = []\n"
        "with pycromanager_python_backend(core):\n"
        "    with Acquisition(image_process_fn=lambda img, md: n.append(1)) as acq:\n"
        "        acq.acquire(multi_d_acquisition_events(xy_positions=[[500, 500], [700, 500]]))\n"
        "close_core(core)\n"
        "print('tiles', len(n), flush=True)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=90)
    assert out.returncode == 0, out.stderr
    assert "tiles 2" in out.stdout
    assert "FATAL" not in out.stderr and "Traceback" not in out.stderr and "terminate" not in out.stderr


def test_process_exits_cleanly_even_when_nothing_is_closed() -> None:
    """Without closing, mmpycorex's exit hook used to unload devices under live MMCore callbacks and
    abort the process ("FATAL: exception not rethrown", exit 134, 4 of 6 trial runs); exit hooks of the
    session and the core now tear down first."""
    code = (
        "from pycromanager import Acquisition, multi_d_acquisition_events\n"
        "from scope_stream.acquire.pycromanager_compat import pycromanager_python_backend\n"
        "from scope_stream.acquire.virtual import build_virtual_core\n"
        "from scope_stream.config.microscope import MicroscopeConfig\n"
        "core = build_virtual_core(MicroscopeConfig(camera_width=64, camera_height=64))\n"
        "pm = pycromanager_python_backend(core)\n"
        "n = []\n"
        "with Acquisition(image_process_fn=lambda img, md: n.append(1)) as acq:\n"
        "    acq.acquire(multi_d_acquisition_events(xy_positions=[[500, 500], [700, 500]]))\n"
        "print('tiles', len(n), flush=True)\n"
    )
    for _ in range(2):
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=90)
        assert out.returncode == 0, out.stderr
        assert "tiles 2" in out.stdout and "FATAL" not in out.stderr
