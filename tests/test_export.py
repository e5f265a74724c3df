"""Cluster / label folders, samples, collisions, no overwrite, missing files."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from explorer.curation.exports import export_folders, parse_sample, safe_name


def _files(folder: Path) -> set[str]:
    return {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()}


@pytest.fixture
def images(tmp_path):
    """An image folder with two a.jpg in different subfolders; a table over it."""
    root = tmp_path / "imgs"
    rows = []
    rng = np.random.default_rng(0)
    names = ["x/a.jpg", "y/a.jpg", "b.png", "c.jpg", "d.jpg", "e.jpg", "f.jpg", "g.jpg",
             "h.jpg", "i.jpg", "x/j.jpg"]
    clusters = [0, 0, 0, 0, 0, 0, 1, 1, 1, -1, 2]
    labels = ["cat", "cat", "Dog", "../evil", "a/b", "a_b", "CON", "", "outliers", "", "cat"]
    for rel, c, lab in zip(names, clusters, labels):
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(p)
        rows.append({"path": rel, "cluster": c, "label": lab})
    return root, pd.DataFrame(rows)


def test_cluster_folders_outliers_and_colliding_names(images, tmp_path):
    root, df = images
    to = tmp_path / "out"
    s = export_folders(df, root, to, progress=False)
    assert s["folders"] == {"cluster_0": 6, "cluster_1": 3, "cluster_2": 1, "outliers": 1}
    assert s["written"] == len(df) and s["missing"] == [] and s["errors"] == []
    files = _files(to)
    # both a.jpg survive, with different content
    assert "cluster_0/a.jpg" in files and "cluster_0/y__a.jpg" in files
    assert (to / "cluster_0/a.jpg").read_bytes() == (root / "x/a.jpg").read_bytes()
    assert (to / "cluster_0/y__a.jpg").read_bytes() == (root / "y/a.jpg").read_bytes()
    assert "outliers/i.jpg" in files and "cluster_2/j.jpg" in files
    man = pd.read_csv(to / "manifest.csv")
    assert len(man) == len(df) and set(man["path"]) == set(df["path"])
    assert "cluster_name" not in man.columns  # the table has none


def test_the_manifest_names_each_images_cluster(images, tmp_path):
    root, df = images
    names = {0: "dress, gown", 1: "sandal", 2: "folder: x", -1: ""}
    df = df.assign(cluster_name=df["cluster"].map(names))
    for as_zip in (False, True):
        to = tmp_path / ("z" if as_zip else "d")
        export_folders(df, root, to, as_zip=as_zip, progress=False)
        if as_zip:
            import zipfile

            with zipfile.ZipFile(str(to) + ".zip") as z:
                man = pd.read_csv(z.open("z/manifest.csv"), keep_default_na=False)
        else:
            man = pd.read_csv(to / "manifest.csv", keep_default_na=False)
        got = dict(zip(man["path"], man["cluster_name"]))
        assert got == dict(zip(df["path"], df["cluster_name"]))
        assert got["x/j.jpg"] == "folder: x" and got["f.jpg"] == "sandal"


def test_sample_has_one_per_cluster_at_least_and_is_reproducible(images, tmp_path):
    root, df = images
    a = export_folders(df, root, tmp_path / "a", sample="10%", progress=False)
    b = export_folders(df, root, tmp_path / "b", sample=0.1, progress=False)
    assert a["sample"] == b["sample"] == pytest.approx(0.1)
    assert a["sample_folders"] == {"cluster_0": 1, "cluster_1": 1, "cluster_2": 1, "outliers": 1}
    sa = _files(tmp_path / "a" / "sample")
    assert sa == _files(tmp_path / "b" / "sample")
    half = export_folders(df, root, tmp_path / "c", sample="50%", progress=False)
    assert half["sample_folders"]["cluster_0"] == 3
    picks = set()
    for seed in range(8):
        s = export_folders(df, root, tmp_path / f"s{seed}", sample="50%", seed=seed, progress=False)
        assert s["sample_folders"]["cluster_0"] == 3
        picks.add(frozenset(_files(tmp_path / f"s{seed}" / "sample" / "cluster_0")))
    assert len(picks) > 1  # the seed does choose


def test_existing_files_are_never_overwritten(images, tmp_path):
    root, df = images
    to = tmp_path / "out"
    (to / "cluster_1").mkdir(parents=True)
    (to / "cluster_1" / "f.jpg").write_bytes(b"mine")
    with pytest.raises(FileExistsError, match="f.jpg"):
        export_folders(df, root, to, progress=False)
    assert (to / "cluster_1" / "f.jpg").read_bytes() == b"mine"
    assert _files(to) == {"cluster_1/f.jpg"}  # refused before writing anything
    export_folders(df, root, tmp_path / "again", progress=False)
    with pytest.raises(FileExistsError):
        export_folders(df, root, tmp_path / "again", progress=False)


def test_missing_and_outside_sources_are_reported_not_fatal(images, tmp_path):
    root, df = images
    df = pd.concat([df, pd.DataFrame([{"path": "gone.jpg", "cluster": 0, "label": ""},
                                      {"path": "../outside.jpg", "cluster": 1, "label": ""}])],
                   ignore_index=True)
    (tmp_path / "outside.jpg").write_bytes(b"secret")
    s = export_folders(df, root, tmp_path / "out", sample="100%", progress=False)
    assert s["missing"] == ["gone.jpg"]
    assert [p for p, _ in s["errors"]] == ["../outside.jpg"]
    assert s["written"] == 2 * (len(df) - 2)
    assert not any("outside" in f for f in _files(tmp_path / "out"))


def test_label_folders_are_safe_and_distinct(images, tmp_path):
    root, df = images
    to = tmp_path / "out"
    s = export_folders(df, root, to, by="label", progress=False)
    folders = set(s["folders"])
    assert "cat" in folders and "Dog" in folders
    assert s["folders"]["cat"] == 3 and s["folders"]["outliers"] == 2  # the two empty labels
    # every folder is a direct child of `to`, nothing escaped
    for f in folders:
        assert (to / f).resolve().parent == to.resolve()
        assert "/" not in f and not f.startswith(".")
    # "a/b" and "a_b" both exist, in different folders; "outliers" label is not merged
    # with the unlabelled images; "CON" is renamed
    assert len(folders) == len(set(df["label"]))  # one folder per distinct label ('' -> outliers)
    assert "CON" not in folders
    assert not (tmp_path / "evil").exists()


def test_link_mode_makes_symlinks(images, tmp_path):
    root, df = images
    to = tmp_path / "out"
    export_folders(df, root, to, mode="link", progress=False)
    p = to / "cluster_1" / "f.jpg"
    assert p.is_symlink() and Path(os.readlink(p)).resolve() == (root / "f.jpg").resolve()


@pytest.mark.parametrize("kwargs, word", [
    ({"by": "colour"}, "by"),
    ({"mode": "move"}, "mode"),
    ({"sample": "150%"}, "sample"),
    ({"sample": 0}, "sample"),
    ({"sample": "lots"}, "sample"),
])
def test_bad_parameters(images, tmp_path, kwargs, word):
    root, df = images
    with pytest.raises(ValueError, match=word):
        export_folders(df, root, tmp_path / "out", progress=False, **kwargs)


def test_missing_column_and_root(images, tmp_path):
    root, df = images
    with pytest.raises(ValueError, match="label"):
        export_folders(df.drop(columns=["label"]), root, tmp_path / "o", by="label", progress=False)
    with pytest.raises(ValueError, match="image_root"):
        export_folders(df, tmp_path / "nope", tmp_path / "o", progress=False)


def test_safe_name_and_parse_sample():
    assert safe_name("../../etc/passwd") == "_.._etc_passwd"
    assert safe_name("") == "unnamed" and safe_name("...") == "unnamed"
    assert safe_name("con.txt") == "con_.txt"
    assert len(safe_name("x" * 500 + ".jpeg")) == 100 and safe_name("x" * 500 + ".jpeg").endswith(".jpeg")
    assert parse_sample("10%") == pytest.approx(0.1) and parse_sample(0.25) == 0.25
    assert parse_sample(None) is None


# --------------------------------------------------------------------------- plan + zip
import io  # noqa: E402
import json  # noqa: E402
import tracemalloc  # noqa: E402
import zipfile  # noqa: E402

from explorer import table  # noqa: E402
from explorer.cli import main as cli  # noqa: E402
from explorer.curation.exports import CHUNK, plan_export, write_zip, write_zip_file  # noqa: E402


class _Recorder(io.RawIOBase):
    """A write-only, unseekable file object that keeps only the size of each write."""

    def __init__(self):
        self.sizes, self.total = [], 0
        self.digest = __import__("hashlib").sha256()

    def writable(self):
        return True

    def write(self, b):
        n = len(b)
        self.sizes.append(n)
        self.total += n
        self.digest.update(bytes(b))
        return n


def test_zip_streams_one_chunk_at_a_time(tmp_path):
    """A 20 MB source goes through in chunks: no write and no allocation near its size."""
    big = tmp_path / "big.jpg"
    with open(big, "wb") as fh:
        for _ in range(20):
            fh.write(os.urandom(1 << 20))
    rec = _Recorder()
    tracemalloc.start()
    try:
        rep = write_zip([("x/big.jpg", big), ("note.txt", b"hello")], rec)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert rep.files == 2 and rep.bytes_in == (20 << 20) + 5 and not rep.failed
    assert rec.total > 20 << 20
    assert max(rec.sizes) <= CHUNK + 4096
    assert peak < 4 * CHUNK  # a few chunks, never the 20 MB file
    # and the same entries to a real file read back byte for byte
    out = write_zip_file([("x/big.jpg", big), ("note.txt", b"hello")], tmp_path / "o.zip")
    assert out.files == 2
    with zipfile.ZipFile(tmp_path / "o.zip") as zf:
        assert zf.read("x/big.jpg") == big.read_bytes()
        assert zf.getinfo("x/big.jpg").compress_type == zipfile.ZIP_STORED
        assert zf.getinfo("note.txt").compress_type == zipfile.ZIP_DEFLATED
        assert zf.testzip() is None


def test_zip_to_an_unseekable_stream_is_readable(images, tmp_path):
    root, df = images
    plan = plan_export(df, root, layout="flat")
    rec = io.BytesIO()

    class Pipe(io.RawIOBase):  # like a socket or an HTTP response: no seek, no tell
        def writable(self):
            return True

        def write(self, b):
            return rec.write(b)

    seen = []
    rep = write_zip(plan.entries, Pipe(), on_progress=lambda d, t: seen.append((d, t)))
    assert rep.files == len(df) and seen[-1] == (len(df), len(df))
    with zipfile.ZipFile(io.BytesIO(rec.getvalue())) as zf:
        assert sorted(zf.namelist()) == sorted(df["path"])
        assert zf.read("x/a.jpg") == (root / "x/a.jpg").read_bytes()


def test_zip_size_cap_leaves_the_rest_out_and_stays_valid(images, tmp_path):
    root, df = images
    plan = plan_export(df, root, layout="flat")
    sizes = [src.stat().st_size for _, src in plan.entries]
    cap = sum(sizes[:3])
    buf = io.BytesIO()
    rep = write_zip(plan.entries, buf, max_bytes=cap)
    assert rep.capped and rep.files == 3 and rep.bytes_in == cap
    assert rep.left_out == [a for a, _ in plan.entries[3:]]
    with zipfile.ZipFile(buf) as zf:
        assert zf.namelist() == [a for a, _ in plan.entries[:3]]
    with pytest.raises(ValueError, match="max_bytes"):
        write_zip([], io.BytesIO(), max_bytes=-5)
    with pytest.raises(ValueError, match="relative"):
        write_zip([("../evil.jpg", b"x")], io.BytesIO())


def test_flat_plan_refuses_hostile_rows_and_falls_back_to_thumbnails(images, tmp_path):
    """What the app's "Save images" zips: originals inside the image folder, else thumbnails."""
    root, df = images
    app = tmp_path / "app"
    (app / "static" / "thumbs").mkdir(parents=True)
    (app / "static" / "thumbs" / "t1.jpg").write_bytes((root / "c.jpg").read_bytes())
    (tmp_path / "secret.txt").write_text("secret")
    (root / "fake.jpg").write_text("not an image")
    if hasattr(os, "symlink"):
        os.symlink(tmp_path / "secret.txt", root / "link.jpg")
    hostile = pd.DataFrame({
        "path": ["b.png", "../secret.txt", "/etc/passwd", "fake.jpg", "link.jpg", "gone.jpg"],
        "image": ["", "static/thumbs/t1.jpg", "http://evil/x.jpg", "../../secret.txt",
                  "static/../../secret.txt", "//evil/t.jpg"],
    })
    plan = plan_export(hostile, root, layout="flat", thumb_root=app)
    assert [a for a, _ in plan.entries] == ["b.png", "thumbnails/t1.jpg"]
    assert plan.originals == 1 and plan.thumbnails == 1
    assert [r.reason for r in plan.refused] == ["absolute", "not_image", "outside", "missing"]
    for _, src in plan.entries:
        assert src.is_relative_to(root.resolve()) or src.is_relative_to(app.resolve())
    note = plan.refused_note().decode()
    assert "/etc/passwd" in note and "gone.jpg" in note
    # no image folder known: thumbnails only
    plan2 = plan_export(hostile, None, layout="flat", thumb_root=app)
    assert [a for a, _ in plan2.entries] == ["thumbnails/t1.jpg"]
    with pytest.raises(ValueError, match="image_root"):
        plan_export(hostile, None, layout="flat")
    with pytest.raises(ValueError, match="layout"):
        plan_export(hostile, root, layout="tree")
    with pytest.raises(ValueError, match="sample"):
        plan_export(df, root, layout="label", imagefolder=True, sample=0.5)


