"""Exports: a zip of the dataset's images in one folder per cluster (or label), streamed."""

from __future__ import annotations

import asyncio
from typing import Optional

from fastapi import APIRouter, Depends
from fastapi.responses import StreamingResponse

from explorer.service.config import ServiceConfig
from explorer.service.db import DB
from explorer.service.deps import current_user, dataset_for, get_config, get_db
from explorer.service.errors import ServiceError
from explorer.service.models import ExportIn
from explorer.service.records import built, image_folder_of
from explorer.service.streams import stream_from

router = APIRouter(prefix="/api/datasets", tags=["results"])


@router.post("/{dataset_id}/exports", response_class=StreamingResponse,
             responses={200: {"content": {"application/zip": {}}}})
async def export_zip(dataset_id: str, body: Optional[ExportIn] = None,
                     user: dict = Depends(current_user),
                     config: ServiceConfig = Depends(get_config), db: DB = Depends(get_db)):
    """A zip of ``cluster_N/`` (or one folder per label), ``outliers/`` and, with
    ``sample``, ``sample/`` holding that share of every folder; ``manifest.csv`` lists
    every image and ``MISSING.txt`` the rows whose image could not be exported. Streamed
    while it is written (explorer.curation.exports)."""
    from explorer.curation import exports

    ds = dataset_for(db, user, dataset_id)
    p = built(config, ds)
    body = body or ExportIn()
    try:
        frac = exports.parse_sample(body.sample)
    except ValueError as exc:
        raise ServiceError(422, str(exc)) from None
    root = image_folder_of(config, ds)

    def plan():
        from explorer import dataset

        build = dataset.open(p["csv"])
        df = build.labelled_table(f"api-{user['name']}") if body.by == "label" else build.table
        return df, exports.plan_export(df, root, layout=body.by, sample=frac)

    try:
        df, plan = await asyncio.to_thread(plan)
    except ValueError as exc:
        raise ServiceError(422, str(exc)) from None
    except OSError as exc:
        raise ServiceError(503, f"the export cannot be planned now: {exc}") from None
    paths = df["path"].fillna("").astype(str).tolist()
    rows = [{"path": paths[r], "folder": arc.split("/", 1)[0], "file": arc.rsplit("/", 1)[1],
             "sampled": r in plan.sampled}
            for (arc, _), r in zip(plan.entries, plan.rows)
            if not arc.startswith(exports.SAMPLE + "/")]
    import pandas as pd

    manifest = pd.DataFrame(rows, columns=["path", "folder", "file", "sampled"]).to_csv(
        index=False)
    extra = {exports.MANIFEST: manifest, "MISSING.txt": plan.refused_note()}
    name = f"{ds['id']}-{body.by}.zip"
    return StreamingResponse(
        stream_from(lambda f: exports.write_zip(plan.entries, f, extra=extra)),
        media_type="application/zip",
        headers={"Content-Disposition": f'attachment; filename="{name}"'})
