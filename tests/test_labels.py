"""LabelBook edits with undo/redo, journal replay, two tabs, suggestions, nearest neighbours."""

from __future__ import annotations

import json
import sqlite3
import sys
import zlib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from explorer.curation.journal import Journal, journal_for
from explorer.curation.labels import (
    DISCARD,
    MAX_LABEL_LENGTH,
    LabelBook,
    LabelState,
    labelled_table,
    propose_labels,
    validate_label,
)
from explorer.stages.neighbours import nearest, row_norms
from tests._procs import in_new_process

KEYS = [f"img/{i:02d}.jpg" for i in range(10)]


@pytest.fixture(params=["memory", "journal"])
def book(request, tmp_path):
    if request.param == "memory":
        return LabelBook(keys=KEYS)
    return LabelBook(Journal(tmp_path / "t.labels.sqlite"), keys=KEYS)


# ------------------------------------------------------------------ validation
@pytest.mark.parametrize(
    "bad, match",
    [
        ("", "empty"),
        ("   ", "empty"),
        ("x" * (MAX_LABEL_LENGTH + 1), "at most"),
        ("cat\ndog", "control"),
        ("tab\there", "control"),
        ("nul\x00", "control"),
        ("rtl\u202eoverride", "control"),
        (None, "text"),
        (3, "text"),
    ],
)
def test_bad_labels_are_refused_with_a_clear_message(book, bad, match):
    with pytest.raises(ValueError, match=match):
        book.apply(KEYS[:2], bad)
    assert book.counts() == {} and not book.can_undo


def test_label_is_stripped_and_unicode_kept():
    assert validate_label("  caf\u00e9 au lait ") == "caf\u00e9 au lait"
    assert validate_label("\u732b") == "\u732b"


def test_unknown_or_bad_keys_are_refused(book):
    with pytest.raises(ValueError, match="unknown image key"):
        book.apply(["img/00.jpg", "nope.jpg"], "cat")
    with pytest.raises(ValueError, match="non-empty string"):
        book.apply([""], "cat")
    assert book.counts() == {}


# ------------------------------------------------------------------ edits and undo/redo
def test_apply_labels_every_selected_image(book):
    book.apply(KEYS[:3], "cat")
    book.apply(KEYS[3:5], "dog")
    assert book.labels_for(KEYS[:6]) == ["cat"] * 3 + ["dog"] * 2 + [""]
    assert book.counts() == {"cat": 3, "dog": 2}
    # relabelling a subset moves them
    book.apply(KEYS[2:4], "bird")
    assert book.counts() == {"bird": 2, "cat": 2, "dog": 1}


def test_undo_redo_several_steps(book):
    book.apply(KEYS[:4], "cat")
    book.apply(KEYS[2:6], "dog")
    book.discard(KEYS[5:7])
    states = [book.labels_for(KEYS)]
    book.undo()
    assert book.labels_for(KEYS[5:7]) == ["dog", ""]
    book.undo()
    assert book.labels_for(KEYS[:6]) == ["cat"] * 4 + ["", ""]
    book.undo()
    assert book.counts() == {} and not book.can_undo
    assert book.undo() is None  # nothing left: no error, nothing recorded
    book.redo()
    book.redo()
    book.redo()
    assert book.labels_for(KEYS) == states[0]
    assert not book.can_redo and book.redo() is None


def test_a_new_edit_clears_redo(book):
    book.apply(KEYS[:2], "cat")
    book.undo()
    assert book.can_redo
    book.apply(KEYS[:1], "dog")
    assert not book.can_redo
    assert book.counts() == {"dog": 1}


def test_rename_and_its_undo(book):
    book.apply(KEYS[:3], "kitty")
    book.apply(KEYS[3:4], "dog")
    book.rename("kitty", "cat")
    assert book.counts() == {"cat": 3, "dog": 1}
    book.undo()
    assert book.counts() == {"kitty": 3, "dog": 1}
    with pytest.raises(ValueError, match="no image has"):
        book.rename("unicorn", "horse")
    with pytest.raises(ValueError, match="already in use"):
        book.rename("kitty", "dog")
    assert book.counts() == {"kitty": 3, "dog": 1}


