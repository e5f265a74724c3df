"""Near-duplicate accuracy per method (imagededup's protocol) and phash grouping at scale.

    .venv/bin/python bench/dedupe.py --data ../shared/data/clothing-small      # both parts
    .venv/bin/python bench/dedupe.py --sources 60 --skip-scale                  # quick accuracy
    .venv/bin/python bench/dedupe.py --skip-accuracy --scale 100000 1000000     # speed only

Accuracy. ``--sources`` real photos (a random sample of ``--data``; different photos of
clothes, which look alike: centred garment, plain background) and the 4 colour photos of
skimage.data get ``--copies`` edited copies each, written as JPEG files, so the ground truth
is exact: two images are duplicates iff they come from the same source. Two edit levels:

* mild: resize x0.5-1.5, JPEG quality 50-90, crop 0-3 % per side, brightness x0.9-1.1;
* heavier: the same plus crop 3-10 % per side, rotation +-2-5 degrees, brightness x0.75-1.25,
  JPEG quality 30-70.

Every pair of images of one level is scored by each method (phash of the build's stored
256 px thumbnail, ssim, orb, minhash, tm from explorer.stages.similarity; ``cnn``: cosine of the
default model's embeddings, explorer.stages.embed; ``cnn+orb``: explorer.stages.duplicates' embedding-based
option: each image's 10 nearest by cosine with cosine >= 0.5 are candidates, scored by the
mean of the cosine and the orb score, so a pair must look alike AND share keypoints). The
sources are split in two halves: the threshold is chosen on the first (the lowest that
keeps pairwise precision >= the goal: 0.98 mild, 0.95 heavier) and precision and recall
are reported on the second. ``cnn+orb`` is also reported at its documented default
(``explorer.stages.duplicates.CNN_ORB_THRESHOLD``, fixed, not fitted per run) on both halves, and
``--sweep`` prints its whole precision/recall curve on each half.

Scale. Random 64-bit hashes with planted near-duplicate families (10 % of the rows, each a
copy of a source with up to 4 flipped bits) grouped by explorer.curation.dedupe at the default radius
(10 bits = phash similarity 0.84) and at the radius the accuracy part chose; then 1 % new
hashes are added to the index (the incremental re-run). Timings are wall clock and CPU
seconds of the process (all threads) on this machine; the load average is printed with
them (on a busy machine the CPU seconds divided by the threads estimate an idle run).
"""

from __future__ import annotations

import argparse
import io
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from explorer.stages import duplicates  # noqa: E402
from explorer.stages import similarity as S  # noqa: E402

SKIMAGE = ("astronaut", "chelsea", "coffee", "rocket")
GOALS = {"mild": 0.98, "heavier": 0.95}
METHODS = ("phash", "ssim", "orb", "minhash", "tm", "cnn", "cnn+orb")


def load(path) -> Image.Image:
    from explorer.stages.images import load_image

    return load_image(path, 512).image.convert("RGB")


def sources(data: Path, n: int, seed: int) -> list[Image.Image]:
    import skimage.data

    paths = sorted(data.rglob("*.jpg"))
    if not paths:
        raise SystemExit(f"no photos under {data} (pass --data)")
    rng = np.random.default_rng(seed)
    pick = rng.choice(len(paths), size=min(n, len(paths)), replace=False)
    out = [load(paths[i]) for i in pick]
    out += [Image.fromarray(getattr(skimage.data, s)()[..., :3]) for s in SKIMAGE]
    return out


def edit(img: Image.Image, level: str, rng: np.random.Generator) -> bytes:
    """One edited copy as JPEG bytes."""
    w, h = img.size
    if level == "heavier":
        ang = rng.uniform(2, 5) * rng.choice([-1, 1])
        img = img.rotate(ang, resample=Image.Resampling.BILINEAR, expand=False,
                         fillcolor=(255, 255, 255))
    lo, hi = (0.0, 0.03) if level == "mild" else (0.03, 0.10)
    c = rng.uniform(lo, hi, size=4)
    img = img.crop((int(c[0] * w), int(c[1] * h), w - int(c[2] * w), h - int(c[3] * h)))
    f = rng.uniform(0.5, 1.5)
    img = img.resize((max(32, int(img.width * f)), max(32, int(img.height * f))),
                     Image.Resampling.BILINEAR)
    b = rng.uniform(0.9, 1.1) if level == "mild" else rng.uniform(0.75, 1.25)
    img = Image.fromarray(np.clip(np.asarray(img, np.float32) * b, 0, 255).astype(np.uint8))
    q = int(rng.integers(50, 91)) if level == "mild" else int(rng.integers(30, 71))
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=q)
    return buf.getvalue()


def write_level(srcs, level: str, copies: int, folder: Path, seed: int):
    """Sources and their copies as JPEG files; returns paths and the source of each."""
    rng = np.random.default_rng(seed + (0 if level == "mild" else 1))
    folder.mkdir(parents=True, exist_ok=True)
    paths, fam = [], []
    for k, img in enumerate(srcs):
        p = folder / f"s{k:04d}-0.jpg"
        img.save(p, "JPEG", quality=95)
        paths.append(p)
        fam.append(k)
        for c in range(copies):
            p = folder / f"s{k:04d}-{c + 1}.jpg"
            p.write_bytes(edit(img, level, rng))
            paths.append(p)
            fam.append(k)
    return paths, np.array(fam)


