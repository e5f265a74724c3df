"""Who may use what in ``explorer serve``, and what stops one user from starving the others
(review 2026-12-06 N5, N6, N9, N12, N13, N15, N16). Unit tests without a server; the routes
are covered end to end at the bottom with one real ``explorer serve``."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pandas as pd
import pytest

sys.path.insert(0, str(Path(__file__).parent))
from _imagegen import jpeg_bytes, variant  # noqa: E402

pytestmark = pytest.mark.slow  # real service processes and builds (make test-fast leaves it out)


# --------------------------------------------------------------------------- N16
def test_missing_txt_names_no_folder_of_the_server(tmp_path):
    from explorer.curation.exports import plan_export

    root = tmp_path / "server" / "secret-place" / "images"
    root.mkdir(parents=True)
    (root / "a.jpg").write_bytes(jpeg_bytes(variant(0)))
    (tmp_path / "outside.jpg").write_bytes(jpeg_bytes(variant(1)))
    os.symlink(tmp_path / "outside.jpg", root / "link.jpg")
    df = pd.DataFrame({"path": ["a.jpg", "gone.jpg", "link.jpg"], "cluster": [0, 0, 1]})
    note = plan_export(df, root, layout="cluster").refused_note().decode()
    assert "gone.jpg" in note and "link.jpg" in note and "outside the image folder" in note
    assert str(tmp_path) not in note and "secret-place" not in note


# --------------------------------------------------------------------------- N9: k_max
@pytest.mark.parametrize("method", ["kmeans", "agglomerative", "gmm", "auto"])
def test_k_max_above_the_limit_is_refused_naming_the_value(method):
    import numpy as np

    from explorer.stages.cluster import K_MAX_LIMIT, cluster

    X = np.random.default_rng(0).normal(size=(30, 4)).astype(np.float32)
    with pytest.raises(ValueError, match=r"k_max must be an integer in 2\.\.100; got 1000"):
        cluster(X, method, k_max=1000)
    assert K_MAX_LIMIT == 100
    if method == "kmeans":  # the limit itself is accepted (clamped to the distinct points)
        assert cluster(X[:5], method, k_max=K_MAX_LIMIT).labels is not None


# --------------------------------------------------------------------------- N6
def test_contained_discovery_keeps_no_file_that_resolves_outside_the_folder(tmp_path):
    from explorer.stages.images import discover

    folder, private = tmp_path / "root" / "users" / "carol" / "set", tmp_path / "data" / "priv"
    folder.mkdir(parents=True)
    private.mkdir(parents=True)
    for i, d in enumerate((folder, private)):
        (d / f"img{i}.jpg").write_bytes(jpeg_bytes(variant(i)))
    (folder / "inner").mkdir()
    (folder / "inner" / "b.jpg").write_bytes(jpeg_bytes(variant(2)))
    os.symlink(private, folder / "priv")                         # a folder that leads out
    os.symlink(private / "img1.jpg", folder / "stolen.jpg")      # a file that leads out
    os.symlink(folder / "inner" / "b.jpg", folder / "alias.jpg")  # stays inside: kept
    rel = lambda ps: sorted(p.relative_to(folder).as_posix() for p in ps)  # noqa: E731
    assert rel(discover(folder)) == ["alias.jpg", "img0.jpg", "inner/b.jpg", "priv/img1.jpg",
                                     "stolen.jpg"]
    assert rel(discover(folder, contained=True)) == ["alias.jpg", "img0.jpg", "inner/b.jpg"]


def test_a_service_build_leaves_out_what_a_symlink_brings_in(tmp_path):
    """Review N6 through the worker: carol's folder links to alice's private upload in
    --data; the build's table and thumbnails hold none of it."""
    import json

    from _imagegen import image_folder

    from explorer.service.db import DB, dataset_dir
    from explorer.service.worker import run_job
    from explorer.table import read_table

    data = tmp_path / "data"
    folder = tmp_path / "root" / "users" / "carol" / "set"
    image_folder(folder, 6, size=40)
    private = dataset_dir(data, "alices") / "images"
    image_folder(private, 3, size=40)
    os.symlink(private, folder / "priv")
    db = DB(data / "service.db")
    db.add_user("carol")
    db.run("INSERT INTO datasets VALUES ('ds1', 1, 'set', 'private', NULL, 'folder', ?, 0)",
           (str(folder),))
    db.run("INSERT INTO jobs(id, dataset_id, owner_id, kind, params, state, run_token, created)"
           " VALUES ('j1', 'ds1', 1, 'build', ?, 'running', 'tok', 0)",
           (json.dumps({"method": "phash", "cluster": "kmeans", "k": 2,
                        "duplicates": None}),))
    assert run_job(str(data / "service.db"), "j1", "tok") == 0
    job = db.job("j1")
    assert job["state"] == "done", job["error"]
    paths = read_table(dataset_dir(data, "ds1") / "app.csv")["path"].tolist()
    assert len(paths) == 6 and not any(p.startswith("priv/") for p in paths)


