"""Drill down: re-cluster a selection, and a browsable hierarchy of the whole set.

Two pure functions on embeddings (no files, no re-embedding: callers pass rows of the
cached ``NAME.features.npy``):

``recluster(embeddings_subset, parent_id="3", seed=42)``
    a fresh 2-D map and clustering of just the selected images; sub-cluster ids read
    ``"3.1"``, ``"3.2"``, ... (largest first) and ``"3.noise"`` for images that belong to no
    sub-cluster. Re-clustering a sub-cluster nests: ``"3.2.1"``.

``build_hierarchy(embeddings, branching=16, min_size=50, seed=0)``
    the whole set split into up to ``branching`` groups per level (k-means on the
    L2-normalised embeddings), down to groups of at most ``min_size`` images. Node ids read
    ``"root"``, ``"root-3"``, ``"root-3-14"`` (groups numbered from 1, largest first). Every
    node has its member indices, its count and a few representative images (nearest to its
    centroid) to show as thumbnails.
"""

from __future__ import annotations

import math
import re
from collections import deque
from dataclasses import dataclass, field
from typing import Iterator

import numpy as np

from explorer._checks import as_matrix
from explorer._checks import check_int as _check_int

__all__ = [
    "NOISE",
    "MIN_RECLUSTER",
    "Recluster",
    "recluster",
    "Node",
    "Tree",
    "UnknownGroup",
    "build_hierarchy",
    "normalize_group_id",
]

#: suffix of the sub id of images that fall in no sub-cluster: ``"3.noise"``
NOISE = "noise"
#: selections smaller than this are shown as one group, not clustered
MIN_RECLUSTER = 6


# ---------------------------------------------------------------------- helpers
def _check_embeddings(X, name: str = "embeddings") -> np.ndarray:
    return as_matrix(X, name, np.float32, cols="dim", empty_1d_ok=False)


def _check_seed(seed) -> int:
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or not 0 <= seed < 2**32:
        raise ValueError(f"seed must be an integer in [0, 2**32), got {seed!r}")
    return int(seed)




def _normalize_rows(X: np.ndarray) -> np.ndarray:
    X = X.astype(np.float32, copy=True)
    n = np.sqrt(np.einsum("ij,ij->i", X, X, dtype=np.float64)).astype(np.float32)
    n[n == 0] = 1.0
    X /= n[:, None]
    return X


# ---------------------------------------------------------------------- re-cluster
@dataclass
class Recluster:
    """Result of :func:`recluster`. Unpacks as ``xy, sub_ids = recluster(...)``."""

    xy: np.ndarray
    """(n, 2) float32 map of the selection."""
    sub_ids: list[str]
    """One id per row: ``"3.1"``, ``"3.2"``, ... or ``"3.noise"``."""
    labels: np.ndarray
    """The same as integers: 1, 2, ... and -1 for noise."""
    notes: list[str] = field(default_factory=list)
    """What was done instead of the usual map/clustering (small selections, no structure)."""

    def __iter__(self):
        yield self.xy
        yield self.sub_ids

    @property
    def n_clusters(self) -> int:
        return int(len(set(self.labels.tolist()) - {-1}))


def _parent_id(parent_id) -> str:
    if isinstance(parent_id, bool):
        raise ValueError(f"parent_id must be a cluster id like '3' or '3.1', got {parent_id!r}")
    if isinstance(parent_id, (int, np.integer)):
        parent_id = str(int(parent_id))
    if not isinstance(parent_id, str) or not parent_id.strip():
        raise ValueError(f"parent_id must be a cluster id like '3' or '3.1', got {parent_id!r}")
    parent_id = parent_id.strip()
    if any(ord(c) < 32 or c.isspace() for c in parent_id) or len(parent_id) > 200:
        raise ValueError(f"parent_id must be a short id without spaces, got {parent_id!r}")
    return parent_id


