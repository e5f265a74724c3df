"""A map that learns the person's labels: "Re-map with my labels".

The build's map (``NAME.csv``'s x, y and ``NAME.layout.npz``) is computed from the vectors
alone. Once a person has labelled some images, a semi-supervised UMAP (umap-learn's ``y``:
the label of each labelled row, ``-1`` for the others) pulls each class together and pushes
the classes apart, and the unlabelled images follow the labelled ones they resemble. It is
stored BESIDE the original layout, never over it::

    NAME.layout-labels.npz    xy (N, 2), space (N, k), cluster (N,), classes, rows digest

Pure stages, arrays in and arrays out, plus one reader and one writer of that file::

    targets, classes = label_targets(labels)            # "" -> -1 (explorer.curation.active.encode)
    res = remap(X, targets)                             # Remapped(xy, space, cluster, ...)
    save(csv, keys, res, classes)  /  load(csv, keys)   # the sidecar (None if absent/stale)
    remap_build(csv, vectors, labels)                   # all of it (CLI, the app's worker)

The layout is :func:`explorer.stages.reduce.map_and_space` with ``y`` (the build's own map and
clusterable space, same neighbour graph, same sampling at scale); the clusters are
:func:`explorer.stages.cluster.cluster` of that space (the build's default method), so "re-cluster
from it" means the same thing as the build's clusters. The file holds a digest of the rows'
keys: a build with other rows (rebuilt, images added) makes :func:`load` return ``None``
instead of a layout for other images.
"""

from __future__ import annotations

import hashlib
import io
import os
from pathlib import Path
from typing import Any, NamedTuple, Sequence

import numpy as np

__all__ = ["KIND", "Remapped", "label_targets", "with_predictions", "remap", "keys_digest", "sidecar_path",
           "save", "load", "remap_build"]

#: the sidecar kind: ``NAME.layout-labels.npz`` beside ``NAME.csv``
KIND = "layout-labels.npz"
#: the sure predictions join the labels as targets (see :func:`with_predictions`): off, it
#: measured no better on the clothing photos (docs/labelling.md, bench/remap.py)
PREDICTIONS = False
#: the seed of the layout (reproducible; umap-learn then runs single-threaded)
SEED = 42


class Remapped(NamedTuple):
    """A semi-supervised layout of every row."""

    xy: np.ndarray
    """``(N, 2)`` float32: the map."""
    space: np.ndarray
    """``(N, k)`` float32: the clusterable space it was clustered in."""
    cluster: np.ndarray
    """``(N,)`` int64: cluster per row (``-1`` noise)."""
    labelled: int
    """rows that had a label (a class) when it was computed."""
    notes: list[str]
    predicted: int = 0
    """unlabelled rows that took part with their (sure) predicted label."""


def label_targets(labels: Sequence[Any]) -> tuple[np.ndarray, list[str]]:
    """(int class per row, ``-1`` for no label; the class names): the same coding as the
    labelling model (:func:`explorer.curation.active.encode`: "discard" is a class too)."""
    from explorer.curation.active import encode

    return encode(labels)


def with_predictions(labels: Sequence[Any], predicted: Sequence[Any], use: Any) -> list[str]:
    """The targets' labels: every row's own label, else its predicted label where ``use``
    (e.g. the sure predictions of :func:`explorer.curation.active.label_table`), else ``""``.

    With a few dozen labels among thousands of images umap-learn's target changes little
    (it weakens edges between two labelled images of different classes, and every edge
    to an unlabelled one alike); the sure predictions would carry the labels to the images
    they were made for. Measured on the clothing photos it made no clear difference
    (docs/labelling.md), so :func:`remap_build` leaves it off by default."""
    use = np.asarray(use, dtype=bool)
    if not (len(labels) == len(predicted) == len(use)):
        raise ValueError(f"labels, predicted and use differ in length: "
                         f"{len(labels)}, {len(predicted)}, {len(use)}")
    return [str(lab) if lab else (str(p) if u and p else "")
            for lab, p, u in zip(labels, predicted, use.tolist())]


def remap(X: Any, targets: Any, *, random_state: int | None = SEED,
          progress: bool = False) -> Remapped:
    """The layout of ``X`` (N, D) with ``targets`` (N,) ints (``-1``: unknown) as
    :func:`explorer.stages.reduce.map_and_space`'s ``y``, and clusters of its space.

    Raises ``ValueError`` when no row has a class (nothing to learn from) or when the
    shapes disagree."""
    from explorer.stages.cluster import cluster
    from explorer.stages.reduce import map_and_space

    y = np.asarray(targets)
    if y.ndim != 1 or y.dtype.kind not in "iu":
        raise ValueError(f"targets must be a 1-D int array (-1 = no label), got {y.dtype} {y.shape}")
    labelled = int((y >= 0).sum())
    if labelled == 0:
        raise ValueError("no image has a label yet: label some images first, then re-map")
    res = map_and_space(X, y=y, random_state=random_state, progress=progress)
    cl = cluster(res.space, random_state=random_state if random_state is not None else 42)
    notes = list(res.notes) + list(cl.notes)
    return Remapped(res.xy, res.space, np.asarray(cl.labels, np.int64), labelled, notes)


