"""The app's state model (explorer.app.state), driven directly: no Bokeh, no browser."""

from __future__ import annotations

import json
import shutil
import sys
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

sys.path.insert(0, str(Path(__file__).parent))
from _appdata import copy_app, HOSTILE, HOSTILE_LABEL, make_app  # noqa: E402

from explorer.app import AppState, ExportError, check_export_name  # noqa: E402
from explorer.app import downloads  # noqa: E402
from explorer.app.state import MUTED_COLOR, PALETTE, thumb_url  # noqa: E402
from explorer.curation.exports import safe_name  # noqa: E402
from explorer.table import read_table, sidecar  # noqa: E402


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("appdata")
    return make_app(root)


@pytest.fixture
def app(built, tmp_path):
    """A private copy of the app (exports write into it) and the original image folder."""
    return copy_app(*built, tmp_path / "copy")


@pytest.fixture
def state(app):
    app_dir, csv = app
    return AppState.from_csv(csv, app_dir=app_dir)


def rows_of(state, column, value):
    return set(np.flatnonzero(state.labels(column) == value).tolist())


# ----------------------------------------------------------------------------- loading
def test_loads_clean_app_without_problems(state):
    assert state.problems == []
    assert state.n_rows == 35
    assert state.label_values() == ["-1", "0", "1", "2", "3"]
    assert state.image_dir is not None and state.image_dir.is_dir()


def test_a_new_session_starts_empty_while_another_has_a_selection(state, app):
    state.set_label_filter(["1"])
    other = AppState.from_csv(app[1], app_dir=app[0])
    assert other.project is state.project
    assert len(other.selection) == 0 and other.label_filter == () and len(state.selection) == 8


# ----------------------------------------------------------------------------- selection
def test_lasso_fills_label_filter_with_labels_present(state):
    c0 = sorted(rows_of(state, "cluster", "0"))
    c2 = sorted(rows_of(state, "cluster", "2"))
    state.select(c0[:3] + c2[:2])
    assert state.label_filter == ("0", "2")
    assert set(state.selection.tolist()) == set(c0[:3] + c2[:2])


def test_choosing_labels_selects_all_their_points(state):
    state.set_label_filter(["1", "3"])
    assert set(state.selection.tolist()) == rows_of(state, "cluster", "1") | rows_of(state, "cluster", "3")


def test_unknown_label_is_refused(state):
    with pytest.raises(ValueError, match="'99'"):
        state.set_label_filter(["99"])


def test_only_change_selected_restricts_label_changes_to_selection(state):
    c0 = sorted(rows_of(state, "cluster", "0"))
    c1 = sorted(rows_of(state, "cluster", "1"))
    lassoed = c0[:4] + c1[:3]
    state.select(lassoed)
    state.set_only_selected(True)
    state.set_label_filter(["0"])  # remove label 1
    assert set(state.selection.tolist()) == set(c0[:4])
    state.set_label_filter(["0", "1"])  # add it back: the same rows, not all of cluster 1
    assert set(state.selection.tolist()) == set(lassoed)


def test_without_only_selected_adding_a_label_takes_all_its_rows(state):
    c0 = sorted(rows_of(state, "cluster", "0"))
    c1 = sorted(rows_of(state, "cluster", "1"))
    state.select(c0[:4] + c1[:3])
    state.set_label_filter(["0"])
    state.set_label_filter(["0", "1"])
    assert set(state.selection.tolist()) == set(c0) | set(c1)


def test_clear_label_filter_selects_nothing_and_save_writes_nothing(state, app):
    state.set_label_filter(["0", "1"])
    state.clear_label_filter()
    assert state.label_filter == () and len(state.selection) == 0
    before = downloads.store().used_bytes()
    with pytest.raises(ExportError, match="nothing selected"):
        state.export("after-clear", images=True)
    assert downloads.store().used_bytes() == before


def test_clear_under_only_selected_keeps_scope_for_adding_back(state):
    c3 = sorted(rows_of(state, "cluster", "3"))
    state.select(c3[:5])
    state.set_only_selected(True)
    state.clear_label_filter()
    state.set_label_filter(["3"])
    assert set(state.selection.tolist()) == set(c3[:5])


