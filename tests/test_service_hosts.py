"""DNS rebinding against ``explorer serve`` (review N2, "same for the service"): a request
whose ``Host`` is not this computer, the address listened on or an ``--allowed-host`` name is
answered 403 before any route runs, HTTP and websocket alike.

Proven able to fail: without the ``Host`` check in ``explorer.service.guard.Guard`` (or with
``serve()`` not passing ``allowed_hosts``) the attacker's requests get 200 / 401 instead of 403.
"""

from __future__ import annotations

import socket
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from _imagegen import image_folder  # noqa: E402
from _service import Local, Server, add_user, local_user  # noqa: E402


pytestmark = pytest.mark.slow  # a real explorer serve (make test-fast leaves it out)


@pytest.fixture(scope="module")
def local(tmp_path_factory):
    base = tmp_path_factory.mktemp("hosts")
    image_folder(base / "root" / "photos", 2, size=32)
    token = local_user(base / "data", "alice")
    with Local(base / "root", base / "data", allowed_hosts=("explorer.example.org",)) as service:
        yield service, token


def _client(service, token, host):
    from fastapi.testclient import TestClient

    c = TestClient(service.app, base_url=f"http://{host}", raise_server_exceptions=False,
                   headers={"Authorization": f"Bearer {token}"})
    service._clients.append(c)
    return c


def test_a_rebound_host_gets_403_and_the_real_names_get_in(local):
    service, token = local
    assert _client(service, token, "attacker.example").get("/api/me").status_code == 403
    assert _client(service, token, "attacker.example:8000").get("/docs").status_code == 403
    for host in ("localhost", "127.0.0.1:8000", "[::1]", "explorer.example.org"):
        r = _client(service, token, host).get("/api/me")
        assert r.status_code == 200 and r.json()["name"] == "alice", (host, r.status_code)


def test_a_rebound_host_gets_no_websocket():
    """The guard closes a websocket with a foreign Host before the app sees it (raw ASGI)."""
    import asyncio

    from explorer.service.guard import Guard
    from explorer.service.uploads import Limits

    reached, sent = [], []

    async def inner(scope, receive, send):
        reached.append(scope["type"])

    guard = Guard(inner, authorized=lambda h: True, limits=Limits(), allowed_hosts=())

    async def receive():
        return {"type": "websocket.connect"}

    async def send(msg):
        sent.append(msg)

    def ws(host):
        return {"type": "websocket", "path": "/apps/x/app/ws", "server": ("127.0.0.1", 8000),
                "headers": [(b"host", host), (b"origin", b"http://" + host)]}

    asyncio.run(guard(ws(b"attacker.example:8000"), receive, send))
    assert reached == [] and sent == [{"type": "websocket.close", "code": 1008}]
    asyncio.run(guard(ws(b"127.0.0.1:8000"), receive, send))
    assert reached == ["websocket"]


def test_hosts_for_adds_the_address_listened_on_but_not_a_wildcard():
    from explorer.service import hosts_for

    assert hosts_for("10.1.2.3", 8000, ["explorer.example.org"]) == ("10.1.2.3:8000",
                                                                      "explorer.example.org")
    assert hosts_for("0.0.0.0", 8000) == ()
    assert hosts_for("::1", 9000) == ("[::1]:9000",)
    with pytest.raises(ValueError, match="allowed host"):
        hosts_for("127.0.0.1", 8000, [" "])


def _raw_get(port: int, host: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=20) as s:
        s.sendall(b"GET /api/me HTTP/1.1\r\nHost: " + host + b"\r\nConnection: close\r\n\r\n")
        return s.recv(200)


def test_explorer_serve_refuses_a_rebound_host(tmp_path):
    image_folder(tmp_path / "root" / "photos", 2, size=32)
    add_user(tmp_path / "data", "alice")
    srv = Server(tmp_path / "root", tmp_path / "data", "--allowed-host", "explorer.example.org")
    srv.start()
    try:
        port = srv.port
        assert _raw_get(port, b"attacker.example:%d" % port).startswith(b"HTTP/1.1 403")
        # the real names reach the token check (no token: 401)
        for host in (b"127.0.0.1:%d" % port, b"localhost", b"explorer.example.org"):
            assert _raw_get(port, host).startswith(b"HTTP/1.1 401"), host
    finally:
        srv.stop()
