"""Jobs: one job's state and progress, and the caller's jobs."""

from __future__ import annotations

from typing import Literal, Optional

from fastapi import APIRouter, Depends

from explorer.service.db import DB
from explorer.service.deps import can_see, current_user, get_db
from explorer.service.errors import not_found

router = APIRouter(prefix="/api/jobs", tags=["jobs"])


def job_view(j: dict) -> dict:
    return {"id": j["id"], "dataset": j["dataset_id"], "state": j["state"],
            "progress": round(float(j["progress"]), 3), "stage": j["stage"],
            "error": j["error"], "result": j["result"], "params": j["params"],
            "created": j["created"], "started": j["started"], "finished": j["finished"]}


@router.get("/{job_id}")
def get_job(job_id: str, user: dict = Depends(current_user), db: DB = Depends(get_db)):
    """A job's state (queued, running, done, failed), progress (0-1) and error."""
    j = db.job(job_id) if len(job_id) < 64 else None
    if j is None:
        raise not_found("job")
    ds = db.one("SELECT * FROM datasets WHERE id = ?", (j["dataset_id"],))
    if not (user["admin"] or j["owner_id"] == user["id"] or (ds and can_see(user, ds))):
        raise not_found("job")
    return job_view(j)


@router.get("")
def list_jobs(user: dict = Depends(current_user),
              state: Optional[Literal["queued", "running", "done", "failed"]] = None,
              db: DB = Depends(get_db)):
    """The caller's jobs (every job for admins), newest first."""
    sql = "SELECT id FROM jobs" + ("" if user["admin"] else " WHERE owner_id = ?")
    args: tuple = () if user["admin"] else (user["id"],)
    if state:
        sql += (" AND" if "WHERE" in sql else " WHERE") + " state = ?"
        args += (state,)
    rows = db.all(sql + " ORDER BY created DESC LIMIT 1000", args)
    return {"jobs": [job_view(db.job(r["id"])) for r in rows]}
