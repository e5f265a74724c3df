"""Near-duplicate grouping: scalable phash links, the incremental index, CNN + ORB.

Pure stages (arrays in, arrays out): the build's ``duplicates`` stage
(:mod:`explorer.stages.pipeline`) and ``explorer dedupe --method`` group with these; the keep
rules that act on the groups are :mod:`explorer.curation.dedupe`.

Grouping
--------
:func:`hamming_links` finds every pair of 64-bit hashes within a Hamming radius without an
all-pairs matrix: multi-index hashing. The 64 bits are split into ``m`` chunks; two hashes
within radius ``r`` differ in at most ``r // m`` bits on at least one chunk (pigeonhole), so
each hash only looks into the buckets of its chunk values' ``r // m``-bit neighbourhoods
(direct-addressed tables, at most 22 bits a chunk). A pair found in several chunks is kept
only in the first one that finds it. The kernel is compiled with numba and runs over the
queries in parallel. Identical hashes are collapsed first (each copy is linked to the first
one), so a thousand copies of one blank image cost one query.

:class:`DuplicateIndex` keeps the hashes seen so far (keyed, e.g. by path or content hash)
and their links: :meth:`DuplicateIndex.update` queries only the keys it has not seen against
everything, so a re-run with a few new images checks only those (``n_queried``). Groups are
the connected components of the links (:func:`explorer.stages.similarity.components`: -1 = no
near-duplicate, groups numbered by their first member).
"""

from __future__ import annotations

import os
from itertools import combinations
from math import comb
from pathlib import Path
from typing import Sequence

import numpy as np
from numba import njit, prange

from explorer.stages.similarity import DEFAULT_THRESHOLDS, components, max_distance_for

#: default Hamming radius: the project's phash threshold (similarity 0.84 = 10 of 64 bits)
DEFAULT_MAX_DISTANCE = max_distance_for(DEFAULT_THRESHOLDS["phash"])

#: the largest Hamming radius :func:`hamming_links` takes
MAX_RADIUS = 16

_MAX_WIDTH = 22  # bits per chunk: direct-addressed bucket tables of 2**22 + 1 int32


def _check_radius(max_distance) -> int:
    r = int(max_distance)
    if r != max_distance or not 0 <= r <= MAX_RADIUS:
        raise ValueError(f"max_distance must be an integer in [0, {MAX_RADIUS}]; "
                         f"got {max_distance!r}")
    return r


