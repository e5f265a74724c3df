"""``explorer serve`` end to end.

The API runs in this process (``create_app`` behind a ``TestClient``: users alice and bob in
project p1, carol in p2, an admin) with one default (network) build shared by the tests that
need built results. The process model runs a real ``explorer serve`` subprocess: the app
processes and their websockets (``served``), the queue across a crash and a restart.
"""

from __future__ import annotations

import io
import json
import os
import re
import signal
import sqlite3
import sys
import threading
import time
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest

sys.path.insert(0, str(Path(__file__).parent))
from _imagegen import image_folder, jpeg_bytes, variant  # noqa: E402
from _service import (Local, Server, add_user, app_session, grant,  # noqa: E402
                      local_user, pull_document, wait_job)

pytestmark = pytest.mark.slow  # real service builds, servers and workers (make test-fast leaves it out)

#: under ``reduce.MIN_UMAP_POINTS`` (16): the default build maps them with PCA, so its fresh
#: worker process pays no UMAP compile (about 20 CPU s); the map is the pipeline's tests'
N_PHOTOS = 15


def files_under(root: Path) -> set[str]:
    return {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()}


def _users(data: Path, add) -> dict:
    return {"alice": add(data, "alice", "--project", "p1"),
            "bob": add(data, "bob", "--project", "p1"),
            "carol": add(data, "carol", "--project", "p2"),
            "admin": add(data, "admin", "--admin")}


def _local_add(data, name, *args):
    projects = tuple(args[i + 1] for i, a in enumerate(args) if a == "--project")
    return local_user(data, name, admin="--admin" in args, projects=projects)


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    from explorer.service.uploads import Limits

    base = tmp_path_factory.mktemp("service")
    root = base / "root"
    image_folder(root / "photos", N_PHOTOS, size=64)
    image_folder(root / "other", 20, size=48)
    image_folder(base / "outside", 4, size=48)
    (root / "escape").symlink_to(base / "outside")
    (root / "a-file.txt").write_text("not a folder")
    data = base / "data"
    tokens = _users(data, _local_add)
    for p in ("p1", "p2"):  # all of --root (explorer users grant . --project P)
        grant(data, ".", project=p)
    with Local(root, data, allow_private_urls=True, url_timeout=1,
               limits=Limits(max_file_bytes=2**20)) as service:
        clients = {name: service.client(tok) for name, tok in tokens.items()}
        clients["anonymous"] = service.client()
        yield {"base": base, "root": root, "data": data, "service": service,
               "tokens": tokens, "c": clients}


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """A real ``explorer serve`` with alice's dataset of 12 photos built (phash, quick)."""
    base = tmp_path_factory.mktemp("served")
    root = base / "root"
    image_folder(root / "photos", 12, size=48)
    data = base / "data"
    tokens = _users(data, _local_add)  # `explorer users add` itself: test_users_command_...
    grant(data, "photos", user="alice")
    server = Server(root, data).start()
    c = server.client(tokens["alice"])
    ds = c.post("/api/datasets", json={"name": "photos", "folder": "photos"}).json()["id"]
    job = c.post(f"/api/datasets/{ds}/builds", json={"method": "phash"}).json()["job"]
    assert wait_job(c, job)["state"] == "done"
    c.close()
    yield {"base": base, "root": root, "data": data, "server": server, "tokens": tokens,
           "id": ds}
    server.stop()


