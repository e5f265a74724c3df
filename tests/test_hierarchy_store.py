"""The group hierarchy stored by the build (``NAME.hierarchy.npz``) and used by the app: the
build writes it, the app's project loads it instead of building it, a corrupt or stale one
falls back to building with a message, and the Treemap's first level of a new session uses
the tile-name codes the project computed at load."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
from bokeh.command.util import build_single_handler_application

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _appdata import copy_app, make_app, app_document  # noqa: E402
from _appdata import widget as w  # noqa: E402

from explorer.stages import hierarchy as H  # noqa: E402
from explorer.app import project as P  # noqa: E402
from explorer.table import sidecar  # noqa: E402


def test_the_build_stores_the_hierarchy_for_its_features(tmp_path):
    from _imagegen import image_folder

    from explorer.stages.pipeline import build

    image_folder(tmp_path / "imgs", 12, size=48)
    res = build(tmp_path / "imgs", out=tmp_path / "out.csv", method="phash", progress=False)
    stored = sidecar(res.csv_path, "hierarchy.npz")
    assert stored.is_file() and "hierarchy" in res.run["timings"]
    feats = np.load(sidecar(res.csv_path, "features.npy"), mmap_mode="r")
    tree = H.load_tree(stored, 12, fingerprint=H.fingerprint(feats), params=H.overview_params(12))
    assert tree.root.count == 12 and sorted(tree.root.members.tolist()) == list(range(12))
    written = stored.stat().st_mtime_ns
    build(tmp_path / "imgs", out=tmp_path / "out.csv", method="phash", progress=False)
    assert stored.stat().st_mtime_ns == written  # the same images: kept, not built again


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    from explorer.table import read_table, write_table

    app_dir, csv = make_app(tmp_path_factory.mktemp("store"), per_group=40)
    df = read_table(csv)
    df["cluster_name"] = [f"group {c}" if c >= 0 else "" for c in df["cluster"]]
    write_table(df, csv)
    feats = np.load(sidecar(csv, "features.npy"))
    n = len(feats)
    tree = H.build_hierarchy(feats, **H.overview_params(n))
    H.save_tree(sidecar(csv, "hierarchy.npz"), tree, H.fingerprint(feats))
    return app_dir, csv, tree


@pytest.fixture
def app(built, tmp_path):
    P.forget_projects()
    yield copy_app(*built[:2], tmp_path, sidecars=("run.json", "features.npy", "hierarchy.npz"))
    P.forget_projects()


@pytest.fixture
def builds(monkeypatch):
    """Counts calls of build_hierarchy (still building)."""
    calls = []
    real = H.build_hierarchy

    def spy(*a, **kw):
        calls.append(1)
        return real(*a, **kw)

    monkeypatch.setattr(H, "build_hierarchy", spy)
    return calls


def _open_treemap(doc):
    tabs = w(doc, "tabs")
    tabs.active = [t.title for t in tabs.tabs].index("Treemap")


def test_the_app_uses_the_stored_hierarchy_without_building(app, built, builds):
    project = P.load_project(app[1], app[0])
    assert project.tree_ready is not None and project.tree_problem is None
    assert list(project.tree_ready.nodes) == list(built[2].nodes)
    doc = app_document(*app)
    _open_treemap(doc)
    tiles = w(doc, "treemap_tiles").data
    assert list(tiles["id"]) == [c.id for c in built[2].children("root")]  # drawn at once
    assert builds == []


@pytest.mark.parametrize("spoil", ["garbage", "other features", "other rows", "huge member"])
def test_a_bad_stored_hierarchy_falls_back_to_building_with_a_message(app, builds, spoil):
    app_dir, csv = app
    path = sidecar(csv, "hierarchy.npz")
    feats = np.load(sidecar(csv, "features.npy"))
    if spoil == "garbage":
        path.write_bytes(b"PK\x03\x04 not a zip at all")
    elif spoil == "other features":
        other = feats[::-1].copy()
        H.save_tree(path, H.build_hierarchy(other, **H.overview_params(len(other))), H.fingerprint(other))
    elif spoil == "other rows":
        few = feats[:100]
        H.save_tree(path, H.build_hierarchy(few, **H.overview_params(100)), H.fingerprint(few))
    else:  # a zip whose member claims to be far larger than any hierarchy of these rows
        import zipfile

        with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
            zf.writestr("members.npy", b"\0" * (8 * 67 * (len(feats) + 1) + (1 << 20)))
    builds.clear()
    project = P.load_project(csv, app_dir)
    assert project.tree_ready is None
    assert "hierarchy.npz" in project.tree_problem and "built again" in project.tree_problem
    assert project.tree_problem in project.problems  # shown on the page
    tree = project.tree()  # the fallback, as the Overview / Treemap tabs run it
    assert builds == [1] and tree.root.count == len(feats)


def test_a_new_sessions_first_level_uses_the_codes_computed_at_load(app, monkeypatch):
    made = []
    real = P.text_codes
    monkeypatch.setattr(P, "text_codes", lambda s: made.append(1) or real(s))
    P.load_project(app[1], app[0])
    assert made == [1]  # at project load, with the stored hierarchy
    handler = build_single_handler_application(str(app[0]), argv=[str(app[1])])
    for _ in range(2):
        doc = handler.create_document()
        _open_treemap(doc)
        names = w(doc, "treemap_tiles").data["name"]
        assert any(names)  # tiles are named from the cluster_name codes
    assert made == [1]


def _arrays():
    X = np.random.default_rng(0).normal(size=(300, 8)).astype(np.float32)
    tree = H.build_hierarchy(X, **H.overview_params(300))
    return tree, H.tree_to_arrays(tree, H.fingerprint(X)), H.fingerprint(X)


@pytest.mark.parametrize("spoil, message", [
    (lambda a: {**a, "meta": np.array("[" * 100000 + "]" * 100000)}, "meta"),
    (lambda a: {**a, "members": a["members"][::-1].copy()}, "root does not hold"),
    (lambda a: {**a, "members": np.r_[a["members"][:300], a["members"][300:][::-1]]}, "not ascending"),
    (lambda a: {**a, "representatives": a["representatives"] + 10**6}, "outside"),
    (lambda a: {**a, "parent": np.r_[-1, np.arange(1, len(a["parent"]))]}, "parent does not come before"),
    (lambda a: {k: v for k, v in a.items() if k != "members"}, "no 'members'"),
])
def test_hostile_arrays_are_refused_with_a_reason(spoil, message):
    tree, arrays, fp = _arrays()
    again = H.tree_from_arrays(arrays, 300, fingerprint=fp)
    assert list(again.nodes) == list(tree.nodes)
    assert all(np.array_equal(again.nodes[k].members, tree.nodes[k].members) for k in tree.nodes)
    with pytest.raises(H.HierarchyFileError, match=message):
        H.tree_from_arrays(spoil(arrays), 300, fingerprint=fp)