def test_merge_two_labels_and_undo(book):
    book.apply(KEYS[:2], "cat")
    book.apply(KEYS[2:5], "kitten")
    book.apply(KEYS[5:6], "dog")
    book.merge("kitten", "cat")
    assert book.counts() == {"cat": 5, "dog": 1}
    book.undo()
    assert book.counts() == {"kitten": 3, "cat": 2, "dog": 1}
    book.merge("cat", "kitten", into="feline")
    assert book.counts() == {"feline": 5, "dog": 1}
    with pytest.raises(ValueError, match="no image has"):
        book.merge("x", "y")


def test_discard_is_the_reserved_label_and_undo_restores_the_old_label(book):
    book.apply(KEYS[:3], "cat")
    book.discard(KEYS[1:4])
    assert book.labels_for(KEYS[:4]) == ["cat", DISCARD, DISCARD, DISCARD]
    assert book.counts()[DISCARD] == 3
    book.undo()
    assert book.labels_for(KEYS[:4]) == ["cat", "cat", "cat", ""]


def test_clear_removes_labels_and_is_undoable(book):
    book.apply(KEYS[:3], "cat")
    book.clear(KEYS[:2])
    assert book.labels_for(KEYS[:3]) == ["", "", "cat"]
    book.undo()
    assert book.labels_for(KEYS[:3]) == ["cat"] * 3


def test_no_op_edit_records_nothing(book):
    book.apply(KEYS[:2], "cat")
    assert book.apply(KEYS[:2], "cat") is None
    assert book.clear(KEYS[5:7]) is None
    book.undo()
    assert book.counts() == {} and not book.can_undo


def test_assign_accepts_many_labels_in_one_undoable_step(book):
    book.assign({KEYS[0]: "cat", KEYS[1]: "dog", KEYS[2]: "cat"})
    assert book.counts() == {"cat": 2, "dog": 1}
    book.undo()
    assert book.counts() == {}


def test_initial_labels_from_the_csv_are_the_starting_point():
    book = LabelBook(initial={KEYS[0]: "cat", KEYS[1]: "", KEYS[2]: float("nan")})
    assert book.counts() == {"cat": 1}
    book.apply([KEYS[0]], "dog")
    book.undo()
    assert book.label_of(KEYS[0]) == "cat"


# ------------------------------------------------------------------ journal replay
def test_every_edit_is_journaled_and_replay_reproduces_state_and_stacks(tmp_path):
    path = tmp_path / "t.labels.sqlite"
    book = LabelBook(Journal(path, session="s1"))
    book.apply(KEYS[:4], "cat")
    book.apply(KEYS[4:6], "dog")
    book.rename("dog", "puppy")
    book.merge("cat", "puppy", into="pet")
    book.discard(KEYS[8:9])
    book.undo()
    book.undo()
    book.redo()
    book.clear(KEYS[:1])
    recs = Journal(path).replay()
    assert [r["op"] for r in recs] == [
        "apply", "apply", "rename", "merge", "discard", "undo", "undo", "redo", "clear",
    ]
    again = LabelBook.from_journal(Journal(path, session="s1"))
    assert again.as_dict() == book.as_dict()
    # same session id: one undo stack, continued by whichever book holds it
    assert again.can_undo and not again.can_redo  # the clear emptied the redo stack
    again.undo()  # takes back the clear
    assert again.labels_for(KEYS[:1]) == ["pet"]
    book.sync()
    assert book.as_dict() == again.as_dict()
    book.undo()  # then the redone merge
    again.sync()
    assert again.counts() == {"cat": 4, "puppy": 2} and again.as_dict() == book.as_dict()


def test_a_reopened_session_id_has_its_own_empty_undo_stack(tmp_path):
    path = tmp_path / "t.labels.sqlite"
    LabelBook(Journal(path, session="old")).apply(KEYS[:2], "cat")
    fresh = LabelBook.from_journal(Journal(path))  # a new browser session
    assert fresh.counts() == {"cat": 2}
    assert not fresh.can_undo  # it never undoes another session's edits


