"""The journal beside the CSV: fsync'd appends, replay, torn lines, concurrent writers, kill -9."""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
import warnings

import pytest

from explorer.journal import Journal, JournalWarning, journal_for
from explorer.table import sidecar


def test_journal_for_sits_beside_the_csv(tmp_path):
    j = journal_for(tmp_path / "photos.csv")
    assert j.path == sidecar(tmp_path / "photos.csv", "labels.jsonl")
    assert j.path.name == "photos.labels.jsonl"


def test_missing_journal_reads_as_empty(tmp_path):
    j = Journal(tmp_path / "none.jsonl")
    assert j.replay() == []
    assert j.read_since(0) == []
    assert j.last_seq == 0
    assert not j.path.exists()


def test_append_writes_one_json_line_per_record(tmp_path):
    j = Journal(tmp_path / "sub" / "j.jsonl", session="tab-1")
    s1 = j.append({"op": "apply", "args": {"keys": ["a.jpg"], "label": "cat"}})
    s2 = j.append({"op": "clear", "args": {"keys": ["a.jpg"]}})
    assert (s1, s2) == (1, 2)
    lines = j.path.read_text(encoding="utf-8").splitlines()
    assert len(lines) == 2
    rec = json.loads(lines[0])
    assert rec["seq"] == 1 and rec["session"] == "tab-1" and rec["op"] == "apply"
    assert rec["args"] == {"keys": ["a.jpg"], "label": "cat"}
    assert "ts" in rec and rec["ts"].startswith("20")


def test_unicode_and_hostile_strings_round_trip(tmp_path):
    j = Journal(tmp_path / "j.jsonl")
    key = 'weird "name"\\ \u00e9\u6f22\u5b57 \n newline.jpg'
    j.append({"op": "apply", "args": {"keys": [key], "label": "caf\u00e9"}})
    again = Journal(j.path).replay()
    assert again[0]["args"]["keys"] == [key]
    assert len(j.path.read_bytes().splitlines()) == 1  # the newline in the key is escaped


@pytest.mark.parametrize(
    "record",
    [{"args": {}}, {"op": ""}, {"op": "x", "seq": 5}, {"op": "x", "args": {1, 2}}, ["op"]],
)
def test_bad_records_are_refused_and_nothing_written(tmp_path, record):
    j = Journal(tmp_path / "j.jsonl")
    with pytest.raises(ValueError):
        j.append(record)
    assert j.replay() == []


def test_read_since_returns_only_newer_records(tmp_path):
    j = Journal(tmp_path / "j.jsonl")
    for i in range(5):
        j.append({"op": "apply", "args": {"i": i}})
    assert [r["seq"] for r in j.read_since(3)] == [4, 5]
    assert j.read_since(5) == []
    with pytest.raises(ValueError):
        j.read_since(-1)


def test_second_tab_sees_first_tabs_changes_without_reopening(tmp_path):
    a = Journal(tmp_path / "j.jsonl", session="A")
    b = Journal(tmp_path / "j.jsonl", session="B")
    assert b.read_since(0) == []
    a.append({"op": "apply", "args": {"label": "x"}})
    seen = b.read_since(0)
    assert [(r["session"], r["seq"]) for r in seen] == [("A", 1)]
    b.append({"op": "apply", "args": {"label": "y"}})
    assert [(r["session"], r["seq"]) for r in a.read_since(1)] == [("B", 2)]


def test_torn_last_line_is_skipped_with_warning_and_next_append_is_clean(tmp_path):
    j = Journal(tmp_path / "j.jsonl")
    j.append({"op": "apply", "args": {"n": 1}})
    j.append({"op": "apply", "args": {"n": 2}})
    with open(j.path, "ab") as fh:  # a crash in the middle of the third write
        fh.write(b'{"seq":3,"ts":"2025","session":"x","op":"app')
    fresh = Journal(j.path)
    with pytest.warns(JournalWarning, match="incomplete last line"):
        recs = fresh.replay()
    assert [r["args"]["n"] for r in recs] == [1, 2]
    # appending after the torn line: the new record gets its own line and the next seq
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", JournalWarning)
        seq = fresh.append({"op": "apply", "args": {"n": 3}})
        assert seq == 3
        recs = Journal(j.path).replay()
    assert [r["args"]["n"] for r in recs] == [1, 2, 3]


def test_garbage_line_in_the_middle_loses_nothing_else(tmp_path):
    j = Journal(tmp_path / "j.jsonl")
    j.append({"op": "a"})
    with open(j.path, "ab") as fh:
        fh.write(b"not json at all\n\xff\xfe\n[1,2]\n")
    with pytest.warns(JournalWarning, match="unreadable line"):
        j.append({"op": "b"})
    with pytest.warns(JournalWarning):
        recs = Journal(j.path).replay()
    assert [r["op"] for r in recs] == ["a", "b"]


def test_threads_appending_at_once_get_unique_seqs(tmp_path):
    j = Journal(tmp_path / "j.jsonl")
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
    acked = [j.append({"op": "w", "args": {"writer": name, "i": i}}) for i in range(n)]
    q.put((name, acked))


def test_two_processes_appending_concurrently_lose_nothing(tmp_path):
    path = str(tmp_path / "j.jsonl")
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    procs = [ctx.Process(target=_writer, args=(path, name, 60, q)) for name in ("P", "Q")]
    for p in procs:
        p.start()
    acked = dict(q.get(timeout=120) for _ in procs)
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    with warnings.catch_warnings():
        warnings.simplefilter("error", JournalWarning)  # no torn or interleaved line
        recs = Journal(path).replay()
    assert [r["seq"] for r in recs] == list(range(1, 121))
    for name in ("P", "Q"):
        mine = [r for r in recs if r["session"] == name]
        assert [r["args"]["i"] for r in mine] == list(range(60))  # each writer in order
        assert sorted(r["seq"] for r in mine) == sorted(acked[name])


KILL_SCRIPT = textwrap.dedent(
    """
    import sys
    from explorer.journal import Journal
    j = Journal(sys.argv[1], session="doomed")
    i = 0
    while True:
        seq = j.append({"op": "apply", "args": {"keys": ["img-%d.jpg" % i], "label": "x" * 200}})
        print(seq, flush=True)
        i += 1
    """
)


def test_sigkill_mid_session_keeps_every_acknowledged_record(tmp_path):
    path = tmp_path / "j.jsonl"
    proc = subprocess.Popen(
        [sys.executable, "-c", KILL_SCRIPT, str(path)],
        stdout=subprocess.PIPE,
        text=True,
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
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", JournalWarning)  # the killed write may be torn
        recs = Journal(path).replay()
    seqs = [r["seq"] for r in recs]
    assert set(acked) <= set(seqs)
    assert seqs == list(range(1, len(seqs) + 1))
    # the journal is still usable after the crash
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", JournalWarning)
        assert Journal(path).append({"op": "after"}) == len(seqs) + 1


def test_invalid_session_id_is_refused(tmp_path):
    with pytest.raises(ValueError, match="session"):
        Journal(tmp_path / "j.jsonl", session="a\nb")
