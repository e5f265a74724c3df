"""Curation in the app's state model (issue 5): labels, undo, journal replay, suggestions,
neighbours, re-cluster drill-down, overview, metadata, labelled save / ImageFolder export."""

from __future__ import annotations

import sys
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

sys.path.insert(0, str(Path(__file__).parent))
from _appdata import copy_app, make_app  # noqa: E402

from explorer.app.state import AppState  # noqa: E402
from explorer.curation.journal import Journal  # noqa: E402
from explorer.table import read_table, sidecar  # noqa: E402


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    return make_app(tmp_path_factory.mktemp("curation"), hostile=False)


@pytest.fixture
def app(built, tmp_path):
    return copy_app(*built, tmp_path, sidecars=("run.json", "features.npy"))


def open_state(app) -> AppState:
    return AppState.from_csv(app[1], app_dir=app[0])


def rows_of(st, cluster) -> np.ndarray:
    return np.flatnonzero(st.labels("cluster") == str(cluster))


def test_apply_label_goes_to_the_journal_before_saying_saved(app):
    st = open_state(app)
    st.select(rows_of(st, 0))
    assert st.apply_label("kitty")
    assert st.message[0] == "info" and st.message[1].startswith("saved:")
    records = Journal(sidecar(app[1], "labels.sqlite")).replay()
    assert records[-1]["op"] == "apply"
    assert sum(len(keys) for _, _, keys in records[-1]["args"]["changes"]) == 8
    assert set(st.labels("label")[rows_of(st, 0)]) == {"kitty"}
    assert st.labels("cluster")[rows_of(st, 0)].tolist() == ["0"] * 8  # cluster unchanged


def test_label_colours_follow_edits_live(app):
    st = open_state(app)
    st.set_label_column("label")
    before = dict(st.label_counts())
    st.select(rows_of(st, 1))
    st.apply_label("mug")
    after = st.label_counts()
    assert after["mug"] == 8 and "coffee" not in after and before["coffee"] == 8
    assert "mug" in [v for v, *_ in st.legend()]


def test_every_edit_undoes_and_redoes_several_steps(app):
    st = open_state(app)
    states = [st.labels("label").copy()]  # the labels after each step, recorded as we go
    steps = [
        lambda: (st.select(rows_of(st, 0)), st.apply_label("a")),
        lambda: (st.select(rows_of(st, 1)), st.discard_selection()),
        lambda: st.rename_label("a", "b"),
        lambda: st.merge_labels("b", "rocket"),
        lambda: (st.select(rows_of(st, 2)), st.clear_selection_labels()),
    ]
    for step in steps:
        step()
        states.append(st.labels("label").copy())
    assert all((states[i] != states[i + 1]).any() for i in range(5))  # every step changed something
    assert set(states[5][rows_of(st, 0)]) == {"rocket"}
    assert set(states[5][rows_of(st, 1)]) == {"discard"}
    assert set(states[5][rows_of(st, 2)]) == {""}
    for i in range(5, 0, -1):  # undo goes back through every intermediate state, in order
        assert st.undo_labels()
        assert (st.labels("label") == states[i - 1]).all(), f"undo to step {i - 1}"
    assert not st.undo_labels()  # nothing left: "nothing changed"
    for i in range(1, 6):  # and redo forward through them again
        assert st.redo_labels()
        assert (st.labels("label") == states[i]).all(), f"redo to step {i}"


def test_bad_labels_and_empty_selection_are_refused_with_a_message(app):
    st = open_state(app)
    assert not st.apply_label("x")  # nothing selected
    assert st.message[0] == "error" and "select" in st.message[1]
    st.select(rows_of(st, 0))
    assert not st.apply_label("   ")
    assert st.message[0] == "error" and "empty" in st.message[1]
    assert not st.rename_label("no such label", "y")
    assert st.message[0] == "error"
    assert all(r["op"] != "rename" for r in Journal(sidecar(app[1], "labels.sqlite")).replay())


def test_reopening_replays_the_journal_and_never_touches_the_csv(app):
    csv_bytes = app[1].read_bytes()
    st = open_state(app)
    st.select(rows_of(st, 3))
    st.apply_label("spaceship")
    st.select(rows_of(st, -1))
    st.discard_selection()
    again = open_state(app)
    assert (again.labels("label") == st.labels("label")).all()
    assert set(again.labels("label")[rows_of(again, 3)]) == {"spaceship"}
    assert app[1].read_bytes() == csv_bytes
    # the CSV's own label column is the initial state
    assert set(again.labels("label")[rows_of(again, 0)]) == {"cat"}


