"""``scope-stream bench``: run the benchmarks in ``benchmarks/`` and write their JSON into one file."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Annotated

import typer

from .app import app, fail

BENCHMARKS = ("transport", "classifier", "e2e")


def benchmarks_dir() -> Path:
    """``benchmarks/`` of the source checkout this package runs from (or ``$SCOPE_STREAM_BENCHMARKS``)."""
    env = os.environ.get("SCOPE_STREAM_BENCHMARKS")
    return Path(env) if env else Path(__file__).resolve().parents[2] / "benchmarks"


def _last_json(text: str) -> object:
    """The last JSON document a benchmark printed (they print one object, possibly after log lines)."""
    text = text.strip()
    start = text.rfind("\n{")
    candidates = [text[start + 1 :]] if start >= 0 else []
    candidates.append(text[text.find("{") :] if "{" in text else "")
    for cand in candidates:
        try:
            return json.loads(cand)
        except json.JSONDecodeError:
            continue
    raise ValueError("no JSON object in the benchmark's output")


@app.command()
def bench(
    out: Annotated[Path, typer.Option("--out", "-o", help="Where to write the combined JSON.")] = Path("bench.json"),
    only: Annotated[
        list[str] | None, typer.Option("--only", help=f"Run only these benchmarks ({', '.join(BENCHMARKS)}).")
    ] = None,
    quick: Annotated[bool, typer.Option("--quick", help="Smaller runs (for a smoke test).")] = False,
    timeout_s: Annotated[int, typer.Option(help="Time limit per benchmark, seconds.")] = 3600,
) -> None:
    """Run the transport, classifier and end-to-end benchmarks; write one JSON with all their figures."""
    from rich.console import Console

    console = Console(stderr=True)
    folder = benchmarks_dir()
    names = list(only) if only else list(BENCHMARKS)
    unknown = [n for n in names if n not in BENCHMARKS]
    if unknown:
        raise fail(f"unknown benchmark(s) {unknown}; choose from {list(BENCHMARKS)}")
    combined: dict[str, object] = {
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "python": sys.version.split()[0],
        "cpus": os.cpu_count(),
        "results": {},
    }
    results: dict[str, object] = {}
    failed: list[str] = []
    for name in names:
        script = folder / f"{name}.py"
        if not script.is_file():
            raise fail(f"{script} not found: `scope-stream bench` runs from a source checkout of scope-stream")
        cmd = [sys.executable, str(script)] + (["--quick"] if quick else [])
        console.print(f"[bold]bench[/] {name}: {' '.join(cmd)}")
        t0 = time.perf_counter()
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
        except subprocess.TimeoutExpired:
            failed.append(name)
            results[name] = {"error": f"timed out after {timeout_s} s"}
            continue
        elapsed = round(time.perf_counter() - t0, 1)
        if proc.returncode != 0:
            failed.append(name)
            results[name] = {"error": proc.stderr.strip()[-2000:], "returncode": proc.returncode}
            console.print(f"[red]{name} failed[/] ({proc.returncode}); stderr tail:\n{proc.stderr[-1000:]}")
            continue
        try:
            results[name] = _last_json(proc.stdout)
        except ValueError as exc:
            failed.append(name)
            results[name] = {"error": str(exc)}
            continue
        console.print(f"  done in {elapsed} s")
    combined["results"] = results
    out.write_text(json.dumps(combined, indent=2))
    console.print(f"wrote {out}")
    if failed:
        raise fail(f"benchmark(s) failed: {', '.join(failed)}", code=1)