def test_folder_export_refuses_non_images_and_can_zip(images, tmp_path):
    root, df = images
    (root / "fake.jpg").write_text("#!/bin/sh\n")
    df2 = pd.concat([df, pd.DataFrame([{"path": "fake.jpg", "cluster": 0, "label": ""}])],
                    ignore_index=True)
    s = export_folders(df2, root, tmp_path / "out", progress=False)
    assert [p for p, _ in s["errors"]] == ["fake.jpg"] and "image" in s["errors"][0][1]
    assert not (tmp_path / "out" / "cluster_0" / "fake.jpg").exists()
    z = export_folders(df2, root, tmp_path / "clusters", sample="50%", as_zip=True,
                       progress=False)
    assert z["to"] == str(tmp_path / "clusters.zip") 
    assert z["written"] == s["written"] + sum(z["sample_folders"].values()) == 11 + 7
    with zipfile.ZipFile(tmp_path / "clusters.zip") as zf:
        names = set(zf.namelist())
    assert "clusters/cluster_0/y__a.jpg" in names and "clusters/manifest.csv" in names
    assert {n.split("/")[1] for n in names} == {"cluster_0", "cluster_1", "cluster_2",
                                                "outliers", "sample", "manifest.csv"}
    assert (tmp_path / "clusters.zip").stat().st_mode & 0o777 == 0o666 & ~_umask()
    with pytest.raises(FileExistsError):
        export_folders(df2, root, tmp_path / "clusters.zip", as_zip=True, progress=False)
    with pytest.raises(ValueError, match="link"):
        export_folders(df2, root, tmp_path / "l.zip", as_zip=True, mode="link", progress=False)