# --------------------------------------------------------------------------- N16: job errors
def test_job_errors_name_no_server_path():
    from explorer.service.worker import public_error

    msg = public_error("no images found in /srv/root/users/a/x (looked for .jpg); cannot "
                       "write '/srv/data/datasets/ab/app.csv': [Errno 28] and /opt/venv/lib/x.py",
                       "/srv/root/users/a/x", "/srv/data")
    assert msg == ("no images found in <image folder> (looked for .jpg); cannot write "
                   "'<data>/datasets/ab/app.csv': [Errno 28] and .../x.py")


# --------------------------------------------------------------------------- the routes
@pytest.fixture(scope="module")
def svc(tmp_path_factory):
    """An in-process service: alice and bob in project p1, carol in p2, an admin; folders
    users/alice/shoes, users/carol/hats, projects/p1/shared, projects/p2/x, common/ (admins'),
    and users/carol/sneaky -> users/alice/shoes (a symlink)."""
    from _imagegen import image_folder
    from _service import Local, local_user

    from explorer.service.policy import Quotas

    base = tmp_path_factory.mktemp("policy")
    root, data = base / "root", base / "data"
    for rel in ("users/alice/shoes", "users/carol/hats", "projects/p1/shared", "projects/p2/x",
                "common/set"):
        image_folder(root / rel, 2, size=32)
    (root / "users" / "carol" / "sneaky").symlink_to(root / "users" / "alice" / "shoes")
    tokens = {"alice": local_user(data, "alice", projects=("p1",)),
              "bob": local_user(data, "bob", projects=("p1",)),
              "carol": local_user(data, "carol", projects=("p2",)),
              "admin": local_user(data, "admin", admin=True)}
    quotas = Quotas(max_datasets=6, max_jobs=2, max_uploads=1)
    with Local(root, data, quotas=quotas) as service:
        c = {name: service.client(tok) for name, tok in tokens.items()}
        yield {"root": root, "data": data, "c": c, "service": service}


def register(client, folder):
    return client.post("/api/datasets", json={"name": "x", "folder": folder})


@pytest.mark.parametrize("who, folder, status", [
    ("alice", "users/alice/shoes", 201),
    ("alice", "users/alice", 201),
    ("carol", "users/alice/shoes", 403),     # review N5: carol registered alice's folder: 201
    ("carol", "users/carol/sneaky", 403),    # her own folder, but it resolves into alice's
    ("carol", "users/alice/nope", 403),      # refused before existence is checked
    ("bob", "projects/p1/shared", 201),
    ("carol", "projects/p1/shared", 403),
    ("alice", "common/set", 403),            # the rest is the admins'
    ("admin", "common/set", 201),
    ("admin", "users/alice/shoes", 201),
    ("alice", "../etc", 422),
])
def test_who_may_register_which_folder(svc, who, folder, status):
    r = register(svc["c"][who], folder)
    assert r.status_code == status, r.text
    if r.status_code == 201:
        assert svc["c"][who].delete(f"/api/datasets/{r.json()['id']}").status_code == 200
    elif status == 403:
        assert "belongs to" in r.json()["error"]


