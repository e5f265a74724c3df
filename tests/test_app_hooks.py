"""The app under a real ``bokeh serve``: our handlers (exports, thumbnails, the Host check)
added from app_hooks.py, driven through ``bokeh.client`` sessions (no browser needed).

How these were shown able to fail (review T1), each by breaking app_files/app_hooks.py once:
``preload()`` raising instead of ``load_project`` -> the preload test fails (no "35 rows
loaded"); the ``PeriodicCallback(store().expire, ...)`` line deleted -> the expiry test fails
("an expired export was not deleted"); ``warm_up()`` raising at entry -> the warm-up test
fails (these three at once: 4 failed, the demo-copy test included); ``DownloadStore.close``
made a no-op (the unload hook and atexit both call it) -> the folder test fails;
``protect(server_context)``
deleted -> the rebound-Host test fails (200 instead of 403). No fixed sleeps: a short
``EXPLORER_EXPORT_TTL`` and polling."""

from __future__ import annotations

import json
import sys
import time
import urllib.error
import urllib.request
import zipfile
from io import BytesIO
from pathlib import Path

import pandas as pd
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).parent))
import _browser as B  # noqa: E402
from _appdata import make_app  # noqa: E402

from explorer.table import sidecar  # noqa: E402

TTL = 6


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """A hostile project: run record says the images are at /, paths point into /etc,
    thumbnails point off-site, at the app's own code and out of the app.

    The server runs its re-cluster warm-up (as ``bokeh serve`` does for a person), keeps its
    private export folders under ``exports/`` of the test folder and expires exports after
    ``TTL`` seconds."""
    root = tmp_path_factory.mktemp("served")
    app_dir, csv = make_app(root, hostile=False)
    df = pd.read_csv(csv)
    df.loc[0, "path"] = "etc/passwd"
    df.loc[1, "path"] = "etc/hostname"
    df.loc[2, "image"] = "main.py"
    df.loc[3, "image"] = "https://tracker.example/x.jpg"
    df.loc[4, "image"] = "../app.csv"
    df.to_csv(csv, index=False)
    sidecar(csv, "run.json").write_text(json.dumps({"image_dir": "/", "image_dir_from_csv": "../" * 40}))
    exports = root / "exports"
    proc, url = B.launch(app_dir, csv, warm_up=True,
                         env={"EXPLORER_EXPORT_TTL": str(TTL), "EXPLORER_EXPORT_DIR": str(exports)})
    _SERVED.append(proc)
    yield url, app_dir, exports
    B.stop(proc)
    _SERVED.remove(proc)


_SERVED: list = []


def _log_text(proc):
    proc.log.seek(0)
    return proc.log.read().decode(errors="replace")


def _wait_log(proc, *wanted, timeout=60.0):
    """The server's log once it holds every string of ``wanted`` (polled; fails on timeout)."""
    deadline = time.monotonic() + timeout
    while True:
        text = _log_text(proc)
        if all(w in text for w in wanted) or time.monotonic() > deadline:
            missing = [w for w in wanted if w not in text]
            assert not missing, f"not in the server log after {timeout:.0f} s: {missing}\n{text[-3000:]}"
            return text
        time.sleep(0.2)


@pytest.mark.slow
def test_the_server_loaded_hook_installs_exports_and_preloads_the_project(server):
    """on_server_loaded installs the export handler and reads the project before the first
    visit (preload). Fails when preload() raises (it logs "not preloaded" instead of the
    row count) or the hook itself raises (bokeh only logs it)."""
    text = _wait_log(_SERVED[-1], "exports served to their own session", "explorer: 35 rows loaded in")
    assert "not preloaded" not in text
    assert "Error in server loaded hook" not in text and "Traceback" not in text, text[-3000:]


def _host(url):
    return url.rsplit("/", 1)[0]


def _get(url, cookie=None):
    req = urllib.request.Request(url, headers={"Cookie": f"explorer_dl={cookie}"} if cookie else {})
    try:
        with urllib.request.urlopen(req, timeout=20) as r:
            return r.status, r.read(), r.headers
    except urllib.error.HTTPError as e:
        return e.code, b"", e.headers


def _session_key(doc):
    dl = doc.select_one({"name": "downloads"})
    return dl.js_property_callbacks["change:data"][0].args["key"]


