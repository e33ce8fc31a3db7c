"""Serves the console under uvicorn on a socket bound here, so a taken port or a bad host is a one-line error."""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Callable

import uvicorn

from gatefill.console.app import ConsoleConfig, create_app
from gatefill.errors import UsageError

__all__ = ["is_loopback", "serve_console"]


def is_loopback(host: str) -> bool:
    """True for ``localhost`` and loopback addresses (127.0.0.0/8, ::1); every other host is reachable by others."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _bind(host: str, port: int) -> socket.socket:
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        sock = socket.socket(family, kind, proto)
    except (OSError, IndexError) as exc:
        raise UsageError(f"cannot listen on {host}:{port}: {getattr(exc, 'strerror', None) or exc}") from None
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(128)  # connections made before uvicorn starts accepting wait in the queue
    except OSError as exc:
        sock.close()
        raise UsageError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    return sock


def serve_console(config: ConsoleConfig, *, host: str, port: int, on_ready: Callable[[str], None]) -> None:
    """Serves the console until interrupted; ``on_ready`` gets its URL (with the port bound, when 0 was asked)."""
    if config.token is None and not is_loopback(host):
        raise UsageError(f"refusing to serve the console on {host} without --auth-token-env (anyone could read it)")
    sock = _bind(host, port)
    try:
        app = create_app(config)
        server = uvicorn.Server(
            uvicorn.Config(app, log_level="warning", access_log=False, lifespan="off", timeout_graceful_shutdown=2)
        )
        bound = sock.getsockname()[1]
        shown = f"[{host}]" if ":" in host else host
        on_ready(f"http://{shown}:{bound}/")
        server.run(sockets=[sock])
    finally:
        sock.close()
