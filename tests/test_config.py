"""Configuration files: every shipped YAML loads, and every kind of mistake names the file and field."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from scope_stream.cli import app
from scope_stream.config import (
    ConfigError,
    ScopeStreamConfig,
    TrainConfig,
    load_config,
    load_scope_config,
    load_train_config,
)

CONFIGS = sorted((Path(__file__).resolve().parent.parent / "configs").glob("*.yaml"))


def test_there_are_shipped_configs() -> None:
    names = {p.name for p in CONFIGS}
    assert {"demo.yaml", "pycromanager.yaml", "pymmcore-plus.yaml", "scanner.yaml"} <= names


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_configs_load(path: Path) -> None:
    cfg = load_config(path)
    assert isinstance(cfg, ScopeStreamConfig | TrainConfig)


def _write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "bad.yaml"
    p.write_text(text)
    return p


def test_bad_yaml_names_file_and_line(tmp_path: Path) -> None:
    p = _write(tmp_path, "scan:\n  x0_um: [1, 2\n")
    with pytest.raises(ConfigError) as err:
        load_config(p)
    assert str(p) in str(err.value) and "not valid YAML" in str(err.value) and "line" in str(err.value)


def test_unknown_key_names_field_path_and_file(tmp_path: Path) -> None:
    p = _write(tmp_path, "scan:\n  overlapp: 0.2\n")
    with pytest.raises(ConfigError) as err:
        load_config(p)
    assert str(p) in str(err.value)
    assert "scan.overlapp: unknown key" in str(err.value)


def test_wrong_type_names_field_path_and_file(tmp_path: Path) -> None:
    p = _write(
        tmp_path,
        "pipeline:\n  n_workers: many\nmicroscope:\n  objectives:\n    - name: 20x\n"
        "      magnification: 20\n      pixel_size_um: -1\n",
    )
    with pytest.raises(ConfigError) as err:
        load_config(p)
    msg = str(err.value)
    assert str(p) in msg and "pipeline.n_workers" in msg and "'many'" in msg
    assert "microscope.objectives.0.pixel_size_um" in msg


def test_cross_field_rule_is_reported(tmp_path: Path) -> None:
    p = _write(tmp_path, "scan:\n  x0_um: 10\n  x1_um: 5\n")
    with pytest.raises(ConfigError, match="x1_um > x0_um"):
        load_config(p)


def test_kind_dispatch(tmp_path: Path) -> None:
    train = _write(tmp_path, "kind: train\nsteps: 5\n")
    assert isinstance(load_config(train), TrainConfig)
    assert load_train_config(train).steps == 5
    with pytest.raises(ConfigError, match="expected a scope-stream"):
        load_scope_config(train)
    weird = tmp_path / "weird.yaml"
    weird.write_text("kind: banana\n")
    with pytest.raises(ConfigError, match="kind"):
        load_config(weird)


def test_missing_file_and_non_mapping(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="file not found"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(_write(tmp_path, "- 1\n- 2\n"))


def test_empty_file_gives_defaults(tmp_path: Path) -> None:
    assert load_scope_config(_write(tmp_path, "")) == ScopeStreamConfig()


def test_cli_config_check(tmp_path: Path) -> None:
    runner = CliRunner()
    ok = runner.invoke(app, ["config", "check", str(CONFIGS[0])])
    assert ok.exit_code == 0, ok.output
    bad = _write(tmp_path, "scan:\n  overlapp: 0.2\n")
    res = runner.invoke(app, ["config", "check", str(bad)])
    assert res.exit_code == 1
    assert "scan.overlapp: unknown key" in res.output


def test_cli_help_and_version() -> None:
    runner = CliRunner()
    res = runner.invoke(app, ["--help"])
    assert res.exit_code == 0 and "config" in res.output
    res = runner.invoke(app, ["--version"])
    assert res.exit_code == 0 and "scope-stream" in res.output