def recluster(
    embeddings_subset,
    parent_id="3",
    *,
    seed: int = 42,
    method: str = "hdbscan",
    **cluster_params,
) -> Recluster:
    """Map and cluster just the selected images again (from their cached embeddings).

    Parameters
    ----------
    embeddings_subset:
        (n, dim) embeddings of the selected images, in the order the caller keeps them.
    parent_id:
        The id of what was selected (``3``, ``"3"``, ``"3.2"``): sub ids are
        ``f"{parent_id}.{k}"``, numbered from 1 by size (largest first), and
        ``f"{parent_id}.noise"`` for images in no sub-cluster.
    seed:
        Same input and seed give the same map and ids.
    method, cluster_params:
        Passed to :func:`explorer.stages.cluster.cluster` (the same clustering as ``explorer
        build``), e.g. ``min_cluster_size=10`` or ``assign_noise=False`` for HDBSCAN.

    Returns a :class:`Recluster` (``xy, sub_ids = recluster(...)`` also works).

    The map and the clusterable space come, like the main build's, from one neighbour
    graph (:func:`explorer.stages.reduce.map_and_space`); the clustering runs on that space.
    Selections of fewer than
    :data:`MIN_RECLUSTER` images are not clustered: they get a simple layout, all in
    ``"<parent>.1"``, and a note saying so. When the clustering finds no structure
    (everything noise), all images are put in ``"<parent>.1"`` with a note. Notes from
    the map and the clustering (fallbacks, clamped parameters) are passed on.
    """
    from explorer.stages import cluster as cluster_mod
    from explorer.stages import reduce as reduce_mod

    X = _check_embeddings(embeddings_subset, "embeddings_subset")
    parent = _parent_id(parent_id)
    seed = _check_seed(seed)
    n = X.shape[0]
    if n == 0:
        raise ValueError("the selection is empty: select at least one image to re-cluster")
    if method not in cluster_mod.METHODS:
        raise ValueError(f"unknown clustering method {method!r}; use one of {cluster_mod.METHODS}")
    notes: list[str] = []
    mapped = reduce_mod.map_and_space(X, random_state=seed)
    xy = np.asarray(mapped.xy, dtype=np.float32)
    notes += list(mapped.notes)
    if n < MIN_RECLUSTER:
        notes.append(
            f"only {n} image(s) selected: too few to re-cluster (need {MIN_RECLUSTER}); "
            "shown as one group"
        )
        labels = np.ones(n, dtype=int)
    else:
        res = cluster_mod.cluster(np.asarray(mapped.space), method, random_state=seed, **cluster_params)
        notes += list(res.notes)
        raw = np.asarray(res.labels, dtype=int)
        if (raw < 0).all():
            notes.append(f"no sub-clusters found among {n} images; shown as one group")
            labels = np.ones(n, dtype=int)
        else:
            labels = _renumber_by_size(raw)
    sub_ids = [f"{parent}.{NOISE}" if v < 0 else f"{parent}.{v}" for v in labels.tolist()]
    return Recluster(xy=xy, sub_ids=sub_ids, labels=labels, notes=notes)


def _renumber_by_size(raw: np.ndarray) -> np.ndarray:
    """Cluster labels renumbered 1.. by size (largest first, ties by first member); -1 kept.

    The one renumbering rule (:func:`explorer.stages.cluster._relabel_by_size`, 0-based) shifted by one."""
    from explorer.stages.cluster import _relabel_by_size

    out = _relabel_by_size(np.asarray(raw)).astype(int)
    out[out >= 0] += 1
    return out


# ---------------------------------------------------------------------- hierarchy
class UnknownGroup(KeyError):
    """No node with that id in the tree (a ``KeyError`` with a readable message)."""

    def __str__(self) -> str:  # KeyError would show the repr of the message
        return str(self.args[0]) if self.args else ""


_ID_SPLIT = re.compile(r"[-./\s]+")


def normalize_group_id(group_id) -> str:
    """Canonical form of a group id typed by a person.

    ``"root-3-14"``, ``"3-14"``, ``" root/3/14 "``, ``"3.14"``, ``"ROOT-03-14"`` all give
    ``"root-3-14"``; ``""`` and ``"root"`` give ``"root"``. Raises ``ValueError`` for text that
    is not an id (e.g. ``"root-x"``).
    """
    if isinstance(group_id, (int, np.integer)) and not isinstance(group_id, bool):
        group_id = str(int(group_id))
    if not isinstance(group_id, str):
        raise ValueError(f"a group id is text like 'root-3-14', got {group_id!r}")
    s = group_id.strip()
    if s.lower().startswith("root"):
        s = s[4:]
    parts = [p for p in _ID_SPLIT.split(s) if p != ""]
    if not all(p.isascii() and p.isdigit() and len(p) <= 9 for p in parts):
        raise ValueError(
            f"{group_id!r} is not a group id; ids look like 'root', 'root-3' or 'root-3-14'"
        )
    return "-".join(["root"] + [str(int(p)) for p in parts])


@dataclass
class Node:
    """One group of the hierarchy."""

    id: str
    parent: str | None
    depth: int
    members: np.ndarray
    """Row indices (into the embeddings) of every image in the group, ascending."""
    representatives: np.ndarray
    """A few member indices nearest to the group's centroid, nearest first (thumbnails)."""
    children: list[str] = field(default_factory=list)

    @property
    def count(self) -> int:
        return int(len(self.members))

    @property
    def is_leaf(self) -> bool:
        return not self.children


