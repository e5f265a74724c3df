"""Classic similarity methods: near-duplicate families grouped, different pictures apart."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from explorer.stages import similarity as S

SOURCES = ("astronaut", "chelsea", "coffee", "camera", "rocket", "coins", "page", "horse")


def _source(name: str) -> Image.Image:
    import skimage.data

    a = getattr(skimage.data, name)()
    if a.dtype == bool:
        a = a.astype(np.uint8) * 255
    img = Image.fromarray(a).convert("RGB")
    img.thumbnail((192, 192))
    return img


def _variant(img: Image.Image, rng: np.random.Generator) -> Image.Image:
    """Crop a few percent, resize, shift brightness, recompress as JPEG."""
    w, h = img.size
    c = rng.uniform(0.0, 0.03, size=4)
    out = img.crop((int(c[0] * w), int(c[1] * h), w - int(c[2] * w), h - int(c[3] * h)))
    f = rng.uniform(0.8, 1.25)
    out = out.resize((int(out.width * f), int(out.height * f)))
    arr = np.asarray(out, np.float32) * rng.uniform(0.9, 1.1)
    out = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))
    buf = io.BytesIO()
    out.save(buf, "JPEG", quality=int(rng.integers(60, 95)))
    buf.seek(0)
    return Image.open(buf).convert("RGB")


@pytest.fixture(scope="module")
def family_images():
    """4 near-duplicates of each of 8 different pictures; fam[i] = source of image i."""
    rng = np.random.default_rng(0)
    imgs, fam = [], []
    for k, name in enumerate(SOURCES):
        src = _source(name)
        imgs.append(src)
        fam.append(k)
        for _ in range(3):
            imgs.append(_variant(src, rng))
            fam.append(k)
    # interleave so no family sits in one batch
    order = np.random.default_rng(1).permutation(len(imgs))
    return [imgs[i] for i in order], np.asarray(fam)[order]


@pytest.fixture(scope="module")
def features(family_images):
    imgs, _ = family_images
    return {m: S.features_from_images(imgs, m, progress=False) for m in S.METHODS}


def _same_partition(a, b) -> bool:
    a, b = np.asarray(a), np.asarray(b)
    pairs_a = a[:, None] == a[None, :]
    pairs_b = b[:, None] == b[None, :]
    pairs_a &= (a[:, None] >= 0)
    pairs_b &= (b[:, None] >= 0)
    return bool(np.array_equal(pairs_a, pairs_b))


@pytest.mark.parametrize("method", S.METHODS)
def test_each_family_is_one_group_and_sources_stay_apart(method, features, family_images):
    _, fam = family_images
    g = S.group(features[method], method, progress=False)
    assert g.threshold == S.DEFAULT_THRESHOLDS[method]
    for k in range(fam.max() + 1):
        lab = g.labels[fam == k]
        assert lab[0] >= 0 and np.all(lab == lab[0]), (method, SOURCES[k], lab)
        assert not np.any(g.labels[fam != k] == lab[0]), (method, SOURCES[k])
    assert g.n_groups == fam.max() + 1
    assert g.complete


@pytest.mark.parametrize("method", ["ssim", "tm", "orb"])
def test_batches_merged_through_representatives_match_one_batch(method, features):
    one = S.group(features[method], method, batch_size=1000, progress=False)
    small = S.group(features[method], method, batch_size=12, progress=False)
    assert _same_partition(one.labels, small.labels)
    assert small.complete
    # fewer pairs than all pairs of the set
    n = len(one.labels)
    assert small.n_pairs_compared < n * (n - 1) // 2 == one.n_pairs_compared


def test_merge_that_cannot_compare_every_representative_says_so(features):
    g = S.group(features["ssim"], "ssim", batch_size=4, merge_rounds=0, progress=False)
    assert not g.complete


def test_chain_of_links_ends_in_one_component():
    # X-A, A-B, B-Y linked; X and Y far apart; Z alone
    lab = S.components(5, [0, 1, 2], [1, 2, 3])
    assert lab[0] == lab[1] == lab[2] == lab[3] >= 0
    assert lab[4] == -1


def test_phash_chain_x_a_b_y_joins_x_and_y():
    x = np.uint64(0)
    a = np.uint64(0b111111)  # 6 bits from x
    b = np.uint64(0b111111111111)  # 6 from a
    y = np.uint64(0b111111111111111111)  # 6 from b, 18 from x
    other = np.uint64(0xFFFF_FFFF_0000_0000)
    lab = S.group_hashes(np.array([x, a, b, y, other], dtype=np.uint64), max_distance=6)
    assert lab[0] == lab[3] >= 0
    assert lab[4] == -1


def test_hash_index_finds_exactly_the_pairs_of_all_pairs():
    rng = np.random.default_rng(3)
    base = rng.integers(0, 2**63, size=150, dtype=np.uint64)
    flips = np.zeros(150, dtype=np.uint64)
    for k in range(150):
        for bit in rng.choice(64, size=rng.integers(0, 14), replace=False):
            flips[k] |= np.uint64(1) << np.uint64(bit)
    h = np.concatenate([base, base ^ flips, base[:10]])  # includes exact copies
    for r in (0, 3, 8, 12):
        d = np.bitwise_count(h[:, None] ^ h[None, :])
        a, b = np.nonzero(np.triu(d <= r, k=1))
        # distinct hashes: exactly the pairs within the radius
        i, j, n_cmp = S.hamming_pairs(h[:300], r)
        inside = (a < 300) & (b < 300)
        assert set(zip(i.tolist(), j.tolist())) == set(zip(a[inside].tolist(), b[inside].tolist()))
        assert n_cmp < 300 * 299 // 2
        # with exact copies: the same components as all pairs
        assert _same_partition(S.group_hashes(h, r), S.components(len(h), a, b)), r


def test_phash_of_survives_resizing_and_differs_between_pictures():
    cat, coffee = _source("chelsea"), _source("coffee")
    h1 = S.phash_of(cat)
    h2 = S.phash_of(cat.resize((100, 70)))
    assert isinstance(h1, np.uint64)
    assert S.phash_similarity(h1, h2) >= S.DEFAULT_THRESHOLDS["phash"]
    assert S.phash_similarity(h1, S.phash_of(coffee)) < S.DEFAULT_THRESHOLDS["phash"]


def test_ssim_matches_scikit_image(features):
    from skimage.metrics import structural_similarity

    x = features["ssim"][:5]
    m = S.pairwise_similarity(x, "ssim")
    for a, b in [(0, 1), (2, 4), (3, 3)]:
        ref = structural_similarity(x[a], x[b], data_range=1.0)
        assert m[a, b] == pytest.approx(ref, abs=1e-4)


def test_template_matching_matches_opencv(features, family_images):
    import cv2

    _, fam = family_images
    x = features["tm"][np.argsort(fam, kind="stable")[:6]]  # 4 of one family, 2 of another
    m = S.pairwise_similarity(x, "tm")
    c = S._TM_MARGIN
    t = x.shape[1] - 2 * c
    for a, b in [(0, 1), (1, 3), (2, 5), (0, 4)]:
        e1 = cv2.matchTemplate(x[b], x[a][c:c + t, c:c + t], cv2.TM_SQDIFF_NORMED).min()
        e2 = cv2.matchTemplate(x[a], x[b][c:c + t, c:c + t], cv2.TM_SQDIFF_NORMED).min()
        assert m[a, b] == pytest.approx(1 - min(e1, e2), abs=1e-3)


def test_find_groups_on_files_reports_bad_files_and_keeps_the_rest(tmp_path, family_images):
    imgs, fam = family_images
    keep = np.nonzero(fam < 2)[0]
    paths = []
    for k in keep:
        p = tmp_path / f"img {k}.jpg"
        imgs[k].save(p, quality=90)
        paths.append(p)
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    (tmp_path / "notes.txt.png").write_text("hello")
    paths += [tmp_path / "broken.jpg", tmp_path / "notes.txt.png"]
    g = S.find_groups(paths, "phash", progress=False)
    assert len(g.labels) == len(paths)
    assert {p for p, _ in g.errors} == {str(paths[-2]), str(paths[-1])}
    assert np.all(g.labels[-2:] == -1)
    lab = g.labels[:-2]
    assert len(set(lab[fam[keep] == 0])) == 1 and len(set(lab[fam[keep] == 1])) == 1
    assert lab[fam[keep] == 0][0] != lab[fam[keep] == 1][0]


def test_compute_features_empty_and_all_bad(tmp_path):
    feats, ok, errors = S.compute_features([], "ssim", progress=False)
    assert len(feats) == 0 and len(ok) == 0 and errors == []
    bad = tmp_path / "x.jpg"
    bad.write_bytes(b"")
    feats, ok, errors = S.compute_features([bad, tmp_path / "missing.png"], "orb", progress=False)
    assert len(feats) == 0 and len(errors) == 2
    assert S.group(feats, "orb", progress=False).labels.shape == (0,)


@pytest.mark.parametrize("kwargs, word", [
    ({"method": "sift"}, "method"),
    ({"threshold": 1.5}, "threshold"),
    ({"threshold": -0.1}, "threshold"),
    ({"batch_size": 1}, "batch_size"),
    ({"merge_rounds": -1}, "merge_rounds"),
])
def test_bad_parameters_raise_value_errors_naming_them(kwargs, word):
    kw = {"method": "phash", **kwargs}
    method = kw.pop("method")
    with pytest.raises(ValueError, match=word):
        S.group(np.zeros(3, dtype=np.uint64), method, progress=False, **kw)


def test_describe_puts_near_duplicates_closer_than_other_pictures(family_images, tmp_path):
    imgs, fam = family_images
    v = S.describe(imgs)
    assert v.shape == (len(imgs), 128) and np.isfinite(v).all()
    d = np.linalg.norm(v[:, None] - v[None, :], axis=2)
    same = fam[:, None] == fam[None, :]
    np.fill_diagonal(same, False)
    assert np.median(d[same]) < np.median(d[~same & ~np.eye(len(fam), dtype=bool)])
    bad = tmp_path / "bad.jpg"
    bad.write_text("nope")
    out = S.describe([imgs[0], bad])
    assert np.isfinite(out[0]).all() and np.isnan(out[1]).all()


def test_threshold_curve_and_plot(features, family_images, tmp_path):
    imgs, fam = family_images
    curve = S.threshold_curve(features["phash"], "phash", sample=None, seed=0)
    assert {"threshold", "n_pairs", "n_clustered"} <= set(curve.columns)
    assert np.all(np.diff(curve["n_pairs"]) <= 0)  # higher threshold, fewer pairs
    n = len(fam)
    assert curve["n_pairs"].iloc[0] == n * (n - 1) // 2  # threshold 0 links everything
    at = curve.set_index("threshold").loc[S.DEFAULT_THRESHOLDS["phash"]]
    assert at["n_clustered"] == n  # every image has its family
    sampled = S.threshold_curve(features["phash"], "phash", sample=10, seed=1)
    assert (sampled["sample_size"] == 10).all() and (sampled["n_images"] == n).all()
    assert sampled.equals(S.threshold_curve(features["phash"], "phash", sample=10, seed=1))
    out = S.threshold_plot(curve, tmp_path / "thr.html", "phash")
    html = out.read_text()
    assert "images in a group" in html and "cdn.bokeh.org" not in html


def test_threshold_curve_from_paths(tmp_path, family_images):
    imgs, _ = family_images
    paths = []
    for k in range(8):
        p = tmp_path / f"{k}.png"
        imgs[k].save(p)
        paths.append(str(p))
    curve = S.threshold_curve(paths, "tm", sample=6, seed=0, progress=False)
    assert (curve["sample_size"] == 6).all() and (curve["n_images"] == 8).all()
    with pytest.raises(ValueError, match="thresholds"):
        S.threshold_curve(paths, "tm", thresholds=[0.5, 2.0], progress=False)