def test_an_admin_grant_lets_a_user_or_a_project_register_more(svc):
    from explorer.service.db import DB

    db = DB(svc["data"] / "service.db")
    c = svc["c"]
    assert register(c["alice"], "common/set").status_code == 403
    db.grant("common", project="p1")
    for who in ("alice", "bob"):
        r = register(c[who], "common/set")
        assert r.status_code == 201, r.text
        c[who].delete(f"/api/datasets/{r.json()['id']}")
    assert register(c["carol"], "common/set").status_code == 403
    assert db.revoke_grant("common", project="p1")
    assert register(c["alice"], "common/set").status_code == 403


def test_quotas_on_datasets_and_queued_builds(svc):
    c = svc["c"]["bob"]
    made = []
    try:
        for i in range(6):
            r = c.post("/api/datasets", json={"name": f"q{i}"})  # empty upload datasets
            assert r.status_code == 201, r.text
            made.append(r.json()["id"])
        r = c.post("/api/datasets", json={"name": "one too many"})
        assert r.status_code == 429 and "limit" in r.json()["error"]
        # builds: at most max_jobs queued or running (an empty dataset's build fails later)
        svc["service"].app.state.queue.stop()  # nothing starts: the jobs stay queued
        jobs = [c.post(f"/api/datasets/{d}/builds", json={"method": "phash"}) for d in made[:3]]
        assert [j.status_code for j in jobs] == [202, 202, 429], [j.text for j in jobs]
        # DELETE /api/jobs/ID cancels; then there is room again
        job = jobs[0].json()["job"]
        assert svc["c"]["carol"].delete(f"/api/jobs/{job}").status_code == 404
        assert svc["c"]["alice"].get(f"/api/jobs/{job}").status_code == 404
        r = c.delete(f"/api/jobs/{job}")
        assert r.status_code == 200 and r.json()["state"] == "cancelled", r.text
        assert c.delete(f"/api/jobs/{job}").status_code == 409
        assert c.get("/api/jobs", params={"state": "cancelled"}).json()["jobs"][0]["id"] == job
        again = c.post(f"/api/datasets/{made[2]}/builds", json={"method": "phash"})
        assert again.status_code == 202, again.text
    finally:
        for d in made:
            c.delete(f"/api/datasets/{d}")


