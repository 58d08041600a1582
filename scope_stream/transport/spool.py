"""Disk overflow for the broker: tiles beyond the memory queue wait here, first in first out.

One file per tile (``<12-digit counter>.tile``): an 8-byte little-endian header length, the JSON
header, then the raw pixels. Files are written to a temporary name and renamed, so a crash never
leaves half a tile under a real name; files found at start-up (a broker that died with tiles
spooled) are taken up again in order.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import struct
import tempfile
import weakref
from collections import deque
from pathlib import Path
from typing import Any

__all__ = ["Spool", "SpoolFull"]

log = logging.getLogger(__name__)

_LEN = struct.Struct("<Q")


class SpoolFull(RuntimeError):
    """The spool would exceed its byte budget."""


class Spool:
    """A bounded FIFO of (header, payload) on disk."""

    def __init__(self, directory: Path | str | None, max_bytes: int) -> None:
        self.max_bytes = int(max_bytes)
        self._own_dir = directory is None
        self.dir = Path(tempfile.mkdtemp(prefix="scope-stream-spool-")) if directory is None else Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        if self._own_dir:  # removed on close(), and at the latest when the interpreter exits
            weakref.finalize(self, shutil.rmtree, str(self.dir), True)
        self._files: deque[tuple[Path, int]] = deque()
        self.nbytes = 0
        self._counter = 0
        for f in sorted(self.dir.glob("*.tile")):
            size = f.stat().st_size
            self._files.append((f, size))
            self.nbytes += size
            self._counter = max(self._counter, int(f.stem) + 1) if f.stem.isdigit() else self._counter
        for f in self.dir.glob("*.partial"):
            f.unlink(missing_ok=True)
        if self._files:
            log.warning("spool %s: taking up %d tiles left by an earlier broker", self.dir, len(self._files))

    def __len__(self) -> int:
        return len(self._files)

    def can_take(self, nbytes: int) -> bool:
        return self.max_bytes > 0 and self.nbytes + nbytes + 4096 <= self.max_bytes

    def push(self, header: dict[str, Any], payload: memoryview | bytes) -> None:
        """Append one entry; raises :class:`SpoolFull` beyond the budget."""
        hbytes = json.dumps(header, separators=(",", ":")).encode()
        size = _LEN.size + len(hbytes) + memoryview(payload).nbytes
        if not self.can_take(size):
            raise SpoolFull(f"spool {self.dir} holds {self.nbytes} of {self.max_bytes} bytes")
        name = self.dir / f"{self._counter:012d}.tile"
        self._counter += 1
        tmp = name.with_suffix(".partial")
        with open(tmp, "wb") as fh:
            fh.write(_LEN.pack(len(hbytes)))
            fh.write(hbytes)
            fh.write(payload)
        os.replace(tmp, name)
        self._files.append((name, size))
        self.nbytes += size

    def headers(self) -> list[dict[str, Any]]:
        """The headers of every spooled entry, oldest first (reads only the headers)."""
        out = []
        for path, _ in self._files:
            with open(path, "rb") as fh:
                (hlen,) = _LEN.unpack(fh.read(_LEN.size))
                out.append(json.loads(fh.read(hlen)))
        return out

    def pop(self) -> tuple[dict[str, Any], memoryview]:
        """Remove and return the oldest entry (header, payload)."""
        path, size = self._files.popleft()
        self.nbytes -= size
        try:
            data = path.read_bytes()
        finally:
            path.unlink(missing_ok=True)
        (hlen,) = _LEN.unpack_from(data, 0)
        header = json.loads(data[_LEN.size : _LEN.size + hlen])
        return header, memoryview(data)[_LEN.size + hlen :]

    def close(self) -> None:
        """Remove a temporary spool folder, whatever it holds (nobody could take it up: its name is random);
        a configured folder keeps what is still spooled for the next broker."""
        if self._own_dir:
            if self._files:
                log.warning(
                    "spool %s: dropping %d tiles (%d bytes) not yet dispatched with the temporary folder",
                    self.dir,
                    len(self._files),
                    self.nbytes,
                )
            shutil.rmtree(self.dir, ignore_errors=True)
            self._files.clear()
            self.nbytes = 0
        elif self._files:
            log.warning(
                "spool %s keeps %d tiles (%d bytes) not yet dispatched", self.dir, len(self._files), self.nbytes
            )
