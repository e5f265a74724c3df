"""Classic similarity methods, near-duplicate links and their connected components.

Five methods, each a pure stage ``features -> similarity in [0, 1]``:

=========  ====================================================================  ===========
method     similarity of two images                                              index
=========  ====================================================================  ===========
phash      perceptual hash (imagehash, 64 bits): ``1 - hamming / 64``            multi-index
ssim       structural similarity (scikit-image's definition, 7x7 window) of      batches
           32x32 grey versions
orb        ORB keypoints (OpenCV): good matches (Lowe ratio test) over all       batches
           matches, averaged over both directions
minhash    the strongest Harris corners (OpenCV ``cornerHarris``) as a set of    MinHashLSH
           grid cells; MinHash estimate of the Jaccard index (datasketch)
tm         template matching (OpenCV ``TM_SQDIFF_NORMED``): the centre of one   batches
           image searched in the other within +-2 px of 32x32; ``1 - e`` for
           the minimum error ``e`` (images standardised first)
=========  ====================================================================  ===========

Two images whose similarity is at least the threshold are *linked*; a group is a
connected component of links (a chain X-A-B-Y puts X and Y together) and images without
a link get the label -1.

Scale: nothing compares all pairs of the whole set.

* ``phash`` and ``minhash`` use an index: multi-index hashing for the Hamming radius
  (pigeonhole: split the 64 bits into m chunks; two hashes within radius r agree within
  ``r // m`` bits on at least one chunk, so only hashes sharing such a chunk are compared),
  and datasketch's ``MinHashLSH``. Both find every link (the MinHash LSH with high
  probability).
* ``ssim``, ``orb`` and ``tm`` compare all pairs inside batches of ``batch_size`` images,
  then merge across batches: one representative per group (the member most similar to
  the rest; singletons are their own representative), representatives compared in batches
  and their groups merged. If the representatives of the whole set fit in one batch the
  merge compares all of them and is complete; otherwise it runs ``merge_rounds`` rounds on
  shuffled batches and :attr:`GroupResult.complete` is False (some pairs of
  representatives were never compared). Use phash or minhash for very large sets.

``DEFAULT_THRESHOLDS`` were chosen by measurement (``bench/similarity.py --calibrate``):
generated near-duplicate families (crops of a few percent, resizing, JPEG recompression,
brightness shifts of skimage.data images) must be linked, and different photos of clothes
(clothing-small) must mostly not be. The figures are in the comment next to the dict.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from itertools import combinations
from math import comb
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from explorer.progress import track

METHODS: tuple[str, ...] = ("phash", "ssim", "orb", "minhash", "tm")

#: link two images when their similarity is at least this value. Chosen with
#: ``bench/similarity.py --calibrate`` (12 generated families of 6 near-duplicates, 600
#: clothing-small photos): at these values every family ends as one group (tm: 11 of 12)
#: with no link between different sources, while the share of clothing photo pairs linked
#: stays below 0.1 %. Lower thresholds link more clothing photos that merely look alike
#: (centred garment, plain background); tm and minhash separate least well.
DEFAULT_THRESHOLDS: dict[str, float] = {
    "phash": 0.84,  # Hamming distance <= 10 of 64 bits
    "ssim": 0.7,
    "orb": 0.3,
    "minhash": 0.4,
    "tm": 0.8,
}

#: side of the square (pixels) each method works at
DEFAULT_SIZES: dict[str, int] = {"phash": 64, "ssim": 32, "orb": 128, "minhash": 64, "tm": 32}

_ORB_FEATURES = 48  # keypoints per image
_ORB_RATIO = 0.75  # Lowe's ratio test
_ORB_MAX_DISTANCE = 64  # bits; a "good" match must also be this close
_HARRIS_CORNERS = 32  # strongest corners kept per image
_HARRIS_CELL = 2  # pixels per grid cell (at 64 px: a 32 x 32 grid)
_MINHASH_PERM = 128
_MINHASH_SEED = 1
_TM_MARGIN = 2  # template = image without a 2 px border; shifts of +-2 px are searched


def _check_method(method: str) -> str:
    if method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(METHODS)}; got {method!r}")
    return method


def _check_threshold(method: str, threshold: float | None) -> float:
    if threshold is None:
        return DEFAULT_THRESHOLDS[method]
    t = float(threshold)
    if not 0.0 <= t <= 1.0:
        raise ValueError(f"threshold must be in [0, 1]; got {threshold!r}")
    return t


# =========================================================================== images
def _open_image(path: str | os.PathLike, size: int):
    """Decoded RGB PIL image (:func:`explorer.stages.images.load_image`: EXIF rotation, modes), at
    least ``size`` px on its short side where the format allows. Raises on unreadable files;
    callers record the error and go on."""
    from explorer.stages.images import load_image

    img = load_image(path, size).image
    return img.convert("RGB") if img.mode != "RGB" else img


def _grey_square(img, size: int) -> np.ndarray:
    """``size x size`` grey version of a PIL image as float32 in [0, 1]."""
    from PIL import Image

    g = img.convert("L").resize((size, size), Image.Resampling.BILINEAR, reducing_gap=2.0)
    return np.asarray(g, dtype=np.float32) / 255.0


# =========================================================================== phash
def phash_of(img) -> np.uint64:
    """64-bit perceptual hash (imagehash.phash) of a PIL image, packed in a uint64."""
    import imagehash

    bits = np.asarray(imagehash.phash(img, hash_size=8).hash, dtype=bool).ravel()
    return np.uint64(int.from_bytes(np.packbits(bits).tobytes(), "big"))


def _hamming(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.bitwise_count(np.bitwise_xor(a, b)).astype(np.int64)


def phash_similarity(a, b) -> np.ndarray:
    """``1 - hamming(a, b) / 64`` for uint64 hashes (broadcasts)."""
    a = np.asarray(a, dtype=np.uint64)
    b = np.asarray(b, dtype=np.uint64)
    return 1.0 - _hamming(a, b) / 64.0


def max_distance_for(threshold: float) -> int:
    """The largest Hamming distance whose phash similarity passes ``threshold``."""
    return int(np.floor((1.0 - float(threshold)) * 64 + 1e-9))


def _chunks(bits: int, m: int) -> list[tuple[int, int]]:
    """``m`` (shift, width) chunks covering ``bits`` bits, widths differing by at most 1."""
    widths = [bits // m + (1 if k < bits % m else 0) for k in range(m)]
    out, shift = [], 0
    for w in widths:
        out.append((shift, w))
        shift += w
    return out


def _ball(width: int, radius: int) -> np.ndarray:
    """All ``width``-bit masks with at most ``radius`` bits set."""
    masks = [0]
    for r in range(1, min(radius, width) + 1):
        for pos in combinations(range(width), r):
            masks.append(sum(1 << p for p in pos))
    return np.array(masks, dtype=np.uint64)


def _n_chunks(n: int, radius: int) -> int:
    """Number of chunks minimising lookups + expected candidate pairs for n random hashes."""
    best, best_cost = 1, float("inf")
    for m in range(1, min(radius + 1, 16) + 1):
        w = 64 // m
        sub = radius // m
        if w > 32 and sub > 0:
            continue
        ball = sum(comb(w, r) for r in range(sub + 1))
        cost = n * m * ball + m * ball * n * n / 2.0 ** w / 2
        if cost < best_cost:
            best, best_cost = m, cost
    return best


def _expand_pairs(order, starts, counts, a, b, same: bool):
    """All member pairs of bucket pairs (a[k], b[k]); within one bucket only i < j."""
    ca, cb = counts[a], counts[b]
    tot = ca * cb
    if tot.sum() == 0:
        return np.empty(0, np.int64), np.empty(0, np.int64)
    t = np.repeat(np.arange(len(a)), tot)
    offs = np.cumsum(tot) - tot
    loc = np.arange(tot.sum()) - offs[t]
    ia = order[starts[a][t] + loc // cb[t]]
    ib = order[starts[b][t] + loc % cb[t]]
    if same:
        keep = ia < ib
        ia, ib = ia[keep], ib[keep]
    return ia, ib


def hamming_pairs(hashes, max_distance: int, *, progress: bool = False):
    """Links ``(i, j)``, i < j, between uint64 hashes within ``max_distance`` bits.

    Multi-index hashing: only hashes that share a chunk within ``max_distance // m`` bits
    are compared, and no pair within the radius is missed. Identical hashes are collapsed
    first: each copy is linked to the first occurrence, and pairs are listed between
    first occurrences only, so the links give exactly the connected components of all
    pairs (when all hashes are distinct they *are* all pairs within the radius).
    Returns ``(i, j, n_compared)``.
    """
    h = np.asarray(hashes, dtype=np.uint64).ravel()
    r = int(max_distance)
    if r < 0 or r > 64:
        raise ValueError(f"max_distance must be in [0, 64]; got {max_distance!r}")
    n = len(h)
    empty = (np.empty(0, np.int64), np.empty(0, np.int64), 0)
    if n < 2:
        return empty
    # identical hashes: link each to the first copy, then work on the distinct values
    uniq, first, inv = np.unique(h, return_index=True, return_inverse=True)
    dup_i, dup_j = first[inv], np.arange(n)
    keep = dup_i != dup_j
    out_i, out_j = [dup_i[keep]], [dup_j[keep]]
    n_compared = 0
    u = len(uniq)
    if u > 1 and r > 0:
        m = _n_chunks(u, r)
        sub = r // m
        ui, uj = [], []
        chunks = _chunks(64, m)
        for shift, width in track(chunks, "Hash index", progress):
            keys = (uniq >> np.uint64(shift)) & np.uint64((1 << width) - 1)
            order = np.argsort(keys, kind="stable")
            vals, starts, counts = np.unique(keys[order], return_index=True, return_counts=True)
            for f in _ball(width, sub):
                target = vals ^ f
                pos = np.searchsorted(vals, target)
                pos = np.minimum(pos, len(vals) - 1)
                hit = vals[pos] == target
                a = np.nonzero(hit)[0]
                b = pos[hit]
                if f:
                    keep = a < b
                    a, b = a[keep], b[keep]
                # expand in slices so memory stays bounded
                tot = counts[a] * counts[b]
                cut = np.searchsorted(np.cumsum(tot), np.arange(1, 1 + tot.sum() // 4_000_000) * 4_000_000)
                for sa, sb in zip(np.split(a, cut), np.split(b, cut)):
                    ia, ib = _expand_pairs(order, starts, counts, sa, sb, same=(f == 0))
                    n_compared += len(ia)
                    ok = _hamming(uniq[ia], uniq[ib]) <= r
                    ui.append(ia[ok])
                    uj.append(ib[ok])
        if ui:
            ia = np.concatenate(ui)
            ib = np.concatenate(uj)
            code = np.unique(np.minimum(ia, ib) * u + np.maximum(ia, ib))
            out_i.append(first[code // u])
            out_j.append(first[code % u])
    i = np.concatenate(out_i).astype(np.int64)
    j = np.concatenate(out_j).astype(np.int64)
    lo, hi = np.minimum(i, j), np.maximum(i, j)
    return lo, hi, int(n_compared + keep.sum())


def group_hashes(hashes, max_distance: int, *, progress: bool = False) -> np.ndarray:
    """Near-duplicate groups of uint64 phashes: labels (N,), -1 = no near-duplicate."""
    h = np.asarray(hashes, dtype=np.uint64).ravel()
    i, j, _ = hamming_pairs(h, max_distance, progress=progress)
    return components(len(h), i, j)


# =========================================================================== components
def components(n: int, i, j) -> np.ndarray:
    """Connected components of the links (i[k], j[k]) among n items (union-find).

    Returns labels (n,): -1 for items without a link, else 0, 1, ... numbered in the
    order of each component's first item.
    """
    i = np.asarray(i, dtype=np.int64).ravel()
    j = np.asarray(j, dtype=np.int64).ravel()
    if len(i) != len(j):
        raise ValueError(f"i and j differ in length: {len(i)} != {len(j)}")
    labels = np.full(n, -1, dtype=np.int64)
    if n == 0 or len(i) == 0:
        return labels
    if i.min() < 0 or j.min() < 0 or max(i.max(), j.max()) >= n:
        raise ValueError(f"link indices must be in [0, {n})")
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    g = coo_matrix((np.ones(len(i), dtype=np.int8), (i, j)), shape=(n, n))
    _, comp = connected_components(g, directed=False)
    size = np.bincount(comp)
    linked = size[comp] > 1
    # renumber the components with more than one item by their first item
    _, first = np.unique(comp, return_index=True)  # comp ids are 0..k-1
    rank = np.empty(len(first), dtype=np.int64)
    roots = np.unique(comp[linked])
    firsts = first[roots]
    rank[roots[np.argsort(firsts)]] = np.arange(len(roots))
    labels[linked] = rank[comp[linked]]
    return labels


# =========================================================================== features
@dataclass
class OrbFeatures:
    """ORB descriptors of M images: ``desc`` (M, K, 32) uint8, ``n`` (M,) valid rows."""

    desc: np.ndarray
    n: np.ndarray

    def __len__(self) -> int:
        return len(self.n)

    def __getitem__(self, idx) -> "OrbFeatures":
        idx = np.asarray(idx)
        return OrbFeatures(self.desc[idx], self.n[idx])


def _orb_of(grey: np.ndarray) -> np.ndarray:
    import cv2

    g8 = np.ascontiguousarray(np.clip(grey * 255.0 + 0.5, 0, 255).astype(np.uint8))
    orb = cv2.ORB_create(nfeatures=_ORB_FEATURES)
    _, d = orb.detectAndCompute(g8, None)
    if d is None:
        return np.zeros((0, 32), np.uint8)
    return d[:_ORB_FEATURES]


def _harris_cells(grey: np.ndarray) -> list[bytes]:
    """Grid cells (as tokens) holding the strongest Harris corners of a grey image."""
    import cv2

    g = np.ascontiguousarray(grey, dtype=np.float32)
    resp = cv2.cornerHarris(g, 2, 3, 0.04)
    peak = cv2.dilate(resp, np.ones((3, 3), np.uint8))
    ys, xs = np.nonzero((resp >= peak) & (resp > max(1e-6, 0.01 * float(resp.max()))))
    if len(ys) == 0:
        return []
    top = np.argsort(-resp[ys, xs], kind="stable")[:_HARRIS_CORNERS]
    # each corner marks its grid cell and the 8 around it, so a shift of a pixel or two
    # (crops, resizing) changes the set only a little
    cells = {(int(y) // _HARRIS_CELL + dy, int(x) // _HARRIS_CELL + dx)
             for y, x in zip(ys[top], xs[top]) for dy in (-1, 0, 1) for dx in (-1, 0, 1)}
    return [f"{y},{x}".encode() for y, x in sorted(cells)]


def _standardise(g: np.ndarray) -> np.ndarray:
    g = g - g.mean()
    s = g.std()
    return (g / s if s > 1e-6 else g).astype(np.float32)


def _feature_of(img, method: str, size: int):
    if method == "phash":
        return phash_of(img)
    grey = _grey_square(img, size)
    if method == "ssim":
        return grey
    if method == "tm":
        return _standardise(grey)
    if method == "orb":
        return _orb_of(grey)
    return _harris_cells(grey)  # minhash: tokens, hashed in _stack


def _stack(items: list, method: str, size: int):
    if method == "phash":
        return np.array(items, dtype=np.uint64)
    if method in ("ssim", "tm"):
        if not items:
            return np.zeros((0, size, size), np.float32)
        return np.stack(items).astype(np.float32)
    if method == "orb":
        k = max([len(d) for d in items] + [1])
        desc = np.zeros((len(items), k, 32), np.uint8)
        for a, d in enumerate(items):
            desc[a, : len(d)] = d
        return OrbFeatures(desc, np.array([len(d) for d in items], dtype=np.int64))
    from datasketch import MinHash

    out = np.zeros((len(items), _MINHASH_PERM), dtype=np.uint64)
    if items:  # bulk shares one set of permutations: much faster than one MinHash each
        for a, mh in enumerate(MinHash.bulk(items, num_perm=_MINHASH_PERM, seed=_MINHASH_SEED)):
            out[a] = mh.hashvalues
    return out


def features_from_images(images: Iterable, method: str, *, size: int | None = None,
                         progress: bool = True):
    """Features of already-decoded PIL images (no second decode)."""
    _check_method(method)
    size = int(size or DEFAULT_SIZES[method])
    images = list(images)
    items = [_feature_of(img, method, size) for img in track(images, f"{method} features", progress)]
    return _stack(items, method, size)


def compute_features(paths: Sequence[str | os.PathLike], method: str, *,
                     size: int | None = None, progress: bool = True):
    """Features of each readable image: ``(features, ok_index, errors)``.

    ``features`` has one row per readable image (a uint64 array for phash, (M, s, s)
    float32 for ssim and tm, :class:`OrbFeatures` for orb, (M, 128) uint64 MinHash
    values for minhash); ``ok_index`` are the positions in ``paths`` of those rows;
    ``errors`` lists ``(path, reason)`` for every file that could not be read.
    """
    _check_method(method)
    size = int(size or DEFAULT_SIZES[method])
    if size < 8:
        raise ValueError(f"size must be at least 8 pixels; got {size!r}")
    items, ok, errors = [], [], []
    for k, p in enumerate(track(list(paths), f"{method} features", progress)):
        try:
            img = _open_image(p, size)
            items.append(_feature_of(img, method, size))
        except Exception as exc:  # noqa: BLE001 - any bad file is recorded, never fatal
            errors.append((str(p), getattr(exc, "reason", None) or f"{type(exc).__name__}: {exc}"))
            continue
        ok.append(k)
    return _stack(items, method, size), np.asarray(ok, dtype=np.int64), errors


def _n_items(features, method: str) -> int:
    return len(features)


# =========================================================================== pairwise
def _box(p: np.ndarray, w: int) -> np.ndarray:
    """Mean over every w x w window fully inside the last two axes (integral image)."""
    c = np.cumsum(np.cumsum(p, axis=-1, dtype=np.float32), axis=-2)
    c = np.pad(c, [(0, 0)] * (p.ndim - 2) + [(1, 0), (1, 0)])
    return (c[..., w:, w:] - c[..., :-w, w:] - c[..., w:, :-w] + c[..., :-w, :-w]) / (w * w)


def _ssim_matrix(x: np.ndarray, y: np.ndarray | None = None) -> np.ndarray:
    """SSIM of every pair (scikit-image's definition: 7x7 uniform window, data range 1,
    sample covariance, mean over the valid region), vectorised over pairs."""
    w = 7
    sym = y is None
    y = x if sym else y
    if x.shape[-1] < w or x.shape[-2] < w:
        raise ValueError(f"ssim needs images of at least {w}x{w} pixels; got {x.shape[1:]}")
    cn = w * w / (w * w - 1.0)
    c1, c2 = 0.01 ** 2, 0.03 ** 2
    mx, my = _box(x, w), _box(y, w)
    vx = (_box(x * x, w) - mx * mx) * cn
    vy = (_box(y * y, w) - my * my) * cn
    out = np.zeros((len(x), len(y)), np.float32)
    for a in range(len(x)):
        js = np.arange(a + 1, len(y)) if sym else np.arange(len(y))
        for s in range(0, len(js), 128):
            jj = js[s: s + 128]
            cov = (_box(x[a] * y[jj], w) - mx[a] * my[jj]) * cn
            num = (2 * mx[a] * my[jj] + c1) * (2 * cov + c2)
            den = (mx[a] ** 2 + my[jj] ** 2 + c1) * (vx[a] + vy[jj] + c2)
            out[a, jj] = (num / den).mean(axis=(-1, -2))
    if sym:
        out = out + out.T
        np.fill_diagonal(out, 1.0)
    return out


def _tm_matrix(x: np.ndarray, y: np.ndarray | None = None) -> np.ndarray:
    """Template matching of every pair, both ways, as matrix products.

    Equals ``cv2.matchTemplate(img_j, centre_i, cv2.TM_SQDIFF_NORMED).min()`` for the
    centre of image i (a ``_TM_MARGIN`` border removed) searched in image j, minimised
    over both directions; similarity ``1 - e`` with e clipped to [0, 1] as OpenCV does
    (the images are standardised, so e = 2 - 2 * correlation and 1 - e = 2 * corr - 1).
    """
    sym = y is None
    y = x if sym else y
    m = _TM_MARGIN
    s = x.shape[-1]
    if s <= 2 * m + 2:
        raise ValueError(f"tm needs images larger than {2 * m + 2} pixels; got {s}")
    t = s - 2 * m

    def one_way(a: np.ndarray, b: np.ndarray) -> np.ndarray:
        tmpl = a[:, m:m + t, m:m + t].reshape(len(a), -1).astype(np.float32)
        tt = (tmpl * tmpl).sum(1)
        best = np.full((len(a), len(b)), np.inf, np.float32)
        for dy in range(2 * m + 1):
            for dx in range(2 * m + 1):
                win = b[:, dy:dy + t, dx:dx + t].reshape(len(b), -1)
                ww = (win * win).sum(1)
                cross = tmpl @ win.T
                err = (tt[:, None] + ww[None, :] - 2 * cross) / np.sqrt(
                    np.maximum(tt[:, None] * ww[None, :], 1e-12))
                np.minimum(best, err, out=best)
        return best

    e = np.minimum(one_way(x, y), one_way(y, x).T)
    sim = (1.0 - np.clip(e, 0.0, 1.0)).astype(np.float32)  # OpenCV clips the error at 1
    if sym:
        np.fill_diagonal(sim, 1.0)
    return sim


def _orb_matrix(fx: OrbFeatures, fy: OrbFeatures | None = None) -> np.ndarray:
    """ORB similarity of every pair: share of each image's keypoints with a good match
    (nearest neighbour within ``_ORB_MAX_DISTANCE`` bits and passing Lowe's ratio test
    against the second nearest) in the other image, averaged over both directions."""
    sym = fy is None
    fy = fx if sym else fy
    big = np.uint16(1024)
    kx, ky = fx.desc.shape[1], fy.desc.shape[1]
    dx = fx.desc.reshape(len(fx), kx, 32).view(np.uint64)  # (Mx, kx, 4)
    dy = fy.desc.reshape(len(fy), ky, 32).view(np.uint64)
    valid_y = np.arange(ky)[None, :] < fy.n[:, None]  # (My, ky)
    valid_x = np.arange(kx)[None, :] < fx.n[:, None]
    fwd = np.zeros((len(fx), len(fy)), np.float32)  # share of x's keypoints matched in y
    bwd = np.zeros((len(fx), len(fy)), np.float32)  # share of y's keypoints matched in x

    def good(d: np.ndarray, axis: int) -> np.ndarray:
        p = np.partition(d, 1, axis=axis)
        b1 = np.take(p, 0, axis=axis)
        b2 = np.take(p, 1, axis=axis)
        return (b1 <= _ORB_MAX_DISTANCE) & (b1.astype(np.float32) < _ORB_RATIO * b2)

    for a in range(len(fx)):
        na = int(fx.n[a])
        if na < 2:
            continue
        js = np.arange(a + 1, len(fy)) if sym else np.arange(len(fy))
        for s in range(0, len(js), 256):
            jj = js[s: s + 256]
            q = dx[a, :na]  # (na, 4)
            dyj = dy[jj]  # (len(jj), ky, 4)
            d = np.zeros((na, len(jj), ky), np.uint16)
            for w in range(4):
                d += np.bitwise_count(q[:, w][:, None, None] ^ dyj[None, :, :, w])
            d[:, ~valid_y[jj]] = big
            ny = fy.n[jj]
            g_fwd = good(d, axis=2)  # (na, len(jj))
            fwd[a, jj] = np.where(ny >= 2, g_fwd.sum(0) / na, 0.0)
            g_bwd = good(d, axis=0)  # (len(jj), ky)
            g_bwd &= valid_y[jj]
            bwd[a, jj] = np.where(ny >= 2, g_bwd.sum(1) / np.maximum(ny, 1), 0.0)
    sim = (fwd + bwd) / 2.0
    if sym:
        sim = sim + sim.T
        ok = fx.n >= 2
        np.fill_diagonal(sim, np.where(ok, 1.0, 0.0))
    return sim.astype(np.float32)


def _minhash_matrix(x: np.ndarray, y: np.ndarray | None = None) -> np.ndarray:
    y = x if y is None else y
    out = np.zeros((len(x), len(y)), np.float32)
    for s in range(0, len(y), 256):
        out[:, s:s + 256] = (x[:, None, :] == y[None, s:s + 256, :]).mean(axis=2)
    return out


def pairwise_similarity(features, method: str, other=None) -> np.ndarray:
    """Similarity of every pair of ``features`` (or of features x other): an (n, m) array.

    This is the all-pairs kernel that :func:`group` runs inside each batch; keep n small.
    """
    _check_method(method)
    if method == "phash":
        a = np.asarray(features, dtype=np.uint64)
        b = a if other is None else np.asarray(other, dtype=np.uint64)
        return phash_similarity(a[:, None], b[None, :]).astype(np.float32)
    if method == "ssim":
        return _ssim_matrix(np.asarray(features, np.float32),
                            None if other is None else np.asarray(other, np.float32))
    if method == "tm":
        return _tm_matrix(np.asarray(features, np.float32),
                          None if other is None else np.asarray(other, np.float32))
    if method == "orb":
        return _orb_matrix(features, other)
    return _minhash_matrix(np.asarray(features), None if other is None else np.asarray(other))


def similarity(a, b, method: str) -> float:
    """Similarity of two single images' features (convenience for tests and notebooks)."""
    if method == "orb":
        return float(pairwise_similarity(a, method, b)[0, 0])
    return float(pairwise_similarity(np.asarray(a)[None], method, np.asarray(b)[None])[0, 0])