@pytest.fixture(scope="module")
def built(site):
    """alice's dataset of root/photos, built with the default (network) method.

    While that build runs, an upload that asks for its own build is answered (its job waits:
    one build at a time), the list is served, and deleting the upload cancels its queued job.
    """
    c = site["c"]["alice"]
    r = c.post("/api/datasets", json={"name": "photos", "folder": "photos"})
    assert r.status_code == 201, r.text
    ds = r.json()["id"]
    r = c.post(f"/api/datasets/{ds}/builds", json={})
    assert r.status_code == 202, r.text
    job = r.json()["job"]
    seen, during = [], {}
    t0 = time.monotonic()
    while time.monotonic() - t0 < 600:
        j = c.get(f"/api/jobs/{job}").json()
        seen.append((j["state"], j["progress"], j["stage"]))
        if j["state"] == "running" and not during:
            files = [("files", (f"u{i}.jpg", jpeg_bytes(variant(20 + i, 40)), "image/jpeg"))
                     for i in range(4)]
            up = c.post("/api/datasets/upload", data={"name": "queued at upload",
                                                      "build": "phash"}, files=files)
            during = {"upload": up.json(), "upload_status": up.status_code,
                      "list_status": c.get("/api/datasets").status_code,
                      "upload_job": c.get(f"/api/jobs/{up.json()['job']}").json(),
                      "main_state_after": c.get(f"/api/jobs/{job}").json()["state"]}
            during["delete_status"] = c.delete(f"/api/datasets/{up.json()['id']}").status_code
            during["upload_job_after_delete"] = c.get(f"/api/jobs/{up.json()['job']}").json()
        if j["state"] in ("done", "failed"):
            break
        time.sleep(0.25)
    assert j["state"] == "done", j
    return {"id": ds, "job": j, "seen": seen, "during": during}


# --------------------------------------------------------------------------- end to end
def test_build_polls_to_done_with_progress_then_csv_and_export_zip(site, built):
    c = site["c"]["alice"]
    j = built["job"]
    assert j["progress"] == 1.0 and j["error"] is None and j["result"]["rows"] == N_PHOTOS
    assert j["params"]["method"] == "timm"
    states = [s for s, _, _ in built["seen"]]
    assert "running" in states and states[-1] == "done"
    running = [p for s, p, _ in built["seen"] if s == "running"]
    assert running == sorted(running), "progress never goes back"
    assert any(0 < p < 1 for p in running), "progress is reported while the job runs"

    r = c.get(f"/api/datasets/{built['id']}/table.csv")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/csv")
    import pandas as pd

    df = pd.read_csv(io.StringIO(r.text))
    assert sorted(df["path"]) == sorted(files_under(site["root"] / "photos"))
    assert {"x", "y", "cluster", "image"} <= set(df.columns)

    r = c.post(f"/api/datasets/{built['id']}/exports", json={"by": "cluster", "sample": "20%"})
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "application/zip"
    names = zipfile.ZipFile(io.BytesIO(r.content)).namelist()
    main = [n for n in names if not n.startswith("sample/") and n != "manifest.csv"]
    assert len(main) == N_PHOTOS
    assert all(re.match(r"^(cluster_\d+|outliers)/[^/]+$", n) for n in main), main
    expected = {f"cluster_{k}" for k in set(df["cluster"]) if k >= 0} | \
        ({"outliers"} if (df["cluster"] < 0).any() else set())
    assert {n.split("/")[0] for n in main} == expected
    sample = [n for n in names if n.startswith("sample/")]
    assert 0 < len(sample) < N_PHOTOS
    assert "manifest.csv" in names
    assert c.get(f"/api/datasets/{built['id']}").json()["built"] is True


def test_elbow_curve_and_suggested_k(site, built):
    r = site["c"]["alice"].get(f"/api/datasets/{built['id']}/elbow", params={"k_max": 8})
    assert r.status_code == 200, r.text
    e = r.json()
    assert e["k"] == list(range(1, 9))
    assert e["inertia"][0] > e["inertia"][-1]
    assert e["suggested_k"] in e["k"]
    assert site["c"]["alice"].get(f"/api/datasets/{built['id']}/elbow",
                                  params={"k_max": 1}).status_code == 422


def test_labels_go_through_the_apps_journal(site, built):
    c = site["c"]["alice"]
    ds = built["id"]
    keys = sorted(files_under(site["root"] / "photos"))[:3]
    r = c.post(f"/api/datasets/{ds}/labels", json={"op": "apply", "keys": keys, "label": "keep"})
    assert r.status_code == 200, r.text
    assert r.json()["changed"] == 3
    got = c.get(f"/api/datasets/{ds}/labels").json()
    assert {k: got["labels"][k] for k in keys} == {k: "keep" for k in keys}
    assert got["counts"]["keep"] == 3
    # the journal the app reads, beside the CSV
    from explorer.curation.journal import journal_for
    from explorer.curation.labels import LabelBook

    csv = site["data"] / "datasets" / ds / "app.csv"
    assert LabelBook.from_journal(journal_for(csv)).counts()["keep"] == 3
    r = c.post(f"/api/datasets/{ds}/labels", json={"op": "apply", "keys": ["no/such.jpg"],
                                                   "label": "x"})
    assert r.status_code == 422 and "unknown image key" in r.json()["error"]
    r = c.post(f"/api/datasets/{ds}/exports", json={"by": "label"})
    names = zipfile.ZipFile(io.BytesIO(r.content)).namelist()
    assert len([n for n in names if n.startswith("keep/")]) == 3
    c.post(f"/api/datasets/{ds}/labels", json={"op": "clear", "keys": keys})


