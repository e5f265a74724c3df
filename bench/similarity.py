"""Speed and calibration of the classic similarity methods (explorer/stages/similarity.py).

    .venv/bin/python bench/similarity.py                 # speed: 1k and 10k images, 100k for
                                                          # phash and minhash
    .venv/bin/python bench/similarity.py --sizes 1000    # only 1k
    .venv/bin/python bench/similarity.py --calibrate     # how DEFAULT_THRESHOLDS were chosen

Speed: N generated 64x64 images (random crops of skimage.data pictures, some with noise
textures on top), decoded once in memory; feature extraction and grouping are timed
separately (median of --repeats runs) and printed with the pairs compared.

Calibration: near-duplicate families (crops of 1-5 % per side, resizing to 60-140 %, JPEG
quality 40-90, brightness x0.8-1.2) of 12 skimage.data pictures, and a random sample of
real clothing photos (../shared/data/clothing-small, different photos of clothes). For
each method and threshold it prints the share of family pairs linked (should be ~1), how
many families end up as one group with nothing else, the highest similarity between two
different sources, and the false-link rate among the clothing photos (pairs linked, and
photos with at least one link).
"""

from __future__ import annotations

import argparse
import io
import statistics
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from explorer.stages import similarity as S  # noqa: E402

SOURCES = ("astronaut", "chelsea", "coffee", "camera", "rocket", "coins", "page", "horse",
           "moon", "text", "clock", "immunohistochemistry")
CLOTHING = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "clothing-small"


def source_images() -> list[Image.Image]:
    import skimage.data

    out = []
    for name in SOURCES:
        a = getattr(skimage.data, name)()
        if a.dtype == bool:
            a = a.astype(np.uint8) * 255
        out.append(Image.fromarray(a).convert("RGB"))
    return out


def variant(img: Image.Image, rng: np.random.Generator) -> Image.Image:
    """A near-duplicate: small crop, resize, brightness shift, JPEG recompression."""
    w, h = img.size
    c = rng.uniform(0.01, 0.05, size=4)
    box = (int(c[0] * w), int(c[1] * h), w - int(c[2] * w), h - int(c[3] * h))
    out = img.crop(box)
    f = rng.uniform(0.6, 1.4)
    out = out.resize((max(16, int(out.width * f)), max(16, int(out.height * f))))
    b = rng.uniform(0.8, 1.2)
    out = Image.fromarray(np.clip(np.asarray(out, np.float32) * b, 0, 255).astype(np.uint8))
    buf = io.BytesIO()
    out.save(buf, "JPEG", quality=int(rng.integers(40, 91)))
    buf.seek(0)
    return Image.open(buf).convert("RGB")


def families(n_variants: int = 6, seed: int = 0):
    rng = np.random.default_rng(seed)
    imgs, fam = [], []
    for k, src in enumerate(source_images()):
        imgs.append(src)
        fam.append(k)
        for _ in range(n_variants - 1):
            imgs.append(variant(src, rng))
            fam.append(k)
    return imgs, np.array(fam)


def clothing_sample(n: int, seed: int = 0) -> list[Path]:
    paths = sorted(CLOTHING.rglob("*.jpg"))
    rng = np.random.default_rng(seed)
    return [paths[i] for i in np.sort(rng.choice(len(paths), size=min(n, len(paths)),
                                                 replace=False))]


