"""Image quality statistics, computed from the thumbnail the build already decodes.

``image_stats(thumb)`` turns one decoded thumbnail into a small float32 vector (one value per
name in :data:`STAT_NAMES`). The build stores that vector next to the embedding and the phash, so
a re-run with a warm store decodes nothing it has seen. Flags (blurry, dark, ...) are derived from
these numbers, never from a second decode.
"""

from __future__ import annotations

import numpy as np

STAT_NAMES: tuple[str, ...] = (
    "brightness",       # mean luminance in [0, 1]
    "dark_fraction",    # share of pixels with luminance < 0.1
    "bright_fraction",  # share of pixels with luminance > 0.9
    "sharpness",        # variance of the Laplacian of the luminance (0-255 scale)
    "entropy",          # Shannon entropy of the 256-bin luminance histogram, in bits (0-8)
    "colourfulness",    # mean absolute difference between colour channels, in [0, 1]
)


def _luminance(rgb: np.ndarray) -> np.ndarray:
    return rgb[..., 0] * 0.299 + rgb[..., 1] * 0.587 + rgb[..., 2] * 0.114


def image_stats(img) -> np.ndarray:
    """``len(STAT_NAMES)`` float32 statistics of one image (a PIL image or an HxWx3 array)."""
    a = np.asarray(img)
    if a.ndim == 2:
        a = np.repeat(a[..., None], 3, axis=2)
    if a.ndim != 3 or a.shape[2] < 3 or a.shape[0] == 0 or a.shape[1] == 0:
        raise ValueError(f"image_stats needs an HxWx3 image, got shape {a.shape}")
    rgb = a[..., :3].astype(np.float32)
    grey = _luminance(rgb)  # 0..255
    lum = grey / 255.0
    if grey.shape[0] >= 3 and grey.shape[1] >= 3:
        lap = (grey[1:-1, :-2] + grey[1:-1, 2:] + grey[:-2, 1:-1] + grey[2:, 1:-1]
               - 4.0 * grey[1:-1, 1:-1])
        sharpness = float(lap.var())
    else:
        sharpness = 0.0
    hist = np.bincount(np.clip(grey, 0, 255).astype(np.uint8).ravel(), minlength=256)
    p = hist[hist > 0] / hist.sum()
    entropy = float(-(p * np.log2(p)).sum())
    colour = (np.abs(rgb[..., 0] - rgb[..., 1]) + np.abs(rgb[..., 1] - rgb[..., 2])
              + np.abs(rgb[..., 0] - rgb[..., 2])) / (3 * 255.0)
    return np.array([
        float(lum.mean()), float((lum < 0.1).mean()), float((lum > 0.9).mean()),
        sharpness, entropy, float(colour.mean()),
    ], dtype=np.float32)


# --------------------------------------------------------------------------- flags
#: the flag columns :func:`flags` returns, in order (CSV columns, 0/1)
FLAG_NAMES: tuple[str, ...] = (
    "blurry", "dark", "bright", "low_information", "grayscale", "odd_aspect", "odd_size",
    "exact_duplicate",
)

#: thresholds of :func:`flags` (measured on thumbnails with the longer side <= 256 px)
THRESHOLDS: dict[str, float] = {
    # variance of the Laplacian below this (0-255 scale) and some structure left: blurry
    "blurry_sharpness": 25.0,
    # mean luminance below / above these: dark / bright
    "dark_brightness": 0.18,
    "bright_brightness": 0.88,
    # luminance histogram entropy below this many bits (of 8): low information
    "low_information_entropy": 2.5,
    # mean channel difference below this: grayscale
    "grayscale_colourfulness": 0.015,
    # longer side / shorter side above this: odd aspect ratio
    "odd_aspect_ratio": 2.5,
    # sqrt(width x height) more than this factor from the collection's median: odd size
    "odd_size_factor": 4.0,
    # or the shorter side below this many pixels: odd size
    "odd_size_min_side": 32.0,
}


