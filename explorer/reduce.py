"""Reduce embeddings with UMAP: a 2-D map for viewing and a clusterable space.

Two pure functions, arrays in, arrays out::

    reduce_map(X)            -> Reduction(embedding=(N, 2), notes=[...])
    reduce_cluster_space(X)  -> Reduction(embedding=(N, k), notes=[...])

Both return a :class:`Reduction`, a named pair, so either style works::

    xy, notes = reduce_map(X)
    res = reduce_cluster_space(X); res.embedding

The map follows umap-learn's defaults for visualisation (``n_neighbors=15``,
``min_dist=0.1``). The clusterable space follows umap-learn's "Using UMAP for
clustering" guide: ``min_dist=0`` (points pack tightly, so density-based clustering
sees dense cores) in a few dimensions, with a larger neighbourhood
(``n_neighbors=30``) so clusters reflect more global structure. The defaults were
chosen by measurement (``bench/quality.py`` on the clothing photos).

Both are deterministic for a fixed ``random_state`` (umap-learn then runs
single-threaded); pass ``random_state=None`` for a faster, parallel, non-reproducible
run.

Small or degenerate input never crashes; instead a simpler, deterministic method is
used and ``notes`` says what happened:

* N = 0: an empty ``(0, k)`` array.
* N = 1, or every row identical, or D = 0: all points at the origin.
* N < :data:`MIN_UMAP_POINTS` (UMAP's spectral layout breaks on a handful of points):
  PCA of the (for ``cosine``/``correlation``: L2-normalised) rows, padded with zeros
  to ``k`` columns.
* ``n_neighbors >= N``: clamped to ``N - 1``.
* D = 1 with an angle metric (``cosine``, ``correlation``), which is meaningless for
  one number: ``euclidean`` is used instead.

umap-learn is imported inside the functions, so importing this module is cheap.
"""

from __future__ import annotations

import numbers
import warnings
from contextlib import contextmanager
from typing import Any, Callable, NamedTuple

import numpy as np

from explorer._checks import as_matrix

#: below this many points the embedding is PCA, not UMAP
MIN_UMAP_POINTS = 16

#: metrics for which rows are compared by angle (we L2-normalise for PCA fallbacks)
_ANGLE_METRICS = ("cosine", "correlation")

#: default parameters of the clusterable space (chosen with bench/quality.py)
CLUSTER_SPACE_DEFAULTS: dict[str, Any] = {
    "n_components": 5,
    "n_neighbors": 30,
    "min_dist": 0.0,
    "metric": "cosine",
}


class Reduction(NamedTuple):
    """Result of a reduction: the embedding and what, if anything, was done instead of UMAP."""

    embedding: np.ndarray
    """``(N, k)`` float32 coordinates."""
    notes: list[str]
    """Human-readable notes (fallbacks, clamped parameters); empty when UMAP ran as asked."""


# --------------------------------------------------------------------------- validation
def _check_X(X: Any) -> np.ndarray:
    return as_matrix(X, "X", np.float32, nan_hint="; fix or drop them before reducing")


def _check_int(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}; got {value!r}")
    return int(value)


def _check_params(
    n_components: Any,
    n_neighbors: Any,
    min_dist: Any,
    metric: Any,
    random_state: Any,
) -> tuple[int, int, float]:
    n_components = _check_int("n_components", n_components, 1)
    n_neighbors = _check_int("n_neighbors", n_neighbors, 2)
    if (
        isinstance(min_dist, bool)
        or not isinstance(min_dist, numbers.Real)
        or not np.isfinite(min_dist)
        or not 0.0 <= min_dist <= 1.0
    ):
        raise ValueError(f"min_dist must be a number in [0, 1]; got {min_dist!r}")
    if isinstance(metric, str):
        from umap.distances import named_distances

        if metric not in named_distances:
            raise ValueError(
                f"unknown metric {metric!r}; use one of umap-learn's named metrics, "
                "e.g. 'cosine', 'euclidean', 'manhattan', 'correlation'"
            )
    elif not callable(metric):
        raise ValueError(f"metric must be a metric name or a callable; got {metric!r}")
    if random_state is not None and not isinstance(random_state, np.random.RandomState):
        if (
            isinstance(random_state, bool)
            or not isinstance(random_state, numbers.Integral)
            or not 0 <= random_state < 2**32
        ):
            raise ValueError(
                f"random_state must be None, an integer in [0, 2**32) or a "
                f"numpy RandomState; got {random_state!r}"
            )
    return n_components, n_neighbors, float(min_dist)


