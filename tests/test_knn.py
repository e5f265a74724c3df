"""explorer.stages.knn: prepared rows, the shared neighbour graph, and queries for new rows."""

import numpy as np
import pytest
import torch

from explorer.stages.knn import KNN_METHODS, graph_and_nearest, knn_graph, prepare, query


def brute(X, k):
    d = np.linalg.norm(X[:, None] - X[None], axis=2)
    np.fill_diagonal(d, -1)
    idx = np.argsort(d, axis=1, kind="stable")[:, :k]
    return idx, np.take_along_axis(np.maximum(d, 0), idx, axis=1)


@pytest.fixture(scope="module")
def rows():
    return np.random.default_rng(0).normal(size=(300, 16)).astype(np.float32)


def test_exact_graph_equals_brute_force(rows):
    g = knn_graph(rows, 10, method="exact")
    idx, dist = brute(rows, 10)
    assert g.method == "exact"
    assert g.indices.shape == (300, 10) and g.distances.dtype == np.float32
    assert np.array_equal(g.indices, idx)
    assert np.allclose(g.distances, dist, atol=1e-4)
    assert (g.indices[:, 0] == np.arange(300)).all() and (g.distances[:, 0] == 0).all()


def test_hnsw_recall_is_high(rows):
    g = knn_graph(rows, 15, method="hnsw", random_state=0)
    idx, _ = brute(rows, 15)
    recall = np.mean([len(set(a) & set(b)) / 15 for a, b in zip(g.indices, idx)])
    assert g.method == "hnsw"
    assert recall >= 0.9
    assert (g.indices[:, 0] == np.arange(300)).all()
    # nearest first
    assert (np.diff(g.distances, axis=1) >= -1e-6).all()


def test_hnsw_is_reproducible_when_seeded_and_near_exact_on_clustered_rows(monkeypatch):
    import faiss

    from explorer.stages import knn

    rng = np.random.default_rng(5)
    centres = rng.normal(size=(40, 32))
    X = (centres[rng.integers(0, 40, 4000)] + 0.6 * rng.normal(size=(4000, 32))).astype(np.float32)
    threads = faiss.omp_get_max_threads()
    monkeypatch.setattr(knn, "EXACT_MAX_POINTS", 1000)  # "auto" above it: the approximate graph
    a, b = knn_graph(X, 15, random_state=7), knn_graph(X, 15, random_state=7)
    assert a.method == "hnsw"
    assert np.array_equal(a.indices, b.indices) and np.array_equal(a.distances, b.distances)
    assert faiss.omp_get_max_threads() == threads  # single-threaded only while seeded
    exact = knn_graph(X, 15, method="exact")
    recall = np.mean([len(set(p) & set(q)) / 15 for p, q in zip(a.indices, exact.indices)])
    assert recall >= 0.95
    assert (a.indices[:, 0] == np.arange(4000)).all()
    assert np.allclose(a.distances[:, 1:], np.linalg.norm(X[:, None] - X[a.indices[:, 1:]], axis=2),
                       atol=1e-4)


def test_duplicate_rows_keep_themselves_first():
    X = np.repeat(np.random.default_rng(1).normal(size=(20, 4)), 3, axis=0).astype(np.float32)
    g = knn_graph(X, 5, method="exact")
    assert (g.indices[:, 0] == np.arange(60)).all()
    # the two copies of each row are its next neighbours, at distance 0
    assert np.allclose(g.distances[:, 1:3], 0, atol=1e-5)
    assert set(g.indices[0, :3]) == {0, 1, 2}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_torch_graph_on_cuda_equals_brute_force(rows):
    g = knn_graph(rows, 10, method="torch", device="cuda")
    idx, dist = brute(rows, 10)
    assert g.method == "torch"
    assert (g.indices == idx).mean() > 0.999
    assert np.allclose(g.distances, dist, atol=1e-3)


def test_auto_picks_exact_for_small_input_on_cpu(rows):
    assert knn_graph(rows, 5).method == "exact"