def scores(paths, methods, store: Path) -> dict[str, np.ndarray]:
    """All-pairs similarity matrices per method."""
    out = {}
    emb = None
    if "cnn+orb" in methods:  # the mean of the two: needs both
        methods = list(dict.fromkeys([*methods[:methods.index("cnn+orb")], "orb", "cnn",
                                      *methods[methods.index("cnn+orb"):]]))
    if "phash" in methods or "cnn" in methods:
        from explorer.stages.embed import embed_paths

        t0 = time.perf_counter()
        emb = embed_paths([str(p) for p in paths], store=store, progress=False)
        print(f"  embedded (default model; phash of the thumbnail) {len(paths)} images in "
              f"{time.perf_counter() - t0:.1f} s", flush=True)
        if len(emb.ok) != len(paths):
            raise SystemExit(f"unreadable copies: {emb.errors[:3]}")
    for m in methods:
        t0 = time.perf_counter()
        if m == "phash":
            h = emb.phash.astype(np.uint64)
            out[m] = S.phash_similarity(h[:, None], h[None, :])
        elif m == "cnn":
            v = emb.embeddings / np.linalg.norm(emb.embeddings, axis=1, keepdims=True)
            out[m] = v @ v.T
        elif m == "cnn+orb":  # as explorer.stages.duplicates.group_cnn_orb scores: candidates only
            i, j, _ = duplicates.embedding_candidates(emb.embeddings)
            sim = np.zeros_like(out["cnn"])
            sim[i, j] = sim[j, i] = (out["cnn"][i, j] + out["orb"][i, j]) / 2
            np.fill_diagonal(sim, 1.0)
            out[m] = sim
        else:
            f, ok, err = S.compute_features([str(p) for p in paths], m, progress=False)
            if err:
                raise SystemExit(f"{m}: unreadable copies: {err[:3]}")
            out[m] = S.pairwise_similarity(f, m)
        print(f"  {m:8s} scored {len(paths)} images in {time.perf_counter() - t0:.1f} s",
              flush=True)
    if "cnn+orb" in methods:  # the option as the build and the CLI run it: time and check
        t0, c0 = time.perf_counter(), time.process_time()
        lab, info = duplicates.group_cnn_orb(emb.embeddings, duplicates.orb_reader([str(p) for p in paths]))
        t1, c1 = time.perf_counter(), time.process_time()
        same = np.array_equal(lab, S.components(len(paths), *np.nonzero(np.triu(
            out["cnn+orb"] >= duplicates.CNN_ORB_THRESHOLD, 1))))
        print(f"  cnn+orb grouping (explorer.stages.duplicates.group_cnn_orb, ORB read from the files): "
              f"{t1 - t0:.1f} s wall ({c1 - c0:.1f} CPU s) for {len(paths)} images, "
              f"{info['candidates']} candidate pairs, {info['orb_images']} ORB reads, "
              f"{info['links']} links, {int(lab.max()) + 1} groups; the same groups as the "
              f"scores above: {same}; load average "
              f"{open('/proc/loadavg').read().split()[0]}", flush=True)
    return out


def pr(sim: np.ndarray, fam: np.ndarray, sel: np.ndarray, t: float):
    """Pairwise precision and recall among the images ``sel`` at threshold ``t``."""
    a, b = np.triu_indices(len(sel), k=1)
    s = sim[np.ix_(sel, sel)][a, b]
    truth = fam[sel][a] == fam[sel][b]
    pred = s >= t
    tp = int((pred & truth).sum())
    prec = tp / max(int(pred.sum()), 1)
    rec = tp / max(int(truth.sum()), 1)
    return prec, rec


def choose(sim, fam, sel, goal):
    """The lowest threshold (of the scores seen) whose precision on ``sel`` is >= goal."""
    a, b = np.triu_indices(len(sel), k=1)
    s = sim[np.ix_(sel, sel)][a, b]
    truth = fam[sel][a] == fam[sel][b]
    order = np.argsort(-s, kind="stable")
    tp = np.cumsum(truth[order])
    prec = tp / np.arange(1, len(s) + 1)
    ok = np.flatnonzero(prec >= goal)
    if len(ok) == 0:
        return float(s.max()) + 1e-9
    k = ok[-1]
    # all pairs with the same score go together: move to the last k whose score differs
    return float(s[order][k])