def test_search_by_words_and_by_example_image(site, built):
    c = site["c"]["alice"]
    ds = built["id"]
    r = c.post(f"/api/datasets/{ds}/search", json={"text": "a cat", "top": 5})
    assert r.status_code == 200, r.text
    hits = r.json()["results"]
    assert 0 < len(hits) <= 5 and all({"path", "score"} <= set(h) for h in hits)
    assert [h["score"] for h in hits] == sorted((h["score"] for h in hits), reverse=True)
    example = (site["root"] / "photos" / "a" / "img4.jpg").read_bytes()
    r = c.post(f"/api/datasets/{ds}/search/image", data={"top": "3"},
               files={"image": ("q.jpg", example, "image/jpeg")})
    assert r.status_code == 200, r.text
    assert r.json()["results"][0]["path"] == "a/img4.jpg"
    r = c.post(f"/api/datasets/{ds}/search/image", files={"image": ("q.jpg", b"no", "image/jpeg")})
    assert r.status_code == 422 and "not usable" in r.json()["error"]
    assert site["c"]["carol"].post(f"/api/datasets/{ds}/search",
                                   json={"text": "cat"}).status_code == 404


# --------------------------------------------------------------------------- access
def test_access_matrix_for_the_api(site, built):
    c = site["c"]
    ds = built["id"]

    def status(who, method="GET", path=f"/api/datasets/{ds}", **kw):
        return c[who].request(method, path, **kw).status_code

    # private: the owner and admins only; everyone else 404, no token 401
    assert [status(w) for w in ("alice", "admin", "bob", "carol", "anonymous")] == \
        [200, 200, 404, 404, 401]
    assert c["anonymous"].get(f"/api/datasets/{ds}",
                              headers={"Authorization": "Bearer nope"}).status_code == 401
    assert status("bob", path=f"/api/datasets/{ds}/table.csv") == 404
    assert status("carol", "DELETE") == 404
    assert ds not in [d["id"] for d in c["bob"].get("/api/datasets").json()["datasets"]]
    assert c["anonymous"].get("/api/datasets").json()["error"]

    # shared with p1: bob reads, carol still sees nothing; only the owner changes it
    r = c["alice"].patch(f"/api/datasets/{ds}", json={"visibility": "project"})
    assert r.status_code == 200 and r.json()["project"] == "p1"
    try:
        assert [status(w) for w in ("alice", "admin", "bob", "carol", "anonymous")] == \
            [200, 200, 200, 404, 401]
        assert status("bob", path=f"/api/datasets/{ds}/table.csv") == 200
        assert ds in [d["id"] for d in c["bob"].get("/api/datasets").json()["datasets"]]
        assert status("bob", "DELETE") == 403
        assert status("bob", "PATCH", json={"name": "mine now"}) == 403
        assert status("bob", "POST", path=f"/api/datasets/{ds}/builds", json={}) == 403
        assert status("carol", "POST", path=f"/api/datasets/{ds}/builds", json={}) == 404
        assert status("bob", "GET", path=f"/api/jobs/{built['job']['id']}") == 200
        assert status("carol", "GET", path=f"/api/jobs/{built['job']['id']}") == 404
        # alice cannot share with a project she is not in
        r = c["alice"].patch(f"/api/datasets/{ds}", json={"visibility": "project",
                                                          "project": "p2"})
        assert r.status_code == 422 and "p2" in r.json()["error"]
    finally:
        assert c["alice"].patch(f"/api/datasets/{ds}",
                                json={"visibility": "private"}).status_code == 200
    assert status("bob") == 404


