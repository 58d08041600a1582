"""``scope-stream scan``, ``replay`` and ``reimage``: acquisitions into the pipeline from the shell."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from .app import app, child_log_level, fail, quiet_libraries

if TYPE_CHECKING:
    from scope_stream.config import ScopeStreamConfig

BACKENDS = ("virtual", "pymmcore-plus", "pycromanager", "pycromanager-java", "replay")


def _load(config: Path | None) -> ScopeStreamConfig:
    from scope_stream.config import ConfigError, load_scope_config

    try:
        return load_scope_config(config)
    except ConfigError as exc:
        raise fail(str(exc)) from exc


def _print_report(report: Any, as_json: bool) -> None:
    from dataclasses import asdict

    if as_json:
        typer.echo(json.dumps(asdict(report), default=str))
        return
    from rich.console import Console

    c = Console()
    s = report.summary or {}
    c.print(
        f"[bold]{report.slide_id}[/] ({report.backend}): {report.n_scan_tiles} survey tiles, "
        f"{report.n_reimage_tiles} re-image tiles in {report.duration_s:.1f} s",
        highlight=False,
    )
    if s:
        c.print(
            f"  cells {s.get('n_cells', 0)}, white cells {s.get('n_wbc', 0)}, flagged {s.get('n_flagged', 0)}; "
            f"differential {s.get('differential', {})}",
            highlight=False,
        )
    for r in report.reimages:
        c.print(
            f"  re-image {r['number']} ({r['origin']}) at ({r['x_um']:.1f}, {r['y_um']:.1f}) µm, {r['objective']}: "
            f"{', '.join(r['tile_ids'])} [{r['state']}]",
            highlight=False,
        )
    skipped = {k: v for k, v in report.skipped_flags.items() if v}
    if skipped:
        c.print(f"  flags not re-imaged: {skipped}", highlight=False)
    if report.errors:
        c.print(f"  [yellow]{report.errors} frames could not be streamed (see the log)[/]")


def _with_pipeline(
    cfg: ScopeStreamConfig,
    connect: str | None,
    events: str | None,
    store: Path | None,
    analyzer: str | None,
    workers: int | None,
    work: Any,
) -> Any:
    """Run ``work(frontend, events_endpoint)`` against ``--connect`` or a local pipeline started here."""
    from scope_stream.callbacks import Callbacks

    if connect is not None:
        if cfg.callbacks.webhooks and not events:
            typer.echo("warning: webhooks need the pipeline's events endpoint (--events); none are sent", err=True)
        with Callbacks(cfg, events, slide_id=cfg.slide_id) if events and cfg.callbacks.webhooks else _Null():
            return work(connect, events)
    from scope_stream.transport.pipeline import LocalPipeline, PipelineError

    store_path = _store_path(cfg, store)
    pipe = LocalPipeline(
        cfg, store_path=store_path, analyzer_spec=analyzer, n_workers=workers, log_level=child_log_level()
    )
    try:
        pipe.start()
    except PipelineError as exc:
        pipe.stop(drain=False, timeout=10)  # whatever did start must not outlive us
        raise fail(f"{exc} (try --analyzer scope_stream.transport.stages:threshold, or see the log above)") from exc
    try:
        assert pipe.endpoints is not None
        cb = Callbacks(cfg, pipe.events_endpoint, slide_id=cfg.slide_id) if cfg.callbacks.webhooks else _Null()
        with cb:
            return work(pipe.endpoints.frontend, pipe.events_endpoint)
    finally:
        pipe.stop(drain=True)


def _store_path(cfg: ScopeStreamConfig, store: Path | None) -> Path:
    return store or (Path(cfg.store.root) / f"{cfg.slide_id}.zarr")


def _print_store(cfg: ScopeStreamConfig, connect: str | None, store: Path | None, as_json: bool) -> None:
    """The last line of every scan / replay: where its store is (stderr when stdout carries JSON)."""
    if connect is not None:
        line = f"store: written by the pipeline at {connect} (its store.root/{cfg.slide_id}.zarr)"
    else:
        line = f"store: {_store_path(cfg, store)}"
    typer.echo(line, err=as_json)


class _Null:
    def __enter__(self) -> _Null:
        return self

    def __exit__(self, *exc: object) -> None:
        pass


@app.command()
def scan(
    config: Annotated[Path | None, typer.Option("--config", "-c", help="scope-stream YAML configuration.")] = None,
    backend: Annotated[str | None, typer.Option(help=f"One of {', '.join(BACKENDS)} (default: scan.backend).")] = None,
    slide_id: Annotated[str | None, typer.Option(help="Slide id (default: slide_id of the configuration).")] = None,
    connect: Annotated[
        str | None, typer.Option(help="A running pipeline's frontend endpoint (default: start one here).")
    ] = None,
    events: Annotated[
        str | None, typer.Option(help="The running pipeline's events endpoint (adaptive re-imaging needs it).")
    ] = None,
    store: Annotated[Path | None, typer.Option(help="Store path for a local pipeline.")] = None,
    analyzer: Annotated[str | None, typer.Option(help="Analyzer spec for a local pipeline.")] = None,
    workers: Annotated[int | None, typer.Option(help="Workers of a local pipeline.")] = None,
    mm_config: Annotated[
        Path | None, typer.Option(help="pymmcore-plus/pycromanager: a Micro-Manager .cfg for real hardware.")
    ] = None,
    replay: Annotated[Path | None, typer.Option(help="replay: a tiles folder or a <slide>.zarr store.")] = None,
    rate: Annotated[float | None, typer.Option(help="replay: tiles per second (default: as fast as taken).")] = None,
    hold: Annotated[float | None, typer.Option(help="Keep serving re-image requests this many seconds.")] = None,
    no_adaptive: Annotated[bool, typer.Option("--no-adaptive", help="No re-imaging of flagged cells.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the scan report as JSON.")] = False,
) -> None:
    """Scan a slide (survey + adaptive re-imaging) into the pipeline, serving re-image requests meanwhile."""
    from scope_stream.acquire.plan import PlanError
    from scope_stream.acquire.scan import ScanError, ScanSession, backend_from_config

    quiet_libraries()  # importing pymmcore-plus just set the root logger to DEBUG
    cfg = _load(config)
    try:
        if backend is not None:
            if backend not in BACKENDS:
                raise fail(f"--backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
            cfg.scan.backend = backend  # type: ignore[assignment]
        if slide_id is not None:
            cfg.slide_id = slide_id
        if replay is not None:
            cfg.scan.replay_path = replay
        if rate is not None:
            cfg.scan.rate_limit_tiles_per_s = rate
        if hold is not None:
            cfg.scan.hold_open_s = hold
        if no_adaptive:
            cfg.scan.adaptive = False
    except ValueError as exc:
        raise fail(str(exc)) from exc
    core = None
    if mm_config is not None:
        if cfg.scan.backend not in ("pymmcore-plus", "pycromanager"):
            raise fail("--mm-config goes with --backend pymmcore-plus or pycromanager")
        from pymmcore_plus import CMMCorePlus

        core = CMMCorePlus()
        try:
            core.loadSystemConfiguration(str(mm_config))
        except Exception as exc:
            raise fail(f"cannot load Micro-Manager configuration {mm_config}: {exc}") from exc

    try:  # before any pipeline starts: a bad replay path or objective is reported at once
        b = backend_from_config(cfg, core)
    except (ScanError, ValueError, RuntimeError) as exc:
        raise fail(str(exc)) from exc

    def work(frontend: str, events_ep: str | None) -> Any:
        try:
            session = ScanSession(cfg, b, frontend, events_endpoint=events_ep)
        except BaseException:
            b.close()
            raise
        session.start()
        if session.control_endpoint:
            typer.echo(f"control endpoint: {session.control_endpoint}", err=True)
        return session.wait()

    try:
        report = _with_pipeline(cfg, connect, events, store, analyzer, workers, work)
    except (ScanError, PlanError, ValueError, RuntimeError) as exc:
        raise fail(str(exc)) from exc
    _print_report(report, as_json)
    _print_store(cfg, connect, store, as_json)
    if report.errors:
        raise typer.Exit(1)


@app.command()
def replay(
    path: Annotated[Path, typer.Argument(help="A folder with tiles.csv + images, or a <slide>.zarr store.")],
    config: Annotated[Path | None, typer.Option("--config", "-c", help="scope-stream YAML configuration.")] = None,
    slide_id: Annotated[str | None, typer.Option(help="Slide id for the replayed tiles.")] = None,
    rate: Annotated[
        float | None, typer.Option(help="Tiles per second (default: as fast as the pipeline takes).")
    ] = None,
    connect: Annotated[str | None, typer.Option(help="A running pipeline's frontend endpoint.")] = None,
    events: Annotated[str | None, typer.Option(help="The running pipeline's events endpoint.")] = None,
    store: Annotated[Path | None, typer.Option(help="Store path for a local pipeline.")] = None,
    analyzer: Annotated[str | None, typer.Option(help="Analyzer spec for a local pipeline.")] = None,
    workers: Annotated[int | None, typer.Option(help="Workers of a local pipeline.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON.")] = False,
) -> None:
    """Stream tiles from a folder or an earlier scan's store into the pipeline at a chosen rate."""
    from scope_stream.acquire.listen.replay import ReplayError

    cfg = _load(config)
    cfg.scan.backend = "replay"
    cfg.scan.replay_path = path
    cfg.scan.rate_limit_tiles_per_s = rate
    cfg.scan.adaptive = False
    if slide_id is not None:
        cfg.slide_id = slide_id
    elif config is None:
        cfg.slide_id = f"replay-{path.stem}"
    from scope_stream.acquire.scan import ScanError, ScanSession, backend_from_config

    quiet_libraries()  # importing pymmcore-plus just set the root logger to DEBUG
    try:
        b = backend_from_config(cfg)
    except (ReplayError, ScanError, ValueError) as exc:
        raise fail(str(exc)) from exc

    def work(frontend: str, events_ep: str | None) -> Any:
        session = ScanSession(cfg, b, frontend, events_endpoint=events_ep, control=False)
        return session.run()

    try:
        report = _with_pipeline(cfg, connect, events, store, analyzer, workers, work)
    except (ReplayError, ScanError, ValueError, RuntimeError) as exc:
        raise fail(str(exc)) from exc
    _print_report(report, as_json)
    _print_store(cfg, connect, store, as_json)


