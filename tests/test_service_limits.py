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
from _service import Local, Server, grant, local_user  # noqa: E402

pytestmark = pytest.mark.slow  # real service processes (make test-fast leaves it out)


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
def server(apps_site):
    """A real ``explorer serve`` and alice's token: the app tests' service (below), before
    any app process runs (one service start less)."""
    return apps_site["server"], apps_site["tokens"]["alice"]


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
    token = local_user(tmp_path / "data", "alice")
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
        # the header deadline (2 s) closes the last one opened last: wait for it, then count
        _closed(socks[-1], 5.0)
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


# --------------------------------------------------------------------------- the app processes
@pytest.fixture(scope="module")
def apps_site(tmp_path_factory):
    """A real service allowing 2 app processes, 1 per user; alice has datasets a1 and a2,
    carol c1 and c2 (one phash build, its outputs copied to the other three)."""
    import shutil

    from _service import wait_job

    base = tmp_path_factory.mktemp("apps")
    image_folder(base / "root" / "photos", 6, size=32)
    data = base / "data"
    tokens = {"alice": local_user(data, "alice", projects=("p1",)),
              "bob": local_user(data, "bob", projects=("p1",)),
              "carol": local_user(data, "carol", projects=("p2",))}
    for who in ("alice", "carol"):
        grant(data, "photos", user=who)
    srv = Server(base / "root", data, "--max-apps", "2", "--max-apps-per-user", "1").start()
    ids = {}
    for who, names in (("alice", ("a1", "a2")), ("carol", ("c1", "c2"))):
        c = srv.client(tokens[who])
        for n in names:
            ids[n] = c.post("/api/datasets", json={"name": n, "folder": "photos"}).json()["id"]
    c = srv.client(tokens["alice"])
    job = c.post(f"/api/datasets/{ids['a1']}/builds", json={"method": "phash"}).json()["job"]
    assert wait_job(c, job)["state"] == "done"
    built = data / "datasets" / ids["a1"]
    for n in ("a2", "c1", "c2"):
        shutil.copytree(built, data / "datasets" / ids[n], dirs_exist_ok=True)
    yield {"server": srv, "tokens": tokens, "ids": ids, "data": data}
    srv.stop()


def _app_pids(srv) -> dict[str, int]:
    import psutil

    out = {}
    for p in psutil.Process(srv.proc.pid).children(recursive=True):
        with_socket = [a for a in p.cmdline() if a.endswith(".sock")]
        if "bokeh" in p.cmdline() and with_socket:
            out[Path(with_socket[0]).stem] = p.pid
    return out


def _closed_within(ws, seconds: float) -> float | None:
    """Seconds until the server closed ``ws`` (pinging it with document requests), or None."""
    import websocket

    t0 = time.monotonic()
    ws.settimeout(0.5)
    while time.monotonic() - t0 < seconds:
        try:
            ws.send(json.dumps({"msgid": "x", "msgtype": "PULL-DOC-REQ"}))
            ws.send("{}")
            ws.send("{}")
            while True:
                if ws.recv() == "":
                    return time.monotonic() - t0
        except websocket.WebSocketTimeoutException:
            continue
        except (websocket.WebSocketConnectionClosedException, ConnectionError, OSError):
            return time.monotonic() - t0
    return None


def test_revoking_access_closes_open_app_sockets_within_5_s(apps_site):
    """Broken before: an open websocket kept answering PULL-DOC-REQ after un-sharing,
    logout and ``explorer users remove``."""
    import subprocess

    from _service import _env, app_session, open_app_socket, pull

    srv, tok, ds = apps_site["server"], apps_site["tokens"], apps_site["ids"]["a1"]
    alice = srv.client(tok["alice"])
    path = f"/apps/{ds}/app"
    # un-sharing: bob's socket closes, alice's stays
    assert alice.patch(f"/api/datasets/{ds}", json={"visibility": "project"}).status_code == 200
    bob = app_session(srv, tok["bob"])
    _, bob_ws = open_app_socket(srv, bob, path)
    assert pull(bob_ws)
    owner = app_session(srv, tok["alice"])
    _, alice_ws = open_app_socket(srv, owner, path)
    assert alice.patch(f"/api/datasets/{ds}", json={"visibility": "private"}).status_code == 200
    took = _closed_within(bob_ws, 5)
    assert took is not None, "bob's socket still open 5 s after un-sharing"
    assert pull(alice_ws), "the owner's socket stays open"
    # logout: the socket opened with that login closes
    r = owner.post("/logout", follow_redirects=False)
    assert r.status_code == 303
    assert _closed_within(alice_ws, 5) is not None, "still open 5 s after logout"
    # a removed user (another process: the periodic check finds it)
    assert alice.patch(f"/api/datasets/{ds}", json={"visibility": "project"}).status_code == 200
    bob = app_session(srv, tok["bob"])
    _, bob_ws = open_app_socket(srv, bob, path)
    subprocess.run([sys.executable, "-m", "explorer.cli", "users", "remove", "bob", "--data",
                    str(apps_site["data"])], env=_env(), check=True, capture_output=True)
    assert _closed_within(bob_ws, 5) is not None, "still open 5 s after users remove"
    assert alice.patch(f"/api/datasets/{ds}", json={"visibility": "private"}).status_code == 200