def test_reset_returns_to_initial_state(state):
    state.select([0, 1, 2])
    state.set_only_selected(True)
    state.set_label_column("label")
    state.set_point_size(12)
    state.reset()
    assert len(state.selection) == 0 and len(state.scope) == 0
    assert state.label_filter == () and state.only_selected is False
    assert state.label_column == "cluster" and state.point_size == 10.0  # 35 points


def test_subscribers_hear_each_change_once(state):
    heard = []
    state.subscribe(heard.append)
    state.select([0, 1])
    assert len(heard) == 1 and "selection" in heard[0]
    state.set_label_filter(state.label_filter)  # no change: no event
    assert len(heard) == 1


@pytest.mark.parametrize("bad", [["x"], [-1], [10**6], [0.5]])
def test_select_validates_rows(state, bad):
    with pytest.raises(ValueError):
        state.select(bad)


def test_default_point_size_shrinks_with_more_points():
    from explorer.app.state import default_point_size

    sizes = [default_point_size(n) for n in (10, 300, 4_000, 100_000, 10**6)]
    assert sizes == sorted(sizes, reverse=True) and sizes[0] > sizes[-1]
    assert 1 <= min(sizes) and max(sizes) <= 20  # inside the slider's range


def test_bad_parameters_raise_value_error(state):
    with pytest.raises(ValueError, match="'colour'"):
        state.set_label_column("colour")
    with pytest.raises(ValueError, match="-3"):
        state.set_point_size(-3)


# ----------------------------------------------------------------------------- colours
def test_string_labels_colour_the_map(state):
    state.set_label_column("label")
    color, alpha = state.colors()
    labels = state.labels()
    assert HOSTILE_LABEL in set(labels)
    # one colour per label, different labels different colours (fewer labels than palette)
    by_label = {lab: set(color[labels == lab]) for lab in set(labels)}
    assert all(len(c) == 1 for c in by_label.values())
    assert len({next(iter(c)) for c in by_label.values()}) == len(by_label)
    assert (alpha > 0).all()


def test_noise_is_grey_and_faint(state):
    color, alpha = state.colors()
    noise = state.labels() == "-1"
    assert set(color[noise]) == {MUTED_COLOR}
    assert alpha[noise].max() < alpha[~noise].min()


def test_many_clusters_cycle_the_palette():
    n = 200
    df = pd.DataFrame(
        {"x": np.arange(n, dtype=float), "y": np.zeros(n), "cluster": np.arange(n) % 50,
         "path": [f"{i}.jpg" for i in range(n)], "image": [""] * n}
    )  # fmt: skip
    st = AppState(df)
    color, _ = st.colors()
    assert set(color) == set(PALETTE)
    assert len(st.legend()) == 50


# ----------------------------------------------------------------------------- bad input
def test_nan_coordinates_and_missing_thumbnails_are_reported(app):
    app_dir, csv = app
    df = pd.read_csv(csv)
    df.loc[0, "x"] = np.nan
    df.loc[1, "image"] = "static/thumbs/does-not-exist.jpg"
    df = df.drop(columns=["outlier_score"])
    df.to_csv(csv, index=False)
    st = AppState.from_csv(csv, app_dir=app_dir)
    text = " | ".join(st.problems)
    assert "no valid x/y" in text
    assert "outlier_score" in text
    assert "thumbnail" in text and "does-not-exist" in text
    st.select([0, 1, 2])
    assert 0 not in st.selection.tolist()  # not drawn, so not selectable


def test_run_record_missing_is_reported(app):
    app_dir, csv = app
    sidecar(csv, "run.json").unlink()
    st = AppState.from_csv(csv, app_dir=app_dir)
    assert any("run.json" in p for p in st.problems)


# ----------------------------------------------------------------------------- export
@pytest.mark.parametrize(
    "name", ["../evil", "a/b", "a\\b", "x\x00y", "..", "", "   ", ".hidden", "con:x", "tab\there", "x" * 200]
)
def test_bad_export_names_are_refused(state, app, name):
    state.select([0, 1])
    before = sorted(downloads.store().root.iterdir())
    with pytest.raises(ExportError):
        state.export(name)
    assert sorted(downloads.store().root.iterdir()) == before
    assert not (app[0] / "exports").exists()


