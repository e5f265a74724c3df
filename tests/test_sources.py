"""`explorer build SOURCE` for every input kind: archives, tables, --vectors (CLI tests)."""

from __future__ import annotations

import io
import json
import os
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from _imagegen import image_folder
from explorer import table
from explorer.inputs import archives
from explorer.cli import main as cli

N = 10


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> list[Path]:
    return image_folder(tmp_path_factory.mktemp("photos") / "imgs", N)


def errors_of(csv: Path) -> dict[str, str]:
    df = pd.read_csv(table.sidecar(csv, "errors.csv"), keep_default_na=False)
    return dict(zip(df["path"], df["reason"]))


def run_of(csv: Path) -> dict:
    return json.loads(table.sidecar(csv, "run.json").read_text())


def member_bytes(photos) -> dict[str, bytes]:
    return {f"dir/{p.parent.name}/{p.name}": p.read_bytes() for p in photos}


def hostile_zip(path: Path, photos) -> Path:
    with zipfile.ZipFile(path, "w") as z:
        for name, data in member_bytes(photos).items():
            z.writestr(name, data)
        z.writestr("../evil.jpg", member_bytes(photos)["dir/a/img0.jpg"])
        z.writestr("/abs.jpg", b"x")
        link = zipfile.ZipInfo("link.jpg")
        link.create_system = 3
        link.external_attr = 0o120777 << 16
        z.writestr(link, "/etc/passwd")
        z.writestr("bomb.png", b"\0" * (8 << 20), compress_type=zipfile.ZIP_DEFLATED)
        z.writestr("notes.txt", "not an image, left out silently")
    return path


# --------------------------------------------------------------------------- zip
@pytest.fixture(scope="module")
def zip_build(tmp_path_factory, photos):
    base = tmp_path_factory.mktemp("zipbuild")
    archive = hostile_zip(base / "photos.zip", photos)
    assert cli(["build", str(archive), "--app", str(base / "z"), "--method", "phash", "-q"]) == 0
    return base, archive, base / "z.csv"


def test_zip_rows_are_members_with_thumbnails(zip_build, photos):
    base, archive, csv = zip_build
    df = table.read_table(csv)
    assert sorted(df["path"]) == sorted(member_bytes(photos))
    for value in df["image"]:
        assert (base / "z" / value).is_file()
    run = run_of(csv)
    assert run["image_dir"] == str(archive.resolve())
    assert run["source"]["kind"] == "archive"
    # nothing was extracted beside the archive or the app
    assert not (base / "evil.jpg").exists() and not (base / "dir").exists()
    assert not table.sidecar(csv, "sources").exists()


def test_zip_hostile_members_get_an_error_line(zip_build):
    _, _, csv = zip_build
    errs = errors_of(csv)
    assert "zip slip" in errs["../evil.jpg"]
    assert "zip slip" in errs["/abs.jpg"]
    assert "symbolic link" in errs["link.jpg"]
    assert "zip bomb" in errs["bomb.png"]
    assert "notes.txt" not in errs


def test_zip_huge_member_is_refused_unread(tmp_path, photos):
    archive = tmp_path / "big.zip"
    with zipfile.ZipFile(archive, "w") as z:
        for name, data in member_bytes(photos).items():
            z.writestr(name, data)
        z.writestr("huge.jpg", os.urandom(3 << 20))  # incompressible: no ratio alarm
    assert cli(["build", str(archive), "--out", str(tmp_path / "b.csv"), "--method", "phash",
                "--max-file-mb", "1", "-q"]) == 0
    assert "file too large" in errors_of(tmp_path / "b.csv")["huge.jpg"]


def test_member_that_lies_about_its_size_is_stopped(tmp_path):
    """A header may claim a small size; reading stops at the cap whatever it claims."""
    archive = tmp_path / "lie.zip"
    with zipfile.ZipFile(archive, "w") as z:
        z.writestr("a.jpg", b"\xff\xd8\xff" + b"\0" * 5000)
    members, _ = archives.list_members(archive)
    liar = archives.Member(members[0].archive, "a.jpg", 100, "zip")  # claims 100 bytes
    with pytest.raises(archives.MemberError, match="zip bomb"):
        liar.read(1000)


