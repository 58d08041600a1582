"""CurveZMQ for the pipeline: key generation, server (broker) and client (source, worker, sink) setup.

Key folder layout (``scope-stream keys generate DIR``)::

    DIR/server.key            broker public key (copy to every client machine)
    DIR/server.key_secret     broker secret key (stays on the broker machine)
    DIR/client.key            a client public key
    DIR/client.key_secret     its secret key (copy with client.key to client machines)
    DIR/authorized/*.key      public keys the broker accepts (client.key is added)

Loopback and ipc endpoints need no keys; the broker refuses to bind anything else without them.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import zmq

__all__ = [
    "ClientSecurity",
    "SecurityError",
    "ServerSecurity",
    "add_client",
    "check_bind_allowed",
    "generate_keys",
    "is_loopback",
]

log = logging.getLogger(__name__)


class SecurityError(RuntimeError):
    """Keys are missing or unusable, or binding would expose the pipeline without them."""


def is_loopback(host: str) -> bool:
    """Whether ``host`` (an address or name, or a full endpoint) only reaches this machine."""
    if host.startswith("ipc://") or host.startswith("inproc://"):
        return True
    if "://" in host:
        host = host.split("://", 1)[1].rsplit(":", 1)[0]
    host = host.strip("[]")
    if host in ("localhost", "lo"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_bind_allowed(host: str, keys_dir: Path | None) -> None:
    """Raise :class:`SecurityError` when binding ``host`` would expose the pipeline without CurveZMQ keys."""
    if not is_loopback(host) and keys_dir is None:
        raise SecurityError(
            f"refusing to bind {host!r} without CurveZMQ keys: anything beyond loopback must be encrypted and "
            "authenticated. Generate keys with `scope-stream keys generate KEYS_DIR` and set "
            "pipeline.curve_keys_dir (see docs/protocol.md#security-curvezmq), or bind 127.0.0.1."
        )


def _check_curve() -> None:
    if not zmq.has("curve"):
        raise SecurityError("this libzmq has no CURVE support; install a pyzmq wheel (they bundle libsodium)")


def generate_keys(keys_dir: Path | str, overwrite: bool = False) -> dict[str, Path]:
    """Create a server key pair, one client key pair and ``authorized/client.key``; returns the paths."""
    import zmq.auth

    _check_curve()
    d = Path(keys_dir)
    if (d / "server.key_secret").exists() and not overwrite:
        raise SecurityError(f"{d} already holds keys (server.key_secret); pass overwrite to replace them")
    d.mkdir(parents=True, exist_ok=True)
    (d / "authorized").mkdir(exist_ok=True)
    server_pub, server_sec = zmq.auth.create_certificates(str(d), "server")
    client_pub, client_sec = zmq.auth.create_certificates(str(d), "client")
    shutil.copy(client_pub, d / "authorized" / "client.key")
    for secret in (server_sec, client_sec):
        with contextlib.suppress(OSError):  # Windows ACLs
            Path(secret).chmod(0o600)
    return {
        "server_public": Path(server_pub),
        "server_secret": Path(server_sec),
        "client_public": Path(client_pub),
        "client_secret": Path(client_sec),
    }


def add_client(keys_dir: Path | str, name: str) -> dict[str, Path]:
    """Another authorised client key pair ``<name>.key`` / ``<name>.key_secret`` in ``keys_dir``."""
    import zmq.auth

    _check_curve()
    d = Path(keys_dir)
    if not (d / "server.key").exists():
        raise SecurityError(f"{d} has no server.key: run `scope-stream keys generate {d}` first")
    if not name.isidentifier() or name in ("server", "client"):
        raise SecurityError(f"client name {name!r} must be an identifier other than 'server' and 'client'")
    (d / "authorized").mkdir(exist_ok=True)
    pub, sec = zmq.auth.create_certificates(str(d), name)
    shutil.copy(pub, d / "authorized" / f"{name}.key")
    return {"client_public": Path(pub), "client_secret": Path(sec)}


def _load(path: Path, secret: bool) -> tuple[bytes, bytes | None]:
    import zmq.auth

    if not path.is_file():
        raise SecurityError(f"key file {path} not found")
    try:
        pub, sec = zmq.auth.load_certificate(str(path))
    except (OSError, ValueError) as exc:
        raise SecurityError(f"cannot read key file {path}: {exc}") from exc
    if secret and not sec:
        raise SecurityError(f"{path} holds no secret key")
    return pub, sec


class _CountingAuthenticator:
    """Wraps ``zmq.auth.thread.ThreadAuthenticator`` and counts the connections it denies."""

    def __init__(self, context: zmq.Context[Any], authorized: Path) -> None:
        from zmq.auth.thread import ThreadAuthenticator

        self.denied = 0
        self._allowed: set[bytes] = set()
        self._dir = authorized
        self.reload()
        outer = self

        class _Provider:
            def callback(self, domain: str, key: bytes) -> bool:
                ok = key in outer._allowed
                if not ok:
                    outer.denied += 1
                    log.warning("CurveZMQ: denied a client with an unknown public key")
                return ok

        self._auth = ThreadAuthenticator(context, log=logging.getLogger("scope_stream.transport.zap"))
        self._auth.start()
        self._auth.configure_curve_callback(domain="*", credentials_provider=_Provider())

    def reload(self) -> None:
        import zmq.auth

        keys: set[bytes] = set()
        for f in sorted(self._dir.glob("*.key")):
            try:
                pub, _ = zmq.auth.load_certificate(str(f))
                keys.add(pub)
            except (OSError, ValueError) as exc:
                log.warning("ignoring unreadable authorised key %s: %s", f, exc)
        self._allowed = keys

    def stop(self) -> None:
        self._auth.stop()


class ServerSecurity:
    """The broker's CURVE server keys plus a ZAP handler that accepts only ``authorized/*.key``."""

    def __init__(self, keys_dir: Path | str) -> None:
        _check_curve()
        self.keys_dir = Path(keys_dir)
        self.public, secret = _load(self.keys_dir / "server.key_secret", secret=True)
        assert secret is not None
        self.secret = secret
        self.authorized = self.keys_dir / "authorized"
        if not self.authorized.is_dir() or not any(self.authorized.glob("*.key")):
            raise SecurityError(f"{self.authorized} holds no authorised client keys (*.key)")
        self._auth: _CountingAuthenticator | None = None

    def start(self, context: zmq.Context[Any]) -> None:
        """Start the ZAP authenticator for ``context`` (once, before binding)."""
        if self._auth is None:
            self._auth = _CountingAuthenticator(context, self.authorized)

    def apply(self, sock: zmq.Socket[Any]) -> None:
        sock.curve_secretkey = self.secret
        sock.curve_publickey = self.public
        sock.curve_server = True

    @property
    def denied(self) -> int:
        return self._auth.denied if self._auth else 0

    def stop(self) -> None:
        if self._auth is not None:
            self._auth.stop()
            self._auth = None


@dataclass(frozen=True)
class ClientSecurity:
    """A client's key pair and the server's public key."""

    server_public: bytes
    public: bytes
    secret: bytes

    @classmethod
    def from_dir(cls, keys_dir: Path | str, name: str = "client") -> ClientSecurity:
        d = Path(keys_dir)
        server_public, _ = _load(d / "server.key", secret=False)
        public, secret = _load(d / f"{name}.key_secret", secret=True)
        assert secret is not None
        return cls(server_public=server_public, public=public, secret=secret)

    def apply(self, sock: zmq.Socket[Any]) -> None:
        sock.curve_serverkey = self.server_public
        sock.curve_publickey = self.public
        sock.curve_secretkey = self.secret


def client_security(keys_dir: Path | str | None, name: str = "client") -> ClientSecurity | None:
    """Client keys from ``keys_dir`` or None when there is no key folder."""
    return None if keys_dir is None else ClientSecurity.from_dir(keys_dir, name)
