"""Feature options (pixels, hog, autoencoder) and the unsupervised choice among them."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from explorer.stages import features as F
from tests import _collections as C


@pytest.fixture(scope="module")
def shapes_set():
    return C.shapes(12, kinds=("disc", "square", "star"), size=32, seed=1)


def _nn_agreement(X, labels) -> float:
    """Share of images whose nearest other image (in X) has the same label."""
    labels = np.asarray(labels)
    D = ((X[:, None, :] - X[None, :, :]) ** 2).sum(-1)
    np.fill_diagonal(D, np.inf)
    return float((labels[D.argmin(1)] == labels).mean())


def test_pixels_and_hog_give_one_row_per_image_and_group_like_images(shapes_set):
    images, labels = shapes_set
    for fn in (F.pixel_features, F.hog_features):
        X = fn(images, n_components=10)
        assert X.shape == (len(images), 10) and X.dtype == np.float32
        assert np.isfinite(X).all()
    # HOG sees shape, not colour or angle: an image's nearest neighbour is the same shape
    assert _nn_agreement(F.hog_features(images, n_components=10), labels) > 0.85
    # pixels see layout: scanned pages of one layout lie together
    pages, kinds = C.pages(8, size=48, seed=1)
    assert _nn_agreement(F.pixel_features(pages, n_components=10), kinds) > 0.8


def test_features_accept_pil_grey_and_rgba_images_of_any_size():
    imgs = [Image.new("RGB", (40, 30), (200, 10, 10)), np.zeros((17, 23), np.uint8),
            np.full((20, 20, 4), 255, np.uint8), Image.new("L", (64, 64), 128)]
    assert F.pixel_features(imgs, size=8, n_components=None).shape == (4, 8 * 8 * 3)
    assert F.pixel_features(imgs, size=8, grey=True, n_components=None).shape == (4, 64)
    assert F.hog_features(imgs, size=16, n_components=3).shape == (4, 3)


@pytest.mark.parametrize("bad", [dict(size=2), dict(n_components=0), dict(size="8")])
def test_bad_parameters_raise_value_error_naming_the_value(bad):
    with pytest.raises(ValueError, match=repr(next(iter(bad.values())))):
        F.pixel_features([np.zeros((8, 8, 3), np.uint8)] * 3, **bad)


def test_no_images_is_an_error():
    with pytest.raises(F.FeatureError, match="no images"):
        F.hog_features([])


@pytest.mark.slow
def test_autoencoder_is_deterministic_for_a_seed_and_learns(shapes_set):
    images, _ = shapes_set
    hist: list[float] = []
    a = F.autoencoder_features(images, size=16, latent=4, epochs=6, seed=3, history=hist)
    b = F.autoencoder_features(images, size=16, latent=4, epochs=6, seed=3)
    c = F.autoencoder_features(images, size=16, latent=4, epochs=6, seed=4)
    assert a.shape == (len(images), 4)
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, c)
    assert hist[-1] < hist[0]  # the reconstruction loss went down


@pytest.mark.parametrize("loss", ["l1", "perceptual"])
def test_autoencoder_losses(shapes_set, loss):
    images, _ = shapes_set
    hist: list[float] = []
    Z = F.autoencoder_features(images[:12], size=16, latent=3, epochs=3, loss=loss, history=hist)
    assert Z.shape == (12, 3) and np.isfinite(Z).all() and np.isfinite(hist).all()


def test_autoencoder_rejects_unknown_loss():
    with pytest.raises(ValueError, match="'ssim'"):
        F.autoencoder_features([np.zeros((8, 8, 3), np.uint8)] * 2, loss="ssim")


def test_autoencoder_cache_is_keyed_by_content_and_parameters(tmp_path, shapes_set):
    images, _ = shapes_set
    images = images[:8]
    hashes = [f"h{i}" for i in range(8)]
    cache = F.FeatureCache(tmp_path / "x.features")
    kw = dict(size=16, latent=3, epochs=2)
    a = F.compute("autoencoder", images, hashes=hashes, cache=cache, **kw)
    files = list((tmp_path / "x.features").glob("*.npy"))
    assert len(files) == 1
    # a second run reads the cache: even different pixels come back with the same vectors
    b = F.compute("autoencoder", [np.zeros((16, 16, 3), np.uint8)] * 8, hashes=hashes,
                  cache=cache, **kw)
    np.testing.assert_array_equal(a, b)
    # other parameters or other content: a new entry
    F.compute("autoencoder", images, hashes=hashes, cache=cache, ae_loss="l1", **kw)
    F.compute("autoencoder", images, hashes=hashes[::-1], cache=cache, **kw)
    assert len(list((tmp_path / "x.features").glob("*.npy"))) == 3


def _blobs(n_per=40, k=4, dim=20, spread=0.05, seed=0):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(k, dim)) * 3
    X = np.concatenate([c + rng.normal(scale=spread, size=(n_per, dim)) for c in centres])
    return X.astype(np.float32), np.repeat(np.arange(k), n_per)


@pytest.mark.parametrize("score", F.SCORES)
def test_choose_features_picks_the_space_with_structure(score):
    X, _ = _blobs()
    noise = np.random.default_rng(1).normal(size=X.shape).astype(np.float32)
    ch = F.choose_features({"cnn": noise, "pixels": X}, score=score, seed=0)
    assert ch.name == "pixels"
    assert set(ch.scores) == {"cnn", "pixels"} and ch.scores["pixels"] > ch.scores["cnn"]
    assert "pixels" in ch.reason and score in ch.reason
    d = ch.to_dict()
    assert d["details"]["pixels"]["clusters"] >= 2 and d["sample"] == len(X)


def test_choose_features_keeps_the_cnn_when_another_is_barely_better():
    X, _ = _blobs(seed=2)
    Y = X + np.random.default_rng(3).normal(scale=0.01, size=X.shape).astype(np.float32)
    ch = F.choose_features({"hog": Y, "cnn": X}, margin=1.0)
    assert ch.name == "cnn"
    assert "kept" in ch.reason or ch.scores["cnn"] >= ch.scores["hog"]


def test_choose_features_rejects_mismatched_candidates():
    with pytest.raises(ValueError, match="same number of rows"):
        F.choose_features({"a": np.zeros((10, 2)), "b": np.zeros((11, 2))})
    with pytest.raises(ValueError, match="'tsne'"):
        F.choose_features({"a": np.zeros((10, 2))}, score="tsne")


def test_build_with_hog_features_clusters_on_hog_and_keeps_cnn_vectors(tmp_path):
    import json

    from explorer import table
    from explorer.stages.pipeline import build

    images, labels = C.shapes(4, kinds=("disc", "star", "cross"), size=48, seed=4)
    C.write_folder(images, labels, tmp_path / "imgs")
    res = build(tmp_path / "imgs", out=tmp_path / "s.csv", features="hog", seed=0,
                progress=False)
    run = json.loads(table.sidecar(res.csv_path, "run.json").read_text())
    assert run["features"]["name"] == "hog" and run["parameters"]["features"] == "hog"
    # the stored vectors stay the CNN's (neighbours and search by image use them)
    assert np.load(table.sidecar(res.csv_path, "features.npy")).shape == (12, 1280)
    assert len(res.table) == 12
    with pytest.raises(ValueError, match="'sift'"):
        build(tmp_path / "imgs", out=tmp_path / "t.csv", features="sift", progress=False)


def _counting(images):
    calls = []

    def small(rows=None):
        calls.append(1 if rows is None else len(rows))
        return images if rows is None else [images[int(r)] for r in rows]

    return small, calls


def test_auto_choice_is_cached_by_content_hashes(tmp_path):
    """A re-run of ``auto`` on the same images reuses the choice: when the CNN won, the small
    images are not even decoded; other images (hashes) or another seed are scored again."""
    images, labels = C.shapes(30, kinds=("disc", "square", "star"), size=32, seed=2)
    cnn, _ = _blobs(n_per=30, k=3, dim=16, seed=5)
    cnn = cnn[np.argsort(np.argsort(labels, kind="stable"), kind="stable")]  # blobs = shapes
    hashes = [f"h{i}" for i in range(len(images))]
    cache = F.FeatureCache(tmp_path / "c.features")
    small, calls = _counting(images)
    first, X1 = F.auto_features(cnn, small, seed=0, hashes=hashes, cache=cache, model="m")
    assert first.name == "cnn" and X1 is None and not first.cached and calls == [1]
    assert set(first.scores) == set(F.AUTO_CANDIDATES)
    again, X2 = F.auto_features(cnn, small, seed=0, hashes=hashes, cache=cache, model="m")
    assert again.cached and again.name == "cnn" and X2 is None
    assert again.scores == first.scores and "cached" in again.reason
    assert calls == [1]  # no second decode
    # another collection (hashes), another seed or another CNN: not in the cache
    key = F.choice_key(hashes, seed=0, model="m")
    assert cache.get_json(key)["name"] == "cnn"
    for kw in (dict(hashes=hashes[::-1], seed=0, model="m"), dict(hashes=hashes, seed=1, model="m"),
               dict(hashes=hashes, seed=0, model="other")):
        assert cache.get_json(F.choice_key(kw.pop("hashes"), **kw)) is None


def test_auto_choice_and_winner_from_the_cache_decode_nothing(tmp_path):
    images, labels = C.shapes(30, kinds=("disc", "square", "star"), size=32, seed=2)
    noise = np.random.default_rng(0).normal(size=(len(images), 16)).astype(np.float32)
    hashes = [f"h{i}" for i in range(len(images))]
    cache = F.FeatureCache(tmp_path / "c.features")
    small, calls = _counting(images)
    first, X1 = F.auto_features(noise, small, seed=0, hashes=hashes, cache=cache)
    assert first.name in ("pixels", "hog") and X1 is not None
    n_calls = len(calls)
    again, X2 = F.auto_features(noise, small, seed=0, hashes=hashes, cache=cache)
    assert again.cached and again.name == first.name
    np.testing.assert_array_equal(X1, X2)  # the same features the choice was made on
    assert len(calls) == n_calls  # the winner's features came from the cache: nothing decoded
    with pytest.raises(ValueError, match="hashes"):
        F.auto_features(noise, small, hashes=hashes[:-1], cache=cache)


def test_auto_decodes_only_the_scoring_sample_unless_another_option_wins():
    """A collection larger than the scoring sample: pixels and HOG are computed for the sample
    rows only; the winner (if not the CNN) then for every row."""
    images, labels = C.shapes(30, kinds=("disc", "square", "star"), size=32, seed=2)
    cnn, _ = _blobs(n_per=30, k=3, dim=16, seed=5)
    cnn = cnn[np.argsort(np.argsort(labels, kind="stable"), kind="stable")]  # blobs = shapes
    small, calls = _counting(images)
    choice, X = F.auto_features(cnn, small, seed=0, sample=40)
    assert choice.name == "cnn" and X is None
    assert calls == [40] and choice.sample == 40  # 40 small images decoded, not 90
    noise = np.random.default_rng(0).normal(size=(len(images), 16)).astype(np.float32)
    small, calls = _counting(images)
    choice, X = F.auto_features(noise, small, seed=0, sample=40)
    assert choice.name in ("pixels", "hog") and X is not None and len(X) == len(images)
    assert calls == [40, 1]  # the sample, then every row for the winner
    with pytest.raises(ValueError, match="sample"):
        F.auto_features(cnn, small, sample=0)
