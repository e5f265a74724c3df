"""Reduce embeddings: a 2-D map for viewing and a clusterable space.

The build's entry point computes both from one neighbour graph::

    res = map_and_space(X)        # MapResult(xy (N, 2), space (N, 5), knn, notes, info)
    res = map_and_space(X, map_method="tsne", random_state=42)
    xy_new = place_new(X, res.xy, X_new)   # a re-run adds a few images to the same map

``map_and_space`` prepares the rows once (cosine: L2-normalised; PCA to 64 dims when
D is larger), computes the k-nearest-neighbour graph once (:mod:`explorer.stages.knn`: exact
for small N, faiss's HNSW index on CPU, exact top-k with torch on CUDA) and hands it to both
UMAP fits (``precomputed_knn``). Large maps skip UMAP's spectral initialisation
(:data:`SPECTRAL_MAX_POINTS`). It runs in parallel unless given a seed.

Two older pure functions, one UMAP each, remain for callers that need only one
(the app's re-cluster), arrays in, arrays out::

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
run. Nothing here uses ``warnings.catch_warnings`` (not thread-safe; the app runs
re-cluster in threads): the one umap-learn warning that is never news is filtered once
at import.

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
import time
import warnings
from typing import Any, Callable, NamedTuple

import numpy as np

from explorer._checks import as_matrix
from explorer._checks import check_int as _check_int
from explorer._checks import check_random_state as _check_random_state
from explorer.progress import spinner
from explorer.stages import jit

#: below this many points the embedding is PCA, not UMAP
MIN_UMAP_POINTS = 16

#: metrics for which rows are compared by angle (we L2-normalise for PCA fallbacks)
_ANGLE_METRICS = ("cosine", "correlation")

#: the common names of umap-learn's metrics (all in ``umap.distances.named_distances``):
#: checked without importing umap-learn (2-3 CPU s), so a build that maps with PCA or the
#: classic methods' layout never imports it; other names are looked up in umap-learn itself
_COMMON_METRICS = frozenset({"euclidean", "l2", "cosine", "correlation", "manhattan", "l1",
                             "taxicab", "chebyshev", "linf", "minkowski", "hamming",
                             "jaccard", "canberra", "braycurtis"})

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
def _umap():
    """umap-learn, imported on first use (seconds), its numba kernels in the disk cache
    (:func:`explorer.stages.jit.cache_kernels`) before they are first compiled."""
    import umap

    jit.cache_kernels("umap", "pynndescent")
    return umap


def _check_X(X: Any) -> np.ndarray:
    return as_matrix(X, "X", np.float32, nan_hint="; fix or drop them before reducing")




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
        if metric not in _COMMON_METRICS:
            from umap.distances import named_distances

            if metric not in named_distances:
                raise ValueError(
                    f"unknown metric {metric!r}; use one of umap-learn's named metrics, "
                    "e.g. 'cosine', 'euclidean', 'manhattan', 'correlation'"
                )
    elif not callable(metric):
        raise ValueError(f"metric must be a metric name or a callable; got {metric!r}")
    _check_random_state(random_state, allow_state=True)
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

    umap = _umap()
    if random_state is not None:
        # seeded umap-learn is single-threaded anyway; saying so avoids its warning
        umap_kwargs.setdefault("n_jobs", 1)
    reducer = umap.UMAP(
        n_components=n_components,
        n_neighbors=n_neighbors,
        min_dist=min_dist,
        metric=metric,
        random_state=random_state,
        **umap_kwargs,
    )
    # no warnings.catch_warnings here: it is process-global and this runs in the app's
    # worker threads (review M4); what its warnings told us is read from the result
    with spinner(progress, f"UMAP {what} ({n:,} points, {d} features)"):
        Y = reducer.fit_transform(X)
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


# =========================================================================== one graph, two maps
#: the 2-D maps :func:`map_and_space` can draw
MAP_METHODS: tuple[str, ...] = ("umap", "tsne", "pca")

#: UMAP initialisations :func:`map_and_space` accepts ("auto": spectral up to
#: :data:`SPECTRAL_MAX_POINTS` points, "pca" above, where the spectral step does not scale)
INITS: tuple[str, ...] = ("auto", "spectral", "pca", "random")

#: above this many points "auto" initialises UMAP with PCA instead of the spectral layout
SPECTRAL_MAX_POINTS = 100_000

#: ``pca_dims="auto"``: PCA to this many dimensions above :data:`PCA_FROM_POINTS` points
PCA_DIMS = 64

#: ``pca_dims="auto"`` keeps the full dimension up to this many points. Measured on the
#: clothing photos (3,781 x 1280, seeds 42-44, hdbscan): NMI 0.630 without PCA, 0.622
#: with 128 dims, 0.614 with 64; the previous two-UMAP default 0.632.
PCA_FROM_POINTS = 20_000

#: ``fit_points="auto"``: above this many points UMAP is fitted on a seeded sample of this
#: many rows and the others are placed among them (:func:`map_and_space`). Optimising a
#: million points on 2 cores did not finish in 36 min; 100,000 is the largest fit
#: measured to finish on this project's 2-core machine.
FIT_POINTS = 100_000

#: default parameters of the 2-D map (umap-learn's defaults for visualisation)
MAP_DEFAULTS: dict[str, Any] = {"n_neighbors": 15, "min_dist": 0.1}

# We pass umap-learn the neighbour graph without a search index (we never call
# ``transform``); it warns about that on every fit. Filtered once, here, at import
# (``catch_warnings`` is not thread-safe, review M4).
warnings.filterwarnings("ignore", message=r"precomputed_knn\[2\]", category=UserWarning)


class MapResult(NamedTuple):
    """What :func:`map_and_space` computed from one neighbour graph."""

    xy: np.ndarray
    """``(N, 2)`` float32: the map to look at."""
    space: np.ndarray
    """``(N, space_dim)`` float32: the clusterable space (UMAP, ``min_dist=0``)."""
    knn: tuple[np.ndarray, np.ndarray]
    """``(indices (N, k) int32, distances (N, k) float32)`` of the input rows: column 0 is
    the point itself, then its nearest others (cosine neighbours for ``metric="cosine"``;
    distances are Euclidean in the prepared space, see :func:`explorer.stages.knn.prepare`)."""
    notes: list[str]
    """Human-readable notes (fallbacks, clamped parameters)."""
    info: dict
    """For the run record: pca dims, knn method, map method, init, seed/parallel, timings."""


def _graph_pieces(graph: Any) -> int | None:
    """Number of connected pieces of a UMAP graph (groups with no neighbours in common:
    their distances on the map say little). ``None`` without a graph."""
    if graph is None:
        return None
    from scipy.sparse.csgraph import connected_components

    return int(connected_components(graph, directed=False, return_labels=False))


def _check_choice(name: str, value: Any, choices: tuple[str, ...]) -> str:
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}; got {value!r}")
    return value


def _scaled(Y: np.ndarray) -> np.ndarray:
    scale = float(np.abs(Y).max()) if Y.size else 0.0
    return (Y * (5.0 / scale) if scale > 0 else Y).astype(np.float32)


def _pca_columns(Xp: np.ndarray, k: int) -> np.ndarray:
    """First ``k`` principal components of ``Xp`` (zero-padded), deterministic signs,
    by an eigendecomposition of the (D, D) covariance: no (N, N) or SVD of N rows."""
    n, d = Xp.shape
    out = np.zeros((n, k), dtype=np.float32)
    if n < 2 or d == 0:
        return out
    mean = Xp.mean(axis=0, dtype=np.float64)
    C = np.zeros((d, d))
    for a in range(0, n, 65_536):
        B = Xp[a:a + 65_536].astype(np.float64) - mean
        C += B.T @ B
    vals, vecs = np.linalg.eigh(C)
    order = np.argsort(vals)[::-1][: min(k, d)]
    W = vecs[:, order]
    signs = np.sign(W[np.abs(W).argmax(axis=0), np.arange(W.shape[1])])
    signs[signs == 0] = 1
    W = (W * signs).astype(np.float32)
    out[:, : W.shape[1]] = (Xp - mean.astype(np.float32)) @ W
    return _scaled(out)


def _cuml_available(device: str) -> bool:
    if not device.startswith("cuda"):
        return False
    try:
        import cuml  # noqa: F401
    except Exception:  # not installed, or installed without a working CUDA runtime
        return False
    return True


def _umap_from_graph(Xp, knn, k, n_components, min_dist, init, random_state, engine, what,
                     progress, notes, info, y=None):
    """UMAP of the prepared rows ``Xp`` from the shared graph's first ``k`` columns
    (``y``: int class per row, -1 unknown, for a semi-supervised fit; None: unsupervised)."""
    if engine == "cuml":  # RAPIDS: cannot be tested without a GPU and cuml installed
        from cuml.manifold import UMAP as CuUMAP
        from scipy.sparse import csr_matrix

        n = len(Xp)
        rows = np.repeat(np.arange(n), k)
        graph = csr_matrix((knn.distances[:, :k].ravel(), (rows, knn.indices[:, :k].ravel())),
                           shape=(n, n))
        reducer = CuUMAP(n_components=n_components, n_neighbors=k, min_dist=min_dist,
                         init="spectral" if init == "spectral" else "random",
                         random_state=random_state)
        Y = reducer.fit_transform(Xp, y=y, knn_graph=graph)
        return np.asarray(getattr(Y, "get", lambda: Y)(), dtype=np.float32)

    umap = _umap()
    reducer = umap.UMAP(
        n_components=n_components,
        n_neighbors=k,
        min_dist=min_dist,
        metric="euclidean",
        init=init,
        random_state=random_state,
        n_jobs=1 if random_state is not None else -1,
        precomputed_knn=(knn.indices[:, :k].copy(), knn.distances[:, :k].copy()),
        low_memory=True,
        verbose=False,
    )
    with spinner(progress, f"UMAP {what} ({len(Xp):,} points)"):
        Y = reducer.fit_transform(Xp, y=y)
    info.setdefault("graph_pieces", {})[what] = _graph_pieces(getattr(reducer, "graph_", None))
    Y = np.asarray(Y, dtype=np.float32)
    if not np.isfinite(Y).all():
        notes.append(f"UMAP returned non-finite coordinates for the {what}; used PCA instead")
        Y = _pca_columns(Xp, n_components)
    return Y


def _tsne_from_graph(Xp, knn, random_state, progress, notes, info):
    """openTSNE with perplexity affinities computed from the shared graph."""
    from openTSNE import TSNE
    from openTSNE.affinity import PerplexityBasedNN
    from openTSNE.initialization import rescale
    from openTSNE.nearest_neighbors import KNNIndex

    idx = knn.indices[:, 1:].astype(np.int64)  # openTSNE's graph leaves the point out
    dist = knn.distances[:, 1:].astype(np.float64)

    class _Given(KNNIndex):
        VALID_METRICS = ["euclidean"]

        def build(self):
            return idx, dist

    n_jobs = 1 if random_state is not None else -1
    perplexity = float(min(30.0, max(1.0, idx.shape[1] / 3.0)))
    info["tsne_perplexity"] = round(perplexity, 2)
    aff = PerplexityBasedNN(
        knn_index=_Given(Xp, idx.shape[1], random_state=random_state),
        perplexity=perplexity, n_jobs=n_jobs, random_state=random_state, verbose=False,
    )
    init = rescale(_pca_columns(Xp, 2).astype(np.float64), target_std=1e-4)
    tsne = TSNE(n_jobs=n_jobs, random_state=random_state, verbose=False)
    with spinner(progress, f"t-SNE map ({len(Xp):,} points)"):
        Y = np.asarray(tsne.fit(affinities=aff, initialization=init), dtype=np.float32)
    if not np.isfinite(Y).all():
        notes.append("t-SNE returned non-finite coordinates; used PCA instead")
        Y = _pca_columns(Xp, 2)
    return Y


def map_and_space(
    X: Any,
    *,
    map_method: str = "umap",
    n_neighbors: int = MAP_DEFAULTS["n_neighbors"],
    space_dim: int = CLUSTER_SPACE_DEFAULTS["n_components"],
    random_state: int | None = None,
    device: str = "cpu",
    progress: bool = False,
    metric: str = "cosine",
    min_dist: float = MAP_DEFAULTS["min_dist"],
    space_neighbors: int = CLUSTER_SPACE_DEFAULTS["n_neighbors"],
    pca_dims: int | str | None = "auto",
    knn_method: str = "auto",
    init: str = "auto",
    fit_points: int | str | None = "auto",
    y: Any = None,
) -> MapResult:
    """The 2-D map and the clusterable space of ``X`` (N, D) from one neighbour graph.

    1. rows prepared once (:func:`explorer.stages.knn.prepare`): L2-normalised for
       ``metric="cosine"``, projected on ``pca_dims`` principal components when D is
       larger (``None``: never; ``"auto"``: :data:`PCA_DIMS` above
       :data:`PCA_FROM_POINTS` points, none below, where exact neighbours in the full
       dimension are cheap and cluster the clothing photos better);
    2. one k-nearest-neighbour graph (:func:`explorer.stages.knn.knn_graph`, k =
       ``max(n_neighbors, space_neighbors)``): exact for small N, faiss HNSW on CPU,
       exact blocked top-k with torch on CUDA;
    3. the clusterable space: UMAP (``space_dim`` dims, ``min_dist=0``,
       ``space_neighbors``) from that graph;
    4. the map: ``map_method="umap"`` (``n_neighbors``, ``min_dist``) from the same
       graph, ``"tsne"`` (openTSNE, perplexity affinities from the same graph) or
       ``"pca"`` (the first two principal components).

    ``fit_points`` bounds the work of steps 2-4 at scale (``"auto"``:
    :data:`FIT_POINTS`; ``None``: never): above it the graph and both fits use a sample
    of ``fit_points`` rows (seeded), and every other row is placed in the map and in the
    space at the distance-weighted mean of its ``n_neighbors`` nearest sample rows
    (a search of the sample's HNSW index), as :func:`place_new` places new
    images. Then ``knn`` holds, for those rows, themselves and their nearest sample rows;
    ``info["fit_points"]`` says how many rows were fitted.

    ``random_state=None`` (default) runs in parallel on every core and is not
    reproducible; an int gives the same result every run (single-threaded).
    ``init="auto"`` uses UMAP's spectral initialisation up to
    :data:`SPECTRAL_MAX_POINTS` points and PCA above. With ``device="cuda"`` and RAPIDS
    cuML importable, cuML's UMAP runs on the GPU (never required).

    ``y`` (N,) ints makes both UMAP fits semi-supervised (umap-learn's ``y`` with its
    categorical target metric): rows of the same class are pulled together, ``-1`` marks
    rows of no known class (the app's "Re-map with my labels"). Ignored by the t-SNE and
    PCA maps and the PCA fallback of tiny inputs (a note says so).

    Small or degenerate input falls back like :func:`reduce_map` (notes say so).
    Raises ``ValueError`` naming the bad value for a bad array or parameter.
    """
    t_all = time.perf_counter()
    from explorer.stages import knn as knn_mod

    map_method = _check_choice("map_method", map_method, MAP_METHODS)
    space_dim = _check_int("space_dim", space_dim, 1)
    _, n_neighbors, min_dist = _check_params(2, n_neighbors, min_dist, "euclidean", None)
    space_neighbors = _check_int("space_neighbors", space_neighbors, 2)
    random_state = _check_random_state(random_state)
    metric = _check_choice("metric", metric, knn_mod.PREPARE_METRICS)
    if pca_dims is not None and pca_dims != "auto":
        pca_dims = _check_int("pca_dims", pca_dims, 2)
    _check_choice("knn_method", knn_method, knn_mod.KNN_METHODS)
    init = _check_choice("init", init, INITS)
    device = knn_mod.check_device(device)
    if fit_points is not None and fit_points != "auto":
        fit_points = _check_int("fit_points", fit_points, MIN_UMAP_POINTS)
    X = knn_mod.check_rows(X, "X")
    n, d = X.shape
    if y is not None:
        y = np.asarray(y)
        if y.shape != (n,) or y.dtype.kind not in "iu":
            raise ValueError(f"y must be {n} integers (one class per row, -1 unknown); "
                             f"got {y.dtype} {y.shape}")
        y = y.astype(np.int64)
    if pca_dims == "auto":
        pca_dims = PCA_DIMS if n > PCA_FROM_POINTS else None
    if fit_points == "auto":
        fit_points = FIT_POINTS

    notes: list[str] = []
    timings: dict[str, float] = {}
    info: dict[str, Any] = {
        "n_points": int(n), "n_features": int(d), "metric": metric, "map_method": map_method,
        "n_neighbors": n_neighbors, "min_dist": min_dist, "space_dim": space_dim,
        "space_neighbors": space_neighbors, "random_state": random_state,
        "parallel": random_state is None, "device": device,
        "reproducible": random_state is not None,
    }

    def trivial(why: str) -> MapResult:
        notes.append(why)
        idx = np.arange(n, dtype=np.int32)[:, None]
        info.update(knn_method=None, init=None, engine=None, timings={"total": 0.0})
        return MapResult(np.zeros((n, 2), np.float32), np.zeros((n, space_dim), np.float32),
                         (idx, np.zeros((n, 1), np.float32)), notes, info)

    if n == 0:
        return trivial("no points to map")
    if d == 0:
        return trivial("the points have no features (D = 0); all placed at the origin")
    if _all_rows_identical(X):
        return trivial(("only one point" if n == 1 else f"all {n} points are identical")
                       + "; all placed at the origin")
    if d == 1 and metric == "cosine":
        notes.append("metric 'cosine' is meaningless for 1 feature; using 'euclidean'")
        metric = info["metric"] = "euclidean"

    t = time.perf_counter()
    Xp, pinfo = knn_mod.prepare(X, metric=metric, pca_dims=pca_dims)
    timings["prepare"] = round(time.perf_counter() - t, 3)
    info["pca_dims"] = pinfo["pca_dims"]
    info["pca_explained_variance"] = pinfo["pca_explained_variance"]

    for name, v in (("n_neighbors", n_neighbors), ("space_neighbors", space_neighbors)):
        if v > n - 1:
            notes.append(f"{name}={v} clamped to {n - 1} (only {n} points)")
    n_neighbors, space_neighbors = min(n_neighbors, n - 1), min(space_neighbors, n - 1)
    k = max(n_neighbors, space_neighbors, 1)
    t = time.perf_counter()
    fit = rest = None
    if fit_points is not None and n > fit_points:
        # a seeded sample is fitted; the other rows are placed among it afterwards
        rng = np.random.default_rng(0 if random_state is None else random_state)
        keep = np.zeros(n, bool)
        keep[rng.choice(n, fit_points, replace=False)] = True
        fit, rest = np.flatnonzero(keep), np.flatnonzero(~keep)
        del keep
        Xfit = Xp[fit]
        yfit = None if y is None else y[fit]
        g, r_idx, r_dist = knn_mod.graph_and_nearest(
            Xfit, k, Xp[rest], max(k - 1, 1), method=knn_method, device=device,
            random_state=random_state)
        timings["knn"] = round(time.perf_counter() - t, 3)
    else:
        Xfit, yfit = Xp, y
        g = knn_mod.knn_graph(Xp, k, method=knn_method, device=device,
                              random_state=random_state)
        timings["knn"] = round(time.perf_counter() - t, 3)
    info["knn_method"] = g.method
    info["knn_k"] = int(g.indices.shape[1])
    info["fit_points"] = int(len(Xfit))

    if n < MIN_UMAP_POINTS:
        notes.append(f"only {n} points (UMAP needs at least {MIN_UMAP_POINTS}); "
                     "map and clustering space computed with PCA instead"
                     + ("" if y is None else " (without the labels)"))
        info.update(init=None, engine="pca", map_method_used="pca",
                    timings={**timings, "total": round(time.perf_counter() - t_all, 3)})
        return MapResult(_pca(Xp, 2, "euclidean"), _pca(Xp, space_dim, "euclidean"),
                         (g.indices, g.distances), notes, info)

    if init == "auto":
        init = "spectral" if n <= SPECTRAL_MAX_POINTS else "pca"
    info["init"] = init
    engine = "cuml" if _cuml_available(device) else "umap-learn"
    info["engine"] = engine

    t = time.perf_counter()
    space = _umap_from_graph(Xfit, g, space_neighbors, space_dim, 0.0, init, random_state,
                             engine, f"{space_dim}-D clustering space", progress, notes, info, y=yfit)
    timings["space"] = round(time.perf_counter() - t, 3)

    t = time.perf_counter()
    if map_method == "umap":
        xy = _umap_from_graph(Xfit, g, n_neighbors, 2, min_dist, init, random_state, engine,
                              "2-D map", progress, notes, info, y=yfit)
    elif map_method == "tsne":
        if y is not None:
            notes.append("the t-SNE map does not use the labels (only UMAP does)")
        xy = _tsne_from_graph(Xfit, g, random_state, progress, notes, info)
    else:
        xy = _pca_columns(Xp, 2)
    timings["map"] = round(time.perf_counter() - t, 3)

    indices, distances = g.indices, g.distances
    if fit is not None:
        t = time.perf_counter()
        w = _inverse_distance_weights(r_dist[:, :n_neighbors])
        space = _scatter(n, fit, space, rest, _weighted_mean(w, space, r_idx[:, :n_neighbors]))
        if map_method != "pca":  # the PCA map was computed for every row
            xy = _scatter(n, fit, xy, rest, _weighted_mean(w, xy, r_idx[:, :n_neighbors]))
        indices = np.empty((n, k), np.int32)
        distances = np.zeros((n, k), np.float32)
        indices[fit] = fit[g.indices]
        distances[fit] = g.distances
        indices[rest, 0] = rest
        m = min(k - 1, r_idx.shape[1])
        indices[rest, 1:1 + m] = fit[r_idx[:, :m]]
        distances[rest, 1:1 + m] = r_dist[:, :m]
        if 1 + m < k:  # fewer sample rows than k: repeat the farthest
            indices[rest, 1 + m:] = indices[rest, m:m + 1]
            distances[rest, 1 + m:] = distances[rest, m:m + 1]
        del r_idx, r_dist, w
        timings["place"] = round(time.perf_counter() - t, 3)
        notes.append(f"the map and the clustering space were fitted on a sample of "
                     f"{len(fit):,} of the {n:,} images; the others were placed among "
                     f"their nearest sampled images")
    timings["total"] = round(time.perf_counter() - t_all, 3)
    info["timings"] = timings
    try:
        import numba

        info["threads"] = 1 if random_state is not None else int(numba.get_num_threads())
    except ImportError:
        pass
    return MapResult(np.ascontiguousarray(xy, dtype=np.float32),
                     np.ascontiguousarray(space, dtype=np.float32),
                     (indices, distances), notes, info)


def _inverse_distance_weights(dist: np.ndarray) -> np.ndarray:
    """Rows of weights (normalised to sum 1) over sorted neighbour distances ``d``: UMAP's
    membership strengths ``exp(-(d - rho) / sigma)`` (``rho`` the nearest distance, ``sigma``
    set so a row sums to ``log2(k)``: ``umap.umap_.smooth_knn_dist``, what UMAP's
    ``transform`` averages with) times ``1 / d``. The nearest neighbours dominate, so a new
    image lands among its own group even when some of its ``k`` neighbours lie in other
    groups (``1 / d`` alone is almost flat for CNN vectors and averaged it between groups),
    and a near-copy takes its twin's place."""
    smooth_knn_dist = _umap().umap_.smooth_knn_dist
    d = np.ascontiguousarray(dist, dtype=np.float32)
    if d.shape[1] == 0:
        return np.zeros(d.shape, np.float64)
    sigma, rho = smooth_knn_dist(d, float(d.shape[1]))
    w = np.exp(-np.maximum(d - rho[:, None], 0.0) / sigma[:, None]).astype(np.float64)
    w /= d.astype(np.float64) + 1e-12
    w /= w.sum(axis=1, keepdims=True)
    return w


def _weighted_mean(w: np.ndarray, Y: np.ndarray, idx: np.ndarray,
                   block: int = 65_536) -> np.ndarray:
    """``sum_j w[i, j] * Y[idx[i, j]]`` per row, in blocks (no (M, k, c) array at 1M rows)."""
    out = np.empty((len(idx), Y.shape[1]), np.float32)
    for a in range(0, len(idx), block):
        out[a:a + block] = np.einsum("mk,mkc->mc", w[a:a + block],
                                     Y[idx[a:a + block]].astype(np.float64))
    return out


def _scatter(n: int, fit: np.ndarray, Y_fit: np.ndarray, rest: np.ndarray,
             Y_rest: np.ndarray) -> np.ndarray:
    out = np.empty((n, Y_fit.shape[1]), np.float32)
    out[fit], out[rest] = Y_fit, Y_rest
    return out


# =========================================================================== new rows
def place_new(X_old: Any, Y_old: Any, X_new: Any, *, k: int = 15) -> np.ndarray:
    """Positions for new rows ``X_new`` in an existing embedding ``Y_old`` (a map or a
    clusterable space) of ``X_old``, so a re-run with a few new images keeps the map.

    Each new row goes to the weighted mean of ``Y_old`` at its ``k`` nearest old rows by
    cosine distance in ``X``, weighted by ``1 / c`` (``c = sqrt(2 (1 - cos))``, the
    distance between the unit vectors): a near-copy of an old image lands on it, an
    image between two groups lands between them. ``X_old``
    is read in blocks (a memory-mapped store is fine). Returns (M, Y_old.shape[1])
    float32. Raises ``ValueError`` for mismatched shapes, NaN/inf or ``k < 1``.
    """
    from explorer.stages import knn as knn_mod

    k = _check_int("k", k, 1)
    Y_old = as_matrix(Y_old, "Y_old", np.float32, cols="m")
    X_new = as_matrix(X_new, "X_new", np.float32)
    if len(X_old) != len(Y_old):
        raise ValueError(f"X_old has {len(X_old)} rows but Y_old has {len(Y_old)}")
    m = len(X_new)
    if m == 0:
        return np.zeros((0, Y_old.shape[1]), np.float32)
    if len(Y_old) == 0:
        raise ValueError("X_old is empty: there is no map to place new rows on")
    idx, dist = knn_mod.query(X_old, X_new, k, metric="cosine")
    chord = np.sqrt(2.0 * dist.astype(np.float64))  # Euclidean between unit vectors
    return _weighted_mean(_inverse_distance_weights(chord), Y_old, idx)
