"""Each dataset's explorer app at ``/apps/{id}``, behind the service's users and rules.

One ``bokeh serve`` process per dataset that someone opened, started on demand and stopped
after ``idle`` seconds without a request (or when the service stops). It listens on a Unix
socket in a folder only the service's user can enter, so nothing reaches it except through
the service: the service checks the login cookie (or bearer token) and the dataset's
visibility first, then passes the request (HTTP, or the app's websocket) through. A process
that crashes is started again on the next request.

The app is ``bokeh serve DATA/datasets/ID/app --prefix /apps/ID --args app.csv``, so its
pages live under ``/apps/ID/app`` and every URL it makes stays under ``/apps/ID/``.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from explorer._checks import check_int

REPO_ROOT = Path(__file__).resolve().parents[2]
HOP_BY_HOP = {"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te",
              "trailers", "transfer-encoding", "upgrade", "content-length", "host",
              "authorization", "cookie", "content-encoding"}
PASSED_RAW = {"content-length", "content-encoding"}  # the answer's bytes pass unchanged


class AppUnavailable(RuntimeError):
    """The dataset's app process did not come up."""


class AppsBusy(AppUnavailable):
    """No app process may start now: the limits are reached and every running process has
    someone using it (answered 503; nobody's live session is stopped to make room)."""


SOCK_PREFIX = "explorer-apps-"


def _die_with_parent() -> None:
    """In the app process before exec: SIGKILL when the service dies (PR_SET_PDEATHSIG)."""
    try:
        import ctypes
        import signal

        ctypes.CDLL(None).prctl(1, signal.SIGKILL)
    except (OSError, AttributeError):
        pass


def remove_stale_socket_dirs(tmp: Path | None = None) -> list[Path]:
    """Remove the socket folders of services that are gone (``explorer-apps-PID-*`` whose
    PID is not running, owned by this user); return them. Folders of running services stay."""
    tmp = Path(tmp or tempfile.gettempdir())
    removed = []
    for d in tmp.glob(SOCK_PREFIX + "*"):
        try:
            if d.is_symlink() or not d.is_dir() or d.stat().st_uid != os.getuid():
                continue
            pid = int(d.name[len(SOCK_PREFIX):].split("-", 1)[0])
        except (OSError, ValueError):
            continue  # not one of ours (or an old unnamed one: it may belong to a live service)
        if pid == os.getpid() or _pid_alive(pid):
            continue
        shutil.rmtree(d, ignore_errors=True)
        removed.append(d)
    return removed


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class LiveSessions:
    """The app websockets the service is proxying now, each with who opened it (user id,
    login session) and the dataset, so that revoking access can end them at once."""

    def __init__(self):
        self._open: dict[int, dict] = {}
        self._next = 0

    def add(self, user_id: int, session: str | None, ds_id: str) -> tuple[int, asyncio.Event]:
        """Register one socket; its event is set when its access should be checked now."""
        self._next += 1
        ev = asyncio.Event()
        self._open[self._next] = {"user": user_id, "session": session, "ds": ds_id, "check": ev}
        return self._next, ev

    def remove(self, key: int) -> None:
        self._open.pop(key, None)

    def count(self, ds_id: str) -> int:
        return sum(1 for e in self._open.values() if e["ds"] == ds_id)

    def recheck(self, *, ds_id: str | None = None, user_id: int | None = None,
                session: str | None = None) -> int:
        """Ask the matching sockets to check their access now (a socket whose access is
        gone closes); return how many were asked."""
        n = 0
        for e in list(self._open.values()):
            if (ds_id is None or e["ds"] == ds_id) and (user_id is None or e["user"] == user_id) \
                    and (session is None or e["session"] == session):
                e["check"].set()
                n += 1
        return n


