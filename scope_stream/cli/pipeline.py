"""``scope-stream run``, ``worker``, ``sink``, ``events`` and ``keys``: the streaming pipeline from the shell."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

if TYPE_CHECKING:
    from scope_stream.config import ScopeStreamConfig

from .app import app, child_log_level, fail, restored_signal_handlers

keys_app = typer.Typer(help="CurveZMQ keys for pipelines that listen beyond loopback.", no_args_is_help=True)
app.add_typer(keys_app, name="keys")


def _load(config: Path | None) -> ScopeStreamConfig:
    from scope_stream.config import ConfigError, load_scope_config

    try:
        return load_scope_config(config)
    except ConfigError as exc:
        raise fail(str(exc)) from exc


@app.command()
def run(
    config: Annotated[Path | None, typer.Option("--config", "-c", help="scope-stream YAML configuration.")] = None,
    workers: Annotated[
        int | None, typer.Option("--workers", "-w", help="Local workers (default: pipeline.n_workers).")
    ] = None,
    store: Annotated[
        Path | None, typer.Option(help="One store for everything (default: <store.root>/<slide>.zarr).")
    ] = None,
    analyzer: Annotated[str | None, typer.Option(help="Analyzer import spec 'package.module:factory'.")] = None,
    host: Annotated[
        str | None, typer.Option(help="Bind address (default pipeline.host; beyond loopback needs keys).")
    ] = None,
    port: Annotated[
        int | None, typer.Option(help="Base port: frontend=P, backend=P+1, sink=P+2, events=P+3, control=P+4.")
    ] = None,
    keys: Annotated[Path | None, typer.Option(help="CurveZMQ key folder (scope-stream keys generate).")] = None,
) -> None:
    """Start broker, workers and sink on this machine and serve until Ctrl-C / SIGTERM, then drain."""
    import signal
    import threading
    import time

    from rich.console import Console

    from scope_stream.transport.pipeline import LocalPipeline, PipelineError
    from scope_stream.transport.security import SecurityError, check_bind_allowed

    cfg = _load(config)
    if host is not None:
        cfg.pipeline.host = host
    if port is not None:
        cfg.pipeline.base_port = port
    if keys is not None:
        cfg.pipeline.curve_keys_dir = keys
    try:
        check_bind_allowed(cfg.pipeline.host, cfg.pipeline.curve_keys_dir)
    except SecurityError as exc:
        raise fail(str(exc)) from exc
    console = Console(stderr=True)
    stop = threading.Event()

    def on_signal(*_: object) -> None:
        if stop.is_set():
            raise SystemExit(130)
        stop.set()

    with restored_signal_handlers():  # an in-process run (tests) must not leave these installed
        signal.signal(signal.SIGINT, on_signal)
        if hasattr(signal, "SIGTERM"):
            signal.signal(signal.SIGTERM, on_signal)
        level = child_log_level()
        pipe = LocalPipeline(cfg, store_path=store, analyzer_spec=analyzer, n_workers=workers, log_level=level)
        try:
            pipe.start()
        except PipelineError as exc:
            raise fail(str(exc)) from exc
        assert pipe.endpoints is not None
        for name, ep in pipe.endpoints.to_dict().items():
            console.print(f"[bold]{name:>9}[/] {ep}")
        console.print("serving; Ctrl-C or SIGTERM drains and stops")
        try:
            last = 0.0
            while not stop.is_set():
                time.sleep(0.2)
                pipe.restart_dead_workers()
                if time.monotonic() - last > 5:
                    last = time.monotonic()
                    s = pipe.stats()
                    console.print(
                        f"queue {s['queue_depth']}  in flight {s['in_flight']}  stored {s['stored']}  "
                        f"workers {len(s['workers'])}  rejected {s['rejected_total']}  "
                        f"{s['rate_tiles_per_s']:.1f} tiles/s",
                        highlight=False,
                    )
            console.print("draining...")
            summaries = pipe.drain(timeout=600)
            for slide, summary in summaries.items():
                console.print(f"slide {slide}: {summary.get('n_tiles', 0)} tiles, {summary.get('n_cells', 0)} cells")
        finally:
            pipe.stop(drain=True)


@app.command()
def worker(
    connect: Annotated[str, typer.Option(help="The broker's backend endpoint, e.g. tcp://10.0.0.5:5556.")],
    config: Annotated[Path | None, typer.Option("--config", "-c", help="scope-stream YAML configuration.")] = None,
    analyzer: Annotated[str | None, typer.Option(help="Analyzer import spec 'package.module:factory'.")] = None,
    device: Annotated[str | None, typer.Option(help="cpu, cuda, cuda:N or auto (default pipeline.device).")] = None,
    name: Annotated[str | None, typer.Option(help="Worker name in logs and stats.")] = None,
    keys: Annotated[Path | None, typer.Option(help="CurveZMQ key folder with server.key and a client pair.")] = None,
    client: Annotated[str, typer.Option(help="Which client key pair in --keys to use.")] = "client",
) -> None:
    """Join a running pipeline as a worker (from this or another machine); Ctrl-C drains and leaves."""
    from scope_stream.transport.security import SecurityError, is_loopback
    from scope_stream.transport.worker import run_worker

    cfg = _load(config)
    if keys is not None:
        cfg.pipeline.curve_keys_dir = keys
    if not is_loopback(connect) and cfg.pipeline.curve_keys_dir is None:
        raise fail(f"{connect} is not loopback: pass --keys (CurveZMQ) to join it; see docs/scaling.md")
    try:
        with restored_signal_handlers():  # run_worker installs SIGINT / SIGTERM handlers of its own
            code = run_worker(connect, cfg, analyzer_spec=analyzer, device=device, name=name, keys_client=client)
    except (SecurityError, ValueError, RuntimeError) as exc:
        raise fail(str(exc)) from exc
    raise typer.Exit(code)


@app.command()
def sink(
    connect: Annotated[str, typer.Option(help="The broker's sink endpoint, e.g. tcp://10.0.0.5:5557.")],
    config: Annotated[Path | None, typer.Option("--config", "-c", help="scope-stream YAML configuration.")] = None,
    store: Annotated[
        Path | None, typer.Option(help="One store for everything (default: <store.root>/<slide>.zarr).")
    ] = None,
    keys: Annotated[
        Path | None, typer.Option(help="CurveZMQ key folder with server.key and the client pair 'client'.")
    ] = None,
) -> None:
    """Run the sink on its own: store what a running broker analysed (one sink per broker; a new one takes over).

    Ctrl-C or SIGTERM stops it after the tiles in hand are committed; tiles it had not confirmed are stored by
    the next sink (the broker keeps every tile until a sink confirms it).
    """
    import signal
    import threading

    from scope_stream.transport.security import SecurityError, is_loopback
    from scope_stream.transport.sink import run_sink

    cfg = _load(config)
    if keys is not None:
        cfg.pipeline.curve_keys_dir = keys
    if not is_loopback(connect) and cfg.pipeline.curve_keys_dir is None:
        raise fail(f"{connect} is not loopback: pass --keys (CurveZMQ) to join it; see docs/scaling.md")
    stop = threading.Event()

    def on_signal(*_: object) -> None:
        if stop.is_set():  # a second Ctrl-C: leave now (unconfirmed tiles go to the next sink)
            raise SystemExit(130)
        stop.set()

    where = store if store is not None else f"{cfg.store.root}/<slide>.zarr"
    typer.echo(f"sink: {connect} -> {where}; Ctrl-C or SIGTERM stops", err=True)
    try:
        with restored_signal_handlers():  # an in-process run (tests) must not leave these installed
            signal.signal(signal.SIGINT, on_signal)
            if hasattr(signal, "SIGTERM"):
                signal.signal(signal.SIGTERM, on_signal)
            code = run_sink(connect, cfg, store_path=store, stop=stop)
    except (SecurityError, ValueError, RuntimeError) as exc:
        raise fail(str(exc)) from exc
    typer.echo("sink: stopped", err=True)
    raise typer.Exit(code)


@app.command()
def events(
    connect: Annotated[str, typer.Option(help="The broker's events endpoint (PUB).")],
    topic: Annotated[list[str] | None, typer.Option(help="Topic prefix to follow (repeatable; default all).")] = None,
    keys: Annotated[Path | None, typer.Option(help="CurveZMQ key folder.")] = None,
    count: Annotated[int, typer.Option(help="Stop after this many events (0: never).")] = 0,
) -> None:
    """Print pipeline events as JSON lines (topic + payload)."""
    import json

    from scope_stream.transport.events import EventSubscriber

    n = 0
    with EventSubscriber(connect, topic or None, keys_dir=keys) as sub:
        for t, payload in sub:
            typer.echo(json.dumps({"topic": t, **payload}))
            n += 1
            if count and n >= count:
                break


@keys_app.command("generate")
def keys_generate(
    directory: Annotated[Path, typer.Argument(help="Folder for the keys (created).")],
    overwrite: Annotated[bool, typer.Option(help="Replace existing keys.")] = False,
) -> None:
    """Create broker and client CurveZMQ key pairs (server.key, client.key, authorized/)."""
    from scope_stream.transport.security import SecurityError, generate_keys

    try:
        paths = generate_keys(directory, overwrite=overwrite)
    except SecurityError as exc:
        raise fail(str(exc)) from exc
    for k, p in paths.items():
        typer.echo(f"{k:>14}: {p}")
    typer.echo(
        "copy server.key, client.key and client.key_secret to worker/source machines; keep server.key_secret here"
    )


@keys_app.command("add-client")
def keys_add_client(
    directory: Annotated[Path, typer.Argument(help="Key folder made by `keys generate`.")],
    name: Annotated[str, typer.Argument(help="Client name (an identifier).")],
) -> None:
    """Create another authorised client key pair NAME.key / NAME.key_secret."""
    from scope_stream.transport.security import SecurityError, add_client

    try:
        paths = add_client(directory, name)
    except SecurityError as exc:
        raise fail(str(exc)) from exc
    for k, p in paths.items():
        typer.echo(f"{k:>14}: {p}")
