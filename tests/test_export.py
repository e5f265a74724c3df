"""Cluster / label folders, samples, collisions, no overwrite, missing files."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from explorer.exports import export_folders, parse_sample, safe_name


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