@app.command()
def reimage(
    x_um: Annotated[float, typer.Argument(help="Stage x of the field centre, µm.")],
    y_um: Annotated[float, typer.Argument(help="Stage y of the field centre, µm.")],
    control: Annotated[str, typer.Option(help="The scan's control endpoint (printed by `scope-stream scan`).")],
    objective: Annotated[str | None, typer.Option(help="Objective (default: scan.reimage_objective).")] = None,
    z: Annotated[list[float] | None, typer.Option(help="Focus offset in µm (repeat for a stack).")] = None,
    reason: Annotated[str, typer.Option(help="Why (stored with the tiles).")] = "",
    keys: Annotated[Path | None, typer.Option(help="CurveZMQ key folder when the scan is not on loopback.")] = None,
    timeout: Annotated[float, typer.Option(help="Seconds to wait for the images.")] = 120.0,
) -> None:
    """Ask a running scan to image (x, y) again; prints the new tile ids."""
    from scope_stream.acquire.control import ControlError, ReimageClient

    with ReimageClient(control, keys_dir=keys, timeout_s=timeout) as client:
        try:
            reply = client.reimage(x_um, y_um, objective=objective, z_offsets_um=z, reason=reason)
        except ControlError as exc:
            raise fail(f"re-image refused ({exc.code}): {exc.detail}") from exc
    typer.echo(json.dumps(reply))
