"""What the dashboard and the model server share: a threaded HTTP server on a local address, the
Host-header check that keeps a loopback server from answering pages on other sites (DNS rebinding),
the shared-secret token a server reachable from the network requires, and the serve-until-Ctrl-C loop."""

from __future__ import annotations

import base64
import binascii
import hmac
import socket
import sys
from collections.abc import Callable
from http.server import ThreadingHTTPServer

from tracelens.errors import ConfigError

LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")


def threading_server(host: str, port: int, handler_cls) -> ThreadingHTTPServer:
    """A bound `ThreadingHTTPServer` (daemon threads; IPv6 for a host with ':'); `port=0` picks a free one."""
    server_cls = type("_Server", (ThreadingHTTPServer,), {"daemon_threads": True})
    if ":" in host:
        server_cls.address_family = socket.AF_INET6
    return server_cls((host, port), handler_cls)


def http_url(host: str, port: int) -> str:
    """``http://host:port`` (an IPv6 host in brackets)."""
    return f"http://{'[' + host + ']' if ':' in host else host}:{port}"


def serve_until_interrupted(serve_forever: Callable[[], None], close: Callable[[], None], banner: str) -> None:
    """Print `banner` to stderr, run `serve_forever` until Ctrl-C, then `close` (also after an error)."""
    print(f"{banner}  (Ctrl-C to stop)", file=sys.stderr)
    try:
        serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        close()


def loopback_host_headers(port: int) -> frozenset[str]:
    """The Host headers a browser or client sends to a loopback server on `port`."""
    return frozenset(f"{h}:{port}" for h in ("127.0.0.1", "localhost", "[::1]"))


def host_header_ok(headers, allowed: frozenset[str] | None) -> bool:
    """True when `allowed` is None (any host) or the request's Host header is one of them."""
    return allowed is None or (headers.get("Host") or "").strip().lower() in allowed


def check_token(token) -> None:
    """ValueError unless `token` is None (no authentication) or a non-empty string."""
    if token is not None and (not isinstance(token, str) or not token):
        raise ConfigError(f"token must be a non-empty string or None; got {token!r}")


def token_ok(headers, token: str | None) -> bool:
    """True when `token` is None or the request's Authorization header carries it: ``Bearer <token>``, or
    HTTP Basic with the token as password and any user name (what a browser sends after its login prompt).
    The comparison takes the same time wherever a wrong token differs."""
    if token is None:
        return True
    scheme, _, given = (headers.get("Authorization") or "").partition(" ")
    given = given.strip()
    if scheme.lower() == "basic":
        try:
            given = base64.b64decode(given, validate=True).decode().partition(":")[2]
        except (binascii.Error, UnicodeDecodeError):
            return False
    elif scheme.lower() != "bearer":
        return False
    return hmac.compare_digest(given.encode(), token.encode())
