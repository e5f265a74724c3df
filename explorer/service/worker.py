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
import traceback
from pathlib import Path

#: share of a build's time spent in each stage of :func:`explorer.pipeline.build` (rough, for
#: the progress figure; stages not listed count as small)
STAGE_WEIGHTS = {"discover": 0.03, "app": 0.01, "embed": 0.6, "features": 0.3,
                 "thumbnails": 0.3, "duplicates": 0.04, "map": 0.12, "cluster": 0.12,
                 "write": 0.02}
_STAGE_LINE = re.compile(r"^\[dim\](\w+): [\d.]+ s\[/dim\]$")
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


class ProgressConsole:
    """Stands in for the rich console ``build()`` prints to: stage lines become progress."""

    def __init__(self, report, log):
        self.report = report
        self.log = log
        self.done = 0.0

    def print(self, *objects, **kw):
        text = " ".join(str(o) for o in objects)
        m = _STAGE_LINE.match(text)
        if m:
            self.done = min(0.99, self.done + STAGE_WEIGHTS.get(m.group(1), 0.02))
            self._emit(self.done, m.group(1))
        if objects and isinstance(objects[0], str):
            print(text, file=self.log, flush=True)

    def status(self, *a, **kw):
        import contextlib

        return contextlib.nullcontext()

    def within(self, description: str, fraction: float, done: int, total: int) -> None:
        """A progress bar inside the running stage moved: move the figure within it."""
        import time

        now = time.monotonic()
        if now - getattr(self, "_last", 0.0) < 0.5 and fraction < 1:
            return
        self._last = now
        share = 0.6 if "mbed" in description else 0.1
        at = min(0.99, self.done + share * max(0.0, min(1.0, fraction)))
        self._emit(at, f"{description} {done}/{total}")

    def _emit(self, at: float, stage: str) -> None:
        """Report ``at`` (never less than what was reported before) and the stage."""
        self._shown = max(at, getattr(self, "_shown", 0.0))
        self.report(self._shown, stage)


def hook_progress_bars(console: ProgressConsole) -> None:
    """Forward every ``explorer.progress.Bar`` of this process to ``console.within``.

    The project's one progress helper draws rich bars; in a worker process their counts also
    become the job's progress. (Without ``Bar``, only stage ends move the figure.)
    """
    from explorer import progress

    bar = getattr(progress, "Bar", None)
    if bar is None or getattr(bar, "_service_hooked", False):
        return
    init, update = bar.__init__, bar.update

    def __init__(self, total, description, *a, **kw):
        init(self, total, description, *a, **kw)
        self._service = (total, description)

    def _update(self, done):
        update(self, done)
        total, description = getattr(self, "_service", (None, ""))
        if total:
            console.within(str(description), done / total, done, total)

    bar.__init__, bar.update, bar._service_hooked = __init__, _update, True


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

        console = ProgressConsole(report, sys.stderr)
        hook_progress_bars(console)
        params = dict(p.get("cluster_params") or {})
        if p.get("k") is not None:
            params["k"] = p["k"]
        res = explorer.build(
            ds["folder"], app=out_dir / "app", method=p.get("method", "timm"),
            model=p.get("model"), cluster=p.get("cluster", "hdbscan"),
            cluster_params=params or None, threshold=p.get("threshold"),
            duplicates=p.get("duplicates", "phash"), seed=p.get("seed", 42),
            batch_size=p.get("batch_size"), thumb_size=p.get("thumb_size", 256),
            progress=True, console=console, contained=True)  # review N6: no symlinks out
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
