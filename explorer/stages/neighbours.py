"""Nearest neighbours in the embedding space (cosine), for 'look around an image'.

Pure functions on arrays: no files, no state. ``nearest`` is one matrix-vector product done
in row chunks straight from the array it is given (a float16 memory map stays on disk: only
one chunk at a time is converted), so a click on a map of 1,000,000 images answers without an
index and without copying the N x D matrix; pass ``norms`` (from :func:`row_norms`, computed
once per process) to skip recomputing the row norms on every click.
"""

from __future__ import annotations

import numpy as np

from explorer._checks import check_int

__all__ = ["nearest", "row_norms", "cosine_normalize", "CHUNK_BYTES"]

#: float32 bytes converted at a time when working through a (memory-mapped) matrix
CHUNK_BYTES = 8 << 20


def _as_matrix(embeddings) -> np.ndarray:
    X = embeddings if isinstance(embeddings, np.ndarray) else np.asarray(embeddings)
    if X.ndim != 2:
        raise ValueError(f"embeddings must be a 2-D array (n_images, dim), got shape {X.shape}")
    if not np.issubdtype(X.dtype, np.floating):
        X = X.astype(np.float32)
    return X


def _chunks(X: np.ndarray):
    """(start, float32 block) over the rows of ``X``, about :data:`CHUNK_BYTES` at a time."""
    step = max(1, CHUNK_BYTES // max(1, 4 * X.shape[1]))
    for s in range(0, X.shape[0], step):
        yield s, np.asarray(X[s : s + step], dtype=np.float32)


def row_norms(embeddings) -> np.ndarray:
    """Euclidean norm of every row (float64), for reuse across :func:`nearest` calls.

    Works through the rows in chunks: a memory-mapped matrix is never copied whole."""
    X = _as_matrix(embeddings)
    out = np.empty(X.shape[0], dtype=np.float64)
    for s, block in _chunks(X):
        out[s : s + len(block)] = np.sqrt(np.einsum("ij,ij->i", block, block, dtype=np.float64))
    return out


def cosine_normalize(embeddings) -> np.ndarray:
    """Rows scaled to unit length (all-zero rows stay zero), as float32."""
    X = _as_matrix(embeddings).astype(np.float32, copy=True)
    n = np.sqrt(np.einsum("ij,ij->i", X, X, dtype=np.float64))
    n[n == 0] = 1.0
    X /= n[:, None].astype(np.float32)
    return X


def nearest(embeddings, index: int, k: int = 12, *, norms: np.ndarray | None = None):
    """The ``k`` images most similar to image ``index`` (itself excluded).

    Returns ``(indices, distances)``: int64 row indices, nearest first, and their cosine
    distances (``1 - cosine similarity``, in [0, 2]). Ties are broken by the lower index, so
    results are deterministic. Fewer than ``k`` are returned when there are fewer other
    images. A row of zeros (no direction) has distance 1 to everything.
    """
    X = _as_matrix(embeddings)
    n = X.shape[0]
    k = check_int("k", k, 1)
    if isinstance(index, bool) or not isinstance(index, (int, np.integer)):
        raise ValueError(f"index must be an integer, got {index!r}")
    if not 0 <= index < n:
        raise ValueError(f"index {index} is out of range for {n} images")
    if norms is None:
        norms = row_norms(X)
    else:
        norms = np.asarray(norms, dtype=np.float64)
        if norms.shape != (n,):
            raise ValueError(f"norms must have shape ({n},), got {norms.shape}")
    q = np.asarray(X[index], dtype=np.float32)
    dist = np.empty(n, dtype=np.float32)
    for s, block in _chunks(X):
        dist[s : s + len(block)] = block @ q
    # cosine distance = 1 - sim / (|x| |q|); zero rows have no direction: distance 1
    denom = (norms * norms[index]).astype(np.float32)
    zero = denom <= 0
    denom[zero] = 1.0
    dist /= denom
    dist[zero] = 0.0
    np.subtract(1.0, dist, out=dist)
    np.clip(dist, 0.0, 2.0, out=dist)
    del denom, zero
    dist[index] = np.inf
    k = min(int(k), n - 1)
    if k <= 0:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.float64)
    if k < n - 1:
        part = np.argpartition(dist, k - 1)[:k]
        # include every row tied with the k-th so the tie-break below is by index
        kth = dist[part].max()
        part = np.flatnonzero(dist <= kth)
    else:
        part = np.flatnonzero(np.isfinite(dist))
    order = np.lexsort((part, dist[part]))[:k]
    idx = part[order].astype(np.int64)
    return idx, dist[idx].astype(np.float64)
