"""Plumbing of the ``bokeh serve`` process: finding its Tornado application, and the Host guard.

**The Host guard (DNS rebinding).** A page on ``attacker.example`` whose DNS name is rebound to
127.0.0.1 talks to the app as a *same-origin* client: its requests carry
``Host: attacker.example:PORT`` (and the same ``Origin``). Tornado (6.6) lets a websocket in
when ``Origin`` equals ``Host``, before Bokeh's ``--allow-websocket-origin`` list is consulted,
and Bokeh's page and our ``_thumb``/``_exports`` handlers never look at ``Host``. So every HTTP
and websocket request of the app is checked here, before any handler runs: its ``Host`` must
be ``localhost``, ``127.0.0.1`` or ``[::1]`` on the port the request came in on, or match one
of the ``--allow-websocket-origin`` values (Bokeh's own host patterns); anything else gets 403.

A server on a Unix socket (``--unix-socket``, as ``explorer serve`` runs each app) is reached
only through the process that owns the socket, which checks its own users and hosts; its
requests carry that service's public host name and are let through.
"""

from __future__ import annotations

import logging
import socket
import weakref
from typing import Any, Iterable

log = logging.getLogger("bokeh.server.explorer")

__all__ = ["LOOPBACK_NAMES", "find_tornado", "guard_hosts", "host_allowed", "protect", "split_host"]

#: the Tornado applications already guarded
_GUARDED: "weakref.WeakSet[Any]" = weakref.WeakSet()

#: host names that always mean "this computer" (on the served port)
LOOPBACK_NAMES = ("localhost", "127.0.0.1", "[::1]")


def split_host(host: str) -> tuple[str, int | None]:
    """``(name, port)`` of a ``Host`` header value (``port`` is ``None`` when absent).

    The name is lower-cased; an IPv6 literal keeps its brackets. Raises ``ValueError`` naming
    the value when it is not ``name[:port]``."""
    value = host.strip().lower()
    if value.startswith("["):
        end = value.find("]")
        if end < 0:
            raise ValueError(f"bad Host header {host!r}")
        name, rest = value[: end + 1], value[end + 1 :]
    else:
        name, _, port = value.partition(":")
        rest = f":{port}" if _ else ""
    if not name or (rest and not rest.startswith(":")):
        raise ValueError(f"bad Host header {host!r}")
    port_text = rest[1:]
    if not rest:
        return name, None
    if not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise ValueError(f"bad port in Host header {host!r}")
    return name, int(port_text)


def host_allowed(host: str | None, port: int, allowlist: Iterable[str] = ()) -> bool:
    """Whether a request whose ``Host`` header is ``host``, received on ``port``, may be served.

    Allowed: a loopback name (:data:`LOOPBACK_NAMES`) on ``port`` (no port in the header means
    80), or a match of one of ``allowlist`` (the server's ``--allow-websocket-origin`` values,
    Bokeh's ``host[:port]`` patterns with ``*`` wildcards)."""
    if not host:
        return False
    try:
        name, given = split_host(host)
    except ValueError:
        return False
    if name in LOOPBACK_NAMES and (given or 80) == port:
        return True
    from bokeh.server.util import check_allowlist

    return check_allowlist(f"{name}:{given or 80}", list(allowlist))


def _local_socket(request: Any) -> socket.socket | None:
    stream = getattr(getattr(request, "connection", None), "stream", None)
    return getattr(stream, "socket", None)


def guard_hosts(app: Any) -> None:
    """Answer 403 to every request of Tornado application ``app`` whose Host is not allowed
    (:func:`host_allowed` with the app's ``websocket_origins``); idempotent."""
    if app in _GUARDED:
        return
    from tornado.web import ErrorHandler

    route = app.find_handler  # the bound method the HTTP server's router calls

    def find_handler(request: Any, **kwargs: Any) -> Any:
        sock = _local_socket(request)
        if sock is not None and sock.family != getattr(socket, "AF_UNIX", None):
            port = sock.getsockname()[1]
            if not host_allowed(request.headers.get("Host"), port, getattr(app, "websocket_origins", ())):
                log.warning("explorer: refused a request for Host %r (not this computer)",
                            request.headers.get("Host", "")[:100])
                return app.get_handler_delegate(request, ErrorHandler, {"status_code": 403})
        return route(request, **kwargs)

    app.find_handler = find_handler
    _GUARDED.add(app)


def protect(server_context: Any) -> bool:
    """Install the Host guard on the ``bokeh serve`` application of ``server_context`` (call
    from ``app_hooks.on_server_loaded``). Returns whether it was installed (``False``, with an
    error in the log, when the Tornado application could not be found)."""
    ctx = getattr(server_context, "application_context", None)
    app = find_tornado(ctx) if ctx is not None else None
    if app is None:
        log.error("explorer: could not find the Tornado application; the Host check is NOT installed")
        return False
    guard_hosts(app)
    log.info("explorer: requests for hosts other than this computer are refused (403)")
    return True


def find_tornado(app_context: Any) -> Any:
    """The BokehTornado application that serves ``app_context``.

    Bokeh does not hand it to ``on_server_loaded``; it holds our ApplicationContext in its
    ``_applications`` dict, so walk the referrers of that context."""
    import gc

    from bokeh.server.tornado import BokehTornado

    for ref in gc.get_referrers(app_context):
        if isinstance(ref, BokehTornado):
            return ref
        if isinstance(ref, dict):
            for owner in gc.get_referrers(ref):
                if isinstance(owner, BokehTornado) and app_context in owner.applications.values():
                    return owner
                if isinstance(owner, dict):  # an instance __dict__
                    for obj in gc.get_referrers(owner):
                        if isinstance(obj, BokehTornado) and app_context in obj.applications.values():
                            return obj
    for obj in gc.get_objects():  # slow fallback, once per server
        if isinstance(obj, BokehTornado) and app_context in obj.applications.values():
            return obj
    return None
