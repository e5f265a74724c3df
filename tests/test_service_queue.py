"""The job queue on its own: concurrency, one job per dataset at a time, crashes, restarts.

Workers here are a tiny module written by the test (sleep, then record a result), so the
queue's rules are checked in seconds; the real build worker is covered end to end in
tests/test_service.py.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest

from explorer.service.db import DB
from explorer.service.jobs import INTERRUPTED, JobQueue

WORKER = '''
import sys, time, json
from explorer.service.db import DB
db_path, job, token, parent = sys.argv[1:5]
db = DB(db_path)
p = db.job(job)["params"]
db.set_progress(job, token, 0.5, "half")
time.sleep(p.get("sleep", 0.5))
if p.get("crash"):
    sys.exit(7)
db.finish(job, token, "done", result={"ok": True})
'''


@pytest.fixture
def queue_env(tmp_path, monkeypatch):
    (tmp_path / "fakeworker.py").write_text(WORKER)
    monkeypatch.setenv("PYTHONPATH", f"{tmp_path}:{Path(__file__).resolve().parents[1]}")
    db = DB(tmp_path / "data" / "service.db")
    db.add_user("u")
    queues = []

    def make(concurrency=1):
        q = JobQueue(db, tmp_path / "data", concurrency=concurrency, poll=0.05,
                     worker="fakeworker")
        queues.append(q)
        return q

    yield db, make
    for q in queues:
        q.stop()


def wait_all(db, jobs, states=("done", "failed"), timeout=60):
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        got = [db.job(j)["state"] for j in jobs]
        if all(s in states for s in got):
            return got
        time.sleep(0.05)
    raise AssertionError(f"jobs still {got}")


def max_running(db, jobs, until, timeout=60):
    """Poll the records; the most jobs seen running at once (and per dataset)."""
    most, per_ds = 0, 0
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        rows = [db.job(j) for j in jobs]
        running = [r for r in rows if r["state"] == "running"]
        most = max(most, len(running))
        ds = [r["dataset_id"] for r in running]
        per_ds = max([per_ds] + [ds.count(d) for d in ds])
        if all(r["state"] in until for r in rows):
            return most, per_ds
        time.sleep(0.02)
    raise AssertionError("jobs did not finish")


def test_default_runs_one_job_at_a_time(queue_env):
    db, make = queue_env
    q = make()
    q.start()
    jobs = [q.submit(f"d{i}", 1, {"sleep": 0.6}) for i in range(3)]
    assert max_running(db, jobs, ("done",)) == (1, 1)
    assert all(db.job(j)["progress"] == 1.0 for j in jobs)


def test_concurrency_two_but_never_two_on_one_dataset(queue_env):
    db, make = queue_env
    q = make(concurrency=2)
    q.start()
    jobs = [q.submit(d, 1, {"sleep": 1.0}) for d in ("a", "a", "b", "c")]
    most, per_ds = max_running(db, jobs, ("done",))
    assert most == 2 and per_ds == 1


def test_a_crashed_worker_fails_its_job_only(queue_env):
    db, make = queue_env
    q = make()
    q.start()
    bad = q.submit("a", 1, {"sleep": 0.1, "crash": True})
    good = q.submit("b", 1, {"sleep": 0.1})
    assert wait_all(db, [bad, good]) == ["failed", "done"]
    assert "status 7" in db.job(bad)["error"]


def test_restart_fails_running_jobs_and_runs_queued_ones(queue_env):
    db, make = queue_env
    q = make()
    q.start()
    jobs = [q.submit(f"d{i}", 1, {"sleep": 2.0}) for i in range(2)]
    t0 = time.monotonic()
    while db.job(jobs[0])["state"] != "running":
        assert time.monotonic() - t0 < 30
        time.sleep(0.02)
    # a service that died without stopping its queue: the record still says running
    q._stop.set()
    q._thread.join(10)
    db.run("UPDATE jobs SET state = 'running' WHERE id = ?", (jobs[0],))
    q2 = make()
    q2.start()
    assert db.job(jobs[0])["state"] == "failed" and db.job(jobs[0])["error"] == INTERRUPTED
    assert wait_all(db, jobs[1:]) == ["done"]


def test_bad_concurrency_is_refused(queue_env):
    db, make = queue_env
    with pytest.raises(ValueError, match="concurrency"):
        make(concurrency=0)