def _save(session, rows, name="sel", images=True, timeout=30.0):
    from bokeh.events import ButtonClick

    doc = session.document
    doc.select_one({"name": "points"}).selected.indices = list(rows)
    doc.select_one({"name": "save_name"}).value = name
    doc.select_one({"name": "save_images"}).active = images
    dl = doc.select_one({"name": "downloads"})
    before = list(dl.data["url"])
    doc.callbacks.send_event(ButtonClick(doc.select_one({"name": "save"})))
    deadline = time.monotonic() + timeout
    session._connection._loop_until(lambda: dl.data["url"] != before or time.monotonic() > deadline)
    assert dl.data["url"] != before, doc.select_one({"name": "status"}).text
    return dict(dl.data)


@pytest.mark.slow
def test_exports_go_to_their_own_session_only_and_expire(server):
    """An export is downloadable by its own session only, and its file is deleted after the
    expiry even if nobody asks for it again (the server's periodic sweep: the lazy check on
    download alone would keep the files of exports nobody fetches forever)."""
    from bokeh.client import pull_session

    url, app_dir, exports = server
    with pull_session(url=url) as a, pull_session(url=url) as b:
        key_a, key_b = _session_key(a.document), _session_key(b.document)
        assert key_a != key_b and len(key_a) >= 24
        data = _save(a, range(8), "mine")
        zip_url = _host(url) + data["url"][1]
        assert "/static/" not in zip_url
        assert _get(zip_url)[0] == 403  # no cookie
        assert _get(zip_url, key_b)[0] == 403  # another session's key
        status, body, headers = _get(zip_url, key_a)
        assert status == 200 and headers["Content-Type"] == "application/zip"
        assert "attachment" in headers["Content-Disposition"] and headers["Cache-Control"] == "no-store"
        names = zipfile.ZipFile(BytesIO(body)).namelist()
        # the root "/" is refused, so thumbnails; rows 2-4 have none that may be served
        assert sorted(names) == sorted([f"thumbnails/cat_{i:03d}_t.jpg" for i in (0, 1, 5, 6, 7)] + ["MISSING.txt"])
        token = zip_url.split("/_exports/")[1].split("/")[0]
        written = list(exports.glob(f"explorer-exports-*/{token}/*"))
        assert len(written) == 1  # the private folder, not the app's static folder
        assert not (app_dir / "static" / "exports").exists()
        # no request meanwhile, and the session stays open (its end would delete it too)
        deadline = time.monotonic() + TTL + 15
        while written[0].exists() and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not written[0].exists(), "an expired export was not deleted by the server"
    assert _get(zip_url, key_a)[0] == 404


@pytest.mark.slow
def test_hostile_run_record_exports_no_system_file(server):
    """H1 through the served app: root "/" refused, /etc/passwd never in the zip."""
    from bokeh.client import pull_session

    url = server[0]
    with pull_session(url=url) as s:
        status_text = s.document.select_one({"name": "status"}).text
        assert "refused" in status_text  # the note on the page; the map still opens
        assert len(s.document.select_one({"name": "points"}).data["x"]) == 35
        data = _save(s, [0, 1, 2, 3, 4, 5], "hostile")
        status, body, _ = _get(_host(url) + data["url"][1], _session_key(s.document))
    assert status == 200
    with zipfile.ZipFile(BytesIO(body)) as zf:
        content = b"".join(zf.read(n) for n in zf.namelist())
        names = zf.namelist()
    assert b"root:" not in content and not any("passwd" in n or n.endswith(".py") or n.endswith(".csv") for n in names)
    assert all(n.startswith("thumbnails/") or n == "MISSING.txt" for n in names)


@pytest.mark.slow
def test_thumbnails_are_served_by_row_and_only_images_inside_the_app(server):
    url = server[0]
    host = _host(url)
    status, body, headers = _get(f"{host}/app/_thumb/10")
    assert status == 200 and headers["Content-Type"] == "image/jpeg" and body[:2] == b"\xff\xd8"
    for row in (2, 3, 4, 999999, 35):  # main.py, off-site, ../app.csv, out of range
        assert _get(f"{host}/app/_thumb/{row}")[0] == 404, row
    assert _get(f"{host}/app/_thumb/-1")[0] == 404


def _raw(port, request):
    """Send ``request`` (bytes) to 127.0.0.1:``port``; the status code of the answer."""
    import socket

    with socket.create_connection(("127.0.0.1", port), timeout=20) as s:
        s.sendall(request)
        head = b""
        while b"\r\n" not in head:
            chunk = s.recv(4096)
            if not chunk:
                break
            head += chunk
    return int(head.split(b" ", 2)[1])


def _upgrade(port, path, host, origin):
    return _raw(port, (
        f"GET {path} HTTP/1.1\r\nHost: {host}\r\nOrigin: {origin}\r\nConnection: Upgrade\r\n"
        "Upgrade: websocket\r\nSec-WebSocket-Version: 13\r\n"
        "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n").encode())


