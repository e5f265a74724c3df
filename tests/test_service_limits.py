"""What a stranger cannot do to ``explorer serve``: make it read bodies before the token is
checked (N1), buffer what passes through the app proxy (N7), hold its connections open (N8),
and what a user cannot do to another user's apps (N4, N10, N11).

The middleware is driven in-process through raw ASGI calls (so a test sees whether the body
was read at all); the memory, socket and process checks run a real ``explorer serve`` on
loopback, bounded in bytes, connections and time.
"""

from __future__ import annotations

import asyncio
import json
import socket
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from _imagegen import image_folder  # noqa: E402
from _service import Local, Server, add_user, grant, local_user  # noqa: E402

MiB = 2**20


@pytest.fixture(scope="module")
def local(tmp_path_factory):
    base = tmp_path_factory.mktemp("limits")
    image_folder(base / "root" / "photos", 4, size=32)
    token = local_user(base / "data", "alice", projects=("p1",))
    grant(base / "data", "photos", user="alice")
    service = Local(base / "root", base / "data")
    return service, token


def asgi_post(app, path, chunks, headers=()):
    """POST ``chunks`` to ``app`` as an ASGI server would; return (status, body, bytes the
    app asked for)."""
    pulled = {"bytes": 0, "calls": 0}
    out = {"status": None, "body": b""}
    todo = list(chunks)

    async def receive():
        pulled["calls"] += 1
        if not todo:
            return {"type": "http.request", "body": b"", "more_body": False}
        b = todo.pop(0)
        pulled["bytes"] += len(b)
        return {"type": "http.request", "body": b, "more_body": bool(todo)}

    async def send(msg):
        if msg["type"] == "http.response.start":
            out["status"] = msg["status"]
        elif msg["type"] == "http.response.body":
            out["body"] += msg.get("body", b"")

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1",
             "method": "POST", "scheme": "http", "path": path, "raw_path": path.encode(),
             "query_string": b"", "root_path": "", "client": ("127.0.0.1", 1),
             "server": ("127.0.0.1", 80),
             "headers": [(k.lower().encode(), v.encode()) for k, v in headers]}
    asyncio.run(app(scope, receive, send))
    return out["status"], out["body"], pulled


# --------------------------------------------------------------------------- N1, in-process
def test_no_token_is_refused_before_the_body_is_read(local):
    """Broken before the middleware: FastAPI parsed the body first and answered 422."""
    service, _ = local
    body = b'{"name": "' + b"A" * (4 * MiB) + b'"}'
    for headers in ([("content-type", "application/json"),
                     ("content-length", str(len(body)))],
                    [("content-type", "application/json"),
                     ("authorization", "Bearer not-a-token")]):
        status, answer, pulled = asgi_post(service.app, "/api/datasets",
                                           [body[i:i + 65536] for i in range(0, len(body), 65536)],
                                           headers)
        assert status == 401, answer
        assert pulled["bytes"] == 0, "not one byte of the body was read"
        assert json.loads(answer)["error"]


def test_json_bodies_are_capped_by_length_and_by_count(local):
    service, token = local
    auth = ("authorization", f"Bearer {token}")
    big = b'{"name": "' + b"A" * (2 * MiB) + b'"}'
    chunks = [big[i:i + 65536] for i in range(0, len(big), 65536)]
    status, answer, pulled = asgi_post(service.app, "/api/datasets", chunks,
                                       [auth, ("content-type", "application/json"),
                                        ("content-length", str(len(big)))])
    assert status == 413 and "limit" in json.loads(answer)["error"]
    assert pulled["bytes"] == 0, "Content-Length alone decides"
    # no Content-Length (chunked): refused once the count passes the cap, not at the end
    status, answer, pulled = asgi_post(service.app, "/api/datasets", chunks,
                                       [auth, ("content-type", "application/json")])
    assert status == 413, answer
    assert pulled["bytes"] <= MiB + 65536 < len(big)
    # a small body still works
    small = json.dumps({"name": "fine", "folder": "photos"}).encode()
    status, answer, _ = asgi_post(service.app, "/api/datasets", [small],
                                  [auth, ("content-type", "application/json"),
                                   ("content-length", str(len(small)))])
    assert status == 201, answer


def test_the_upload_route_keeps_its_own_larger_cap(local):
    from explorer.service.guard import JSON_MAX_BYTES, body_cap
    from explorer.service.uploads import Limits

    limits = Limits()
    assert body_cap("POST", "/api/datasets/upload", limits) == limits.max_request_bytes
    assert body_cap("POST", "/api/datasets/abc/search/image", limits) > limits.max_file_bytes
    assert body_cap("POST", "/api/datasets/abc/builds", limits) == JSON_MAX_BYTES
    assert body_cap("POST", "/login", limits) < JSON_MAX_BYTES