class Tree:
    """The hierarchy built by :func:`build_hierarchy`; look nodes up by id."""

    def __init__(self, nodes: dict[str, Node], n_images: int, params: dict):
        self.nodes = nodes
        self.n_images = n_images
        self.params = params

    def __len__(self) -> int:
        return len(self.nodes)

    def __iter__(self) -> Iterator[Node]:
        return iter(self.nodes.values())

    def __contains__(self, group_id) -> bool:
        try:
            return normalize_group_id(group_id) in self.nodes
        except ValueError:
            return False

    def __repr__(self) -> str:
        return f"Tree({self.n_images} images, {len(self.nodes)} groups, depth {self.depth})"

    @property
    def root(self) -> Node:
        return self.nodes["root"]

    @property
    def depth(self) -> int:
        return max(n.depth for n in self.nodes.values())

    def node(self, group_id) -> Node:
        """The node with this id (any form :func:`normalize_group_id` accepts).

        Raises ``ValueError`` if the text is not an id and :class:`UnknownGroup` (a
        ``KeyError``) naming the deepest existing ancestor if there is no such group.
        """
        gid = normalize_group_id(group_id)
        node = self.nodes.get(gid)
        if node is not None:
            return node
        parts = gid.split("-")
        anc = "root"
        for i in range(len(parts), 0, -1):
            if "-".join(parts[:i]) in self.nodes:
                anc = "-".join(parts[:i])
                break
        a = self.nodes[anc]
        if a.children:
            hint = f"{anc} has {len(a.children)} groups ({a.children[0]} .. {a.children[-1]})"
        else:
            hint = f"{anc} has {a.count} images and is not split further"
        raise UnknownGroup(f"no group {gid!r}: {hint}")

    def children(self, group_id) -> list[Node]:
        """The sub-groups of a group, largest first (empty for a leaf)."""
        return [self.nodes[c] for c in self.node(group_id).children]

    def parent(self, group_id) -> Node | None:
        p = self.node(group_id).parent
        return None if p is None else self.nodes[p]

    def breadcrumbs(self, group_id) -> list[str]:
        """Ids from the root down to this group: ``["root", "root-3", "root-3-14"]``."""
        gid = self.node(group_id).id
        parts = gid.split("-")
        return ["-".join(parts[: i + 1]) for i in range(len(parts))]

    def path_of(self, index: int) -> list[str]:
        """Ids of the groups that contain image ``index``, root first."""
        if isinstance(index, bool) or not isinstance(index, (int, np.integer)):
            raise ValueError(f"index must be an integer, got {index!r}")
        if not 0 <= index < self.n_images:
            raise ValueError(f"index {index} is out of range for {self.n_images} images")
        out = ["root"]
        node = self.root
        while node.children:
            for c in node.children:
                m = self.nodes[c].members
                j = np.searchsorted(m, index)
                if j < len(m) and m[j] == index:
                    node = self.nodes[c]
                    break
            else:  # pragma: no cover - every member is in exactly one child
                break
            out.append(node.id)
        return out

    def assignments(self, depth: int) -> np.ndarray:
        """The group id of every image at ``depth`` (its leaf's id where the tree is shallower)."""
        depth = _check_int("depth", depth, 0)
        out = np.empty(self.n_images, dtype=object)
        for node in self.nodes.values():
            if node.depth == depth or (node.depth < depth and node.is_leaf):
                out[node.members] = node.id
        return out


#: k-means fits on at most this many members of a node (seeded sample); the rest are
#: assigned to the nearest centre, so each split costs about the same however big
KMEANS_FIT_POINTS = 5000
#: embeddings are reduced by PCA to this many dimensions before splitting
HIERARCHY_DIMS = 32


def _nearest_centre(Y: np.ndarray, centres: np.ndarray, chunk: int = 65536) -> np.ndarray:
    c2 = (centres.astype(np.float64) ** 2).sum(axis=1)
    out = np.empty(len(Y), dtype=np.int64)
    for s in range(0, len(Y), chunk):
        block = Y[s:s + chunk].astype(np.float64)
        out[s:s + chunk] = (c2[None, :] - 2.0 * block @ centres.T.astype(np.float64)).argmin(axis=1)
    return out