# --------------------------------------------------------------------------- fallbacks
def _pca(X: np.ndarray, k: int, metric: Any) -> np.ndarray:
    """Deterministic PCA to ``k`` columns (zero-padded), scaled to unit spread."""
    n, d = X.shape
    Xd = X.astype(np.float64)
    if isinstance(metric, str) and metric in _ANGLE_METRICS:
        if metric == "correlation":
            Xd = Xd - Xd.mean(axis=1, keepdims=True)
        norms = np.linalg.norm(Xd, axis=1, keepdims=True)
        Xd = np.divide(Xd, norms, out=np.zeros_like(Xd), where=norms > 0)
    Xd = Xd - Xd.mean(axis=0)
    out = np.zeros((n, k))
    if n > 1 and d > 0 and np.abs(Xd).max() > 0:
        U, S, _ = np.linalg.svd(Xd, full_matrices=False)
        # deterministic signs: largest |value| of each component positive
        signs = np.sign(U[np.abs(U).argmax(axis=0), range(U.shape[1])])
        signs[signs == 0] = 1
        Y = U * S * signs
        m = min(k, Y.shape[1])
        out[:, :m] = Y[:, :m]
        scale = np.abs(out).max()
        if scale > 0:
            out *= 5.0 / scale  # roughly the extent of a UMAP layout
    return out.astype(np.float32)


def _all_rows_identical(X: np.ndarray) -> bool:
    # ptp over rows without a (N, D) boolean temporary
    return bool(X.shape[0] <= 1 or X.shape[1] == 0 or float(np.ptp(X, axis=0).max()) == 0.0)


@contextmanager
def _spinner(enabled: bool, text: str):
    if not enabled:
        yield
        return
    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    with Progress(
        SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(), transient=True
    ) as bar:
        bar.add_task(text, total=None)
        yield


# --------------------------------------------------------------------------- core
def _reduce(
    X: Any,
    *,
    n_components: int,
    n_neighbors: int,
    min_dist: float,
    metric: str | Callable,
    random_state: Any,
    progress: bool,
    what: str,
    **umap_kwargs: Any,
) -> Reduction:
    n_components, n_neighbors, min_dist = _check_params(
        n_components, n_neighbors, min_dist, metric, random_state
    )
    X = _check_X(X)
    n, d = X.shape
    notes: list[str] = []
    if n == 0:
        return Reduction(np.zeros((0, n_components), dtype=np.float32), ["no points to reduce"])
    if d == 0:
        notes.append("the points have no features (D = 0); all placed at the origin")
        return Reduction(np.zeros((n, n_components), dtype=np.float32), notes)
    if _all_rows_identical(X):
        why = "only one point" if n == 1 else f"all {n} points are identical"
        notes.append(f"{why}; all placed at the origin")
        return Reduction(np.zeros((n, n_components), dtype=np.float32), notes)
    if d == 1 and isinstance(metric, str) and metric in _ANGLE_METRICS:
        notes.append(f"metric {metric!r} is meaningless for 1 feature; using 'euclidean'")
        metric = "euclidean"
    if n < MIN_UMAP_POINTS:
        notes.append(
            f"only {n} points (UMAP needs at least {MIN_UMAP_POINTS}); "
            f"{what} computed with PCA instead"
        )
        return Reduction(_pca(X, n_components, metric), notes)
    if n_neighbors > n - 1:
        notes.append(f"n_neighbors={n_neighbors} clamped to {n - 1} (only {n} points)")
        n_neighbors = n - 1

    if metric == "cosine":
        norms = np.linalg.norm(X, axis=1)
        if (norms > 0).all():
            # Same neighbours as cosine, but umap-learn then uses vectorised Euclidean
            # distances instead of a numba call per pair (about 1.4x faster below 4,096 points).
            X = X / norms[:, None]
            metric = "euclidean"

    import umap

    reducer = umap.UMAP(
        n_components=n_components,
        n_neighbors=n_neighbors,
        min_dist=min_dist,
        metric=metric,
        random_state=random_state,
        **umap_kwargs,
    )
    with warnings.catch_warnings(record=True) as caught, _spinner(
        progress, f"UMAP {what} ({n:,} points, {d} features)"
    ):
        warnings.simplefilter("always")
        Y = reducer.fit_transform(X)
    for w in caught:
        msg = str(w.message)
        # the n_jobs notice is the documented price of reproducibility, not news
        if "n_jobs value" in msg or "overridden" in msg:
            continue
        if "disconnected" in msg.lower() or "connected components" in msg.lower():
            note = "UMAP: the neighbour graph is not fully connected; far-apart groups"
            note += " are placed arbitrarily relative to each other"
        else:
            note = f"UMAP warning: {msg.splitlines()[0][:200]}"
        if note not in notes:
            notes.append(note)
    Y = np.asarray(Y, dtype=np.float32)
    if not np.isfinite(Y).all():
        # has not been seen, but a map with NaNs would be unusable downstream
        notes.append("UMAP returned non-finite coordinates; used PCA instead")
        Y = _pca(X, n_components, metric)
    return Reduction(Y, notes)