def test_export_from_a_zip_build_copies_the_members(zip_build, photos, tmp_path):
    _, _, csv = zip_build
    out = tmp_path / "out"
    assert cli(["export", str(csv), "--to", str(out), "-q"]) == 0
    written = {p.name: p.read_bytes() for p in out.rglob("*.jpg")}
    assert written == {p.name: p.read_bytes() for p in photos}
    assert cli(["export", str(csv), "--to", str(tmp_path / "z"), "--zip", "-q"]) == 0
    with zipfile.ZipFile(tmp_path / "z.zip") as z:
        assert sum(n.endswith(".jpg") for n in z.namelist()) == N


def test_app_originals_resolve_inside_the_archive(zip_build):
    from explorer.app.files import original_file
    from explorer.stages.images import read_file
    from explorer.paths import require_image_root

    _, archive, csv = zip_build
    root = require_image_root(csv)
    assert root == archive.resolve()
    got = original_file(root, "dir/a/img0.jpg")
    assert got is not None and read_file(got)[0][:3] == b"\xff\xd8\xff"
    assert original_file(root, "../evil.jpg") is None
    assert original_file(root, "link.jpg") is None
    assert original_file(root, "dir/nope.jpg") is None


# --------------------------------------------------------------------------- tar
def hostile_tar(path: Path, photos, mode: str) -> Path:
    with tarfile.open(path, mode) as t:
        for name, data in member_bytes(photos).items():
            ti = tarfile.TarInfo(name)
            ti.size = len(data)
            t.addfile(ti, io.BytesIO(data))
        for name, kind in (("sym.jpg", tarfile.SYMTYPE), ("hard.jpg", tarfile.LNKTYPE)):
            ti = tarfile.TarInfo(name)
            ti.type, ti.linkname = kind, "/etc/passwd"
            t.addfile(ti)
        ti = tarfile.TarInfo("../../up.jpg")
        ti.size = 3
        t.addfile(ti, io.BytesIO(b"abc"))
        ti = tarfile.TarInfo("fifo.jpg")
        ti.type = tarfile.FIFOTYPE
        t.addfile(ti)
    return path


@pytest.mark.parametrize("suffix,mode", [(".tar", "w"), (".tar.gz", "w:gz")])
def test_tar_build_reads_members_and_refuses_links(tmp_path, photos, suffix, mode):
    archive = hostile_tar(tmp_path / f"photos{suffix}", photos, mode)
    csv = tmp_path / "t.csv"
    assert cli(["build", str(archive), "--app", str(tmp_path / "t"), "--method", "phash",
                "-q"]) == 0
    df = table.read_table(csv)
    assert sorted(df["path"]) == sorted(member_bytes(photos))
    errs = errors_of(csv)
    assert "symbolic link" in errs["sym.jpg"] and "hard link" in errs["hard.jpg"]
    assert "zip slip" in errs["../../up.jpg"] and "not a regular file" in errs["fifo.jpg"]
    assert not (tmp_path.parent / "up.jpg").exists()
    plain = table.sidecar(csv, "sources") / "source.tar"
    assert plain.is_file() == (suffix == ".tar.gz")  # gzip cannot seek: one plain copy
    out = tmp_path / "out"
    assert cli(["export", str(csv), "--to", str(out), "-q"]) == 0
    assert sorted(p.read_bytes() for p in out.rglob("*.jpg")) == \
        sorted(p.read_bytes() for p in photos)


def test_tar_gz_bomb_is_refused(tmp_path):
    archive = tmp_path / "bomb.tar.gz"
    with tarfile.open(archive, "w:gz") as t:
        data = b"\0" * (4 << 20)
        ti = tarfile.TarInfo("zeros.jpg")
        ti.size = len(data)
        t.addfile(ti, io.BytesIO(data))
    with pytest.raises(ValueError, match="decompression bomb"):
        archives.plain_tar(archive, tmp_path / "x.tar", max_total=1 << 20)
    assert not (tmp_path / "x.tar").exists()


