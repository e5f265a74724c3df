"""Builds: queue one for a dataset (the job is polled under ``/api/jobs``)."""

from __future__ import annotations

from typing import Optional

from fastapi import APIRouter, Depends

from explorer.service.build_request import BuildIn
from explorer.service.config import ServiceConfig
from explorer.service.db import DB
from explorer.service.deps import current_user, dataset_for, get_config, get_db, get_queue
from explorer.service.jobs import JobQueue
from explorer.service.records import image_folder_of

router = APIRouter(prefix="/api/datasets", tags=["jobs"])


@router.post("/{dataset_id}/builds", status_code=202)
def start_build(dataset_id: str, body: Optional[BuildIn] = None,
                user: dict = Depends(current_user), config: ServiceConfig = Depends(get_config),
                db: DB = Depends(get_db), queue: JobQueue = Depends(get_queue)):
    """Queue a build (embed, map, cluster) of the dataset; poll ``/api/jobs/{job}``."""
    ds = dataset_for(db, user, dataset_id, change=True)
    image_folder_of(config, ds)
    params = (body or BuildIn()).model_dump()
    if params["duplicates"] == "none":
        params["duplicates"] = None
    job_id = queue.submit(ds["id"], user["id"], params)
    return {"job": job_id, "state": "queued", "url": f"/api/jobs/{job_id}"}
