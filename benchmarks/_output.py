"""What every benchmark ends with: its figures as indented JSON on stdout (``scope-stream bench`` reads the
last JSON there) and, with ``--json PATH``, the same in a file."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def emit(report: dict[str, Any], path: Path | None) -> None:
    """Print ``report`` as JSON and, when ``path`` is given, write it there too (folders made as needed)."""
    text = json.dumps(report, indent=2)
    print(text)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text + "\n", encoding="utf-8")