def test_cosine_preparation_gives_cosine_neighbours():
    rng = np.random.default_rng(2)
    directions = rng.normal(size=(200, 8))
    X = (directions * rng.uniform(0.1, 10, size=(200, 1))).astype(np.float32)  # lengths vary
    Xp, info = prepare(X, metric="cosine")
    assert info["pca_dims"] is None  # 8 <= 64: no PCA
    g = knn_graph(Xp, 6)
    U = directions / np.linalg.norm(directions, axis=1, keepdims=True)
    cos_idx = np.argsort(-(U @ U.T), axis=1, kind="stable")[:, :6]
    assert np.mean([set(a) == set(b) for a, b in zip(g.indices, cos_idx)]) >= 0.98
    eu_idx, _ = brute(X, 6)
    assert np.mean([set(a) == set(b) for a, b in zip(g.indices, eu_idx)]) < 0.5


def test_pca_keeps_neighbours_of_high_dimensional_rows():
    rng = np.random.default_rng(3)
    centres = rng.normal(size=(10, 300))
    X = (centres[rng.integers(0, 10, 500)] + 0.3 * rng.normal(size=(500, 300))).astype(np.float32)
    Xp, info = prepare(X, metric="euclidean", pca_dims=32)
    assert Xp.shape == (500, 32) and Xp.dtype == np.float32
    assert info["pca_dims"] == 32 and 0 < info["pca_explained_variance"] <= 1
    a, _ = brute(X, 10)
    b = knn_graph(Xp, 10).indices
    assert np.mean([len(set(x) & set(y)) / 10 for x, y in zip(a, b)]) >= 0.5


@pytest.mark.parametrize("method", ["exact", "hnsw"])
def test_graph_and_nearest_answers_queries_against_the_graphs_rows(rows, method):
    # the map's sampled fit: a graph of the sample, and each other row's nearest sample rows
    sample, others = rows[:200], rows[200:]
    g, idx, dist = graph_and_nearest(sample, 10, others, 5, method=method, random_state=0)
    assert g.method == method and g.indices.shape == (200, 10)
    assert (g.indices[:, 0] == np.arange(200)).all()
    d = np.linalg.norm(others[:, None] - sample[None], axis=2)
    want = np.argsort(d, axis=1)[:, :5]
    assert idx.shape == (100, 5) and idx.dtype == np.int32 and dist.dtype == np.float32
    recall = np.mean([len(set(a) & set(b)) / 5 for a, b in zip(idx, want)])
    assert recall >= (1.0 if method == "exact" else 0.9)
    assert np.allclose(dist, np.take_along_axis(d, idx, axis=1), atol=1e-4)


def test_query_finds_the_same_rows_as_brute_force(rows):
    new = rows[:7] + 0.01
    idx, dist = query(rows, new, 4, metric="euclidean", block=50)  # several blocks
    d = np.linalg.norm(new[:, None] - rows[None], axis=2)
    assert np.array_equal(idx, np.argsort(d, axis=1)[:, :4])
    assert np.allclose(dist, np.sort(d, axis=1)[:, :4], atol=1e-4)
    idx_c, dist_c = query(rows, rows[:5] * 3.0, 1)  # cosine: scaling changes nothing
    assert np.array_equal(idx_c[:, 0], np.arange(5)) and np.allclose(dist_c, 0, atol=1e-5)


@pytest.mark.parametrize(
    "call,word",
    [
        (lambda X: knn_graph(X, 0), "k"),
        (lambda X: knn_graph(X, 5, method="annoy"), "annoy"),
        (lambda X: knn_graph(X, 5, device="tpu"), "tpu"),
        (lambda X: knn_graph(X, 5, random_state=-3), "random_state"),
        (lambda X: prepare(X, metric="manhattan"), "manhattan"),
        (lambda X: prepare(X, pca_dims=1), "pca_dims"),
        (lambda X: query(X, X[:2, :3], 2), "columns"),
        (lambda X: graph_and_nearest(X, 5, X[:2, :3], 2), "columns"),
        (lambda X: graph_and_nearest(X, 5, X[:2], 0), "q_k"),
        (lambda X: knn_graph(np.full((3, 2), np.nan), 2), "NaN"),
    ],
)
def test_bad_parameters_raise_value_error(rows, call, word):
    with pytest.raises(ValueError, match=word):
        call(rows)


def test_methods_are_listed():
    assert set(KNN_METHODS) == {"auto", "exact", "hnsw", "torch"}