def test_archive_embedding_runs_in_the_child_process(tmp_path, photos):
    """The default method: members cross to the embedding process and are cached by it."""
    archive = hostile_tar(tmp_path / "p.tar", photos, "w")
    res_csv = tmp_path / "e.csv"
    assert cli(["build", str(archive), "--out", str(res_csv), "--map", "pca", "-q"]) == 0
    assert len(table.read_table(res_csv)) == N
    assert run_of(res_csv)["counts"]["decoded"] == N
    assert cli(["build", str(archive), "--out", str(res_csv), "--map", "pca", "-q"]) == 0
    assert run_of(res_csv)["counts"]["decoded"] == 0  # the store knew every member


# --------------------------------------------------------------------------- tables
@pytest.mark.parametrize("fmt", ["csv", "parquet"])
def test_table_input_brings_labels_and_metadata(tmp_path, photos, fmt):
    folder = photos[0].parent.parent
    rows = pd.DataFrame({
        "path": [p.relative_to(folder).as_posix() for p in photos] + ["a/missing.jpg"],
        "label": ["cat" if i % 2 else "dog" for i in range(N)] + ["x"],
        "photographer": [f"p{i % 3}" for i in range(N)] + ["?"],
    })
    src = folder / f"list.{fmt}"
    rows.to_csv(src, index=False) if fmt == "csv" else rows.to_parquet(src)
    csv = tmp_path / "t.csv"
    assert cli(["build", str(src), "--out", str(csv), "--method", "phash", "-q"]) == 0
    df = table.read_table(csv).set_index("path")
    want = rows.iloc[:N].set_index("path")
    assert len(df) == N
    assert (df.loc[want.index, "label"] == want["label"]).all()
    assert (df.loc[want.index, "photographer"] == want["photographer"]).all()
    assert errors_of(csv)["a/missing.jpg"] == "file not found"
    assert Path(run_of(csv)["image_dir"]) == folder.resolve()


def test_table_without_path_column_is_refused(tmp_path, capsys):
    src = tmp_path / "list.csv"
    src.write_text("file,label\na.jpg,x\n")
    assert cli(["build", str(src), "--out", str(tmp_path / "o.csv"), "-q"]) == 1
    assert "no 'path' column" in capsys.readouterr().err


def test_unknown_source_kind_is_refused(tmp_path, capsys):
    src = tmp_path / "photos.rar"
    src.write_bytes(b"Rar!")
    assert cli(["build", str(src), "--out", str(tmp_path / "o.csv"), "-q"]) == 1
    assert "not a folder, an archive" in capsys.readouterr().err


# --------------------------------------------------------------------------- --vectors
def given_vectors(photos, folder: Path) -> tuple[list[str], np.ndarray]:
    """Three well separated groups of vectors (by image index), keyed by CSV path."""
    rng = np.random.default_rng(0)
    keys = [p.relative_to(folder).as_posix() for p in photos]
    centres = np.eye(3, 16, dtype=np.float32) * 10
    vecs = np.stack([centres[i % 3] + rng.normal(0, 0.01, 16) for i in range(len(keys))])
    return keys, vecs.astype(np.float32)


@pytest.mark.parametrize("fmt", ["npy", "parquet"])
def test_vectors_skip_the_embedding(tmp_path, photos, fmt):
    folder = photos[0].parent.parent
    keys, vecs = given_vectors(photos, folder)
    if fmt == "npy":
        vfile = tmp_path / "mine.npy"
        np.save(vfile, vecs[1:])  # img0 has no vector
        (tmp_path / "mine.paths.txt").write_text("\n".join(keys[1:]) + "\n")
    else:
        vfile = tmp_path / "mine.parquet"
        pd.DataFrame({"path": keys[1:], "vector": list(vecs[1:])}).to_parquet(vfile)
    csv = tmp_path / "v.csv"
    assert cli(["build", str(folder), "--out", str(csv), "--vectors", str(vfile),
                "--cluster", "kmeans", "--k", "3", "--map", "pca", "-q"]) == 0
    run = run_of(csv)
    assert "embed" not in run["timings"] and run["model"]["method"] == "vectors"
    df = table.read_table(csv)
    assert len(df) == N - 1 and keys[0] not in set(df["path"])
    assert "no row for it in --vectors" in errors_of(csv)[keys[0]]
    feats = np.load(table.sidecar(csv, "features.npy"))
    order = [keys.index(p) for p in df["path"]]
    np.testing.assert_allclose(feats, vecs[order], atol=0.02)
    # the clusters follow the given vectors' groups
    group = np.array(order) % 3
    for g in range(3):
        assert df["cluster"][group == g].nunique() == 1
    assert df.groupby(group)["cluster"].first().nunique() == 3


