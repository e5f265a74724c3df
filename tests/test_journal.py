"""The label journal beside the CSV (SQLite): committed appends, incremental reads, the state
table, old .jsonl journals carried over (review H4), concurrent writers, kill -9, failures."""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
import warnings

import pytest

from explorer.curation.journal import Journal, JournalError, JournalWarning, journal_for
from explorer.curation.labels import LabelBook
from explorer.table import sidecar
from tests._procs import ROOT, in_new_process


def raw_rows(path, sql):
    """Read the database file with a connection of its own (as another program would)."""
    conn = sqlite3.connect(path)
    try:
        return conn.execute(sql).fetchall()
    finally:
        conn.close()


READ_LABELS = """
    import json, sys, warnings
    warnings.simplefilter("ignore")
    from explorer.curation.journal import journal_for
    print(json.dumps(journal_for(sys.argv[1]).labels()))
"""


def old_line(seq, op, args, session="old", ts="2025-05-01T10:00:00+00:00") -> bytes:
    """One line as the old JSONL journal wrote it (keys stored twice, review M6)."""
    rec = {"seq": seq, "ts": ts, "session": session, "op": op, "args": args}
    return json.dumps(rec, separators=(",", ":")).encode() + b"\n"


def old_apply(seq, keys, label, before=""):
    return old_line(seq, "apply", {"keys": keys, "label": label,
                                   "changes": {k: [before, label] for k in keys}})


# ------------------------------------------------------------------ where, and the basics
def test_journal_for_sits_beside_the_csv(tmp_path):
    j = journal_for(tmp_path / "photos.csv")
    assert j.path == sidecar(tmp_path / "photos.csv", "labels.sqlite")
    assert j.path.name == "photos.labels.sqlite"
    assert j.legacy_path.name == "photos.labels.jsonl"


def test_missing_journal_reads_as_empty(tmp_path):
    j = Journal(tmp_path / "none.labels.sqlite")
    assert j.replay() == []
    assert j.read_since(0) == []
    assert j.last_seq == 0 and j.labels() == {}
    assert not j.path.exists() and not j.exists()


def test_each_append_is_committed_to_the_database_before_it_returns(tmp_path):
    j = Journal(tmp_path / "sub" / "j.labels.sqlite", session="tab-1")
    s1 = j.append({"op": "apply", "args": {"label": "cat", "changes": [["", "cat", ["a.jpg"]]]}})
    # another connection (another process would see the same) reads it right away
    assert raw_rows(j.path, "SELECT seq, session, op FROM events") == [(1, "tab-1", "apply")]
    assert raw_rows(j.path, "SELECT key, label FROM labels") == [("a.jpg", "cat")]
    s2 = j.append({"op": "clear", "args": {"changes": [["cat", "", ["a.jpg"]]]}})
    assert (s1, s2) == (1, 2)
    assert raw_rows(j.path, "SELECT key, label FROM labels") == [("a.jpg", "")]
    assert raw_rows(j.path, "PRAGMA journal_mode") == [("wal",)]
    rec = j.replay()[0]
    assert rec["seq"] == 1 and rec["session"] == "tab-1" and rec["op"] == "apply"
    assert rec["args"] == {"label": "cat", "changes": [["", "cat", ["a.jpg"]]]}
    assert rec["ts"].startswith("20")


def test_unicode_and_hostile_strings_round_trip(tmp_path):
    j = Journal(tmp_path / "j.labels.sqlite")
    key = 'weird "name"\\ \u00e9\u6f22\u5b57 \n newline\'); DROP TABLE labels;--.jpg'
    j.append({"op": "apply", "args": {"changes": [["", "caf\u00e9", [key]]]}})
    assert raw_rows(j.path, "SELECT key, label FROM labels") == [(key, "caf\u00e9")]
    assert Journal(j.path).replay()[0]["args"]["changes"] == [["", "caf\u00e9", [key]]]


@pytest.mark.parametrize(
    "record",
    [{"args": {}}, {"op": ""}, {"op": "x", "seq": 5}, {"op": "x", "args": {1, 2}}, ["op"],
     {"op": "x", "args": {"changes": {"k": ["", "a"]}}},  # the old per-key format
     {"op": "x", "args": {"changes": [["", "a", "not a list"]]}},
     {"op": "x", "args": {"changes": [["", "a", [1]]]}}],
)
def test_bad_records_are_refused_and_nothing_written(tmp_path, record):
    j = Journal(tmp_path / "j.labels.sqlite")
    j.append({"op": "first"})
    with pytest.raises(ValueError):
        j.append(record)
    assert [r["op"] for r in j.replay()] == ["first"] and j.labels() == {}