def keys_digest(keys: Sequence[str]) -> str:
    """A short digest of the rows' keys in order (the sidecar belongs to these rows)."""
    h = hashlib.sha256()
    for k in keys:
        h.update(str(k).encode("utf-8", "surrogatepass"))
        h.update(b"\0")
    return h.hexdigest()[:32]


def sidecar_path(csv_path: str | os.PathLike) -> Path:
    """``NAME.layout-labels.npz`` beside ``NAME.csv``."""
    from explorer.table import sidecar

    return sidecar(csv_path, KIND)


def save(csv_path: str | os.PathLike, keys: Sequence[str], res: Remapped,
         classes: Sequence[str] = ()) -> Path:
    """Write ``res`` as the sidecar of ``csv_path`` (atomic); the original layout
    (``NAME.csv``, ``NAME.layout.npz``) is not touched."""
    from explorer.table import atomic_write_bytes

    if len(keys) != len(res.xy):
        raise ValueError(f"keys ({len(keys)}) and layout rows ({len(res.xy)}) differ in length")
    buf = io.BytesIO()
    np.savez(buf, xy=np.asarray(res.xy, np.float32), space=np.asarray(res.space, np.float32),
             cluster=np.asarray(res.cluster, np.int64), labelled=np.int64(res.labelled),
             predicted=np.int64(res.predicted),
             classes=np.asarray(list(classes), dtype=str), rows=np.array(keys_digest(keys)),
             notes=np.asarray(list(res.notes), dtype=str))
    return atomic_write_bytes(sidecar_path(csv_path), buf.getvalue())


def load(csv_path: str | os.PathLike, keys: Sequence[str]) -> dict[str, Any] | None:
    """The sidecar's arrays (``xy``, ``space``, ``cluster``, ``labelled``, ``predicted``,
    ``classes``, ``notes``), or ``None`` when there is none, it cannot be read, or it was made for
    other rows than ``keys``."""
    path = sidecar_path(csv_path)
    try:
        with np.load(path, allow_pickle=False) as z:
            if str(z["rows"]) != keys_digest(keys) or len(z["xy"]) != len(keys):
                return None
            return {"xy": z["xy"], "space": z["space"], "cluster": z["cluster"],
                    "labelled": int(z["labelled"]), "classes": z["classes"].tolist(),
                    "predicted": int(z["predicted"]) if "predicted" in z.files else 0,
                    "notes": z["notes"].tolist()}
    except (OSError, ValueError, KeyError):
        return None


def remap_build(csv_path: str | os.PathLike, vectors: Any, labels: Sequence[Any],
                keys: Sequence[str], *, predictions: bool = PREDICTIONS, model_rows: Any = None,
                random_state: int | None = SEED) -> Remapped:
    """Re-map a build with its labels and write the sidecar; returns the layout.

    ``vectors``: the stored vectors (N, D), or the path of ``NAME.features.npy`` (memory-
    mapped here, so a worker process receives a path, not the array). ``predictions``:
    the sure predictions of the labelling model (:func:`explorer.curation.active.label_table`,
    fitted here on ``model_rows`` = :func:`explorer.curation.active.features` of the vectors, made
    if not given) join the labels as targets (:func:`with_predictions`)."""
    if isinstance(vectors, (str, os.PathLike)):
        vectors = np.load(vectors, mmap_mode="r", allow_pickle=False)
    labels = ["" if v is None else str(v) for v in labels]
    if len(labels) != len(vectors) or len(keys) != len(labels):
        raise ValueError(f"vectors ({len(vectors)}), labels ({len(labels)}) and keys "
                         f"({len(keys)}) differ in length")
    target_labels = labels
    if predictions and len({v for v in labels if v}) >= 2:
        from explorer.curation import active

        X = active.features(vectors) if model_rows is None else model_rows
        table, _ = active.label_table(keys, labels, ["person" if v else "" for v in labels], X)
        target_labels = with_predictions(labels, table["predicted_label"].tolist(), table["sure"].to_numpy())
    targets, classes = label_targets(target_labels)
    res = remap(vectors, targets, random_state=random_state)
    n_lab = sum(1 for v in labels if v)
    res = res._replace(labelled=n_lab, predicted=int((targets >= 0).sum()) - n_lab)
    save(csv_path, keys, res, classes)
    return res
