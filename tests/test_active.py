"""The pick, the fit and the calibration of explorer.curation.active on small synthetic vectors."""

from __future__ import annotations

import numpy as np
import pytest

from explorer.curation import active


def blobs(sizes, dim=16, spread=0.6, seed=0):
    """Gaussian blobs around random unit-ish centres; (X float32, true class per row)."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(len(sizes), dim)) * 2
    y = np.repeat(np.arange(len(sizes)), sizes)
    X = centres[y] + rng.normal(scale=spread, size=(len(y), dim))
    return X.astype(np.float32), y.astype(np.int32)


def label_some(y, per_class, seed=0):
    rng = np.random.default_rng(seed)
    codes = np.full(len(y), -1, np.int32)
    for c in np.unique(y):
        rows = rng.choice(np.flatnonzero(y == c), per_class, replace=False)
        codes[rows] = c
    return codes


# ------------------------------------------------------------------ pick
def test_first_picks_cover_every_part_of_the_map():
    X, y = blobs([200, 120, 60, 30, 15], spread=0.3)
    rows, why = active.pick_next(X, np.full(len(y), -1, np.int32), 5)
    assert sorted(y[rows].tolist()) == [0, 1, 2, 3, 4]  # one per blob, small ones too
    assert all("no label covers" in w for w in why)
    # with two blobs labelled, the next picks (still mostly coverage) go to the others
    codes = np.full(len(y), -1, np.int32)
    codes[rows[y[rows] < 2]] = y[rows[y[rows] < 2]]
    codes[np.flatnonzero(y == 0)[:3]] = 0
    more, why = active.pick_next(X, codes, 3, probs=None)
    assert (codes[more] == -1).all() and len(set(more.tolist())) == 3
    assert (y[more] >= 2).sum() >= 2 and "no label covers" in why[0]


def test_later_picks_are_unsure_and_spread_out():
    rng = np.random.default_rng(1)
    # two overlapping classes along x, and a third far away: the unsure rows lie near x = 0
    n = 600
    x = rng.normal(size=(n, 8)).astype(np.float32)
    y = (x[:, 0] > 0).astype(np.int32)
    far = rng.normal(size=(100, 8)).astype(np.float32) + np.r_[0, 30, np.zeros(6)].astype(np.float32)
    X = active.features(np.concatenate([x, far]), dims=None)  # unit rows, as from a build
    y = np.concatenate([y, np.full(100, 2, np.int32)])
    codes = label_some(y, 25)  # past COVERAGE_LABELS: every pick is an unsure one
    rows, why = active.pick_next(X, codes, 10, classes=["left", "right", "far"])
    assert len(rows) == 10 and len(set(rows.tolist())) == 10
    assert (codes[rows] == -1).all()
    assert np.abs(X[rows, 0]).mean() < np.abs(X[codes == -1, 0]).mean() / 2  # near the boundary
    assert (y[rows] != 2).all()
    assert np.ptp(X[rows, 1:], axis=0).max() > 0.5  # not ten near-copies
    assert "unsure between" in why[0] and ("'left'" in why[0] or "'right'" in why[0])


def test_next_picks_what_a_propagation_over_the_graph_leads_to(monkeypatch):
    """The CLI's and the app's "next" (next_rows) pick from the graph-smoothed model, as
    bench/labelling.py measures the loop; the graph is made only once the picks need it.
    (Broken once: next_rows fitted the probe without the graph, and on the clothing photos
    only 0-8 of each 10 picks were the bench's.)"""
    X, y = blobs([150, 150, 100], spread=2.0)
    X = active.features(X, dims=None)
    codes = label_some(y, 12)
    g = active.neighbours(X)
    bench, _ = active.pick_next(X, codes, 10, probs=active.propagate(X, codes, 3, graph=g).probs,
                                space=active.smooth_rows(X, g))
    plain, _ = active.pick_next(X, codes, 10)
    assert len(set(bench.tolist()) & set(plain.tolist())) < 8  # the smoothing matters here
    names = np.array(["a", "b", "c", ""])
    paths = [f"img{i}.jpg" for i in range(len(y))]
    made, smoothed = [], []
    monkeypatch.setattr(active, "smooth_rows",
                        lambda *a, _f=active.smooth_rows: smoothed.append(1) or _f(*a))
    picks = active.next_rows(paths, names[codes], X, 10, graph=lambda: made.append(1) or g)
    assert [p["row"] for p in picks] == bench.tolist() and made == [1]
    assert smoothed == [1]  # the rows smoothed once, for the k-means and the propagation
    monkeypatch.undo()
    # no labels: coverage picks, made on the rows smoothed over the graph as the bench does
    none = np.full(len(y), "", dtype=object)
    cover = active.next_rows(paths, none, X, 10, graph=lambda: made.append(1) or g)
    assert made == [1, 1]
    space = active.smooth_rows(X, g)
    assert [p["row"] for p in cover] == active.pick_next(X, np.full(len(y), -1), 10,
                                                         space=space)[0].tolist()
    assert [p["row"] for p in cover] != active.pick_next(X, np.full(len(y), -1), 10)[0].tolist()


def test_pick_validates_its_input():
    X, y = blobs([10, 10])
    with pytest.raises(ValueError, match="n must be"):
        active.pick_next(X, y, 0)
    with pytest.raises(ValueError, match="one entry per row"):
        active.pick_next(X, y[:5], 3)
    with pytest.raises(ValueError, match="integers"):
        active.pick_next(X, y.astype(float), 3)
    with pytest.raises(ValueError, match="space must have one row per row of X"):
        active.pick_next(X, np.full(len(y), -1), 3, space=X[:5])
    assert len(active.pick_next(X, y, 5)[0]) == 0  # everything labelled: nothing to pick
    g = active.neighbours(X)
    with pytest.raises(ValueError, match="smoothed must be smooth_rows"):
        active.propagate(X, np.r_[0, 1, np.full(len(y) - 2, -1)], graph=g, smoothed=X[:, :3])


# ------------------------------------------------------------------ fit and calibration
def test_propagate_predicts_and_calibrates_on_separable_classes():
    X, y = blobs([150, 100, 80], spread=0.5)
    codes = label_some(y, 3)
    prop = active.propagate(X, codes)
    un = codes < 0
    acc = (prop.predicted[un] == y[un]).mean()
    assert acc > 0.97
    assert abs(prop.estimated_accuracy - acc) < 0.05
    assert prop.sure[un].mean() > 0.8 and (prop.predicted[prop.sure] == y[prop.sure]).mean() > 0.97
    assert (prop.predicted[~un] == codes[~un]).all() and not prop.sure[~un].any()


def test_estimate_follows_the_true_accuracy_when_classes_overlap():
    rng = np.random.default_rng(3)
    X = rng.normal(size=(2000, 10)).astype(np.float32)
    y = (X[:, 0] + 0.8 * rng.normal(size=2000) > 0).astype(np.int32)  # ~0.8 reachable
    codes = label_some(y, 60, seed=2)
    prop = active.propagate(X, codes, 2)
    un = codes < 0
    acc = (prop.predicted[un] == y[un]).mean()
    assert 0.7 < acc < 0.9
    assert abs(prop.estimated_accuracy - acc) < 0.06
    # the sure predictions are the most confident and more often right than the rest
    if prop.sure.any():
        assert (prop.predicted[prop.sure] == y[prop.sure]).mean() > acc
        assert prop.confidence[prop.sure].min() >= prop.threshold


def test_sure_threshold_is_the_largest_set_that_is_precise_enough():
    conf = np.array([0.99, 0.98, 0.97, 0.96, 0.5, 0.4])
    assert active.sure_threshold(conf, 0.97) == 0.96  # mean(.99, .98, .97, .96) = .975
    assert active.sure_threshold(conf, 0.999) == float("inf")
    with pytest.raises(ValueError, match="precision"):
        active.sure_threshold(conf, 1.5)


def test_few_labels_one_example_and_discard_behave():
    X, y = blobs([100, 100, 40], spread=0.4)
    # nothing or one class: no model, no prediction, nothing sure
    for codes in (np.full(len(y), -1, np.int32), np.where(np.arange(len(y)) < 3, 0, -1)):
        prop = active.propagate(X, codes.astype(np.int32), 3)
        assert prop.estimated_accuracy is None and not prop.sure.any()
        assert (prop.predicted[codes < 0] == -1).all()
    # a label with one example is learnt; "discard" is a class like the others
    labels = [""] * len(y)
    for i in np.flatnonzero(y == 0)[:3]:
        labels[i] = "cat"
    for i in np.flatnonzero(y == 1)[:3]:
        labels[i] = "discard"
    labels[int(np.flatnonzero(y == 2)[0])] = "dog"
    df, info = active.label_table([f"p{i}" for i in range(len(y))], labels, [""] * len(y), X)
    names = np.array(["cat", "discard", "dog"])
    un = df["label"] == ""
    assert (df["predicted_label"][un] == names[y[un.to_numpy()]]).mean() > 0.95
    assert info["classes"] == ["cat", "discard", "dog"] and info["labels"] == 7
    assert set(df["label_source"][un]) == {"predicted"}
    # renaming a label renames its predictions, nothing else changes
    renamed = ["kitten" if v == "cat" else v for v in labels]
    df2, _ = active.label_table(list(df["path"]), renamed, [""] * len(y), X)
    assert (df2["predicted_label"].replace("kitten", "cat") == df["predicted_label"]).all()
    assert np.allclose(df2["confidence"], df["confidence"])


def test_features_reduce_float16_vectors():
    X, _ = blobs([300, 300], dim=200)
    Z = active.features(X.astype(np.float16), dims=32)
    assert Z.shape == (600, 32) and Z.dtype == np.float32 and np.isfinite(Z).all()


def test_second_opinion_moves_the_predictions_and_the_sure_set_not_the_picks(monkeypatch):
    # overlapping classes: the self-trained second opinion re-ranks how sure each prediction
    # is and shares in the prediction and the estimate; the probabilities the picks use stay
    # the probe's
    X, y = blobs([300, 300, 200, 200], spread=3.5, seed=2)
    X = active.features(X, dims=None)
    codes = label_some(y, 8, seed=2)
    g = active.neighbours(X)
    un = codes < 0
    one = active.propagate(X, codes, graph=g, second_opinion=False)
    two = active.propagate(X, codes, graph=g)
    assert np.allclose(two.probs, one.probs)
    # the estimate is of the mixed predictions, and here closer to their accuracy (0.78 for a
    # true 0.75) than the probe's estimate to its own (0.79 for 0.73)
    err1, err2 = (abs(p.estimated_accuracy - (p.predicted == y)[un].mean()) for p in (one, two))
    assert err2 < err1 - 0.02
    assert (two.predicted[~un] == codes[~un]).all()
    # the mean of the two models' probabilities predicts better than the probe (0.732 -> 0.752)
    assert (two.predicted != one.predicted).sum() >= 10
    assert (two.predicted == y)[un].mean() > (one.predicted == y)[un].mean() + 0.005
    with monkeypatch.context() as m:  # none of the second opinion in the prediction: the probe's
        m.setattr(active, "PREDICT_SHARE", 0.0)
        assert (active.propagate(X, codes, graph=g).predicted == one.predicted).all()
    assert np.abs(two.confidence[un] - one.confidence[un]).max() > 0.05
    assert (two.confidence[~un] == 1).all() and not two.sure[~un].any()
    assert (two.sure == (un & (two.confidence >= two.threshold))).all()
    # here the probe alone calls too much sure (281 rows, 0.918 right); with the second opinion
    # the sure predictions are right more often (213, 0.944)
    right = two.predicted == y
    assert right[two.sure].mean() > right[one.sure].mean() + 0.02
    # without a neighbour graph (a million rows) there is no second opinion: the probe's own
    plain = active.propagate(X, codes)
    assert np.allclose(plain.confidence, active.propagate(X, codes, second_opinion=False).confidence)


def test_self_training_learns_from_the_unlabelled_rows():
    X, y = blobs([300, 300, 200, 200], spread=3.5, seed=2)
    X = active.features(X, dims=None)
    codes = label_some(y, 8, seed=2)
    g = active.neighbours(X)
    plain = active.fit(X, codes, 4)
    self_trained = active.fit(X, codes, 4, self_train=True, graph=g)
    assert np.abs(self_trained.W - plain.W).max() > 0.1  # refitted with pseudo-labels
    acc = [(active.predict_logits(X, m, 4).argmax(1) == y).mean() for m in (plain, self_trained)]
    assert acc[1] >= acc[0] - 0.02  # pseudo-labels from the smoothed predictions do no harm here


def test_smoothing_a_few_rows_equals_smoothing_all_of_them():
    # the out-of-fold predictions smooth only the held-out rows (their neighbours' probabilities,
    # not every row's): the same numbers as smoothing everything and taking those rows
    X, y = blobs([400, 300, 300], spread=2.0, seed=4)
    X = active.features(X, dims=None)
    codes = label_some(y, 5, seed=4)
    graph = active.neighbours(X)
    model = active.fit(X, codes, 3)
    rows = np.array([5, 17, 17, 640, 999, 3])
    few = active._log_probs(X, model, 3, rows, graph)
    every = active._log_probs(X, model, 3, np.arange(len(X)), graph)[rows]
    assert np.allclose(few, every, atol=1e-5)
    assert np.abs(every - active._log_probs(X, model, 3, rows, None)).max() > 0.01  # smoothed


def test_a_graph_with_rows_that_do_not_exist_is_refused():
    X = np.random.default_rng(0).normal(size=(30, 4)).astype(np.float32)
    codes = np.full(30, -1)
    codes[:4] = [0, 0, 1, 1]
    good = active.neighbours(X)
    assert (active.check_graph(good, 30) == good).all()
    for bad, word in ((np.where(good == 5, 30, good), "0..29"), (good.astype(float), "0..29"),
                      (good[:, :1], "shape"), (good[:20], "shape")):
        with pytest.raises(ValueError, match=word):
            active.propagate(X, codes, 2, graph=bad)
    with pytest.raises(ValueError, match="'auto', None"):
        active.label_table([str(i) for i in range(30)], [""] * 30, [""] * 30, X, graph="nearest")


def test_few_labels_lean_more_on_the_neighbours():
    # up to SMOOTH_FEW_LABELS labels the neighbours' share of the probe's probabilities is
    # SMOOTH_FEW, with more labels SMOOTH
    assert active.smoothing(active.SMOOTH_FEW_LABELS) == active.SMOOTH_FEW > active.SMOOTH
    assert active.smoothing(active.SMOOTH_FEW_LABELS + 1) == active.SMOOTH
    with pytest.raises(ValueError, match="n_labels"):
        active.smoothing(-1)


def test_few_labels_learn_from_the_rows_smoothed_over_the_graph(monkeypatch):
    # up to ROWS_ALONE labels the model is fitted on the rows smoothed over the neighbour graph
    # (smooth_rows), which predicts better with few labels (here 32: 0.716 -> 0.732 right);
    # after that it is a ROWS_SHARE part of a mix with the probe on the rows as they are
    X, y = blobs([300, 300, 200, 200], spread=3.5, seed=2)
    X = active.features(X, dims=None)
    g = active.neighbours(X)
    few = label_some(y, 8, seed=2)
    un = few < 0
    rows = active.propagate(X, few, graph=g, second_opinion=False)
    with monkeypatch.context() as m:  # the probe on the rows as they are, alone
        m.setattr(active, "ROWS_ALONE", -1)
        m.setattr(active, "ROWS_SHARE", 0.0)
        plain = active.propagate(X, few, graph=g, second_opinion=False)
    right = {k: (p.predicted == y)[un].mean() for k, p in (("rows", rows), ("plain", plain))}
    assert right["rows"] > right["plain"] + 0.01
    S = active.smooth_rows(X, g)
    assert np.allclose(np.linalg.norm(S, axis=1), np.linalg.norm(X, axis=1), atol=1e-5)
    assert np.abs(S - X).max() > 0.1  # moved towards the neighbours, lengths kept
    with pytest.raises(ValueError, match="shape"):
        active.smooth_rows(X, g[:10])