def test_read_since_returns_only_newer_records(tmp_path):
    j = Journal(tmp_path / "j.labels.sqlite")
    for i in range(5):
        j.append({"op": "apply", "args": {"i": i}})
    assert [r["seq"] for r in j.read_since(3)] == [4, 5]
    assert j.read_since(5) == []
    with pytest.raises(ValueError):
        j.read_since(-1)


def test_second_tab_sees_first_tabs_changes_without_reopening(tmp_path):
    a = Journal(tmp_path / "j.labels.sqlite", session="A")
    b = Journal(tmp_path / "j.labels.sqlite", session="B")
    assert b.read_since(0) == []
    a.append({"op": "apply", "args": {"label": "x"}})
    assert [(r["session"], r["seq"]) for r in b.read_since(0)] == [("A", 1)]
    b.append({"op": "apply", "args": {"label": "y"}})
    assert [(r["session"], r["seq"]) for r in a.read_since(1)] == [("B", 2)]


def test_a_failed_locked_block_keeps_nothing(tmp_path):
    j = Journal(tmp_path / "j.labels.sqlite")
    j.append({"op": "kept", "args": {"changes": [["", "a", ["k1"]]]}})
    with pytest.raises(RuntimeError):
        with j.locked():
            j.append({"op": "lost", "args": {"changes": [["a", "b", ["k1"]]]}})
            raise RuntimeError("the caller failed before acknowledging")
    assert [r["op"] for r in j.replay()] == ["kept"] and j.labels() == {"k1": "a"}


# ------------------------------------------------------------------ old .jsonl journals
def test_an_old_jsonl_journal_is_carried_over_once_and_left_untouched(tmp_path):
    csv = tmp_path / "photos.csv"
    old = sidecar(csv, "labels.jsonl")
    old.write_bytes(old_apply(1, ["a.jpg", "b.jpg"], "cat") + old_apply(2, ["c.jpg"], "dog")
                    + old_line(3, "undo", {"target": 2, "changes": {"c.jpg": ["dog", ""]}})
                    + old_apply(4, ["a.jpg"], "tabby", before="cat"))
    before = old.read_bytes()
    book = LabelBook.from_journal(journal_for(csv, session="old"))
    assert book.as_dict() == {"a.jpg": "tabby", "b.jpg": "cat"}
    assert journal_for(csv).meta()["imported_jsonl"]["records"] == 4
    # the old session's stacks come along: its last edit undoes, the undone one does not redo
    assert book.can_undo and not book.can_redo
    book.undo()
    assert book.as_dict() == {"a.jpg": "cat", "b.jpg": "cat"}
    assert old.read_bytes() == before  # never modified
    # the .jsonl is read once: a line added to it later is not imported again (nor twice)
    with open(old, "ab") as fh:
        fh.write(old_apply(5, ["z.jpg"], "late"))
    out = json.loads(in_new_process(READ_LABELS, csv))
    assert out == {"a.jpg": "cat", "b.jpg": "cat", "c.jpg": ""}
    # records are stored in the new format: each key once
    payload = raw_rows(journal_for(csv).path, "SELECT payload FROM events WHERE seq = 1")[0][0]
    assert payload.count("a.jpg") == 1 and "keys" not in json.loads(payload)["args"]


def test_a_complete_but_unterminated_last_line_never_hides_the_next_saved_edit(tmp_path):
    # review H4: a crash just before the final newline leaves a whole JSON object
    csv = tmp_path / "photos.csv"
    old = sidecar(csv, "labels.jsonl")
    old.write_bytes(old_apply(1, ["a.jpg"], "cat") + old_apply(2, ["b.jpg"], "cat")
                    + old_apply(3, ["c.jpg"], "never saved").rstrip(b"\n"))
    with pytest.warns(JournalWarning, match="incomplete last line"):
        book = LabelBook.from_journal(journal_for(csv, session="tab"))
    assert book.as_dict() == {"a.jpg": "cat", "b.jpg": "cat"}
    rec = book.apply(["d.jpg"], "saved")  # acknowledged: the page would say "saved"
    assert rec["seq"] == 3
    out = json.loads(in_new_process(READ_LABELS, csv))  # a server started after a crash
    assert out == {"a.jpg": "cat", "b.jpg": "cat", "d.jpg": "saved"}
    again = LabelBook.from_journal(journal_for(csv, session="tab"))
    assert again.label_of("d.jpg") == "saved" and again.can_undo