def test_app_renders_for_the_owner_and_is_404_for_everyone_else(served):
    server, ds, site = served["server"], served["id"], served
    owner = app_session(server, site["tokens"]["alice"])
    r = owner.get(f"/apps/{ds}", follow_redirects=False)
    assert r.status_code == 307 and r.headers["location"] == f"/apps/{ds}/app"
    page, doc = pull_document(server, owner, f"/apps/{ds}/app")
    assert f"/apps/{ds}/static/js/bokeh.min.js" in page
    assert f"/apps/{ds}/app/static/css/app.css" in page
    # thumbnails travel as row numbers plus a URL template under the dataset's URL
    assert f"/apps/{ds}/app/_thumb/" in doc, "the document's thumbnails are served under the dataset's URL"
    thumbs = [f"/apps/{ds}/app/_thumb/0"]
    r = owner.get(thumbs[0])
    assert r.status_code == 200 and r.content[:2] == b"\xff\xd8"

    for who in ("bob", "carol", None):
        other = app_session(server, site["tokens"][who] if who else None)
        for path in (f"/apps/{ds}", f"/apps/{ds}/app", thumbs[0]):
            r = other.get(path)
            assert r.status_code == 404, (who, path)
            assert "log in" in r.text
        import websocket

        with pytest.raises(websocket.WebSocketBadStatusException):
            websocket.create_connection(server.url.replace("http", "ws") + f"/apps/{ds}/app/ws",
                                        subprotocols=["bokeh", "x"], origin=server.url,
                                        cookie="; ".join(f"{k}={v}" for k, v in other.cookies.items()))
    # shared with p1: bob (same project) gets the app, carol (other project) still 404
    c = server.client(site["tokens"]["alice"])
    assert c.patch(f"/api/datasets/{ds}", json={"visibility": "project"}).status_code == 200
    try:
        bob = app_session(server, site["tokens"]["bob"])
        pull_document(server, bob, f"/apps/{ds}/app")
        assert bob.get(thumbs[0]).status_code == 200
        carol = app_session(server, site["tokens"]["carol"])
        assert carol.get(f"/apps/{ds}/app").status_code == 404
    finally:
        assert c.patch(f"/api/datasets/{ds}", json={"visibility": "private"}).status_code == 200
    assert bob.get(f"/apps/{ds}/app").status_code == 404, "unshared: bob's cookie opens nothing"

    # a bad login says so and sets no cookie
    r = httpx.post(server.url + "/login", data={"token": "wrong", "next": "/"})
    assert r.status_code == 401 and "explorer_session" not in r.cookies


# --------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("folder", ["../outside", "/etc", "escape", "nope", "a-file.txt",
                                    "photos/../..", "C:\\Windows", ""])
def test_folders_only_under_root_after_symlinks(site, folder):
    r = site["c"]["alice"].post("/api/datasets", json={"name": "x", "folder": folder})
    assert r.status_code == 422, r.text
    assert r.json()["error"]


