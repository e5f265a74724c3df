"""The k-nearest-neighbour graph, computed once and shared by every map.

Arrays in, arrays out::

    Xp, info = prepare(X, metric="cosine", pca_dims=64)   # normalise, PCA when D > 64
    g = knn_graph(Xp, 30)                                  # KnnGraph(indices, distances, method)

``prepare`` turns the comparison into plain Euclidean distance: for ``metric="cosine"``
the rows are L2-normalised (Euclidean distance between unit vectors is
``sqrt(2 - 2 cos)``, so the neighbours are the cosine neighbours); high-dimensional rows
are then projected on their first ``pca_dims`` principal components (fitted on a seeded
sample of at most :data:`PCA_FIT_ROWS` rows, projected in chunks, so a million 1280-d
rows never need a second full-size copy).

``knn_graph`` follows umap-learn's convention: column 0 of each row is the point itself
(distance 0), then its ``k - 1`` nearest other points, nearest first. Methods:

``"exact"``
    blocked brute force with numpy (every pair), used up to :data:`EXACT_MAX_POINTS`.
``"hnsw"``
    faiss's approximate graph (a hierarchical navigable small world index: recall well
    above 0.9 on photo vectors), parallel unless seeded. No compiler: pynndescent, used
    before, spent 25 CPU s compiling in every process and 150-190 s in a fresh install.
``"torch"``
    blocked exact top-k with torch on a CUDA device (``device="cuda"``).
``"auto"``
    ``"torch"`` on CUDA, else ``"exact"`` for small N, else ``"hnsw"``.
"""

from __future__ import annotations

import time
from contextlib import nullcontext
from typing import Any, NamedTuple

import numpy as np

from explorer._checks import as_matrix, check_random_state
from explorer._checks import check_int as _check_int

#: the methods :func:`knn_graph` accepts
KNN_METHODS: tuple[str, ...] = ("auto", "exact", "hnsw", "torch")

#: ``"auto"`` uses exact brute force up to this many points (numpy, blocked)
EXACT_MAX_POINTS = 20_000

#: PCA is fitted on a seeded sample of at most this many rows
PCA_FIT_ROWS = 50_000

#: rows per block in chunked work (normalising, projecting, brute-force search)
CHUNK_ROWS = 65_536

#: the HNSW index: links per point (32 links and 80 candidates built 3x slower for +0.04
#: recall on 200,000 clustered rows; bench/knn.py)
HNSW_LINKS = 16
#: candidates kept while inserting a point (faiss's default)
HNSW_BUILD_BREADTH = 40
#: candidates kept while searching, at least twice the neighbours asked for
HNSW_SEARCH_BREADTH = 32

#: metrics :func:`prepare` understands
PREPARE_METRICS: tuple[str, ...] = ("cosine", "euclidean")


class KnnGraph(NamedTuple):
    """A k-nearest-neighbour graph; column 0 is the point itself."""

    indices: np.ndarray
    """``(N, k)`` int32 row numbers, nearest first."""
    distances: np.ndarray
    """``(N, k)`` float32 Euclidean distances in the prepared space."""
    method: str
    """``"exact"``, ``"hnsw"`` or ``"torch"``: what computed it."""


# --------------------------------------------------------------------------- checks




def check_device(device: Any) -> str:
    """``"cpu"``, ``"cuda"``, ``"cuda:N"`` or ``"auto"`` (CUDA when torch sees one), resolved."""
    if not isinstance(device, str) or not (
        device in ("cpu", "cuda", "auto") or (device.startswith("cuda:") and device[5:].isdigit())
    ):
        raise ValueError(f"device must be 'cpu', 'cuda', 'cuda:N' or 'auto'; got {device!r}")
    if device == "cpu":
        return "cpu"
    try:
        import torch

        has_cuda = bool(torch.cuda.is_available())
    except ImportError:  # torch is a dependency, but the map must not need it on CPU
        has_cuda = False
    if device == "auto":
        return "cuda" if has_cuda else "cpu"
    if not has_cuda:
        raise ValueError(f"device={device!r} asked for, but torch sees no CUDA device")
    return device


