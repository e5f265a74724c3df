"""The map as a server-rendered image, and lasso geometry on the server (pure numpy).

Above :func:`image_threshold` points the browser gets neither the points nor a per-point
selection list: the server bins the points in view into a pixel grid (one ``np.bincount``
per colour channel, like datashader's categorical shading: a pixel's colour is the
weighted mean of its points' group colours, its opacity grows with their number) and sends
one RGBA image; a lasso or box arrives as its polygon and is resolved here
(:func:`points_in_polygon`). Nothing here touches Bokeh, files or the network.
"""

from __future__ import annotations

import os
from typing import Sequence

import numpy as np

__all__ = [
    "IMAGE_THRESHOLD", "image_threshold", "Shaded", "Binned", "shade", "bin_points", "shade_binned",
    "rgb_table", "padded_bounds", "ordered_bounds",
    "points_in_polygon", "points_in_rect", "nearest_point", "in_view",
]  # fmt: skip

#: above this many drawn points the map is an image. Measured with bench/app.py on the 2-core
#: machine (canvas, load ~11): 30k points drawn 3.4 s as dots / 2.1 s as an image, lasso ->
#: table 2.4 s / 1.1 s; 10k: 2.1 / 1.7 s and 1.1 / 0.8 s (within the noise). Dots keep the
#: hover tooltips, so they stay up to here.
IMAGE_THRESHOLD = 20_000
#: environment variable that overrides :data:`IMAGE_THRESHOLD` (tests, very fast machines)
THRESHOLD_ENV = "EXPLORER_IMAGE_MAP_ABOVE"
#: weight of an unselected point's colour while something is selected (selected ones: 1)
DIM_WEIGHT = 0.04
#: the most opaque an unselected-only pixel gets while something is selected
DIM_ALPHA = 0.22
#: opacity of a pixel holding total weight w: 1 - exp(-OPACITY * w)
OPACITY = 1.8


def image_threshold() -> int:
    """Points above which the map is drawn as an image (``$EXPLORER_IMAGE_MAP_ABOVE`` or
    :data:`IMAGE_THRESHOLD`). Raises ValueError for a value that is not a whole number >= 0."""
    raw = os.environ.get(THRESHOLD_ENV, "").strip()
    if not raw:
        return IMAGE_THRESHOLD
    try:
        value = int(raw)
    except ValueError:
        value = -1
    if value < 0:
        raise ValueError(f"{THRESHOLD_ENV} must be a whole number >= 0, got {raw!r}")
    return value


def rgb_table(palette: Sequence[str]) -> np.ndarray:
    """``#rrggbb`` colours as a (K, 3) float32 array of 0..255."""
    out = np.zeros((max(len(palette), 1), 3), dtype=np.float32)
    for i, c in enumerate(palette):
        c = c.lstrip("#")
        out[i] = [int(c[0:2], 16), int(c[2:4], 16), int(c[4:6], 16)]
    return out


def padded_bounds(x: np.ndarray, y: np.ndarray, padding: float = 0.1) -> tuple[float, float, float, float]:
    """(x0, x1, y0, y1) of the finite points, widened by ``padding`` of the span in all
    (Bokeh's DataRange1d default), never empty."""
    out = []
    for v in (x, y):
        v = v[np.isfinite(v)]
        lo, hi = (float(v.min()), float(v.max())) if len(v) else (0.0, 1.0)
        span = hi - lo
        pad = span * padding / 2 if span > 0 else 0.5
        out += [lo - pad, hi + pad]
    return out[0], out[1], out[2], out[3]


def in_view(x: np.ndarray, y: np.ndarray, bounds: Sequence[float]) -> np.ndarray:
    """Boolean mask of the points inside ``bounds`` = (x0, x1, y0, y1) (any order)."""
    x0, x1, y0, y1 = ordered_bounds(bounds)
    return (x >= x0) & (x <= x1) & (y >= y0) & (y <= y1)


def ordered_bounds(bounds: Sequence[float]) -> tuple[float, float, float, float]:
    """``bounds`` as ``(x0, x1, y0, y1)`` floats with ``x0 <= x1`` and ``y0 <= y1``;
    ``ValueError`` naming them when one is not finite."""
    x0, x1, y0, y1 = (float(b) for b in bounds)
    if not all(np.isfinite([x0, x1, y0, y1])):
        raise ValueError(f"bounds must be finite numbers, got {tuple(bounds)!r}")
    return min(x0, x1), max(x0, x1), min(y0, y1), max(y0, y1)


class Shaded:
    """One rendered map image: ``image`` (H, W) uint32 RGBA (row 0 at the bottom, as
    Bokeh's image_rgba draws it), the ``bounds`` it covers and ``n_drawn`` points in it."""

    __slots__ = ("image", "bounds", "n_drawn")

    def __init__(self, image: np.ndarray, bounds: tuple[float, float, float, float], n_drawn: int) -> None:
        self.image = image
        self.bounds = bounds
        self.n_drawn = n_drawn


