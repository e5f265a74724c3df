"""explorer.stages.reduce: the UMAP map and clustering space, their fallbacks and validation."""

import numpy as np
import pytest
from sklearn.datasets import make_blobs
from sklearn.manifold import trustworthiness

from explorer.stages.reduce import MIN_UMAP_POINTS, Reduction, reduce_cluster_space, reduce_map


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


def test_umap_kernels_are_kept_on_disk_for_the_next_process(blobs):
    # umap-learn compiles almost all its numba kernels without cache=True: every build
    # process paid ~9 CPU s for them again (explorer.stages.jit). After a map is drawn its
    # kernels are in numba's disk cache, where the next process finds them. Fails with
    # jit.cache_kernels not called (tried once: cache_path None).
    from pathlib import Path

    import umap.layouts
    import umap.umap_

    reduce_map(blobs[0], random_state=3)
    for kernel in (umap.umap_.smooth_knn_dist, umap.umap_.compute_membership_strengths,
                   umap.layouts.rdist):
        stats = kernel.stats
        assert stats.cache_path is not None, kernel.__name__
        assert sum(stats.cache_hits.values()) + sum(stats.cache_misses.values()) >= 1
        index = list(Path(stats.cache_path).glob(f"*{kernel.__name__}*.nbi"))
        assert index, f"no cache index for {kernel.__name__} in {stats.cache_path}"


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


# --------------------------------------------------------------------------- map_and_space
from explorer.stages.reduce import MAP_METHODS, MapResult, map_and_space, place_new  # noqa: E402


def rays(n_per=60, dirs=3, d=12, seed=0):
    """Groups that differ by direction, not length: each group is a thin cone (angles
    0.03 apart, 0.003 spread) with lengths spread log-uniformly over 0.1..10, so the
    cosine neighbours are the group while Euclidean neighbours mix groups."""
    rng = np.random.default_rng(seed)
    base = rng.normal(size=d)
    base /= np.linalg.norm(base)
    offs = rng.normal(size=(dirs, d))
    offs -= (offs @ base)[:, None] * base
    offs /= np.linalg.norm(offs, axis=1, keepdims=True)
    y = np.repeat(np.arange(dirs), n_per)
    U = base + 0.03 * offs[y] + (0.003 / np.sqrt(d)) * rng.normal(size=(len(y), d))
    X = U * np.exp(rng.uniform(np.log(0.1), np.log(10), size=(len(y), 1)))
    return X.astype(np.float32), y


def nn_purity(Y, y):
    d = np.linalg.norm(Y[:, None] - Y[None], axis=2)
    np.fill_diagonal(d, np.inf)
    return (y[d.argmin(axis=1)] == y).mean()


@pytest.fixture(scope="module")
def rays_result():
    X, y = rays()
    return X, y, map_and_space(X, random_state=0)


def test_default_cosine_path_groups_by_direction(rays_result):
    X, y, res = rays_result
    # the data is built so that the two metrics disagree
    assert nn_purity(X, y) < 0.8
    U = X / np.linalg.norm(X, axis=1, keepdims=True)
    assert nn_purity(U, y) >= 0.95
    assert isinstance(res, MapResult)
    assert res.xy.shape == (len(X), 2) and res.xy.dtype == np.float32
    assert res.space.shape == (len(X), 5) and res.space.dtype == np.float32
    assert nn_purity(res.xy, y) >= 0.95
    assert nn_purity(res.space, y) >= 0.95
    assert res.info["metric"] == "cosine"


def test_knn_of_the_result_is_the_cosine_graph(rays_result):
    X, _, res = rays_result
    idx, dist = res.knn
    assert idx.shape == (len(X), 30) and dist.shape == (len(X), 30)
    assert (idx[:, 0] == np.arange(len(X))).all()
    U = X / np.linalg.norm(X, axis=1, keepdims=True)
    want = np.argsort(-(U @ U.T), axis=1, kind="stable")[:, :30]
    assert np.mean([len(set(a) & set(b)) / 30 for a, b in zip(idx, want)]) >= 0.99


def test_one_neighbour_graph_feeds_both_umap_fits(monkeypatch):
    import umap

    from explorer.stages import knn as knn_mod

    calls = {"knn": 0, "umap": []}
    real_graph, real_init = knn_mod.knn_graph, umap.UMAP.__init__

    def counting_graph(*a, **kw):
        calls["knn"] += 1
        return real_graph(*a, **kw)

    def recording_init(self, *a, **kw):
        calls["umap"].append(kw.get("precomputed_knn"))
        real_init(self, *a, **kw)

    monkeypatch.setattr(knn_mod, "knn_graph", counting_graph)
    monkeypatch.setattr(umap.UMAP, "__init__", recording_init)
    X, _ = rays(n_per=30)
    res = map_and_space(X, random_state=1)
    assert calls["knn"] == 1
    assert len(calls["umap"]) == 2
    idx, dist = res.knn
    for pre, k in zip(calls["umap"], (30, 15)):  # the space, then the map
        assert pre is not None
        assert np.array_equal(pre[0], idx[:, :k]) and np.array_equal(pre[1], dist[:, :k])