# =========================================================================== index kernel
def _chunks(m: int) -> list[tuple[int, int]]:
    widths = [64 // m + (1 if k < 64 % m else 0) for k in range(m)]
    out, shift = [], 0
    for w in widths:
        out.append((shift, w))
        shift += w
    return out


def _ball(width: int, radius: int) -> list[int]:
    masks = [0]
    for r in range(1, min(radius, width) + 1):
        for pos in combinations(range(width), r):
            masks.append(sum(1 << p for p in pos))
    return masks


def n_chunks(n: int, radius: int) -> int:
    """Chunks for ``n`` hashes and ``radius``: the fewest bucket look-ups plus expected
    candidates for uniform hashes, with chunks of at most 22 bits."""
    best, best_cost = 3, float("inf")
    for m in range(3, 17):
        w = 64 // m
        sub = radius // m
        ball = sum(comb(w, k) for k in range(sub + 1))
        # a look-up costs more once the bucket table outgrows the CPU caches (measured)
        lookup = 2.0 if 2 ** w <= 2 ** 17 else 20.0
        cost = n * m * ball * lookup + m * ball * n * n / 2.0 ** w / 2
        if cost < best_cost:
            best, best_cost = m, cost
    return best


@njit(inline="always", cache=True)
def _popcount(x):
    x = x - ((x >> np.uint64(1)) & np.uint64(0x5555555555555555))
    x = (x & np.uint64(0x3333333333333333)) + ((x >> np.uint64(2)) & np.uint64(0x3333333333333333))
    x = (x + (x >> np.uint64(4))) & np.uint64(0x0F0F0F0F0F0F0F0F)
    return (x * np.uint64(0x0101010101010101)) >> np.uint64(56)


@njit(inline="always", cache=True)
def _visit(i, h, shifts, wmasks, starts, members, sorted_h, balls, nball, r, sub, out_j, at):
    """Links of query ``i`` with earlier hashes: count them, or write them at ``at``.
    A bucket is scanned in memory order (``sorted_h``: the hashes in bucket order)."""
    hi = h[i]
    m = len(shifts)
    found = 0
    for c in range(m):
        key = (hi >> shifts[c]) & wmasks[c]
        for b in range(nball[c]):
            k2 = np.int64(key ^ balls[c, b])
            for p in range(starts[c, k2], starts[c, k2 + 1]):
                j = members[c, p]
                if j >= i:
                    break  # members of a bucket are in index order
                x = hi ^ sorted_h[c, p]
                if _popcount(x) > r:
                    continue
                first = True  # count a pair only in the first chunk that finds it
                for c2 in range(c):
                    if _popcount((x >> shifts[c2]) & wmasks[c2]) <= sub:
                        first = False
                        break
                if first:
                    if at >= 0:
                        out_j[at + found] = j
                    found += 1
    return found


@njit(parallel=True, cache=True)
def _count(h, q0, shifts, wmasks, starts, members, sorted_h, balls, nball, r, sub):
    n = len(h)
    cnt = np.zeros(n - q0, np.int64)
    dummy = np.empty(0, np.int64)
    for t in prange(n - q0):
        cnt[t] = _visit(q0 + t, h, shifts, wmasks, starts, members, sorted_h, balls, nball,
                        r, sub, dummy, -1)
    return cnt


@njit(parallel=True, cache=True)
def _fill(h, queries, offsets, shifts, wmasks, starts, members, sorted_h, balls, nball, r,
          sub, out_j):
    for t in prange(len(queries)):
        _visit(queries[t], h, shifts, wmasks, starts, members, sorted_h, balls, nball, r, sub,
               out_j, offsets[t])


def _unique_links(h: np.ndarray, r: int, q0: int):
    """Links ``(i, j)``, j < i, i >= q0, between DISTINCT hashes ``h`` within ``r`` bits."""
    n = len(h)
    if n - q0 <= 0 or n < 2:
        return np.empty(0, np.int64), np.empty(0, np.int64), 0
    m = n_chunks(n, r)
    sub = r // m
    chunks = _chunks(m)
    wmax = max(w for _, w in chunks)
    if wmax > _MAX_WIDTH:
        raise ValueError(f"internal: chunk of {wmax} bits")
    shifts = np.array([s for s, _ in chunks], np.uint64)
    wmasks = np.array([(1 << w) - 1 for _, w in chunks], np.uint64)
    idx_dtype = np.int32 if n < 2**31 else np.int64
    starts = np.zeros((m, 2 ** wmax + 1), np.int64 if n >= 2**31 else np.int32)
    members = np.empty((m, n), idx_dtype)
    sorted_h = np.empty((m, n), np.uint64)
    for c, (s, w) in enumerate(chunks):
        keys = ((h >> np.uint64(s)) & np.uint64((1 << w) - 1)).astype(np.int64)
        members[c] = np.argsort(keys, kind="stable")
        sorted_h[c] = h[members[c]]
        starts[c, 1:2 ** w + 1] = np.cumsum(np.bincount(keys, minlength=2 ** w))
        starts[c, 2 ** w + 1:] = n
    ball_lists = [_ball(w, sub) for _, w in chunks]
    nball = np.array([len(b) for b in ball_lists], np.int64)
    balls = np.zeros((m, int(nball.max())), np.uint64)
    for c, b in enumerate(ball_lists):
        balls[c, :len(b)] = b
    cnt = _count(h, q0, shifts, wmasks, starts, members, sorted_h, balls, nball, r, sub)
    hit = np.flatnonzero(cnt)
    queries = (hit + q0).astype(np.int64)
    offsets = np.concatenate([[0], np.cumsum(cnt[hit])[:-1]]).astype(np.int64)
    out_j = np.empty(int(cnt.sum()), np.int64)
    if len(queries):
        _fill(h, queries, offsets, shifts, wmasks, starts, members, sorted_h, balls, nball, r,
             sub, out_j)
    out_i = np.repeat(queries, cnt[hit])
    return out_i, out_j, n - q0


def hamming_links(hashes, max_distance: int = DEFAULT_MAX_DISTANCE, *, start: int = 0):
    """Links ``(i, j)`` with ``i >= start`` and ``j < i`` between uint64 hashes within
    ``max_distance`` bits; the connected components of the links are exactly those of all
    pairs within the radius. ``start > 0`` checks only ``hashes[start:]`` (new images)
    against everything before them and among themselves.

    Returns ``(i, j, n_queried)``: ``n_queried`` distinct new hash values were looked up.
    """
    h = np.asarray(hashes, dtype=np.uint64).ravel()
    r = _check_radius(max_distance)
    n = len(h)
    start = int(start)
    if not 0 <= start <= n:
        raise ValueError(f"start must be in [0, {n}]; got {start}")
    # identical hashes: copies link to the first occurrence; distinct values in the order of
    # their first occurrence, so "earlier" keeps its meaning
    uniq, first, inv = np.unique(h, return_index=True, return_inverse=True)
    order = np.argsort(first, kind="stable")
    rank = np.empty(len(uniq), np.int64)
    rank[order] = np.arange(len(uniq))
    u_first = first[order]
    u_hash = uniq[order]
    copy_j = u_first[rank[inv]]  # the first occurrence of each row's value
    rows = np.arange(start, n)
    is_copy = copy_j[start:] != rows
    out_i, out_j = [rows[is_copy]], [copy_j[start:][is_copy]]
    q0 = int(np.searchsorted(u_first, start))  # distinct values first seen at >= start
    ui, uj, nq = _unique_links(u_hash, r, q0)
    out_i.append(u_first[ui])
    out_j.append(u_first[uj])
    return (np.concatenate(out_i).astype(np.int64), np.concatenate(out_j).astype(np.int64),
            int(nq))


def group_hashes(hashes, max_distance: int = DEFAULT_MAX_DISTANCE) -> np.ndarray:
    """Near-duplicate groups of uint64 phashes: labels (N,), -1 = no near-duplicate."""
    h = np.asarray(hashes, dtype=np.uint64).ravel()
    i, j, _ = hamming_links(h, max_distance)
    return components(len(h), i, j)


class DuplicateIndex:
    """Hashes seen so far, their links and stable group ids; :meth:`update` checks only new
    keys.

    ``keys`` identify images across runs (paths, or path + content hash). Save it with
    :meth:`save` and load it with :meth:`load` to carry it from one run to the next.

    Group ids are stable: a group keeps its id while it grows, a merge keeps the smallest
    id of the groups it joins, and a new group gets the next unused id. From scratch (or
    when every group is new) the ids are those of :func:`group_hashes` on the keys in the
    order they were added (numbered by their first member).
    """

    def __init__(self, max_distance: int = DEFAULT_MAX_DISTANCE, source: str = ""):
        self.max_distance = _check_radius(max_distance)
        self.source = str(source)  # what the hashes are (a run with other hashes starts anew)
        self.keys: list[str] = []
        self.hashes = np.empty(0, np.uint64)
        self.link_i = np.empty(0, np.int64)
        self.link_j = np.empty(0, np.int64)
        self.ids = np.empty(0, np.int64)  # the group id of every key (-1 = none)
        self.next_id = 0  # ids are never reused
        self._pos: dict[str, int] = {}
        self.n_queried = 0  # distinct new hash values the last update looked up

    def __len__(self) -> int:
        return len(self.keys)

    def update(self, keys: Sequence[str], hashes) -> np.ndarray:
        """Add the keys not seen before (their hash; a known key keeps its first hash),
        link them to everything, and return the group id of each key asked for (-1 = none)."""
        keys = [str(k) for k in keys]
        h = np.asarray(hashes, dtype=np.uint64).ravel()
        if len(h) != len(keys):
            raise ValueError(f"{len(keys)} keys but {len(h)} hashes")
        new = [k for k in range(len(keys)) if keys[k] not in self._pos]
        seen: set[str] = set()
        new = [k for k in new if not (keys[k] in seen or seen.add(keys[k]))]
        start = len(self.keys)
        for k in new:
            self._pos[keys[k]] = len(self.keys)
            self.keys.append(keys[k])
        self.hashes = np.concatenate([self.hashes, h[new]])
        i, j, nq = hamming_links(self.hashes, self.max_distance, start=start)
        self.link_i = np.concatenate([self.link_i, i])
        self.link_j = np.concatenate([self.link_j, j])
        self.n_queried = nq
        self._renumber()
        return self.ids[[self._pos[k] for k in keys]]

    def retain(self, keys: Sequence[str]) -> int:
        """Forget every key not in ``keys`` (images that are gone); returns how many were
        forgotten. The groups of the rest are then those of a grouping from scratch: when
        anything is forgotten the links of the rest are looked up again (a removed image
        may have been the link between two others), and the ids stay stable as in
        :meth:`update` (a group that splits keeps its id in the part with its first member)."""
        want = set(map(str, keys))
        keep = np.array([k in want for k in self.keys], bool)
        gone = int((~keep).sum())
        if gone == 0:
            return 0
        old_ids = self.ids[keep]
        self.keys = [k for k, w in zip(self.keys, keep) if w]
        self._pos = {k: n for n, k in enumerate(self.keys)}
        self.hashes = self.hashes[keep]
        self.link_i, self.link_j, self.n_queried = hamming_links(self.hashes, self.max_distance)
        self.ids = old_ids
        self._renumber()
        return gone

    def labels(self) -> np.ndarray:
        """The group id of every key in the index, in the order they were added."""
        return self.ids.copy()

    def _renumber(self) -> None:
        """Stable ids for the connected components of the links (see the class doc)."""
        comp = components(len(self.keys), self.link_i, self.link_j)
        self.ids = stable_ids(comp, np.concatenate(
            [self.ids, np.full(len(self.keys) - len(self.ids), -1, np.int64)]), self.next_id)
        self.next_id = max(self.next_id, int(self.ids.max(initial=-1)) + 1)

    def save(self, path: str | os.PathLike) -> Path:
        from explorer.table import atomic_write_bytes

        import io

        buf = io.BytesIO()
        np.savez_compressed(buf, keys=np.array(self.keys, dtype=object).astype(str),
                            hashes=self.hashes, i=self.link_i, j=self.link_j, ids=self.ids,
                            next_id=np.int64(self.next_id), source=np.array(self.source),
                            max_distance=np.int64(self.max_distance))
        return atomic_write_bytes(path, buf.getvalue())

    @classmethod
    def load(cls, path: str | os.PathLike) -> "DuplicateIndex":
        with np.load(path, allow_pickle=False) as z:
            ix = cls(int(z["max_distance"]), str(z["source"]) if "source" in z.files else "")
            ix.keys = [str(k) for k in z["keys"]]
            ix.hashes = z["hashes"].astype(np.uint64)
            ix.link_i = z["i"].astype(np.int64)
            ix.link_j = z["j"].astype(np.int64)
            if "ids" in z.files:
                ix.ids = z["ids"].astype(np.int64)
                ix.next_id = int(z["next_id"])
        ix._pos = {k: n for n, k in enumerate(ix.keys)}
        if len(ix.ids) != len(ix.keys):  # an index saved before ids were kept
            ix.ids = np.empty(0, np.int64)
            ix._renumber()
        return ix


def load_index(path: str | os.PathLike) -> "DuplicateIndex | None":
    """The index saved at ``path``, or None when there is none or it cannot be read (the
    caller then groups from scratch)."""
    if not Path(path).is_file():
        return None
    try:
        return DuplicateIndex.load(path)
    except Exception:  # noqa: BLE001 - an unreadable index only means a full regroup
        return None


def regroup(index: "DuplicateIndex | None", keys: Sequence[str], hashes,
            max_distance: int = DEFAULT_MAX_DISTANCE, *, source: str = ""):
    """The groups of ``keys`` (their ``hashes``), reusing ``index`` (the previous run's):
    ``(labels, index)``. Keys that are gone are forgotten, new keys are looked up (only
    they, unless something was forgotten), known keys keep their group ids. An index of
    another radius or ``source`` is not reused. Above :data:`MAX_RADIUS` bits (multi-index
    hashing gets no faster than all pairs) :func:`explorer.stages.similarity.group_hashes` groups
    from scratch and the index is None."""
    r = int(max_distance)
    if r > MAX_RADIUS:
        from explorer.stages.similarity import group_hashes as group_all_pairs

        return group_all_pairs(np.asarray(hashes, np.uint64), r), None
    if index is None or index.max_distance != r or index.source != str(source):
        index = DuplicateIndex(r, source)
    index.retain(keys)
    labels = index.update(keys, hashes)
    return labels, index


def stable_ids(comp, old, next_id: int = 0) -> np.ndarray:
    """Group ids for the components ``comp`` (-1 = none; numbered by first member) given
    each row's ``old`` id (-1 = new or none): a component takes the smallest old id among
    its members; when several components claim one old id (a split) the one numbered first
    keeps it; the others, and components without an old id, get ``next_id``, ``next_id + 1``
    ... (at least one more than every old id) in component order."""
    comp = np.asarray(comp, np.int64)
    old = np.asarray(old, np.int64)
    if comp.shape != old.shape:
        raise ValueError(f"comp has {len(comp)} rows, old {len(old)}")
    n_comp = int(comp.max(initial=-1)) + 1
    claim = np.full(n_comp, np.iinfo(np.int64).max)
    has = (comp >= 0) & (old >= 0)
    np.minimum.at(claim, comp[has], old[has])
    claimed = claim < np.iinfo(np.int64).max
    # a split: only the first component (lowest number) claiming an old id keeps it
    c_ids = np.flatnonzero(claimed)
    _, first = np.unique(claim[c_ids], return_index=True)
    keeps = np.zeros(n_comp, bool)
    keeps[c_ids[first]] = True
    out_of = np.empty(n_comp, np.int64)
    out_of[keeps] = claim[keeps]
    fresh = np.flatnonzero(~keeps)
    start = max(int(next_id), int(old.max(initial=-1)) + 1)
    out_of[fresh] = start + np.arange(len(fresh))
    ids = np.full(len(comp), -1, np.int64)
    ids[comp >= 0] = out_of[comp[comp >= 0]]
    return ids


# =========================================================================== cnn + orb
#: the method names ``explorer dedupe --method`` groups by (``duplicate_group``: the build's
#: column as it is)
GROUP_METHODS: tuple[str, ...] = ("duplicate_group", "cnn+orb")

#: ``cnn+orb``: a pair is linked when the mean of its CNN cosine and its ORB similarity
#: (:mod:`explorer.stages.similarity`) is at least this. Fixed before it was measured (an earlier
#: run's calibration-chosen 0.414 missed precision 0.95 on held-out photos by 0.005; 0.45
#: adds a margin), then measured with ``bench/dedupe.py --sweep`` on photos it was not
#: chosen on: docs/dedupe.md has the table and the whole precision/recall sweep.
CNN_ORB_THRESHOLD = 0.45

#: ``cnn+orb``: only the ``CNN_NEIGHBOURS`` nearest images by cosine with a cosine of at
#: least ``CNN_MIN_COSINE`` are candidates (ORB is computed for candidates only)
CNN_MIN_COSINE = 0.5
CNN_NEIGHBOURS = 10


def embedding_candidates(vectors, *, min_cosine: float = CNN_MIN_COSINE,
                         k: int = CNN_NEIGHBOURS):
    """Candidate pairs ``(i, j, cosine)``, i < j, each listed once: j among the ``k``
    nearest rows of i by cosine (or i among j's), with cosine >= ``min_cosine``.
    No all-pairs matrix: :func:`explorer.stages.knn.knn_graph` (exact for small N, approximate
    nearest-neighbour descent above)."""
    from explorer.stages.knn import knn_graph

    X = np.asarray(vectors, np.float32)
    if X.ndim != 2:
        raise ValueError(f"vectors must be (N, D); got shape {X.shape}")
    if not -1.0 <= float(min_cosine) <= 1.0:
        raise ValueError(f"min_cosine must be in [-1, 1]; got {min_cosine!r}")
    if int(k) < 1:
        raise ValueError(f"k must be >= 1; got {k!r}")
    n = len(X)
    empty = np.empty(0, np.int64)
    if n < 2:
        return empty, empty, np.empty(0, np.float32)
    X = X / np.maximum(np.linalg.norm(X, axis=1, keepdims=True), 1e-12)
    g = knn_graph(X, int(k) + 1)
    a = np.repeat(np.arange(n), g.indices.shape[1] - 1)
    b = g.indices[:, 1:].ravel().astype(np.int64)
    ok = (b >= 0) & (b != a)
    lo, hi = np.minimum(a[ok], b[ok]), np.maximum(a[ok], b[ok])
    code = np.unique(lo * n + hi)
    i, j = code // n, code % n
    cos = np.einsum("ij,ij->i", X[i], X[j])
    keep = cos >= min_cosine
    return i[keep], j[keep], cos[keep].astype(np.float32)


def pair_orb(i, j, orb, rows) -> np.ndarray:
    """ORB similarity of the pairs ``(i[k], j[k])``; ``orb`` holds the ORB features
    (:class:`explorer.stages.similarity.OrbFeatures`) of ``rows`` (sorted), which contain every
    i and j. An image without keypoints scores 0."""
    from explorer.stages.similarity import pairwise_similarity

    i, j = np.asarray(i, np.int64), np.asarray(j, np.int64)
    rows = np.asarray(rows, np.int64)
    pi, pj = np.searchsorted(rows, i), np.searchsorted(rows, j)
    if len(i) and (pi.max() >= len(rows) or (rows[pi] != i).any() or pj.max() >= len(rows)
                   or (rows[pj] != j).any()):
        raise ValueError("rows must contain every image of the pairs")
    out = np.zeros(len(i), np.float32)
    order = np.argsort(pi, kind="stable")
    cut = np.flatnonzero(np.diff(pi[order])) + 1
    for part in np.split(order, cut):
        if len(part):
            out[part] = pairwise_similarity(orb[[pi[part[0]]]], "orb", orb[pj[part]])[0]
    return out


def group_cnn_orb(vectors, orb_of, *, threshold: float = CNN_ORB_THRESHOLD,
                  min_cosine: float = CNN_MIN_COSINE, k: int = CNN_NEIGHBOURS):
    """Near-duplicate groups by ``cnn+orb``: labels (N,), -1 = none.

    Candidates by CNN cosine (:func:`embedding_candidates`), verified by ORB keypoints: a
    pair is linked when ``(cosine + orb) / 2 >= threshold``. ``orb_of(rows)`` gives the
    :class:`explorer.stages.similarity.OrbFeatures` of those rows (the caller reads the images:
    only the candidates' are needed). Returns ``(labels, info)`` with the candidate and
    link counts."""
    if not 0.0 <= float(threshold) <= 1.0:
        raise ValueError(f"threshold must be in [0, 1]; got {threshold!r}")
    n = len(vectors)
    i, j, cos = embedding_candidates(vectors, min_cosine=min_cosine, k=k)
    rows = np.unique(np.concatenate([i, j]))
    score = (cos + pair_orb(i, j, orb_of(rows), rows)) / 2 if len(i) else cos
    link = score >= threshold
    info = {"method": "cnn+orb", "threshold": float(threshold), "min_cosine": float(min_cosine),
            "neighbours": int(k), "candidates": int(len(i)), "links": int(link.sum()),
            "orb_images": int(len(rows))}
    return components(n, i[link], j[link]), info


def orb_reader(paths: Sequence, resolve=None):
    """``orb_of(rows)`` for :func:`group_cnn_orb`: the ORB features of ``paths[rows]``,
    read from the files (``resolve(path)`` first, when given: e.g. a CSV path to its file
    under the image folder); a file that cannot be found or read has no keypoints (never
    linked by ORB)."""
    from explorer.stages.similarity import OrbFeatures, compute_features

    def orb_of(rows) -> OrbFeatures:
        rows = np.asarray(rows, np.int64)
        files, at = [], []
        for k, r in enumerate(rows):
            try:
                files.append(paths[r] if resolve is None else resolve(paths[r]))
            except ValueError:
                continue
            at.append(k)
        f, ok, _ = compute_features(files, "orb", progress=False)
        full = OrbFeatures(np.zeros((len(rows),) + f.desc.shape[1:], np.uint8),
                           np.zeros(len(rows), np.int64))
        put = np.asarray(at, np.int64)[ok]
        full.desc[put], full.n[put] = f.desc, f.n
        return full

    return orb_of


# =========================================================================== keep rules