def _disk(radius: int) -> list[tuple[int, int]]:
    r = int(radius)
    return [(dy, dx) for dy in range(-r, r + 1) for dx in range(-r, r + 1) if dy * dy + dx * dx <= r * r + r]


def _spread(grid: np.ndarray, radius: int) -> np.ndarray:
    """Sum of ``grid`` (C, H, W) over a disk of ``radius`` pixels around every pixel."""
    if radius <= 0:
        return grid
    c, h, w = grid.shape
    r = int(radius)
    pad = np.zeros((c, h + 2 * r, w + 2 * r), dtype=grid.dtype)
    pad[:, r : r + h, r : r + w] = grid
    out = np.zeros_like(grid)
    for dy, dx in _disk(r):
        out += pad[:, r + dy : r + dy + h, r + dx : r + dx + w]
    return out


class Binned:
    """Points in view and their pixel (from :func:`bin_points`); reused while only the
    colours or the selection change."""

    __slots__ = ("keep", "pix", "bounds", "shape")

    def __init__(self, keep: np.ndarray | None, pix: np.ndarray, bounds: tuple[float, float, float, float],
                 shape: tuple[int, int]) -> None:
        self.keep = keep  # positions of the points in view (None: all of them)
        self.pix = pix
        self.bounds = bounds
        self.shape = shape


def bin_points(x: np.ndarray, y: np.ndarray, bounds: Sequence[float], shape: tuple[int, int]) -> Binned:
    """The pixel (row-major, row 0 at the bottom) of every point inside ``bounds`` on a
    grid of ``shape`` = (height, width). Non-finite coordinates are never in view."""
    h, w = (int(s) for s in shape)
    if h < 1 or w < 1 or h * w > 16_000_000:
        raise ValueError(f"shape must be (height, width) with 1..16M pixels, got {tuple(shape)!r}")
    x0, x1, y0, y1 = ordered_bounds(bounds)
    if x1 <= x0 or y1 <= y0:
        raise ValueError(f"bounds must span a non-empty area, got {tuple(bounds)!r}")
    if len(x) != len(y):
        raise ValueError(f"x and y must have one value per point, got lengths {len(x)} and {len(y)}")
    mask = in_view(x, y, (x0, x1, y0, y1))
    keep: np.ndarray | None
    if mask.all():
        keep, xs, ys = None, x, y
    else:
        keep = np.flatnonzero(mask)
        xs, ys = x[keep], y[keep]
    fx = np.float32(w / (x1 - x0))
    fy = np.float32(h / (y1 - y0))
    ix = ((xs - np.float32(x0)) * fx).astype(np.int32)
    np.clip(ix, 0, w - 1, out=ix)
    iy = ((ys - np.float32(y0)) * fy).astype(np.int32)
    np.clip(iy, 0, h - 1, out=iy)
    iy *= w
    iy += ix
    return Binned(keep, iy, (x0, x1, y0, y1), (h, w))


def shade_binned(
    binned: Binned,
    codes: np.ndarray,
    colors: np.ndarray,
    alphas: np.ndarray,
    selected: np.ndarray | None = None,
    radius: int = 0,
) -> Shaded:
    """The RGBA image of binned points (see :func:`shade`)."""
    if radius < 0 or radius > 16:
        raise ValueError(f"radius must be 0..16 pixels, got {radius!r}")
    h, w = binned.shape
    npx = h * w
    keep, pix = binned.keep, binned.pix
    k = len(colors)
    alphas = np.asarray(alphas, dtype=np.float64)
    if len(alphas) != k:
        raise ValueError(f"colors and alphas must have one row per group, got {k} and {len(alphas)}")
    c = codes if keep is None else codes[keep]
    any_sel = selected is not None and bool(np.any(selected))
    if any_sel:
        # codes k.. 2k-1: the selected points of each group; every per-point weight is a
        # look-up in a table of 2k entries
        sel = selected if keep is None else selected[keep]
        c = c + np.int32(k) * sel.astype(np.int32)
        strong = np.concatenate([np.zeros(k), alphas])
        faint = np.concatenate([alphas, np.zeros(k)])
        colour_w = strong + faint * DIM_WEIGHT
        rgb = np.concatenate([colors, colors]).astype(np.float64)
        layers = [np.bincount(pix, strong[c], npx), np.bincount(pix, faint[c], npx)]
    else:
        colour_w = alphas
        rgb = colors.astype(np.float64)
        layers = [np.bincount(pix, colour_w[c], npx)]
    sums = [np.bincount(pix, (colour_w * rgb[:, j])[c], npx) for j in range(3)]
    total_w = layers[0] if not any_sel else np.bincount(pix, colour_w[c], npx)
    grid = np.empty((3 + 1 + len(layers), h, w), dtype=np.float32)
    for i, layer in enumerate(sums + [total_w] + layers):
        grid[i] = layer.reshape(h, w)
    grid = _spread(grid, radius)
    total = grid[3]
    safe = np.where(total > 0, total, 1)
    out = np.empty((h, w, 4), dtype=np.uint8)
    for j in range(3):
        out[..., j] = np.clip(grid[j] / safe, 0, 255)
    alpha = 1 - np.exp(-OPACITY * grid[4])
    if any_sel:
        alpha = np.maximum(alpha, DIM_ALPHA * (1 - np.exp(-OPACITY * grid[5])))
    out[..., 3] = np.clip(alpha * 255, 0, 255)
    return Shaded(out.view(np.uint32).reshape(h, w), binned.bounds, len(pix))


