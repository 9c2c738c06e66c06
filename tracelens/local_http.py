"""What the dashboard and the model server share: a threaded HTTP server on a local address, and the
Host-header check that keeps a loopback server from answering pages on other sites (DNS rebinding)."""

from __future__ import annotations

import socket
from http.server import ThreadingHTTPServer

LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")


def threading_server(host: str, port: int, handler_cls) -> ThreadingHTTPServer:
    """A bound `ThreadingHTTPServer` (daemon threads; IPv6 for a host with ':'); `port=0` picks a free one."""
    server_cls = type("_Server", (ThreadingHTTPServer,), {"daemon_threads": True})
    if ":" in host:
        server_cls.address_family = socket.AF_INET6
    return server_cls((host, port), handler_cls)


def loopback_host_headers(port: int) -> frozenset[str]:
    """The Host headers a browser or client sends to a loopback server on `port`."""
    return frozenset(f"{h}:{port}" for h in ("127.0.0.1", "localhost", "[::1]"))


def host_header_ok(headers, allowed: frozenset[str] | None) -> bool:
    """True when `allowed` is None (any host) or the request's Host header is one of them."""
    return allowed is None or (headers.get("Host") or "").strip().lower() in allowed
