"""``scope-stream demo``: the main job, end to end."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from .app import app, fail, sigterm_as_interrupt


@app.command()
def demo(
    config: Annotated[
        Path | None, typer.Option("--config", "-c", help="A scope-stream YAML; default: the embedded demo.")
    ] = None,
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for the store and the report.")] = Path("scans/demo"),
    no_viewer: Annotated[bool, typer.Option("--no-viewer", help="Run headless (no napari).")] = False,
    model: Annotated[Path | None, typer.Option("--model", help="Model directory (default: models/).")] = None,
    workers: Annotated[int | None, typer.Option("--workers", help="Analysis worker processes.")] = None,
    seed: Annotated[int | None, typer.Option("--seed", help="Virtual slide seed.")] = None,
    procedure: Annotated[
        str | None, typer.Option("--procedure", help="Classifier procedure: fast | reference.")
    ] = None,
) -> None:
    """Scan a virtual slide of real cells live, classify every white cell, flag abnormal ones, re-image
    them, and write the store plus report.json / report.html."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from scope_stream.config import ConfigError, load_scope_config
    from scope_stream.demo.run import DemoProgress, default_demo_config, run_demo
    from scope_stream.demo.summary import summary_table

    console = Console()
    try:
        cfg = load_scope_config(config) if config else default_demo_config()
    except ConfigError as exc:
        raise fail(str(exc)) from exc
    updates: dict[str, object] = {}
    if model is not None:
        if not model.is_dir():
            raise fail(f"--model {model}: no such model directory")
        updates["classifier"] = cfg.classifier.model_copy(update={"model": model})
    if procedure is not None:
        if procedure not in ("fast", "reference"):
            raise fail(f"--procedure must be 'fast' or 'reference', got {procedure!r}")
        updates["classifier"] = (updates.get("classifier") or cfg.classifier).model_copy(  # type: ignore[attr-defined]
            update={"procedure": procedure}
        )
    if workers is not None:
        updates["pipeline"] = cfg.pipeline.model_copy(update={"n_workers": workers})
    if seed is not None:
        updates["microscope"] = cfg.microscope.model_copy(update={"seed": seed})
    cfg = cfg.model_copy(update=updates)

    console.print(
        f"[bold]scope-stream demo[/]: slide [cyan]{cfg.slide_id}[/] "
        f"({cfg.scan.x1_um - cfg.scan.x0_um:.0f} x {cfg.scan.y1_um - cfg.scan.y0_um:.0f} µm at "
        f"{cfg.scan.objective}), {cfg.pipeline.n_workers} worker(s), output in {out}"
    )
    with Progress(
        TextColumn("[progress.description]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[info]}"),
        TimeElapsedColumn(),
        console=console,
    ) as bar:
        task = bar.add_task("tiles analysed", total=None, info="starting microscope and pipeline...")

        def show(p: DemoProgress, planned: int) -> None:
            bar.update(
                task,
                total=planned,
                completed=min(p.tiles_done, planned),
                info=f"{p.cells} cells, {p.flagged} flagged, {p.reimages_done} re-imaged",
            )

        try:
            with sigterm_as_interrupt():  # `kill` stops the scan and the pipeline like Ctrl-C: no process left
                report = run_demo(cfg, out, viewer=not no_viewer, on_progress=show)
        except KeyboardInterrupt:
            raise fail("interrupted", code=130) from None
    console.print(summary_table(report))
    console.print(f"report: {out / 'report.html'}  ·  {out / 'report.json'}")
