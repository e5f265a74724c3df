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
from pathlib import Path
from typing import Iterator

import numpy as np

from explorer._checks import as_matrix
from explorer._checks import check_int as _check_int
from explorer._checks import check_random_state
from explorer.stages.cluster import kmeans

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
    "overview_params",
    "fingerprint",
    "HierarchyFileError",
    "tree_to_arrays",
    "tree_from_arrays",
    "save_tree",
    "load_tree",
]

#: suffix of the sub id of images that fall in no sub-cluster: ``"3.noise"``
NOISE = "noise"
#: selections smaller than this are shown as one group, not clustered
MIN_RECLUSTER = 6


# ---------------------------------------------------------------------- helpers
def _check_embeddings(X, name: str = "embeddings") -> np.ndarray:
    return as_matrix(X, name, np.float32, cols="dim", empty_1d_ok=False)


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
    seed = check_random_state(seed, allow_none=False, name="seed")
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
KMEANS_FIT_POINTS = 2048
#: embeddings are reduced by PCA to this many dimensions before splitting
HIERARCHY_DIMS = 32
#: the PCA is fitted on at most this many rows (seeded sample)
PCA_FIT_POINTS = 20000
#: rows normalised and projected at a time (a memory-mapped matrix is never copied whole)
_CHUNK = 65536