# --------------------------------------------------------------------------- N1, real socket
def _rss_mib(pid: int) -> float:
    import psutil

    return psutil.Process(pid).memory_info().rss / MiB


def _send_big(port: int, head: bytes, total: int, seconds: float = 20.0) -> tuple[bytes, int]:
    """Send ``head`` and then up to ``total`` bytes; return (the answer, bytes sent)."""
    s = socket.create_connection(("127.0.0.1", port), timeout=seconds)
    sent = 0
    chunk = b"A" * MiB
    t0 = time.monotonic()
    try:
        s.sendall(head)
        s.settimeout(2.0)
        while sent < total and time.monotonic() - t0 < seconds:
            try:
                s.sendall(chunk)
            except (BrokenPipeError, ConnectionResetError, socket.timeout):
                break
            sent += len(chunk)
        s.settimeout(5.0)
        try:
            answer = s.recv(4096)
        except (ConnectionResetError, socket.timeout):
            answer = b""
        return answer, sent
    finally:
        s.close()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    base = tmp_path_factory.mktemp("limits-served")
    image_folder(base / "root" / "photos", 4, size=32)
    token = add_user(base / "data", "alice", "--project", "p1")
    srv = Server(base / "root", base / "data").start()
    yield srv, token
    srv.stop()


def test_an_unauthenticated_200_mib_post_is_refused_and_the_service_does_not_grow(server):
    """Broken before: 300 MiB took the service from 168 to 769 MiB and got 422."""
    srv, _ = server
    port = int(srv.url.rsplit(":", 1)[1])
    before = _rss_mib(srv.proc.pid)
    head = (b"POST /api/datasets HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json"
            b"\r\nContent-Length: %d\r\n\r\n" % (200 * MiB)) + b'{"name":"'
    answer, sent = _send_big(port, head, 200 * MiB)
    grown = _rss_mib(srv.proc.pid) - before
    assert answer.startswith(b"HTTP/1.1 401"), (answer[:200], sent)
    assert grown < 50, f"the service grew {grown:.0f} MiB"
    # without Content-Length (chunked) it is the same answer
    head = (b"POST /api/datasets HTTP/1.1\r\nHost: 127.0.0.1\r\nTransfer-Encoding: chunked"
            b"\r\n\r\n%x\r\n" % (50 * MiB))  # one 50 MiB chunk
    answer, _ = _send_big(port, head, 50 * MiB)
    assert answer.startswith(b"HTTP/1.1 401"), answer[:200]
    assert _rss_mib(srv.proc.pid) - before < 50


# --------------------------------------------------------------------------- N7, the proxy
def _request(path, chunks, headers=()):
    """A Starlette Request whose body arrives in ``chunks``."""
    from starlette.requests import Request

    todo = list(chunks)

    async def receive():
        if not todo:
            return {"type": "http.request", "body": b"", "more_body": False}
        b = todo.pop(0)
        return {"type": "http.request", "body": b, "more_body": bool(todo)}

    scope = {"type": "http", "method": "POST" if chunks else "GET", "path": path,
             "raw_path": path.encode(), "query_string": b"", "root_path": "", "scheme": "http",
             "server": ("127.0.0.1", 80), "client": ("127.0.0.1", 1), "http_version": "1.1",
             "headers": [(k.encode(), v.encode()) for k, v in headers]}
    return Request(scope, receive)