def test_two_tabs_see_each_other_and_never_overwrite(tmp_path):
    path = tmp_path / "t.labels.sqlite"
    a = LabelBook.from_journal(Journal(path, session="A"))
    b = LabelBook.from_journal(Journal(path, session="B"))
    a.apply(KEYS[:3], "cat")
    changed = b.sync()
    assert sorted(changed) == KEYS[:3]
    assert b.counts() == {"cat": 3}
    b.apply(KEYS[2:4], "dog")  # B relabels one of A's images
    a.apply(KEYS[5:6], "bird")  # A catches up before writing
    assert a.as_dict() == {KEYS[0]: "cat", KEYS[1]: "cat", KEYS[2]: "dog", KEYS[3]: "dog",
                           KEYS[5]: "bird"}
    # A undoes its first edit: the image B relabelled keeps B's label
    a.undo()  # bird
    a.undo()  # cat
    assert a.label_of(KEYS[2]) == "dog"
    assert a.labels_for(KEYS[:2]) == ["", ""]
    b.sync()
    assert b.as_dict() == a.as_dict()
    # both replays agree with the live books
    assert LabelBook.from_journal(Journal(path)).as_dict() == a.as_dict()


def test_journal_written_before_memory_changes(tmp_path):
    class FailingJournal(Journal):
        def append(self, record):
            raise OSError("disk full")

    book = LabelBook(FailingJournal(tmp_path / "t.labels.sqlite"))
    with pytest.raises(OSError):
        book.apply(KEYS[:2], "cat")
    assert book.counts() == {}  # the browser is never told it worked


def test_undo_after_other_tabs_changed_every_key_records_nothing(tmp_path):
    # review L6: nothing of A's edit is left to take back
    path = tmp_path / "t.labels.sqlite"
    a = LabelBook(Journal(path, session="A"))
    b = LabelBook(Journal(path, session="B"))
    a.apply(KEYS[:2], "cat")
    a.apply(KEYS[2:4], "dog")
    b.apply(KEYS[2:4], "wolf")  # B relabels everything A's last edit touched
    before = Journal(path).last_seq
    assert a.undo() is None  # "nothing changed": not "saved: undone"
    assert Journal(path).last_seq == before  # no empty record
    assert a.labels_for(KEYS[:4]) == ["cat", "cat", "wolf", "wolf"]
    a.undo()  # the next undo reaches the edit before
    assert a.labels_for(KEYS[:4]) == ["", "", "wolf", "wolf"]


def test_keys_no_longer_in_the_table_are_not_counted(tmp_path):
    # review L5: after a rebuild the journal still holds labels of images that are gone
    path = tmp_path / "t.labels.sqlite"
    LabelBook(Journal(path)).apply(["gone/1.jpg", "gone/2.jpg", KEYS[0]], "ghost")
    LabelBook(Journal(path)).apply(["gone/3.jpg"], "only gone")
    book = LabelBook.from_journal(Journal(path), keys=frozenset(KEYS))
    assert book.counts() == {"ghost": 1}
    assert book.keys_with("ghost") == [KEYS[0]]
    assert len(book) == 1 and book.as_dict() == {KEYS[0]: "ghost"}
    with pytest.raises(ValueError, match="no image has"):
        book.rename("only gone", "x")
    book.rename("ghost", "cat")  # renames the image on the map only
    assert book.counts() == {"cat": 1}


def test_a_big_edit_stores_each_key_once(tmp_path):
    # review M6: the selection used to be written twice (keys and changes)
    path = tmp_path / "t.labels.sqlite"
    keys = [f"folder/photo-{i:05d}.jpg" for i in range(3000)]
    book = LabelBook(Journal(path), keys=frozenset(keys))
    book.apply(keys[:1000], "cat")
    book.apply(keys, "dog")  # 1,000 cat -> dog and 2,000 unlabelled -> dog
    conn = sqlite3.connect(path)
    stored = conn.execute("SELECT payload FROM events WHERE seq = 2").fetchone()[0]
    conn.close()
    assert isinstance(stored, bytes) and len(stored) < 3000 * 5  # a big record is compressed
    payload = zlib.decompress(stored).decode()
    assert payload.count("photo-00001.jpg") == 1 and payload.count("photo-02999.jpg") == 1
    assert len(payload) < 3000 * (len(keys[0]) + 3) + 200
    changes = json.loads(payload)["args"]["changes"]
    assert sorted((o, n, len(ks)) for o, n, ks in changes) == [("", "dog", 2000), ("cat", "dog", 1000)]
    book.undo()
    assert book.counts() == {"cat": 1000}