def test_vectors_count_mismatch_is_an_error(tmp_path, photos, capsys):
    folder = photos[0].parent.parent
    keys, vecs = given_vectors(photos, folder)
    np.save(tmp_path / "bad.npy", vecs)
    (tmp_path / "bad.paths.txt").write_text("\n".join(keys[:3]))
    assert cli(["build", str(folder), "--out", str(tmp_path / "o.csv"), "--vectors",
                str(tmp_path / "bad.npy"), "-q"]) == 1
    assert f"{N} rows but 3 paths" in capsys.readouterr().err
    np.save(tmp_path / "lone.npy", vecs)
    assert cli(["build", str(folder), "--out", str(tmp_path / "o.csv"), "--vectors",
                str(tmp_path / "lone.npy"), "-q"]) == 1
    assert "lone.paths.txt" in capsys.readouterr().err


def test_archive_suffixes_agree_with_paths():
    from explorer.paths import IMAGE_SUFFIXES

    assert archives.IMAGE_SUFFIXES == IMAGE_SUFFIXES


# --------------------------------------------------------------------------- URL lists
@pytest.fixture
def image_server(photos):
    """A local HTTP server on 127.0.0.1 (a free port): /img<i>.jpg, a redirect, a page that
    is not an image and one that is too large; ``hits`` counts the requests per path."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    hits: dict[str, int] = {}
    files = {f"/img{i}.jpg": p.read_bytes() for i, p in enumerate(photos)}

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *a):  # quiet
            pass

        def do_GET(self):
            hits[self.path] = hits.get(self.path, 0) + 1
            if self.path == "/moved.jpg":
                self.send_response(302)
                self.send_header("Location", "/img0.jpg")
                self.end_headers()
                return
            if self.path == "/page.html":
                body, kind = b"<html>hello</html>", "text/html"
            elif self.path == "/big.jpg":
                body, kind = b"\xff\xd8\xff" + os.urandom(2 << 20), "image/jpeg"
            elif self.path in files:
                body, kind = files[self.path], "image/jpeg"
            else:
                self.send_response(404)
                self.end_headers()
                return
            self.send_response(200)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", hits
    server.shutdown()
    server.server_close()


def test_url_list_downloads_once_into_a_cache(tmp_path, image_server, photos):
    base, hits = image_server
    urls = [f"{base}/img{i}.jpg" for i in range(N)]
    lst = tmp_path / "urls.txt"
    lst.write_text("# my photos\n" + "\n".join(urls) + f"\n\n{base}/moved.jpg\n{base}/page.html\n"
                   f"{base}/big.jpg\n{base}/gone.jpg\nftp://example.com/a.jpg\n")
    csv = tmp_path / "u.csv"
    args = ["build", str(lst), "--app", str(tmp_path / "u"), "--method", "phash",
            "--max-file-mb", "1", "--allow-private-urls", "-q"]
    assert cli(args) == 0
    df = table.read_table(csv)
    assert len(df) == N + 1  # the redirect brings img0 a second time, under its own URL
    cache = table.sidecar(csv, "sources") / "urls"
    assert sorted((cache / p).read_bytes() for p in df["path"]) == \
        sorted([p.read_bytes() for p in photos] + [photos[0].read_bytes()])
    errs = errors_of(csv)
    assert "not an image type" in errs[f"{base}/page.html"]
    assert "limit" in errs[f"{base}/big.jpg"]
    assert "404" in errs[f"{base}/gone.jpg"]
    assert "not an http(s) URL" in errs["ftp://example.com/a.jpg"]
    assert run_of(csv)["source"]["kind"] == "urls"
    before = dict(hits)
    assert cli(args) == 0  # a re-run downloads nothing it has
    assert {k: v - before.get(k, 0) for k, v in hits.items() if v != before.get(k, 0)} == \
        {f"{base}/page.html"[len(base):]: 1, "/big.jpg": 1, "/gone.jpg": 1}
    out = tmp_path / "out"
    assert cli(["export", str(csv), "--to", str(out), "-q"]) == 0
    assert len(list(out.rglob("*.jpg"))) == N + 1


def test_url_list_refuses_loopback_unless_allowed(tmp_path, image_server, capsys):
    base, hits = image_server
    lst = tmp_path / "urls.txt"
    lst.write_text(f"{base}/img0.jpg\n")
    assert cli(["build", str(lst), "--out", str(tmp_path / "u.csv"), "--method", "phash",
                "-q"]) == 1
    assert "no images found" in capsys.readouterr().err
    assert "loopback" in errors_of(tmp_path / "u.csv")[f"{base}/img0.jpg"]
    assert hits == {}


# --------------------------------------------------------------------------- fsspec URLs
def test_fsspec_url_is_copied_once_and_read(tmp_path, photos):
    """Any fsspec URL: here ``memory://`` (in this process, like the CLI call)."""
    fsspec = pytest.importorskip("fsspec")
    fs = fsspec.filesystem("memory")
    prefix = f"/bucket-{tmp_path.name}/shots"
    for name, data in member_bytes(photos).items():
        fs.pipe(f"{prefix}/{name}", data)
    fs.pipe(f"{prefix}/readme.txt", b"not an image")
    fs.pipe(f"{prefix}/.hidden/x.jpg", b"hidden")
    csv = tmp_path / "m.csv"
    args = ["build", f"memory://{prefix}", "--app", str(tmp_path / "m"), "--method", "phash", "-q"]
    assert cli(args) == 0
    df = table.read_table(csv)
    assert sorted(df["path"]) == sorted(member_bytes(photos))
    cache = table.sidecar(csv, "sources") / "remote"
    assert Path(run_of(csv)["image_dir"]) == cache.resolve()
    copied = {p: (cache / p).stat().st_mtime_ns for p in df["path"]}
    fs.pipe(f"{prefix}/dir/a/img0.jpg", photos[2].read_bytes())  # changed remotely
    assert cli(args) == 0
    again = {p: (cache / p).stat().st_mtime_ns for p in df["path"]}
    assert [p for p in copied if copied[p] != again[p]] == ["dir/a/img0.jpg"]
    assert (cache / "dir/a/img0.jpg").read_bytes() == photos[2].read_bytes()
    fs.rm(f"/bucket-{tmp_path.name}", recursive=True)


