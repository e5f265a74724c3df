"""Treemap of the group hierarchy: one level at a time, tiles sized by image count.

Pure functions over :class:`explorer.stages.hierarchy.Tree` (no Bokeh, no files):

``squarify(sizes, width, height)``
    the squarified treemap layout (Bruls, Huizing and van Wijk, 2000): rectangles whose
    areas are proportional to ``sizes``, as close to squares as the greedy rule gets them,
    largest at the top left.

``level_tiles(tree, group_id, width, height, codes=None, selected=None, names=None)``
    one drawable level: the open group's sub-groups (the group itself when it is a leaf),
    each with its rectangle, image count, representative row, the dominant value of a
    colour column (``codes``: one int code per row) and how many of its images are in a
    selection (``selected``: a boolean mask over the rows).

Cost: the layout is O(k log k) for k <= branching tiles; counting dominant codes and
selected images touches each member row once, so a level over 1,000,000 rows costs one
pass over an int array (tens of milliseconds), whatever the depth.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["squarify", "Tiles", "level_tiles"]


def _worst(row_sum: float, row_max: float, row_min: float, side: float) -> float:
    """The worst aspect ratio of a row of areas laid along ``side``."""
    s2, w2 = row_sum * row_sum, side * side
    return max(w2 * row_max / s2, s2 / (w2 * row_min))


def squarify(sizes, width: float = 1.0, height: float = 1.0) -> np.ndarray:
    """Rectangles ``(left, bottom, right, top)`` with areas proportional to ``sizes``.

    ``sizes`` are positive numbers, laid out in the order given (pass them largest first
    for the squarest tiles); the rectangles tile ``[0, width] x [0, height]`` exactly, the
    first at the top left. Raises ``ValueError`` for an empty, negative, zero or non-finite
    size, or a non-positive width or height.
    """
    a = np.asarray(sizes, dtype=np.float64).ravel()
    if a.size == 0:
        raise ValueError("sizes is empty: nothing to lay out")
    if not np.all(np.isfinite(a)) or np.any(a <= 0):
        raise ValueError(f"sizes must be positive and finite, got {a.tolist()!r}")
    if not (np.isfinite(width) and np.isfinite(height)) or width <= 0 or height <= 0:
        raise ValueError(f"width and height must be positive, got {width!r} x {height!r}")
    areas = a * (width * height / a.sum())
    out = np.zeros((a.size, 4), dtype=np.float64)
    x, top, w, h = 0.0, float(height), float(width), float(height)  # free rectangle
    i, n = 0, a.size
    while i < n:
        side = min(w, h)
        j, s, mx, mn = i + 1, areas[i], areas[i], areas[i]
        while j < n:
            s2, mx2, mn2 = s + areas[j], max(mx, areas[j]), min(mn, areas[j])
            if _worst(s2, mx2, mn2, side) > _worst(s, mx, mn, side):
                break
            s, mx, mn, j = s2, mx2, mn2, j + 1
        last = j == n  # the last row fills what is left (no rounding gap)
        if w >= h:  # a column on the left of the free rectangle
            cw = w if last else s / h
            y = top
            for k in range(i, j):
                rh = h if (last and j - i == 1) else areas[k] / cw
                bottom = top - h if k == j - 1 else y - rh
                out[k] = (x, bottom, x + cw, y)
                y = bottom
            x, w = x + cw, w - cw
        else:  # a row along the top of the free rectangle
            rh = h if last else s / w
            xx = x
            for k in range(i, j):
                cw = areas[k] / rh
                right = x + w if k == j - 1 else xx + cw
                out[k] = (xx, top - rh, right, top)
                xx = right
            top, h = top - rh, h - rh
        i = j
    return out


@dataclass
class Tiles:
    """One level of the treemap, one entry per tile (arrays of equal length)."""

    group_id: str
    """The open group (``"root"``, ``"root-3"``...)."""
    ids: list[str]
    """Each tile's group id."""
    counts: np.ndarray
    """Images in each tile (int64)."""
    rects: np.ndarray
    """(k, 4) ``left, bottom, right, top`` in the ``width x height`` box."""
    representative: np.ndarray
    """A representative row per tile (the member nearest the tile's centroid)."""
    dominant: np.ndarray
    """The most frequent code among each tile's rows (-1 without ``codes``)."""
    dominant_share: np.ndarray
    """The share of the tile's rows that have the dominant code (0 without ``codes``)."""
    selected: np.ndarray
    """How many of each tile's rows are selected (0 without ``selected``)."""
    leaf: bool
    """The open group is not split further (its one tile is itself)."""


def level_tiles(tree, group_id: str = "root", width: float = 1.0, height: float = 1.0, *,
                codes: np.ndarray | None = None, selected: np.ndarray | None = None) -> Tiles:
    """The tiles of group ``group_id``'s level of ``tree`` (see the module docstring).

    ``codes``: one non-negative int per row of the tree (a colour column's codes), or
    None. ``selected``: a boolean mask over the rows, or None. Raises ``KeyError`` (from
    the tree) for an unknown group and ``ValueError`` for arrays of the wrong length.
    """
    node = tree.node(group_id)
    n = tree.n_images
    for name, arr in (("codes", codes), ("selected", selected)):
        if arr is not None and len(arr) != n:
            raise ValueError(f"{name} has {len(arr):,} rows, the hierarchy {n:,}")
    children = tree.children(node.id)
    nodes = children or [node]
    counts = np.asarray([c.count for c in nodes], dtype=np.int64)
    order = np.argsort(-counts, kind="stable")  # largest first: squarest layout
    nodes = [nodes[i] for i in order]
    counts = counts[order]
    rects = squarify(counts, width, height)
    k = len(nodes)
    dominant = np.full(k, -1, dtype=np.int64)
    share = np.zeros(k)
    chosen = np.zeros(k, dtype=np.int64)
    if codes is not None:
        codes = np.asarray(codes)
        for t, c in enumerate(nodes):
            bc = np.bincount(codes[c.members])
            dominant[t] = int(bc.argmax())
            share[t] = bc[dominant[t]] / max(c.count, 1)
    if selected is not None:
        selected = np.asarray(selected, dtype=bool)
        for t, c in enumerate(nodes):
            chosen[t] = int(np.count_nonzero(selected[c.members]))
    reps = np.asarray([int(c.representatives[0]) if len(c.representatives) else int(c.members[0])
                       for c in nodes], dtype=np.int64)
    return Tiles(node.id, [c.id for c in nodes], counts, rects, reps, dominant, share, chosen,
                 leaf=not children)
