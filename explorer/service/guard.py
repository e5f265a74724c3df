"""The service's front door: an ASGI middleware that runs before any route reads a body.

* ``/api`` requests without a valid ``Authorization: Bearer TOKEN`` are answered 401 at once,
  before a byte of the body is read (FastAPI would otherwise read and parse the whole body
  before the route's ``current_user`` dependency runs).
* Every request body has a cap that depends on the route (:func:`body_cap`): small for JSON
  and forms, the upload limits for the two routes that stream files (uploads, search by
  image). A ``Content-Length`` above the cap is answered 413 at once; a body without one
  (chunked) is counted while the route reads it, and the read that passes the cap raises a
  413 instead of handing the bytes on.

* Every HTTP and websocket request's ``Host`` must name this computer (``localhost``,
  ``127.0.0.1``, ``[::1]``), the address listened on, or match an ``--allowed-host`` value
  (the public name behind a proxy); anything else is answered 403 (a websocket is closed
  before it is accepted). A page whose DNS name was rebound to this server (review N2) gets
  nothing. The rule is the app's (:func:`explorer.app.serving.host_allowed`).

Early answers carry ``Connection: close`` so the server stops reading what the client still
sends.
"""

from __future__ import annotations

import json
import re
from typing import Callable, Optional

from starlette.exceptions import HTTPException

from explorer.service.uploads import Limits

KiB, MiB = 2**10, 2**20
JSON_MAX_BYTES = 1 * MiB  # every JSON body but a label edit
LABELS_MAX_BYTES = 16 * MiB  # a label edit names its images (about 500,000 paths)
FORM_MAX_BYTES = 16 * KiB  # /login, /logout
APP_MAX_BYTES = 1 * MiB  # what a browser sends to a dataset's app (Bokeh needs none)

_UPLOAD = re.compile(r"^/api/datasets/upload/?$")
_SEARCH_IMAGE = re.compile(r"^/api/datasets/[^/]+/search/image/?$")
_LABELS = re.compile(r"^/api/datasets/[^/]+/labels/?$")


class BodyTooLarge(HTTPException):
    """A request body passed its route's cap (answered 413)."""

    def __init__(self, cap: int):
        super().__init__(413, f"the request body is larger than this route's limit of "
                              f"{_size(cap)}")


def _size(n: int) -> str:
    return f"{n / MiB:g} MiB" if n >= MiB else f"{n / KiB:g} KiB"


def search_image_cap(limits: Limits) -> int:
    """The cap of a search-by-image request: one image file and its form fields."""
    return limits.max_file_bytes + 64 * KiB


def body_cap(method: str, path: str, limits: Limits) -> int:
    """The most bytes a request to ``method path`` may send (one place for every cap)."""
    if method == "POST" and _UPLOAD.match(path):
        return limits.max_request_bytes
    if method == "POST" and _SEARCH_IMAGE.match(path):
        return search_image_cap(limits)
    if method == "POST" and _LABELS.match(path):
        return LABELS_MAX_BYTES
    if path.startswith("/apps/"):
        return APP_MAX_BYTES
    if path == "/api" or path.startswith("/api/"):
        return JSON_MAX_BYTES
    return FORM_MAX_BYTES


def needs_token(path: str) -> bool:
    return path == "/api" or path.startswith("/api/")


class Guard:
    """The middleware (see the module). ``authorized(header)`` says whether an
    ``Authorization`` header value holds a valid token; it runs in a thread."""

    def __init__(self, app, *, authorized: Callable[[Optional[str]], bool], limits: Limits,
                 allowed_hosts: tuple[str, ...] | None = None):
        self.app = app
        self.authorized = authorized
        self.limits = limits
        self.allowed_hosts = allowed_hosts

    def host_ok(self, scope, headers: dict[str, str]) -> bool:
        """Whether the request's ``Host`` may be served (always, without ``allowed_hosts``):
        a loopback name on any port (a rebound page never carries one), else the app's rule
        against ``allowed_hosts``."""
        if self.allowed_hosts is None:
            return True
        from explorer.app.serving import LOOPBACK_NAMES, host_allowed, split_host

        host = headers.get("host")
        try:
            if host and split_host(host)[0] in LOOPBACK_NAMES:
                return True
        except ValueError:
            return False
        server = scope.get("server") or (None, None)
        port = server[1] if len(server) > 1 and server[1] else 80
        return host_allowed(host, int(port), self.allowed_hosts)

    async def __call__(self, scope, receive, send):
        if scope["type"] not in ("http", "websocket"):
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1")
                   for k, v in scope.get("headers", ())}
        if not self.host_ok(scope, headers):
            if scope["type"] == "websocket":  # closed before accept: the client sees 403
                return await send({"type": "websocket.close", "code": 1008})
            return await _answer(send, 403, "this server does not answer to that Host "
                                 "(explorer serve --allowed-host NAME adds a name)")
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        import anyio

        path, method = scope["path"], scope["method"]
        if needs_token(path) and not await anyio.to_thread.run_sync(
                self.authorized, headers.get("authorization")):
            msg = ("send Authorization: Bearer TOKEN (explorer users add)"
                   if not headers.get("authorization") else "unknown or revoked token")
            return await _answer(send, 401, msg, {"www-authenticate": "Bearer"})
        cap = body_cap(method, path, self.limits)
        length = headers.get("content-length")
        if length is not None:
            if not length.isdigit():
                return await _answer(send, 400, f"Content-Length {length!r} is not a number")
            if int(length) > cap:
                return await _answer(send, 413, BodyTooLarge(cap).detail)
        seen = 0
        started = False

        async def counted_receive():
            nonlocal seen
            msg = await receive()
            if msg["type"] == "http.request":
                seen += len(msg.get("body", b""))
                if seen > cap:
                    raise BodyTooLarge(cap)
            return msg

        async def watched_send(msg):
            nonlocal started
            if msg["type"] == "http.response.start":
                started = True
            await send(msg)

        try:
            await self.app(scope, counted_receive, watched_send)
        except BodyTooLarge as exc:  # raised where no handler answered it
            if not started:
                await _answer(send, 413, exc.detail)


async def _answer(send, status: int, message: str, extra: dict | None = None) -> None:
    body = json.dumps({"error": message}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
               (b"connection", b"close")]
    headers += [(k.encode(), v.encode()) for k, v in (extra or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