def test_hostile_upload_is_checked_and_nothing_lands_outside(site):
    c = site["c"]["alice"]
    base = site["base"]
    before = files_under(base)
    zbuf = io.BytesIO()
    with zipfile.ZipFile(zbuf, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("../../../../zipslip.jpg", jpeg_bytes(variant(5, 40)))
        zf.writestr("deep/ok.jpg", jpeg_bytes(variant(6, 40)))
        zf.writestr("bomb.jpg", b"\0" * 900_000)
    big = jpeg_bytes(__import__("numpy").random.default_rng(0).integers(
        0, 255, (800, 800, 3), dtype="uint8"), quality=100)
    assert len(big) > 2**20
    files = [
        ("files", ("../../../../evil.jpg", jpeg_bytes(variant(1, 40)), "image/jpeg")),
        ("files", ("/etc/cron.d/x.jpg", jpeg_bytes(variant(2, 40)), "image/jpeg")),
        ("files", ("<script>.jpg", jpeg_bytes(variant(3, 40)), "image/jpeg")),
        ("files", ("empty.jpg", b"", "image/jpeg")),
        ("files", ("notes.txt", b"just text", "text/plain")),
        ("files", ("big.jpg", big, "image/jpeg")),
        ("files", ("pack.zip", zbuf.getvalue(), "application/zip")),
    ]
    r = c.post("/api/datasets/upload", data={"name": "hostile"}, files=files)
    assert r.status_code == 201, r.text
    out = r.json()
    assert out["added"] == 5, out["report"]
    why = {x["name"]: x.get("error") for x in out["report"] if not x["ok"]}
    assert why["empty.jpg"] == "empty file"
    assert "not an image" in why["notes.txt"]
    assert "more than the limit" in why["big.jpg"]
    assert "compression ratio" in why["pack.zip:bomb.jpg"]
    images = site["data"] / "datasets" / out["id"] / "images"
    stored = files_under(images)
    assert stored == {"evil.jpg", "etc/cron.d/x.jpg", "_script_.jpg", "zipslip.jpg",
                      "deep/ok.jpg"}
    new = files_under(base) - before
    assert all(p.startswith(f"data/datasets/{out['id']}/images/") or p.startswith("data/logs/")
               or p.startswith("data/service.db") for p in new), new
    assert not (base / "evil.jpg").exists() and not (base.parent / "evil.jpg").exists()

    # nothing usable: 422 with the report, and no dataset is left behind
    n = len(c.get("/api/datasets").json()["datasets"])
    r = c.post("/api/datasets/upload", data={"name": "junk"},
               files=[("files", ("a.txt", b"text", "text/plain"))])
    assert r.status_code == 422 and r.json()["report"][0]["ok"] is False
    assert len(c.get("/api/datasets").json()["datasets"]) == n
    r = c.post("/api/datasets/upload", content=b"plain", headers={"content-type": "text/plain"})
    assert r.status_code == 400 and "multipart" in r.json()["error"]
    r = c.post("/api/datasets/upload", files={"name": (None, "no files")})
    assert r.status_code == 422 and "no files" in r.json()["error"]


class _Images(BaseHTTPRequestHandler):
    big = b"\xff\xd8" + b"0" * (2 * 2**20)

    def do_GET(self):
        p = self.path
        if p in ("/a.jpg", "/b.jpg"):
            return self._send(200, jpeg_bytes(variant(7 if p == "/a.jpg" else 8, 40)), "image/jpeg")
        if p == "/redirect":
            return self._send(302, b"", "text/plain", location="/b.jpg")
        if p == "/loop":
            return self._send(302, b"", "text/plain", location="/loop")
        if p == "/to-file":
            return self._send(302, b"", "text/plain", location="file:///etc/passwd")
        if p == "/text":
            return self._send(200, b"hello", "text/html")
        if p == "/slow.jpg":
            time.sleep(3)
            return self._send(200, jpeg_bytes(variant(9, 40)), "image/jpeg")
        if p == "/fake.jpg":
            return self._send(200, b"not really", "image/jpeg")
        if p == "/big.jpg":
            return self._send(200, self.big, "image/jpeg")
        return self._send(404, b"no", "text/plain")

    def _send(self, code, body, ctype, location=None):
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        if location:
            self.send_header("Location", location)
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *a):
        pass


@pytest.fixture
def image_site():
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Images)
    t = threading.Thread(target=httpd.serve_forever, daemon=True)
    t.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


def test_url_downloads_report_per_url(site, image_site):
    c = site["c"]["alice"]
    ds = c.post("/api/datasets", json={"name": "from urls"}).json()["id"]
    urls = [f"{image_site}/a.jpg", f"{image_site}/redirect", f"{image_site}/loop",
            f"{image_site}/to-file", f"{image_site}/text", f"{image_site}/fake.jpg",
            f"{image_site}/big.jpg", f"{image_site}/missing", "ftp://example.com/x.jpg",
            f"{image_site}/slow.jpg"]
    r = c.post(f"/api/datasets/{ds}/urls", json={"urls": urls})
    assert r.status_code == 200, r.text
    rep = r.json()["report"]
    assert [x["url"] for x in rep] == urls
    assert [x["ok"] for x in rep] == [True, True] + [False] * 8
    errors = [x.get("error", "") for x in rep]
    assert "redirects" in errors[2] and "scheme" in errors[3]
    assert "not an image type" in errors[4] and "not an image" in errors[5]
    assert "limit" in errors[6] and "404" in errors[7] and "scheme" in errors[8]
    assert "Timeout" in errors[9]
    assert files_under(site["data"] / "datasets" / ds / "images") == {"a.jpg", "b.jpg"}
    # only the owner adds images; folder datasets take none
    assert site["c"]["bob"].post(f"/api/datasets/{ds}/urls", json={"urls": urls[:1]}).status_code == 404
    folder_ds = c.post("/api/datasets", json={"name": "f", "folder": "other"}).json()["id"]
    r = c.post(f"/api/datasets/{folder_ds}/urls", json={"urls": urls[:1]})
    assert r.status_code == 409 and r.json()["error"]
    assert c.delete(f"/api/datasets/{folder_ds}").status_code == 200
    assert (site["root"] / "other").is_dir(), "deleting a dataset never touches --root"