def test_export_name_suffixes_are_stripped():
    assert check_export_name("cats.csv") == "cats"
    assert check_export_name("cats.ZIP") == "cats"
    assert check_export_name(" my cats ") == "my cats"


def test_export_writes_selected_rows_with_all_columns(state):
    rows = sorted(rows_of(state, "cluster", "2"))
    state.select(rows)
    res = state.export("cats", images=False)
    assert res.csv is not None and res.csv.name == "cats.csv" and res.zip is None
    out = read_table(res.csv)
    assert len(out) == len(rows)
    assert {"x", "y", "photographer", "label", "path"} <= set(out.columns)
    assert np.allclose(out["x"].to_numpy(), state.table["x"].to_numpy()[rows])
    # offered to this session only, by our handler, never published in the app folder
    (fname, url) = res.downloads[0]
    token = url.split("/")[-2]
    assert fname == "cats.csv" and url == f"/{state.route}/_exports/{token}/cats.csv" and len(token) >= 24
    assert not (state.app_dir / "static" / "exports").exists() and not (state.app_dir / "exports").exists()
    assert downloads.store().lookup(token, "cats.csv", state.session_key).path == res.csv
    assert downloads.store().lookup(token, "cats.csv", None) is False
    assert downloads.store().lookup(token, "cats.csv", downloads.DownloadStore.new_key()) is False


def test_csv_and_zip_never_overwrite_each_other_or_earlier_exports(state):
    state.select(sorted(rows_of(state, "cluster", "1")))
    first = state.export("pick", images=True)  # no .csv suffix given
    assert first.csv.name == "pick.csv" and first.zip.name == "pick.zip"
    csv_bytes = first.csv.read_bytes()
    assert csv_bytes.startswith(b"path,")  # the zip did not overwrite the CSV
    state.select(sorted(rows_of(state, "cluster", "3")))
    second = state.export("pick.csv", images=True)
    assert second.csv.name == "pick.csv" and second.zip.name == "pick.zip"
    assert second.csv != first.csv and second.downloads[0][1] != first.downloads[0][1]
    assert first.csv.read_bytes() == csv_bytes
    assert zipfile.is_zipfile(first.zip) and zipfile.is_zipfile(second.zip)