def test_a_file_over_the_cap_stops_being_written_while_it_streams(svc):
    """Review N14: a part larger than max_file_bytes stops being written at the cap (and is
    reported as skipped) instead of landing on disk whole first."""
    from explorer.service.uploads import Limits

    cap = Limits().max_file_bytes
    staged = []

    def body():
        yield (b"--B\r\nContent-Disposition: form-data; name=\"files\"; filename=\"big.jpg\"\r\n"
               b"Content-Type: image/jpeg\r\n\r\n")
        chunk = b"\xff" * 2**20
        for _ in range(cap // len(chunk) + 8):
            staged.append(sum(p.stat().st_size for p in svc["data"].rglob("upload-*")))
            yield chunk
        yield (b"\r\n--B\r\nContent-Disposition: form-data; name=\"files\"; "
               b"filename=\"ok.jpg\"\r\nContent-Type: image/jpeg\r\n\r\n")
        yield jpeg_bytes(variant(3))
        yield b"\r\n--B--\r\n"

    r = svc["c"]["carol"].post("/api/datasets/upload", content=body(),
                               headers={"Content-Type": "multipart/form-data; boundary=B"})
    assert r.status_code == 201, r.text
    out = r.json()
    assert out["added"] == 1
    assert [x["name"] for x in out["report"] if not x["ok"]] == ["big.jpg"]
    assert "per file" in out["report"][0]["error"]
    assert max(staged) <= cap + 2**20, "the part was written past the cap"
    assert not list(svc["data"].rglob("upload-*"))
    svc["c"]["carol"].delete(f"/api/datasets/{out['id']}")


def test_elbow_reads_only_the_sampled_rows(tmp_path):
    """Review N15: memory for /elbow is ~rows x D x 4 bytes, whatever N."""
    import tracemalloc

    import numpy as np

    from explorer.service.routes.results import sample_features

    X = np.random.default_rng(0).normal(size=(200_000, 32)).astype(np.float16)
    np.save(tmp_path / "f.npy", X)
    del X
    tracemalloc.start()
    S = sample_features(tmp_path / "f.npy", rows=5_000)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert S.shape == (5_000, 32) and S.dtype == np.float32
    assert peak < 4 * S.nbytes, f"peak {peak:,} bytes for a {S.nbytes:,}-byte sample"
    small = sample_features(tmp_path / "f.npy", rows=10**6)
    assert small.shape == (200_000, 32)


# --------------------------------------------------------------------------- N12, N13: CLI
def users_cli(data, *args, check=True):
    import subprocess

    from _service import _env

    return subprocess.run([sys.executable, "-m", "explorer.cli", "users", *args, "--data",
                           str(data)], env=_env(), capture_output=True, text=True, check=check)


def mode(p: Path) -> str:
    return oct(p.stat().st_mode & 0o777)


def test_data_folder_and_its_files_are_private(tmp_path):
    """Review N12: --data was 0755 and its files 0644 (any local account read them)."""
    from _service import Server, add_user

    data = tmp_path / "data"
    data.mkdir(mode=0o755)
    os.chmod(data, 0o755)
    (data / "old.txt").write_text("x")
    os.chmod(data / "old.txt", 0o644)
    old = os.umask(0o022)
    try:
        token = add_user(data, "alice")
        assert mode(data) == "0o700" and mode(data / "service.db") == "0o600"
        os.chmod(data, 0o755)
        (tmp_path / "root" / "users" / "alice" / "a").mkdir(parents=True)
        server = Server(tmp_path / "root", data).start()
        try:
            with server.client(token) as c:
                r = c.post("/api/datasets", json={"name": "u"})
                assert r.status_code == 201, r.text
                ds = data / "datasets" / r.json()["id"]
        finally:
            server.stop()
    finally:
        os.umask(old)
    assert mode(data) == "0o700" and mode(data / "old.txt") == "0o600"
    assert mode(ds) == "0o700" and mode(ds / "images") == "0o700"
    for f in data.rglob("*"):
        if f.is_file() and f.name != "serve.log":  # the test harness opens that log itself
            assert f.stat().st_mode & 0o077 == 0, f"{f} is {mode(f)}"


def test_revoke_and_rotate_a_token_without_removing_the_user(tmp_path):
    from explorer.service.db import DB

    data = tmp_path / "data"
    tok = users_cli(data, "add", "alice").stdout.strip().splitlines()[-1]
    db = DB(data / "service.db")
    sid = db.new_session(db.user_by_token(tok)["id"])
    users_cli(data, "revoke", "alice")
    assert db.user_by_token(tok) is None and db.user_by_session(sid) is None
    assert "alice\tuser\t-\trevoked" in users_cli(data, "list").stdout
    new = users_cli(data, "rotate", "alice").stdout.strip().splitlines()[-1]
    assert new != tok and db.user_by_token(new)["name"] == "alice"
    assert db.user_by_token(tok) is None, "the old token stays dead"
    assert users_cli(data, "rotate", "nobody", check=False).returncode == 1


def test_removing_a_user_never_drops_their_datasets_silently(tmp_path):
    from explorer.service.db import DB, dataset_dir

    data = tmp_path / "data"
    users_cli(data, "add", "carol")
    users_cli(data, "add", "root", "--admin")
    db = DB(data / "service.db")

    def dataset(ds_id, owner):
        db.run("INSERT INTO datasets VALUES (?, ?, 'n', 'private', NULL, 'upload', ?, 0)",
               (ds_id, db.user_id(owner), str(dataset_dir(data, ds_id) / "images")))
        (dataset_dir(data, ds_id) / "images").mkdir(parents=True)

    dataset("d1", "carol")
    r = users_cli(data, "remove", "carol", check=False)
    assert r.returncode == 1 and "owns 1 dataset" in r.stderr
    assert db.one("SELECT owner_id FROM datasets WHERE id = 'd1'")["owner_id"] == \
        db.user_id("carol")
    assert users_cli(data, "remove", "carol", "--transfer-to", "carol", check=False).returncode == 1
    users_cli(data, "remove", "carol", "--transfer-to", "root")
    assert db.one("SELECT owner_id FROM datasets WHERE id = 'd1'")["owner_id"] == \
        db.user_id("root")
    users_cli(data, "add", "dave")
    dataset("d2", "dave")
    db.run("INSERT INTO jobs(id, dataset_id, owner_id, kind, params, state, created) "
           "VALUES ('j', 'd2', ?, 'build', '{}', 'queued', 0)", (db.user_id("dave"),))
    users_cli(data, "remove", "dave", "--delete-datasets")
    assert db.one("SELECT 1 AS x FROM datasets WHERE id = 'd2'") is None
    assert not dataset_dir(data, "d2").exists(), "no orphaned folder"
    assert db.job("j")["state"] == "cancelled"


# --------------------------------------------------------------------------- N16: exports
def test_the_private_export_folder_goes_with_its_process(tmp_path):
    """Review N16: explorer-exports-* folders outlived their app processes."""
    import subprocess

    from _service import _env

    code = ("from explorer.app.downloads import DownloadStore; s = DownloadStore(); "
            "it = s.reserve('key', 'x.zip', '/app'); it.path.write_bytes(b'zip'); "
            "print(s.root)")
    env = {**_env(), "EXPLORER_EXPORT_DIR": str(tmp_path / "exports")}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                         text=True, check=True).stdout.strip()
    assert Path(out).parent == tmp_path / "exports"
    assert not Path(out).exists() and not list((tmp_path / "exports").iterdir())