class AppServers:
    """The app processes: at most ``max_running`` at once and ``max_per_user`` started by
    one user; to start another, the least recently used process that nobody has open (no
    live websocket) is stopped, and if there is none the start is refused (:class:`AppsBusy`)."""

    def __init__(self, data_dir: Path, idle: float = 1800.0, max_running: int = 8,
                 start_timeout: float = 90.0, max_per_user: int = 3):
        self.data_dir = Path(data_dir)
        self.idle = idle
        self.max_running = check_int("max_running", max_running, 1)
        self.max_per_user = check_int("max_per_user", max_per_user, 1)
        self.start_timeout = start_timeout
        self.live = LiveSessions()
        self._sock_dir: Path | None = None
        self._procs: dict[str, tuple[subprocess.Popen, Path, float]] = {}
        self._started_by: dict[str, int | None] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self._built: dict[str, int] = {}  # the CSV's mtime when each process started

    @property
    def sock_dir(self) -> Path:
        """A short path (a Unix socket path has ~100 bytes) that only this user can enter;
        its name carries the service's PID so the next start can tell it is stale."""
        if self._sock_dir is None:
            remove_stale_socket_dirs()
            self._sock_dir = Path(tempfile.mkdtemp(prefix=f"{SOCK_PREFIX}{os.getpid()}-"))
            os.chmod(self._sock_dir, 0o700)
        return self._sock_dir

    def socket_for(self, ds_id: str) -> Path:
        return self.sock_dir / f"{ds_id}.sock"

    def running(self) -> dict[str, int]:
        """Dataset id -> PID of each app process running now."""
        return {k: v[0].pid for k, v in self._procs.items() if v[0].poll() is None}

    async def ensure(self, ds_id: str, app_dir: Path, csv: Path,
                     user_id: int | None = None) -> Path:
        """The socket of the dataset's running app process (started if needed, counted
        against ``user_id``'s share)."""
        lock = self._locks.setdefault(ds_id, asyncio.Lock())
        async with lock:
            self._stop_idle()
            entry = self._procs.get(ds_id)
            built = _mtime(csv)
            if entry is not None and entry[0].poll() is None and self._built.get(ds_id) == built:
                self._procs[ds_id] = (entry[0], entry[1], time.monotonic())
                return entry[1]
            self.stop(ds_id)  # gone, or the dataset was built again since it started
            self._make_room(user_id)
            self._built[ds_id] = built
            return await self._start(ds_id, app_dir, csv, user_id)

    def _make_room(self, user_id: int | None) -> None:
        """Stop what must stop for one more process of ``user_id``, or raise AppsBusy."""
        mine = [k for k in self._procs if self._started_by.get(k) == user_id]
        if user_id is not None and len(mine) >= self.max_per_user:
            if not self._stop_lru(mine):
                raise AppsBusy(f"you have {len(mine)} apps open (the limit is "
                               f"{self.max_per_user}); close one and try again")
        while len(self._procs) >= self.max_running:
            if not self._stop_lru(list(self._procs)):
                raise AppsBusy(f"{len(self._procs)} apps are open and in use (the limit is "
                               f"{self.max_running}); try again later")

    def _stop_lru(self, candidates: list[str]) -> bool:
        free = [k for k in candidates if self.live.count(k) == 0]
        if not free:
            return False
        self.stop(min(free, key=lambda k: self._procs[k][2]))
        return True

    async def _start(self, ds_id: str, app_dir: Path, csv: Path, user_id: int | None) -> Path:
        sock = self.socket_for(ds_id)
        sock.unlink(missing_ok=True)
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(
            [str(REPO_ROOT)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
        env["EXPLORER_APP_PREFIX"] = f"/apps/{ds_id}"  # the app builds its URLs under it
        log = open(self.data_dir / "logs" / f"app-{ds_id}.log", "ab")
        try:
            proc = subprocess.Popen(
                [sys.executable, "-m", "bokeh", "serve", str(app_dir), "--unix-socket", str(sock),
                 "--prefix", f"/apps/{ds_id}", "--log-level", "warning", "--args", str(csv)],
                stdin=subprocess.DEVNULL, stdout=log, stderr=log, env=env, cwd=str(app_dir.parent),
                preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None)
        finally:
            log.close()
        self._procs[ds_id] = (proc, sock, time.monotonic())
        self._started_by[ds_id] = user_id
        t0 = time.monotonic()
        while time.monotonic() - t0 < self.start_timeout:
            if proc.poll() is not None:
                self.stop(ds_id)
                raise AppUnavailable(f"the app process exited with status {proc.returncode}")
            if sock.exists() and _connects(sock):
                return sock
            await asyncio.sleep(0.1)
        self.stop(ds_id)
        raise AppUnavailable(f"the app did not start within {self.start_timeout:.0f} s")

    def _stop_idle(self) -> None:
        now = time.monotonic()
        for ds_id, (proc, _, used) in list(self._procs.items()):
            if proc.poll() is not None or (now - used > self.idle and self.live.count(ds_id) == 0):
                self.stop(ds_id)

    def stop(self, ds_id: str) -> None:
        entry = self._procs.pop(ds_id, None)
        self._started_by.pop(ds_id, None)
        if entry is None:
            return
        proc, sock, _ = entry
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        sock.unlink(missing_ok=True)

    def stop_all(self) -> None:
        for ds_id in list(self._procs):
            self.stop(ds_id)
        if self._sock_dir is not None:
            shutil.rmtree(self._sock_dir, ignore_errors=True)
            self._sock_dir = None


def _mtime(path: Path) -> int:
    try:
        return path.stat().st_mtime_ns
    except OSError:
        return 0


def _connects(sock: Path) -> bool:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.settimeout(0.5)
        s.connect(str(sock))
        return True
    except OSError:
        return False
    finally:
        s.close()


# --------------------------------------------------------------------------- proxying
async def proxy_http(request, sock: Path, path: str, own_cookie: str):
    """Pass an HTTP request to the app on ``sock``; return a Starlette response.

    Both ways stream: the request body goes upstream as the client sends it (the service's
    front door, :mod:`explorer.service.guard`, caps it), and the answer comes back as the app
    writes it (an export of gigabytes passes through in bounded memory). An app that cannot
    be reached or breaks off answers 502. The service's own login cookie (``own_cookie``)
    and ``Authorization`` never reach the app; the app's other cookies pass both ways (a
    Set-Cookie naming ``own_cookie`` is dropped).
    """
    import httpx
    from starlette.background import BackgroundTask
    from starlette.responses import JSONResponse, StreamingResponse

    headers = [(k, v) for k, v in request.headers.items() if k.lower() not in HOP_BY_HOP]
    headers.append(("host", request.headers.get("host", "localhost")))
    cookies = "; ".join(f"{k}={v}" for k, v in request.cookies.items() if k != own_cookie)
    if cookies:
        headers.append(("cookie", cookies))
    length = request.headers.get("content-length")
    chunked = "chunked" in request.headers.get("transfer-encoding", "").lower()
    content = None
    if length not in (None, "0") or chunked:
        content = request.stream()
        if length is not None:
            headers.append(("content-length", length))
    url = httpx.URL("http://localhost" + path, query=request.url.query.encode())
    client = httpx.AsyncClient(transport=httpx.AsyncHTTPTransport(uds=str(sock)),
                               timeout=httpx.Timeout(60.0, connect=10.0))
    try:
        r = await client.send(client.build_request(request.method, url, headers=headers,
                                                   content=content), stream=True)
    except httpx.HTTPError as exc:
        await client.aclose()
        print(f"explorer serve: app {path}: {type(exc).__name__}: {exc}", file=sys.stderr,
              flush=True)
        return JSONResponse({"error": f"the app did not answer ({type(exc).__name__})"},
                            status_code=502)
    except BaseException:
        await client.aclose()
        raise

    async def body():
        try:
            async for chunk in r.aiter_raw():
                yield chunk
        except httpx.HTTPError as exc:  # headers are sent: a cut-off body is all we can say
            print(f"explorer serve: app {path}: broke off: {type(exc).__name__}",
                  file=sys.stderr, flush=True)

    async def close():
        await r.aclose()
        await client.aclose()

    resp = StreamingResponse(body(), status_code=r.status_code, background=BackgroundTask(close))
    for k, v in r.headers.multi_items():
        lk = k.lower()
        if (lk in HOP_BY_HOP and lk not in PASSED_RAW) or \
                (lk == "set-cookie" and v.split("=", 1)[0].strip() == own_cookie):
            continue
        resp.raw_headers.append((lk.encode("latin-1"), v.encode("latin-1")))
    return resp


class _UnixResolver:
    """A tornado resolver that sends every connection to one Unix socket."""

    def __init__(self, sock: Path):
        self.sock = str(sock)

    async def resolve(self, host, port, family=socket.AF_UNSPEC):
        return [(socket.AF_UNIX, self.sock)]

    def close(self):
        pass


async def proxy_websocket(websocket, sock: Path, path: str, *, allowed=None,
                          check: asyncio.Event | None = None, every: float = 2.0) -> None:
    """Join the browser's websocket to the app's websocket at ``path`` on ``sock``.

    ``allowed``: an async callable that says whether the browser may still use the app; it
    is asked every ``every`` seconds and whenever ``check`` is set (logout, un-sharing,
    deletion), and when it says no the socket is closed with 1008 (policy violation).
    """
    from starlette.websockets import WebSocketDisconnect
    from tornado.httpclient import HTTPRequest
    from tornado.websocket import WebSocketClosedError, websocket_connect

    protos = list(websocket.scope.get("subprotocols") or []) or [
        p.strip() for p in websocket.headers.get("sec-websocket-protocol", "").split(",")
        if p.strip()]
    query = websocket.url.query
    req = HTTPRequest("ws://localhost" + path + (f"?{query}" if query else ""),
                      headers={"Host": websocket.headers.get("host", "localhost")},
                      connect_timeout=30, request_timeout=30)
    # no Origin upstream: the service checked it (same origin) before calling this
    try:
        upstream = await websocket_connect(req, subprotocols=protos or None,
                                           resolver=_UnixResolver(sock),
                                           max_message_size=256 * 2**20)
    except Exception as exc:  # noqa: BLE001 - app down or refused: close the browser's socket
        print(f"explorer serve: app websocket {path}: {type(exc).__name__}: {exc}",
              file=sys.stderr, flush=True)
        await websocket.close(code=1011)
        return
    await websocket.accept(subprotocol=upstream.selected_subprotocol)

    async def down():
        while True:
            msg = await upstream.read_message()
            if msg is None:
                break
            if isinstance(msg, bytes):
                await websocket.send_bytes(msg)
            else:
                await websocket.send_text(msg)

    async def up():
        while True:
            m = await websocket.receive()
            if m["type"] == "websocket.disconnect":
                break
            if m.get("bytes") is not None:
                await upstream.write_message(m["bytes"], binary=True)
            elif m.get("text") is not None:
                await upstream.write_message(m["text"])

    revoked = False

    async def watch():
        nonlocal revoked
        ev = check or asyncio.Event()
        while True:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(ev.wait(), every)
            ev.clear()
            if not await allowed():
                revoked = True
                return

    tasks = [asyncio.ensure_future(down()), asyncio.ensure_future(up())]
    if allowed is not None:
        tasks.append(asyncio.ensure_future(watch()))
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    except (WebSocketDisconnect, WebSocketClosedError):
        pass
    finally:
        for t in tasks:
            t.cancel()
        upstream.close()
        with contextlib.suppress(RuntimeError, WebSocketDisconnect):
            await websocket.close(code=1008 if revoked else 1000)