def test_s3_prefix_through_a_local_s3_server(tmp_path, photos, monkeypatch):
    """``s3://bucket/prefix`` against moto's server mode on 127.0.0.1 (the [cloud] extra)."""
    pytest.importorskip("s3fs")
    moto_server = pytest.importorskip("moto.server")
    boto3 = pytest.importorskip("boto3")
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    server.start()
    try:
        host, port = server.get_host_and_port()
        endpoint = f"http://{host}:{port}"
        for k, v in {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test",
                     "AWS_DEFAULT_REGION": "us-east-1",
                     "AWS_ENDPOINT_URL": endpoint}.items():
            monkeypatch.setenv(k, v)
        s3 = boto3.client("s3", endpoint_url=endpoint)
        s3.create_bucket(Bucket="photos")
        for name, data in member_bytes(photos).items():
            s3.put_object(Bucket="photos", Key=f"set1/{name}", Body=data)
        s3.put_object(Bucket="photos", Key="set1/../escape.jpg", Body=b"x")
        csv = tmp_path / "s.csv"
        assert cli(["build", "s3://photos/set1", "--out", str(csv), "--method", "phash",
                    "-q"]) == 0
        df = table.read_table(csv)
        assert sorted(df["path"]) == sorted(member_bytes(photos))
        assert not (tmp_path / "escape.jpg").exists()
        assert "'..'" in errors_of(csv)["../escape.jpg"]
        assert not list(tmp_path.rglob("escape.jpg"))
    finally:
        server.stop()


