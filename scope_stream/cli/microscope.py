"""``scope-stream microscope ...``: look at, measure and export the virtual microscope.

* ``render``      -- one field of view to a PNG (noise-free, or ``--camera`` through the real MMCore);
* ``truth``       -- the planted cells (ground truth) of the slide or a region, to CSV/JSON;
* ``bench``       -- time field rendering (and optionally a camera snap + stage move on the core);
* ``info``        -- what the slide is made of;
* ``make-sample`` -- regenerate the packaged sample from a full data folder.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from .app import app, fail

if TYPE_CHECKING:
    from scope_stream.acquire.slide import VirtualSlide
    from scope_stream.config import MicroscopeConfig, ObjectiveConfig

microscope_app = typer.Typer(help="The virtual microscope: render fields, export ground truth, benchmark.")
app.add_typer(microscope_app, name="microscope")

ConfigOpt = Annotated[Path | None, typer.Option("--config", "-c", help="scope-stream YAML (its microscope section).")]
DataOpt = Annotated[
    Path | None, typer.Option("--data-dir", help="Folder with pbc/ and bccd/ (e.g. ../shared/data); default: sample.")
]
SeedOpt = Annotated[int | None, typer.Option("--seed", help="Slide seed (overrides the config).")]


def _microscope_cfg(config: Path | None, data_dir: Path | None, seed: int | None) -> MicroscopeConfig:
    from scope_stream.config import ConfigError, load_scope_config

    try:
        cfg = load_scope_config(config).microscope
    except ConfigError as exc:
        raise fail(str(exc)) from exc
    updates: dict[str, object] = {}
    if data_dir is not None:
        updates["data_dir"] = data_dir
    if seed is not None:
        updates["seed"] = seed
    return cfg.model_copy(update=updates) if updates else cfg


def _objective(cfg: MicroscopeConfig, objective: str) -> tuple[str, ObjectiveConfig]:
    """(name, objective) for ``--objective`` (default: the first configured one); unknown names fail."""
    name = objective or cfg.objectives[0].name
    try:
        return name, cfg.objective(name)
    except KeyError as exc:
        raise fail(str(exc.args[0])) from exc


def _core_api() -> tuple[Any, Any]:
    """(build_virtual_core, close_core), keeping the log level: pymmcore-plus sets the root logger to DEBUG."""
    import logging

    root = logging.getLogger()
    level = root.level
    from scope_stream.acquire.virtual import build_virtual_core, close_core

    root.setLevel(level)
    logging.getLogger("pymmcore-plus").setLevel(max(level, logging.INFO))
    return build_virtual_core, close_core


def _slide(cfg: MicroscopeConfig) -> VirtualSlide:
    from scope_stream.acquire.slide import SlideError, VirtualSlide

    try:
        return VirtualSlide(cfg)
    except SlideError as exc:
        raise fail(str(exc)) from exc


@microscope_app.command("render")
def render(
    out: Annotated[Path, typer.Option("--out", "-o", help="PNG file to write.")],
    x: Annotated[float, typer.Option("--x", help="Stage x (µm) of the field centre.")] = 1000.0,
    y: Annotated[float, typer.Option("--y", help="Stage y (µm) of the field centre.")] = 1000.0,
    objective: Annotated[str, typer.Option("--objective", help="Objective name (sets the pixel size).")] = "",
    width: Annotated[int, typer.Option("--width", help="Field width in pixels (default: camera width).")] = 0,
    height: Annotated[int, typer.Option("--height", help="Field height in pixels (default: camera height).")] = 0,
    z: Annotated[float, typer.Option("--z", help="Defocus in µm (0 = sharp).")] = 0.0,
    camera: Annotated[bool, typer.Option("--camera", help="Snap through the MMCore camera (noise).")] = False,
    config: ConfigOpt = None,
    data_dir: DataOpt = None,
    seed: SeedOpt = None,
) -> None:
    """Render the field centred at (--x, --y) to a PNG."""
    from PIL import Image

    cfg = _microscope_cfg(config, data_dir, seed)
    name, obj = _objective(cfg, objective)
    w, h = width or cfg.camera_width, height or cfg.camera_height
    slide = _slide(cfg)
    if camera:
        build_virtual_core, close_core = _core_api()
        cfg = cfg.model_copy(update={"camera_width": w, "camera_height": h})
        core = build_virtual_core(cfg, slide)
        try:
            core.set_objective(name)
            core.setXYPosition(x, y)
            core.setPosition(z + cfg.focus_z_um)
            core.waitForSystem()
            core.snapImage()
            img = core.getImage()
        except ValueError as exc:
            raise fail(str(exc)) from exc
        finally:
            close_core(core)
    else:
        img = slide.render(x, y, w, h, obj.pixel_size_um, z, obj.numerical_aperture)
    out.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(img).save(out)
    typer.echo(f"wrote {out} ({w}x{h} px, {obj.name} at {obj.pixel_size_um} µm/px, centre ({x}, {y}) µm)")


@microscope_app.command("truth")
def truth(
    out: Annotated[Path, typer.Option("--out", "-o", help="Ground-truth file (.csv or .json).")],
    region: Annotated[
        tuple[float, float, float, float] | None,
        typer.Option("--region", help="x0 y0 x1 y1 in µm (default: the whole slide)."),
    ] = None,
    kinds: Annotated[
        list[str] | None, typer.Option("--kind", help="WBC, platelet or RBC; repeat (default: WBC and platelet).")
    ] = None,
    config: ConfigOpt = None,
    data_dir: DataOpt = None,
    seed: SeedOpt = None,
) -> None:
    """Export the planted cells (id, class, abnormal, x/y µm, diameter) of the slide or a region."""
    from collections import Counter

    from scope_stream.acquire.slide import SlideError, write_ground_truth

    cfg = _microscope_cfg(config, data_dir, seed)
    slide = _slide(cfg)
    try:
        cells = slide.ground_truth(region=region, kinds=kinds or ["WBC", "platelet"])
        write_ground_truth(cells, out)
    except SlideError as exc:
        raise fail(str(exc)) from exc
    counts = Counter(c.label for c in cells)
    abn = sum(c.abnormal for c in cells)
    for kind in sorted({c.kind for c in cells}):
        d = sorted(c.diameter_um for c in cells if c.kind == kind)
        typer.echo(f"{kind}: {len(d)} cells, median diameter {d[len(d) // 2]:.1f} µm (range {d[0]:.1f}-{d[-1]:.1f})")
    typer.echo(
        f"wrote {out}: {len(cells)} cells ({abn} abnormal): " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items()))
    )


@microscope_app.command("info")
def info(config: ConfigOpt = None, data_dir: DataOpt = None, seed: SeedOpt = None) -> None:
    """Describe the slide: its source images and size."""
    import json

    cfg = _microscope_cfg(config, data_dir, seed)
    typer.echo(json.dumps(_slide(cfg).describe(), indent=1))


@microscope_app.command("bench")
def bench(
    n: Annotated[int, typer.Option("--n", help="Fields to time (after one warm-up).")] = 20,
    size: Annotated[int, typer.Option("--size", help="Field width and height in pixels.")] = 1024,
    objective: Annotated[str, typer.Option("--objective", help="Objective name.")] = "",
    core: Annotated[bool, typer.Option("--core", help="Also time stage move + snap on the MMCore.")] = False,
    config: ConfigOpt = None,
    data_dir: DataOpt = None,
    seed: SeedOpt = None,
) -> None:
    """Time rendering of size x size fields at random, fresh places (median and range, ms)."""
    import statistics
    import time

    import numpy as np
    from rich.progress import track

    cfg = _microscope_cfg(config, data_dir, seed)
    name, obj = _objective(cfg, objective)
    slide = _slide(cfg)
    rng = np.random.default_rng(0)
    x0, y0, x1, y1 = slide.bounds_um
    half = size * obj.pixel_size_um / 2
    where = [(rng.uniform(x0 + half, x1 - half), rng.uniform(y0 + half, y1 - half)) for _ in range(n + 1)]
    slide.render(*where[0], size, size, obj.pixel_size_um)  # warm-up: sprites of the pool get cut once
    cold: list[float] = []
    warm: list[float] = []
    cpu_cold: list[float] = []
    cpu_warm: list[float] = []
    for xy in track(where[1:], description=f"rendering {size}x{size} at {name}"):
        for wall, cpu in ((cold, cpu_cold), (warm, cpu_warm)):  # a new place, then the same place again
            t0, c0 = time.perf_counter(), time.process_time()
            slide.render(*xy, size, size, obj.pixel_size_um)
            wall.append((time.perf_counter() - t0) * 1000)
            cpu.append((time.process_time() - c0) * 1000)

    def show(label: str, ms: list[float], cpu: list[float] | None = None) -> None:
        extra = f"; CPU median {statistics.median(cpu):.1f} ms" if cpu else ""
        typer.echo(
            f"{label}: median {statistics.median(ms):.1f} ms (min {min(ms):.1f}, max {max(ms):.1f}), n={len(ms)}{extra}"
        )

    typer.echo(f"field {size}x{size} px at {name} ({obj.pixel_size_um} µm/px), slide from {slide.describe()['source']}")
    # a scan: neighbouring fields with 10 % overlap along rows (what the demo does)
    step = size * obj.pixel_size_um * 0.9
    per_row = max(1, int((x1 - x0 - 2 * half) // step))
    scan_wall: list[float] = []
    scan_cpu: list[float] = []
    for i in range(n):
        sx = x0 + half + (i % per_row) * step
        sy = y0 + half + (i // per_row) * step
        t0, c0 = time.perf_counter(), time.process_time()
        slide.render(sx, sy, size, size, obj.pixel_size_um)
        scan_wall.append((time.perf_counter() - t0) * 1000)
        scan_cpu.append((time.process_time() - c0) * 1000)
    show("render, random new place (layout + render)", cold, cpu_cold)
    show("render, same place again", warm, cpu_warm)
    show("render, next field of a scan (10 % overlap)", scan_wall, scan_cpu)
    if core:
        build_virtual_core, close_core = _core_api()
        c = build_virtual_core(cfg.model_copy(update={"camera_width": size, "camera_height": size}), slide)
        try:
            c.set_objective(name)
            step = size * obj.pixel_size_um * 0.9
            snaps: list[float] = []
            x, y = where[1]
            for i in range(n):
                t0 = time.perf_counter()
                c.setXYPosition(x + (i % 2) * step, y)  # every move is one field
                c.waitForDevice(c.getXYStageDevice())
                c.snapImage()
                c.getImage()
                snaps.append((time.perf_counter() - t0) * 1000)
            from scope_stream.acquire.devices import move_time_s

            hw = move_time_s(step, cfg.stage_speed_um_per_s, cfg.stage_accel_um_per_s2) * 1000
            hw += cfg.stage_settle_ms + cfg.exposure_ms
            show(f"core: move one field ({step:.0f} µm) + snap, realtime={cfg.realtime}", snaps)
            typer.echo(f"  of which modelled hardware time (move + settle + exposure): {hw:.1f} ms")
        finally:
            close_core(c)


@microscope_app.command("make-sample")
def make_sample(
    data_dir: Annotated[Path, typer.Option("--data-dir", help="Full data folder with pbc/ and bccd/.")],
    out: Annotated[Path | None, typer.Option("--out", help="Target folder (default: the packaged sample).")] = None,
    per_class: Annotated[int, typer.Option("--per-class", help="PBC crops per class.")] = 8,
    bccd_fields: Annotated[int, typer.Option("--bccd-fields", help="BCCD fields.")] = 3,
) -> None:
    """Regenerate the packaged sample (PBC val crops + BCCD fields + attribution) from a data folder."""
    from scope_stream.acquire.sample import SAMPLE_DIR, build_sample

    try:
        summary = build_sample(data_dir, out or SAMPLE_DIR, per_class=per_class, bccd_fields=bccd_fields)
    except (ValueError, OSError) as exc:
        raise fail(str(exc)) from exc
    typer.echo(
        f"wrote {summary['out']}: {summary['pbc_images']} PBC crops, "
        f"BCCD {summary['bccd_fields']}, {summary['bytes']} bytes"
    )
