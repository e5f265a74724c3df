"""explorer.reduce: the UMAP map and clustering space, their fallbacks and validation."""

import numpy as np
import pytest
from sklearn.datasets import make_blobs
from sklearn.manifold import trustworthiness

from explorer.reduce import MIN_UMAP_POINTS, Reduction, reduce_cluster_space, reduce_map


@pytest.fixture(scope="module")
def blobs():
    X, y = make_blobs(n_samples=120, centers=3, n_features=12, cluster_std=1.0, random_state=7)
    return X.astype(np.float32), y


# --------------------------------------------------------------------------- behaviour
def test_map_is_reproducible_with_the_same_seed(blobs):
    X, _ = blobs
    a = reduce_map(X, random_state=3).embedding
    b = reduce_map(X, random_state=3).embedding
    assert np.array_equal(a, b)


def test_shapes_and_pair_unpacking(blobs):
    X, _ = blobs
    xy, notes = reduce_map(X)
    assert xy.shape == (len(X), 2) and xy.dtype == np.float32
    assert notes == []
    res = reduce_cluster_space(X, n_components=3)
    assert isinstance(res, Reduction)
    assert res.embedding.shape == (len(X), 3)
    assert np.isfinite(res.embedding).all()


def test_map_keeps_neighbourhoods_and_separates_blobs(blobs):
    X, y = blobs
    xy = reduce_map(X, metric="euclidean").embedding
    assert trustworthiness(X, xy, n_neighbors=5) >= 0.8
    # every point's nearest map neighbour comes from the same blob
    d = np.linalg.norm(xy[:, None] - xy[None], axis=2)
    np.fill_diagonal(d, np.inf)
    assert (y[d.argmin(axis=1)] == y).mean() >= 0.95


def test_cluster_space_keeps_blobs_apart(blobs):
    X, y = blobs
    Z = reduce_cluster_space(X, metric="euclidean").embedding
    centres = np.stack([Z[y == c].mean(axis=0) for c in range(3)])
    within = max(np.linalg.norm(Z[y == c] - centres[c], axis=1).mean() for c in range(3))
    between = min(
        np.linalg.norm(centres[i] - centres[j]) for i in range(3) for j in range(i + 1, 3)
    )
    assert between > 2 * within


# --------------------------------------------------------------------------- small input
@pytest.mark.parametrize("n", [0, 1, 2, 3, 5, MIN_UMAP_POINTS - 1])
@pytest.mark.parametrize("fn,k", [(reduce_map, 2), (reduce_cluster_space, 5)])
def test_tiny_inputs_never_crash_and_say_why(n, fn, k):
    X = np.random.default_rng(0).normal(size=(n, 8))
    emb, notes = fn(X)
    assert emb.shape == (n, k)
    assert np.isfinite(emb).all()
    assert notes, "a fallback must be reported"


def test_tiny_input_fallback_is_deterministic_and_spread_out():
    X = np.random.default_rng(1).normal(size=(6, 8))
    a = reduce_map(X).embedding
    assert np.array_equal(a, reduce_map(X).embedding)
    # distinct points stay distinct on the map
    assert len(np.unique(a.round(5), axis=0)) == 6


@pytest.mark.parametrize("n", [4, 40])
def test_identical_rows_go_to_the_origin_with_a_note(n):
    emb, notes = reduce_map(np.ones((n, 6)))
    assert np.array_equal(emb, np.zeros((n, 2)))
    assert any("identical" in s for s in notes)


def test_one_feature_switches_cosine_to_euclidean():
    x = np.linspace(0, 1, 40).reshape(-1, 1)
    emb, notes = reduce_map(x)
    assert emb.shape == (40, 2) and np.isfinite(emb).all()
    assert any("euclidean" in s for s in notes)


def test_zero_features_and_empty_shapes():
    emb, notes = reduce_map(np.zeros((7, 0)))
    assert emb.shape == (7, 2) and notes
    emb, notes = reduce_cluster_space(np.zeros((0, 12)), n_components=4)
    assert emb.shape == (0, 4)


def test_n_neighbors_is_clamped_to_n_minus_1():
    X = np.random.default_rng(2).normal(size=(MIN_UMAP_POINTS + 2, 5))
    emb, notes = reduce_cluster_space(X, n_neighbors=50)
    assert emb.shape == (len(X), 5)
    assert any("clamped" in s for s in notes)


# --------------------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    "kwargs,word",
    [
        ({"n_neighbors": 0}, "n_neighbors"),
        ({"n_neighbors": 1}, "n_neighbors"),
        ({"n_neighbors": 2.5}, "n_neighbors"),
        ({"min_dist": -0.1}, "min_dist"),
        ({"min_dist": 1.5}, "min_dist"),
        ({"min_dist": float("nan")}, "min_dist"),
        ({"metric": "no-such-metric"}, "no-such-metric"),
        ({"metric": 3}, "metric"),
        ({"random_state": -1}, "random_state"),
        ({"random_state": "seed"}, "random_state"),
    ],
)
def test_bad_parameters_raise_value_error_naming_them(kwargs, word):
    X = np.random.default_rng(0).normal(size=(30, 4))
    with pytest.raises(ValueError, match=word):
        reduce_map(X, **kwargs)


def test_bad_n_components_raises():
    with pytest.raises(ValueError, match="n_components"):
        reduce_cluster_space(np.zeros((30, 4)), n_components=0)


@pytest.mark.parametrize(
    "X,word",
    [
        (np.zeros(10), "2-D"),
        (np.zeros((2, 3, 4)), "2-D"),
        (np.array([[1.0, np.nan], [0.0, 1.0]]), "NaN"),
        (np.array([[1.0, np.inf], [0.0, 1.0]]), "NaN"),
        ([["a", "b"]], "numeric"),
    ],
)
def test_bad_arrays_raise_value_error(X, word):
    with pytest.raises(ValueError, match=word):
        reduce_map(X)
