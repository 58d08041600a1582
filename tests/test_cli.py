"""The CLI starts fast: heavy libraries load only inside the commands that need them."""

from __future__ import annotations

import subprocess
import sys

HEAVY = ("torch", "diffusers", "napari", "PyQt5", "qtpy", "zarr", "skimage", "pymmcore_plus", "pycromanager")


def test_cli_import_is_light() -> None:
    code = (
        "import sys, scope_stream.cli, scope_stream.config, scope_stream.vocabulary\n"
        f"heavy = [m for m in {HEAVY!r} if m in sys.modules]\n"
        "print(','.join(heavy))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "", f"heavy modules imported by the CLI at start: {out.stdout.strip()}"


def test_cli_help_runs_as_a_program() -> None:
    out = subprocess.run([sys.executable, "-m", "scope_stream", "--help"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "scope-stream" in out.stdout or "Usage" in out.stdout