# =========================================================================== grouping
@dataclass
class GroupResult:
    """Result of :func:`group` / :func:`find_groups`.

    ``labels`` (N,) int, -1 = not linked to anything; ``n_pairs_compared`` pairs whose
    similarity was computed; ``n_links`` distinct pairs that passed the threshold;
    ``complete`` is False when the batch merge could not compare every representative
    (see the module docstring); ``timings`` in seconds; ``errors`` (path, reason) and
    ``ok_index`` are filled by :func:`find_groups`.
    """

    labels: np.ndarray
    method: str
    threshold: float
    n_pairs_compared: int
    n_links: int
    complete: bool = True
    timings: dict[str, float] = field(default_factory=dict)
    errors: list[tuple[str, str]] = field(default_factory=list)
    ok_index: np.ndarray | None = None

    @property
    def n_groups(self) -> int:
        return int(self.labels.max() + 1) if len(self.labels) and self.labels.max() >= 0 else 0


def _take(features, idx, method: str):
    if method == "orb":
        return features[idx]
    return np.asarray(features)[idx]


def _batch_links(features, idx: np.ndarray, method: str, t: float):
    """All pairs inside one batch: links (global indices) and the similarity matrix."""
    sim = pairwise_similarity(_take(features, idx, method), method)
    a, b = np.nonzero(np.triu(sim >= t, k=1))
    return idx[a], idx[b], sim


