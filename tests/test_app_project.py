"""The per-process project: shared by sessions, loaded once, clicks that stay O(N) small."""

from __future__ import annotations

import sys
import threading
import tracemalloc
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

sys.path.insert(0, str(Path(__file__).parent))
from _appdata import copy_app, make_app  # noqa: E402

from explorer.app import AppState  # noqa: E402
from explorer.app.project import Project, load_project  # noqa: E402
from explorer.table import sidecar  # noqa: E402


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    return make_app(tmp_path_factory.mktemp("project"))


@pytest.fixture
def app(built, tmp_path):
    return copy_app(*built, tmp_path / "copy", sidecars=("run.json", "features.npy"))


def test_two_sessions_share_one_project_and_keep_their_own_selection(app):
    a = AppState.from_csv(app[1], app_dir=app[0])
    b = AppState.from_csv(app[1], app_dir=app[0])
    assert a.project is b.project
    assert a.table is b.table and a.keys is b.keys and a.labels("cluster") is b.labels("cluster")
    assert a.color_codes()[0] is b.color_codes()[0]
    a.select([0, 1, 2])
    b.set_label_filter(["3"])
    assert a.selection.tolist() == [0, 1, 2] and set(b.selection.tolist()).isdisjoint({0, 1, 2})
    # a metadata join is the session's own: the other session's table is untouched
    assert a.join_metadata(b"path,colour\ncat/cat_001.jpg,red\n", "m.csv", "path")
    assert "colour" in a.table.columns and "colour" not in b.table.columns
    assert "colour" not in a.project.table.columns


def test_concurrent_sessions_load_the_project_once(app):
    got = []
    threads = [threading.Thread(target=lambda: got.append(load_project(app[1], app[0]))) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len({id(p) for p in got}) == 1


def test_a_changed_csv_is_a_new_project(app):
    first = load_project(app[1], app[0])
    df = pd.read_csv(app[1])
    df.loc[0, "cluster"] = 3
    df.to_csv(app[1], index=False)
    second = load_project(app[1], app[0])
    assert second is not first and second.labels("cluster")[0] == "3"


def test_neighbours_are_the_same_group_and_reuse_the_process_norms(app):
    st = AppState.from_csv(app[1], app_dir=app[0])
    row = int(np.flatnonzero(st.labels("cluster") == "2")[0])
    st.show_neighbours(row, k=5)
    r, idx, dist = st.neighbours
    assert r == row and len(idx) == 5 and (np.diff(dist) >= 0).all()
    assert (st.labels("cluster")[idx] == "2").all()
    norms = st.project.norms()
    other = AppState.from_csv(app[1], app_dir=app[0])
    other.show_neighbours(row, k=5)
    assert other.project.norms() is norms and other.neighbours[1].tolist() == idx.tolist()


@pytest.mark.slow
def test_a_click_on_a_million_rows_does_not_copy_the_matrix(tmp_path):
    """H6: one click (select one image + its neighbours) allocates far less than N x D floats."""
    n, d = 1_000_000, 48
    rng = np.random.default_rng(0)
    xy = rng.normal(size=(n, 2)).astype(np.float32)
    df = pd.DataFrame({"path": [f"i/{i}.jpg" for i in range(n)], "image": "", "x": xy[:, 0], "y": xy[:, 1],
                       "cluster": rng.integers(-1, 50, n)})
    csv = tmp_path / "big.csv"
    df.to_csv(csv, index=False)
    del df
    feats = np.lib.format.open_memmap(sidecar(csv, "features.npy"), mode="w+", dtype=np.float16, shape=(n, d))
    for s in range(0, n, 200_000):
        feats[s : s + 200_000] = rng.normal(size=(min(200_000, n - s), d)).astype(np.float16)
    feats.flush()
    del feats
    st = AppState.from_csv(csv, journal=False)
    st.project.norms()  # once per process, at the first click of any session
    st.select([12345])
    tracemalloc.start()
    st.select([777])
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    r, idx, _ = st.neighbours
    assert r == 777 and len(idx) == 12
    assert peak < n * d * 4 / 8, f"a click allocated {peak / 1e6:.0f} MB (N x D float32 = {n * d * 4 / 1e6:.0f} MB)"


def test_a_table_without_a_csv_works_as_a_private_project():
    df = pd.DataFrame({"x": [0.0, 1.0], "y": [0.0, 1.0], "cluster": [0, 1], "path": ["a.jpg", "b.jpg"],
                       "image": ["", ""]})
    st = AppState(df)
    assert isinstance(st.project, Project) and st.n_rows == 2 and st.image_dir is None