def check_rows(X: Any, name: str) -> np.ndarray:
    """Like :func:`explorer._checks.as_matrix`, without copying a float array and with
    the NaN check done in blocks (no (N, D) temporary at a million rows)."""
    if not (isinstance(X, np.ndarray) and X.dtype.kind == "f"):
        return as_matrix(X, name, np.float32, nan_hint="; fix or drop them before mapping")
    if X.ndim == 1 and X.size == 0:
        X = X.reshape(0, 0)
    if X.ndim != 2:
        raise ValueError(f"{name} must be a 2-D array of shape (N, D); got shape {X.shape}")
    bad = 0
    for a in range(0, len(X), CHUNK_ROWS):
        bad += int((~np.isfinite(X[a:a + CHUNK_ROWS])).any(axis=1).sum())
    if bad:
        raise ValueError(f"{name} has {bad} row(s) with NaN or infinite values; "
                         "fix or drop them before mapping")
    return X


# --------------------------------------------------------------------------- prepare
def _normalised(block: np.ndarray) -> np.ndarray:
    block = np.asarray(block, dtype=np.float32)
    norms = np.linalg.norm(block, axis=1, keepdims=True)
    return np.divide(block, norms, out=np.zeros_like(block), where=norms > 0)


def prepare(
    X: Any, *, metric: str = "cosine", pca_dims: int | None = 64
) -> tuple[np.ndarray, dict[str, Any]]:
    """``X`` (N, D) as float32 rows in which Euclidean distance is the wanted comparison.

    ``metric="cosine"`` L2-normalises each row (all-zero rows stay zero);
    ``"euclidean"`` leaves them. When ``pca_dims`` is set and D > ``pca_dims``, the rows
    are then projected on their first ``pca_dims`` principal components (fitted on a
    sample of at most :data:`PCA_FIT_ROWS` rows, a fixed seed, so the result does not
    depend on ``random_state``). Returns the (N, min(D, pca_dims)) array and a dict for
    the run record (``metric``, ``pca_dims``, ``pca_explained_variance``, ``seconds``).
    """
    t0 = time.perf_counter()
    if metric not in PREPARE_METRICS:
        raise ValueError(f"metric must be one of {PREPARE_METRICS}; got {metric!r}")
    if pca_dims is not None:
        pca_dims = _check_int("pca_dims", pca_dims, 2)
    X = check_rows(X, "X")
    n, d = X.shape
    info: dict[str, Any] = {"metric": metric, "pca_dims": None, "pca_explained_variance": None}

    def rows(a: int, b: int) -> np.ndarray:
        blk = np.asarray(X[a:b], dtype=np.float32)
        return _normalised(blk) if metric == "cosine" else blk

    if pca_dims is None or d <= pca_dims or n < 3:
        out = np.empty((n, d), dtype=np.float32)
        for a in range(0, n, CHUNK_ROWS):
            out[a:a + CHUNK_ROWS] = rows(a, a + CHUNK_ROWS)
        info["seconds"] = round(time.perf_counter() - t0, 3)
        return out, info

    # PCA fitted on a sample: mean and covariance in float64, eigenvectors by eigh
    rng = np.random.default_rng(0)
    fit = np.arange(n) if n <= PCA_FIT_ROWS else np.sort(rng.choice(n, PCA_FIT_ROWS, replace=False))
    S = np.asarray(X[fit], dtype=np.float32)
    if metric == "cosine":
        S = _normalised(S)
    mean = S.mean(axis=0, dtype=np.float64)
    Sc = (S - mean.astype(np.float32)).astype(np.float64)
    cov = Sc.T @ Sc / max(len(fit) - 1, 1)
    del S, Sc
    vals, vecs = np.linalg.eigh(cov)
    order = np.argsort(vals)[::-1][:pca_dims]
    W = vecs[:, order]
    # deterministic signs: largest |loading| of each component positive
    signs = np.sign(W[np.abs(W).argmax(axis=0), np.arange(W.shape[1])])
    signs[signs == 0] = 1
    W = (W * signs).astype(np.float32)
    mean32 = mean.astype(np.float32)
    total = float(vals.clip(min=0).sum())
    out = np.empty((n, W.shape[1]), dtype=np.float32)
    for a in range(0, n, CHUNK_ROWS):
        out[a:a + CHUNK_ROWS] = (rows(a, a + CHUNK_ROWS) - mean32) @ W
    info["pca_dims"] = int(W.shape[1])
    info["pca_explained_variance"] = (
        round(float(vals[order].clip(min=0).sum()) / total, 4) if total > 0 else None
    )
    info["pca_fit_rows"] = int(len(fit))
    info["seconds"] = round(time.perf_counter() - t0, 3)
    return out, info