def _representatives(idx: np.ndarray, sim: np.ndarray, t: float) -> np.ndarray:
    """One item per group of the batch: the member with the highest summed similarity."""
    a, b = np.nonzero(np.triu(sim >= t, k=1))
    lab = components(len(idx), a, b)
    reps = [idx[k] for k in np.nonzero(lab < 0)[0]]
    for g in range(lab.max() + 1 if len(lab) else 0):
        mem = np.nonzero(lab == g)[0]
        score = sim[np.ix_(mem, mem)].sum(1)
        reps.append(idx[mem[int(np.argmax(score))]])
    return np.sort(np.asarray(reps, dtype=np.int64))


def _group_batched(features, method, t, batch_size, merge_rounds, seed, progress):
    n = len(features)
    li, lj = [], []
    n_cmp = 0
    order = np.arange(n)
    batches = [order[s:s + batch_size] for s in range(0, n, batch_size)]
    reps_parts = []
    for idx in track(batches, f"{method}: batches", progress and len(batches) > 1):
        i, j, sim = _batch_links(features, idx, method, t)
        n_cmp += len(idx) * (len(idx) - 1) // 2
        li.append(i)
        lj.append(j)
        reps_parts.append(_representatives(idx, sim, t))
    complete = len(batches) <= 1
    reps = np.concatenate(reps_parts) if reps_parts else np.empty(0, np.int64)
    rng = np.random.default_rng(seed)
    rounds = 0
    while not complete and len(reps) > 1:
        if len(reps) <= batch_size:
            i, j, _ = _batch_links(features, reps, method, t)
            n_cmp += len(reps) * (len(reps) - 1) // 2
            li.append(i)
            lj.append(j)
            complete = True
            break
        if rounds >= merge_rounds:
            break
        rounds += 1
        shuffled = rng.permutation(reps)
        parts = []
        for s in track(range(0, len(shuffled), batch_size), f"{method}: merge round {rounds}",
                       progress):
            idx = np.sort(shuffled[s:s + batch_size])
            i, j, sim = _batch_links(features, idx, method, t)
            n_cmp += len(idx) * (len(idx) - 1) // 2
            li.append(i)
            lj.append(j)
            parts.append(_representatives(idx, sim, t))
        reps = np.sort(np.concatenate(parts))
    i = np.concatenate(li) if li else np.empty(0, np.int64)
    j = np.concatenate(lj) if lj else np.empty(0, np.int64)
    return i, j, n_cmp, complete


