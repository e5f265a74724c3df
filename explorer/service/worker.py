"""One build job in its own process: ``python -m explorer.service.worker DB JOB RUN_TOKEN``.

Started by :class:`explorer.service.jobs.JobQueue`. It calls :func:`explorer.build` on the
dataset's image folder, writes its progress into the job record while it runs and marks the
job ``done`` or ``failed`` at the end. A crash or an out-of-memory kill of this process only
fails this job: the queue sees the exit status and records it.
"""

from __future__ import annotations

import os
import re
import signal
import sys
import time
import traceback
from pathlib import Path

#: share of a build's time spent in each stage of :func:`explorer.stages.pipeline.build` (rough, for
#: the progress figure; a stage not listed counts as small)
STAGE_WEIGHTS = {"discover": 0.03, "app": 0.01, "embed": 0.55, "features": 0.15,
                 "duplicates": 0.04, "map": 0.1, "place": 0.02, "cluster": 0.08,
                 "concepts": 0.01, "write": 0.02}
SMALL_STAGE = 0.01
#: the job row is written at most this often while a stage runs (stage ends always)
WRITE_EVERY = 0.1
#: an absolute POSIX path of two or more components inside a message
_ABS_PATH = re.compile(r"(?<![\w.~>])/(?:[^\s'\"/]+/)+([^\s'\"/]*)")


def public_error(message: str, folder: str, data_dir: str) -> str:
    """``message`` without absolute server paths (job errors are shown to users): the image
    folder becomes ``<image folder>``, the service's data folder ``<data>``, any other
    absolute path ``.../NAME``."""
    for path, name in ((folder, "<image folder>"), (data_dir, "<data>")):
        for form in {str(path), os.path.realpath(path)}:
            message = message.replace(form.rstrip("/") + "/", name + "/").replace(form, name)
    return _ABS_PATH.sub(lambda m: ".../" + m.group(1), message)


class JobProgress:
    """Turns a build's progress events into the job's figure (0-1, never going back) and
    stage text, and hands them to ``report(fraction, stage)`` (the job row)."""

    def __init__(self, report, log=None):
        self.report = report
        self.log = log
        self.finished = 0.0  # the weights of the stages that ended
        self.shown = 0.0
        self._written = 0.0

    def __call__(self, ev) -> None:
        w = STAGE_WEIGHTS.get(ev.stage, SMALL_STAGE)
        if ev.finished:
            self.finished += w
            at, text = self.finished, ev.stage
            if self.log is not None:
                print(f"{ev.stage}: {ev.seconds:.1f} s", file=self.log, flush=True)
        else:
            frac = ev.fraction or 0.0
            at = self.finished + w * frac
            text = ev.stage + (f": {ev.what}" if ev.what and ev.what != ev.stage else "") + (
                f" {ev.done}/{ev.total}" if ev.total else "")
            now = time.monotonic()
            if now - self._written < WRITE_EVERY and frac < 1:
                return
            self._written = now
        self.shown = max(self.shown, min(0.99, at))
        self.report(self.shown, text)


def _die_with_parent(parent: int) -> None:
    """Ask Linux to kill this process when the service dies (no orphan builds)."""
    try:
        import ctypes

        ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass
    if os.getppid() != parent:
        sys.exit(3)


def run_job(db_path: str, job_id: str, run_token: str) -> int:
    from explorer.service.db import DB, dataset_dir

    db = DB(db_path)
    job = db.job(job_id)
    if job is None or job["state"] != "running" or job["run_token"] != run_token:
        return 2
    p = job["params"]
    ds = db.one("SELECT * FROM datasets WHERE id = ?", (job["dataset_id"],))
    if ds is None:
        db.finish(job_id, run_token, "failed", error="the dataset was deleted")
        return 0
    out_dir = dataset_dir(Path(db_path).parent, ds["id"])

    def report(fraction: float, stage: str) -> None:
        db.set_progress(job_id, run_token, fraction, stage)

    def fail(error: str) -> None:
        db.finish(job_id, run_token, "failed",
                  error=public_error(error, ds["folder"], str(Path(db_path).parent)))

    report(0.0, "starting")
    try:
        import explorer
        from explorer import options

        res = explorer.build(ds["folder"], app=out_dir / "app", progress=False,
                             on_progress=JobProgress(report, sys.stderr),
                             contained=True,  # review N6: no symlinks out of the folder
                             **options.from_request(p))
    except MemoryError:
        fail("out of memory while building")
        return 0
    except (ValueError, OSError) as exc:  # BuildError and friends: the user can fix them
        fail(str(exc) or type(exc).__name__)
        return 0
    except Exception as exc:  # noqa: BLE001 - any bug fails this job, not the service
        traceback.print_exc()  # the full text, paths included, goes to the job's log only
        fail(f"{type(exc).__name__}: {exc}")
        return 0
    c = res.run.get("counts", {})
    db.finish(job_id, run_token, "done", result={
        "rows": c.get("rows"), "skipped": c.get("skipped"), "clusters": c.get("clusters"),
        "noise": c.get("noise"), "notes": res.notes,
        "seconds": res.run.get("timings", {}).get("total")})
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    db_path, job_id, run_token, parent = argv[:4]
    _die_with_parent(int(parent))
    return run_job(db_path, job_id, run_token)


if __name__ == "__main__":
    sys.exit(main())