def test_errors_are_json_with_the_right_status(site):
    c = site["c"]["alice"]
    cases = [
        (c.get("/api/nothing-here"), 404),
        (c.put("/api/datasets"), 405),
        (c.post("/api/datasets", content=b"{not json", headers={"content-type": "application/json"}), 422),
        (c.post("/api/datasets", json={"name": "x", "folder": "photos", "extra": 1}), 422),
        (c.post("/api/datasets", json={"name": "\x00"}), 422),
        (c.get("/api/jobs/doesnotexist"), 404),
        (c.get("/api/datasets/" + "f" * 500), 404),
        (c.post("/api/datasets/abc/builds", json={"k": 0}), 422),
    ]
    for r, code in cases:
        assert r.status_code == code, (r.request.url, r.text)
        assert isinstance(r.json()["error"], str) and r.json()["error"]


def test_uploads_and_reads_are_served_while_a_build_runs(site, built):
    d = built["during"]
    assert d, "the build was seen running"
    assert d["upload_status"] == 201 and d["upload"]["added"] == 4
    assert d["list_status"] == 200
    assert d["main_state_after"] == "running", "answered while the build was still running"
    # the upload's own build was queued behind it (one build at a time by default) ...
    assert d["upload_job"]["state"] == "queued" and d["upload_job"]["params"]["method"] == "phash"
    assert d["upload_job"]["dataset"] == d["upload"]["id"]
    # ... and deleting the dataset cancelled it
    assert d["delete_status"] == 200
    assert d["upload_job_after_delete"]["state"] == "failed"
    assert "deleted" in d["upload_job_after_delete"]["error"]
    c = site["c"]["alice"]
    r = c.post("/api/datasets/upload", files=[("files", ("x.jpg", jpeg_bytes(variant(1, 40)),
                                                         "image/jpeg"))], data={"build": "nope"})
    assert r.status_code == 422 and "build" in r.json()["error"]


# --------------------------------------------------------------------------- the queue
def _pid_of(data: Path, job: str, timeout: float = 10.0):
    """The worker pid of a running job (recorded just after the job is marked running)."""
    t0 = time.monotonic()
    while True:
        with sqlite3.connect(data / "service.db") as con:
            row = con.execute("SELECT pid FROM jobs WHERE id = ?", (job,)).fetchone()
        if (row and row[0] is not None) or time.monotonic() - t0 > timeout:
            return row[0] if row else None
        time.sleep(0.05)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie is not alive
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False