def reduce_map(
    X: Any,
    *,
    n_neighbors: int = 15,
    min_dist: float = 0.1,
    metric: str | Callable = "cosine",
    random_state: int | None = 42,
    progress: bool = False,
    **umap_kwargs: Any,
) -> Reduction:
    """2-D UMAP map of ``X`` (N, D) for viewing.

    Parameters follow umap-learn. ``metric="cosine"`` suits CNN/ViT embeddings.
    Same input and ``random_state`` give the same map. Extra keyword arguments go to
    ``umap.UMAP`` unchanged. ``progress=True`` shows a spinner while UMAP runs.

    Returns a :class:`Reduction` ``(embedding (N, 2) float32, notes)``; see the module
    docstring for the small-input fallbacks reported in ``notes``.

    Raises ``ValueError`` naming the bad value for: X not 2-D or with NaN/inf,
    ``n_neighbors < 2``, ``min_dist`` outside [0, 1], an unknown ``metric``, a bad
    ``random_state``.
    """
    return _reduce(
        X,
        n_components=2,
        n_neighbors=n_neighbors,
        min_dist=min_dist,
        metric=metric,
        random_state=random_state,
        progress=progress,
        what="2-D map",
        **umap_kwargs,
    )


def reduce_cluster_space(
    X: Any,
    *,
    n_components: int = CLUSTER_SPACE_DEFAULTS["n_components"],
    n_neighbors: int = CLUSTER_SPACE_DEFAULTS["n_neighbors"],
    min_dist: float = CLUSTER_SPACE_DEFAULTS["min_dist"],
    metric: str | Callable = CLUSTER_SPACE_DEFAULTS["metric"],
    random_state: int | None = 42,
    progress: bool = False,
    **umap_kwargs: Any,
) -> Reduction:
    """A few-dimensional UMAP space of ``X`` (N, D) in which to cluster.

    ``min_dist=0`` packs similar points tightly and ``n_components`` > 2 keeps more
    structure than the 2-D map, which is what density-based clustering (HDBSCAN)
    needs; see umap-learn's "Using UMAP for clustering". Cluster here, show the
    result on :func:`reduce_map`'s map.

    Returns a :class:`Reduction` ``(embedding (N, n_components) float32, notes)``.
    Raises ``ValueError`` like :func:`reduce_map`, and for ``n_components < 1``.
    """
    return _reduce(
        X,
        n_components=n_components,
        n_neighbors=n_neighbors,
        min_dist=min_dist,
        metric=metric,
        random_state=random_state,
        progress=progress,
        what=f"{n_components}-D clustering space",
        **umap_kwargs,
    )
