"""One call builds a ready virtual microscope on a real MMCore: :func:`build_virtual_core`.

The core is a :class:`VirtualMMCore`, a subclass of pymmcore-plus's ``UniMMCore`` (the real C++
MMCore plus Python-side devices) that adds what ``UniMMCore`` 0.18 lacks for Python devices:
pixel-size presets keyed on a Python device's property (the objective). Nothing is patched: the
subclass overrides the pixel-size methods, and every other call goes to MMCore as usual.

    core = build_virtual_core()            # devices loaded, objective "20x", auto-shutter on
    core.mda.run(MDASequence(grid_plan=...))
    close_core(core)                       # clean teardown (no MMCore callbacks left at exit)
"""

from __future__ import annotations

import atexit
import logging
import time
import weakref
from contextlib import suppress
from pathlib import Path
from typing import Any

import pymmcore
import useq
from pymmcore_plus.experimental.unicore import UniMMCore
from pymmcore_plus.mda import MDAEngine

from scope_stream.config.microscope import MicroscopeConfig

from .devices import VirtualCamera, VirtualFocus, VirtualObjective, VirtualShutter, VirtualXYStage
from .slide import VirtualSlide

__all__ = [
    "DEVICE_LABELS",
    "VirtualMDAEngine",
    "VirtualMMCore",
    "build_virtual_core",
    "close_core",
    "pixel_config_name",
]

log = logging.getLogger(__name__)

#: The device labels of the virtual microscope.
DEVICE_LABELS = {
    "xy": "XYStage",
    "focus": "Z",
    "camera": "Camera",
    "shutter": "Shutter",
    "objective": "Objective",
}
#: The config group that switches objectives (one preset per objective name).
OBJECTIVE_GROUP = "Objective"


def pixel_config_name(objective: str) -> str:
    """The pixel-size preset defined for ``objective``."""
    return f"Res-{objective}"