def test_one_user_cannot_stop_another_users_live_app(apps_site):
    """Broken before: carol opening her apps stopped alice's process (oldest first), live
    websocket and all."""
    from _service import app_session, open_app_socket, pull

    srv, tok, ids = apps_site["server"], apps_site["tokens"], apps_site["ids"]
    alice = app_session(srv, tok["alice"])
    _, alice_ws = open_app_socket(srv, alice, f"/apps/{ids['a1']}/app")
    pid = _app_pids(srv)[ids["a1"]]
    carol = app_session(srv, tok["carol"])
    _, carol_ws = open_app_socket(srv, carol, f"/apps/{ids['c1']}/app")
    # both slots hold a live session: carol's second app is refused, nobody is stopped
    r = carol.get(f"/apps/{ids['c2']}/app")
    assert r.status_code == 503 and "limit" in r.json()["error"]
    r = alice.get(f"/apps/{ids['a2']}/app")
    assert r.status_code == 503
    assert _app_pids(srv)[ids["a1"]] == pid and pull(alice_ws)
    # carol closes her app: her next one takes its slot (her own idle process makes room)
    carol_ws.close()
    time.sleep(0.5)
    assert carol.get(f"/apps/{ids['c2']}/app").status_code == 200
    running = _app_pids(srv)
    assert ids["c1"] not in running and running[ids["a1"]] == pid
    assert pull(alice_ws), "alice's session lived through all of it"
    alice_ws.close()


def test_app_processes_die_with_the_service_and_stale_folders_go(apps_site):
    """Broken before: after kill -9 of the service its bokeh processes ran on (PPID 1) and
    the explorer-apps-* folder stayed."""
    import signal
    import tempfile

    import psutil

    from _service import app_session

    srv, tok, ids = apps_site["server"], apps_site["tokens"], apps_site["ids"]
    alice = app_session(srv, tok["alice"])
    assert alice.get(f"/apps/{ids['a1']}/app").status_code == 200
    pids = list(_app_pids(srv).values())
    assert pids
    service_pid = srv.proc.pid
    folders = [d for d in Path(tempfile.gettempdir()).glob(f"explorer-apps-{service_pid}-*")]
    assert len(folders) == 1
    srv.stop(signal.SIGKILL)
    t0 = time.monotonic()
    while any(psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE
              for p in pids):
        assert time.monotonic() - t0 < 10, "an app process outlived the service"
        time.sleep(0.2)
    assert folders[0].exists(), "a killed service leaves its folder ..."
    srv.start()
    assert app_session(srv, tok["alice"]).get(f"/apps/{ids['a1']}/app").status_code == 200
    assert not folders[0].exists(), "... which the next start removes"


def test_the_global_app_limit_stops_only_idle_processes(tmp_path):
    """Unit test of AppServers' room-making with stand-in processes."""
    from explorer.service.apps import AppsBusy, AppServers

    class Proc:  # a running process as far as AppServers can tell
        pid = 1

        def poll(self):
            return None

        def terminate(self):
            self.stopped = True

        def wait(self, t=None):
            return 0

    apps = AppServers(tmp_path, max_running=2, max_per_user=2)
    for ds, user, used in (("a", 1, 1.0), ("b", 2, 2.0)):
        apps._procs[ds] = (Proc(), tmp_path / f"{ds}.sock", used)
        apps._started_by[ds] = user
    key_a, _ = apps.live.add(1, None, "a")
    key_b, _ = apps.live.add(2, None, "b")
    with pytest.raises(AppsBusy):
        apps._make_room(3)
    assert set(apps._procs) == {"a", "b"}, "nobody's live app was stopped"
    apps.live.remove(key_b)
    apps._make_room(3)
    assert set(apps._procs) == {"a"}, "the idle one made room"
    with pytest.raises(ValueError, match="max_per_user"):
        AppServers(tmp_path, max_per_user=0)