def test_sessions_in_one_process_share_one_state_and_the_callers_keys(tmp_path):
    path = tmp_path / "t.labels.sqlite"
    keys = frozenset(KEYS)
    initial = {KEYS[0]: "from csv"}
    a = LabelBook.from_journal(Journal(path, session="A"), keys=keys, initial=initial)
    b = LabelBook.from_journal(Journal(path, session="B"), keys=keys, initial=initial)
    assert a._state is b._state is LabelState.shared(Journal(path))
    assert a._known is keys and a._initial is initial  # shared, not copied per session
    a.apply(KEYS[1:3], "cat")
    assert b.label_of(KEYS[1]) == "cat"  # the same state in this process
    assert sorted(b.sync()) == KEYS[1:3] and b.sync() == []


def test_a_session_in_another_process_sees_edits_and_is_seen(tmp_path):
    csv = tmp_path / "photos.csv"
    csv.write_text("path,x,y\n" + "".join(f"{k},0,0\n" for k in KEYS))
    csv_bytes = csv.read_bytes()
    here = LabelBook.from_journal(journal_for(csv, session="here"), keys=frozenset(KEYS))
    here.apply(KEYS[:2], "cat")
    out = in_new_process(
        """
        import sys
        from explorer.curation.journal import journal_for
        from explorer.curation.labels import LabelBook
        book = LabelBook.from_journal(journal_for(sys.argv[1], session="there"))
        print(book.counts())
        book.apply(sys.argv[2:5], "dog")
        book.apply(sys.argv[5:6], "bird")
        book.undo()
        """,
        csv, *KEYS[1:5],
    )
    assert out.strip() == "{'cat': 2}"
    assert sorted(here.sync()) == KEYS[1:5]  # dog on 3, bird on 1 and undone
    assert here.labels_for(KEYS[:5]) == ["cat", "dog", "dog", "dog", ""]
    assert csv.read_bytes() == csv_bytes  # NAME.csv is never modified
    # a session of the other process continues its undo stack here
    there = LabelBook.from_journal(journal_for(csv, session="there"))
    assert there.can_undo and there.can_redo
    there.undo()
    assert here.sync() == KEYS[1:4] and here.labels_for(KEYS[:4]) == ["cat", "cat", "", ""]


def test_sync_after_more_changes_than_the_state_remembers(tmp_path, monkeypatch):
    import explorer.curation.labels as L

    monkeypatch.setattr(L, "SYNC_LOG_KEYS", 3)
    path = tmp_path / "t.labels.sqlite"
    a = LabelBook(Journal(path, session="A"))
    b = LabelBook(Journal(path, session="B"))
    a.apply(KEYS[:2], "x")
    a.apply(KEYS[2:5], "y")
    a.apply(KEYS[5:6], "z")
    assert sorted(b.sync()) == KEYS[:6]


def test_explorer_export_takes_the_labels_from_the_journal(tmp_path):
    sys.path.insert(0, str(Path(__file__).parent))
    from _imagegen import image_folder

    from explorer import cli, table

    imgs = tmp_path / "imgs"
    rel = [p.relative_to(imgs).as_posix() for p in image_folder(imgs, 4, size=32)]
    df = table.make_table(rel, [""] * 4, np.zeros((4, 2)), np.zeros(4, int), np.ones(4),
                          np.zeros(4), [32] * 4, [32] * 4)
    csv = table.write_table(df, tmp_path / "p.csv")
    book = LabelBook.from_journal(journal_for(csv))
    book.apply(rel[:3], "cat")
    book.apply(rel[2:], "dog")
    out = tmp_path / "out"
    assert cli.main(["export", str(csv), "--to", str(out), "--imagefolder",
                     "--images", str(imgs)]) == 0
    assert len(list((out / "cat").iterdir())) == 2 and len(list((out / "dog").iterdir())) == 2


# ------------------------------------------------------------------ export
def test_labelled_table_fills_the_label_column_and_leaves_df_alone():
    df = pd.DataFrame({"path": KEYS[:4], "label": ["old", "", "keep", ""], "x": range(4)})
    book = LabelBook(initial=dict(zip(df["path"], df["label"])))
    book.apply(KEYS[1:2], "new")
    book.clear(KEYS[:1])
    out = labelled_table(df, book)
    assert out["label"].tolist() == ["", "new", "keep", ""]
    assert df["label"].tolist() == ["old", "", "keep", ""]
    # no label column in the CSV: it is added
    out2 = labelled_table(df.drop(columns="label"), book)
    assert out2["label"].tolist() == ["", "new", "keep", ""]


# ------------------------------------------------------------------ suggestions
def _blobs(seed=0):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(3, 16)) * 5
    X = np.concatenate([c + rng.normal(scale=0.3, size=(30, 16)) for c in centres])
    truth = np.repeat(["a", "b", "c"], 30)
    return X, truth