def _minhash_links(hv: np.ndarray, t: float, progress: bool):
    """Candidate pairs from datasketch's MinHashLSH, verified with the MinHash estimate."""
    from datasketch import LeanMinHash, MinHash, MinHashLSH

    n = len(hv)
    if n < 2:
        return np.empty(0, np.int64), np.empty(0, np.int64), 0
    lsh_t = min(max(t, 0.05), 0.99)
    lsh = MinHashLSH(threshold=lsh_t, num_perm=hv.shape[1], weights=(0.2, 0.8))
    scheme = MinHash(num_perm=hv.shape[1], seed=_MINHASH_SEED).scheme
    ii, jj = [], []
    n_cmp = 0
    for k in track(range(n), "MinHash LSH", progress):
        m = LeanMinHash(seed=_MINHASH_SEED, hashvalues=hv[k], scheme=scheme)
        cand = lsh.query(m)
        if cand:
            c = np.fromiter(cand, dtype=np.int64, count=len(cand))
            n_cmp += len(c)
            est = (hv[c] == hv[k]).mean(axis=1)
            c = c[est >= t]
            ii.append(c)
            jj.append(np.full(len(c), k, np.int64))
        lsh.insert(k, m, check_duplication=False)
    i = np.concatenate(ii) if ii else np.empty(0, np.int64)
    j = np.concatenate(jj) if jj else np.empty(0, np.int64)
    return i, j, n_cmp