def calibrate(n_clothing: int, thresholds: dict[str, list[float]], methods: list[str]) -> None:
    imgs, fam = families()
    cloth = clothing_sample(n_clothing)
    print(f"families: {fam.max() + 1} sources x {np.bincount(fam)[0]} images; "
          f"clothing sample: {len(cloth)} photos")
    iu = np.triu_indices(len(fam), k=1)
    same = fam[iu[0]] == fam[iu[1]]
    for method in methods:
        F = S.features_from_images(imgs, method, progress=False)
        sim = S.pairwise_similarity(F, method)[iu]
        Fc, ok, err = S.compute_features(cloth, method, progress=False)
        nc = len(ok)
        ciu = np.triu_indices(nc, k=1)
        csim = S.pairwise_similarity(Fc, method)[ciu]
        print(f"\n{method}: family pairs min {sim[same].min():.3f} / 5% {np.quantile(sim[same], 0.05):.3f}"
              f" / median {np.median(sim[same]):.3f}; different sources max {sim[~same].max():.3f};"
              f" clothing pairs 99.9% {np.quantile(csim, 0.999):.3f} max {csim.max():.3f}")
        print(f"  {'thr':>5} {'fam pairs linked':>16} {'families whole':>14} {'cross links':>11}"
              f" {'cloth pairs linked':>18} {'cloth photos linked':>19}")
        for t in thresholds.get(method, []):
            g = S.group(F, method, threshold=t, progress=False)
            whole = 0
            for k in range(fam.max() + 1):
                lab = g.labels[fam == k]
                others = g.labels[fam != k]
                whole += int(lab[0] >= 0 and np.all(lab == lab[0]) and not np.any(others == lab[0]))
            lab_c = S.components(nc, ciu[0][csim >= t], ciu[1][csim >= t])
            mark = " <- default" if abs(t - S.DEFAULT_THRESHOLDS[method]) < 1e-9 else ""
            print(f"  {t:5.3f} {np.mean(sim[same] >= t):16.3f} {whole:>10}/{fam.max() + 1:<3}"
                  f" {int(np.sum(sim[~same] >= t)):11d} {np.mean(csim >= t):18.5f}"
                  f" {np.mean(lab_c >= 0):19.3f}{mark}")


def bench_images(n: int, seed: int = 0, size: int = 64) -> list[Image.Image]:
    """n small images: random crops of the sources, half with a noise texture on top."""
    rng = np.random.default_rng(seed)
    srcs = [np.asarray(s.resize((256, 256))) for s in source_images()]
    out = []
    for k in range(n):
        a = srcs[rng.integers(len(srcs))]
        c = int(rng.integers(48, 200))
        y, x = rng.integers(0, 256 - c, size=2)
        crop = Image.fromarray(a[y:y + c, x:x + c]).resize((size, size))
        if k % 2:
            noise = rng.normal(0, 25, size=(size, size, 1)).astype(np.float32)
            crop = Image.fromarray(np.clip(np.asarray(crop, np.float32) + noise, 0, 255)
                                   .astype(np.uint8))
        out.append(crop)
    return out


def bench(sizes: list[int], methods: list[str], repeats: int, batch_size: int) -> None:
    print(f"{'method':>8} {'images':>7} {'features img/s':>15} {'group img/s':>12}"
          f" {'group s':>8} {'pairs compared':>15} {'links':>9} {'groups':>7} complete")
    for n in sizes:
        imgs = bench_images(n)
        for method in methods:
            if n > 10_000 and method not in ("phash", "minhash"):
                continue
            tf, tg = [], []
            for _ in range(repeats):
                t0 = time.perf_counter()
                F = S.features_from_images(imgs, method, progress=False)
                t1 = time.perf_counter()
                g = S.group(F, method, batch_size=batch_size, progress=False)
                t2 = time.perf_counter()
                tf.append(t1 - t0)
                tg.append(t2 - t1)
            f, gr = statistics.median(tf), statistics.median(tg)
            print(f"{method:>8} {n:7d} {n / f:15.0f} {n / gr:12.0f} {gr:8.2f}"
                  f" {g.n_pairs_compared:15,d} {g.n_links:9,d} {g.n_groups:7d} {g.complete}",
                  flush=True)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--calibrate", action="store_true")
    ap.add_argument("--clothing", type=int, default=600, help="clothing photos in the sample")
    ap.add_argument("--sizes", type=int, nargs="+", default=[1_000, 10_000, 100_000])
    ap.add_argument("--methods", nargs="+", default=list(S.METHODS))
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=1000)
    a = ap.parse_args(argv)
    if a.calibrate:
        grid = {
            "phash": [0.75, 0.8, 0.82, 0.84, 0.86, 0.88, 0.9],
            "ssim": [0.5, 0.6, 0.65, 0.7, 0.75, 0.8],
            "orb": [0.1, 0.15, 0.2, 0.25, 0.3, 0.4, 0.5],
            "minhash": [0.25, 0.3, 0.33, 0.35, 0.38, 0.4, 0.45, 0.5],
            "tm": [0.6, 0.7, 0.76, 0.8, 0.84, 0.9],
        }
        calibrate(a.clothing, grid, a.methods)
    else:
        bench(a.sizes, a.methods, a.repeats, a.batch_size)


if __name__ == "__main__":
    main()
