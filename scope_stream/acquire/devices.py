"""Python devices for pymmcore-plus's ``UniMMCore``: the virtual microscope's hardware.

* :class:`VirtualXYStage`  -- travel limits (a clear error past them), move time = distance / speed + settle.
* :class:`VirtualFocus`    -- focus drive; its distance from the slide's focal plane blurs the image.
* :class:`VirtualObjective`-- nosepiece (state device); the core maps each state to a pixel-size preset.
* :class:`VirtualShutter`  -- the transmitted-light shutter.
* :class:`VirtualCamera`   -- 8-bit RGB camera rendering the :class:`~scope_stream.acquire.slide.VirtualSlide`
  under the stage, with exposure-dependent brightness, shot and read noise and a configurable size.

The devices share state through plain Python references (the camera holds the stage, focus, objective
and shutter it looks through); :func:`scope_stream.acquire.virtual.build_virtual_core` wires them up.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
from pymmcore_plus.experimental.unicore import (
    ShutterDevice,
    SimpleCameraDevice,
    StageDevice,
    StateDevice,
    XYStageDevice,
)

from scope_stream.config.microscope import MicroscopeConfig, ObjectiveConfig

from .slide import VirtualSlide, to_uint8

__all__ = [
    "StageLimitError",
    "VirtualCamera",
    "VirtualFocus",
    "VirtualObjective",
    "VirtualShutter",
    "VirtualXYStage",
    "move_time_s",
]


_GAUSS_LUT: np.ndarray | None = None


def _gaussian(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    """Standard normal float32 noise via a 65536-entry inverse-CDF table (about 2x faster than
    ``standard_normal`` for camera-sized arrays; tails are cut at 4.3 sigma, invisible in 8 bits)."""
    global _GAUSS_LUT
    if _GAUSS_LUT is None:
        from scipy.special import ndtri

        _GAUSS_LUT = ndtri((np.arange(65536) + 0.5) / 65536).astype(np.float32)
    return _GAUSS_LUT[rng.integers(0, 65536, shape, dtype=np.uint16)]


class StageLimitError(ValueError):
    """A move to a position outside a stage's travel."""


def move_time_s(distance_um: float, speed_um_per_s: float, accel_um_per_s2: float | None) -> float:
    """Duration of a straight move (without settling): trapezoidal speed profile, or constant speed
    when ``accel_um_per_s2`` is None. Short moves never reach full speed (triangular profile)."""
    d = abs(distance_um)
    if d == 0:
        return 0.0
    if not accel_um_per_s2:
        return d / speed_um_per_s
    d_ramp = speed_um_per_s**2 / accel_um_per_s2  # accelerating plus braking at full speed
    if d <= d_ramp:
        return 2.0 * math.sqrt(d / accel_um_per_s2)
    return 2.0 * speed_um_per_s / accel_um_per_s2 + (d - d_ramp) / speed_um_per_s


class _Motion:
    """A straight move with a trapezoidal speed profile, then a settle time (thread-safe)."""

    def __init__(
        self,
        start: tuple[float, ...],
        speed: float,
        settle_s: float,
        realtime: bool,
        accel: float | None = None,
    ) -> None:
        self._lock = threading.Lock()
        self._from = start
        self._to = start
        self._t0 = 0.0
        self._t_move = 0.0
        self._dist = 0.0
        self._settle = settle_s
        self.speed = speed
        self.accel = accel
        self.realtime = realtime

    def start(self, target: tuple[float, ...]) -> float:
        """Begin a move from the current position; returns its duration in seconds (with settling)."""
        with self._lock:
            here = self._now_position()
            dist = math.dist(here, target)
            self._from, self._to = here, target
            self._t0 = time.perf_counter()
            self._dist = dist
            self._t_move = move_time_s(dist, self.speed, self.accel) if self.realtime else 0.0
            return self._t_move + (self._settle if self.realtime and dist > 0 else 0.0)

    def _covered(self, t: float) -> float:
        """Fraction of the move done ``t`` seconds after its start."""
        if t >= self._t_move:
            return 1.0
        a, v, d = self.accel, self.speed, self._dist
        if not a:
            return t / self._t_move
        t_ramp = min(v / a, self._t_move / 2.0)
        v_top = a * t_ramp
        if t < t_ramp:
            s = 0.5 * a * t * t
        elif t < self._t_move - t_ramp:
            s = 0.5 * a * t_ramp**2 + v_top * (t - t_ramp)
        else:
            tb = self._t_move - t
            s = d - 0.5 * a * tb * tb
        return min(1.0, max(0.0, s / d))

    def _now_position(self) -> tuple[float, ...]:
        if self._t_move <= 0:
            return self._to
        f = self._covered(time.perf_counter() - self._t0)
        return tuple(a + (b - a) * f for a, b in zip(self._from, self._to, strict=True))

    def position(self) -> tuple[float, ...]:
        with self._lock:
            return self._now_position()

    def target(self) -> tuple[float, ...]:
        with self._lock:
            return self._to

    def busy(self) -> bool:
        with self._lock:
            if self._to == self._from or not self.realtime:
                return False
            return time.perf_counter() < self._t0 + self._t_move + self._settle

    def stop(self) -> None:
        with self._lock:
            here = self._now_position()
            self._from = self._to = here
            self._t_move = 0.0