def test_seeded_runs_are_reproducible_and_say_so():
    X, _ = rays(n_per=30, seed=4)
    a = map_and_space(X, random_state=7)
    b = map_and_space(X, random_state=7)
    assert np.array_equal(a.xy, b.xy) and np.array_equal(a.space, b.space)
    assert a.info["random_state"] == 7 and a.info["reproducible"] and not a.info["parallel"]


def test_parallel_is_the_default():
    import inspect

    assert inspect.signature(map_and_space).parameters["random_state"].default is None
    X, y = rays(n_per=30, seed=5)
    res = map_and_space(X, map_method="pca")
    assert res.info["parallel"] and res.info["random_state"] is None
    assert not res.info["reproducible"]
    assert nn_purity(res.space, y) >= 0.9


@pytest.mark.parametrize("method", ["tsne", "pca"])
def test_tsne_and_pca_maps_keep_groups_apart(method):
    X, y = rays(n_per=40, seed=6)
    res = map_and_space(X, map_method=method, random_state=0)
    assert res.info["map_method"] == method
    assert res.xy.shape == (len(X), 2) and np.isfinite(res.xy).all()
    assert nn_purity(res.xy, y) >= (0.9 if method == "tsne" else 0.8)
    assert trustworthiness(X / np.linalg.norm(X, axis=1, keepdims=True), res.xy,
                           n_neighbors=5) >= 0.8


def test_high_dimensional_input_is_reduced_with_pca_first():
    X, y = make_blobs(n_samples=150, centers=3, n_features=200, random_state=2)
    res = map_and_space(X.astype(np.float32), map_method="pca", random_state=0, pca_dims=16)
    assert res.info["pca_dims"] == 16
    assert nn_purity(res.space, y) >= 0.95
    # "auto" keeps every dimension for small collections (exact neighbours are cheap)
    res = map_and_space(X.astype(np.float32), map_method="pca", random_state=0)
    assert res.info["pca_dims"] is None and res.info["knn_method"] == "exact"


def test_the_sampled_fit_places_the_rest_with_the_approximate_graph_too():
    # above 20,000 rows (100,000 for the sample) the graph and the placing queries come from
    # faiss's HNSW index (explorer.stages.knn), not the exact search of smaller inputs
    X, y = rays(n_per=100, seed=8)
    res = map_and_space(X, random_state=0, fit_points=120, knn_method="hnsw")
    assert res.info["knn_method"] == "hnsw" and res.info["fit_points"] == 120
    assert np.isfinite(res.xy).all() and np.isfinite(res.space).all()
    assert nn_purity(res.xy, y) >= 0.95 and nn_purity(res.space, y) >= 0.95
    idx, _ = res.knn
    assert (idx[:, 0] == np.arange(len(X))).all() and (y[idx[:, 1]] == y).mean() >= 0.95


def test_large_collections_fit_a_sample_and_place_the_rest_among_it():
    # fit_points stands in for FIT_POINTS (100,000): the same path at test size
    X, y = rays(n_per=100, seed=8)
    res = map_and_space(X, random_state=0, fit_points=120)
    assert res.info["fit_points"] == 120 and res.info["timings"]["place"] >= 0
    assert any("sample of 120" in s for s in res.notes)
    assert res.xy.shape == (len(X), 2) and res.space.shape == (len(X), 5)
    assert np.isfinite(res.xy).all() and np.isfinite(res.space).all()
    # placed rows land in their own group on the map and in the clustering space
    assert nn_purity(res.xy, y) >= 0.95 and nn_purity(res.space, y) >= 0.95
    idx, dist = res.knn
    assert idx.shape == (len(X), 30) and (idx[:, 0] == np.arange(len(X))).all()
    assert (dist[:, 0] == 0).all() and (np.diff(dist, axis=1) >= -1e-5).all()
    assert (y[idx[:, 1]] == y).mean() >= 0.95
    # fit_points=None: every row fitted, nothing placed
    full = map_and_space(X, random_state=0, fit_points=None)
    assert full.info["fit_points"] == len(X) and "place" not in full.info["timings"]


@pytest.mark.parametrize("n", [0, 1, 5, MIN_UMAP_POINTS - 1])
def test_map_and_space_tiny_inputs_never_crash(n):
    X = np.random.default_rng(0).normal(size=(n, 8))
    res = map_and_space(X)
    assert res.xy.shape == (n, 2) and res.space.shape == (n, 5)
    assert np.isfinite(res.xy).all() and np.isfinite(res.space).all()
    assert res.notes
    assert len(res.knn[0]) == n


