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

pytestmark = pytest.mark.slow  # queue workers in processes (make test-fast leaves it out)


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

    def make(concurrency=1, **kw):
        q = JobQueue(db, tmp_path / "data", concurrency=concurrency, poll=0.05,
                     worker="fakeworker", **kw)
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
    with pytest.raises(ValueError, match="max_seconds must be a number > 0, got -1"):
        make(max_seconds=-1)


def wait_state(db, job, state, timeout=30):
    t0 = time.monotonic()
    while db.job(job)["state"] != state:
        assert time.monotonic() - t0 < timeout, db.job(job)
        time.sleep(0.02)
    return db.job(job)


def test_users_take_turns(queue_env):
    """Review N9: 6 builds queued by one user do not put another user's build 7th."""
    db, make = queue_env
    q = make()
    alice = [q.submit(f"a{i}", 1, {"sleep": 0.2}) for i in range(6)]
    carol = q.submit("c0", 2, {"sleep": 0.2})
    q.start()
    wait_all(db, alice + [carol])
    order = sorted(alice + [carol], key=lambda j: db.job(j)["started"])
    assert order.index(carol) == 1  # right after alice's first, not after all of hers


def pid_alive(pid: int) -> bool:
    import os

    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        with open(f"/proc/{pid}/stat") as fh:  # a zombie is not alive
            return fh.read().split(") ")[-1][0] != "Z"
    except FileNotFoundError:  # reaped between the signal and the read
        return False


def test_cancel_a_queued_and_a_running_job(queue_env):
    db, make = queue_env
    q = make()
    q.start()
    running = q.submit("a", 1, {"sleep": 30})
    queued = q.submit("b", 1, {"sleep": 0.1})
    pid = wait_state(db, running, "running")["pid"]
    t0 = time.monotonic()
    while pid is None:  # the pid is recorded just after the claim
        assert time.monotonic() - t0 < 10
        pid = db.job(running)["pid"]
        time.sleep(0.02)
    assert q.cancel(queued) and db.job(queued)["state"] == "cancelled"
    assert q.cancel(running)
    assert db.job(running)["state"] == "cancelled"
    t0 = time.monotonic()
    while pid_alive(pid):  # SIGTERM ends the worker well before its 30 s sleep
        assert time.monotonic() - t0 < 10, "the worker still runs after cancel"
        time.sleep(0.05)
    time.sleep(0.3)
    assert db.job(running)["state"] == "cancelled" and db.job(queued)["state"] == "cancelled"
    assert not q.cancel(running), "an ended job cannot be cancelled again"
    after = q.submit("c", 1, {"sleep": 0.1})  # the queue goes on
    assert wait_all(db, [after]) == ["done"]


def test_a_job_over_the_time_limit_is_stopped_and_failed(queue_env):
    db, make = queue_env
    q = make(max_seconds=1.0)
    q.start()
    slow = q.submit("a", 1, {"sleep": 60})
    t0 = time.monotonic()
    j = wait_state(db, slow, "failed", timeout=30)
    assert time.monotonic() - t0 < 20
    assert "longer than the limit of 1 s" in j["error"]