def test_queue_survives_a_crashed_worker_and_a_killed_service(tmp_path):
    root = tmp_path / "root"
    for i in range(3):
        image_folder(root / f"set{i}", 12, size=40)
    data = tmp_path / "data"
    tok = local_user(data, "dora")
    grant(data, ".", user="dora")
    server = Server(root, data)
    try:
        server.start()
        c = server.client(tok)
        ids = [c.post("/api/datasets", json={"name": f"s{i}", "folder": f"set{i}"}).json()["id"]
               for i in range(3)]
        jobs = [c.post(f"/api/datasets/{d}/builds", json={"method": "phash"}).json()["job"]
                for d in ids]
        assert [c.get(f"/api/jobs/{j}").json()["state"] for j in jobs[1:]] == ["queued"] * 2

        def wait_state(job, state, timeout=120):
            t0 = time.monotonic()
            while (s := c.get(f"/api/jobs/{job}").json())["state"] != state:
                assert time.monotonic() - t0 < timeout, s
                time.sleep(0.1)
            return s

        # 1. a worker killed like the OOM killer does fails its job only
        wait_state(jobs[0], "running")
        os.kill(_pid_of(data, jobs[0]), signal.SIGKILL)
        j0 = wait_state(jobs[0], "failed")
        assert "SIGKILL" in j0["error"]
        assert c.get("/api/me").status_code == 200

        # 2. the service itself dies while the next job runs; its worker goes with it
        wait_state(jobs[1], "running")
        worker = _pid_of(data, jobs[1])
        server.stop(signal.SIGKILL)
        t0 = time.monotonic()
        while _alive(worker):
            assert time.monotonic() - t0 < 10, "the worker outlived the service"
            time.sleep(0.1)

        # 3. after a restart every job is accounted for: the interrupted one failed with the
        #    reason, the queued one runs (the first test's build shows a run to the end)
        server.start()
        c = server.client(tok)
        j1 = c.get(f"/api/jobs/{jobs[1]}").json()
        assert j1["state"] == "failed" and "service stopped" in j1["error"]
        wait_state(jobs[2], "running")
        states = {j: c.get(f"/api/jobs/{j}").json()["state"] for j in jobs}
        assert states == {jobs[0]: "failed", jobs[1]: "failed", jobs[2]: "running"}
        # a clean stop ends the worker and records why
        worker = _pid_of(data, jobs[2])
        server.stop()
        assert not _alive(worker)
        server.start()
        j2 = server.client(tok).get(f"/api/jobs/{jobs[2]}").json()
        assert j2["state"] == "failed" and "service stopped" in j2["error"]
    finally:
        server.stop()


def test_users_command_lists_and_removes(tmp_path):
    import subprocess

    from _service import _env

    data = tmp_path / "data"
    tok = add_user(data, "erin", "--project", "p9", "--admin")
    assert len(tok) >= 40
    run = [sys.executable, "-m", "explorer.cli", "users"]
    out = subprocess.run(run + ["list", "--data", str(data)], env=_env(), capture_output=True,
                         text=True, check=True).stdout
    assert out.split() == ["erin", "admin", "p9"]
    db = (data / "service.db").read_bytes()
    assert tok.encode() not in db, "tokens are stored hashed"
    bad = subprocess.run(run + ["add", "erin", "--data", str(data)], env=_env(),
                         capture_output=True, text=True)
    assert bad.returncode == 1 and "exists already" in bad.stderr
    subprocess.run(run + ["remove", "erin", "--data", str(data)], env=_env(), check=True,
                   capture_output=True)
    from explorer.service.db import DB

    assert DB(data / "service.db").user_by_token(tok) is None


def test_cli_help_is_light_and_bad_options_are_messages(tmp_path, capsys, monkeypatch):
    import subprocess

    from _service import _env

    from explorer.cli import main

    code = ("import sys, explorer.cli as c; p = c.make_parser(); "
            "p.parse_args(['serve', '--root', '.', '--data', '.']); "
            "print(sorted(m for m in ('torch', 'fastapi', 'uvicorn', 'timm') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], env=_env(), capture_output=True,
                         text=True, check=True).stdout
    assert out.strip() == "[]"

    # the refusals, in this process (a server that started anyway fails the test at once)
    def started(*a, **k):
        raise AssertionError("explorer serve started despite a bad option")

    monkeypatch.setattr("uvicorn.Server.run", started)

    def serve(*args: str) -> tuple[int, str]:
        mask = os.umask(0o022)  # serve makes its process's umask 077: this one's comes back
        try:
            rc = main(["serve", "--data", str(tmp_path / "d"), *args])
        except SystemExit as exc:  # argparse's refusal
            rc = exc.code
        finally:
            os.umask(mask)
        return rc, capsys.readouterr().err

    rc, err = serve("--root", str(tmp_path / "missing"))
    assert rc == 2 and "not found" in err  # refused: explorer.paths
    rc, err = serve("--root", "/etc")
    assert rc == 2 and "system folder" in err
    rc, err = serve("--root", str(tmp_path), "--workers", "0")
    assert rc == 1 and "--workers" in err