def shade(
    x: np.ndarray,
    y: np.ndarray,
    codes: np.ndarray,
    colors: np.ndarray,
    alphas: np.ndarray,
    bounds: Sequence[float],
    shape: tuple[int, int],
    selected: np.ndarray | None = None,
    radius: int = 0,
) -> Shaded:
    """Render points as an RGBA image of ``shape`` = (height, width) pixels over ``bounds``.

    ``codes`` index ``colors`` ((K, 3) 0..255, see :func:`rgb_table`) and ``alphas`` (K,)
    per group. A pixel's colour is the mean of its points' colours weighted by their
    group's alpha; its opacity is ``1 - exp(-OPACITY * total weight)``. ``selected``: a
    boolean mask (or None: nothing selected); while any point is selected, the others
    are dimmed. ``radius`` spreads each point over a disk of that many pixels (few
    points stay visible). Non-finite coordinates are skipped."""
    if not (len(x) == len(y) == len(codes)) or (selected is not None and len(selected) != len(x)):
        raise ValueError(f"x, y, codes (and selected) must have one value per point, got lengths "
                         f"{len(x)}, {len(y)}, {len(codes)}" + (f", {len(selected)}" if selected is not None else ""))
    return shade_binned(bin_points(x, y, bounds, shape), codes, colors, alphas, selected, radius)


# --------------------------------------------------------------------------- geometry
def points_in_rect(x: np.ndarray, y: np.ndarray, bounds: Sequence[float]) -> np.ndarray:
    """Indices of the points inside the box ``bounds`` = (x0, x1, y0, y1)."""
    return np.flatnonzero(in_view(x, y, bounds))


def points_in_polygon(x: np.ndarray, y: np.ndarray, px: Sequence[float], py: Sequence[float]) -> np.ndarray:
    """Indices (ascending) of the points inside the polygon with vertices ``px``, ``py``
    (closed automatically; even-odd rule, like Bokeh's own lasso hit test).

    Bounding-box prefilter, then the candidates sorted by y: each edge only tests the
    points in its own y band, so the work is about (crossings per row) x candidates."""
    px = np.asarray(px, dtype=np.float64)
    py = np.asarray(py, dtype=np.float64)
    if px.shape != py.shape or px.ndim != 1:
        raise ValueError(f"polygon x and y must be 1-d of one length, got shapes {px.shape} and {py.shape}")
    if len(px) < 3 or not (np.all(np.isfinite(px)) and np.all(np.isfinite(py))):
        return np.zeros(0, dtype=np.int64)
    cand = np.flatnonzero(in_view(x, y, (px.min(), px.max(), py.min(), py.max())))
    if not len(cand):
        return cand.astype(np.int64)
    ys = y[cand].astype(np.float64)
    order = np.argsort(ys, kind="stable")
    ys = ys[order]
    xs = x[cand].astype(np.float64)[order]
    inside = np.zeros(len(cand), dtype=bool)
    x2, y2 = np.roll(px, -1), np.roll(py, -1)
    for ax, ay, bx, by in zip(px.tolist(), py.tolist(), x2.tolist(), y2.tolist()):
        if ay == by:
            continue  # a horizontal edge crosses no horizontal ray
        lo, hi = (ay, by) if ay < by else (by, ay)
        a, b = np.searchsorted(ys, [lo, hi], side="left")
        if a == b:
            continue
        xint = ax + (ys[a:b] - ay) * ((bx - ax) / (by - ay))
        inside[a:b] ^= xs[a:b] < xint
    return np.sort(cand[order[inside]]).astype(np.int64)


def nearest_point(x: np.ndarray, y: np.ndarray, at: tuple[float, float], radius: tuple[float, float]) -> int | None:
    """Index of the point nearest ``at`` within the ellipse of ``radius`` = (rx, ry) data
    units (a click's few pixels), or None."""
    rx, ry = (abs(float(r)) for r in radius)
    if not (rx > 0 and ry > 0):
        raise ValueError(f"radius must be positive, got {radius!r}")
    cx, cy = float(at[0]), float(at[1])
    cand = np.flatnonzero(in_view(x, y, (cx - rx, cx + rx, cy - ry, cy + ry)))
    if not len(cand):
        return None
    d = ((x[cand] - cx) / rx) ** 2 + ((y[cand] - cy) / ry) ** 2
    best = int(np.argmin(d))
    return int(cand[best]) if d[best] <= 1 else None