def flags(stats, width, height, content_hash, thresholds: dict | None = None):
    """Quality flags, one row per image, from the :func:`image_stats` vectors (no decode).

    - ``blurry``: Laplacian variance < ``blurry_sharpness`` (images that are low information
      are not also called blurry: a blank page has no edges to be sharp);
    - ``dark`` / ``bright``: mean luminance < ``dark_brightness`` / > ``bright_brightness``;
    - ``low_information``: luminance entropy < ``low_information_entropy`` bits (nearly one
      colour: blank, solid or almost empty images);
    - ``grayscale``: mean channel difference < ``grayscale_colourfulness``;
    - ``odd_aspect``: longer / shorter side > ``odd_aspect_ratio``;
    - ``odd_size``: ``sqrt(w*h)`` more than ``odd_size_factor`` times from the median of the
      collection (either way), or the shorter side < ``odd_size_min_side``;
    - ``exact_duplicate``: the same file content (``content_hash``) as an earlier row; the
      first copy is not flagged, so dropping the flag keeps one of each.

    ``stats``: ``(n, len(STAT_NAMES))``; ``width``, ``height``, ``content_hash``: n values.
    Returns a DataFrame of bool columns :data:`FLAG_NAMES`. Raises ``ValueError`` on shapes
    that do not fit or an unknown threshold name.
    """
    import pandas as pd

    t = dict(THRESHOLDS)
    for k, v in (thresholds or {}).items():
        if k not in THRESHOLDS:
            raise ValueError(f"unknown quality threshold {k!r}; known: {', '.join(THRESHOLDS)}")
        t[k] = float(v)
    S = np.asarray(stats, dtype=np.float64)
    if S.ndim != 2 or S.shape[1] != len(STAT_NAMES):
        raise ValueError(f"stats must have shape (n, {len(STAT_NAMES)}), got {S.shape}")
    n = len(S)
    w = np.asarray(width, dtype=np.float64).ravel()
    h = np.asarray(height, dtype=np.float64).ravel()
    hashes = list(content_hash)
    for name, arr in (("width", w), ("height", h), ("content_hash", hashes)):
        if len(arr) != n:
            raise ValueError(f"{name} has {len(arr)} values for {n} stats rows")
    col = {name: S[:, i] for i, name in enumerate(STAT_NAMES)}
    low_info = col["entropy"] < t["low_information_entropy"]
    short = np.minimum(w, h)
    long_ = np.maximum(w, h)
    with np.errstate(divide="ignore", invalid="ignore"):
        aspect = np.where(short > 0, long_ / np.where(short > 0, short, 1), np.inf)
    side = np.sqrt(np.clip(w * h, 0, None))
    med = float(np.median(side[side > 0])) if (side > 0).any() else 0.0
    if med > 0:
        ratio = np.where(side > 0, side / med, 0.0)
        odd_size = (ratio > t["odd_size_factor"]) | (ratio < 1.0 / t["odd_size_factor"])
    else:
        odd_size = np.zeros(n, dtype=bool)
    odd_size |= short < t["odd_size_min_side"]
    seen: set = set()
    dup = np.zeros(n, dtype=bool)
    for i, hv in enumerate(hashes):
        if hv is None or (isinstance(hv, float) and np.isnan(hv)) or str(hv) == "":
            continue
        dup[i] = hv in seen
        seen.add(hv)
    out = pd.DataFrame({
        "blurry": (col["sharpness"] < t["blurry_sharpness"]) & ~low_info,
        "dark": col["brightness"] < t["dark_brightness"],
        "bright": col["brightness"] > t["bright_brightness"],
        "low_information": low_info,
        "grayscale": col["colourfulness"] < t["grayscale_colourfulness"],
        "odd_aspect": aspect > t["odd_aspect_ratio"],
        "odd_size": odd_size,
        "exact_duplicate": dup,
    })
    return out[list(FLAG_NAMES)]


def drop_flagged(df, names):
    """The rows of ``df`` (a build's table) with none of the flags ``names`` set, and the
    count dropped per flag: ``(df, {flag: n})``. ``names``: flag names or a comma list.
    Raises ``ValueError`` naming an unknown flag."""
    import numpy as np

    if isinstance(names, str):
        names = [n for n in names.split(",")]
    names = [str(n).strip() for n in names if str(n).strip()]
    unknown = [n for n in names if n not in FLAG_NAMES]
    if unknown:
        raise ValueError(f"unknown quality flag(s) {', '.join(map(repr, unknown))}; "
                         f"known: {', '.join(FLAG_NAMES)}")
    if not names:
        return df, {}
    missing = [n for n in names if n not in df.columns]
    if missing:
        raise ValueError(f"the table has no column {missing[0]!r}: it was built before quality "
                         "flags; rebuild it")
    flagged = {n: np.asarray(df[n].fillna(0).astype(int) != 0) for n in names}
    mask = np.logical_or.reduce(list(flagged.values()))
    return df[~mask], {n: int(v.sum()) for n, v in flagged.items()}