# ------------------------------------------------------------------------------- XY stage
class VirtualXYStage(XYStageDevice):
    """Motorised XY stage with travel limits and a realistic move time.

    A move accelerates at ``accel_um_per_s2`` up to ``speed_um_per_s``, cruises and brakes (short moves
    never reach full speed), then settles for ``settle_ms``; meanwhile the device is busy and reports
    its position along the way. A target past the travel raises :class:`StageLimitError`.
    """

    def __init__(
        self,
        limits_um: tuple[float, float, float, float],
        *,
        speed_um_per_s: float = 20000.0,
        accel_um_per_s2: float | None = 200000.0,
        settle_ms: float = 15.0,
        start_um: tuple[float, float] = (0.0, 0.0),
        realtime: bool = True,
    ) -> None:
        super().__init__()
        x0, y0, x1, y1 = (float(v) for v in limits_um)
        if x1 <= x0 or y1 <= y0:
            raise ValueError(f"stage limits must be (x0, y0, x1, y1) with x1 > x0 and y1 > y0, got {limits_um}")
        self._limits = (x0, y0, x1, y1)
        self._origin = (0.0, 0.0)  # software origin: reported = physical - origin
        self._motion = _Motion(
            (float(start_um[0]), float(start_um[1])), speed_um_per_s, settle_ms / 1000.0, realtime, accel_um_per_s2
        )
        self._check(*self._motion.target())
        cls = type(self)
        self.register_property("Speed-um/s", default_value=float(speed_um_per_s), getter=cls._get_speed,
                               setter=cls._set_speed, limits=(1.0, 1e6))  # fmt: skip
        for i, name in enumerate(("LimitX0-um", "LimitY0-um", "LimitX1-um", "LimitY1-um")):
            self.register_property(name, default_value=self._limits[i], is_read_only=True)

    # properties
    def _get_speed(self) -> float:
        return self._motion.speed

    def _set_speed(self, value: float) -> None:
        self._motion.speed = float(value)

    @property
    def limits_um(self) -> tuple[float, float, float, float]:
        """Travel (x0, y0, x1, y1) in physical stage µm."""
        return self._limits

    def _check(self, x: float, y: float) -> None:
        x0, y0, x1, y1 = self._limits
        if not (math.isfinite(x) and math.isfinite(y)):
            raise StageLimitError(f"XY stage target ({x}, {y}) µm is not a finite position")
        if not (x0 <= x <= x1 and y0 <= y <= y1):
            raise StageLimitError(
                f"XY stage target ({x:.1f}, {y:.1f}) µm is outside the stage travel "
                f"x in [{x0:.1f}, {x1:.1f}], y in [{y0:.1f}, {y1:.1f}] µm; the stage did not move"
            )

    def check_target(self, x: float, y: float) -> None:
        """Raise :class:`StageLimitError` if (x, y) (in reported coordinates) is beyond the travel."""
        self._check(float(x) + self._origin[0], float(y) + self._origin[1])

    # device API
    def set_position_um(self, x: float, y: float) -> None:
        px, py = float(x) + self._origin[0], float(y) + self._origin[1]
        self._check(px, py)
        self._motion.start((px, py))
        self.core.events.XYStagePositionChanged.emit(self.get_label(), float(x), float(y))

    def get_position_um(self) -> tuple[float, float]:
        px, py = self._motion.position()
        return px - self._origin[0], py - self._origin[1]

    def physical_position_um(self) -> tuple[float, float]:
        """Where the slide actually is under the objective (ignores a software origin)."""
        px, py = self._motion.position()
        return px, py

    def busy(self) -> bool:
        return self._motion.busy()

    def home(self) -> None:
        self._motion.start((self._limits[0], self._limits[1]))

    def stop(self) -> None:
        self._motion.stop()

    def set_origin_x(self) -> None:
        self._origin = (self._motion.position()[0], self._origin[1])

    def set_origin_y(self) -> None:
        self._origin = (self._origin[0], self._motion.position()[1])

    def set_adapter_origin_um(self, x: float, y: float) -> None:
        px, py = self._motion.position()
        self._origin = (px - float(x), py - float(y))


