"""``scope-stream config check FILE`` and ``config show``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from .app import config_app, fail


@config_app.command("check")
def check(files: Annotated[list[Path], typer.Argument(help="YAML files to validate.")]) -> None:
    """Validate configuration files; each problem names the file and the field path."""
    from scope_stream.config import ConfigError, load_config

    bad = 0
    for f in files:
        try:
            cfg = load_config(f)
        except ConfigError as exc:
            bad += 1
            typer.echo(str(exc), err=True)
            continue
        typer.echo(f"{f}: ok ({cfg.kind})")
    if bad:
        raise fail(f"{bad} of {len(files)} configuration file(s) invalid", code=1)


@config_app.command("show")
def show(
    file: Annotated[Path | None, typer.Argument(help="YAML file; omit for the defaults.")] = None,
) -> None:
    """Print a configuration with every default filled in, as YAML."""
    import yaml

    from scope_stream.config import ConfigError, ScopeStreamConfig, load_config

    try:
        cfg = load_config(file) if file else ScopeStreamConfig()
    except ConfigError as exc:
        raise fail(str(exc)) from exc
    typer.echo(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