def overview_params(n_rows: int) -> dict:
    """The hierarchy parameters of the Overview and Treemap tabs for ``n_rows`` images (the
    one place the build's sidecar and the app's fallback take them from)."""
    n_rows = _check_int("n_rows", n_rows, 0)
    return {"branching": 16, "min_size": max(16, min(50, n_rows // 16))}


def _reduced_rows(embeddings, seed: int) -> np.ndarray:
    """L2-normalised rows, PCA-reduced to :data:`HIERARCHY_DIMS` when wider, float32.

    Reads ``embeddings`` (any float array, a float16 memory map too) a chunk at a time, so
    only the reduced (n, 32) copy is ever whole in memory. Raises ``ValueError`` like
    :func:`explorer._checks.as_matrix` (not 2-D, NaN/inf rows, no rows)."""
    X = embeddings
    if not (isinstance(X, np.ndarray) and X.ndim == 2 and np.issubdtype(X.dtype, np.number)):
        X = _check_embeddings(X)
    n, d = X.shape
    if n == 0:
        raise ValueError("embeddings has no rows: nothing to build a hierarchy of")
    bad = 0
    for s in range(0, n, _CHUNK):
        block = np.asarray(X[s:s + _CHUNK], dtype=np.float32)
        bad += int((~np.isfinite(block)).any(axis=1).sum())
    if bad:
        raise ValueError(f"embeddings has {bad} row(s) with NaN or infinite values")
    if d <= HIERARCHY_DIMS or n <= HIERARCHY_DIMS:
        return _normalize_rows(np.asarray(X, dtype=np.float32))
    rows = np.arange(n) if n <= PCA_FIT_POINTS else np.sort(
        np.random.default_rng(seed).choice(n, PCA_FIT_POINTS, replace=False))
    S = _normalize_rows(np.asarray(X[rows], dtype=np.float32)).astype(np.float64)
    mean = S.mean(axis=0)
    S -= mean
    w, v = np.linalg.eigh(S.T @ S)  # principal axes: the top eigenvectors of the covariance
    comp = v[:, ::-1][:, :HIERARCHY_DIMS]
    comp *= np.where(comp[np.abs(comp).argmax(axis=0), np.arange(comp.shape[1])] < 0, -1.0, 1.0)
    comp32, mean32 = comp.astype(np.float32), mean.astype(np.float32)
    Y = np.empty((n, HIERARCHY_DIMS), dtype=np.float32)
    for s in range(0, n, _CHUNK):
        Y[s:s + _CHUNK] = (_normalize_rows(np.asarray(X[s:s + _CHUNK])) - mean32) @ comp32
    return Y


def _representatives(sub: np.ndarray, members: np.ndarray, n: int) -> np.ndarray:
    """The ``n`` members whose rows ``sub`` (= ``Y[members]``) lie nearest their mean."""
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
    :data:`HIERARCHY_DIMS` dimensions, reduced by PCA first (read a chunk at a time: a
    float16 memory map is never copied whole). Each split fits on at most
    :data:`KMEANS_FIT_POINTS` members. Groups are numbered from 1, largest first.
    Same input and ``seed`` give the same tree.

    Raises ``ValueError`` for bad parameters or embeddings (not 2-D, NaN/inf, no rows).
    """
    branching = _check_int("branching", branching, 2)
    min_size = _check_int("min_size", min_size, 1)
    max_depth = _check_int("max_depth", max_depth, 0)
    n_representatives = _check_int("n_representatives", n_representatives, 1)
    seed = check_random_state(seed, allow_none=False, name="seed")
    from threadpoolctl import threadpool_limits

    # thousands of small products: one BLAS thread is many times faster than several on a
    # busy machine (measured: 20 ms instead of 0.3 ms per 4096 x 16 x 32 product at load 9)
    with threadpool_limits(1):
        return _build(embeddings, branching, min_size, max_depth, n_representatives, seed,
                      progress)


def _build(embeddings, branching: int, min_size: int, max_depth: int, n_representatives: int,
           seed: int, progress: bool) -> Tree:
    Y = _reduced_rows(embeddings, seed)
    n = len(Y)

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
        sub = Y if node.parent is None else Y[m]
        if float(np.ptp(sub, axis=0).max()) == 0.0:  # all identical: cannot split
            continue
        lab = kmeans(sub, k, seed, fit_points=KMEANS_FIT_POINTS).labels
        counts = np.bincount(lab, minlength=k)
        if np.count_nonzero(counts) < 2:
            continue
        order = np.argsort(lab, kind="stable")  # members stay ascending inside each group
        bounds = np.cumsum(counts)[:-1]
        parts = [(g, s) for g, s in zip(np.split(m[order], bounds), np.split(order, bounds))
                 if len(g)]
        parts.sort(key=lambda p: (-len(p[0]), int(p[0][0])))
        for i, (g, rows) in enumerate(parts, start=1):
            cid = f"{node.id}-{i}"
            child = Node(cid, node.id, node.depth + 1, g,
                         _representatives(sub[rows], g, n_representatives))
            nodes[cid] = child
            node.children.append(cid)
            queue.append(child)
    params = {"branching": branching, "min_size": min_size, "max_depth": max_depth,
              "n_representatives": n_representatives, "seed": seed}
    return Tree(nodes, n, params)


# ---------------------------------------------------------------------- sidecar
#: version of the ``NAME.hierarchy.npz`` layout (:func:`tree_to_arrays`)
TREE_FORMAT = 1
#: rows of the embeddings hashed by :func:`fingerprint`
FINGERPRINT_ROWS = 256


class HierarchyFileError(ValueError):
    """A stored hierarchy is unreadable, corrupt or belongs to other embeddings."""


def fingerprint(embeddings) -> str:
    """A short hash of the embeddings as stored (shape and :data:`FINGERPRINT_ROWS` evenly
    spaced rows, as float16): cheap on a 1M-row memory map, and it changes when the
    features file is rebuilt from other images. A stored hierarchy keeps the fingerprint of
    the embeddings it was built from."""
    import hashlib

    X = embeddings if isinstance(embeddings, np.ndarray) else np.asarray(embeddings)
    if X.ndim != 2:
        raise ValueError(f"embeddings must be 2-D, got shape {X.shape}")
    n = X.shape[0]
    rows = np.unique(np.linspace(0, max(n - 1, 0), min(n, FINGERPRINT_ROWS)).astype(np.int64))
    sample = np.ascontiguousarray(np.asarray(X[rows], dtype=np.float16))
    h = hashlib.sha256(f"{tuple(X.shape)}".encode())
    h.update(sample.tobytes())
    return h.hexdigest()[:32]


def tree_to_arrays(tree: Tree, fingerprint: str = "", source: str = "") -> dict[str, np.ndarray]:
    """The tree as flat integer arrays (what ``NAME.hierarchy.npz`` holds).

    Nodes in the tree's order (a parent before its children, siblings in id order):
    ``parent`` (index of each node's parent, -1 for the root), ``members`` (every node's
    ascending member rows, one after another) with ``member_offsets``, ``representatives``
    with ``rep_offsets``, and ``meta`` (JSON: format, image count, parameters,
    ``fingerprint``, and ``source``: what the build knows of the images, e.g. a digest of
    their content hashes). Ids are not stored: a child's id is its parent's id and its place
    among its siblings."""
    import json

    nodes = list(tree.nodes.values())
    index = {node.id: i for i, node in enumerate(nodes)}
    for node in nodes:
        for j, c in enumerate(node.children, start=1):
            if c != f"{node.id}-{j}" or index[c] <= index[node.id]:
                raise ValueError(f"tree node {c!r} is out of order under {node.id!r}")
    itype = np.int32 if tree.n_images < 2**31 else np.int64
    parent = np.asarray([-1 if n.parent is None else index[n.parent] for n in nodes], np.int32)
    members = np.concatenate([np.asarray(n.members, itype) for n in nodes])
    reps = np.concatenate([np.asarray(n.representatives, itype) for n in nodes])
    meta = {"format": TREE_FORMAT, "n_images": int(tree.n_images), "params": tree.params,
            "fingerprint": str(fingerprint), "source": str(source)}
    return {
        "meta": np.array(json.dumps(meta)),
        "parent": parent,
        "member_offsets": np.concatenate([[0], np.cumsum([n.count for n in nodes])]).astype(np.int64),
        "members": members,
        "rep_offsets": np.concatenate([[0], np.cumsum([len(n.representatives) for n in nodes])]
                                      ).astype(np.int64),
        "representatives": reps,
    }


def _bad(msg: str) -> HierarchyFileError:
    return HierarchyFileError(f"stored hierarchy: {msg}")


def _int_array(arrays, key: str) -> np.ndarray:
    if key not in arrays:
        raise _bad(f"no {key!r} array")
    a = np.asarray(arrays[key])
    if a.ndim != 1 or not np.issubdtype(a.dtype, np.integer):
        raise _bad(f"{key!r} must be a 1-D integer array, got {a.dtype} of shape {a.shape}")
    return a


def _offsets(arrays, key: str, n_nodes: int, total: int, *, min_each: int) -> np.ndarray:
    off = _int_array(arrays, key)
    if len(off) != n_nodes + 1 or off[0] != 0 or off[-1] != total:
        raise _bad(f"{key!r} does not span its {total:,} values in {n_nodes:,} nodes")
    if (np.diff(off) < min_each).any():
        raise _bad(f"{key!r} gives a node fewer than {min_each} value(s)")
    return off


def tree_from_arrays(arrays, n_images: int, *, fingerprint: str | None = None,
                     params: dict | None = None, source: str | None = None) -> Tree:
    """The :class:`Tree` of :func:`tree_to_arrays`' arrays, checked.

    Raises :class:`HierarchyFileError` (a ``ValueError``) saying what is wrong when the
    arrays are malformed, when they hold another number of images than ``n_images``, or
    (when given) another ``fingerprint``, ``source`` or other ``params`` (``branching``,
    ``min_size`` ...) than the caller's. Member arrays are views into ``arrays`` (one copy)."""
    import json

    n_images = _check_int("n_images", n_images, 0)
    try:
        meta = json.loads(str(np.asarray(arrays["meta"])[()]))
    except (KeyError, ValueError, TypeError, RecursionError) as exc:
        raise _bad(f"no readable 'meta' entry ({type(exc).__name__})") from None
    if not isinstance(meta, dict) or meta.get("format") != TREE_FORMAT:
        got = meta.get("format") if isinstance(meta, dict) else meta
        raise _bad(f"format {got!r}, this version reads format {TREE_FORMAT}")
    if meta.get("n_images") != n_images:
        raise _bad(f"built for {meta.get('n_images')!r} images, the table has {n_images:,}")
    if fingerprint is not None and meta.get("fingerprint") != fingerprint:
        raise _bad("built from other embeddings (the features file changed since)")
    if source is not None and meta.get("source") != source:
        raise _bad("built from other images")
    stored = meta.get("params")
    if not isinstance(stored, dict):
        raise _bad("no parameters")
    if params is not None:
        diff = {k: (stored.get(k), v) for k, v in params.items() if stored.get(k) != v}
        if diff:
            raise _bad("built with other parameters: " + ", ".join(
                f"{k} {a!r} (wanted {b!r})" for k, (a, b) in diff.items()))
    max_depth = stored.get("max_depth", 8)
    branching = stored.get("branching", 16)
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in (max_depth, branching)) \
            or not (0 <= max_depth <= 64 and 2 <= branching <= 4096):
        raise _bad(f"max_depth {max_depth!r} / branching {branching!r} out of range")
    parent = _int_array(arrays, "parent")
    n_nodes = len(parent)
    if n_nodes == 0 or parent[0] != -1:
        raise _bad("the first node is not the root")
    if n_nodes > 1 and ((parent[1:] < 0) | (parent[1:] >= np.arange(1, n_nodes))).any():
        raise _bad("a node's parent does not come before it")
    members = _int_array(arrays, "members")
    reps = _int_array(arrays, "representatives")
    moff = _offsets(arrays, "member_offsets", n_nodes, len(members), min_each=1)
    roff = _offsets(arrays, "rep_offsets", n_nodes, len(reps), min_each=0)
    for key, a in (("members", members), ("representatives", reps)):
        if len(a) and (a.min() < 0 or a.max() >= n_images):
            raise _bad(f"{key!r} holds rows outside 0..{n_images - 1}")
    if moff[1] != n_images or not np.array_equal(members[:n_images], np.arange(n_images)):
        raise _bad("the root does not hold every image once")
    if len(members) > 1:
        rising = np.diff(members) > 0
        inner = moff[1:-1]
        rising[inner[(inner > 0) & (inner < len(members))] - 1] = True  # node boundaries
        if not rising.all():
            raise _bad("a node's members are not ascending")
    counts = np.diff(moff)
    if n_nodes > 1:
        kids = np.bincount(parent[1:], minlength=n_nodes)
        below = np.bincount(parent[1:], weights=counts[1:], minlength=n_nodes)
        inner_nodes = kids > 0
        if (kids > branching).any() or (below[inner_nodes] != counts[inner_nodes]).any():
            raise _bad("a node's groups do not add up to it")
    # plain Python values in the loop: numpy scalars cost several times more per node
    par_of, mo, ro = parent.tolist(), moff.tolist(), roff.tolist()
    root = Node("root", None, 0, members[:mo[1]], reps[:ro[1]])
    nodes: dict[str, Node] = {"root": root}
    made = [root]
    for i in range(1, n_nodes):
        up = made[par_of[i]]
        if up.depth >= max_depth:
            raise _bad(f"deeper than max_depth {max_depth}")
        gid = f"{up.id}-{len(up.children) + 1}"
        up.children.append(gid)
        node = Node(gid, up.id, up.depth + 1, members[mo[i]:mo[i + 1]], reps[ro[i]:ro[i + 1]])
        made.append(node)
        nodes[gid] = node
    return Tree(nodes, n_images, dict(stored))


def save_tree(path, tree: Tree, fingerprint: str = "", source: str = "") -> Path:
    """Write ``NAME.hierarchy.npz`` (:func:`tree_to_arrays`, uncompressed) atomically."""
    import io

    from explorer.table import atomic_write_bytes

    buf = io.BytesIO()
    np.savez(buf, **tree_to_arrays(tree, fingerprint, source))
    return atomic_write_bytes(path, buf.getvalue())


def load_tree(path, n_images: int, *, fingerprint: str | None = None,
              params: dict | None = None, source: str | None = None) -> Tree:
    """The hierarchy stored in ``NAME.hierarchy.npz`` (see :func:`tree_from_arrays`).

    Raises :class:`HierarchyFileError` naming the file when it is missing, unreadable,
    larger than a hierarchy of ``n_images`` can be, corrupt, or made for other embeddings or
    parameters; never runs code from the file (no pickles)."""
    import zipfile

    path = Path(path)
    # a member array holds every image once per level: refuse more before reading anything
    limit = 8 * (n_images + 1) * 66 + (1 << 20)
    try:
        with zipfile.ZipFile(path) as zf:
            big = [i.filename for i in zf.infolist() if i.file_size > limit]
            if big:
                raise HierarchyFileError(f"{path.name}: {big[0]} is larger than a hierarchy of "
                                         f"{n_images:,} images can be")
        with np.load(path, allow_pickle=False) as f:
            arrays = {k: f[k] for k in f.files}
    except HierarchyFileError:
        raise
    except Exception as exc:  # any corrupt or hostile file (bad zip, header, compression ...)
        raise HierarchyFileError(f"cannot read {path.name}: {exc}") from None
    try:
        return tree_from_arrays(arrays, n_images, fingerprint=fingerprint, params=params,
                                source=source)
    except HierarchyFileError as exc:
        raise HierarchyFileError(f"{path.name}: {exc}") from None
