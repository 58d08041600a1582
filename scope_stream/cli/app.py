"""The typer application object shared by every command module.

Command modules import only light things at top level (typer, pathlib): torch, diffusers,
napari and Qt load inside the command that needs them, so ``scope-stream --help`` stays fast.
"""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from typing import Annotated, Any

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


#: The logger whose records ``-v`` turns up; every other logger (zarr, numcodecs, asyncio, napari,
#: pymmcore-plus...) is a library and stays at WARNING unless ``-vv``.
PACKAGE_LOGGER = "scope_stream"
_levels: list[int] = [logging.WARNING, logging.WARNING]  # as configured last: (scope-stream, libraries)
SIGNALS = tuple(getattr(signal, name) for name in ("SIGINT", "SIGTERM") if hasattr(signal, name))


def log_levels(verbose: int) -> tuple[int, int]:
    """(scope-stream's level, the libraries' level) for ``-v`` repeated ``verbose`` times.

    0: WARNING / WARNING; -v: INFO / WARNING; -vv: DEBUG / INFO; -vvv: DEBUG / DEBUG.
    """
    package = logging.WARNING if verbose <= 0 else logging.INFO if verbose == 1 else logging.DEBUG
    libraries = logging.WARNING if verbose <= 1 else logging.INFO if verbose == 2 else logging.DEBUG
    return package, libraries


class _LevelFilter(logging.Filter):
    """Passes scope-stream's records from one level and everybody else's from another. A filter on the
    handler, not the root logger's level: importing pymmcore-plus sets the root logger to DEBUG."""

    def __init__(self, package_level: int, library_level: int) -> None:
        super().__init__()
        self.package_level = package_level
        self.library_level = library_level

    def filter(self, record: logging.LogRecord) -> bool:
        name = record.name
        own = name == PACKAGE_LOGGER or name.startswith(PACKAGE_LOGGER + ".")
        return record.levelno >= (self.package_level if own else self.library_level)


def configure_logging(verbose: int) -> None:
    """Log to stderr through rich: scope-stream's loggers at the ``-v`` level, libraries at WARNING
    (``-vv``: INFO, ``-vvv``: DEBUG). Calling it again (in-process CLI runs) replaces its own handler
    and leaves handlers installed by others (pytest's log capture) alone."""
    from rich.logging import RichHandler

    package, libraries = log_levels(verbose)
    _levels[:] = [package, libraries]
    root = logging.getLogger()
    for h in list(root.handlers):
        if getattr(h, "_scope_stream_cli", False):
            root.removeHandler(h)
    handler = RichHandler(show_path=False)
    handler.setFormatter(logging.Formatter("%(name)s: %(message)s"))
    handler.addFilter(_LevelFilter(package, libraries))
    handler._scope_stream_cli = True  # type: ignore[attr-defined]
    root.addHandler(handler)
    root.setLevel(min(package, libraries))
    logging.getLogger(PACKAGE_LOGGER).setLevel(package)


def quiet_libraries() -> None:
    """Put the root logger back to the configured level after an import that changed it (pymmcore-plus
    sets it to DEBUG when imported), so libraries do not even build the records the handler drops."""
    root = logging.getLogger()
    if any(getattr(h, "_scope_stream_cli", False) for h in root.handlers):
        root.setLevel(min(_levels))


def child_log_level() -> int:
    """The level for pipeline processes started by a command (broker, workers, sink): scope-stream's."""
    return logging.getLogger(PACKAGE_LOGGER).getEffectiveLevel()


@contextmanager
def restored_signal_handlers() -> Iterator[None]:
    """Put SIGINT / SIGTERM handlers back as they were when the block is left, whatever the block (or a
    library it calls) installed: a command run in-process (tests, a notebook) must not leave its handlers
    behind. A no-op off the main thread."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    saved = {sig: signal.getsignal(sig) for sig in SIGNALS}
    try:
        yield
    finally:
        for sig, handler in saved.items():
            if handler is not None:  # None: installed outside Python; cannot be put back
                signal.signal(sig, handler)


def _hide_flag_metavars() -> None:
    """Flags (``--json``, ``--no-viewer``, ``--help``, ``-v``) take no value, but typer's rich help shows
    them a ``<bool>`` / ``<int>`` type column; show none for them."""
    try:
        from typer.core import TyperOption
    except ImportError:  # pragma: no cover - other typer layouts
        return
    original = getattr(TyperOption, "display_type_rich", None)
    if original is None or getattr(original, "_scope_stream", False):
        return

    def display_type_rich(self: TyperOption, ctx: Any) -> str | None:
        if getattr(self, "is_flag", False) or getattr(self, "count", False):
            return None
        return original(self, ctx)

    display_type_rich._scope_stream = True  # type: ignore[attr-defined]
    TyperOption.display_type_rich = display_type_rich  # type: ignore[method-assign]


_hide_flag_metavars()


@app.callback()
def _root(
    ctx: typer.Context,
    verbose: Annotated[
        int,
        typer.Option(
            "--verbose",
            "-v",
            count=True,
            help="More logging: -v scope-stream info, -vv scope-stream debug + library info, -vvv all debug.",
        ),
    ] = 0,
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    """scope-stream: Micro-Manager -> ZeroMQ -> segment -> diffusion classifier -> OME-Zarr -> napari."""
    configure_logging(verbose)
    # Whatever a command installs for SIGINT / SIGTERM is undone when it returns (see restored_signal_handlers).
    stack = ExitStack()
    stack.enter_context(restored_signal_handlers())
    ctx.call_on_close(stack.close)


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
