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


# --------------------------------------------------------------------------- N16
def test_missing_txt_names_no_folder_of_the_server(tmp_path):
    from explorer.exports import plan_export

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

    from explorer.cluster import K_MAX_LIMIT, cluster

    X = np.random.default_rng(0).normal(size=(30, 4)).astype(np.float32)
    with pytest.raises(ValueError, match=r"k_max must be an integer in 2\.\.100; got 1000"):
        cluster(X, method, k_max=1000)
    assert K_MAX_LIMIT == 100
    if method == "kmeans":  # the limit itself is accepted (clamped to the distinct points)
        assert cluster(X[:5], method, k_max=K_MAX_LIMIT).labels is not None


# --------------------------------------------------------------------------- N6
def test_contained_discovery_keeps_no_file_that_resolves_outside_the_folder(tmp_path):
    from explorer.images import discover

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
