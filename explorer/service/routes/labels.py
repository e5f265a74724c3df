"""Labels, through the same journal the app writes: read them, and one edit at a time."""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, Depends

from explorer.service.config import ServiceConfig
from explorer.service.db import DB
from explorer.service.deps import current_user, dataset_for, get_config, get_db
from explorer.service.errors import ServiceError
from explorer.service.models import LabelsIn
from explorer.service.records import built

router = APIRouter(prefix="/api/datasets", tags=["labels"])


def label_book(p: dict[str, Path], session: str):
    """The built table and its label book (the app's journal) as ``session`` writes it."""
    from explorer import dataset

    build = dataset.open(p["csv"])
    return build.table, build.label_book(session)


@router.get("/{dataset_id}/labels")
def get_labels(dataset_id: str, user: dict = Depends(current_user),
               config: ServiceConfig = Depends(get_config), db: DB = Depends(get_db)):
    """Every labelled image (path -> label) and the count per label, as the app sees them."""
    p = built(config, dataset_for(db, user, dataset_id))
    try:
        _, book = label_book(p, f"api-{user['name']}")
    except OSError as exc:  # the journal cannot be read (explorer.curation.journal.JournalError)
        raise ServiceError(503, f"the labels cannot be read now: {exc}") from None
    return {"labels": book.as_dict(), "counts": book.counts(), "seq": book.seq}


@router.post("/{dataset_id}/labels")
def edit_labels(dataset_id: str, body: LabelsIn, user: dict = Depends(current_user),
                config: ServiceConfig = Depends(get_config), db: DB = Depends(get_db)):
    """One edit through the app's label journal: apply, clear, discard, rename, merge."""
    p = built(config, dataset_for(db, user, dataset_id))
    try:
        _, book = label_book(p, f"api-{user['name']}")
        if body.op == "apply":
            if body.label is None:
                raise ValueError("apply needs \"label\"")
            rec = book.apply(body.keys, body.label)
        elif body.op == "clear":
            rec = book.clear(body.keys)
        elif body.op == "discard":
            rec = book.discard(body.keys)
        elif body.op == "rename":
            if body.old is None or body.new is None:
                raise ValueError("rename needs \"old\" and \"new\"")
            rec = book.rename(body.old, body.new)
        else:
            if body.old is None or body.new is None:
                raise ValueError("merge needs \"old\" (a) and \"new\" (b); \"into\" optional")
            rec = book.merge(body.old, body.new, body.into)
    except ValueError as exc:
        raise ServiceError(422, str(exc)) from None
    except OSError as exc:  # nothing was saved (explorer.curation.journal.JournalError)
        raise ServiceError(503, f"the label edit was not saved: {exc}") from None
    from explorer.curation.journal import change_groups

    changed = 0 if rec is None else sum(len(g[2]) for g in
                                        change_groups(rec["args"].get("changes")))
    return {"changed": changed,
            "counts": book.counts(), "seq": book.seq}