def test_two_sessions_see_each_other_and_undo_only_their_own(app):
    a, b = open_state(app), open_state(app)
    a.select(rows_of(a, 0))
    a.apply_label("from-a")
    changed = b.sync_labels()
    assert len(changed) == 8 and set(b.labels("label")[rows_of(b, 0)]) == {"from-a"}
    b.select(rows_of(b, 1))
    b.apply_label("from-b")
    a.undo_labels()  # takes back a's edit only
    b.sync_labels()
    assert set(b.labels("label")[rows_of(b, 0)]) == {"cat"}
    assert set(b.labels("label")[rows_of(b, 1)]) == {"from-b"}
    assert b.sync_labels() == []  # nothing new: no re-render


def test_label_similar_suggests_and_applies_only_when_accepted(app):
    st = open_state(app)
    everything = np.arange(st.n_rows)
    st.select(everything)
    st.clear_selection_labels()
    st.select(rows_of(st, 0)[:3])
    st.apply_label("cat")
    st.select(rows_of(st, 1)[:3])
    st.apply_label("cup")
    n = st.propose(k=3, min_agreement=0.6)
    assert n > 0
    sg = st.suggestions
    proposed = dict(zip(sg["row"], sg["proposed_label"]))
    for r in rows_of(st, 0)[3:]:
        assert proposed.get(r) == "cat"
    for r in rows_of(st, 1)[3:]:
        assert proposed.get(r) == "cup"
    assert (st.labels("label")[rows_of(st, 0)[3:]] == "").all()  # never applied silently
    first = int(sg["row"].iloc[0])
    st.reject_suggestions([0])
    assert first not in st.suggestions["row"].tolist()
    st.accept_suggestions(None)
    assert len(st.suggestions) == 0
    for r in rows_of(st, 1):
        assert st.labels("label")[r] == ("" if r == first else "cup")
    assert st.labels("label")[first] == ""
    st.undo_labels()  # one step takes back every accepted suggestion
    assert (st.labels("label")[rows_of(st, 1)[3:]] == "").all()


def test_clicking_one_image_shows_its_neighbours(app):
    st = open_state(app)
    r = int(rows_of(st, 2)[0])
    st.select([r])
    row, idx, dist = st.neighbours
    assert row == r and len(idx) == 12
    assert set(idx[:7]) == set(rows_of(st, 2)) - {r}  # its own group first
    assert (np.diff(dist) >= 0).all() and dist[0] < 0.1
    st.select_neighbours()
    assert len(st.selection) == 13


def test_no_features_disables_neighbours_and_recluster_with_a_message(app):
    sidecar(app[1], "features.npy").unlink()
    st = open_state(app)
    st.select(rows_of(st, 0))
    assert st.neighbours is None
    assert not st.recluster_selection()
    assert "features.npy" in st.message[1]
    assert st.propose() == 0 and st.message[0] == "error"
    st.select([0])  # still works for everything else
    assert st.apply_label("ok")


def test_features_of_the_wrong_shape_are_refused(app):
    np.save(sidecar(app[1], "features.npy"), np.zeros((3, 4), np.float16))
    st = open_state(app)
    assert not st.has_features and "shape" in st.message[1] + " ".join([st.features_problem or ""])


def test_recluster_drill_down_and_back(app):
    st = open_state(app)
    sel = np.concatenate([rows_of(st, 2), rows_of(st, 3)])
    st.select(sel)
    assert st.recluster_selection()
    assert st.label_column == "subcluster" and st.breadcrumbs() == ["all", "sel"]
    assert st.valid.sum() == 16
    subs = st.labels()[sel]
    assert set(subs) == {"sel.1", "sel.2"}
    # each original group is one sub-cluster
    assert len(set(subs[:8])) == 1 and len(set(subs[8:])) == 1
    x, y = st.xy()
    assert np.isfinite(x[sel]).all() and np.isnan(np.delete(x, sel)).all()
    # labels still work on the sub-map
    st.select(sel[:8])
    assert st.apply_label("sub")
    # drill further into one sub-cluster: ids read sel.1.1 ...
    st.set_label_filter(["sel.1"])
    assert st.recluster_selection()
    assert st.breadcrumbs() == ["all", "sel", "sel.1"]
    assert all(v.startswith("sel.1.") for v in st.label_values())
    st.drill_up(0)
    assert st.breadcrumbs() == ["all"] and st.valid.all() and st.label_column == "cluster"
    assert (st.selection == np.sort(sel)).all()


