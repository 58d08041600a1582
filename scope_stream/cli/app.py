"""The typer application object shared by every command module.

Command modules import only light things at top level (typer, pathlib): torch, diffusers,
napari and Qt load inside the command that needs them, so ``scope-stream --help`` stays fast.
"""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Annotated

import typer

from scope_stream import __version__

app = typer.Typer(
    name="scope-stream",
    help="Live detection of abnormal blood cells while a slide is scanned.",
    no_args_is_help=True,
    rich_markup_mode="rich",
    pretty_exceptions_show_locals=False,
)
evaluate_app = typer.Typer(help="Measure detection or classification on labelled data.", no_args_is_help=True)
config_app = typer.Typer(help="Check and inspect configuration files.", no_args_is_help=True)
app.add_typer(evaluate_app, name="evaluate")
app.add_typer(config_app, name="config")


def _version(value: bool) -> None:
    if value:
        typer.echo(f"scope-stream {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    verbose: Annotated[int, typer.Option("--verbose", "-v", count=True, help="More logging (-v info, -vv debug).")] = 0,
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    """scope-stream: Micro-Manager -> ZeroMQ -> segment -> diffusion classifier -> OME-Zarr -> napari."""
    level = logging.WARNING if verbose == 0 else logging.INFO if verbose == 1 else logging.DEBUG
    from rich.logging import RichHandler

    logging.basicConfig(
        level=level, format="%(name)s: %(message)s", handlers=[RichHandler(level=level, show_path=False)]
    )


@contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """Inside the block SIGTERM raises ``KeyboardInterrupt`` (as Ctrl-C does), so ``kill`` unwinds the
    ``with`` blocks that stop child processes; the previous handler is restored afterwards. A no-op off the
    main thread or where the platform has no SIGTERM."""
    if not hasattr(signal, "SIGTERM") or threading.current_thread() is not threading.main_thread():
        yield
        return

    def raise_interrupt(*_: object) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, raise_interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def fail(message: str, code: int = 2) -> typer.Exit:
    """Print a clear error in red and return an Exit to raise."""
    from rich.console import Console

    Console(stderr=True).print(f"[bold red]error:[/] {message}", highlight=False)
    return typer.Exit(code)