def group(features, method: str, *, threshold: float | None = None, batch_size: int = 1000,
          merge_rounds: int = 3, seed: int = 0, progress: bool = True) -> GroupResult:
    """Link images whose similarity is at least ``threshold`` and return the components.

    ``features`` come from :func:`compute_features` (or :func:`features_from_images`)
    with the same ``method``. phash and minhash use their index (``batch_size`` unused);
    ssim, orb and tm compare all pairs inside batches of ``batch_size`` and merge the
    batches through representatives (see the module docstring).
    """
    _check_method(method)
    t = _check_threshold(method, threshold)
    if int(batch_size) < 2:
        raise ValueError(f"batch_size must be at least 2; got {batch_size!r}")
    if int(merge_rounds) < 0:
        raise ValueError(f"merge_rounds must be >= 0; got {merge_rounds!r}")
    n = _n_items(features, method)
    t0 = time.perf_counter()
    complete = True
    if method == "phash":
        i, j, n_cmp = hamming_pairs(features, max_distance_for(t), progress=progress)
    elif method == "minhash":
        hv = np.asarray(features, dtype=np.uint64)
        if hv.ndim != 2:
            raise ValueError(f"minhash features must be (N, num_perm); got shape {hv.shape}")
        i, j, n_cmp = _minhash_links(hv, t, progress)
    else:
        i, j, n_cmp, complete = _group_batched(features, method, t, int(batch_size),
                                               int(merge_rounds), seed, progress)
    t1 = time.perf_counter()
    labels = components(n, i, j)
    t2 = time.perf_counter()
    n_links = len(np.unique(np.minimum(i, j) * max(n, 1) + np.maximum(i, j))) if len(i) else 0
    return GroupResult(labels=labels, method=method, threshold=t, n_pairs_compared=int(n_cmp),
                       n_links=int(n_links), complete=complete,
                       timings={"compare": t1 - t0, "components": t2 - t1})


