"""The one CSV schema: writer is atomic and ordered, reader validates and reports problems."""

import os

import numpy as np
import pandas as pd
import pytest

from explorer import table


def _small():
    return table.make_table(
        paths=["a/x.jpg", "b/x.jpg"], images=["static/thumbs/1.jpg", "static/thumbs/2.jpg"],
        xy=np.array([[0.0, 1.0], [2.0, 3.0]]), cluster=[0, -1], probability=[0.9, 0.0],
        outlier_score=[0.1, 0.8], width=[10, 20], height=[5, 6],
    )


def test_roundtrip_keeps_columns_order_and_types(tmp_path):
    df = _small()
    df["note"] = ["keep me", ""]
    p = table.write_table(df, tmp_path / "t.csv")
    back = table.read_table(p)
    assert list(back.columns[: len(table.COLUMNS)]) == list(table.COLUMNS)
    assert back["note"].tolist() == ["keep me", ""]
    assert back["cluster"].tolist() == [0, -1]
    assert back["x"].dtype == float and back["width"].dtype.kind == "i"
    assert back.attrs["problems"] == []


def test_strict_reader_names_missing_columns(tmp_path):
    p = tmp_path / "bad.csv"
    p.write_text("path,x,y\na.jpg,1,2\n")
    with pytest.raises(table.SchemaError, match="cluster"):
        table.read_table(p)


def test_lenient_reader_reports_problems_but_loads(tmp_path):
    p = tmp_path / "bad.csv"
    p.write_text("path,x,y,extra\na.jpg,1,2,z\nb.jpg,,3,z\n")
    df = table.read_table(p, strict=False)
    assert len(df) == 2
    assert df["cluster"].tolist() == [-1, -1]
    problems = " ".join(df.attrs["problems"])
    assert "missing column" in problems and "no valid x/y" in problems


def test_lenient_reader_refuses_csv_without_coordinates(tmp_path):
    p = tmp_path / "noxy.csv"
    p.write_text("path,cluster\na.jpg,1\n")
    with pytest.raises(table.SchemaError, match="x, y"):
        table.read_table(p, strict=False)


def test_empty_csv_is_a_problem_not_a_crash(tmp_path):
    p = tmp_path / "empty.csv"
    p.write_text(",".join(table.REQUIRED_COLUMNS) + "\n")
    df = table.read_table(p, strict=False)
    assert len(df) == 0 and "no rows" in " ".join(df.attrs["problems"])


def test_atomic_write_leaves_old_file_when_interrupted(tmp_path, monkeypatch):
    p = tmp_path / "t.csv"
    table.write_table(_small(), p)
    before = p.read_text()

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError):
        table.write_table(_small().iloc[:1], p)
    assert p.read_text() == before
    assert [f.name for f in tmp_path.iterdir()] == ["t.csv"]  # no temp file left behind


def test_sidecar_names():
    assert table.sidecar("/d/photos.csv", "run.json").name == "photos.run.json"
    assert table.sidecar("photos.v2.csv", "errors.csv").name == "photos.v2.errors.csv"


def test_make_table_rejects_misaligned_columns():
    with pytest.raises(ValueError, match="cluster"):
        table.make_table(["a"], ["i"], np.zeros((1, 2)), [0, 1], [0.0], [0.0], [1], [1])


def test_hostile_strings_survive_roundtrip(tmp_path):
    df = _small()
    df.loc[0, "path"] = 'we,ird "name"\n<img src=x onerror=alert(1)>.jpg'
    p = table.write_table(df, tmp_path / "t.csv")
    assert table.read_table(p)["path"][0] == df["path"][0]
    assert isinstance(pd.read_csv(p), pd.DataFrame)


def test_text_columns_keep_their_exact_text_and_junk_numbers_are_reported(tmp_path):
    p = tmp_path / "t.csv"
    p.write_text("path,image,x,y,cluster,probability,outlier_score,width,height,zip\n"
                 "007.jpg,i,1,2,3,0.5,0.1,10,20,007\n"
                 "b.jpg,i,1,oops,x,0.5,0.1,10,20,\n")
    df = table.read_table(p, strict=False)
    assert df["path"].tolist() == ["007.jpg", "b.jpg"] and df["zip"].tolist() == ["007", ""]
    assert df["cluster"].tolist() == [3, -1] and np.isnan(df["y"][1])
    problems = " ".join(df.attrs["problems"])
    assert "'y'" in problems and "'cluster'" in problems


@pytest.mark.skipif(os.name == "nt", reason="POSIX permissions")
@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o002, 0o664), (0o077, 0o600)])
def test_written_files_get_the_users_normal_permissions(tmp_path, umask, mode):
    """M10: not mkstemp's owner-only 0600, but what the umask gives a plain new file."""
    old = os.umask(umask)
    try:
        p = table.write_table(_small(), tmp_path / "t.csv")
        j = table.write_json(tmp_path / "t.run.json", {"a": 1})
        plain = tmp_path / "plain.txt"
        plain.write_text("x")
        expected_plain = plain.stat().st_mode & 0o777
    finally:
        os.umask(old)
    assert p.stat().st_mode & 0o777 == mode == expected_plain
    assert j.stat().st_mode & 0o777 == mode


def test_atomic_write_fsyncs_the_folder_after_the_rename(tmp_path, monkeypatch):
    """M10: the rename is made durable: the parent folder is fsynced after os.replace."""
    events = []
    real_replace, real_fsync, real_open = os.replace, os.fsync, os.open
    folders = {}

    def spy_open(path, flags, *a, **kw):
        fd = real_open(path, flags, *a, **kw)
        if os.path.isdir(path):
            folders[fd] = os.path.realpath(path)
        return fd

    monkeypatch.setattr(os, "replace", lambda a, b: (events.append("replace"), real_replace(a, b)))
    monkeypatch.setattr(os, "open", spy_open)
    monkeypatch.setattr(os, "fsync", lambda fd: (events.append(folders.get(fd, "file")),
                                                  real_fsync(fd)))
    table.atomic_write_text(tmp_path / "t.txt", "hello")
    assert events == ["file", "replace", os.path.realpath(tmp_path)]
    assert (tmp_path / "t.txt").read_text() == "hello"
