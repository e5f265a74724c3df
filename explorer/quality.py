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