def find_groups(paths: Sequence[str | os.PathLike], method: str = "phash", *,
                threshold: float | None = None, batch_size: int = 1000,
                size: int | None = None, progress: bool = True) -> GroupResult:
    """Path-based :func:`group`: reads the images, groups them, reports unreadable files.

    ``labels`` has one entry per path (-1 also for unreadable files, listed in ``errors``).
    """
    t0 = time.perf_counter()
    feats, ok, errors = compute_features(paths, method, size=size, progress=progress)
    t1 = time.perf_counter()
    g = group(feats, method, threshold=threshold, batch_size=batch_size, progress=progress)
    labels = np.full(len(paths), -1, dtype=np.int64)
    labels[ok] = g.labels
    g.labels = labels
    g.errors = errors
    g.ok_index = ok
    g.timings = {"features": t1 - t0, **g.timings}
    return g


# =========================================================================== map vector
def describe(items: Iterable, *, size: int = 64, progress: bool = False) -> np.ndarray:
    """A cheap vector per image for the 2-D map when a classic method replaces the network.

    ``items`` are PIL images or paths. Each row: the 64 phash bits (0/1) followed by
    ``4 * sqrt`` of a normalised 4x4x4 RGB histogram (Hellinger; both parts weigh about
    the same in Euclidean distance). Unreadable paths give a row of NaN.
    """
    from PIL import Image

    items = list(items)
    out = np.full((len(items), 128), np.nan, dtype=np.float32)
    for k, it in enumerate(track(items, "Describe", progress)):
        try:
            img = it if isinstance(it, Image.Image) else _open_image(it, size)
            img = img.convert("RGB")
            small = img.resize((size, size), Image.Resampling.BILINEAR)
            h = int(phash_of(small))
            bits = np.array([(h >> (63 - b)) & 1 for b in range(64)], dtype=np.float32)
            px = np.asarray(small, dtype=np.uint8).reshape(-1, 3) // 64
            hist = np.bincount(px[:, 0] * 16 + px[:, 1] * 4 + px[:, 2], minlength=64)
            hist = np.sqrt(hist / max(hist.sum(), 1)) * 4.0
            out[k] = np.concatenate([bits, hist.astype(np.float32)])
        except Exception:  # noqa: BLE001 - unreadable item: NaN row, documented
            continue
    return out


