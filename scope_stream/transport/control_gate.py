"""Per-client reply accounting for control endpoints (the broker's control socket, the scan's ``ControlServer``).

A control endpoint is a ROUTER socket with ``ROUTER_MANDATORY``, a per-client send high-water mark and
non-blocking sends: a client that sends requests and never reads the answers fills *its own* pipe, and
the answers that do not fit are dropped instead of blocking the serving loop (which silenced the endpoint
for every client, issue #21). :class:`ReplyGate` counts those drops per client, logs once per client, and
mutes a client that has had ``mute_after`` answers in a row dropped: its requests are read and discarded
unanswered (cheaply, without parsing) for ``mute_s`` seconds, after which it is served again. Requests
are only ever refused this way to clients that do not read; a client that reads is never muted.

The per-client records are bounded (``max_clients``, least recently seen forgotten first), so a stream of
new identities cannot grow memory.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from dataclasses import dataclass

__all__ = ["ReplyGate"]

log = logging.getLogger(__name__)


@dataclass
class _Client:
    dropped: int = 0  # replies dropped, in all
    in_a_row: int = 0  # replies dropped since the last one delivered
    muted_until: float = 0.0
    warned: bool = False
    ignored: int = 0  # requests discarded while muted


class ReplyGate:
    """Counts undeliverable replies per client; mutes a client whose replies keep being dropped."""

    def __init__(self, where: str, *, mute_after: int = 2000, mute_s: float = 5.0, max_clients: int = 4096) -> None:
        self.where = where
        self.mute_after = mute_after
        self.mute_s = mute_s
        self.max_clients = max_clients
        self.clients: OrderedDict[bytes, _Client] = OrderedDict()
        self.dropped_total = 0
        self.ignored_total = 0
        self.mutes = 0

    def _client(self, ident: bytes) -> _Client:
        c = self.clients.get(ident)
        if c is None:
            c = self.clients[ident] = _Client()
            while len(self.clients) > self.max_clients:
                self.clients.popitem(last=False)
        else:
            self.clients.move_to_end(ident)
        return c

    def delivered(self, ident: bytes) -> None:
        """A reply to ``ident`` went out: it reads again (if it had been dropping)."""
        c = self.clients.get(ident)
        if c is not None:
            c.in_a_row = 0

    def dropped(self, ident: bytes) -> None:
        """A reply to ``ident`` could not be queued (its pipe is full, or it is gone): count it, log once."""
        c = self._client(ident)
        c.dropped += 1
        c.in_a_row += 1
        self.dropped_total += 1
        if not c.warned:
            c.warned = True
            log.warning(
                "%s: client %s does not read its replies (its queue is full or it left): dropping them, "
                "counted in replies_dropped; logged once per client",
                self.where,
                _show(ident),
            )
        if c.in_a_row >= self.mute_after and c.muted_until <= time.monotonic():
            c.muted_until = time.monotonic() + self.mute_s
            c.in_a_row = 0
            self.mutes += 1
            log.warning(
                "%s: client %s had %d replies in a row dropped: its requests are ignored for %.0f s",
                self.where,
                _show(ident),
                self.mute_after,
                self.mute_s,
            )

    def muted(self, ident: bytes) -> bool:
        """True while ``ident``'s requests are to be discarded unanswered (counted as ignored)."""
        c = self.clients.get(ident)
        if c is None or c.muted_until <= 0.0:
            return False
        if c.muted_until > time.monotonic():
            c.ignored += 1
            self.ignored_total += 1
            return True
        c.muted_until = 0.0
        return False

    def stats(self) -> dict[str, int]:
        now = time.monotonic()
        return {
            "replies_dropped": self.dropped_total,
            "requests_ignored": self.ignored_total,
            "clients_dropping": sum(1 for c in self.clients.values() if c.dropped),
            "clients_muted": sum(1 for c in self.clients.values() if c.muted_until > now),
            "mutes": self.mutes,
        }


def _show(ident: bytes) -> str:
    if ident and all(0x21 <= b <= 0x7E for b in ident):
        return ident.decode("ascii")[:64]
    return ident.hex()[:32]