def test_propose_labels_follows_the_neighbours():
    X, truth = _blobs()
    labels = np.array([""] * len(X), dtype=object)
    for cls in "abc":  # five known examples per class
        labels[np.flatnonzero(truth == cls)[:5]] = cls
    prop = propose_labels(X, list(labels), k=5)
    assert set(prop["index"]) <= set(np.flatnonzero(labels == ""))
    assert len(prop) >= 0.9 * (labels == "").sum()
    correct = (truth[prop["index"]] == prop["proposed_label"]).mean()
    assert correct >= 0.95
    assert prop["confidence"].between(0.6, 1.0).all()
    assert prop["confidence"].is_monotonic_decreasing


def test_propose_labels_holds_back_when_neighbours_disagree():
    X, truth = _blobs(1)
    labels = np.array([""] * len(X), dtype=object)
    a_rows = np.flatnonzero(truth == "a")
    labels[a_rows[:10]] = np.where(np.arange(10) % 2 == 0, "x", "y")  # a coin toss in blob a
    prop = propose_labels(X, list(labels), k=10, min_agreement=0.8)
    assert not set(prop["index"]) & set(a_rows)


def test_propose_labels_nothing_to_do_gives_empty_frame():
    X, _ = _blobs()
    assert propose_labels(X, [""] * len(X)).empty
    assert list(propose_labels(X, ["a"] * len(X)).columns) == [
        "index", "proposed_label", "confidence", "votes", "distance",
    ]


@pytest.mark.parametrize(
    "kw", [{"k": 0}, {"k": 2.5}, {"min_agreement": 0}, {"min_agreement": 1.5}]
)
def test_propose_labels_bad_parameters(kw):
    X, _ = _blobs()
    with pytest.raises(ValueError):
        propose_labels(X, ["a"] + [""] * (len(X) - 1), **kw)


def test_propose_labels_length_mismatch():
    X, _ = _blobs()
    with pytest.raises(ValueError, match="labels for"):
        propose_labels(X, ["a"])


# ------------------------------------------------------------------ nearest
def test_nearest_finds_the_same_blob_and_excludes_itself():
    X, truth = _blobs()
    idx, dist = nearest(X, 3, k=12)
    assert len(idx) == 12 and 3 not in idx
    assert (truth[idx] == truth[3]).all()
    assert np.all(np.diff(dist) >= 0) and (dist >= 0).all()
    # same answer with precomputed norms
    idx2, dist2 = nearest(X, 3, k=12, norms=row_norms(X))
    assert np.array_equal(idx, idx2) and np.allclose(dist, dist2)


def test_nearest_small_sets_and_zero_rows():
    X = np.array([[1.0, 0.0], [0.0, 0.0], [1.0, 0.1]])
    idx, dist = nearest(X, 0, k=12)
    assert idx.tolist() == [2, 1]
    assert dist[1] == pytest.approx(1.0)
    idx, dist = nearest(X[:1], 0)
    assert len(idx) == 0


@pytest.mark.parametrize("kw", [{"index": 99}, {"index": -1}, {"k": 0}, {"index": 1.0}])
def test_nearest_bad_parameters(kw):
    X, _ = _blobs()
    args = {"index": 0, "k": 5, **kw}
    with pytest.raises(ValueError):
        nearest(X, args["index"], k=args["k"])


def test_a_journal_deleted_while_sessions_run_starts_afresh(tmp_path):
    # someone resets the labels by deleting NAME.labels.sqlite while the server runs
    path = tmp_path / "t.labels.sqlite"
    book = LabelBook.from_journal(Journal(path, session="A"), keys=frozenset(KEYS))
    book.apply(KEYS[:3], "cat")
    for f in tmp_path.glob("t.labels.sqlite*"):
        f.unlink()
    assert set(book.sync()) == set(KEYS)  # everything is redrawn
    assert book.counts() == {} and not book.can_undo
    book.apply(KEYS[:1], "dog")  # written to the new file, not the deleted one
    assert Journal(path).labels() == {KEYS[0]: "dog"}