def test_deleting_a_dataset_leaves_no_build_running_against_it(svc, monkeypatch):
    """Review section 1.4: the scheduler could claim a queued build between the "is one
    running?" check and the cancel of the queued ones, then build a deleted dataset."""
    c = svc["c"]["carol"]
    queue = svc["service"].app.state.queue
    queue.stop()  # the test plays the scheduler
    ds = c.post("/api/datasets", json={"name": "doomed"}).json()["id"]
    job = c.post(f"/api/datasets/{ds}/builds", json={"method": "phash"}).json()["job"]
    checked = queue.running_for

    def claim_right_after_the_check(dataset_id):
        answer = checked(dataset_id)
        queue.db.run("UPDATE jobs SET state = 'running' WHERE id = ? AND state = 'queued'",
                     (job,))
        return answer

    monkeypatch.setattr(queue, "running_for", claim_right_after_the_check)
    r = c.delete(f"/api/datasets/{ds}")
    state = queue.db.job(job)["state"]
    assert not (r.status_code == 200 and state == "running"), "a build runs for a deleted dataset"
    assert r.status_code == 200 and state == "failed"


def test_serve_options_set_the_quotas_and_the_build_time_limit(tmp_path):
    from _imagegen import image_folder
    from _service import Server, local_user, wait_job

    image_folder(tmp_path / "root" / "users" / "alice" / "a", 4, size=32)
    image_folder(tmp_path / "root" / "users" / "alice" / "b", 4, size=32)
    token = local_user(tmp_path / "data", "alice")
    server = Server(tmp_path / "root", tmp_path / "data", "--max-jobs", "1",
                    "--job-hours", "0.0003").start()  # about one second
    try:
        with server.client(token) as c:
            ids = [c.post("/api/datasets", json={"name": f, "folder": f"users/alice/{f}"})
                   .json()["id"] for f in ("a", "b")]
            job = c.post(f"/api/datasets/{ids[0]}/builds", json={}).json()["job"]
            r = c.post(f"/api/datasets/{ids[1]}/builds", json={})
            assert r.status_code == 429 and "limit per user" in r.json()["error"]
            j = wait_job(c, job, timeout=120)
            assert j["state"] == "failed" and "longer than the limit of 1 s" in j["error"], j
            assert c.post(f"/api/datasets/{ids[1]}/builds", json={}).status_code == 202
    finally:
        server.stop()
    import subprocess

    from _service import _env

    r = subprocess.run([sys.executable, "-m", "explorer.cli", "serve", "--root",
                        str(tmp_path / "root"), "--data", str(tmp_path / "d2"),
                        "--max-jobs", "0"], env=_env(), capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 1 and "max_jobs must be a positive number, got 0" in r.stderr


def test_uploads_at_once_are_bounded_per_user(svc):
    c = svc["c"]["alice"]
    files = [("files", ("a.jpg", jpeg_bytes(variant(0)), "image/jpeg"))]
    uploads = svc["service"].app.state.uploads
    alice = c.get("/api/me").json()
    from explorer.service.db import DB

    uid = DB(svc["data"] / "service.db").user_id(alice["name"])
    with uploads.take(uid):  # one upload of alice's is running (max_uploads=1)
        r = c.post("/api/datasets/upload", data={"name": "second"}, files=files)
        assert r.status_code == 429 and "uploads running" in r.json()["error"]
        ds = c.post("/api/datasets", json={"name": "empty"}).json()["id"]
        r = c.post(f"/api/datasets/{ds}/urls", json={"urls": ["http://example.invalid/a.jpg"]})
        assert r.status_code == 429
        other = svc["c"]["carol"].post("/api/datasets/upload", data={"name": "c"}, files=files)
        assert other.status_code == 201, other.text  # other users are not held up
    assert uploads.in_use() == 0, "every slot is given back"
    r = c.post("/api/datasets/upload", data={"name": "now"}, files=files)
    assert r.status_code == 201, r.text
    for d in (ds, r.json()["id"]):
        c.delete(f"/api/datasets/{d}")
    svc["c"]["carol"].delete(f"/api/datasets/{other.json()['id']}")


def test_the_bytes_quota_bounds_what_a_user_keeps(tmp_path):
    from _service import Local, local_user

    from explorer.service.policy import Quotas

    data = tmp_path / "data"
    (tmp_path / "root").mkdir()
    token = local_user(data, "erin")
    img = jpeg_bytes(variant(0))
    with Local(tmp_path / "root", data, quotas=Quotas(max_bytes=3 * len(img))) as service:
        c = service.client(token)
        one = [("files", ("a.jpg", img, "image/jpeg"))]
        r = c.post("/api/datasets/upload", data={"name": "fits"}, files=one)
        assert r.status_code == 201, r.text
        first = r.json()["id"]
        three = [("files", (f"{i}.jpg", img, "image/jpeg")) for i in range(3)]
        r = c.post("/api/datasets/upload", data={"name": "too much"}, files=three)
        assert r.status_code == 413, r.text  # more than the room left
        # a build's output counts too: once the user is at the quota, nothing more is taken
        (data / "datasets" / first / "app.features.npy").write_bytes(b"0" * len(img) * 2)
        for r in (c.post("/api/datasets", json={"name": "x"}),
                  c.post("/api/datasets/upload", data={"name": "full"}, files=one)):
            assert r.status_code == 429 and "bytes" in r.json()["error"], r.text


def test_a_build_request_with_k_max_over_the_limit_is_refused_at_once(svc):
    """Review N9: k_max=1000 was queued and held the only worker for the whole grid."""
    c = svc["c"]["alice"]
    ds = register(c, "users/alice/shoes").json()["id"]
    try:
        r = c.post(f"/api/datasets/{ds}/builds",
                   json={"cluster": "gmm", "cluster_params": {"k_max": 1000}})
        assert r.status_code == 422 and "k_max must be an integer in 2..100; got 1000" in \
            r.json()["error"], r.text
        assert all(j["dataset"] != ds for j in c.get("/api/jobs").json()["jobs"])
    finally:
        c.delete(f"/api/datasets/{ds}")


def test_a_failed_build_names_no_server_path(tmp_path):
    """Review N16 through the worker: the error of a build of an empty folder."""
    import json

    from explorer.service.db import DB
    from explorer.service.worker import run_job

    data, folder = tmp_path / "data", tmp_path / "srv" / "root" / "users" / "carol" / "empty"
    folder.mkdir(parents=True)
    db = DB(data / "service.db")
    db.add_user("carol")
    db.run("INSERT INTO datasets VALUES ('ds1', 1, 'e', 'private', NULL, 'folder', ?, 0)",
           (str(folder),))
    db.run("INSERT INTO jobs(id, dataset_id, owner_id, kind, params, state, run_token, created)"
           " VALUES ('j1', 'ds1', 1, 'build', ?, 'running', 'tok', 0)",
           (json.dumps({"method": "phash"}),))
    assert run_job(str(data / "service.db"), "j1", "tok") == 0
    job = db.job("j1")
    assert job["state"] == "failed" and "no images found in <image folder>" in job["error"]
    assert str(tmp_path) not in job["error"] and "/srv/" not in job["error"]