async def _upstream(sock: Path, answer_bytes: int, got: list):
    """A stand-in app on a Unix socket: reads the request (counting body bytes, discarded)
    and answers ``answer_bytes`` bytes in 1 MiB writes."""

    async def handle(reader, writer):
        head = await reader.readuntil(b"\r\n\r\n")
        n = 0
        if b"chunked" in head.lower():
            while True:
                size = int((await reader.readline()).strip(), 16)
                if size == 0:
                    await reader.readline()
                    break
                n += len(await reader.readexactly(size))
                await reader.readline()
        got.append(n)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/zip\r\n"
                     b"Content-Length: %d\r\n\r\n" % answer_bytes)
        block = b"z" * MiB
        for _ in range(answer_bytes // MiB):
            writer.write(block)
            await writer.drain()
        writer.close()

    return await asyncio.start_unix_server(handle, path=str(sock))


def test_the_app_proxy_streams_both_ways_in_bounded_memory(tmp_path):
    """Broken before: request.body() and r.content held both bodies whole (a 400 MiB POST
    grew the service by 400 MiB)."""
    import tracemalloc

    from starlette.responses import StreamingResponse

    from explorer.service.apps import proxy_http

    sock = tmp_path / "app.sock"
    up = [b"u" * (256 * 1024)] * 32  # 8 MiB, chunked
    got: list = []

    async def run():
        server = await _upstream(sock, 32 * MiB, got)
        try:
            req = _request("/apps/x/app/_exports/big.zip", up,
                           [("transfer-encoding", "chunked")])
            tracemalloc.start()
            resp = await proxy_http(req, sock, req.url.path, "explorer_session")
            n = 0
            async for chunk in resp.body_iterator:
                n += len(chunk)
            await resp.background()
            peak = tracemalloc.get_traced_memory()[1]
            tracemalloc.stop()
            return resp, n, peak
        finally:
            server.close()

    resp, n, peak = asyncio.run(run())
    assert isinstance(resp, StreamingResponse)
    assert got == [8 * MiB] and n == 32 * MiB
    assert dict(resp.headers)["content-length"] == str(32 * MiB)
    assert peak < 6 * MiB, f"the proxy held {peak / MiB:.0f} MiB at once"


def test_an_app_that_does_not_answer_is_a_502(tmp_path):
    from explorer.service.apps import proxy_http

    req = _request("/apps/x/app", [])
    resp = asyncio.run(proxy_http(req, tmp_path / "nobody.sock", "/apps/x/app",
                                  "explorer_session"))
    assert resp.status_code == 502 and "did not answer" in json.loads(resp.body)["error"]


def test_a_large_post_into_an_app_is_413_before_it_reaches_the_app(local):
    service, token = local
    status, answer, pulled = asgi_post(service.app, "/apps/abc/app", [b"x" * MiB] * 8,
                                       [("authorization", f"Bearer {token}"),
                                        ("content-length", str(8 * MiB))])
    assert status == 413 and pulled["bytes"] == 0, (status, answer)


# --------------------------------------------------------------------------- N8, slowloris
def _slow_connections(port: int, n: int) -> list[socket.socket]:
    socks = []
    for _ in range(n):
        s = socket.create_connection(("127.0.0.1", port), timeout=5)
        s.sendall(b"GET /api/me HTTP/1.1\r\nHost: x\r\nX-a: ")
        socks.append(s)
    return socks


def _closed(s: socket.socket, wait: float) -> bool:
    s.settimeout(wait)
    try:
        return s.recv(1) == b""
    except (ConnectionResetError, BrokenPipeError):
        return True
    except socket.timeout:
        return False


def test_slow_connections_neither_block_requests_nor_flood_the_log(tmp_path):
    """Broken before: under ``ulimit -n 256``, 260 half-open connections blocked every
    request for 46 s, stayed open, and wrote 295 MB of EMFILE tracebacks."""
    import httpx

    image_folder(tmp_path / "root" / "photos", 2, size=32)
    token = add_user(tmp_path / "data", "alice")
    srv = Server(tmp_path / "root", tmp_path / "data", "--header-timeout", "2",
                 nofile=256).start()
    socks: list = []
    try:
        log0 = srv.log.stat().st_size
        socks = _slow_connections(srv.port, 300)
        for s in socks[:50]:  # a byte now and then keeps none of them alive past the deadline
            s.sendall(b"a")
        t0 = time.monotonic()
        r = httpx.get(srv.url + "/api/me", headers={"Authorization": f"Bearer {token}"},
                      timeout=10)
        took = time.monotonic() - t0
        assert r.status_code == 200 and took < 2.0, (r.status_code, took)
        time.sleep(2.5)
        closed = sum(_closed(s, 0.05) for s in socks)
        assert closed == len(socks), f"{len(socks) - closed} slow connections still open"
        assert srv.log.stat().st_size - log0 < 2**20
    finally:
        for s in socks:
            s.close()
        srv.stop()


def test_descriptor_errors_are_logged_once_in_a_while():
    import errno
    import logging

    from explorer.service.sockets import RateLimitedLog

    f = RateLimitedLog(every=60)
    err = OSError(errno.EMFILE, "Too many open files")

    def rec(msg, exc=None):
        return logging.LogRecord("asyncio", logging.ERROR, __file__, 1, msg, None,
                                 (type(exc), exc, None) if exc else None)

    passed = [f.filter(rec("socket.accept() out of system resource", err)) for _ in range(1000)]
    assert passed[0] and sum(passed) == 1 and f.dropped == 999
    assert f.filter(rec("an ordinary error")), "other records pass"