def features_and_thumbnails(paths: Sequence[str | os.PathLike], method: str, *,
                            thumb_size: int = 256, sink=None, max_bytes: int | None = None,
                            size: int | None = None, progress: bool = True):
    """Classic methods in ONE decode per image (review L15): read each file once (hashing it),
    decode it once, and take from that image the method's feature, the original size, the
    thumbnail (handed to ``sink(i, content_hash, thumb)`` when ``sink.need(i, content_hash)``)
    and the :func:`describe` row for the map.

    Returns ``(features, ok, errors, width, height, map_rows, hashes)``; ``ok`` indexes the
    readable paths, ``errors`` lists ``(path, reason)``. A file that cannot be read or decoded
    is an error line, never an exception (exceptions from ``sink`` stop the run).
    """
    from explorer.stages.images import ImageLoadError, decode_image, read_file, thumbnail

    _check_method(method)
    size = int(size or DEFAULT_SIZES[method])
    items, ok, errors, width, height, hashes, rows, chunk = [], [], [], [], [], [], [], []
    for k, p in enumerate(track(list(paths), f"{method} features", progress)):
        try:
            data, h = read_file(p, max_bytes)
            img, (w, ht) = decode_image(data, max(size, thumb_size), name=p)
            feat = _feature_of(img, method, size)
        except ImageLoadError as exc:
            errors.append((str(p), exc.reason))
            continue
        except Exception as exc:  # noqa: BLE001 - any bad file is recorded, never fatal
            errors.append((str(p), f"cannot decode ({type(exc).__name__}: {exc})"))
            continue
        thumb = thumbnail(img, thumb_size)
        if sink is not None and sink.need(k, h):
            sink(k, h, thumb)
        items.append(feat)
        ok.append(k)
        width.append(w)
        height.append(ht)
        hashes.append(h)
        chunk.append(thumb)
        if len(chunk) == 512:  # bounded memory: describe thumbnails a chunk at a time
            rows.append(describe(chunk))
            chunk = []
    if chunk:
        rows.append(describe(chunk))
    map_rows = np.concatenate(rows).astype(np.float32) if rows else np.zeros((0, 128), np.float32)
    return (_stack(items, method, size), np.asarray(ok, dtype=np.int64), errors,
            np.asarray(width, dtype=np.int64), np.asarray(height, dtype=np.int64), map_rows, hashes)