# ------------------------------------------------------------------------------- focus
class VirtualFocus(StageDevice):
    """Focus drive (z, µm) with travel limits and a move time."""

    def __init__(
        self,
        limits_um: tuple[float, float] = (-500.0, 500.0),
        *,
        speed_um_per_s: float = 2000.0,
        settle_ms: float = 5.0,
        start_um: float = 0.0,
        realtime: bool = True,
    ) -> None:
        super().__init__()
        self._limits = (float(limits_um[0]), float(limits_um[1]))
        self._origin = 0.0
        self._motion = _Motion((float(start_um),), speed_um_per_s, settle_ms / 1000.0, realtime)
        self._check(float(start_um))
        self.register_property("LimitLow-um", default_value=self._limits[0], is_read_only=True)
        self.register_property("LimitHigh-um", default_value=self._limits[1], is_read_only=True)

    def _check(self, z: float) -> None:
        lo, hi = self._limits
        if not math.isfinite(z) or not (lo <= z <= hi):
            raise StageLimitError(
                f"focus target {z} µm is outside the focus travel [{lo:.1f}, {hi:.1f}] µm; the focus did not move"
            )

    def set_position_um(self, val: float) -> None:
        z = float(val) + self._origin
        self._check(z)
        self._motion.start((z,))
        self.core.events.stagePositionChanged.emit(self.get_label(), float(val))

    def get_position_um(self) -> float:
        return self._motion.position()[0] - self._origin

    def physical_position_um(self) -> float:
        return self._motion.position()[0]

    def busy(self) -> bool:
        return self._motion.busy()

    def home(self) -> None:
        self._motion.start((self._limits[0],))

    def stop(self) -> None:
        self._motion.stop()

    def set_origin(self) -> None:
        self._origin = self._motion.position()[0]

    def set_adapter_origin_um(self, newZUm: float) -> None:
        self._origin = self._motion.position()[0] - float(newZUm)


# ------------------------------------------------------------------------------- objective
class VirtualObjective(StateDevice):
    """The nosepiece: one state per configured objective; switching takes ``switch_ms``."""

    def __init__(self, objectives: list[ObjectiveConfig], *, switch_ms: float = 300.0, realtime: bool = True) -> None:
        if not objectives:
            raise ValueError("the nosepiece needs at least one objective")
        self._objectives = list(objectives)
        self._state = 0
        self._busy_until = 0.0
        self._switch_s = switch_ms / 1000.0 if realtime else 0.0
        super().__init__({i: o.name for i, o in enumerate(objectives)})

    def get_state(self) -> int:
        return self._state

    def set_state(self, position: int) -> None:
        pos = int(position)
        if not 0 <= pos < len(self._objectives):
            raise ValueError(f"objective position {pos} does not exist (0..{len(self._objectives) - 1})")
        if pos != self._state:
            self._busy_until = time.perf_counter() + self._switch_s
        self._state = pos

    def busy(self) -> bool:
        return time.perf_counter() < self._busy_until

    def current(self) -> ObjectiveConfig:
        """The objective in the light path."""
        return self._objectives[self._state]


# ------------------------------------------------------------------------------- shutter
class VirtualShutter(ShutterDevice):
    """Transmitted-light shutter (instant)."""

    def __init__(self) -> None:
        super().__init__()
        self._open = False

    def get_open(self) -> bool:
        return self._open

    def set_open(self, open: bool) -> None:
        self._open = bool(open)


