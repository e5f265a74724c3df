"""The persistent job queue: records in SQLite, each build in its own worker process.

* ``submit`` stores a job as ``queued``; nothing runs in the web process.
* A scheduler thread starts up to ``concurrency`` workers (``python -m
  explorer.service.worker``), never two at once for one dataset, taking turns between users:
  the next job is the oldest queued job of the user whose last job started longest ago
  (so 20 builds queued by one user do not put another user's build 21st).
* ``cancel`` ends a queued job, or a running one (SIGTERM to the worker's process group,
  SIGKILL 10 s later); its state is ``cancelled``.
* A job that runs longer than ``max_seconds`` is stopped the same way and ``failed`` with
  the reason.
* A worker that crashes or is killed (out of memory) fails only its job; the exit status
  becomes the job's error.
* On start, jobs left ``running`` by a service that stopped are marked ``failed`` with the
  reason; ``queued`` jobs simply run. On stop, running workers are ended and their jobs
  marked ``failed`` the same way.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from explorer._checks import check_int
from explorer.service.db import DB

INTERRUPTED = ("the service stopped while this job was running; it was not finished "
               "(submit the build again)")
REPO_ROOT = Path(__file__).resolve().parents[2]
#: seconds between SIGTERM and SIGKILL for a cancelled or overdue worker
KILL_GRACE = 10.0


def _signal_name(code: int) -> str:
    try:
        return signal.Signals(-code).name
    except ValueError:
        return f"signal {-code}"


class JobQueue:
    def __init__(self, db: DB, data_dir: Path, concurrency: int = 1, poll: float = 0.2,
                 worker: str = "explorer.service.worker", max_seconds: float = 6 * 3600.0):
        concurrency = check_int("concurrency", concurrency, 1)
        if not (isinstance(max_seconds, (int, float)) and max_seconds > 0):
            raise ValueError(f"max_seconds must be a number > 0, got {max_seconds!r}")
        self.max_seconds = float(max_seconds)
        self.db = db
        self.data_dir = Path(data_dir)
        self.logs = self.data_dir / "logs"
        self.concurrency = concurrency
        self.poll = poll
        self.worker = worker  # the module run as ``python -m WORKER DB JOB TOKEN PARENT``
        self._procs: dict[str, tuple[subprocess.Popen, str]] = {}
        self._started: dict[str, float] = {}     # job -> time.monotonic() at spawn
        self._stopping: dict[str, float] = {}    # job -> time.monotonic() of its SIGTERM
        self._lock = threading.Lock()            # _procs between the scheduler and cancel()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------ public
    def recover(self) -> int:
        """Fail the jobs a previous service left running; return how many."""
        return self.db.run("UPDATE jobs SET state = 'failed', error = ?, finished = ?, pid = NULL "
                           "WHERE state = 'running'", (INTERRUPTED, time.time()))

    def start(self) -> None:
        self.logs.mkdir(parents=True, exist_ok=True)
        self.recover()
        self._thread = threading.Thread(target=self._loop, name="explorer-jobs", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout + 5)

    def submit(self, dataset_id: str, owner_id: int, params: dict[str, Any]) -> str:
        job_id = secrets.token_hex(8)
        self.db.run("INSERT INTO jobs(id, dataset_id, owner_id, kind, params, state, created) "
                    "VALUES (?, ?, ?, 'build', ?, 'queued', ?)",
                    (job_id, dataset_id, owner_id, json.dumps(params), time.time()))
        self._wake.set()
        return job_id

    def running_for(self, dataset_id: str) -> bool:
        return self.db.one("SELECT 1 AS x FROM jobs WHERE dataset_id = ? AND state = 'running'",
                           (dataset_id,)) is not None

    def cancel_queued(self, dataset_id: str, reason: str) -> None:
        self.db.run("UPDATE jobs SET state = 'failed', error = ?, finished = ? "
                    "WHERE dataset_id = ? AND state = 'queued'", (reason, time.time(), dataset_id))

    def queued_of(self, owner_id: int) -> int:
        """How many jobs of ``owner_id`` wait or run now (for the per-user limit)."""
        return self.db.one("SELECT COUNT(*) AS n FROM jobs WHERE owner_id = ? AND state IN "
                           "('queued', 'running')", (owner_id,))["n"]

    def cancel(self, job_id: str, reason: str = "cancelled") -> bool:
        """Cancel a queued or running job: its state becomes ``cancelled`` at once; a running
        worker gets SIGTERM (SIGKILL after KILL_GRACE seconds). False if it had ended."""
        now = time.time()
        if self.db.run("UPDATE jobs SET state = 'cancelled', error = ?, finished = ?, pid = NULL "
                       "WHERE id = ? AND state IN ('queued', 'running')",
                       (reason, now, job_id)) == 0:
            return False
        with self._lock:
            entry = self._procs.get(job_id)
            if entry is not None:
                self._signal(job_id, entry[0])
        self._wake.set()
        return True

    def _signal(self, job_id: str, proc: subprocess.Popen) -> None:
        """SIGTERM the worker's process group once (with _lock held)."""
        if job_id in self._stopping or proc.poll() is not None:
            return
        self._stopping[job_id] = time.monotonic()
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGTERM)

    # ------------------------------------------------------------------ scheduler
    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self._reap()
                self._start_next()
            except Exception as exc:  # noqa: BLE001 - keep scheduling; say why in the log
                print(f"explorer serve: job scheduler: {type(exc).__name__}: {exc}",
                      file=sys.stderr, flush=True)
            self._wake.wait(self.poll)
            self._wake.clear()
        self._shutdown()

    def _reap(self) -> None:
        with self._lock:
            self._reap_locked()

    def _reap_locked(self) -> None:
        now = time.monotonic()
        for job_id, (proc, token) in list(self._procs.items()):
            code = proc.poll()
            if code is None:
                if now - self._started.get(job_id, now) > self.max_seconds and \
                        job_id not in self._stopping:
                    self.db.finish(job_id, token, "failed", error=(
                        f"the build ran longer than the limit of {self.max_seconds:,.0f} s "
                        "and was stopped"))
                    self._signal(job_id, proc)
                elif now - self._stopping.get(job_id, now) > KILL_GRACE:
                    with contextlib.suppress(ProcessLookupError, PermissionError):
                        os.killpg(proc.pid, signal.SIGKILL)
                continue
            del self._procs[job_id]
            self._started.pop(job_id, None)
            self._stopping.pop(job_id, None)
            if code < 0:
                why = (f"the worker was killed by {_signal_name(code)}"
                       + (" (out of memory?)" if code == -signal.SIGKILL else ""))
            elif code != 0:
                why = (f"the worker exited with status {code}; see logs/{job_id}.log in the "
                       "service's data folder")
            else:
                why = "the worker ended without recording a result"
            self.db.finish(job_id, token, "failed", error=why)  # no-op if it recorded one

    def next_job(self) -> dict | None:
        """The queued job to start next (see the module docstring), or None."""
        busy = {r["dataset_id"] for r in self.db.all(
            "SELECT dataset_id FROM jobs WHERE state = 'running'")}
        queued = [j for j in self.db.all("SELECT id, dataset_id, owner_id FROM jobs WHERE "
                                         "state = 'queued' ORDER BY created, rowid")
                  if j["dataset_id"] not in busy]
        if not queued:
            return None
        served = {r["owner_id"]: r["t"] for r in self.db.all(
            "SELECT owner_id, MAX(started) AS t FROM jobs WHERE started IS NOT NULL "
            "GROUP BY owner_id")}
        # min() keeps the first of equals: among users served equally long ago, the oldest job
        return min(queued, key=lambda j: served.get(j["owner_id"]) or 0.0)

    def _start_next(self) -> None:
        while len(self._procs) < self.concurrency and not self._stop.is_set():
            nxt = self.next_job()
            if nxt is None:
                return
            token = secrets.token_hex(8)
            claimed = self.db.run("UPDATE jobs SET state = 'running', run_token = ?, started = ?, "
                                  "progress = 0 WHERE id = ? AND state = 'queued'",
                                  (token, time.time(), nxt["id"]))
            if not claimed:
                continue
            self._spawn(nxt["id"], token)

    def _spawn(self, job_id: str, token: str) -> None:
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(
            [str(REPO_ROOT)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
        env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 2) // self.concurrency)))
        with open(self.logs / f"{job_id}.log", "ab") as log:
            proc = subprocess.Popen(
                [sys.executable, "-m", self.worker, str(self.db.path), job_id,
                 token, str(os.getpid())],
                stdin=subprocess.DEVNULL, stdout=log, stderr=log, env=env, close_fds=True,
                start_new_session=True)  # its own process group: cancel ends its children too
        self.db.run("UPDATE jobs SET pid = ? WHERE id = ? AND state = 'running'",
                    (proc.pid, job_id))
        with self._lock:
            self._procs[job_id] = (proc, token)
            self._started[job_id] = time.monotonic()

    def _shutdown(self) -> None:
        for proc, _ in self._procs.values():
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + 5
        for proc, _ in self._procs.values():
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        for job_id, (_, token) in self._procs.items():
            self.db.finish(job_id, token, "failed", error=INTERRUPTED)
        self._procs.clear()