def test_an_old_journal_written_after_such_a_tail_keeps_the_acknowledged_record(tmp_path):
    # what the old writer made of H4: the torn tail got its newline, then the saved record
    # came with the same seq; the old reader kept the first and dropped the saved one
    csv = tmp_path / "photos.csv"
    sidecar(csv, "labels.jsonl").write_bytes(
        old_apply(1, ["a.jpg"], "cat") + old_apply(2, ["b.jpg"], "never saved")
        + old_apply(2, ["c.jpg"], "saved") + old_apply(3, ["d.jpg"], "saved too"))
    with pytest.warns(JournalWarning, match="unacknowledged"):
        book = LabelBook.from_journal(journal_for(csv))
    assert book.as_dict() == {"a.jpg": "cat", "c.jpg": "saved", "d.jpg": "saved too"}


def test_a_torn_non_json_tail_and_garbage_lines_lose_nothing_else(tmp_path):
    csv = tmp_path / "photos.csv"
    sidecar(csv, "labels.jsonl").write_bytes(
        old_apply(1, ["a.jpg"], "cat") + b"not json at all\n\xff\xfe\n[1,2]\n"
        + old_apply(2, ["b.jpg"], "dog") + b'{"seq":3,"ts":"2025","session":"x","op":"app')
    with pytest.warns(JournalWarning) as caught:
        book = LabelBook.from_journal(journal_for(csv))
    text = " ".join(str(w.message) for w in caught)
    assert "unreadable line" in text and "incomplete last line" in text
    assert book.as_dict() == {"a.jpg": "cat", "b.jpg": "dog"}
    assert book.apply(["c.jpg"], "bird")["seq"] == 3
    assert journal_for(csv).labels() == {"a.jpg": "cat", "b.jpg": "dog", "c.jpg": "bird"}


def test_a_jsonl_path_opens_the_database_beside_it(tmp_path):
    (tmp_path / "t.labels.jsonl").write_bytes(old_apply(1, ["a.jpg"], "cat"))
    j = Journal(tmp_path / "t.labels.jsonl")
    assert j.path == tmp_path / "t.labels.sqlite"
    assert j.labels() == {"a.jpg": "cat"}


# ------------------------------------------------------------------ failures
def test_a_full_disk_raises_a_clear_error_and_keeps_what_was_saved(tmp_path):
    j = Journal(tmp_path / "j.labels.sqlite")
    j.append({"op": "apply", "args": {"changes": [["", "cat", ["a.jpg"]]]}})
    pages = raw_rows(j.path, "PRAGMA page_count")[0][0]
    j._db.conn.execute(f"PRAGMA max_page_count={pages + 1}")  # SQLite's own "disk full"
    big = [f"img-{i:06d}-{'x' * 60}.jpg" for i in range(5000)]
    with pytest.raises(JournalError, match="cannot write the label journal.*full") as info:
        j.append({"op": "apply", "args": {"changes": [["", "dog", big]]}})
    assert isinstance(info.value, OSError)
    assert j.last_seq == 1 and j.labels() == {"a.jpg": "cat"}


def test_a_folder_in_place_of_the_journal_is_a_clear_error(tmp_path):
    j = Journal(tmp_path / "j.labels.sqlite")
    j.path.mkdir()
    with pytest.raises(JournalError, match="cannot open the label journal"):
        j.append({"op": "apply"})
    with pytest.raises(OSError):
        LabelBook.from_journal(j)


def test_a_file_that_is_not_a_database_is_a_clear_error_and_left_alone(tmp_path):
    j = Journal(tmp_path / "j.labels.sqlite")
    j.path.write_bytes(b"these are not the labels you are looking for\n" * 100)
    before = j.path.read_bytes()
    with pytest.raises(JournalError, match="not a database"):
        LabelBook.from_journal(j)
    with pytest.raises(JournalError, match="not a database"):
        j.append({"op": "apply"})
    assert j.path.read_bytes() == before


def test_labels_and_the_app_work_where_there_is_no_fcntl_as_on_windows(tmp_path):
    """Nothing on the labelling path may need POSIX-only ``fcntl`` (Windows has none).

    Proven able to fail: an ``import fcntl`` added at the top of ``explorer/curation/journal.py`` (or
    of ``explorer/app/state.py``) makes this test fail with ``ModuleNotFoundError``."""
    out = in_new_process(
        """
        import sys
        sys.modules["fcntl"] = None  # importing fcntl now fails, as on Windows
        import explorer.app.state, explorer.app.view, explorer.app.project  # the app's modules
        from explorer.curation.journal import journal_for
        from explorer.curation.labels import LabelBook
        book = LabelBook.from_journal(journal_for(sys.argv[1]))
        book.apply(["a.jpg"], "cat")
        print(book.counts())
        """,
        tmp_path / "p.csv",
    )
    assert out.strip().splitlines()[-1] == "{'cat': 1}"