@pytest.mark.parametrize(
    "kwargs,word",
    [
        ({"map_method": "mds"}, "mds"),
        ({"n_neighbors": 1}, "n_neighbors"),
        ({"space_dim": 0}, "space_dim"),
        ({"space_neighbors": 1}, "space_neighbors"),
        ({"random_state": -2}, "random_state"),
        ({"device": "gpu0"}, "gpu0"),
        ({"metric": "hamming"}, "hamming"),
        ({"init": "tsne"}, "tsne"),
        ({"knn_method": "annoy"}, "annoy"),
        ({"pca_dims": 0}, "pca_dims"),
        ({"pca_dims": "many"}, "pca_dims"),
        ({"min_dist": 2.0}, "min_dist"),
        ({"fit_points": 3}, "fit_points"),
        ({"fit_points": "half"}, "fit_points"),
    ],
)
def test_map_and_space_bad_parameters_raise_value_error(kwargs, word):
    with pytest.raises(ValueError, match=word):
        map_and_space(np.random.default_rng(0).normal(size=(30, 4)), **kwargs)


def test_map_methods_are_listed():
    assert MAP_METHODS == ("umap", "tsne", "pca")


# --------------------------------------------------------------------------- place_new
def test_place_new_puts_a_near_copy_next_to_its_original(rays_result):
    X, y, res = rays_result
    rng = np.random.default_rng(8)
    picks = [0, 70, 150]
    jitter = 1e-5 * np.linalg.norm(X[picks], axis=1, keepdims=True)  # far below the groups' spread
    new = (X[picks] * 1.3 + jitter * rng.normal(size=(3, X.shape[1]))).astype(np.float32)
    for Y in (res.xy, res.space):
        P = place_new(X, Y, new)
        assert P.shape == (3, Y.shape[1]) and P.dtype == np.float32
        spread = np.median(np.linalg.norm(Y[:, None] - Y[None], axis=2))
        assert (np.linalg.norm(P - Y[picks], axis=1) < 0.02 * spread).all()


def test_place_new_puts_a_new_point_among_its_group(rays_result):
    X, y, res = rays_result
    new, ynew = rays(n_per=2, seed=0)[0][::1], np.repeat(np.arange(3), 2)
    new = new * 0.7  # same directions as the map's groups, other lengths
    P = place_new(X, res.xy, new)
    d = np.linalg.norm(P[:, None] - res.xy[None], axis=2)
    assert (y[d.argmin(axis=1)] == ynew).all()


def test_place_new_lands_in_its_small_group_when_most_neighbours_are_elsewhere():
    """8 old images of its kind, 30 of another: 7 of its 15 neighbours are the other kind.
    The new image must land among its 8, not between the groups (plain 1/d weights put it
    a quarter of the way over)."""
    rng = np.random.default_rng(0)
    a, b = np.eye(16)[0], np.eye(16)[0] + 0.9 * np.eye(16)[1]
    X = np.vstack([a + 0.05 * rng.normal(size=(8, 16)), b + 0.05 * rng.normal(size=(30, 16))])
    Y = np.vstack([rng.normal(size=(8, 2)) * 0.3, [10.0, 0.0] + rng.normal(size=(30, 2)) * 0.3])
    new = (a + 0.05 * rng.normal(size=(3, 16))).astype(np.float32)
    P = place_new(X.astype(np.float32), Y.astype(np.float32), new, k=15)
    assert (np.linalg.norm(P - Y[:8].mean(0), axis=1) < 1.0).all(), P


@pytest.mark.parametrize(
    "args,word",
    [
        ((np.zeros((5, 3)), np.zeros((4, 2)), np.zeros((1, 3))), "rows"),
        ((np.ones((5, 3)), np.zeros((5, 2)), np.ones((1, 4))), "columns"),
        ((np.ones((5, 3)), np.zeros((5, 2)), np.full((1, 3), np.nan)), "NaN"),
    ],
)
def test_place_new_bad_input_raises(args, word):
    with pytest.raises(ValueError, match=word):
        place_new(*args)


def test_a_small_map_and_the_common_metrics_never_import_umap():
    """Under MIN_UMAP_POINTS the map and the space are PCA, and the metric check knows the
    common names itself: a small build, and the classic methods' layout, never pay umap-learn's
    import (2-3 CPU s in every build and service worker process). Fails with the metric looked
    up in ``umap.distances`` again (tried once). A rarer name is still looked up there."""
    import subprocess
    import sys

    code = ("import sys, numpy as np\n"
            "from explorer.stages import reduce\n"
            "X = np.random.default_rng(0).normal(size=(12, 8)).astype('float32')\n"
            "for metric in ('cosine', 'euclidean'):\n"
            "    r = reduce.map_and_space(X, metric=metric, random_state=0)\n"
            "    assert r.xy.shape == (12, 2), r.xy.shape\n"
            "print('umap' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"
    from umap.distances import named_distances

    from explorer.stages import reduce

    assert reduce._COMMON_METRICS <= set(named_distances)  # the shortcut accepts no other name
    assert reduce_map(np.random.default_rng(0).normal(size=(12, 4)), metric="braycurtis",
                      random_state=0).embedding.shape == (12, 2)
    assert reduce_map(np.random.default_rng(0).normal(size=(12, 4)), metric="yule",
                      random_state=0).embedding.shape == (12, 2)
