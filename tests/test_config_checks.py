"""`scope-stream config check` / `config show --comments`: mistakes a microscopist makes are errors that name
the file, the field and the values; every setting can be shown with its unit, allowed values and meaning."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from scope_stream.cli import app
from scope_stream.config import ConfigError, ScopeStreamConfig, load_config, load_scope_config

REPO = Path(__file__).resolve().parent.parent


def _write(tmp_path: Path, text: str, name: str = "c.yaml") -> Path:
    p = tmp_path / name
    p.write_text(text, encoding="utf-8")
    return p


def _check(*files: Path) -> tuple[int, str]:
    res = CliRunner().invoke(app, ["config", "check", *map(str, files)])
    return res.exit_code, res.output


@pytest.mark.parametrize("text", ["", "\n", "# only a comment\n"])
def test_check_refuses_an_empty_file_and_names_it(tmp_path: Path, text: str) -> None:
    p = _write(tmp_path, text, "empty.yaml")
    code, out = _check(p)
    assert code == 1, out
    assert str(p) in out and "empty" in out and "ok" not in out.split("\n")[0]


def test_reversed_region_names_the_field_and_values_not_the_section(tmp_path: Path) -> None:
    p = _write(tmp_path, "scan:\n  x0_um: 1000\n  x1_um: 0\n  objective: 20x\n")
    with pytest.raises(ConfigError) as err:
        load_config(p)
    msg = str(err.value)
    assert str(p) in msg and "scan.x1_um:" in msg
    assert "x0_um=1000.0" in msg and "x1_um=0.0" in msg
    assert "'backend'" not in msg and "{" not in msg  # not the whole scan section dumped
    code, out = _check(p)
    assert code == 1 and "scan.x1_um:" in out


def test_both_axes_reversed_are_both_reported(tmp_path: Path) -> None:
    p = _write(tmp_path, "scan:\n  x0_um: 10\n  x1_um: 5\n  y0_um: 7\n  y1_um: 7\n")
    with pytest.raises(ConfigError) as err:
        load_config(p)
    assert "x1_um > x0_um" in str(err.value) and "y1_um > y0_um" in str(err.value)


def test_unknown_scan_objective_is_an_error_in_check(tmp_path: Path) -> None:
    p = _write(tmp_path, "scan:\n  objective: 40x\n")
    code, out = _check(p)
    assert code == 1
    assert str(p) in out and "scan.objective" in out and "'40x'" in out and "20x" in out and "50x" in out


def test_objectives_the_microscope_has_pass(tmp_path: Path) -> None:
    text = (
        "microscope:\n  objectives:\n    - {name: 40x, magnification: 40, pixel_size_um: 0.25}\n"
        "scan:\n  objective: 40x\n  reimage_objective: 40x\n"
    )
    code, out = _check(_write(tmp_path, text))
    assert code == 0, out


def test_reimage_objective_checked_only_when_adaptive(tmp_path: Path) -> None:
    code, out = _check(_write(tmp_path, "scan:\n  reimage_objective: 100x\n"))
    assert code == 1 and "scan.reimage_objective" in out
    code, out = _check(_write(tmp_path, "scan:\n  reimage_objective: 100x\n  adaptive: false\n"))
    assert code == 0, out


def test_replay_images_nothing_so_objectives_are_not_checked(tmp_path: Path) -> None:
    code, out = _check(_write(tmp_path, "scan:\n  backend: replay\n  objective: 40x\n"))
    assert code == 0, out


@pytest.mark.parametrize("name", ["demo.yaml", "scanner.yaml", "pymmcore-plus.yaml", "pycromanager.yaml"])
def test_shipped_configs_pass_check(name: str) -> None:
    code, out = _check(REPO / "configs" / name)
    assert code == 0, out


def test_show_comments_explains_every_setting_and_loads_back(tmp_path: Path) -> None:
    res = CliRunner().invoke(app, ["config", "show", "--comments"])
    assert res.exit_code == 0, res.output
    lines = res.output.splitlines()
    x0 = next(line for line in lines if line.strip().startswith("x0_um:"))
    assert "µm" in x0 and "left edge" in x0
    backend = next(line for line in lines if line.strip().startswith("backend:"))
    assert "virtual | pymmcore-plus | pycromanager" in backend
    overlap = next(line for line in lines if line.strip().startswith("overlap:"))
    assert "0.0 <= x < 0.9" in overlap
    heartbeat = next(line for line in lines if line.strip().startswith("heartbeat_ms:"))
    assert "# ms" in heartbeat
    # a comment from the source (not a Field description) is used too
    assert any("area share covered by red cells" in line for line in lines)
    p = _write(tmp_path, res.output, "shown.yaml")
    assert load_scope_config(p) == ScopeStreamConfig()


def test_show_comments_of_a_file_keeps_its_values(tmp_path: Path) -> None:
    res = CliRunner().invoke(app, ["config", "show", "--comments", str(REPO / "configs" / "demo.yaml")])
    assert res.exit_code == 0, res.output
    shown = ScopeStreamConfig.model_validate(yaml.safe_load(res.output))
    assert shown == load_scope_config(REPO / "configs" / "demo.yaml")


def test_scanner_config_has_the_documented_ports_and_fits_two_cores() -> None:
    cfg = load_scope_config(REPO / "configs" / "scanner.yaml")
    assert cfg.pipeline.base_port == 5555  # frontend 5555 ... events 5558: examples/scanner_client.py, docs
    assert 1 <= cfg.pipeline.n_workers <= 2
    example = (REPO / "examples" / "scanner_client.py").read_text(encoding="utf-8")
    assert "tcp://127.0.0.1:5555" in example and "tcp://127.0.0.1:5558" in example


def test_n_workers_auto_is_one_per_core(tmp_path: Path) -> None:
    import os

    cfg = load_scope_config(_write(tmp_path, "pipeline:\n  n_workers: auto\n"))
    assert cfg.pipeline.n_workers == max(1, min(256, os.cpu_count() or 1))