def test_overview_groups_and_jump_by_id(app):
    st = open_state(app)
    assert st.open_group("root")
    groups = st.overview_groups()
    assert 2 <= len(groups) <= 16
    assert sum(c for _, c, _ in groups) == st.n_rows
    gid = groups[0][0]
    assert st.open_group(gid.replace("root-", ""))  # "1" means root-1
    assert st.overview_id == gid
    assert not st.open_group("root-99")
    assert st.message[0] == "error" and "root-99" in st.message[1]
    st.select_group(gid)
    assert len(st.selection) == groups[0][1]


def test_metadata_upload_colours_filters_and_tags(app):
    st = open_state(app)
    meta = "file,season,tags\ncat_001.jpg,summer,#beach #sun\ncat_002.jpg,winter,\"beach, snow\"\ncoffee_000.jpg,summer,#sun\n"
    assert st.join_metadata(meta.encode(), "meta.csv", "file")
    assert "matched 3 of" in st.message[1]
    assert "season" in st.label_columns()
    st.set_label_column("season")
    assert st.label_counts()["summer"] == 2
    st.set_label_filter(["winter"])
    assert len(st.selection) == 1
    assert st.tag_columns() == ["tags"]
    assert st.tag_counts("tags") == {"beach": 2, "sun": 2, "snow": 1}
    st.select_tag("tags", "beach")
    assert len(st.selection) == 2
    # metadata goes into exports
    res = st.save_labels("with-meta")
    out = read_table(res.csv, strict=False)
    assert {"season", "tags"} <= set(out.columns)


def test_bad_metadata_upload_says_why(app):
    st = open_state(app)
    assert not st.join_metadata(b"a,b\n1,2\n", "m.csv", "file")
    assert st.message[0] == "error" and "file" in st.message[1]


def test_save_labels_writes_new_files_and_an_imagefolder_zip(app, tmp_path):
    from torchvision.datasets import ImageFolder

    csv_bytes = app[1].read_bytes()
    st = open_state(app)
    st.select(rows_of(st, -1))
    st.discard_selection()
    st.select(rows_of(st, 0))
    st.apply_label("feline")
    res = st.save_labels("mylabels", imagefolder=True)
    assert app[1].read_bytes() == csv_bytes
    out = read_table(res.csv, strict=False)
    assert len(out) == st.n_rows
    assert (out.loc[rows_of(st, 0), "label"] == "feline").all()
    assert res.zip is not None and [n for n, _ in res.downloads] == ["mylabels.csv", "mylabels.zip"]
    dest = tmp_path / "unzipped"
    with zipfile.ZipFile(res.zip) as zf:
        zf.extractall(dest)
    roots = [p for p in dest.iterdir() if p.is_dir()]
    ds = ImageFolder(str(roots[0]))
    assert ds.classes == sorted(["feline", "coffee", "astronaut", "rocket"])
    assert len(ds) == 32  # the 3 discarded images are left out
    img, target = ds[0]
    assert img.size[0] > 0 and ds.classes[target] in ds.classes
    # a second save never overwrites
    again = st.save_labels("mylabels", imagefolder=True)
    assert again.csv != res.csv and again.zip != res.zip and zipfile.is_zipfile(res.zip)


def test_selection_save_carries_current_labels(app):
    st = open_state(app)
    st.select(rows_of(st, 3))
    st.apply_label("launch")
    res = st.export("sel")
    out = pd.read_csv(res.csv)
    assert set(out["label"]) == {"launch"}


def test_a_failed_journal_write_is_reported_and_changes_nothing(app, monkeypatch):
    st = open_state(app)
    before = st.labels("label").copy()

    def full_disk(record):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(st.book.journal, "append", full_disk)
    st.select(rows_of(st, 0))
    assert not st.apply_label("lost?")
    assert st.message[0] == "error" and "NOT saved" in st.message[1] and "saved:" not in st.message[1]
    assert (st.labels("label") == before).all()


def test_an_unreadable_journal_is_a_problem_not_a_crash(app):
    sidecar(app[1], "labels.sqlite").mkdir()  # a folder where the journal should be
    st = open_state(app)
    assert any("NOT be saved" in p for p in st.problems)
    st.select(rows_of(st, 0))
    assert st.apply_label("kept in memory")
    assert st.message[0] == "warning" and "NOT saved" in st.message[1]


def test_a_metadata_upload_with_a_1_mib_key_is_refused_quickly(app):
    """H2 at the app: the join refuses it with a message (caps live in explorer.stages.metadata)."""
    st = open_state(app)
    data = b"path,colour\n" + b"a/" * (1 << 19) + b"x.jpg,red\n"
    assert not st.join_metadata(data, "evil.csv", "path")
    assert st.message[0] == "error" and "metadata not joined" in st.message[1]
    assert "colour" not in st.table.columns