class VirtualMMCore(UniMMCore):
    """``UniMMCore`` whose pixel-size presets may be keyed on Python-device properties.

    ``definePixelSizeConfig(res, label, prop, value)`` with a Python device's label is stored here
    (and an empty preset of that name in MMCore so the C++ side knows it); the current preset,
    pixel size and affine transform are then resolved from the Python device's state.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._py_pixel_configs: dict[str, dict[tuple[str, str], str]] = {}
        super().__init__(*args, **kwargs)
        self.virtual_slide: VirtualSlide | None = None
        self.virtual_config: MicroscopeConfig | None = None
        self.closed = False

    # ---- pixel-size presets over Python devices
    def definePixelSizeConfig(self, *args: str, **kwargs: str) -> None:
        if len(args) == 4 and args[1] in self._pydevices:
            res, label, prop, value = args
            if res not in self.getAvailablePixelSizeConfigs():
                super().definePixelSizeConfig(res)
            self._py_pixel_configs.setdefault(res, {})[(label, prop)] = str(value)
            return
        super().definePixelSizeConfig(*args, **kwargs)

    def deletePixelSizeConfig(self, resolutionID: str) -> None:
        self._py_pixel_configs.pop(resolutionID, None)
        super().deletePixelSizeConfig(resolutionID)

    def _py_preset_matches(self, settings: dict[tuple[str, str], str]) -> bool:
        return all(str(self._read_property(dev, prop)) == val for (dev, prop), val in settings.items())

    def _read_property(self, dev: str, prop: str) -> Any:
        # Python devices are read without taking their lock: the pixel size is often asked for from a
        # propertyChanged handler, which the device emits while it holds its own lock (a deadlock otherwise)
        if dev in self._pydevices:
            return self._pydevices[dev].get_property_value(prop)
        return self.getProperty(dev, prop)

    def getCurrentPixelSizeConfig(self, cached: bool = False) -> str:  # type: ignore[override]
        if not self._py_pixel_configs:
            return str(super().getCurrentPixelSizeConfig(cached))
        for res in self.getAvailablePixelSizeConfigs():
            settings = self._py_pixel_configs.get(res)
            if settings is not None and self._py_preset_matches(settings):
                return str(res)
        cpp = str(super().getCurrentPixelSizeConfig(cached))
        return "" if cpp in self._py_pixel_configs else cpp

    def _binning_over_mag(self) -> float:
        cam = self._py_camera()
        binning = float(cam.get_property_value("Binning")) if cam is not None else 1.0
        return binning / float(self.getMagnificationFactor() or 1.0)

    def getPixelSizeUm(self, cached: bool = False) -> float:
        res = self.getCurrentPixelSizeConfig(cached)
        if not res:
            return 0.0
        return float(self.getPixelSizeUmByID(res)) * self._binning_over_mag()

    def getPixelSizeAffine(self, cached: bool = False) -> Any:
        res = self.getCurrentPixelSizeConfig(cached)
        if not res:
            return (0.0, 0.0, 0.0, 0.0, 0.0, 0.0)
        f = self._binning_over_mag()
        return tuple(float(v) * f for v in self.getPixelSizeAffineByID(res))

    def setPixelSizeConfig(self, resolutionID: str) -> None:
        settings = self._py_pixel_configs.get(resolutionID)
        if settings is None:
            super().setPixelSizeConfig(resolutionID)
            return
        for (dev, prop), val in settings.items():
            self.setProperty(dev, prop, val)
        self.events.pixelSizeChanged.emit(self.getPixelSizeUm())

    def getPixelSizeConfigData(self, configName: str, *, native: bool = False) -> Any:
        cfg = pymmcore.CMMCore.getPixelSizeConfigData(self, configName)
        for (dev, prop), val in self._py_pixel_configs.get(configName, {}).items():
            cfg.addSetting(pymmcore.PropertySetting(dev, prop, val))
        if native:
            return cfg
        from pymmcore_plus.core._config import Configuration

        return Configuration.from_configuration(cfg)

    # ---- convenience for the virtual microscope
    @property
    def xy_stage(self) -> VirtualXYStage:
        return self._pydevices.get_device_of_type(DEVICE_LABELS["xy"], VirtualXYStage)

    @property
    def focus_drive(self) -> VirtualFocus:
        return self._pydevices.get_device_of_type(DEVICE_LABELS["focus"], VirtualFocus)

    @property
    def camera(self) -> VirtualCamera:
        return self._pydevices.get_device_of_type(DEVICE_LABELS["camera"], VirtualCamera)

    @property
    def nosepiece(self) -> VirtualObjective:
        return self._pydevices.get_device_of_type(DEVICE_LABELS["objective"], VirtualObjective)

    def set_objective(self, name: str, wait: bool = True) -> None:
        """Swing objective ``name`` into the light path (and wait for the turret)."""
        if self.virtual_config is not None:
            self.virtual_config.objective(name)  # clear error for an unknown name
        self.setProperty(DEVICE_LABELS["objective"], "Label", name)
        if wait:
            self.waitForDevice(DEVICE_LABELS["objective"])


class VirtualMDAEngine(MDAEngine):
    """pymmcore-plus's MDA engine, except that a position past the stage travel is an error.

    The stock engine logs a failed stage move as a warning and snaps anyway, at the old place. Here
    every position of an ``MDASequence`` is checked in ``setup_sequence`` (after the grid's field of
    view is known), so ``core.mda.run(...)`` raises :class:`~scope_stream.acquire.devices.StageLimitError`
    before the first frame; events from a generator are checked one by one before their move.
    It also forgets useq's cached grid positions before the grid's field of view is set, so a
    sequence that was iterated before it was run still gets the right grid step.
    """

    max_checked_events = 200_000

    def _stage(self) -> VirtualXYStage | None:
        core = self.mmcore
        label = core.getXYStageDevice()
        dev = core._pydevices[label] if label and label in core._pydevices else None  # type: ignore[attr-defined]
        return dev if isinstance(dev, VirtualXYStage) else None

    def setup_sequence(self, sequence: useq.MDASequence) -> Any:
        # useq caches a sequence's grid positions per sequence object; iterating a sequence before
        # running it froze the positions at the grid's default 1 µm field of view, and the engine's
        # later update of the field of view came too late (a collapsed grid step). Forget them.
        _clear_useq_caches()
        meta = super().setup_sequence(sequence)
        stage = self._stage()
        if stage is not None and type(sequence) is useq.MDASequence:
            for i, ev in enumerate(sequence):
                if i >= self.max_checked_events:
                    break
                if ev.x_pos is not None and ev.y_pos is not None:
                    stage.check_target(ev.x_pos, ev.y_pos)
        return meta

    def _set_event_xy_position(self, event: useq.MDAEvent) -> None:
        stage = self._stage()
        if stage is not None and event.x_pos is not None and event.y_pos is not None:
            stage.check_target(event.x_pos, event.y_pos)
        super()._set_event_xy_position(event)


def _clear_useq_caches() -> None:
    try:
        from useq import _iter_sequence
    except ImportError:  # pragma: no cover - other useq layouts
        return
    for name in ("_iter_axis", "_sizes", "_used_axes"):
        fn = getattr(_iter_sequence, name, None)
        if fn is not None and hasattr(fn, "cache_clear"):
            fn.cache_clear()


def build_virtual_core(cfg: MicroscopeConfig | None = None, slide: VirtualSlide | None = None) -> VirtualMMCore:
    """A ready virtual microscope on a real MMCore.

    Devices ``XYStage``, ``Z``, ``Camera``, ``Shutter`` and ``Objective`` are loaded, initialised and
    set as the core's defaults; each objective has a pixel-size preset (``Res-<name>``) and a preset
    in the ``Objective`` config group; the first objective of ``cfg.objectives`` is in place;
    auto-shutter is on, so a plain ``core.mda.run(MDASequence(...))`` works. The stage starts at
    the centre of the slide, the focus at the slide's focal plane.
    """
    cfg = cfg if cfg is not None else (slide.cfg if slide is not None else MicroscopeConfig())
    slide = slide if slide is not None else VirtualSlide(cfg)
    # mm_path: a folder without device adapters, so pymmcore-plus does not search for (and complain
    # about) a Micro-Manager installation; every device here is a Python device.
    core = VirtualMMCore(mm_path=str(Path(__file__).resolve().parent))
    try:
        _load_devices(core, cfg, slide)
    except BaseException:
        close_core(core)
        raise
    core.virtual_slide = slide
    core.virtual_config = cfg
    core.mda.set_engine(VirtualMDAEngine(core))
    atexit.register(_close_at_exit, weakref.ref(core))  # a forgotten core is still torn down cleanly
    return core


def _close_at_exit(ref: weakref.ref[VirtualMMCore]) -> None:
    core = ref()
    if core is not None:
        close_core(core)


def _load_devices(core: VirtualMMCore, cfg: MicroscopeConfig, slide: VirtualSlide) -> None:
    x0, y0, x1, y1 = slide.bounds_um
    centre = ((x0 + x1) / 2.0, (y0 + y1) / 2.0)
    xy = VirtualXYStage(
        cfg.stage_limits(),
        speed_um_per_s=cfg.stage_speed_um_per_s,
        accel_um_per_s2=cfg.stage_accel_um_per_s2,
        settle_ms=cfg.stage_settle_ms,
        start_um=centre,
        realtime=cfg.realtime,
    )
    tx, ty = cfg.focus_tilt_um_per_mm
    z = VirtualFocus(
        cfg.z_limits_um,
        speed_um_per_s=cfg.focus_speed_um_per_s,
        settle_ms=cfg.focus_settle_ms,
        start_um=cfg.focus_z_um + tx * centre[0] / 1000.0 + ty * centre[1] / 1000.0,
        realtime=cfg.realtime,
    )
    objective = VirtualObjective(cfg.objectives, switch_ms=cfg.objective_switch_ms, realtime=cfg.realtime)
    shutter = VirtualShutter()
    ref = weakref.ref(core)

    def light_on() -> bool:  # auto-shutter: the core opens the light path for every exposure
        c = ref()
        return bool(c is not None and not c.closed and c.getAutoShutter())

    camera = VirtualCamera(slide, cfg, stage=xy, focus=z, objective=objective, shutter=shutter, light_on=light_on)
    labels = DEVICE_LABELS
    core.loadPyDevice(labels["xy"], xy)
    core.loadPyDevice(labels["focus"], z)
    core.loadPyDevice(labels["objective"], objective)
    core.loadPyDevice(labels["shutter"], shutter)
    core.loadPyDevice(labels["camera"], camera)
    core.initializeAllDevices()
    core.setXYStageDevice(labels["xy"])
    core.setFocusDevice(labels["focus"])
    core.setCameraDevice(labels["camera"])
    core.setShutterDevice(labels["shutter"])
    core.setAutoShutter(True)
    for o in cfg.objectives:
        res = pixel_config_name(o.name)
        core.definePixelSizeConfig(res, labels["objective"], "Label", o.name)
        core.setPixelSizeUm(res, o.pixel_size_um)
        # camera column -> +x, row -> +y (the project's stage convention), no rotation
        core.setPixelSizeAffine(res, [o.pixel_size_um, 0.0, 0.0, 0.0, o.pixel_size_um, 0.0])
        core.defineConfig(OBJECTIVE_GROUP, o.name, labels["objective"], "Label", o.name)
    core.setProperty(labels["objective"], "Label", cfg.objectives[0].name)
    core.waitForSystem()
    core.setExposure(cfg.exposure_ms)

    sizes = {o.name: o.pixel_size_um for o in cfg.objectives}

    def _objective_changed(dev: str, prop: str, value: Any) -> None:
        # emitted while the device holds its lock: use the value, do not query the device here
        if dev == labels["objective"] and prop == "Label" and str(value) in sizes:
            core.events.pixelSizeChanged.emit(sizes[str(value)])

    core.events.propertyChanged.connect(_objective_changed)


def close_core(core: Any, timeout_s: float = 5.0) -> None:
    """Tear a core down cleanly: stop any MDA and sequence, drop MMCore's callback, unload devices.

    MMCore calls back into Python from its own threads; leaving that callback registered until the
    interpreter exits aborted the process ("FATAL: exception not rethrown") in trials, so it is
    removed first. Safe to call twice and on a partly built core.
    """
    if getattr(core, "closed", False):
        return
    with suppress(Exception):
        mda = core.mda
        if mda.is_running():
            mda.cancel()
            t_end = time.perf_counter() + timeout_s
            while mda.is_running() and time.perf_counter() < t_end:
                time.sleep(0.01)
    with suppress(Exception):
        if core.isSequenceRunning():
            core.stopSequenceAcquisition()
    with suppress(Exception):
        pymmcore.CMMCore.registerCallback(core, None)
    try:
        core.unloadAllDevices()
    except Exception as exc:  # pragma: no cover - nothing more to do on teardown
        log.warning("close_core: unloading devices failed: %s", exc)
    with suppress(Exception):
        core.closed = True
