"""``scope-stream config check FILE`` and ``config show``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from .app import config_app, fail


@config_app.command("check")
def check(files: Annotated[list[Path], typer.Argument(help="YAML files to validate.")]) -> None:
    """Validate configuration files; each problem names the file and the field path. Besides each value,
    the sections are checked together (the scan's objectives must be the microscope's)."""
    from scope_stream.config import ConfigError, ScopeStreamConfig, load_config, load_yaml
    from scope_stream.config.describe import consistency_problems
    from scope_stream.config.loader import EMPTY_FILE

    bad = 0
    for f in files:
        try:
            if not load_yaml(f):  # loads as all defaults, but a file checked empty is a mistake (wrong file?)
                raise ConfigError(f, [EMPTY_FILE])
            cfg = load_config(f)
            if isinstance(cfg, ScopeStreamConfig) and (problems := consistency_problems(cfg)):
                raise ConfigError(f, problems)
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
    comments: Annotated[
        bool, typer.Option("--comments", help="Explain each setting: unit, allowed values, description.")
    ] = False,
) -> None:
    """Print a configuration with every default filled in, as YAML (it loads back as the same settings)."""
    import yaml

    from scope_stream.config import ConfigError, ScopeStreamConfig, load_config

    try:
        cfg = load_config(file) if file else ScopeStreamConfig()
    except ConfigError as exc:
        raise fail(str(exc)) from exc
    if comments:
        from scope_stream.config.describe import commented_yaml

        typer.echo(commented_yaml(cfg))
        return
    typer.echo(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
