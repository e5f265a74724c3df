"""Label a few, the tool labels the rest, through the service: next, propagate, accept.

The same as ``explorer labels next/propagate/accept`` (:mod:`explorer.cli_labels`) on the
dataset's build, with the labels in the app's journal (session ``api-USER``).
"""

from __future__ import annotations

import asyncio
import math
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Depends, Query

from explorer.curation.active import SURE_MAX, SURE_MIN, SURE_PRECISION
from explorer.service.config import ServiceConfig
from explorer.service.db import DB
from explorer.service.deps import current_user, dataset_for, get_config, get_db
from explorer.service.errors import ServiceError
from explorer.service.records import built

router = APIRouter(prefix="/api/datasets", tags=["labels"])


def _build(p: dict[str, Path], user: dict):
    from explorer.cli_labels import Labelling

    return Labelling(p["csv"], session=f"api-{user['name']}")


def _run(fn):
    try:
        return fn()
    except ValueError as exc:  # no features, bad vectors
        raise ServiceError(422, str(exc)) from None
    except OSError as exc:  # the journal or the features cannot be read or written
        raise ServiceError(503, f"the labels cannot be used now: {exc}") from None


def _plain(v):
    return None if isinstance(v, float) and not math.isfinite(v) else v


@router.get("/{dataset_id}/labels/next")
async def labels_next(dataset_id: str, n: int = Query(20, ge=1, le=500),
                      user: dict = Depends(current_user),
                      config: ServiceConfig = Depends(get_config), db: DB = Depends(get_db)):
    """The images whose labels would teach the model most: ``[{path, row, reason}]``."""
    p = built(config, dataset_for(db, user, dataset_id))
    picks = await asyncio.to_thread(_run, lambda: _build(p, user).next(n))
    return {"next": picks}


def _sure() -> Any:
    return Query(SURE_PRECISION, ge=SURE_MIN, le=SURE_MAX,
                 description="what 'sure' means: the share of the sure predictions expected right")


@router.get("/{dataset_id}/labels/propagate")
async def labels_propagate(dataset_id: str, rows: bool = Query(True), sure: float = _sure(),
                           user: dict = Depends(current_user),
                           config: ServiceConfig = Depends(get_config), db: DB = Depends(get_db)):
    """A predicted label and a calibrated confidence for every image, with the estimated
    accuracy and the "sure" threshold (``rows=false``: the figures only)."""
    p = built(config, dataset_for(db, user, dataset_id))
    df, info = await asyncio.to_thread(_run, lambda: _build(p, user).propagate(sure))
    out = dict(info)
    if rows:
        out["rows"] = [{k: _plain(v) for k, v in r.items()}
                       for r in df.astype(object).to_dict("records")]
    return out


@router.post("/{dataset_id}/labels/accept")
async def labels_accept(dataset_id: str, sure: float = _sure(), user: dict = Depends(current_user),
                        config: ServiceConfig = Depends(get_config), db: DB = Depends(get_db)):
    """Accept every sure prediction as a label: one journaled step (op ``accept``), undoable
    in the app, kept apart from hand labels."""
    p = built(config, dataset_for(db, user, dataset_id))

    def accept():
        b = _build(p, user)
        rec, info = b.accept_sure(sure)
        n = 0 if rec is None else rec["args"]["n"]
        return {"accepted": n, "threshold": info["threshold"], "seq": b.book.seq,
                "counts": b.book.counts()}

    return await asyncio.to_thread(_run, accept)