def _umask() -> int:
    old = os.umask(0o22)
    os.umask(old)
    return old


# --------------------------------------------------------------------------- the CLI
@pytest.fixture
def project(images, tmp_path):
    """NAME.csv + NAME.run.json over the images fixture, as `explorer build` writes them."""
    root, df = images
    n = len(df)
    t = table.make_table(df["path"], [""] * n, np.zeros((n, 2)), df["cluster"], np.ones(n),
                         np.zeros(n), [8] * n, [8] * n)
    t["label"] = df["label"]
    csv = table.write_table(t, tmp_path / "proj.csv")
    table.write_json(table.sidecar(csv, "run.json"),
                     {"image_dir": str(root), "image_dir_from_csv": os.path.relpath(root, tmp_path)})
    return csv, root


@pytest.mark.parametrize("run", [{"image_dir_from_csv": "../../../../../../../../../.."},
                                 {"image_dir": "/etc"}, {"image_dir": "/"}])
def test_cli_refuses_a_hostile_run_record(project, tmp_path, capsys, run):
    csv, _ = project
    table.write_json(table.sidecar(csv, "run.json"), run)
    assert cli(["export", str(csv), "--to", str(tmp_path / "o"), "-q"]) == 2
    err = capsys.readouterr().err
    assert "refused" in err and "proj.run.json" in err and "--images" in err
    assert "Traceback" not in err
    assert not (tmp_path / "o").exists()


