"""explorer.stages.cluster: every method, auto-pick, elbow, per-point scores, edge cases."""

import json

import numpy as np
import pytest
from sklearn.datasets import make_blobs
from sklearn.metrics import normalized_mutual_info_score as nmi

from explorer.stages.cluster import METHODS, ClusterResult, cluster, cluster_scores, elbow_plot
from explorer.table import write_json

FAST = {"kmeans": {"k_max": 8}, "agglomerative": {"k_max": 8}, "gmm": {"k_max": 8},
        "auto": {"k_max": 8}, "hdbscan": {}, "dbscan": {}}


@pytest.fixture(scope="module")
def blobs():
    """4 well-separated blobs in 10-D."""
    X, y = make_blobs(n_samples=240, centers=4, n_features=10, cluster_std=1.0, random_state=0)
    return X, y


@pytest.fixture(scope="module")
def results(blobs):
    X, _ = blobs
    return {m: cluster(X, m, **FAST[m]) for m in METHODS}


# --------------------------------------------------------------------------- every method
@pytest.mark.parametrize("method", METHODS)
def test_each_method_recovers_blobs(results, blobs, method):
    _, y = blobs
    res = results[method]
    assert nmi(y, res.labels) >= 0.9
    assert res.noise_fraction <= 0.1


@pytest.mark.parametrize("method", METHODS)
def test_per_point_arrays_are_in_range(results, blobs, method):
    X, _ = blobs
    res = results[method]
    assert isinstance(res, ClusterResult)
    for arr in (res.labels, res.probabilities, res.outlier_scores):
        assert arr.shape == (len(X),)
    assert res.labels.dtype.kind == "i" and res.labels.min() >= -1
    assert ((res.probabilities >= 0) & (res.probabilities <= 1)).all()
    assert ((res.outlier_scores >= 0) & (res.outlier_scores <= 1)).all()
    assert (res.probabilities[res.labels == -1] == 0).all()
    s = res.scores
    assert s["n_clusters"] == res.n_clusters
    assert s["silhouette"] > 0.5 and s["calinski_harabasz"] > 0 and s["davies_bouldin"] > 0


@pytest.mark.parametrize("method", ["hdbscan", "kmeans", "agglomerative", "dbscan", "gmm"])
def test_a_far_away_point_is_the_strangest(blobs, method):
    X, _ = blobs
    Xo = np.vstack([X, X.max(axis=0) + 40.0])
    res = cluster(Xo, method, **FAST[method])
    assert res.outlier_scores[-1] == res.outlier_scores.max()
    assert res.outlier_scores[-1] > np.median(res.outlier_scores[:-1])


@pytest.mark.parametrize("method", METHODS)
def test_same_seed_same_labels(blobs, method):
    X, _ = blobs
    a = cluster(X[:120], method, random_state=5, **FAST[method])
    b = cluster(X[:120], method, random_state=5, **FAST[method])
    assert np.array_equal(a.labels, b.labels)
    assert np.array_equal(a.probabilities, b.probabilities)


# --------------------------------------------------------------------------- choosing k
def test_auto_picks_the_true_number_of_clusters_and_keeps_every_candidate(results):
    res = results["auto"]
    assert res.n_clusters == 4
    assert res.requested == "auto" and res.method in METHODS and res.method != "auto"
    assert len(res.candidates) > 10
    methods_tried = {c["method"] for c in res.candidates}
    assert methods_tried == {"hdbscan", "kmeans", "agglomerative", "dbscan", "gmm"}
    for c in res.candidates:
        assert set(c["scores"]) == {"silhouette", "calinski_harabasz", "davies_bouldin"}
    assert any("auto picked" in n for n in res.notes)


def test_auto_can_be_limited_to_some_methods(blobs):
    X, _ = blobs
    res = cluster(X, "auto", methods=["kmeans"], k_max=6)
    assert res.method == "kmeans" and res.n_clusters == 4
    assert {c["method"] for c in res.candidates} == {"kmeans"}


def test_kmeans_without_k_finds_the_elbow(results):
    res = results["kmeans"]
    assert res.elbow is not None
    assert res.elbow["chosen_k"] == 4 == res.n_clusters
    assert res.elbow["k"][0] == 1 and len(res.elbow["k"]) == len(res.elbow["inertia"])
    assert all(np.diff(res.elbow["inertia"]) <= 1e-6 * res.elbow["inertia"][0])