def test_app_save_images_reads_originals_from_the_archive(zip_build, photos, tmp_path,
                                                         monkeypatch):
    """The app's "Save images" of a selection in a zip build: the zip it offers holds the
    original members, not thumbnails."""
    from explorer.app import AppState

    base, _, csv = zip_build
    monkeypatch.chdir(tmp_path)
    state = AppState.from_csv(csv, app_dir=base / "z")
    assert not state.problems
    state.select(list(range(N)))
    res = state.export("originals", images=True)
    assert res.originals == N and res.thumbnails == 0
    with zipfile.ZipFile(res.zip) as zf:
        got = sorted(zf.read(n) for n in zf.namelist() if n.endswith(".jpg"))
    assert got == sorted(p.read_bytes() for p in photos)


def test_a_builds_csv_and_an_hf_export_are_table_inputs(tmp_path, photos):
    """Round trip: build, label, export --format hf, build the export's metadata.csv (its
    file_name column); and a build's own NAME.csv (paths relative to its image folder)."""
    folder = photos[0].parent.parent
    first = tmp_path / "first.csv"
    assert cli(["build", str(folder), "--out", str(first), "--method", "phash", "-q"]) == 0
    t = table.read_table(first)
    t["label"] = ["cat" if "/a/" in f"/{p}" else "dog" for p in t["path"]]
    table.write_table(t, first)
    again = tmp_path / "again.csv"
    assert cli(["build", str(first), "--out", str(again), "--method", "phash", "-q"]) == 0
    got = table.read_table(again).set_index("path")["label"]
    assert got.to_dict() == t.set_index("path")["label"].to_dict()
    assert Path(run_of(again)["image_dir"]) == folder.resolve()

    hf = tmp_path / "hf"
    assert cli(["export", str(first), "--format", "hf", "--to", str(hf), "-q"]) == 0
    back = tmp_path / "back.csv"
    assert cli(["build", str(hf / "metadata.csv"), "--out", str(back), "--method", "phash",
                "-q"]) == 0
    df = table.read_table(back)
    assert len(df) == N and Path(run_of(back)["image_dir"]) == hf.resolve()
    assert dict(zip(df["source_path"], df["label"])) == dict(zip(t["path"], t["label"]))


def test_a_replaced_archive_is_read_afresh(tmp_path, photos):
    """A zip or tar.gz replaced under the same name (even with an older mtime) is listed and
    read again, never served from a stale handle or plain copy."""
    for suffix, mode in ((".zip", None), (".tar.gz", "w:gz")):
        archive = tmp_path / f"p{suffix}"
        csv = tmp_path / f"p{suffix}.csv"
        args = ["build", str(archive), "--out", str(csv), "--method", "phash", "-q"]
        for k, chosen in enumerate((photos[:4], photos[4:7])):
            if archive.exists():
                archive.unlink()
            if mode is None:
                with zipfile.ZipFile(archive, "w") as z:
                    for p in chosen:
                        z.write(p, p.name)
            else:
                with tarfile.open(archive, mode) as t:
                    for p in chosen:
                        t.add(p, p.name)
            os.utime(archive, ns=(10**18 - k, 10**18 - k))  # the second one is OLDER
            assert cli(args) == 0
            assert sorted(table.read_table(csv)["path"]) == sorted(p.name for p in chosen)
            out = tmp_path / f"out{suffix}{k}"
            assert cli(["export", str(csv), "--to", str(out), "-q"]) == 0
            assert sorted(p.read_bytes() for p in out.rglob("*.jpg")) == \
                sorted(p.read_bytes() for p in chosen)


def test_vector_keys_match_by_path_full_path_or_unique_name(tmp_path):
    from explorer.inputs.sources import match_vectors

    root = tmp_path / "r"
    rel = ["a/x.jpg", "b/x.jpg", "a/y.jpg", "c/z.jpg"]
    items = [root / r for r in rel]
    keys = [str(root / "b/x.jpg"), "y.jpg", "x.jpg", "c/z.jpg"]
    # b/x.jpg by full path, y.jpg by its unique name, x.jpg is ambiguous, c/z.jpg exactly
    assert match_vectors(keys, rel, items).tolist() == [-1, 0, 1, 3]
