"""The app under a real ``bokeh serve``: our handlers (exports, thumbnails) added from
app_hooks.py, driven through ``bokeh.client`` sessions (no browser needed)."""

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
    thumbnails point off-site, at the app's own code and out of the app."""
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
    mp = pytest.MonkeyPatch()
    mp.setenv("EXPLORER_EXPORT_TTL", str(TTL))
    try:
        proc, url = B.launch(app_dir, csv)
    finally:
        mp.undo()
    _SERVED.append(proc)
    yield url, app_dir
    B.stop(proc)
    _SERVED.remove(proc)


_SERVED: list = []


def test_the_server_loaded_hook_runs_without_error(server):
    """on_server_loaded installs the export handler, schedules the expiry of exports and
    starts the preload: an exception there (bokeh only logs it) would leave exports undeleted."""
    _get(server[0])
    log = _SERVED[-1].log
    log.seek(0)
    text = log.read().decode(errors="replace")
    assert "exports served to their own session" in text
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


def test_exports_go_to_their_own_session_only_and_expire(server):
    from bokeh.client import pull_session

    url, app_dir = server
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
    # nothing under the app's static folder, and the link dies after the expiry
    assert not (app_dir / "static" / "exports").exists()
    time.sleep(TTL + 1)
    assert _get(zip_url, key_a)[0] == 404


def test_hostile_run_record_exports_no_system_file(server):
    """H1 through the served app: root "/" refused, /etc/passwd never in the zip."""
    from bokeh.client import pull_session

    url, _ = server
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


def test_thumbnails_are_served_by_row_and_only_images_inside_the_app(server):
    url, _ = server
    host = _host(url)
    status, body, headers = _get(f"{host}/app/_thumb/10")
    assert status == 200 and headers["Content-Type"] == "image/jpeg" and body[:2] == b"\xff\xd8"
    for row in (2, 3, 4, 999999, 35):  # main.py, off-site, ../app.csv, out of range
        assert _get(f"{host}/app/_thumb/{row}")[0] == 404, row
    assert _get(f"{host}/app/_thumb/-1")[0] == 404


def test_demo_app_is_an_up_to_date_copy_of_the_template():
    """demo/ is what `explorer build --app demo` installs from app_files/: no stale copies."""
    template = ROOT / "app_files"
    files = [p for p in template.rglob("*") if p.is_file() and "__pycache__" not in p.parts]
    assert any(p.name == "app_hooks.py" for p in files)
    for src in files:
        copy = ROOT / "demo" / src.relative_to(template)
        assert copy.is_file() and copy.read_bytes() == src.read_bytes(), f"demo is stale: {copy}"