# =========================================================================== threshold
def threshold_curve(items, method: str, sample: int | None = 500, seed: int = 0, *,
                    thresholds: Sequence[float] | None = None, size: int | None = None,
                    progress: bool = True):
    """How many pairs and images would be linked at each threshold.

    ``items``: image paths, or features from :func:`compute_features`. A random sample
    of ``sample`` images (all if None or fewer) is compared all-pairs. Returns a DataFrame
    with one row per threshold: ``threshold``; ``n_pairs`` similar pairs and
    ``n_clustered`` images with at least one link, both estimated for the whole set
    (pairs scaled by the ratio of pair counts, images by the ratio of image counts; the
    latter is a lower bound since a sample misses partners); ``sample_pairs`` and
    ``sample_clustered`` the exact counts in the sample; ``sample_size``, ``n_images``.
    """
    import pandas as pd

    _check_method(method)
    is_features = isinstance(items, (np.ndarray, OrbFeatures))
    n_total = len(items)
    if sample is not None and int(sample) < 2:
        raise ValueError(f"sample must be at least 2 (or None for all); got {sample!r}")
    rng = np.random.default_rng(seed)
    k = n_total if sample is None else min(int(sample), n_total)
    pick = np.sort(rng.choice(n_total, size=k, replace=False)) if k < n_total else np.arange(n_total)
    if is_features:
        feats = _take(items, pick, method)
    else:
        items = list(items)
        feats, ok, _errors = compute_features([items[p] for p in pick], method, size=size,
                                              progress=progress)
    n = len(feats)
    if thresholds is None:
        thresholds = np.round(np.linspace(0.0, 1.0, 101), 2)
    thr = np.asarray(thresholds, dtype=float)
    if np.any((thr < 0) | (thr > 1)):
        raise ValueError("thresholds must lie in [0, 1]")
    sim = pairwise_similarity(feats, method) if n >= 2 else np.zeros((n, n))
    a, b = np.triu_indices(n, k=1)
    s = sim[a, b]
    order = np.argsort(-s, kind="stable")
    s_sorted = s[order]
    rows = []
    scale_pairs = (n_total * (n_total - 1)) / max(n * (n - 1), 1)
    scale_imgs = n_total / max(n, 1)
    for t in thr:
        m = int(np.searchsorted(-s_sorted, -t, side="right"))  # pairs with s >= t
        sel = order[:m]
        lab = components(n, a[sel], b[sel])
        nc = int((lab >= 0).sum())
        rows.append({"threshold": float(t), "n_pairs": int(round(m * scale_pairs)),
                     "n_clustered": int(min(n_total, round(nc * scale_imgs))),
                     "sample_pairs": m, "sample_clustered": nc,
                     "sample_size": n, "n_images": n_total})
    return pd.DataFrame(rows)


def threshold_plot(curve, path: str | os.PathLike, method: str, *,
                   threshold: float | None = None, title: str | None = None) -> Path:
    """Write an interactive standalone Bokeh HTML file of a :func:`threshold_curve`.

    Threshold on x, number of similar pairs on y; hovering shows the approximate number
    of images that would be in a group. A dashed line marks ``threshold`` (default: the
    method's default threshold). Bokeh's JS is inlined so the file works offline.
    """
    from bokeh.embed import file_html
    from bokeh.models import ColumnDataSource, HoverTool, Span
    from bokeh.plotting import figure
    from bokeh.resources import INLINE

    from explorer.table import atomic_write_text

    _check_method(method)
    need = {"threshold", "n_pairs", "n_clustered"}
    missing = need - set(curve.columns)
    if missing:
        raise ValueError(f"curve lacks column(s) {sorted(missing)}; use threshold_curve()")
    t = _check_threshold(method, threshold)
    src = ColumnDataSource({c: curve[c].to_numpy() for c in curve.columns}, name="curve")
    n_img = int(curve["n_images"].iloc[0]) if "n_images" in curve and len(curve) else None
    ssize = int(curve["sample_size"].iloc[0]) if "sample_size" in curve and len(curve) else None
    sub = f" (sample of {ssize} of {n_img} images)" if n_img and ssize and ssize < n_img else ""
    fig = figure(title=title or f"{method}: similar pairs by threshold{sub}",
                 x_axis_label="threshold (link when similarity >= threshold)",
                 y_axis_label="similar pairs", width=800, height=450,
                 tools="pan,wheel_zoom,box_zoom,reset,save", name="threshold_plot")
    line = fig.line("threshold", "n_pairs", source=src, line_width=2)
    fig.scatter("threshold", "n_pairs", source=src, size=5)
    fig.add_tools(HoverTool(renderers=[line], mode="vline", tooltips=[
        ("threshold", "@threshold{0.00}"), ("similar pairs", "@n_pairs{0,0}"),
        ("images in a group (approx.)", "@n_clustered{0,0}")]))
    fig.add_layout(Span(location=t, dimension="height", line_dash="dashed",
                        line_color="firebrick"))
    html = file_html(fig, INLINE, title=f"{method} threshold")
    return atomic_write_text(path, html)