# ------------------------------------------------------------------ accepted predictions
def test_accepted_predictions_are_kept_apart_from_hand_labels(book):
    book.apply(KEYS[:2], "cat")
    rec = book.accept({KEYS[2]: "cat", KEYS[3]: "dog"}, threshold=0.9)
    assert rec["op"] == "accept" and rec["args"]["threshold"] == 0.9
    assert book.labels_for(KEYS[:5]) == ["cat", "cat", "cat", "dog", ""]
    assert book.sources(KEYS[:5]) == ["person", "person", "accepted", "accepted", ""]
    # a person correcting an accepted label makes it theirs; undo gives the source back
    book.apply([KEYS[3]], "fox")
    assert book.sources(KEYS[3:4]) == ["person"]
    book.undo()
    assert book.labels_for(KEYS[3:4]) == ["dog"] and book.sources(KEYS[3:4]) == ["accepted"]
    # "accept all sure" is one step: one undo takes it all back, redo brings it again
    book.undo()
    assert book.labels_for(KEYS[:4]) == ["cat", "cat", "", ""]
    assert book.sources(KEYS[:4]) == ["person", "person", "", ""]
    book.redo()
    assert book.sources(KEYS[:4]) == ["person", "person", "accepted", "accepted"]


def test_accepted_sources_survive_a_reopened_journal(tmp_path):
    path = tmp_path / "t.labels.sqlite"
    book = LabelBook(Journal(path, session="A"), keys=KEYS)
    book.apply(KEYS[:1], "cat")
    book.accept({KEYS[1]: "cat", KEYS[2]: "dog"})
    book.apply([KEYS[2]], "fox")
    # another process (a fresh state) rebuilds the sources from the journal
    other = LabelBook(Journal(path, session="B"), keys=KEYS,
                      state=LabelState(Journal(path, session="B-reader")))
    assert other.sources(KEYS[:4]) == ["person", "accepted", "person", ""]
    # and keeps up with later records of the first session
    book.undo()
    other.sync()
    assert other.sources(KEYS[2:3]) == ["accepted"]
    assert [r["op"] for r in Journal(path).replay()] == ["apply", "accept", "apply", "undo"]


def test_accepting_predictions_never_overwrites_a_label(book):
    """A prediction proposed before a person (or another session) labelled the image does
    not replace that label when "accept all sure" runs later: only unlabelled images change."""
    book.apply(KEYS[:1], "cat")
    book.accept({KEYS[1]: "cat"})
    # the sure predictions were computed when 0-3 were unlabelled; since then 2 got a label
    book.apply([KEYS[2]], "fox")
    rec = book.accept({KEYS[0]: "dog", KEYS[1]: "dog", KEYS[2]: "dog", KEYS[3]: "dog"})
    assert book.labels_for(KEYS[:4]) == ["cat", "cat", "fox", "dog"]
    assert book.sources(KEYS[:4]) == ["person", "accepted", "person", "accepted"]
    assert rec["args"]["n"] == 1 and [g[2] for g in rec["args"]["changes"]] == [[KEYS[3]]]
    # nothing left to accept: no step at all
    assert book.accept({KEYS[2]: "dog"}) is None
    book.undo()
    assert book.labels_for(KEYS[:4]) == ["cat", "cat", "fox", ""]


def test_counts_follow_every_change_of_the_labels(tmp_path):
    """counts() is kept between calls, but never stale: edits, undo, another session's
    records picked up by sync, and a journal deleted by hand all show at once."""
    path = tmp_path / "t.labels.sqlite"
    a = LabelBook(Journal(path, session="A"), keys=KEYS)
    b = LabelBook(Journal(path, session="B"), keys=KEYS,
                  state=LabelState(Journal(path, session="B-reader")))
    a.apply(KEYS[:3], "cat")
    assert a.counts() == {"cat": 3} and a.counts() == {"cat": 3}
    a.apply(KEYS[3:4], "dog")
    assert a.counts() == {"cat": 3, "dog": 1}
    a.undo()
    assert a.counts() == {"cat": 3}
    assert b.counts() == {}
    b.sync()
    assert b.counts() == {"cat": 3}
    b.apply(KEYS[5:7], "fox")
    a.sync()
    assert a.counts() == {"cat": 3, "fox": 2}
    path.unlink()
    Path(str(path) + "-wal").unlink(missing_ok=True)
    Path(str(path) + "-shm").unlink(missing_ok=True)
    fresh = LabelBook(Journal(path, session="C"), keys=KEYS)
    assert fresh.counts() == {} and a.counts() == {}  # a shares the reloaded state