def test_given_k_is_used(blobs):
    X, _ = blobs
    for method in ("kmeans", "agglomerative", "gmm"):
        assert cluster(X, method, k=3).n_clusters == 3


def test_result_record_is_json_ready(results, tmp_path):
    path = write_json(tmp_path / "run.json", {m: r.to_dict() for m, r in results.items()})
    back = json.loads(path.read_text())
    assert back["auto"]["requested"] == "auto"
    assert back["kmeans"]["elbow"]["chosen_k"] == 4


# --------------------------------------------------------------------------- noise
@pytest.fixture(scope="module")
def noisy():
    X, y = make_blobs(n_samples=300, centers=3, n_features=5, cluster_std=0.6, random_state=1)
    rng = np.random.default_rng(1)
    noise = rng.uniform(X.min() - 5, X.max() + 5, size=(30, 5))
    return np.vstack([X, noise]), np.r_[y, np.full(30, -1)]


def test_hdbscan_keeps_noise_when_asked(noisy):
    X, truth = noisy
    res = cluster(X, "hdbscan", assign_noise=False)
    assert res.noise_fraction > 0.03
    assert (res.labels[truth == -1] == -1).mean() >= 0.5
    assert (res.probabilities[res.labels == -1] == 0).all()


def test_hdbscan_default_assigns_noise_but_marks_it_uncertain(noisy):
    X, truth = noisy
    kept = cluster(X, "hdbscan", assign_noise=False)
    res = cluster(X, "hdbscan")
    assert (res.labels >= 0).all()
    assert any("assigned" in n for n in res.notes)
    was_noise = kept.labels == -1
    # the same clusters as before for the points HDBSCAN was sure of
    assert np.array_equal(res.labels[~was_noise], kept.labels[~was_noise])
    # reassigned points look less certain and stranger than the rest
    assert res.probabilities[was_noise].mean() < res.probabilities[~was_noise].mean()
    assert res.outlier_scores[was_noise].mean() > res.outlier_scores[~was_noise].mean()


def test_scores_ignore_noise_and_need_two_clusters():
    Z = np.array([[0.0, 0], [0, 1], [10, 0], [10, 1], [50, 50]])
    s = cluster_scores(Z, np.array([0, 0, 1, 1, -1]))
    assert s["n_clusters"] == 2 and s["noise_fraction"] == pytest.approx(0.2)
    assert s["silhouette"] > 0.8
    one = cluster_scores(Z, np.zeros(5, dtype=int))
    assert one["silhouette"] is None and one["davies_bouldin"] is None


# --------------------------------------------------------------------------- small input
@pytest.mark.parametrize("n", [0, 1, 2, 5])
@pytest.mark.parametrize("method", METHODS)
def test_tiny_inputs_give_a_valid_result(n, method):
    Z = np.random.default_rng(0).normal(size=(n, 3))
    res = cluster(Z, method, **FAST[method])
    assert res.labels.shape == res.probabilities.shape == res.outlier_scores.shape == (n,)
    assert ((res.probabilities >= 0) & (res.probabilities <= 1)).all()
    if n < 3:
        assert res.notes and (res.labels == 0).all()


@pytest.mark.parametrize("method", METHODS)
def test_identical_points_are_one_cluster_with_a_note(method):
    res = cluster(np.ones((25, 4)), method)
    assert (res.labels == 0).all()
    assert any("identical" in n for n in res.notes)


def test_k_larger_than_distinct_points_is_clamped():
    Z = np.repeat(np.eye(3), 4, axis=0)  # 3 distinct points, 12 rows
    res = cluster(Z, "kmeans", k=8)
    assert res.n_clusters == 3
    assert any("clamped" in n for n in res.notes)


def test_repeated_leading_rows_do_not_limit_k():
    rng = np.random.default_rng(3)
    Z = np.vstack([np.zeros((1500, 3)), rng.normal(size=(300, 3)) + 5])
    assert cluster(Z, "kmeans", k=5).n_clusters == 5