# ------------------------------------------------------------------------------- camera
class VirtualCamera(SimpleCameraDevice):
    """8-bit RGB camera looking at the virtual slide through the stage, focus and objective.

    Brightness scales with exposure (``cfg.background_rgb`` is reached at ``cfg.exposure_ms``) and
    saturates at 255; shot noise follows ``cfg.camera_full_well_e``, plus read noise and an offset.
    Light reaches it while the shutter is open or while ``light_on()`` says so (the core's auto-shutter).
    Noise is drawn from a stream seeded by ``cfg.seed``, so the same acquisitions give the same frames.
    """

    def __init__(
        self,
        slide: VirtualSlide,
        cfg: MicroscopeConfig,
        *,
        stage: VirtualXYStage,
        focus: VirtualFocus,
        objective: VirtualObjective,
        shutter: VirtualShutter,
        light_on: Callable[[], bool] | None = None,
    ) -> None:
        super().__init__()
        self._slide = slide
        self._cfg = cfg
        self._stage = stage
        self._focus = focus
        self._objective = objective
        self._shutter = shutter
        self._light_on = light_on
        self._exposure = float(cfg.exposure_ms)
        self._shape = (int(cfg.camera_height), int(cfg.camera_width), 3)
        self._rng = np.random.default_rng([cfg.seed & 0xFFFFFFFF, 0xCA3E])
        self._frames = 0

    def get_exposure(self) -> float:
        return self._exposure

    def set_exposure(self, exposure: float) -> None:
        exposure = float(exposure)
        if not (math.isfinite(exposure) and exposure > 0):
            raise ValueError(f"exposure must be > 0 ms, got {exposure}")
        self._exposure = exposure

    def sensor_shape(self) -> tuple[int, int, int]:
        return self._shape

    def dtype(self) -> Any:
        return np.uint8

    def focal_plane_um(self, x_um: float, y_um: float) -> float:
        """The focus-drive position at which the slide is sharp at (x, y): ``focus_z_um`` plus the tilt."""
        tx, ty = self._cfg.focus_tilt_um_per_mm
        return self._cfg.focus_z_um + tx * x_um / 1000.0 + ty * y_um / 1000.0

    def expose(self) -> tuple[np.ndarray, dict[str, str]]:
        """One frame as float32 DN (before quantisation) and its metadata."""
        x, y = self._stage.physical_position_um()
        z = self._focus.physical_position_um()
        obj = self._objective.current()
        h, w, _ = self._shape
        dz = z - self.focal_plane_um(x, y)
        lit = self._shutter.get_open() or (self._light_on() if self._light_on is not None else False)
        if lit:
            frame = self._slide.render_float(x, y, w, h, obj.pixel_size_um, dz, obj.numerical_aperture)
            frame *= self._exposure / self._cfg.exposure_ms
        else:
            frame = np.zeros(self._shape, dtype=np.float32)
        cfg = self._cfg
        if cfg.camera_noise:
            k = cfg.camera_full_well_e / 255.0  # electrons per DN
            np.minimum(frame, 255.0, out=frame)
            std = np.sqrt(frame * (1.0 / k) + cfg.camera_read_noise_dn**2)
            std *= _gaussian(self._rng, self._shape)
            frame += std
        frame += cfg.camera_offset_dn
        np.maximum(frame, 0.0, out=frame)
        self._frames += 1
        meta = {
            "Virtual-X-um": f"{x:.3f}",
            "Virtual-Y-um": f"{y:.3f}",
            "Virtual-Z-um": f"{z:.3f}",
            "Virtual-Defocus-um": f"{dz:.3f}",
            "Virtual-Objective": obj.name,
            "Virtual-PixelSize-um": f"{obj.pixel_size_um}",
            "Virtual-Lit": "1" if lit else "0",
            "Virtual-Frame": str(self._frames),
        }
        return frame, meta

    def snap(self, buffer: np.ndarray) -> Mapping[str, str]:
        t0 = time.perf_counter()
        frame, meta = self.expose()
        buffer[:] = to_uint8(frame)
        if self._cfg.realtime:  # the exposure takes its time (rendering counts towards it)
            rest = self._exposure / 1000.0 - (time.perf_counter() - t0)
            if rest > 0:
                time.sleep(rest)
        return meta