def test_zip_holds_originals_when_started_elsewhere(state, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # not the repo root, not the app folder
    rows = sorted(rows_of(state, "cluster", "0"))
    state.select(rows)
    res = state.export("originals", images=True)
    assert res.originals == len(rows) and res.thumbnails == 0
    with zipfile.ZipFile(res.zip) as zf:
        names = set(zf.namelist())
        assert f"cat/{safe_name(HOSTILE)}" in names  # made filesystem-safe by explorer.curation.exports
        original = (state.image_dir / "cat" / "cat_001.jpg").read_bytes()
        assert zf.read("cat/cat_001.jpg") == original


def test_zip_falls_back_to_thumbnails_and_says_so(app, tmp_path):
    app_dir, csv = app
    json_path = sidecar(csv, "run.json")
    json_path.write_text(json.dumps({"image_dir": str(tmp_path / "gone")}))
    st = AppState.from_csv(csv, app_dir=app_dir)
    assert any("not found" in p for p in st.problems)
    st.select(sorted(rows_of(st, "cluster", "3")))
    res = st.export("thumbs", images=True)
    assert res.originals == 0 and res.thumbnails == 8
    assert "thumbnail" in res.message and "originals not found" in res.message
    with zipfile.ZipFile(res.zip) as zf:
        assert all(n.startswith("thumbnails/") for n in zf.namelist())


def _zip_bytes(res):
    with zipfile.ZipFile(res.zip) as zf:
        return b"".join(zf.read(n) for n in zf.namelist())


def test_zip_never_reads_outside_the_image_folder(app, tmp_path):
    app_dir, csv = app
    secret = tmp_path / "secret.jpg"
    secret.write_bytes(b"do not export")
    df = pd.read_csv(csv)
    df.loc[0, "path"] = "../../secret.jpg"
    df.loc[1, "path"] = str(secret)  # absolute
    df.to_csv(csv, index=False)
    st = AppState.from_csv(csv, app_dir=app_dir)
    st.select([0, 1])
    res = st.export("escape", images=True)
    assert b"do not export" not in _zip_bytes(res)
    assert res.originals == 0


def test_hostile_run_record_root_is_refused_with_a_note(app, tmp_path):
    """H1: a run record saying the images are at / (and CSV paths into /etc) exports nothing of it."""
    app_dir, csv = app
    df = pd.read_csv(csv)
    df.loc[0, "path"] = "etc/passwd"
    df.loc[1, "path"] = "etc/hostname"
    df.to_csv(csv, index=False)
    for record in ({"image_dir": "/"}, {"image_dir_from_csv": "../" * 30}, {"image_dir": "/etc"}):
        sidecar(csv, "run.json").write_text(json.dumps(record))
        st = AppState.from_csv(csv, app_dir=app_dir)
        assert st.image_dir is None
        assert any("refused" in p for p in st.problems), st.problems
        st.select([0, 1])
        res = st.export("hostile", images=True)
        assert res.originals == 0 and res.thumbnails == 2
        assert all(n.startswith("thumbnails/") for n in zipfile.ZipFile(res.zip).namelist())
        assert b"root:" not in _zip_bytes(res)


def test_symlink_out_of_the_image_folder_is_refused(app, tmp_path):
    app_dir, csv = app
    outside = tmp_path / "outside"
    outside.mkdir()
    # a real image outside the image folder, reached through a symlinked folder and file
    (outside / "private.jpg").write_bytes((app_dir / "static" / "thumbs" / "rocket_000_t.jpg").read_bytes() + b"SECRET")
    images = AppState.from_csv(csv, app_dir=app_dir).image_dir
    (images / "link").symlink_to(outside, target_is_directory=True)
    (images / "cat" / "link.jpg").symlink_to(outside / "private.jpg")
    df = pd.read_csv(csv)
    df.loc[0, "path"] = "link/private.jpg"
    df.loc[1, "path"] = "cat/link.jpg"
    df.to_csv(csv, index=False)
    st = AppState.from_csv(csv, app_dir=app_dir)
    st.select([0, 1])
    res = st.export("links", images=True)
    assert res.originals == 0 and b"SECRET" not in _zip_bytes(res)


def test_non_image_files_in_the_image_folder_are_not_exported(app):
    app_dir, csv = app
    st0 = AppState.from_csv(csv, app_dir=app_dir)
    (st0.image_dir / "cat" / "notes.jpg").write_text("not an image")
    df = pd.read_csv(csv)
    df.loc[0, "path"] = "cat/notes.jpg"
    df.to_csv(csv, index=False)
    st = AppState.from_csv(csv, app_dir=app_dir)
    st.select([0])
    res = st.export("notimage", images=True)
    assert res.originals == 0 and b"not an image" not in _zip_bytes(res)


def test_thumb_urls_are_under_the_app_route_and_never_off_site():
    assert thumb_url("static/thumbs/a b.jpg", "demo") == "/demo/static/thumbs/a%20b.jpg"
    for off_site in ("/elsewhere/x.jpg", "https://example.org/x.jpg", "//example.org/x.jpg",
                     "javascript:alert(1)", "../x.jpg", "static/%2e%2e/x.jpg"):  # fmt: skip
        assert thumb_url(off_site, "demo") == "", off_site
    assert "<" not in thumb_url(f"static/thumbs/{HOSTILE}", "demo")


def test_off_site_thumbnails_are_refused_with_a_note(app):
    """L7 and H5: a CSV with no relative thumbnail opens, says why the thumbnails are blank,
    and serves none of them."""
    app_dir, csv = app
    df = pd.read_csv(csv)
    df["image"] = [f"https://tracker.example/{i}.jpg" for i in range(len(df))]
    df.loc[0, "image"] = "//tracker.example/x.jpg"
    df.to_csv(csv, index=False)
    st = AppState.from_csv(csv, app_dir=app_dir)
    note = " ".join(st.problems)
    assert "35 of 35 thumbnail value(s) are not paths inside the app" in note
    assert all(st.project.thumb_file(r) is None for r in range(st.n_rows))
    df["image"] = ""  # explorer build --out X.csv writes no thumbnails at all
    df.to_csv(csv, index=False)
    st = AppState.from_csv(csv, app_dir=app_dir)
    assert st.n_rows == 35 and "not paths inside the app" in " ".join(st.problems)


def test_state_module_does_not_import_bokeh():
    import subprocess

    code = "import sys, explorer.app.state, explorer.app; print(sorted(m for m in sys.modules if m.startswith('bokeh')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_moved_project_finds_images_relative_to_csv(app, built, tmp_path):
    app_dir, csv = app
    images = built[1].parent / "images"
    moved = tmp_path / "copy" / "images"
    shutil.copytree(images, moved)
    sidecar(csv, "run.json").write_text(
        json.dumps({"image_dir": str(tmp_path / "old-place"), "image_dir_from_csv": "images"})
    )
    st = AppState.from_csv(csv, app_dir=app_dir)
    assert st.problems == [] and st.image_dir == moved.resolve()
    st.select(sorted(rows_of(st, "cluster", "1")))
    assert st.export("moved", images=True).originals == 8


def test_the_state_combines_selections_as_the_select_tools_do(state):
    """replace / append (Shift) / intersect (Ctrl) / subtract / toggle (Shift-click) live in
    the state: one call, one change, the label filter following the result."""
    seen = []
    state.subscribe(seen.append)
    state.select([1, 2, 3])
    state.select([3, 4], "append")
    assert state.selection.tolist() == [1, 2, 3, 4]
    state.select([2, 3, 9], "intersect")
    assert state.selection.tolist() == [2, 3]
    state.select([3], "subtract")
    assert state.selection.tolist() == [2]
    state.select([2, 5], "toggle")
    assert state.selection.tolist() == [5]
    assert state.label_filter == state.present_labels(np.asarray([5]))
    assert len(seen) == 5 and all("selection" in s for s in seen)
    with pytest.raises(ValueError, match="'xor'"):
        state.select([1], "xor")
    assert state.selection.tolist() == [5]


def test_a_session_holds_only_declared_attributes(state):
    """A session's state is one declared type (review §2.2: Curation used 27 attributes it
    never declared): after a tour of what a person does, every attribute of the instance is
    declared in :class:`explorer.app.session.SessionFields`."""
    from explorer.app.session import SessionFields, declared_fields

    state.select(range(5))
    state.apply_label("x")
    state.set_label_filter(["0"])
    state.set_only_selected(True)
    state.set_label_column("label")
    state.set_point_size(4)
    state.open_group("root") if state.tree is not None else state.overview()
    state.reset()
    assert isinstance(state, SessionFields)
    undeclared = set(vars(state)) - declared_fields(type(state))
    assert not undeclared, f"undeclared attributes of AppState: {sorted(undeclared)}"


def _self_names(cls: type) -> set[str]:
    """Every ``self.NAME`` that the source of ``cls`` reads, writes or calls."""
    import ast
    import inspect
    import textwrap

    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    return {node.attr for node in ast.walk(tree)
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "self"}


def test_the_parts_of_a_session_use_only_their_own_or_declared_names():
    """The selection and the curation call each other only through what
    :class:`explorer.app.session.SessionFields` declares (review §2.2: Curation used 27
    names it never declared, and the selection called Curation's private
    ``_neighbours_for``). Renaming ``Curation.neighbours_for`` back to a private name, or
    calling ``self._as_rows`` from Curation, fails here."""
    from explorer.app.curation import Curation
    from explorer.app.selection import SelectionModel
    from explorer.app.session import SessionFields, declared_fields, declared_operations

    declared = declared_fields(SessionFields) | declared_operations()
    for part in (SelectionModel, Curation):
        own = {name for klass in part.__mro__[: part.__mro__.index(SessionFields)] for name in vars(klass)}
        stray = _self_names(part) - own - declared
        assert not stray, f"{part.__name__} uses names neither it nor SessionFields declares: {sorted(stray)}"


def test_no_app_module_reaches_into_another_objects_private_names():
    """No private calls across objects in the app tier (review §2.2: the view, the finder
    and the map image called the state's ``_refuse``, ``_say``, ``_emit`` and ``_cached``
    19 times): an attribute starting with ``_`` is read only on ``self`` or ``cls``."""
    import ast

    import explorer.app

    stray = []
    for path in sorted(Path(explorer.app.__file__).parent.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if (isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__")
                    and not (isinstance(node.value, ast.Name) and node.value.id in ("self", "cls"))):
                stray.append(f"{path.name}:{node.lineno} .{node.attr}")
    assert not stray, stray