# --------------------------------------------------------------------------- search
def _self_first(idx: np.ndarray, dist: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Make column 0 the point itself (distance 0), keeping the others in order.

    Exact ties (duplicate rows) and approximate search can put another point first or
    leave the point out; umap-learn expects it in column 0."""
    n, k = idx.shape
    me = np.arange(n, dtype=idx.dtype)
    bad = np.flatnonzero(idx[:, 0] != me)
    for i in bad.tolist():  # only rows with duplicates or a missed self: few
        row, drow = idx[i], dist[i]
        keep = row != i
        others, dothers = row[keep][: k - 1], drow[keep][: k - 1]
        idx[i, 0], dist[i, 0] = i, 0.0
        idx[i, 1:1 + len(others)] = others
        dist[i, 1:1 + len(others)] = dothers
    dist[:, 0] = 0.0
    return idx, dist


def _exact_numpy(X: np.ndarray, k: int, block: int | None = None,
                 max_bytes: int = 64 * 2**20) -> tuple[np.ndarray, np.ndarray]:
    """Blocked brute force. Temporaries stay within about ``3 * max_bytes``: a block of
    rows against all rows (``block x N`` float32), and the candidates' recomputed
    distances a sub-block at a time (``rows x k x D``), not ``block x k x D`` at once
    (that was 630 MB at 20,000 x 1280)."""
    n, d = X.shape
    if block is None:
        block = int(min(2048, max(64, max_bytes // max(4 * n, 1))))
    sub = int(max(1, max_bytes // max(4 * k * d, 1)))
    sq = np.einsum("ij,ij->i", X, X, dtype=np.float64).astype(np.float32)
    idx = np.empty((n, k), dtype=np.int32)
    dist = np.empty((n, k), dtype=np.float32)
    for a in range(0, n, block):
        b = min(a + block, n)
        d2 = X[a:b] @ X.T
        d2 *= -2.0
        d2 += sq[None, :]
        d2 += sq[a:b, None]
        np.maximum(d2, 0.0, out=d2)
        d2[np.arange(b - a), np.arange(a, b)] = -1.0  # self first, even among duplicates
        part = np.argpartition(d2, k - 1, axis=1)[:, :k]
        del d2
        # the k candidates' distances again, directly (the expansion above loses
        # precision for near-duplicates), then nearest first, self first among ties
        pd = np.empty(part.shape, np.float32)
        for c in range(0, b - a, sub):
            e = min(c + sub, b - a)
            pd[c:e] = np.linalg.norm(X[a + c:a + e, None, :] - X[part[c:e]], axis=2)
        pd[part == np.arange(a, b)[:, None]] = -1.0
        order = np.argsort(pd, axis=1, kind="stable")
        idx[a:b] = np.take_along_axis(part, order, axis=1)
        dist[a:b] = np.maximum(np.take_along_axis(pd, order, axis=1), 0.0)
    return idx, dist


def _exact_torch(X: np.ndarray, k: int, device: str, block: int = 8192):
    """Exact top-k on a CUDA device: blocked ``||a||^2 + ||b||^2 - 2ab`` in float32."""
    import torch

    dev = torch.device(device)
    n = len(X)
    Xt = torch.from_numpy(np.ascontiguousarray(X)).to(dev)
    sq = (Xt * Xt).sum(dim=1)
    idx = np.empty((n, k), dtype=np.int32)
    dist = np.empty((n, k), dtype=np.float32)
    with torch.inference_mode():
        for a in range(0, n, block):
            b = min(a + block, n)
            d2 = sq[a:b, None] + sq[None, :] - 2.0 * (Xt[a:b] @ Xt.T)
            d2.clamp_(min=0.0)
            d2[torch.arange(b - a, device=dev), torch.arange(a, b, device=dev)] = -1.0
            vals, ids = torch.topk(d2, k, dim=1, largest=False, sorted=True)
            idx[a:b] = ids.to(torch.int32).cpu().numpy()
            dist[a:b] = vals.clamp(min=0.0).sqrt().cpu().numpy()
    return idx, dist


def _seeded_threads(random_state: int | None):
    """One thread while a seeded index is built and searched (an HNSW index built by
    several threads may depend on their timing), every core otherwise: threadpoolctl's
    limit, as the project's other one-thread blocks take it. faiss is imported first, so its
    OpenMP pool is among those limited; OpenMP's thread count belongs to the calling thread,
    so the app's other threads keep theirs."""
    import faiss  # noqa: F401

    if random_state is None:
        return nullcontext()
    from threadpoolctl import threadpool_limits

    return threadpool_limits(1)


def _hnsw_index(X: np.ndarray):
    import faiss

    index = faiss.IndexHNSWFlat(X.shape[1], HNSW_LINKS)
    index.hnsw.efConstruction = HNSW_BUILD_BREADTH
    index.add(X)
    return index


def _hnsw_search(index: Any, Q: np.ndarray, k: int, block: int = CHUNK_ROWS):
    """The ``k`` nearest indexed rows of each row of ``Q`` (Euclidean), in blocks."""
    index.hnsw.efSearch = max(HNSW_SEARCH_BREADTH, 2 * k)
    idx = np.empty((len(Q), k), np.int32)
    dist = np.empty((len(Q), k), np.float32)
    for a in range(0, len(Q), block):
        d2, i = index.search(np.ascontiguousarray(Q[a:a + block]), k)
        idx[a:a + block] = i
        dist[a:a + block] = np.sqrt(np.maximum(d2, 0.0))
    return idx, dist


def _hnsw(X: np.ndarray, k: int, random_state: int | None):
    with _seeded_threads(random_state):
        return _hnsw_search(_hnsw_index(X), X, k)


def resolve_knn_method(method: str, n: int, device: str) -> str:
    """The method ``"auto"`` stands for at ``n`` points on ``device``."""
    if method not in KNN_METHODS:
        raise ValueError(f"knn_method must be one of {KNN_METHODS}; got {method!r}")
    if method != "auto":
        return method
    if device.startswith("cuda"):
        return "torch"
    return "exact" if n <= EXACT_MAX_POINTS else "hnsw"


def knn_graph(
    X: Any,
    k: int,
    *,
    method: str = "auto",
    device: str = "cpu",
    random_state: int | None = None,
) -> KnnGraph:
    """The ``k``-nearest-neighbour graph of the rows of ``X`` by Euclidean distance.

    Column 0 is each point itself, so ``k`` counts it (umap-learn's ``n_neighbors``
    convention); ``k`` is clamped to N. Pass rows from :func:`prepare` for cosine
    neighbours. ``random_state=None`` lets faiss use every core; an int makes it
    single-threaded and reproducible (the exact methods are deterministic anyway).
    Raises ``ValueError`` naming a bad ``k``, ``method``, ``device`` or ``random_state``.
    """
    k = _check_int("k", k, 1)
    device = check_device(device)
    random_state = check_random_state(random_state)
    method = resolve_knn_method(method, 0 if not hasattr(X, "__len__") else len(X), device)
    X = as_matrix(X, "X", np.float32, nan_hint="; fix or drop them before the neighbour search")
    n = len(X)
    k = min(k, n)
    if n == 0:
        return KnnGraph(np.zeros((0, k), np.int32), np.zeros((0, k), np.float32), method)
    X = np.ascontiguousarray(X, dtype=np.float32)
    if method == "torch":
        if not device.startswith("cuda"):
            raise ValueError("knn_method='torch' needs device='cuda'")
        idx, dist = _exact_torch(X, k, device)
    elif method == "hnsw" and n > k + 1:
        idx, dist = _hnsw(X, k, random_state)
    else:
        method = "exact"
        idx, dist = _exact_numpy(X, k)
    idx, dist = _self_first(idx, dist)
    return KnnGraph(idx, dist, method)


def graph_and_nearest(
    X: Any,
    k: int,
    Q: Any,
    q_k: int,
    *,
    method: str = "auto",
    device: str = "cpu",
    random_state: int | None = None,
    block: int = CHUNK_ROWS,
) -> tuple[KnnGraph, np.ndarray, np.ndarray]:
    """:func:`knn_graph` of ``X`` and, for each row of ``Q``, its ``q_k`` nearest rows of
    ``X`` (Euclidean), from one search structure: with ``"hnsw"`` the index built for
    the graph answers the queries (in blocks of ``block`` rows, so a million queries need
    no (M, N) matrix); otherwise an exact blocked search.

    Returns ``(graph, indices (M, q_k) int32, distances (M, q_k) float32)``, nearest first.
    """
    k = _check_int("k", k, 1)
    q_k = _check_int("q_k", q_k, 1)
    device = check_device(device)
    random_state = check_random_state(random_state)
    X = as_matrix(X, "X", np.float32, nan_hint="; fix or drop them before the neighbour search")
    Q = as_matrix(Q, "Q", np.float32, nan_hint="; fix or drop them before the neighbour search")
    method = resolve_knn_method(method, len(X), device)
    if len(X) and len(Q) and Q.shape[1] != X.shape[1]:
        raise ValueError(f"Q must have {X.shape[1]} columns like X; got shape {Q.shape}")
    q_k = min(q_k, len(X))
    if method != "hnsw" or len(X) <= k + 1 or len(Q) == 0:
        g = knn_graph(X, k, method=method, device=device, random_state=random_state)
        qi, qd = query(X, Q, q_k, metric="euclidean")
        return g, qi.astype(np.int32), qd
    X = np.ascontiguousarray(X, dtype=np.float32)
    kk = min(k, len(X))
    with _seeded_threads(random_state):
        index = _hnsw_index(X)
        idx, dist = _self_first(*_hnsw_search(index, X, kk, block))
        qi, qd = _hnsw_search(index, Q, q_k, block)
    return KnnGraph(idx, dist, "hnsw"), qi, qd


def query(X_ref: Any, X_new: Any, k: int, *, metric: str = "cosine",
          block: int = CHUNK_ROWS) -> tuple[np.ndarray, np.ndarray]:
    """Exact ``k`` nearest rows of ``X_ref`` for each row of ``X_new``.

    Distances are cosine distances (``1 - cos``, 1 for an all-zero row) for
    ``metric="cosine"``, Euclidean for ``"euclidean"``; the final ``k`` are recomputed in
    float64, so a near-copy is told apart from close neighbours. ``X_ref`` is read in blocks (a memory-mapped store works), so the
    cost is one pass over it; meant for a few new rows against many old ones.
    Returns ``(indices (M, k) int64, distances (M, k) float32)``, nearest first.
    """
    if metric not in PREPARE_METRICS:
        raise ValueError(f"metric must be one of {PREPARE_METRICS}; got {metric!r}")
    k = _check_int("k", k, 1)
    Q = as_matrix(X_new, "X_new", np.float32)
    R = X_ref if isinstance(X_ref, np.ndarray) else np.asarray(X_ref, dtype=np.float32)
    if R.ndim != 2 or (len(Q) and R.shape[1] != Q.shape[1]):
        raise ValueError(
            f"X_ref must be a 2-D array with as many columns as X_new ({Q.shape[1]}); "
            f"got shape {R.shape}"
        )
    n, m = len(R), len(Q)
    k = min(k, n)
    if m == 0 or k == 0:
        return np.zeros((m, k), np.int64), np.zeros((m, k), np.float32)
    if metric == "cosine":
        Q = _normalised(Q)
    else:
        q_sq = np.einsum("ij,ij->i", Q, Q)
    best_i = np.zeros((m, 0), np.int64)
    best_d = np.zeros((m, 0), np.float32)
    for a in range(0, n, block):
        blk = np.asarray(R[a:a + block], dtype=np.float32)
        if not np.isfinite(blk).all():
            raise ValueError("X_ref has rows with NaN or infinite values")
        if metric == "cosine":
            d = 1.0 - Q @ _normalised(blk).T
        else:
            d2 = q_sq[:, None] + np.einsum("ij,ij->i", blk, blk)[None, :] - 2.0 * (Q @ blk.T)
            d = np.sqrt(np.maximum(d2, 0.0))
        d = np.maximum(d, 0.0).astype(np.float32)
        cand_i = np.concatenate([best_i, np.arange(a, a + len(blk))[None, :].repeat(m, 0)], axis=1)
        cand_d = np.concatenate([best_d, d], axis=1)
        kk = min(k, cand_d.shape[1])
        part = np.argpartition(cand_d, kk - 1, axis=1)[:, :kk]
        best_i = np.take_along_axis(cand_i, part, axis=1)
        best_d = np.take_along_axis(cand_d, part, axis=1)
    # the chosen rows' distances again, directly and in float64: the blocked products
    # above lose the small differences that tell a near-copy from its close neighbours
    flat = best_i.ravel()
    uniq, inv = np.unique(flat, return_inverse=True)
    Rk = np.asarray(R[uniq], dtype=np.float64)[inv].reshape(m, k, -1)
    Q64 = np.asarray(Q, dtype=np.float64)
    if metric == "cosine":
        Q64 = Q64 / np.maximum(np.linalg.norm(Q64, axis=1, keepdims=True), 1e-300)
        norms = np.linalg.norm(Rk, axis=2, keepdims=True)
        Rk = np.divide(Rk, norms, out=np.zeros_like(Rk), where=norms > 0)
        chord = np.linalg.norm(Q64[:, None, :] - Rk, axis=2)
        exact = np.where(norms[..., 0] > 0, chord**2 / 2.0, 1.0)
    else:
        exact = np.linalg.norm(Q64[:, None, :] - Rk, axis=2)
    order = np.argsort(exact, axis=1, kind="stable")
    return (np.take_along_axis(best_i, order, axis=1),
            np.take_along_axis(exact, order, axis=1).astype(np.float32))