# ------------------------------------------------------------------ concurrency and crashes
def test_threads_appending_at_once_get_unique_seqs(tmp_path):
    j = Journal(tmp_path / "j.labels.sqlite")
    seqs: list[int] = []

    def work():
        for _ in range(20):
            seqs.append(j.append({"op": "t"}))

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(seqs) == list(range(1, 81))
    assert [r["seq"] for r in Journal(j.path).replay()] == list(range(1, 81))


def _writer(path: str, name: str, n: int, q) -> None:
    j = Journal(path, session=name)
    acked = [j.append({"op": "w", "args": {"writer": name, "i": i,
                                           "changes": [["", name, [f"{name}-{i}"]]]}})
             for i in range(n)]
    q.put((name, acked))


def test_two_processes_appending_concurrently_lose_nothing(tmp_path):
    path = str(tmp_path / "j.labels.sqlite")
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    procs = [ctx.Process(target=_writer, args=(path, name, 60, q)) for name in ("P", "Q")]
    for p in procs:
        p.start()
    acked = dict(q.get(timeout=120) for _ in procs)
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    recs = Journal(path).replay()
    assert [r["seq"] for r in recs] == list(range(1, 121))
    for name in ("P", "Q"):
        mine = [r for r in recs if r["session"] == name]
        assert [r["args"]["i"] for r in mine] == list(range(60))  # each writer in order
        assert sorted(r["seq"] for r in mine) == sorted(acked[name])
    assert len(Journal(path).labels()) == 120


def _opener(csv: str, barrier, q) -> None:
    barrier.wait(timeout=120)  # all start together
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", JournalWarning)
        book = LabelBook.from_journal(journal_for(csv, session=f"p{os.getpid()}"))
        book.apply([f"new-{os.getpid()}.jpg"], "mine")
    q.put(book.counts())


def test_servers_starting_at_once_import_an_old_journal_once(tmp_path):
    csv = tmp_path / "photos.csv"
    sidecar(csv, "labels.jsonl").write_bytes(b"".join(
        old_apply(i + 1, [f"{i}.jpg"], "cat") for i in range(50)))
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    barrier = ctx.Barrier(2)
    procs = [ctx.Process(target=_opener, args=(str(csv), barrier, q)) for _ in range(2)]
    for p in procs:
        p.start()
    results = [q.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    assert all(r["cat"] == 50 for r in results)
    assert [r["seq"] for r in journal_for(csv).replay()] == list(range(1, 53))
    assert journal_for(csv).labels() == {**{f"{i}.jpg": "cat" for i in range(50)},
                                         **{f"new-{p.pid}.jpg": "mine" for p in procs}}


KILL_SCRIPT = """
    import sys
    from explorer.curation.journal import Journal
    from explorer.curation.labels import LabelBook
    book = LabelBook(Journal(sys.argv[1], session="doomed"))
    i = 0
    while True:
        keys = ["img-%d-%d.jpg" % (i, j) for j in range(1 + i % 50)]
        rec = book.apply(keys, "label %d " % i + "x" * 80)  # returned: the page says "saved"
        print(rec["seq"], flush=True)
        i += 1
"""


def test_sigkill_mid_session_keeps_every_acknowledged_record(tmp_path):
    path = tmp_path / "j.labels.sqlite"
    proc = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(KILL_SCRIPT), str(path)],
        stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    acked = []
    deadline = time.monotonic() + 60
    try:
        while len(acked) < 40 and time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            acked.append(int(line))
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
        proc.stdout.close()
    assert len(acked) >= 40, "the writer did not start"
    recs = Journal(path).replay()
    seqs = [r["seq"] for r in recs]
    assert set(acked) <= set(seqs)
    assert seqs == list(range(1, len(seqs) + 1))
    book = LabelBook.from_journal(Journal(path, session="doomed"))
    for s in acked:  # every acknowledged label is there, on every key of its edit
        i = s - 1
        assert book.labels_for([f"img-{i}-{j}.jpg" for j in range(1 + i % 50)]) == [
            f"label {i} " + "x" * 80] * (1 + i % 50)
    # the journal is still usable after the crash, and the undo stack survived it
    assert book.can_undo and book.undo()["seq"] == len(seqs) + 1


def test_invalid_session_id_is_refused(tmp_path):
    with pytest.raises(ValueError, match="session"):
        Journal(tmp_path / "j.labels.sqlite", session="a\nb")