def test_cli_imagefolder_honours_or_refuses_every_option(project, tmp_path, capsys):
    """L8: -q, --by, --link are honoured with --imagefolder; --sample and --zip --link refused."""
    csv, root = project
    assert cli(["export", str(csv), "--to", str(tmp_path / "s"), "--imagefolder",
                "--sample", "10%"]) == 2
    assert "--sample" in capsys.readouterr().err
    assert cli(["export", str(csv), "--to", str(tmp_path / "z"), "--zip", "--link"]) == 2
    assert "--link" in capsys.readouterr().err
    assert not (tmp_path / "s").exists() and not list(tmp_path.glob("z*"))

    assert cli(["export", str(csv), "--to", str(tmp_path / "byc"), "--imagefolder", "--by",
                "cluster", "--link", "-q"]) == 0
    out, err = capsys.readouterr()
    assert err == ""  # -q: no progress bar
    summary = json.loads(out)
    assert summary["classes"] == {"cluster_0": 6, "cluster_1": 3, "cluster_2": 1}
    assert (tmp_path / "byc" / "cluster_1" / "f.jpg").is_symlink()

    assert cli(["export", str(csv), "--to", str(tmp_path / "byl"), "--imagefolder", "-q"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["classes"]["cat"] == 3 and "" not in summary["classes"]


def test_cli_zip_of_cluster_folders(project, tmp_path, capsys):
    csv, _ = project
    assert cli(["export", str(csv), "--to", str(tmp_path / "c"), "--zip", "-q"]) == 0
    s = json.loads(capsys.readouterr().out)
    assert s["mode"] == "zip" and s["written"] == 11
    with zipfile.ZipFile(tmp_path / "c.zip") as zf:
        assert "c/cluster_1/f.jpg" in zf.namelist()


def test_zip_extra_notes_and_entry_order(images):
    root, df = images
    plan = plan_export(df, root, layout="flat")
    buf = io.BytesIO()
    rep = write_zip(plan.entries[:2], buf, extra={"MISSING.txt": "gone.jpg\n", "NONE.txt": None})
    assert rep.files == 3
    with zipfile.ZipFile(buf) as zf:
        assert zf.namelist()[-1] == "MISSING.txt" and zf.read("MISSING.txt") == b"gone.jpg\n"
    with pytest.raises(TypeError, match=r"\(arcname, source\)"):
        write_zip([(src, arc) for arc, src in plan.entries[:1]], io.BytesIO())


@pytest.mark.skipif(os.name == "nt", reason="POSIX symlinks")
def test_images_discover_finds_through_a_symlink_out_are_refused_at_export(images, tmp_path):
    """M9, the one symlink policy: discover follows a symlinked folder, but an image that
    resolves outside the image folder is not exported (the summary says why)."""
    from explorer.stages.images import discover

    root, df = images
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "far.jpg").write_bytes((root / "c.jpg").read_bytes())
    os.symlink(elsewhere, root / "linked")
    os.symlink(root / "x", root / "inside")  # a symlinked folder that stays inside
    found = [p.relative_to(root).as_posix() for p in discover(root)]
    assert "linked/far.jpg" in found and "inside/a.jpg" in found
    t = pd.DataFrame({"path": ["linked/far.jpg", "inside/a.jpg"], "cluster": [0, 0]})
    s = export_folders(t, root, tmp_path / "out", progress=False)
    assert s["written"] == 1 and (tmp_path / "out" / "cluster_0" / "a.jpg").is_file()
    assert [p for p, _ in s["errors"]] == ["linked/far.jpg"]
    assert "outside the image folder" in s["errors"][0][1]


# --------------------------------------------------------------------------- --format parquet / hf
def _with_vectors(csv: Path, n: int) -> np.ndarray:
    vecs = np.arange(n * 4, dtype=np.float32).reshape(n, 4)
    np.save(table.sidecar(csv, "features.npy"), vecs.astype(np.float16))
    return vecs


def test_cli_parquet_holds_table_labels_and_vectors(project, tmp_path, capsys):
    import pyarrow.parquet as pq

    csv, _ = project
    vecs = _with_vectors(csv, 11)
    out = tmp_path / "all.parquet"
    assert cli(["export", str(csv), "--format", "parquet", "--to", str(out), "-q"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["rows"] == 11 and summary["vector_dim"] == 4
    df = pd.read_parquet(out)
    src = table.read_table(csv)
    assert df["path"].tolist() == src["path"].tolist()
    assert df["label"].tolist() == src["label"].tolist()
    assert df["cluster"].tolist() == src["cluster"].tolist()
    np.testing.assert_array_equal(np.stack(df["vector"].to_numpy()), vecs)
    assert pq.read_table(out).num_rows == 11
    # never overwrites
    assert cli(["export", str(csv), "--format", "parquet", "--to", str(out), "-q"]) == 1


def test_cli_parquet_vectors_follow_dropped_rows(project, tmp_path):
    csv, _ = project
    vecs = _with_vectors(csv, 11)
    t = table.read_table(csv)
    t["blurry"] = [1 if i % 3 == 0 else 0 for i in range(11)]
    table.write_table(t, csv)
    out = tmp_path / "kept.parquet"
    assert cli(["export", str(csv), "--format", "parquet", "--to", str(out), "--drop",
                "blurry", "-q"]) == 0
    df = pd.read_parquet(out)
    kept = [i for i in range(11) if i % 3]
    assert df["path"].tolist() == t["path"].iloc[kept].tolist()
    np.testing.assert_array_equal(np.stack(df["vector"].to_numpy()), vecs[kept])


def test_cli_format_refuses_folder_options(project, tmp_path, capsys):
    csv, _ = project
    assert cli(["export", str(csv), "--format", "parquet", "--to", str(tmp_path / "p"),
                "--zip"]) == 2
    assert "--zip" in capsys.readouterr().err
    assert cli(["export", str(csv), "--format", "hf", "--to", str(tmp_path / "h"),
                "--imagefolder"]) == 2
    assert not (tmp_path / "h").exists()


def test_cli_hf_folder_loads_with_labels_and_metadata(project, tmp_path, capsys, monkeypatch):
    csv, root = project
    t = table.read_table(csv)
    t["photographer"] = [f"p{i}" for i in range(len(t))]
    table.write_table(t, csv)
    out = tmp_path / "hf"
    assert cli(["export", str(csv), "--format", "hf", "--to", str(out), "-q"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["images"] == 11
    meta = pd.read_csv(out / "metadata.csv", keep_default_na=False)
    assert {"file_name", "label", "photographer", "thumbnail"} <= set(meta.columns)
    for _, row in meta.iterrows():  # each file_name is the image of its row
        assert (out / row["file_name"]).read_bytes() == (root / row["path"]).read_bytes()
    datasets = pytest.importorskip("datasets")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    ds = datasets.load_dataset("imagefolder", data_dir=str(out),
                               cache_dir=str(tmp_path / "hf-cache"))["train"]
    assert ds.num_rows == 11
    got = {r["path"]: (r["label"] or "", r["photographer"], r["image"].size) for r in ds}
    want = dict(zip(t["path"], zip(t["label"], t["photographer"])))
    assert {k: v[:2] for k, v in got.items()} == want
    assert all(v[2] == (8, 8) for v in got.values())


def test_cli_parquet_leaves_out_vectors_that_do_not_match(project, tmp_path, capsys):
    csv, _ = project
    _with_vectors(csv, 7)  # a stale features file: 7 rows for 11
    out = tmp_path / "p.parquet"
    assert cli(["export", str(csv), "--format", "parquet", "--to", str(out), "-q"]) == 0
    captured = capsys.readouterr()
    assert "no vectors" in captured.err
    assert json.loads(captured.out)["vector_dim"] is None
    assert "vector" not in pd.read_parquet(out).columns