def _kmeans(Y: np.ndarray, k: int, seed: int, max_iter: int = 50) -> np.ndarray:
    """Lloyd's k-means with k-means++ seeding; deterministic for a seed.

    A small numpy loop instead of ``sklearn.cluster.KMeans``: a hierarchy makes hundreds
    of small splits, where the estimator's fixed cost dominated (measured in
    ``bench/curation.py``).
    """
    from sklearn.cluster import kmeans_plusplus

    n = len(Y)
    rng = np.random.default_rng(seed)
    fit = Y if n <= KMEANS_FIT_POINTS else Y[np.sort(rng.choice(n, KMEANS_FIT_POINTS,
                                                              replace=False))]
    fit64 = fit.astype(np.float64)
    centres, _ = kmeans_plusplus(fit64, k, random_state=seed)
    lab = _nearest_centre(fit64, centres)
    for _ in range(max_iter):
        for c in range(k):
            m = lab == c
            if m.any():
                centres[c] = fit64[m].mean(axis=0)
        new = _nearest_centre(fit64, centres)
        if np.array_equal(new, lab):
            break
        lab = new
    return lab if fit is Y else _nearest_centre(Y, centres)


def _representatives(Y: np.ndarray, members: np.ndarray, n: int) -> np.ndarray:
    sub = Y[members]
    c = sub.mean(axis=0)
    d = ((sub - c) ** 2).sum(axis=1)
    order = np.lexsort((members, d))[:n]
    return members[order]


def build_hierarchy(
    embeddings,
    *,
    branching: int = 16,
    min_size: int = 50,
    max_depth: int = 8,
    n_representatives: int = 4,
    seed: int = 0,
    progress: bool = False,
) -> Tree:
    """Split the whole set into up to ``branching`` groups per level.

    A group with more than ``min_size`` images is split by k-means into
    ``min(branching, ceil(count / min_size))`` (at least 2) sub-groups, down to
    ``max_depth`` levels. Embeddings are L2-normalised (cosine geometry) and, above
    :data:`HIERARCHY_DIMS` dimensions, reduced by PCA first. Each split fits on at most
    :data:`KMEANS_FIT_POINTS` members. Groups are numbered from 1, largest first.
    Same input and ``seed`` give the same tree.

    Raises ``ValueError`` for bad parameters or embeddings (not 2-D, NaN/inf, no rows).
    """
    X = _check_embeddings(embeddings)
    branching = _check_int("branching", branching, 2)
    min_size = _check_int("min_size", min_size, 1)
    max_depth = _check_int("max_depth", max_depth, 0)
    n_representatives = _check_int("n_representatives", n_representatives, 1)
    seed = _check_seed(seed)
    n = X.shape[0]
    if n == 0:
        raise ValueError("embeddings has no rows: nothing to build a hierarchy of")
    Y = _normalize_rows(X)
    if Y.shape[1] > HIERARCHY_DIMS and n > HIERARCHY_DIMS:
        from sklearn.decomposition import PCA

        fit_rows = Y
        if n > 20000:
            fit_rows = Y[np.sort(np.random.default_rng(seed).choice(n, 20000, replace=False))]
        pca = PCA(n_components=HIERARCHY_DIMS, random_state=seed,
                  svd_solver="randomized").fit(fit_rows)
        Y = pca.transform(Y).astype(np.float32)

    nodes: dict[str, Node] = {}
    all_idx = np.arange(n, dtype=np.int64)
    root = Node("root", None, 0, all_idx, _representatives(Y, all_idx, n_representatives))
    nodes["root"] = root
    queue = deque([root])
    from explorer.progress import track

    def splits():  # one item per group taken from the queue (the queue grows as it goes)
        while queue:
            yield queue.popleft()

    for node in track(splits(), "building the group hierarchy", enabled=progress):
        m = node.members
        if node.count <= min_size or node.depth >= max_depth:
            continue
        k = min(branching, max(2, math.ceil(node.count / min_size)), node.count)
        sub = Y[m]
        if float(np.ptp(sub, axis=0).max()) == 0.0:  # all identical: cannot split
            continue
        lab = _kmeans(sub, k, seed)
        groups = [m[lab == c] for c in np.unique(lab)]
        if len(groups) < 2:
            continue
        groups.sort(key=lambda g: (-len(g), int(g[0])))
        for i, g in enumerate(groups, start=1):
            cid = f"{node.id}-{i}"
            child = Node(cid, node.id, node.depth + 1, g,
                         _representatives(Y, g, n_representatives))
            nodes[cid] = child
            node.children.append(cid)
            queue.append(child)
    params = {"branching": branching, "min_size": min_size, "max_depth": max_depth,
              "n_representatives": n_representatives, "seed": seed}
    return Tree(nodes, n, params)