def accuracy(a) -> dict:
    srcs = sources(Path(a.data), a.sources, a.seed)
    n_src = len(srcs)
    rng = np.random.default_rng(a.seed)
    calib_src = np.zeros(n_src, bool)
    calib_src[rng.choice(n_src, n_src // 2, replace=False)] = True
    rows, chosen, sweeps = [], {}, []
    with tempfile.TemporaryDirectory() as tmp:
        for level in ("mild", "heavier"):
            print(f"{level}: {n_src} sources x {a.copies + 1} images", flush=True)
            paths, fam = write_level(srcs, level, a.copies, Path(tmp) / level, a.seed)
            sims = scores(paths, a.methods, Path(tmp) / "store")
            cal = np.flatnonzero(calib_src[fam])
            test = np.flatnonzero(~calib_src[fam])
            for m, sim in sims.items():
                t = choose(sim, fam, cal, GOALS[level])
                p, r = pr(sim, fam, test, t)
                chosen[(m, level)] = t
                extra = f" (phash: <= {S.max_distance_for(t)} bits)" if m == "phash" else ""
                rows.append((level, m, f"{t:.3f}{extra}", p, r))
            if "cnn+orb" in sims:
                t = duplicates.CNN_ORB_THRESHOLD
                for half, sel in (("calibration", cal), ("test", test)):
                    p, r = pr(sims["cnn+orb"], fam, sel, t)
                    rows.append((level, f"cnn+orb, {half} half", f"{t} (default)", p, r))
                if a.sweep:
                    sweeps.append((level, sims["cnn+orb"], fam, cal, test))
    print(f"\nload average: {open('/proc/loadavg').read().split()[:3]}")
    print(f"{n_src} sources ({n_src - len(SKIMAGE)} clothing photos + {len(SKIMAGE)} skimage), "
          f"{a.copies} copies each; threshold chosen on half the sources, figures on the "
          f"other half")
    print("| edits | method | goal: precision >= | threshold (calibration half) | precision "
          "| recall |")
    print("|---|---|---|---|---|---|")
    for level, m, t, p, r in rows:
        print(f"| {level} | {m} | {GOALS[level]} | {t} | {p:.3f} | {r:.3f} |")
    for level, sim, fam, cal, test in sweeps:
        print(f"\ncnn+orb sweep, {level} edits: precision / recall per threshold")
        print("| threshold | calibration half | test half |")
        print("|---|---|---|")
        for t in np.round(np.arange(0.35, 0.6001, 0.025), 3):
            pc, rc = pr(sim, fam, cal, t)
            pt, rt = pr(sim, fam, test, t)
            print(f"| {t:.3f} | {pc:.3f} / {rc:.3f} | {pt:.3f} / {rt:.3f} |")
    return chosen


def planted_hashes(n: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    h = rng.integers(0, 2**63, n, dtype=np.uint64) * np.uint64(2) + \
        rng.integers(0, 2, n, dtype=np.uint64)
    k = n // 10
    src = rng.integers(0, n, k)
    dup = rng.choice(n, k, replace=False)
    h[dup] = h[src]
    for _ in range(4):
        flip = rng.random(k) < 0.5
        bit = rng.integers(0, 64, k).astype(np.uint64)
        h[dup[flip]] ^= np.uint64(1) << bit[flip]
    return h


def scale(sizes, radii, seed: int) -> None:
    import numba

    duplicates.hamming_links(planted_hashes(1000, seed), max(radii))  # compile / load the kernel
    print(f"\ngrouping (explorer.curation.dedupe, {numba.get_num_threads()} numba threads)")
    print("| hashes | radius (bits) | chunks | full grouping: wall s (CPU s) | groups | "
          "+1 % new: re-run wall s (CPU s) | load average |")
    print("|---|---|---|---|---|---|---|")
    for n in sizes:
        h = planted_hashes(n, seed)
        for r in radii:
            ix = duplicates.DuplicateIndex(r)
            keys = np.arange(n).astype(str)
            m = n - n // 100
            t0, c0 = time.perf_counter(), time.process_time()
            lab = ix.update(keys[:m], h[:m])
            t1, c1 = time.perf_counter(), time.process_time()
            ix.update(keys, h)
            t2, c2 = time.perf_counter(), time.process_time()
            load = open("/proc/loadavg").read().split()[0]
            print(f"| {n:,} | {r} | {duplicates.n_chunks(m, r)} | {t1 - t0:.1f} ({c1 - c0:.1f}) | "
                  f"{len(np.unique(lab[lab >= 0])):,} | {t2 - t1:.1f} ({c2 - c1:.1f}; "
                  f"{ix.n_queried:,} looked up) | {load} |", flush=True)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", default="../shared/data/clothing-small")
    ap.add_argument("--sources", type=int, default=200)
    ap.add_argument("--copies", type=int, default=3)
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    ap.add_argument("--scale", nargs="+", type=int, default=[100_000, 1_000_000])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--sweep", action="store_true",
                    help="print cnn+orb's precision/recall at every threshold on both halves")
    ap.add_argument("--skip-accuracy", action="store_true")
    ap.add_argument("--skip-scale", action="store_true")
    a = ap.parse_args(argv)
    os.environ.setdefault("TQDM_DISABLE", "1")
    radii = [duplicates.DEFAULT_MAX_DISTANCE]
    if not a.skip_accuracy:
        chosen = accuracy(a)
        if ("phash", "mild") in chosen:  # a smaller radius than the default is faster: time it
            radii.append(min(S.max_distance_for(chosen[("phash", "mild")]), radii[0]))
    if not a.skip_scale:
        scale(a.scale, sorted(set(radii)), a.seed)


if __name__ == "__main__":
    main()