# --------------------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    "method,kwargs,word",
    [
        ("no-such-method", {}, "no-such-method"),
        ("kmeans", {"k": 0}, "k"),
        ("kmeans", {"k": 2.5}, "k"),
        ("kmeans", {"k_max": 1}, "k_max"),
        ("kmeans", {"bogus": 1}, "bogus"),
        ("hdbscan", {"min_cluster_size": 1}, "min_cluster_size"),
        ("hdbscan", {"min_cluster_size": 1.5}, "min_cluster_size"),
        ("hdbscan", {"cluster_selection_method": "best"}, "cluster_selection_method"),
        ("hdbscan", {"assign_noise": "yes"}, "assign_noise"),
        ("dbscan", {"eps": 0}, "eps"),
        ("dbscan", {"min_samples": 0}, "min_samples"),
        ("agglomerative", {"linkage": "centroid"}, "linkage"),
        ("gmm", {"covariance_type": "round"}, "covariance_type"),
        ("auto", {"methods": ["kmeans", "spectral"]}, "spectral"),
        ("auto", {"max_noise": 2}, "max_noise"),
        ("kmeans", {"random_state": -3}, "random_state"),
    ],
)
def test_bad_parameters_raise_value_error_naming_them(method, kwargs, word):
    with pytest.raises(ValueError, match=word):
        cluster(np.zeros((10, 2)), method, **kwargs)


@pytest.mark.parametrize(
    "Z,word",
    [(np.zeros(5), "2-D"), (np.array([[0.0, np.nan], [1.0, 1.0]]), "NaN")],
)
def test_bad_arrays_raise_value_error(Z, word):
    with pytest.raises(ValueError, match=word):
        cluster(Z)


# --------------------------------------------------------------------------- elbow plot
def test_elbow_plot_writes_standalone_html_with_the_chosen_k(results, tmp_path):
    res = results["kmeans"]
    out = elbow_plot(res.elbow, res.elbow["chosen_k"], tmp_path / "elbow.html")
    html = out.read_text()
    assert html.lstrip().lower().startswith("<!doctype html>")
    assert "chosen k = 4" in html
    assert "cdn.bokeh.org" not in html  # inline: works offline
    pairs = list(zip(res.elbow["k"], res.elbow["inertia"]))
    small = elbow_plot(pairs, 4, tmp_path / "e2.html", resources="cdn")
    assert small.stat().st_size < out.stat().st_size


def test_elbow_plot_rejects_a_ragged_curve(tmp_path):
    with pytest.raises(ValueError, match="inertia"):
        elbow_plot({"k": [1, 2, 3], "inertia": [3.0, 2.0]}, 2, tmp_path / "x.html")


# --------------------------------------------------------------------------- new rows, noise
from explorer.stages.cluster import _assign_noise_knn, _relabel_by_size, assign_new, vote  # noqa: E402


def test_assign_new_gives_the_cluster_of_the_nearest_neighbours(blobs):
    X, y = blobs
    res = cluster(X, "hdbscan")
    rng = np.random.default_rng(3)
    new = X[:20] + 0.05 * rng.normal(size=(20, X.shape[1]))
    labels, probs = assign_new(X, res.labels, new)
    assert labels.shape == (20,) and probs.shape == (20,)
    assert np.array_equal(labels, res.labels[:20])
    assert ((probs > 0.5) & (probs <= 1)).all()


def test_assign_new_ignores_old_noise_and_handles_none_clustered():
    Z = np.array([[0.0, 0], [0.1, 0], [0.2, 0], [5, 5], [5.1, 5]])
    labels, probs = assign_new(Z, [0, 0, 0, -1, -1], [[5.05, 5.0]], k=2)
    assert labels.tolist() == [0]  # the noise neighbours do not vote
    labels, probs = assign_new(Z, [-1] * 5, [[0.0, 0.0]])
    assert labels.tolist() == [-1] and probs.tolist() == [0.0]


@pytest.mark.parametrize(
    "args,word",
    [
        ((np.zeros((3, 2)), [0, 1], np.zeros((1, 2))), "labels_old"),
        ((np.zeros((3, 2)), [0, 1, 1], np.zeros((1, 3))), "columns"),
        ((np.zeros((3, 2)), [0.5, 1, 1], np.zeros((1, 2))), "labels_old"),
    ],
)
def test_assign_new_bad_input_raises(args, word):
    with pytest.raises(ValueError, match=word):
        assign_new(*args)
    with pytest.raises(ValueError, match="k"):
        assign_new(np.zeros((3, 2)), [0, 1, 1], np.zeros((1, 2)), k=0)


