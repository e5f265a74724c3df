"""Helpers for the service tests: the app in this process (:class:`Local`, most tests) or a
real ``explorer serve`` subprocess on a free port (:class:`Server`, for the process model:
restart, crash, the app processes and their websockets, limits on real sockets)."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def add_user(data: Path, name: str, *extra: str) -> str:
    """``explorer users add`` in a subprocess; return the token (the last line printed)."""
    out = subprocess.run([sys.executable, "-m", "explorer.cli", "users", "add", name, *extra,
                          "--data", str(data)], env=_env(), capture_output=True, text=True,
                         check=True)
    return out.stdout.strip().splitlines()[-1]


def local_user(data: Path, name: str, *, admin: bool = False, projects: tuple = ()) -> str:
    """A user added straight to the records (what ``explorer users add`` does); the token."""
    from explorer.service.db import DB

    Path(data).mkdir(parents=True, exist_ok=True)
    return DB(Path(data) / "service.db").add_user(name, admin=admin, projects=list(projects))


class Local:
    """The service's app in this process (``create_app``), its lifespan (the job queue)
    running while the ``with`` block lasts; ``client(token)`` is a ``TestClient``."""

    def __init__(self, root: Path, data: Path, **config):
        from explorer.service.api import ServiceConfig, create_app

        self.root, self.data = Path(root), Path(data)
        self.app = create_app(ServiceConfig(root=root, data=data, **config))
        self._life = None
        self._clients: list = []

    def __enter__(self) -> "Local":
        from fastapi.testclient import TestClient

        self._life = TestClient(self.app)
        self._life.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        for c in self._clients:
            c.close()
        self._life.__exit__(*exc)

    def client(self, token: str | None = None):
        from fastapi.testclient import TestClient

        headers = {"Authorization": f"Bearer {token}"} if token else {}
        c = TestClient(self.app, headers=headers, raise_server_exceptions=False)
        self._clients.append(c)
        return c


def _env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO)
    env["EXPLORER_NO_WARMUP"] = "1"
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


class Server:
    """``explorer serve`` on 127.0.0.1:free port; ``start()``/``stop()`` (SIGTERM, then kill)."""

    def __init__(self, root: Path, data: Path, *args: str, nofile: int | None = None):
        self.root, self.data, self.args = Path(root), Path(data), list(args)
        self.nofile = nofile  # a soft descriptor limit to start under (like ``ulimit -n``)
        self.proc: subprocess.Popen | None = None
        self.url = ""
        self.log = self.data / "serve.log"

    def start(self, timeout: float = 60.0) -> "Server":
        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        self.data.mkdir(parents=True, exist_ok=True)
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "explorer.cli", "serve", "--root", str(self.root),
                 "--data", str(self.data), "--port", str(port), "--log-level", "warning",
                 *self.args], env=_env(), stdout=log, stderr=log,
                preexec_fn=self._limit if self.nofile else None)
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout:
            if self.proc.poll() is not None:
                raise RuntimeError(f"explorer serve exited: {self.log.read_text()[-3000:]}")
            try:
                if httpx.get(self.url + "/openapi.json", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        self.stop()
        raise RuntimeError("explorer serve did not answer within the timeout")

    def _limit(self) -> None:
        import resource

        resource.setrlimit(resource.RLIMIT_NOFILE,
                           (self.nofile, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))

    @property
    def port(self) -> int:
        return int(self.url.rsplit(":", 1)[1])

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def client(self, token: str | None = None, **kw) -> httpx.Client:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=kw.pop("timeout", 60),
                            **kw)


def wait_job(client: httpx.Client, job: str, timeout: float = 300.0) -> dict:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        j = client.get(f"/api/jobs/{job}").json()
        if j["state"] in ("done", "failed"):
            return j
        time.sleep(0.3)
    raise AssertionError(f"job {job} still {j['state']} after {timeout} s")


def app_session(server, token):
    """A browser-like client logged in with ``token`` (the login cookie), or anonymous."""
    b = httpx.Client(base_url=server.url, timeout=120)
    if token:
        r = b.post("/login", data={"token": token, "next": "/apps/x"})
        assert r.status_code == 303 and "explorer_session" in b.cookies
    return b


def pull_document(server, b, path):
    """Open the app page and its websocket as Bokeh's client does; return the document JSON."""
    page, ws = open_app_socket(server, b, path)
    try:
        return page, pull(ws)
    finally:
        ws.close()


def open_app_socket(server, b, path):
    """Open the app page and its websocket as Bokeh's client does; return (page, socket)
    after the server's ACK."""
    import websocket

    page = b.get(path)
    assert page.status_code == 200, page.text[:300]
    token = re.search(r'"token":\s*"([^"]+)"', page.text).group(1)
    ws = websocket.create_connection(
        server.url.replace("http", "ws") + path + "/ws", subprotocols=["bokeh", token],
        cookie="; ".join(f"{k}={v}" for k, v in b.cookies.items()), origin=server.url,
        timeout=120)
    assert json.loads(ws.recv())["msgtype"] == "ACK"
    ws.recv(), ws.recv()
    return page.text, ws


def pull(ws) -> str:
    """One PULL-DOC-REQ on an open app socket; the document's JSON."""
    for part in (json.dumps({"msgid": "1", "msgtype": "PULL-DOC-REQ"}), "{}", "{}"):
        ws.send(part)
    header = json.loads(ws.recv())
    ws.recv()
    content = ws.recv()
    for _ in range(2 * header.get("num_buffers", 0)):  # each array: a header and its bytes
        ws.recv()
    assert header["msgtype"] == "PULL-DOC-REPLY"
    return content
