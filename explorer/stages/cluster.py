"""Cluster points (usually the UMAP clustering space): HDBSCAN, KMeans, agglomerative,
DBSCAN, Gaussian mixtures, or "auto" (try each over a small grid, keep the best).

One entry point, arrays in, a :class:`ClusterResult` out::

    res = cluster(Z, "hdbscan")               # the default
    res = cluster(Z, "kmeans", k=10)          # or without k: elbow of inertia over k
    res = cluster(Z, "auto")                  # every method, scored, best by combined rank
    res.labels, res.probabilities, res.outlier_scores, res.scores, res.notes

Every method fills the same three per-point arrays:

``labels``
    int, ``-1`` = noise / outlier (only HDBSCAN with ``assign_noise=False`` and DBSCAN
    produce noise).
``probabilities``
    membership strength in [0, 1]; noise points have 0.
``outlier_scores``
    in [0, 1], higher = stranger.

How each method defines them (all documented in the method's ``_fit_*`` function):

============= ======================================== ==========================================
method        probability                              outlier score
============= ======================================== ==========================================
hdbscan       HDBSCAN membership strength; for noise   GLOSH (``outlier_scores_``)
              points assigned to a cluster, the vote
              share of their 10 nearest clustered
              points times those points' mean
              membership
kmeans        ``1 - d1/d2`` (d1, d2: distances to the  kNN sparsity, GLOSH-like:
              nearest and second nearest centroid;     ``1 - min(1, m_c / r)``, r = distance
              0 = on a boundary, 1 = at a centroid)    to the 10th nearest neighbour, m_c =
                                                       median r in the cluster (0 for the
                                                       denser half, 0.5 at twice the typical
                                                       spacing, -> 1 far away)
agglomerative same as kmeans, with cluster means        same as kmeans
gmm           posterior probability of the component   same as kmeans
dbscan        1 for core points, ``1 - d/eps`` for     ``1 - min(1, eps / d_k)``, d_k =
              border points (d = distance to nearest   distance to the ``min_samples``-th
              core point), 0 for noise                 neighbour (0 for every core point)
============= ======================================== ==========================================

Scores (``res.scores``): silhouette (higher is better), Calinski-Harabasz (higher) and
Davies-Bouldin (lower), computed on the non-noise points when there are at least two
clusters (else ``None``), plus ``n_clusters`` and ``noise_fraction``. Silhouette uses a
seeded sample of at most :data:`SCORE_SAMPLE` points.

Small or degenerate input never crashes: 0 points give empty arrays; 1-2 points or
all-identical points give one cluster (label 0) with a note; parameters larger than the
data allows (``k > N``, ``min_cluster_size > N``) are clamped with a note.

``hdbscan`` and scikit-learn estimators are imported inside the functions that use them.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from explorer._checks import as_matrix
from explorer._checks import check_int
from explorer._checks import check_random_state as _check_random_state

#: the methods :func:`cluster` accepts
METHODS: tuple[str, ...] = ("hdbscan", "kmeans", "agglomerative", "dbscan", "gmm", "auto")

#: silhouette is O(N^2): computed on a seeded sample of at most this many points
SCORE_SAMPLE = 5000

#: methods whose fitting is O(N^2) in memory or slow (agglomerative, gmm/kmeans grids,
#: auto) fit on a seeded sample of at most this many points; the rest are assigned to the
#: nearest cluster (noted in ``notes``)
MAX_FIT_POINTS = 10_000

#: the largest ``k_max`` a search over k may use: each k is a full fit, and a grid over
#: k=1..1000 would hold a build (or the service's only worker) for hours
K_MAX_LIMIT = 100

#: below this many points there is nothing to cluster: one cluster, with a note
MIN_POINTS = 3

#: the parameters each method accepts (besides ``random_state``)
PARAMS: dict[str, dict[str, Any]] = {
    "hdbscan": {
        "min_cluster_size": "auto",
        "min_samples": None,
        "cluster_selection_method": "leaf",
        "cluster_selection_epsilon": 0.0,
        "assign_noise": True,
        "backend": "auto",
    },
    "kmeans": {"k": None, "k_max": 20},
    "agglomerative": {"k": None, "k_max": 20, "linkage": "ward"},
    "dbscan": {"eps": None, "min_samples": 10, "eps_quantile": 0.9},
    "gmm": {"k": None, "k_max": 20, "covariance_type": "full"},
    "auto": {"k_max": 20, "max_noise": 0.1, "methods": None},
}

_LINKAGES = ("ward", "average", "complete", "single")

#: HDBSCAN implementations: ``hdbscan`` (the reference), ``fast_hdbscan`` (numba,
#: parallel, scales to millions of points; compiles for a while on first use in a
#: process), ``cuml`` (RAPIDS, on a CUDA GPU; optional, never required), ``auto`` =
#: cuml from :data:`FAST_HDBSCAN_FROM` points where it is importable and torch sees a
#: GPU, else fast_hdbscan from that many points, else hdbscan
HDBSCAN_BACKENDS = ("auto", "hdbscan", "fast_hdbscan", "cuml")

#: ``backend="auto"`` switches to fast_hdbscan at this many points
FAST_HDBSCAN_FROM = 50_000

#: ``min_samples=None`` means ``min(min_cluster_size, MAX_AUTO_MIN_SAMPLES)``: HDBSCAN's
#: own default (= min_cluster_size = N/50) would ask for 20,000-neighbour core
#: distances at 1M points. Below 5,000 points nothing changes.
MAX_AUTO_MIN_SAMPLES = 100
_COVARIANCES = ("full", "tied", "diag", "spherical")


# =========================================================================== result
@dataclass
class ClusterResult:
    """Labels and per-point scores of one clustering, with what made them.

    ``candidates`` (``auto`` only) lists every tried ``{method, params, scores,
    n_clusters, noise_fraction, eligible, rank}``; ``elbow`` (``kmeans`` without ``k``)
    is ``{"k": [...], "inertia": [...], "chosen_k": k}`` for :func:`elbow_plot`.
    """

    labels: np.ndarray
    probabilities: np.ndarray
    outlier_scores: np.ndarray
    method: str
    params: dict[str, Any] = field(default_factory=dict)
    scores: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    candidates: list[dict[str, Any]] = field(default_factory=list)
    elbow: dict[str, Any] | None = None
    requested: str = ""

    @property
    def n_clusters(self) -> int:
        return int(len(set(self.labels.tolist()) - {-1}))

    @property
    def noise_fraction(self) -> float:
        n = len(self.labels)
        return float((self.labels == -1).sum() / n) if n else 0.0

    def to_dict(self) -> dict[str, Any]:
        """Everything but the per-point arrays, JSON-ready (for the run record)."""
        return {
            "method": self.method,
            "requested": self.requested or self.method,
            "params": self.params,
            "n_clusters": self.n_clusters,
            "noise_fraction": self.noise_fraction,
            "scores": self.scores,
            "notes": list(self.notes),
            "candidates": self.candidates,
            "elbow": self.elbow,
        }


# =========================================================================== validation
def _check_Z(Z: Any) -> np.ndarray:
    return as_matrix(Z, "Z", np.float64, cols="d")


def _float_param(name: str, value: Any, lo: float, hi: float, *, lo_open=False) -> float:
    ok = (
        not isinstance(value, bool)
        and isinstance(value, numbers.Real)
        and math.isfinite(value)
        and (value > lo if lo_open else value >= lo)
        and value <= hi
    )
    if not ok:
        left = "(" if lo_open else "["
        raise ValueError(f"{name} must be a number in {left}{lo}, {hi}]; got {value!r}")
    return float(value)


def _choice(name: str, value: Any, choices: Sequence[str]) -> str:
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}; got {value!r}")
    return value




def check_k_max(value: Any) -> int:
    """``k_max`` as an int in 2..:data:`K_MAX_LIMIT`; ValueError naming the value otherwise
    (the one check, for builds and the service's build requests alike)."""
    return check_int("k_max", value, 2, maximum=K_MAX_LIMIT)


def _merge_params(method: str, params: dict[str, Any]) -> dict[str, Any]:
    allowed = PARAMS[method]
    unknown = sorted(set(params) - set(allowed))
    if unknown:
        raise ValueError(
            f"unknown parameter(s) {', '.join(unknown)} for method {method!r}; "
            f"it accepts {', '.join(allowed)}"
        )
    return {**allowed, **params}


def _validate(method: str, p: dict[str, Any]) -> dict[str, Any]:
    """Check every parameter of ``method``; ValueError names the bad one."""
    if method in ("kmeans", "agglomerative", "gmm"):
        p["k"] = check_int("k", p["k"], 1, allow_none=True)
        p["k_max"] = check_k_max(p["k_max"])
    if method == "agglomerative":
        _choice("linkage", p["linkage"], _LINKAGES)
    if method == "gmm":
        _choice("covariance_type", p["covariance_type"], _COVARIANCES)
    if method == "hdbscan":
        mcs = p["min_cluster_size"]
        if mcs != "auto":
            if isinstance(mcs, numbers.Real) and not isinstance(mcs, (bool, numbers.Integral)):
                _float_param("min_cluster_size (as a fraction of N)", mcs, 0.0, 1.0, lo_open=True)
            else:
                check_int("min_cluster_size", mcs, 2)
        p["min_samples"] = check_int("min_samples", p["min_samples"], 1, allow_none=True)
        _choice("cluster_selection_method", p["cluster_selection_method"], ("eom", "leaf"))
        p["cluster_selection_epsilon"] = _float_param(
            "cluster_selection_epsilon", p["cluster_selection_epsilon"], 0.0, math.inf
        )
        if not isinstance(p["assign_noise"], bool):
            raise ValueError(f"assign_noise must be True or False; got {p['assign_noise']!r}")
        _choice("backend", p["backend"], HDBSCAN_BACKENDS)
    if method == "dbscan":
        if p["eps"] is not None:
            p["eps"] = _float_param("eps", p["eps"], 0.0, math.inf, lo_open=True)
        p["min_samples"] = check_int("min_samples", p["min_samples"], 1)
        p["eps_quantile"] = _float_param("eps_quantile", p["eps_quantile"], 0.0, 1.0, lo_open=True)
    if method == "auto":
        p["k_max"] = check_k_max(p["k_max"])
        p["max_noise"] = _float_param("max_noise", p["max_noise"], 0.0, 1.0)
        if p["methods"] is not None:
            ms = list(p["methods"]) if not isinstance(p["methods"], str) else [p["methods"]]
            for m in ms:
                _choice("methods entry", m, [x for x in METHODS if x != "auto"])
            if not ms:
                raise ValueError("methods must name at least one method; got an empty list")
            p["methods"] = ms
    return p


# =========================================================================== helpers
def _sample(n: int, size: int, random_state: int | None) -> np.ndarray:
    """Sorted indices of a seeded sample of ``size`` of ``range(n)`` (all if n <= size)."""
    if n <= size:
        return np.arange(n)
    rng = np.random.default_rng(random_state)
    return np.sort(rng.choice(n, size=size, replace=False))


def _n_distinct(Z: np.ndarray, cap: int) -> int:
    """Number of distinct rows, counted up to ``cap`` (cheap for large Z)."""
    head = Z[: max(cap * 50, 1000)]
    found = len(np.unique(head, axis=0)) if len(head) else 0
    if found < cap and len(head) < len(Z):
        found = len(np.unique(Z, axis=0))
    return min(found, cap)


#: neighbours used for the kNN outlier score of centroid-type methods
OUTLIER_K = 10


def _knn_outlier_scores(Z: np.ndarray, labels: np.ndarray, k: int = OUTLIER_K) -> np.ndarray:
    """GLOSH-like outlier score from local sparsity: ``1 - min(1, m_c / r)`` where ``r``
    is the distance to the point's ``k``-th nearest neighbour and ``m_c`` the median ``r``
    in its cluster (all points' median for clusters smaller than ``k + 1``, so a far
    point alone in its own cluster still stands out). 0 for the denser half of a
    cluster, 0.5 at twice the typical spacing, -> 1 far away."""
    from sklearn.neighbors import NearestNeighbors

    n = len(Z)
    k = min(k, n - 1)
    if k < 1:
        return np.zeros(n)
    r = NearestNeighbors(n_neighbors=k + 1).fit(Z).kneighbors(Z)[0][:, -1]
    ref = np.full(n, float(np.median(r)))
    keep = labels >= 0
    if keep.any():
        ids, inv, counts = np.unique(labels[keep], return_inverse=True, return_counts=True)
        med = _group_medians(r[keep], inv, len(ids))
        big = counts[inv] > k  # clusters of more than k points use their own median
        ref_keep = ref[keep]
        ref_keep[big] = med[inv][big]
        ref[keep] = ref_keep
    with np.errstate(divide="ignore", invalid="ignore"):
        out = np.where(r > ref, 1.0 - ref / r, 0.0)
    return np.clip(np.nan_to_num(out), 0.0, 1.0)


def _centroid_scores(Z: np.ndarray, labels: np.ndarray, centers: np.ndarray):
    """Probabilities (1 - d1/d2) and outlier scores from distances to cluster centres."""
    from sklearn.metrics import pairwise_distances

    D = pairwise_distances(Z, centers)
    own = D[np.arange(len(Z)), labels]
    if centers.shape[0] > 1:
        other = D.copy()
        other[np.arange(len(Z)), labels] = np.inf
        second = other.min(axis=1)
        with np.errstate(divide="ignore", invalid="ignore"):
            prob = np.where(second > 0, 1.0 - own / second, 1.0)
    else:
        prob = np.ones(len(Z))
    return np.clip(np.nan_to_num(prob, nan=1.0), 0.0, 1.0), _knn_outlier_scores(Z, labels)


def _relabel_by_size(labels: np.ndarray) -> np.ndarray:
    """Renumber clusters 0, 1, ... by decreasing size (ties by first appearance); -1 kept."""
    labels = np.asarray(labels)
    out = np.full(len(labels), -1, dtype=np.int64)
    keep = labels >= 0
    if not keep.any():
        return out
    ids, first, inverse, counts = np.unique(
        labels[keep], return_index=True, return_inverse=True, return_counts=True
    )
    order = np.lexsort((first, -counts))  # by size, then by first appearance
    new_of = np.empty(len(ids), dtype=np.int64)
    new_of[order] = np.arange(len(ids))
    out[keep] = new_of[inverse]
    return out


def _group_medians(values: np.ndarray, groups: np.ndarray, n_groups: int) -> np.ndarray:
    """Median of ``values`` per group ``0..n_groups-1`` (NaN for empty groups), by one sort."""
    order = np.lexsort((values, groups))
    g, v = groups[order], values[order]
    counts = np.bincount(g, minlength=n_groups)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    out = np.full(n_groups, np.nan)
    has = counts > 0
    lo = starts[has] + (counts[has] - 1) // 2
    hi = starts[has] + counts[has] // 2
    out[has] = (v[lo] + v[hi]) / 2.0
    return out


def _cluster_means(Z: np.ndarray, labels: np.ndarray, n_clusters: int) -> np.ndarray:
    """Mean of the rows of each cluster ``0..n_clusters-1`` (labels >= 0), one pass."""
    counts = np.bincount(labels, minlength=n_clusters).astype(float)
    sums = np.stack([np.bincount(labels, weights=Z[:, j], minlength=n_clusters)
                     for j in range(Z.shape[1])], axis=1)
    return sums / np.maximum(counts, 1)[:, None]


def vote(neigh_labels: np.ndarray, neigh_probs: np.ndarray | None = None,
         chunk: int = 65_536) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Majority label of each row of ``neigh_labels`` (M, k), vectorised.

    Returns ``(winner (M,), share (M,), mean_prob (M,))``: the most frequent label (ties:
    the smallest label, like ``np.unique`` + ``argmax``), its vote share ``count / k``,
    and the mean of ``neigh_probs`` over the neighbours that voted for it (1 without
    ``neigh_probs``). Counted with ``np.unique(return_inverse)`` and ``np.bincount``, in
    chunks of rows, instead of one ``np.unique`` per row (review L10)."""
    m, k = neigh_labels.shape
    winner = np.empty(m, dtype=np.int64)
    share = np.empty(m)
    mean_p = np.ones(m)
    for a in range(0, m, chunk):
        lab = neigh_labels[a:a + chunk]
        rows = len(lab)
        vals, inv = np.unique(lab, return_inverse=True)
        inv = inv.reshape(lab.shape)
        c = len(vals)
        flat = (np.arange(rows)[:, None] * c + inv).ravel()
        counts = np.bincount(flat, minlength=rows * c).reshape(rows, c)
        best = counts.argmax(axis=1)
        top = counts[np.arange(rows), best]
        winner[a:a + rows] = vals[best]
        share[a:a + rows] = top / k
        if neigh_probs is not None:
            sums = np.bincount(flat, weights=neigh_probs[a:a + chunk].ravel(),
                               minlength=rows * c).reshape(rows, c)
            mean_p[a:a + rows] = sums[np.arange(rows), best] / top
    return winner, share, mean_p


def _knee(ks: Sequence[int], values: Sequence[float]) -> int:
    """Elbow of a decreasing curve: the k farthest below the chord from first to last
    point, after scaling both axes to [0, 1] (the "kneedle" idea)."""
    x = np.asarray(ks, dtype=float)
    y = np.asarray(values, dtype=float)
    if len(x) < 3 or y[0] == y[-1]:
        return int(x[min(1, len(x) - 1)])
    xn = (x - x[0]) / (x[-1] - x[0])
    yn = (y - y[-1]) / (y[0] - y[-1])
    gap = (1.0 - xn) - yn  # chord from (0, 1) to (1, 0) minus the curve
    return int(x[int(np.argmax(gap))])


def cluster_scores(
    Z: np.ndarray, labels: np.ndarray, *, random_state: int | None = 42
) -> dict[str, Any]:
    """Silhouette (max), Calinski-Harabasz (max), Davies-Bouldin (min) of ``labels``.

    Computed on non-noise points; ``None`` when fewer than two clusters or when every
    point is its own cluster. Also ``n_clusters`` and ``noise_fraction``.
    """
    from sklearn.metrics import (
        calinski_harabasz_score,
        davies_bouldin_score,
        silhouette_score,
    )

    Z = np.asarray(Z, dtype=np.float64)
    labels = np.asarray(labels)
    n = len(labels)
    keep = labels >= 0
    k = len(np.unique(labels[keep]))
    out: dict[str, Any] = {
        "silhouette": None,
        "calinski_harabasz": None,
        "davies_bouldin": None,
        "n_clusters": int(k),
        "noise_fraction": float((~keep).sum() / n) if n else 0.0,
    }
    m = int(keep.sum())
    if k < 2 or k >= m:
        return out
    Zk, lk = Z[keep], labels[keep]
    idx = _sample(m, SCORE_SAMPLE, random_state)
    if len(np.unique(lk[idx])) >= 2 and len(np.unique(lk[idx])) < len(idx):
        out["silhouette"] = float(silhouette_score(Zk[idx], lk[idx]))
    out["calinski_harabasz"] = float(calinski_harabasz_score(Zk, lk))
    out["davies_bouldin"] = float(davies_bouldin_score(Zk, lk))
    for key in ("silhouette", "calinski_harabasz", "davies_bouldin"):
        if out[key] is not None and not math.isfinite(out[key]):
            out[key] = None
    return out


# =========================================================================== methods
def auto_min_cluster_size(n: int) -> int:
    """Default HDBSCAN ``min_cluster_size`` for N points: N/50 (so at most ~50 clusters),
    at least 5, at most N/2 (tiny inputs still get clusters)."""
    return int(max(2, min(max(5, round(n / 50)), n // 2)))


def _assign_noise_knn(Z: np.ndarray, labels: np.ndarray, probs: np.ndarray, k: int = 10):
    """Give each noise point the majority cluster of its ``k`` nearest clustered points;
    its probability becomes the winning vote share times the neighbours' mean probability."""
    from sklearn.neighbors import NearestNeighbors

    noise = labels < 0
    clustered = ~noise
    if not noise.any() or not clustered.any():
        return labels, probs
    k = min(k, int(clustered.sum()))
    nn = NearestNeighbors(n_neighbors=k).fit(Z[clustered])
    _, idx = nn.kneighbors(Z[noise])
    lab_c = labels[clustered][idx]
    prob_c = probs[clustered][idx]
    labels = labels.copy()
    probs = probs.copy()
    winner, share, mean_p = vote(lab_c, prob_c)
    labels[noise] = winner
    probs[noise] = share * mean_p
    return labels, probs


def assign_new(Z_old: Any, labels_old: Any, Z_new: Any, *, k: int = 10
               ) -> tuple[np.ndarray, np.ndarray]:
    """Clusters for new rows ``Z_new`` in an existing clustering of ``Z_old`` (N, d),
    without re-clustering: each new row takes the majority cluster of its ``k`` nearest
    clustered old rows (Euclidean in the clusterable space; old noise points do not
    vote). Its probability is the winning vote share. When no old row is clustered,
    every new row is noise (-1, probability 0).

    Returns ``(labels (M,) int64, probabilities (M,) float)``. Raises ``ValueError`` for
    mismatched shapes, NaN/inf or ``k < 1``.
    """
    from sklearn.neighbors import NearestNeighbors

    k = check_int("k", k, 1)
    Z_old = as_matrix(Z_old, "Z_old", np.float64, cols="d")
    Z_new = as_matrix(Z_new, "Z_new", np.float64, cols="d")
    labels_old = np.asarray(labels_old)
    if labels_old.ndim != 1 or len(labels_old) != len(Z_old) or labels_old.dtype.kind not in "iu":
        raise ValueError(
            f"labels_old must be {len(Z_old)} integer labels, one per row of Z_old; "
            f"got shape {labels_old.shape} of {labels_old.dtype}"
        )
    m = len(Z_new)
    if m and Z_new.shape[1] != Z_old.shape[1]:
        raise ValueError(f"Z_new has {Z_new.shape[1]} columns but Z_old has {Z_old.shape[1]}")
    clustered = labels_old >= 0
    if m == 0 or not clustered.any():
        return np.full(m, -1, dtype=np.int64), np.zeros(m)
    k = min(k, int(clustered.sum()))
    idx = NearestNeighbors(n_neighbors=k).fit(Z_old[clustered]).kneighbors(
        Z_new, return_distance=False)
    winner, share, _ = vote(labels_old[clustered][idx].astype(np.int64))
    return winner, share


def _fit_hdbscan(Z: np.ndarray, p: dict[str, Any], random_state, notes: list[str]):
    """HDBSCAN (``hdbscan`` or ``fast_hdbscan``) on ``Z``.

    Defaults (measured with ``bench/quality.py`` on the clothing photos, 5-D UMAP space):
    ``cluster_selection_method="leaf"`` and ``min_cluster_size="auto"`` = N/50
    (:func:`auto_min_cluster_size`). "eom" there merged the photos into 2-4 giant
    clusters (NMI 0.31); "leaf" finds ~10 clusters but calls ~40% of the points noise.
    So ``assign_noise=True`` (default) then gives every noise point the majority cluster
    of its 10 nearest clustered points (in ``Z``). Such a point keeps its GLOSH outlier
    score, and its probability becomes the neighbours' vote share times their mean
    membership, so it stays visibly less certain than HDBSCAN's own members; the note
    says how many points were assigned. ``assign_noise=False`` keeps HDBSCAN's noise as
    ``-1`` with probability 0. A float ``min_cluster_size`` in (0, 1) is a fraction of N.

    ``min_samples=None`` is ``min(min_cluster_size, MAX_AUTO_MIN_SAMPLES)``.
    ``backend``: ``"hdbscan"`` or ``"fast_hdbscan"`` (same algorithm; on the test blobs
    and clothing features the labels agree, see ``bench/reduce.py --quality``);
    ``"auto"`` uses fast_hdbscan from :data:`FAST_HDBSCAN_FROM` points, where hdbscan
    gets slow, and hdbscan below (fast_hdbscan's first call in a process compiles).
    """
    n = len(Z)
    mcs = p["min_cluster_size"]
    if mcs == "auto":
        mcs = auto_min_cluster_size(n)
    elif isinstance(mcs, float):
        mcs = max(2, int(round(mcs * n)))
    if mcs > n:
        notes.append(f"min_cluster_size={mcs} clamped to {n} (only {n} points)")
        mcs = n
    ms = p["min_samples"]
    if ms is None:
        ms = min(int(mcs), MAX_AUTO_MIN_SAMPLES, n - 1)
    elif ms > n - 1:
        notes.append(f"min_samples={ms} clamped to {n - 1}")
        ms = n - 1
    backend = p["backend"]
    if backend == "auto":
        backend = "hdbscan"
        if n >= FAST_HDBSCAN_FROM:
            backend = "cuml" if _cuml_hdbscan_available() else "fast_hdbscan"
    used = {**p, "min_cluster_size": int(mcs), "min_samples": int(ms), "backend": backend}
    if backend == "fast_hdbscan":
        labels, probs, outl = _fast_hdbscan(Z, int(mcs), int(ms), p)
    elif backend == "cuml":
        labels, probs, outl = _cuml_hdbscan(Z, int(mcs), int(ms), p)
    else:
        import hdbscan

        clusterer = hdbscan.HDBSCAN(
            min_cluster_size=int(mcs),
            min_samples=int(ms),
            cluster_selection_method=p["cluster_selection_method"],
            cluster_selection_epsilon=p["cluster_selection_epsilon"],
            core_dist_n_jobs=1,
        )
        clusterer.fit(Z)
        labels = np.asarray(clusterer.labels_, dtype=np.int64)
        probs = np.nan_to_num(np.asarray(clusterer.probabilities_, dtype=float))
        outl = np.clip(np.nan_to_num(np.asarray(clusterer.outlier_scores_, dtype=float)), 0, 1)
    n_noise = int((labels < 0).sum())
    if labels.max(initial=-1) < 0:
        notes.append("HDBSCAN found no clusters; every point is noise")
    elif p["assign_noise"] and n_noise:
        notes.append(
            f"{n_noise} HDBSCAN noise point(s) ({n_noise / n:.0%}) assigned to the cluster "
            "of their nearest clustered neighbours (lower probability; outlier score kept)"
        )
        labels, probs = _assign_noise_knn(Z, labels, probs)
    probs[labels < 0] = 0.0
    return labels, probs, outl, used, {}


def _cuml_hdbscan_available() -> bool:
    try:
        import cuml  # noqa: F401
        import torch

        return bool(torch.cuda.is_available())
    except Exception:  # not installed, or no working CUDA runtime
        return False


def _cuml_hdbscan(Z: np.ndarray, mcs: int, ms: int, p: dict[str, Any]):
    """RAPIDS cuML's HDBSCAN on the GPU (untested here: no GPU, no cuml)."""
    from cuml.cluster import HDBSCAN as CuHDBSCAN

    c = CuHDBSCAN(min_cluster_size=mcs, min_samples=ms,
                  cluster_selection_method=p["cluster_selection_method"],
                  cluster_selection_epsilon=p["cluster_selection_epsilon"])
    c.fit(np.ascontiguousarray(Z, dtype=np.float32))

    def host(a):
        return np.asarray(a.get() if hasattr(a, "get") else a, dtype=float)

    labels = host(c.labels_).astype(np.int64)
    probs = np.nan_to_num(host(c.probabilities_))
    outl = getattr(c, "outlier_scores_", None)
    outl = np.zeros(len(Z)) if outl is None else np.clip(np.nan_to_num(host(outl)), 0, 1)
    return labels, probs, outl


def _fast_hdbscan(Z: np.ndarray, mcs: int, ms: int, p: dict[str, Any]):
    """fast_hdbscan's HDBSCAN; GLOSH outlier scores from its condensed tree by the
    ``hdbscan`` package's own routine, so both backends score outliers alike."""
    import fast_hdbscan
    from hdbscan._hdbscan_tree import outlier_scores

    clusterer = fast_hdbscan.HDBSCAN(
        min_cluster_size=mcs,
        min_samples=ms,
        cluster_selection_method=p["cluster_selection_method"],
        cluster_selection_epsilon=p["cluster_selection_epsilon"],
    )
    clusterer.fit(np.ascontiguousarray(Z))
    labels = np.asarray(clusterer.labels_, dtype=np.int64)
    probs = np.nan_to_num(np.asarray(clusterer.probabilities_, dtype=float))
    ct = clusterer._condensed_tree
    tree = np.empty(len(ct), dtype=[("parent", np.intp), ("child", np.intp),
                                    ("lambda_val", np.float64), ("child_size", np.intp)])
    for name in tree.dtype.names:
        tree[name] = ct[name]
    if len(tree):
        outl = np.clip(np.nan_to_num(np.asarray(outlier_scores(tree), dtype=float)), 0, 1)
        if len(outl) < len(Z):  # points the tree never mentions (cannot happen on finite Z)
            outl = np.pad(outl, (0, len(Z) - len(outl)))
    else:
        outl = np.zeros(len(Z))
    return labels, probs, outl


#: the build's k-means ("kmeans" method) fits on at most this many rows; the rest are
#: assigned to the nearest centre
KMEANS_FIT_LIMIT = 50_000


@dataclass
class KMeansFit:
    """Result of :func:`kmeans`."""

    #: each row's group, 0..k-1 (int64)
    labels: np.ndarray
    #: the k centres (float64, shape (k, D))
    centres: np.ndarray
    #: sum of the squared distances of the fitted rows to their centres
    inertia: float


def _nearest_centre(Y: np.ndarray, centres: np.ndarray, chunk: int = 65536) -> np.ndarray:
    """Each row's nearest centre (a chunk of rows at a time: no N x k x D temporary)."""
    c = centres.astype(Y.dtype if Y.dtype == np.float64 else np.float32)
    c2 = (c * c).sum(axis=1)
    out = np.empty(len(Y), dtype=np.int64)
    for s in range(0, len(Y), chunk):
        out[s:s + chunk] = (c2[None, :] - 2.0 * (Y[s:s + chunk] @ c.T)).argmin(axis=1)
    return out


def _plusplus(F: np.ndarray, k: int, rng: np.random.Generator, trials: int = 1) -> np.ndarray:
    """k-means++ seeding: each next centre drawn with probability ~ squared distance; with
    ``trials`` > 1, the best of that many draws (least total squared distance: greedy
    k-means++, as scikit-learn seeds)."""
    m = len(F)
    f2 = np.einsum("ij,ij->i", F, F)
    idx = [int(rng.integers(m))]
    d2 = np.maximum(f2 - 2.0 * (F @ F[idx[0]]) + f2[idx[0]], 0.0)
    for _ in range(1, k):
        cum = np.cumsum(d2, dtype=np.float64)
        total = float(cum[-1])
        if total <= 0:
            idx.append(int(rng.integers(m)))
            d2 = np.minimum(d2, np.maximum(f2 - 2.0 * (F @ F[idx[-1]]) + f2[idx[-1]], 0.0))
            continue
        if trials == 1:  # plain k-means++ (the hierarchy's thousands of small splits)
            j = min(int(np.searchsorted(cum, rng.random() * total)), m - 1)
            idx.append(j)
            d2 = np.minimum(d2, np.maximum(f2 - 2.0 * (F @ F[j]) + f2[j], 0.0))
            continue
        cand = np.minimum(np.searchsorted(cum, rng.random(trials) * total), m - 1)
        new = np.minimum(d2[None, :], np.maximum(f2[None, :] - 2.0 * (F[cand] @ F.T) + f2[cand, None], 0.0))
        best = int(new.sum(axis=1).argmin())
        idx.append(int(cand[best]))
        d2 = new[best]
    return F[idx].astype(np.float64)


def _lloyd(fit: np.ndarray, k: int, rng: np.random.Generator, max_iter: int, tol: float,
           trials: int) -> tuple[np.ndarray, np.ndarray, float]:
    """One k-means++ start and Lloyd iterations: (labels, centres, inertia) of ``fit``."""
    m = len(fit)
    centres = _plusplus(fit, k, rng, trials)
    lab = _nearest_centre(fit, centres)
    onehot = np.zeros((m, k), dtype=fit.dtype)  # same dtype as fit: a BLAS product
    rows = np.arange(m)
    limit = math.floor(m * tol + 1e-9)
    for _ in range(max_iter):
        onehot[rows, lab] = 1.0
        counts = onehot.sum(axis=0)
        sums = (onehot.T @ fit).astype(np.float64)
        onehot[rows, lab] = 0.0
        have = counts > 0
        centres[have] = sums[have] / counts[have, None]
        new = _nearest_centre(fit, centres)
        changed = int(np.count_nonzero(new != lab))
        lab = new
        if changed <= limit:
            break
    inertia = float(((fit - centres[lab].astype(fit.dtype)) ** 2).sum(dtype=np.float64))
    return lab, centres, inertia


def kmeans(Y: np.ndarray, k: int, seed: Any = None, *, n_init: int = 1, max_iter: int = 20,
           tol: float = 0.005, fit_points: int | None = None, greedy: bool = False) -> KMeansFit:
    """Lloyd's k-means with k-means++ seeding; the one k-means of the stages (the
    ``kmeans`` method of :func:`cluster` and every split of
    :func:`explorer.stages.hierarchy.build_hierarchy`; ``explorer.curation.active`` still
    fits its own scikit-learn KMeans). Deterministic for an int ``seed``.

    Fits on at most ``fit_points`` rows (a seeded sample; the rest are assigned to the
    nearest centre), keeps the best of ``n_init`` starts (least inertia) and stops a start
    after ``max_iter`` iterations or when at most a ``tol`` fraction of the fitted rows
    changed group. ``greedy``: each seed the best of ``2 + log k`` draws (scikit-learn's
    greedy k-means++; better starts for a few large fits, slower for many small ones). A vectorised numpy loop instead of ``sklearn.cluster.KMeans``: the
    hierarchy of 1M images makes thousands of small splits, where the estimator's fixed
    cost dominated (the hierarchy of 200,000 rows in 6.3-8.3 s, 21.6 s with
    ``KMeans(n_init=1)``), and with one BLAS thread it is also faster at the build's scale
    (4 greedy starts on 200,000 x 10 rows, k=30: 0.9 s against 5.6 s for
    ``MiniBatchKMeans(n_init=3)``, the same adjusted Rand index to the true blobs, 0.957
    and 0.958; the elbow k=1..20 on 10,000 rows: 3.4 s against 16.0 s for ``KMeans(n_init=4)``,
    inertias within 0.4%; 2 busy cores, load 5-6).

    Run it under ``threadpoolctl.threadpool_limits(1)``, as the callers here do: many small
    products, where one BLAS thread is many times faster than several on a busy machine
    (20 ms instead of 0.3 ms per 4096 x 16 x 32 product at load 9). The limit is not taken
    here because entering it costs about 6 ms, and the hierarchy calls this thousands of times.
    """
    n = len(Y)
    rng = np.random.default_rng(seed)
    fit = Y if fit_points is None or n <= fit_points else \
        Y[np.sort(rng.choice(n, fit_points, replace=False))]
    best: tuple[np.ndarray, np.ndarray, float] | None = None
    for _ in range(n_init):
        got = _lloyd(fit, k, rng, max_iter, tol, 2 + int(math.log(k)) if greedy else 1)
        if best is None or got[2] < best[2]:
            best = got
    lab, centres, inertia = best
    return KMeansFit(lab if fit is Y else _nearest_centre(Y, centres), centres, inertia)


def _kmeans(Z: np.ndarray, k: int, random_state) -> KMeansFit:
    """The build's k-means: the best of 4 starts, each run until at most 0.1% of the points change group."""
    from threadpoolctl import threadpool_limits

    with threadpool_limits(1):
        return kmeans(Z, k, random_state, n_init=4, max_iter=100, tol=1e-3,
                      fit_points=KMEANS_FIT_LIMIT, greedy=True)


def _fit_kmeans(Z: np.ndarray, p: dict[str, Any], random_state, notes: list[str]):
    """KMeans with ``k`` clusters; without ``k``, k is the elbow of the inertia curve
    over k = 1..``k_max`` (kept in ``elbow``). Probability: ``1 - d1/d2``; outlier
    score: GLOSH-like kNN sparsity (see the module docstring)."""
    n = len(Z)
    distinct = _n_distinct(Z, max(p["k_max"], p["k"] or 0) + 1)
    extra: dict[str, Any] = {}
    k = p["k"]
    if k is None:
        k_max = min(p["k_max"], distinct)
        if k_max < p["k_max"]:
            notes.append(f"k_max={p['k_max']} clamped to {k_max} ({distinct} distinct points)")
        fit_idx = _sample(n, MAX_FIT_POINTS, random_state)
        ks = list(range(1, k_max + 1))
        inertia = [_kmeans(Z[fit_idx], kk, random_state).inertia for kk in ks]
        k = _knee(ks, inertia)
        extra["elbow"] = {"k": ks, "inertia": inertia, "chosen_k": int(k)}
        notes.append(f"k={k} chosen at the elbow of inertia over k=1..{k_max}")
    elif k > distinct:
        notes.append(f"k={k} clamped to {distinct} ({distinct} distinct points)")
        k = distinct
    km = _kmeans(Z, k, random_state)
    labels = km.labels
    probs, outl = _centroid_scores(Z, labels, km.centres)
    return labels, probs, outl, {**p, "k": int(k)}, extra


def _fit_agglomerative(
    Z: np.ndarray, p: dict[str, Any], random_state, notes: list[str], cache: dict | None = None
):
    """Hierarchical clustering (scipy linkage, ``ward`` by default) cut into ``k``
    clusters; without ``k``, the k in 2..``k_max`` with the best silhouette. At most
    :data:`MAX_FIT_POINTS` points build the tree (it is O(N^2)); the others join the
    cluster of their nearest tree point. Probability and outlier score as for kmeans,
    with cluster means as centres."""
    from scipy.cluster.hierarchy import fcluster, linkage
    from sklearn.neighbors import NearestNeighbors

    n = len(Z)
    fit_idx = _sample(n, MAX_FIT_POINTS, random_state)
    if len(fit_idx) < n:
        notes.append(
            f"agglomerative tree built on {len(fit_idx):,} of {n:,} points; "
            "the others join their nearest tree point's cluster"
        )
    Zf = Z[fit_idx]
    key = f"tree-{p['linkage']}"
    if cache is not None and key in cache:
        tree = cache[key]
    else:
        tree = linkage(Zf, method=p["linkage"])
        if cache is not None:
            cache[key] = tree

    def cut(kk: int) -> np.ndarray:
        return fcluster(tree, t=kk, criterion="maxclust").astype(np.int64) - 1

    k = p["k"]
    distinct = _n_distinct(Z, max(p["k_max"], k or 0) + 1)
    if k is None:
        k_max = min(p["k_max"], distinct - 1) if distinct > 2 else 1
        best, best_s = 1, -np.inf
        for kk in range(2, k_max + 1):
            s = cluster_scores(Zf, cut(kk), random_state=random_state)["silhouette"]
            if s is not None and s > best_s:
                best, best_s = kk, s
        k = best
        notes.append(f"k={k} chosen by silhouette over k=2..{max(k_max, 2)}")
    elif k > distinct:
        notes.append(f"k={k} clamped to {distinct} ({distinct} distinct points)")
        k = distinct
    lab_f = cut(k)
    if len(fit_idx) < n:
        labels = np.empty(n, dtype=np.int64)
        labels[fit_idx] = lab_f
        rest = np.setdiff1d(np.arange(n), fit_idx)
        nn = NearestNeighbors(n_neighbors=1).fit(Zf)
        labels[rest] = lab_f[nn.kneighbors(Z[rest], return_distance=False)[:, 0]]
    else:
        labels = lab_f
    labels = _relabel_by_size(labels)
    centers = _cluster_means(Z, labels, int(labels.max()) + 1)
    probs, outl = _centroid_scores(Z, labels, centers)
    return labels, probs, outl, {**p, "k": int(k)}, {}


def _fit_gmm(Z: np.ndarray, p: dict[str, Any], random_state, notes: list[str]):
    """Gaussian mixture with ``k`` components; without ``k``, the k in 1..``k_max``
    with the lowest BIC (on at most :data:`MAX_FIT_POINTS` points). Probability: the
    posterior of the chosen component; outlier score: GLOSH-like kNN sparsity, as
    for kmeans."""
    from sklearn.mixture import GaussianMixture

    n, d = Z.shape
    distinct = _n_distinct(Z, max(p["k_max"], p["k"] or 0) + 1)

    def fit(kk: int, X: np.ndarray):
        g = GaussianMixture(
            n_components=kk,
            covariance_type=p["covariance_type"],
            random_state=random_state,
            reg_covar=1e-5,
            n_init=1,
        )
        g.fit(X)
        return g

    k = p["k"]
    if k is None:
        k_max = min(p["k_max"], distinct)
        fit_idx = _sample(n, MAX_FIT_POINTS, random_state)
        bics = [(fit(kk, Z[fit_idx]).bic(Z[fit_idx]), kk) for kk in range(1, k_max + 1)]
        k = min(bics)[1]
        notes.append(f"k={k} chosen by lowest BIC over k=1..{k_max}")
    elif k > distinct:
        notes.append(f"k={k} clamped to {distinct} ({distinct} distinct points)")
        k = distinct
    g = fit(k, Z)
    post = g.predict_proba(Z)
    labels = post.argmax(axis=1).astype(np.int64)
    probs = post[np.arange(n), labels]
    outl = _knn_outlier_scores(Z, labels)
    labels_new = _relabel_by_size(labels)
    return labels_new, np.clip(probs, 0, 1), outl, {**p, "k": int(k)}, {}


def _fit_dbscan(Z: np.ndarray, p: dict[str, Any], random_state, notes: list[str]):
    """DBSCAN. Without ``eps``: the ``eps_quantile`` quantile of every point's distance
    to its ``min_samples``-th neighbour (so about ``1 - eps_quantile`` of the points are
    not core points). Probability: 1 for core points, ``1 - d/eps`` for border points;
    outlier score: ``1 - min(1, eps / d_k)`` (0 for core points)."""
    from sklearn.cluster import DBSCAN
    from sklearn.neighbors import NearestNeighbors

    n = len(Z)
    ms = p["min_samples"]
    if ms > n:
        notes.append(f"min_samples={ms} clamped to {n}")
        ms = n
    nn = NearestNeighbors(n_neighbors=ms).fit(Z)
    dk = nn.kneighbors(Z)[0][:, -1]  # includes the point itself, like DBSCAN's count
    eps = p["eps"]
    if eps is None:
        eps = float(np.quantile(dk, p["eps_quantile"]))
        if eps <= 0:
            eps = float(dk[dk > 0].min()) if (dk > 0).any() else 1e-9
        notes.append(f"eps={eps:.4g} = the {p['eps_quantile']:.0%} quantile of the "
                     f"{ms}-th neighbour distance")
    db = DBSCAN(eps=eps, min_samples=ms).fit(Z)
    labels = np.asarray(db.labels_, dtype=np.int64)
    core = np.zeros(n, dtype=bool)
    core[db.core_sample_indices_] = True
    probs = np.where(core, 1.0, 0.0)
    border = (labels >= 0) & ~core
    if border.any() and core.any():
        d_core = NearestNeighbors(n_neighbors=1).fit(Z[core]).kneighbors(Z[border])[0][:, 0]
        probs[border] = np.clip(1.0 - d_core / eps, 0.0, 1.0)
    with np.errstate(divide="ignore", invalid="ignore"):
        outl = np.where(dk > eps, 1.0 - eps / dk, 0.0)
    outl = np.clip(np.nan_to_num(outl), 0, 1)
    labels = _relabel_by_size(labels)
    return labels, probs, outl, {**p, "eps": float(eps), "min_samples": int(ms)}, {}


_FITTERS: dict[str, Callable] = {
    "hdbscan": _fit_hdbscan,
    "kmeans": _fit_kmeans,
    "agglomerative": _fit_agglomerative,
    "dbscan": _fit_dbscan,
    "gmm": _fit_gmm,
}


# =========================================================================== auto
def auto_grid(k_max: int = 20, methods: Sequence[str] | None = None) -> list[tuple[str, dict]]:
    """The candidates ``auto`` tries: (method, params) pairs."""
    ks = list(range(2, k_max + 1))
    grid: list[tuple[str, dict]] = []
    grid += [("kmeans", {"k": k}) for k in ks]
    grid += [("agglomerative", {"k": k}) for k in ks]
    grid += [("gmm", {"k": k}) for k in ks]
    grid += [
        ("hdbscan", {"min_cluster_size": f, "cluster_selection_method": sel})
        for f in (0.005, 0.01, 0.02, 0.04)
        for sel in ("eom", "leaf")
    ]
    grid += [("dbscan", {"eps_quantile": q}) for q in (0.8, 0.9, 0.95, 0.99)]
    if methods is not None:
        grid = [g for g in grid if g[0] in methods]
    return grid


def _fill_noise(Z: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Labels with every noise point given its nearest clustered point's cluster.

    Used only to score candidates in ``auto``, so a method cannot look better by
    calling the hard points noise; the returned result keeps its noise."""
    from sklearn.neighbors import NearestNeighbors

    noise = labels < 0
    if not noise.any() or noise.all():
        return labels
    nn = NearestNeighbors(n_neighbors=1).fit(Z[~noise])
    out = labels.copy()
    out[noise] = labels[~noise][nn.kneighbors(Z[noise], return_distance=False)[:, 0]]
    return out


def _rank(values: list[float | None], higher_better: bool) -> np.ndarray:
    """Rank 1 = best, ties share their mean rank; missing scores rank last."""
    from scipy.stats import rankdata

    v = np.array([np.nan if x is None else float(x) for x in values])
    key = np.where(np.isnan(v), np.inf, -v if higher_better else v)
    return rankdata(key, method="average")


def _fit_auto(Z: np.ndarray, p: dict[str, Any], random_state, notes: list[str], progress=False):
    """Fit every candidate of :func:`auto_grid` (on at most :data:`MAX_FIT_POINTS`
    points), score each by silhouette, Calinski-Harabasz and Davies-Bouldin, and pick
    the lowest mean rank of the three among candidates with at most ``max_noise`` noise
    and at least two clusters (if none qualifies, among all). The winner is refitted on
    all points. Every candidate's scores are kept in ``candidates``."""
    n = len(Z)
    fit_idx = _sample(n, MAX_FIT_POINTS, random_state)
    Zf = Z[fit_idx]
    grid = auto_grid(p["k_max"], p["methods"])
    if len(fit_idx) < n:
        notes.append(f"auto: candidates fitted on a sample of {len(fit_idx):,} of {n:,} points")
    cands: list[dict[str, Any]] = []
    cache: dict[str, Any] = {}  # one agglomerative tree for every k
    from explorer.progress import Bar

    bar = Bar(len(grid), "auto: trying clusterings", enabled=progress, transient=True)
    try:
        for method, params in grid:
            if method == "hdbscan":
                params = {**params, "assign_noise": False}
            sub_notes: list[str] = []
            try:
                res = _run(Zf, method, _validate(method, _merge_params(method, params)),
                           random_state, sub_notes, cache)
                scores = cluster_scores(Zf, _fill_noise(Zf, res[0]), random_state=random_state)
                scores["noise_fraction"] = float((res[0] < 0).mean())
                used = res[3]
            except Exception as exc:  # one failing candidate must not end the search
                scores = cluster_scores(Zf, np.full(len(Zf), -1), random_state=random_state)
                used = params
                sub_notes.append(f"failed: {exc}")
            cands.append({
                "method": method,
                "params": dict(params),
                "fitted_params": used,
                "scores": {k: scores[k] for k in ("silhouette", "calinski_harabasz", "davies_bouldin")},
                "n_clusters": scores["n_clusters"],
                "noise_fraction": scores["noise_fraction"],
                "notes": sub_notes,
            })
            bar.advance()
    finally:
        bar.close()
    ranks = np.mean(
        [
            _rank([c["scores"]["silhouette"] for c in cands], True),
            _rank([c["scores"]["calinski_harabasz"] for c in cands], True),
            _rank([c["scores"]["davies_bouldin"] for c in cands], False),
        ],
        axis=0,
    )
    for c, r in zip(cands, ranks):
        c["rank"] = float(r)
        c["eligible"] = bool(
            c["n_clusters"] >= 2
            and c["noise_fraction"] <= p["max_noise"]
            and c["scores"]["silhouette"] is not None
        )
    pool = [i for i, c in enumerate(cands) if c["eligible"]] or list(range(len(cands)))
    best = min(pool, key=lambda i: (cands[i]["rank"], i))
    win = cands[best]
    notes.append(
        f"auto picked {win['method']} {win['params']} (mean rank {win['rank']:.1f} of "
        f"{len(cands)} candidates by silhouette, Calinski-Harabasz, Davies-Bouldin)"
    )
    params = dict(win["params"])
    if win["method"] == "hdbscan":
        params["assign_noise"] = False
    return win["method"], params, cands


def _run(Z, method, p, random_state, notes, cache=None):
    if method == "agglomerative":
        return _fit_agglomerative(Z, p, random_state, notes, cache)
    return _FITTERS[method](Z, p, random_state, notes)


# =========================================================================== entry point
def _trivial(n: int, method: str, params: dict, note: str, label: int = 0) -> ClusterResult:
    return ClusterResult(
        labels=np.full(n, label if n else 0, dtype=np.int64),
        probabilities=np.full(n, 1.0 if label >= 0 else 0.0),
        outlier_scores=np.zeros(n),
        method=method,
        params=params,
        scores=cluster_scores(np.zeros((n, 1)), np.full(n, label)),
        notes=[note],
        requested=method,
    )


def cluster(
    Z: Any,
    method: str = "hdbscan",
    *,
    random_state: int | None = 42,
    progress: bool = False,
    **params: Any,
) -> ClusterResult:
    """Cluster the rows of ``Z`` (N, d) with ``method``; see the module docstring.

    Methods and their parameters (defaults in :data:`PARAMS`):

    * ``"hdbscan"`` (default): ``min_cluster_size`` ("auto" = N/50; an int, or a float
      in (0, 1) = fraction of N), ``min_samples``, ``cluster_selection_method``
      ("leaf" by default, or "eom"), ``cluster_selection_epsilon``, ``assign_noise``
      (default True: HDBSCAN's noise points join the cluster of their nearest clustered
      neighbours with a lower probability; False keeps them as -1). See
      :func:`_fit_hdbscan` for why these defaults.
    * ``"kmeans"``: ``k``; without it the elbow of inertia over k=1..``k_max``
      (curve in ``result.elbow``).
    * ``"agglomerative"``: ``k`` (else best silhouette over 2..``k_max``), ``linkage``.
    * ``"dbscan"``: ``eps`` (else the ``eps_quantile`` quantile of the
      ``min_samples``-th neighbour distance), ``min_samples``.
    * ``"gmm"``: ``k`` (else lowest BIC over 1..``k_max``), ``covariance_type``.
    * ``"auto"``: every method over a small grid (:func:`auto_grid`), the best by
      mean rank of the three scores among candidates with at most ``max_noise`` noise;
      ``result.method`` is the winner, ``result.candidates`` holds every candidate.

    Deterministic for a fixed ``random_state``. ``progress=True`` shows a progress bar
    for ``auto``. Raises ``ValueError`` naming the bad value for an unknown method, an
    unknown parameter, or a parameter out of range (``k < 1``, ``eps <= 0``, ...).
    """
    method = _choice("method", method, METHODS)
    random_state = _check_random_state(random_state)
    p = _validate(method, _merge_params(method, params))
    Z = _check_Z(Z)
    n = len(Z)
    if n == 0:
        return _trivial(0, method, p, "no points to cluster")
    if n < MIN_POINTS:
        return _trivial(n, method, p, f"only {n} point(s); all put in one cluster")
    if Z.shape[1] == 0 or float(np.ptp(Z, axis=0).max()) == 0.0:
        return _trivial(n, method, p, f"all {n} points are identical; all put in one cluster")

    notes: list[str] = []
    candidates: list[dict[str, Any]] = []
    requested = method
    if method == "auto":
        method, chosen, candidates = _fit_auto(Z, p, random_state, notes, progress=progress)
        p = _validate(method, _merge_params(method, chosen))
    labels, probs, outl, used, extra = _run(Z, method, p, random_state, notes)
    labels = np.asarray(labels, dtype=np.int64)
    probs = np.clip(np.asarray(probs, dtype=float), 0.0, 1.0)
    probs[labels < 0] = 0.0
    outl = np.clip(np.asarray(outl, dtype=float), 0.0, 1.0)
    return ClusterResult(
        labels=labels,
        probabilities=probs,
        outlier_scores=outl,
        method=method,
        params=used,
        scores=cluster_scores(Z, labels, random_state=random_state),
        notes=notes,
        candidates=candidates,
        elbow=extra.get("elbow"),
        requested=requested,
    )


# =========================================================================== elbow plot
def elbow_plot(
    curve: dict[str, Sequence] | Sequence[tuple[int, float]],
    chosen_k: int,
    path: str | Path,
    *,
    title: str = "KMeans elbow: inertia over k",
    resources: str = "inline",
) -> Path:
    """Write the elbow curve as a standalone Bokeh HTML file with ``chosen_k`` marked.

    ``curve`` is ``result.elbow`` (``{"k": [...], "inertia": [...]}``) or a list of
    ``(k, inertia)`` pairs. ``resources="inline"`` embeds BokehJS so the file works
    offline; ``"cdn"`` makes a small file that loads BokehJS from the web. Written
    atomically; returns the path.
    """
    from bokeh.embed import file_html
    from bokeh.models import ColumnDataSource, HoverTool, Span
    from bokeh.plotting import figure
    from bokeh.resources import CDN, INLINE

    from explorer.table import atomic_write_text

    if isinstance(curve, dict):
        ks = [int(k) for k in curve.get("k", [])]
        ys = [float(v) for v in curve.get("inertia", [])]
    else:
        pairs = list(curve)
        ks = [int(k) for k, _ in pairs]
        ys = [float(v) for _, v in pairs]
    if len(ks) != len(ys):
        raise ValueError(f"curve has {len(ks)} k values but {len(ys)} inertia values")
    res = _choice("resources", resources, ("inline", "cdn"))
    src = ColumnDataSource({"k": ks, "inertia": ys}, name="elbow_curve")
    fig = figure(
        title=title,
        x_axis_label="k (number of clusters)",
        y_axis_label="inertia (sum of squared distances to centroids)",
        width=640,
        height=400,
        tools="pan,wheel_zoom,box_zoom,reset,save",
        name="elbow_plot",
    )
    fig.line("k", "inertia", source=src, line_width=2)
    fig.scatter("k", "inertia", source=src, size=7)
    fig.add_tools(HoverTool(tooltips=[("k", "@k"), ("inertia", "@inertia{0,0.00}")]))
    if chosen_k in ks:
        y = ys[ks.index(chosen_k)]
        fig.scatter([chosen_k], [y], size=16, fill_color=None, line_color="red", line_width=3,
                    legend_label=f"chosen k = {chosen_k}")
    fig.add_layout(Span(location=chosen_k, dimension="height", line_color="red",
                        line_dash="dashed", line_width=1))
    html = file_html(fig, INLINE if res == "inline" else CDN, title=title)
    return atomic_write_text(path, html)