def _old_assign_noise_loop(Z, labels, probs, k=10):
    """The per-noise-point loop this module used before (kept here as the reference)."""
    from sklearn.neighbors import NearestNeighbors

    noise = labels < 0
    clustered = ~noise
    k = min(k, int(clustered.sum()))
    _, idx = NearestNeighbors(n_neighbors=k).fit(Z[clustered]).kneighbors(Z[noise])
    lab_c, prob_c = labels[clustered][idx], probs[clustered][idx]
    labels, probs = labels.copy(), probs.copy()
    new_l, new_p = np.empty(len(idx), dtype=labels.dtype), np.empty(len(idx))
    for i, (row, prow) in enumerate(zip(lab_c, prob_c)):
        vals, counts = np.unique(row, return_counts=True)
        w = vals[np.argmax(counts)]
        new_l[i] = w
        new_p[i] = counts.max() / k * float(prow[row == w].mean())
    labels[noise], probs[noise] = new_l, new_p
    return labels, probs


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_vectorised_noise_assignment_equals_the_old_loop(seed):
    rng = np.random.default_rng(seed)
    Z = rng.normal(size=(400, 3))
    labels = rng.integers(-1, 6, size=400)  # many ties among 7 values and k=10
    probs = np.where(labels >= 0, rng.uniform(0.1, 1, size=400), 0.0)
    new_l, new_p = _assign_noise_knn(Z, labels, probs)
    old_l, old_p = _old_assign_noise_loop(Z, labels, probs)
    assert np.array_equal(new_l, old_l)
    assert np.allclose(new_p, old_p, rtol=1e-12, atol=1e-12)


def test_vote_in_chunks_equals_one_chunk():
    lab = np.random.default_rng(4).integers(0, 9, size=(1000, 7))
    a = vote(lab, chunk=1000)
    b = vote(lab, chunk=64)
    for x, z in zip(a, b):
        assert np.array_equal(x, z)


def test_relabel_by_size_orders_by_size_then_first_appearance():
    raw = np.array([5, 5, 2, 9, 9, -1, 2, 9, 7])
    # 9 has 3; 5 and 2 have 2 each (5 seen first); 7 has 1
    assert _relabel_by_size(raw).tolist() == [1, 1, 2, 0, 0, -1, 2, 0, 3]


def test_fast_hdbscan_backend_agrees_with_hdbscan(blobs):
    from sklearn.metrics import adjusted_rand_score

    X, y = blobs
    Xo = np.vstack([X, X.max(axis=0) + 40.0])
    ref = cluster(Xo, "hdbscan", backend="hdbscan", assign_noise=False)
    fast = cluster(Xo, "hdbscan", backend="fast_hdbscan", assign_noise=False)
    assert fast.params["backend"] == "fast_hdbscan" and ref.params["backend"] == "hdbscan"
    assert adjusted_rand_score(ref.labels, fast.labels) >= 0.95
    assert nmi(y, fast.labels[:-1]) >= 0.9
    # GLOSH from fast_hdbscan's tree: the far point is the strangest, as with hdbscan
    assert fast.outlier_scores[-1] == fast.outlier_scores.max()
    assert np.corrcoef(fast.outlier_scores, ref.outlier_scores)[0, 1] >= 0.95
    assert ((fast.probabilities >= 0) & (fast.probabilities <= 1)).all()


def test_default_min_samples_is_capped_for_large_inputs():
    from explorer.stages.cluster import MAX_AUTO_MIN_SAMPLES

    Z, _ = make_blobs(n_samples=6000, centers=3, n_features=2, random_state=1)
    res = cluster(Z, "hdbscan")
    assert res.params["min_cluster_size"] == 120
    assert res.params["min_samples"] == MAX_AUTO_MIN_SAMPLES
    assert res.params["backend"] == "hdbscan"  # below FAST_HDBSCAN_FROM
    with pytest.raises(ValueError, match="backend"):
        cluster(Z[:50], "hdbscan", backend="gpu")
