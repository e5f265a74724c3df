"""Search a built dataset: by words, or by an example image (multipart, streamed to disk)."""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import shutil
from pathlib import Path

from fastapi import APIRouter, Depends, Request

from explorer.service.config import ServiceConfig
from explorer.service.db import DB
from explorer.service.deps import current_user, dataset_for, get_config, get_db
from explorer.service.errors import ServiceError
from explorer.service.guard import search_image_cap
from explorer.service.models import SearchIn
from explorer.service.records import built
from explorer.service.uploads import FORMATS, Limits, RequestTooLarge, image_format, \
    receive_multipart

router = APIRouter(prefix="/api/datasets", tags=["results"])


def _plain(o):
    """JSON for numpy scalars and arrays, paths."""
    if hasattr(o, "tolist"):
        return o.tolist()
    if hasattr(o, "item"):
        return o.item()
    return str(o)


def run_search(p: dict[str, Path], **query) -> dict:
    from explorer import dataset
    from explorer.curation.search import search

    try:
        hits = search(dataset.open(p["csv"]), progress=False, **query)
    except ValueError as exc:  # SearchError: no features, no concepts, bad query
        raise ServiceError(422, str(exc)) from None
    return {"results": json.loads(json.dumps(hits, default=_plain))}


@router.post("/{dataset_id}/search")
async def search_text(dataset_id: str, body: SearchIn, user: dict = Depends(current_user),
                      config: ServiceConfig = Depends(get_config), db: DB = Depends(get_db)):
    """The dataset's images ranked for a query in words (explorer search)."""
    p = built(config, dataset_for(db, user, dataset_id))
    return await asyncio.to_thread(run_search, p, text=body.text, top=body.top)


@router.post("/{dataset_id}/search/image", openapi_extra={
    "requestBody": {"required": True, "content": {"multipart/form-data": {"schema": {
        "type": "object", "required": ["image"], "properties": {
            "image": {"type": "string", "format": "binary"},
            "top": {"type": "integer", "minimum": 1, "maximum": 200}}}}}}})
async def search_image(dataset_id: str, request: Request, user: dict = Depends(current_user),
                       config: ServiceConfig = Depends(get_config), db: DB = Depends(get_db)):
    """The dataset's images nearest to an example image (multipart field ``image``)."""
    p = built(config, dataset_for(db, user, dataset_id))
    staging = p["dir"] / f"search-{secrets.token_hex(4)}"
    limits = Limits(max_request_bytes=search_image_cap(config.limits), max_files=1)
    try:
        fields, files = await receive_multipart(request, staging, limits)
        if not files:
            raise ServiceError(422, "send the example image as the multipart field 'image'")
        top = fields.get("top") or "10"
        if not top.isdigit() or not 1 <= int(top) <= 200:
            raise ServiceError(422, f"top must be 1-200, got {top!r}")
        tmp = files[0][0]
        try:
            fmt = await asyncio.to_thread(image_format, tmp, config.limits.max_pixels)
        except ValueError as exc:
            raise ServiceError(422, f"the example is not usable: {exc}") from None
        example = tmp.with_name("example" + FORMATS[fmt])
        os.replace(tmp, example)
        return await asyncio.to_thread(run_search, p, image=example, top=int(top))
    except RequestTooLarge as exc:
        raise ServiceError(413, str(exc)) from None
    except ValueError as exc:
        raise ServiceError(400, str(exc)) from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)
