"""The typer application object shared by every command module.

Command modules import only light things at top level (typer, pathlib): torch, diffusers,
napari and Qt load inside the command that needs them, so ``scope-stream --help`` stays fast.
"""

from __future__ import annotations

import logging
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


def fail(message: str, code: int = 2) -> typer.Exit:
    """Print a clear error in red and return an Exit to raise."""
    from rich.console import Console

    Console(stderr=True).print(f"[bold red]error:[/] {message}", highlight=False)
    return typer.Exit(code)