def _plain(port, path, host):
    return _raw(port, f"GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())


@pytest.mark.slow
def test_a_rebound_host_name_gets_403_on_the_page_thumbnails_and_websocket(server):
    """DNS rebinding (review N2): a page on attacker.example whose name now points at
    127.0.0.1 sends Host = Origin = attacker.example:PORT. Tornado lets such a websocket in
    (Origin equals Host) and the page and thumbnail handlers never looked at Host: all three
    must answer 403, while this computer's names keep working."""
    url = server[0]
    port = int(url.split(":")[2].split("/")[0])
    evil = f"attacker.example:{port}"
    assert _plain(port, "/app", evil) == 403
    assert _plain(port, "/app/_thumb/10", evil) == 403
    assert _upgrade(port, "/app/ws", evil, f"http://{evil}") == 403
    assert _plain(port, "/app/_thumb/10", f"127.0.0.1:{port + 1}") == 403  # another port of this computer
    for name in ("127.0.0.1", "localhost", "LOCALHOST", "[::1]"):
        assert _plain(port, "/app", f"{name}:{port}") == 200, name
        assert _plain(port, "/app/_thumb/10", f"{name}:{port}") == 200, name
    # the websocket of this computer's page still opens (--allow-websocket-origin 127.0.0.1:PORT)
    mine = f"127.0.0.1:{port}"
    assert _upgrade(port, "/app/ws", mine, f"http://{mine}") == 101
    # and Bokeh's own Origin check still refuses a foreign page on the right Host
    assert _upgrade(port, "/app/ws", mine, f"http://{evil}") == 403


def test_demo_app_is_an_up_to_date_copy_of_the_template():
    """demo/ is what `explorer build --app demo` installs from app_files/: no stale copies."""
    template = ROOT / "app_files"
    files = [p for p in template.rglob("*") if p.is_file() and "__pycache__" not in p.parts]
    assert any(p.name == "app_hooks.py" for p in files)
    for src in files:
        copy = ROOT / "demo" / src.relative_to(template)
        assert copy.is_file() and copy.read_bytes() == src.read_bytes(), f"demo is stale: {copy}"


def test_host_allowed_takes_this_computer_on_its_port_and_the_allowlist():
    from explorer.app.serving import host_allowed, split_host

    assert host_allowed("127.0.0.1:5006", 5006) and host_allowed("[::1]:5006", 5006)
    assert host_allowed("localhost", 80) and not host_allowed("localhost", 5006)
    assert not host_allowed("127.0.0.1:5007", 5006)
    assert not host_allowed("attacker.example:5006", 5006)
    assert not host_allowed("localhost.attacker.example:5006", 5006)
    assert not host_allowed("", 5006) and not host_allowed(None, 5006) and not host_allowed("[::1", 5006)
    assert host_allowed("box.lan:5006", 5006, ["box.lan:5006"])
    assert not host_allowed("box.lan:5007", 5006, ["box.lan:5006"])
    assert split_host("[::1]:8080") == ("[::1]", 8080) and split_host("Example.ORG") == ("example.org", None)
    with pytest.raises(ValueError, match="99999"):
        split_host("localhost:99999")


@pytest.mark.slow
def test_the_re_cluster_warm_up_runs_in_the_served_app(server):
    """on_server_loaded compiles the re-cluster code in the worker process while the person
    looks at the map (every other test server skips it with EXPLORER_NO_WARMUP). Fails when
    warm_up() raises or is not called: the log never says it compiled."""
    text = _wait_log(_SERVED[-1], "re-cluster code compiled in", timeout=300)
    assert "warm-up failed" not in text


@pytest.mark.slow
def test_private_export_folders_are_removed_when_the_server_stops(tmp_path):
    """Exports live in a private folder of the server process (review N16: they outlived it).
    Stopping ``bokeh serve`` (SIGTERM, as Ctrl-C or a service does) deletes the folder."""
    from bokeh.client import pull_session

    app_dir, csv = make_app(tmp_path / "app", hostile=False)
    exports = tmp_path / "exports"
    proc, url = B.launch(app_dir, csv, env={"EXPLORER_EXPORT_DIR": str(exports)})
    try:
        with pull_session(url=url) as s:
            _save(s, range(4), "mine", images=False)
        assert len(list(exports.glob("explorer-exports-*/*/mine.csv"))) == 1
    finally:
        B.stop(proc)
    assert proc.returncode is not None
    assert list(exports.iterdir()) == [], list(exports.rglob("*"))
