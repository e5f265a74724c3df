"""Label a few, the tool labels the rest: which images to label next, and a calibrated model.

Pure stages, arrays in and arrays out (nothing here touches disk)::

    X = features(vectors)                       # (N, D) stored vectors -> (N, 64) float32
    codes, classes = encode(labels)             # "" = unlabelled -> -1
    prop = propagate(X, codes, len(classes))    # predicted code + calibrated confidence per row
    rows, reasons = pick_next(X, codes, 20, probs=prop.probs)   # what to label next

The model
---------
A multinomial logistic regression (a "linear probe") on the stored vectors, L2-normalised and
projected on their first :data:`DIMS` principal components (the projection is fitted on a
sample, so a million rows need one pass). With a kNN graph (:func:`neighbours`, up to
:data:`GRAPH_MAX` rows) each row's probabilities are mixed with the mean of its neighbours'
(:data:`SMOOTH`; :data:`SMOOTH_FEW` while there are few labels, :func:`smoothing`), which
measured +0.01-0.02 accuracy on the clothing photos. Self-training
for the predictions themselves (``self_train=True``: refit with the most confident predictions
as down-weighted examples) measured no better in the loop when the picks followed it, so the
probe the picks use is not self-trained; the self-trained model is the second opinion (below),
half of each prediction and most of its confidence. The probabilities are calibrated by one temperature
fitted on out-of-fold predictions of the labels (k-fold cross-validation of the whole fit), the
out-of-fold rows weighted so their confidences spread like the unlabelled rows' (the tool
picks hard rows on purpose; unweighted, the calibration came out too pessimistic).
With a graph there is a second probe, on the rows smoothed over it (:func:`smooth_rows`): up to
:data:`ROWS_ALONE` labels it is the model alone, after that :data:`ROWS_SHARE` of a mix with
the probe on the rows as they are, and the mix's confidences are calibrated again by one
temperature on the mix's out-of-fold predictions (the mix of two calibrated models came out
under-confident). The picks' k-means then run on the smoothed rows too (``space``).
Figures and what else was tried: docs/labelling.md.

How sure, how good
------------------
* ``confidence`` is the calibrated probability of the predicted label (the probe's alone without
  a neighbour graph).
* With a neighbour graph, an unlabelled row's confidence also takes a second opinion: a
  self-trained model (the probe refitted with the most confident smoothed predictions as
  pseudo-labels, :func:`fit` ``self_train=True``), calibrated on its own out-of-fold
  predictions, gives its probability of the *same* predicted label; the confidence is
  :data:`SECOND_SHARE` of that plus the rest of the probe's. The second opinion ranks how sure
  a prediction is better (on the clothing photos a perfect threshold could call 60% of the
  images sure at 0.97 instead of 55%). The prediction itself is the likeliest label of the mean
  of the two models' probabilities (:data:`PREDICT_SHARE`; +0.005 accuracy at 50 labels in
  the loop); the picks stay the probe's.
* The "sure" threshold is the lowest confidence such that the rows at or above it have a
  mean confidence of at least :data:`SURE_PRECISION` (the calibrated probabilities stand in
  for the unknown truth): the largest set of predictions expected to be that correct.
* The estimated accuracy on the unlabelled rows is the mean calibrated probability of the
  predictions (the mixed probabilities' with a second opinion, else the probe's; the 0.8 / 0.2
  blend of the confidence decides only what is sure); the
  cross-validated accuracy of the person's own labels is given beside it (it runs low when
  the tool picked the hard images, which it does on purpose).

Labels
------
Codes come from :func:`encode`: any non-empty label is a class, ``"discard"`` included (the
model learns what the person throws away; exports skip it). A label with one example is a
class like the others (it is never held out in cross-validation: it cannot be learnt from
zero examples). Renamed or merged labels need nothing: every call fits from the labels as
they are now. With fewer than two labels there is no model: :func:`propagate` returns no
predictions and :func:`pick_next` picks for coverage of the map.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Sequence

import numpy as np

from explorer._checks import as_matrix, check_int, check_random_state

__all__ = [
    "DIMS",
    "SURE_PRECISION",
    "check_precision",
    "Propagation",
    "features",
    "encode",
    "fit",
    "predict_logits",
    "propagate",
    "pick_next",
    "neighbours",
    "sure_threshold",
    "smoothing",
    "smooth_rows",
    "label_table",
    "next_rows",
]

#: the smoothed-row model (:func:`smooth_rows`): its share of the probabilities after
#: :data:`ROWS_ALONE` labels (up to there it is the model alone), its rows' pull towards their
#: neighbours and hops, its prediction smoothing up to :data:`SMOOTH_FEW_LABELS` labels
ROWS_SHARE = 0.25
ROWS_ALONE = 50
ROWS_PULL = 0.5
ROWS_HOPS = 2
ROWS_SMOOTH_FEW = 0.7
#: principal components kept by :func:`features`
DIMS = 64
#: the mean calibrated confidence the "sure" predictions must reach (a person may ask for
#: another between SURE_MIN and SURE_MAX: :func:`check_precision`)
SURE_PRECISION = 0.97
SURE_MIN, SURE_MAX = 0.5, 0.999
#: inverse regularisation of the logistic regression (on unit-norm PCA rows)
C = 100.0
#: share of a row's probabilities taken from the mean of its neighbours' (kNN smoothing)
SMOOTH = 0.75
#: that share while a person has given at most SMOOTH_FEW_LABELS labels (few labels: the
#: neighbours know more than the probe)
SMOOTH_FEW = 0.9
SMOOTH_FEW_LABELS = 60
#: rounds of that smoothing (each reaches one neighbour further)
DIFFUSE = 1
#: neighbours per row in that smoothing
NEIGHBOURS = 10
#: rows above which propagate does not smooth (the graph would take minutes to compute)
GRAPH_MAX = 200_000
#: self-training: pseudo-labels come from unlabelled rows at or above this calibrated share
PSEUDO_TOP = 0.6
#: weight of one pseudo-labelled row against one person's label
PSEUDO_WEIGHT = 0.5
#: pseudo-labels used at most (sampled), so a million rows fit in seconds
PSEUDO_MAX = 5_000
#: labels after which "next" stops spending part of each batch on coverage of the map
COVERAGE_LABELS = 60
#: confidence bins of the calibration's correction for the picks (see _shift_weights)
CALIBRATION_BINS = 10
#: power of those weights (1: the full correction; less trades its bias for less variance)
SHIFT_POWER = 0.5
#: share of the second opinion (the self-trained model) in each unlabelled row's confidence
SECOND_SHARE = 0.8
#: share of the second opinion in the probabilities an unlabelled row's prediction is the
#: likeliest label of, and of the estimate (the picks keep the probe's)
PREDICT_SHARE = 0.5
#: power of the calibration weights of the second opinion (see SHIFT_POWER)
SECOND_SHIFT_POWER = 0.75
#: folds of the cross-validation that calibrates and estimates
FOLDS = 5
#: rows scored per block (bounded memory at a million rows)
BLOCK = 131_072


class Propagation(NamedTuple):
    """What :func:`propagate` returns; arrays have one entry per row of ``X``."""

    predicted: np.ndarray  # int32 code of the predicted label (-1: no model)
    confidence: np.ndarray  # float32 calibrated probability of it (NaN: no model)
    sure: np.ndarray  # bool: unlabelled row predicted with confidence >= threshold
    threshold: float  # the calibrated "sure" threshold (inf: nothing is sure)
    estimated_accuracy: float | None  # expected accuracy on the unlabelled rows
    cv_accuracy: float | None  # cross-validated accuracy of the labelled rows
    temperature: float
    probs: np.ndarray | None  # (N, K) float32 calibrated probabilities (None: no model)


# ---------------------------------------------------------------------- inputs
def features(vectors: Any, dims: int | None = DIMS) -> np.ndarray:
    """Stored vectors (N, D), any float dtype (float16 from a build) -> (N, min(D, dims))
    float32 rows: L2-normalised, then projected on ``dims`` principal components (fitted on
    a sample). ``dims=None`` keeps every dimension."""
    from explorer.stages.knn import prepare

    X, _ = prepare(vectors, metric="cosine", pca_dims=dims)
    return X


def encode(labels: Sequence[Any]) -> tuple[np.ndarray, list[str]]:
    """Labels per row (``""``/``None``/NaN = unlabelled) -> (int32 codes, -1 = unlabelled;
    the sorted class names)."""
    lab = np.asarray([_text(v) for v in labels], dtype=object)
    have = lab != ""
    classes = sorted(set(lab[have].tolist()))
    index = {c: i for i, c in enumerate(classes)}
    codes = np.full(len(lab), -1, np.int32)
    codes[have] = [index[v] for v in lab[have]]
    return codes, classes


def _text(v) -> str:
    if v is None or (isinstance(v, float) and np.isnan(v)):
        return ""
    return str(v).strip()


def _check(X: Any, codes: Any, n_classes: int | None = None) -> tuple[np.ndarray, np.ndarray, int]:
    X = as_matrix(X, "X", np.float32, nan_hint="; features() gives finite rows")
    codes = np.asarray(codes)
    if codes.ndim != 1 or len(codes) != len(X):
        raise ValueError(f"codes must have one entry per row of X ({len(X)}); got shape {codes.shape}")
    if codes.dtype.kind not in "iu":
        raise ValueError(f"codes must be integers (-1 = unlabelled); got dtype {codes.dtype}")
    top = int(codes.max()) + 1 if len(codes) else 0
    if n_classes is None:
        n_classes = top
    elif top > n_classes:
        raise ValueError(f"codes go up to {top - 1} but n_classes is {n_classes}")
    if len(codes) and codes.min() < -1:
        raise ValueError(f"codes must be >= -1 (-1 = unlabelled); got {int(codes.min())}")
    return X, codes.astype(np.int32, copy=False), int(n_classes)


# ---------------------------------------------------------------------- the model
class Model(NamedTuple):
    W: np.ndarray  # (D, K) float32
    b: np.ndarray  # (K,) float32
    classes: np.ndarray  # the codes this model predicts (columns of W), sorted


def _lr(X: np.ndarray, y: np.ndarray, w: np.ndarray | None, n_classes: int) -> Model:
    """Multinomial logistic regression, L2 penalty ``||W||^2 / (2 C)`` on the summed
    (weighted) log loss, by L-BFGS. Small problems (thousands of rows): one BLAS thread, which
    is many times faster than several on a busy machine."""
    from scipy.optimize import minimize
    from threadpoolctl import threadpool_limits

    present = np.unique(y)
    if len(present) == 1:  # one class: it always wins
        W = np.zeros((X.shape[1], 1), np.float32)
        return Model(W, np.zeros(1, np.float32), present.astype(np.int32))
    k = len(present)
    yi = np.searchsorted(present, y)
    X64 = np.asarray(X, np.float64)
    n, d = X64.shape
    Y = np.zeros((n, k))
    Y[np.arange(n), yi] = 1.0
    sw = np.ones(n) if w is None else np.asarray(w, np.float64)
    lam = 1.0 / C

    def f(theta):
        W = theta[:d * k].reshape(d, k)
        b = theta[d * k:]
        Z = X64 @ W + b
        Z -= Z.max(axis=1, keepdims=True)
        E = np.exp(Z)
        S = E.sum(axis=1, keepdims=True)
        loss = (sw * (np.log(S[:, 0]) - (Z * Y).sum(axis=1))).sum() + 0.5 * lam * (W * W).sum()
        G = (E / S - Y) * sw[:, None]
        gW = X64.T @ G + lam * W
        return loss, np.concatenate([gW.ravel(), G.sum(axis=0)])

    with threadpool_limits(1):
        res = minimize(f, np.zeros(d * k + k), jac=True, method="L-BFGS-B",
                       options={"maxiter": 300, "gtol": 1e-5})
    W = res.x[:d * k].reshape(d, k)
    b = res.x[d * k:]
    return Model(W.astype(np.float32), b.astype(np.float32), present.astype(np.int32))


def predict_logits(X: np.ndarray, model: Model, n_classes: int, rows: np.ndarray | None = None
                   ) -> np.ndarray:
    """(len(rows), n_classes) float32 logits; classes the model never saw get -inf."""
    idx = np.arange(len(X)) if rows is None else rows
    out = np.full((len(idx), n_classes), -np.inf, np.float32)
    for a in range(0, len(idx), BLOCK):
        blk = X[idx[a:a + BLOCK]]
        out[a:a + BLOCK, model.classes] = blk @ model.W + model.b
    return out


def _softmax(z: np.ndarray, T: float = 1.0) -> np.ndarray:
    z = z / np.float32(T)
    z = z - z.max(axis=1, keepdims=True)
    np.exp(z, out=z)
    z /= z.sum(axis=1, keepdims=True)
    return z


def fit(X: np.ndarray, codes: np.ndarray, n_classes: int, *, self_train: bool = False,
        seed: int = 0, graph: np.ndarray | None = None, smooth: float | None = None) -> Model:
    """The probe on the labelled rows (``codes >= 0``); with ``self_train``, refitted once with
    pseudo-labels: the :data:`PSEUDO_TOP` most confident of the unlabelled rows' predictions
    (smoothed over ``graph`` when given, by ``smooth``, default :data:`SMOOTH`, as
    :func:`propagate` predicts), each weighted
    :data:`PSEUDO_WEIGHT` (at most :data:`PSEUDO_MAX` of them, sampled)."""
    lab = np.flatnonzero(codes >= 0)
    if len(lab) == 0:
        raise ValueError("fit needs at least one labelled row")
    y = codes[lab]
    model = _lr(X[lab], y, None, n_classes)
    if not self_train or len(model.classes) < 2:
        return model
    un = np.flatnonzero(codes < 0)
    if len(un) == 0:
        return model
    rng = np.random.default_rng(seed)
    if len(un) > 2 * PSEUDO_MAX:  # candidates: a sample, so a million rows stay seconds
        un = np.sort(rng.choice(un, 2 * PSEUDO_MAX, replace=False))
    if graph is not None:
        p = np.exp(_log_probs(X, model, n_classes, un, graph, smooth))
    else:
        p = _softmax(predict_logits(X, model, n_classes, un))
    conf = p.max(axis=1)
    keep = conf >= np.quantile(conf, 1 - PSEUDO_TOP)
    pick = un[keep]
    py = p.argmax(axis=1)[keep].astype(np.int32)
    if len(pick) > PSEUDO_MAX:
        sel = rng.choice(len(pick), PSEUDO_MAX, replace=False)
        pick, py = pick[sel], py[sel]
    Xa = np.concatenate([X[lab], X[pick]])
    ya = np.concatenate([y, py])
    wa = np.concatenate([np.ones(len(lab)), np.full(len(pick), PSEUDO_WEIGHT)])
    return _lr(Xa, ya, wa, n_classes)


def neighbours(X: np.ndarray) -> np.ndarray | None:
    """The kNN graph :func:`propagate` smooths over (indices, column 0 = the row itself), or
    ``None`` above :data:`GRAPH_MAX` rows (the probe alone: seconds at a million rows)."""
    if len(X) > GRAPH_MAX or len(X) <= NEIGHBOURS + 1:
        return None
    from explorer.stages.knn import knn_graph

    return knn_graph(X, NEIGHBOURS + 1).indices


def check_graph(graph: Any, n: int) -> np.ndarray:
    """``graph`` as :func:`neighbours` makes it for ``n`` rows: (n, k >= 2) integer indices,
    each in 0..n-1; else ``ValueError`` (a cached graph from disk is checked with it)."""
    graph = np.asarray(graph)
    if graph.ndim != 2 or len(graph) != n or graph.shape[1] < 2:
        raise ValueError(f"graph must be (N, k >= 2) neighbour indices for the {n} "
                         f"rows; got shape {graph.shape}")
    if not np.issubdtype(graph.dtype, np.integer) or (
            graph.size and (graph.min() < 0 or graph.max() >= n)):
        raise ValueError(f"graph must hold row indices in 0..{n - 1}; got {graph.dtype} "
                         f"from {graph.min()} to {graph.max()}")
    return graph


# ---------------------------------------------------------------------- calibration
def _folds(codes_lab: np.ndarray, k: int, seed: int) -> np.ndarray:
    """Fold number per labelled row, stratified; -1 for rows of classes with one example
    (always trained on)."""
    rng = np.random.default_rng(seed)
    fold = np.full(len(codes_lab), -1, np.int32)
    start = 0
    for c in np.unique(codes_lab):
        rows = np.flatnonzero(codes_lab == c)
        if len(rows) < 2:
            continue
        rng.shuffle(rows)
        fold[rows] = (np.arange(len(rows)) + start) % k
        start += len(rows)
    return fold


def smoothing(n_labels: int) -> float:
    """The share of a row's probabilities taken from its neighbours' with ``n_labels``
    labels: :data:`SMOOTH_FEW` up to :data:`SMOOTH_FEW_LABELS`, then :data:`SMOOTH`."""
    n_labels = check_int("n_labels", n_labels, 0)
    return SMOOTH_FEW if n_labels <= SMOOTH_FEW_LABELS else SMOOTH


def _log_probs(X, model, n_classes, rows, graph, smooth=None) -> np.ndarray:
    """Uncalibrated log-probabilities of ``rows``: the model's, or with a kNN ``graph``
    (indices, column 0 = the row itself) smoothed: :data:`DIFFUSE` times, each row's
    probabilities mixed with the mean of its neighbours' (``smooth``, default :data:`SMOOTH`). For a few rows (the
    held-out fold, the pseudo-label candidates) one round needs only their neighbours' rows."""
    smooth = SMOOTH if smooth is None else smooth
    if graph is None:
        z = predict_logits(X, model, n_classes, rows)
        with np.errstate(divide="ignore"):
            return np.log(_softmax(z))
    if DIFFUSE == 1 and len(rows) * graph.shape[1] < len(X):  # a few rows: only their neighbours
        rows = np.asarray(rows)
        need, inv = np.unique(np.concatenate([rows, graph[rows, 1:].ravel()]), return_inverse=True)
        P0 = _softmax(predict_logits(X, model, n_classes, need))
        nb = inv[len(rows):].reshape(len(rows), -1)
        P = (1 - smooth) * P0[inv[:len(rows)]] + smooth * P0[nb].mean(axis=1)
        with np.errstate(divide="ignore"):
            return np.log(P)
    P0 = _softmax(predict_logits(X, model, n_classes))
    P = P0
    nb = graph[:, 1:]
    for _ in range(DIFFUSE):
        P = (1 - smooth) * P0 + smooth * P[nb].mean(axis=1)
    with np.errstate(divide="ignore"):
        return np.log(P[rows])


def _oof_logits(X, codes, n_classes, k, seed, self_train, graph=None, smooth=None):
    lab = np.flatnonzero(codes >= 0)
    fold = _folds(codes[lab], k, seed)
    out = np.full((len(lab), n_classes), np.nan, np.float32)
    for f in range(k):
        test = fold == f
        if not test.any() or len(np.unique(codes[lab[~test]])) < 2:
            continue
        c = codes.copy()
        c[lab[test]] = -1
        m = fit(X, c, n_classes, self_train=self_train, seed=seed + f, graph=graph, smooth=smooth)
        out[test] = _log_probs(X, m, n_classes, lab[test], graph, smooth)
    ok = ~np.isnan(out).any(axis=1)
    return out[ok], codes[lab][ok]


def _temperature(logits: np.ndarray, y: np.ndarray, w: np.ndarray | None = None) -> float:
    """The temperature that minimises the (``w``-weighted) log loss of ``logits``."""
    if len(y) < 5:
        return 1.0
    w = np.ones(len(y)) if w is None else np.asarray(w, np.float64)
    finite = np.where(np.isfinite(logits), logits, -1e4).astype(np.float64)
    best, best_t = np.inf, 1.0
    for T in np.exp(np.linspace(np.log(0.05), np.log(20), 80)):
        z = finite / T
        z -= z.max(axis=1, keepdims=True)
        nll = -(w * (z[np.arange(len(y)), y] - np.log(np.exp(z).sum(axis=1)))).sum() / w.sum()
        if nll < best:
            best, best_t = nll, float(T)
    return best_t


def _shift_weights(oof: np.ndarray, conf_un: np.ndarray, bins: int = CALIBRATION_BINS,
                   power: float | None = None) -> np.ndarray:
    """Weights that make the labelled rows' out-of-fold confidences spread like the
    unlabelled rows' confidences (the tool picks unsure rows on purpose, so without them the
    calibration would be fitted on the hard cases only)."""
    z = np.where(np.isfinite(oof), oof, -1e4)
    c = _softmax(z.astype(np.float32)).max(axis=1)
    edges = np.quantile(conf_un, np.linspace(0, 1, bins + 1)[1:-1])
    b_oof = np.searchsorted(edges, c)
    n_oof = np.bincount(b_oof, minlength=bins).astype(np.float64)
    share_un = np.full(bins, 1.0 / bins)
    w = (share_un[b_oof] / np.maximum(n_oof[b_oof], 1)) ** (SHIFT_POWER if power is None else power)
    return w * len(c) / w.sum()


def check_precision(precision: Any) -> float:
    """``precision`` as the share of "sure" predictions expected right, between
    :data:`SURE_MIN` and :data:`SURE_MAX`; else ``ValueError`` naming it."""
    try:
        p = float(precision)
    except (TypeError, ValueError):
        p = float("nan")
    if not SURE_MIN <= p <= SURE_MAX:
        raise ValueError(f"sure precision must be between {SURE_MIN} and {SURE_MAX} (the share "
                         f"of sure predictions expected right); got {precision!r}")
    return p


def sure_threshold(confidence: np.ndarray, precision: float = SURE_PRECISION) -> float:
    """The lowest confidence whose rows at or above it average at least ``precision``
    (``inf`` when even the most confident row falls short)."""
    if not 0 < precision <= 1:
        raise ValueError(f"precision must be in (0, 1]; got {precision!r}")
    c = np.sort(np.asarray(confidence, np.float64)[np.isfinite(confidence)])[::-1]
    if len(c) == 0:
        return float("inf")
    mean = np.cumsum(c) / np.arange(1, len(c) + 1)
    ok = np.flatnonzero(mean >= precision)
    return float(c[ok[-1]]) if len(ok) else float("inf")


def _calibrated(X, codes, n_classes, folds, seed, self_train, graph, power, smooth=None,
                oof_too=False):
    """(N, K) calibrated probabilities of the model fitted on every label, its temperature and
    the cross-validated accuracy of the labels (None: too few to hold out); ``oof_too``: also
    the calibrated out-of-fold probabilities and their labels."""
    n = len(X)
    oof, y = _oof_logits(X, codes, n_classes, folds, seed, self_train, graph, smooth)
    cv_acc = float((oof.argmax(axis=1) == y).mean()) if len(y) else None
    model = fit(X, codes, n_classes, self_train=self_train, seed=seed, graph=graph, smooth=smooth)
    if graph is not None:  # log-probabilities, then calibrated
        probs = _log_probs(X, model, n_classes, np.arange(n), graph, smooth)
    else:
        probs = np.empty((n, n_classes), np.float32)
        for a in range(0, n, BLOCK):
            probs[a:a + BLOCK] = _log_probs(X, model, n_classes, np.arange(a, min(n, a + BLOCK)), None)
    un = codes < 0
    w = None
    if un.any() and len(y) >= 5:
        w = _shift_weights(oof, np.exp(probs[un].max(axis=1)), power=power)
    T = _temperature(oof, y, w)
    for a in range(0, n, BLOCK):
        probs[a:a + BLOCK] = _softmax(probs[a:a + BLOCK], T)
    if oof_too:
        return probs, T, cv_acc, _softmax(oof, T), y
    return probs, T, cv_acc


def smooth_rows(X: Any, graph: Any, pull: float = ROWS_PULL, hops: int = ROWS_HOPS) -> np.ndarray:
    """The rows smoothed over the neighbour graph: ``hops`` times each row moved ``pull`` of
    the way to the mean of its neighbours, then scaled back to its own length. The neighbours'
    rows are gathered about :data:`BLOCK` at a time (all at once they are a copy of ``X`` per
    neighbour: 0.5 GB at 200,000 rows)."""
    X = np.asarray(X, np.float32)
    graph = check_graph(graph, len(X))
    norm = np.linalg.norm(X, axis=1, keepdims=True)
    nb = graph[:, 1:]
    Z = X
    mean, step = np.empty_like(X), max(1, BLOCK // max(1, nb.shape[1]))
    for _ in range(hops):
        for a in range(0, len(Z), step):
            mean[a:a + step] = Z[nb[a:a + step]].mean(axis=1)
        Z = (1 - pull) * Z + pull * mean
        Z = Z * (norm / np.maximum(np.linalg.norm(Z, axis=1, keepdims=True), 1e-12))
    return Z.astype(np.float32)


def _mixed(parts, codes, n_classes, folds, seed, self_train, graph, power):
    """The mix of calibrated models, ``parts`` = [(share, X, smooth), ...]: (the mixed
    probabilities, the same re-calibrated by one temperature fitted on the mix's out-of-fold
    probabilities (weighted as in :func:`_calibrated`), that temperature, the cross-validated
    accuracy of the labels). With one model the mix is that model."""
    if len(parts) == 1:
        _, Xp, sm = parts[0]
        probs, T, cv_acc = _calibrated(Xp, codes, n_classes, folds, seed, self_train, graph, power, sm)
        return probs, probs, T, cv_acc
    probs, oof, ys = 0.0, 0.0, []
    for share, Xp, sm in parts:
        p, _, _, o, y = _calibrated(Xp, codes, n_classes, folds, seed, self_train, graph, power, sm,
                                    oof_too=True)
        probs, oof = probs + share * p, oof + share * o
        ys.append(y)
    probs = probs.astype(np.float32)
    y = ys[0]
    cv_acc = float((oof.argmax(axis=1) == y).mean()) if len(y) else None
    un = codes < 0
    if len(y) < 5 or not un.any() or any(len(v) != len(y) or not np.array_equal(v, y) for v in ys):
        return probs, probs, 1.0, cv_acc
    with np.errstate(divide="ignore"):
        lo, lp = np.log(oof), np.log(probs)
    T = _temperature(lo, y, _shift_weights(lo, probs[un].max(axis=1), power=power))
    return probs, _softmax(lp, T), T, cv_acc


# ---------------------------------------------------------------------- propagate
def propagate(X: Any, codes: Any, n_classes: int | None = None, *, graph: Any = None,
              self_train: bool = False, second_opinion: bool = True,
              precision: float = SURE_PRECISION, folds: int | None = None,
              smoothed: Any = None, random_state: int | None = 0) -> Propagation:
    """Fit on the labelled rows, predict every row, calibrate, estimate.

    ``codes`` from :func:`encode` (-1 = unlabelled). Labelled rows get their own label as
    prediction with confidence 1 (they are never "sure": there is nothing to accept).
    With fewer than two labelled rows or one class only, there is no model: predicted -1,
    confidence NaN, nothing sure, no estimate. With a ``graph``, ``second_opinion`` mixes the
    self-trained model's calibrated probabilities into each unlabelled row's prediction, its
    confidence and the estimate (see the module's notes); ``probs`` (what the picks use) stay
    the probe's. ``smoothed``: :func:`smooth_rows` of ``X`` over ``graph`` when the caller
    has made them already (seconds at 200,000 rows); made here when not given.
    """
    X, codes, n_classes = _check(X, codes, n_classes)
    folds = check_int("folds", FOLDS if folds is None else folds, 2)
    seed = check_random_state(random_state) or 0
    n = len(X)
    lab = np.flatnonzero(codes >= 0)
    if len(lab) < 2 or len(np.unique(codes[lab])) < 2:
        pred = np.full(n, -1, np.int32)
        pred[lab] = codes[lab]
        conf = np.full(n, np.nan, np.float32)
        conf[lab] = 1.0
        return Propagation(pred, conf, np.zeros(n, bool), float("inf"), None, None, 1.0, None)
    if graph is not None:
        graph = check_graph(graph, n)
    smooth = smoothing(len(lab))
    if graph is None:
        parts = [(1.0, X, smooth)]
    else:  # the smoothed-row model alone up to ROWS_ALONE labels, then mixed in
        if smoothed is None:
            Xs = smooth_rows(X, graph)
        else:
            Xs = as_matrix(smoothed, "smoothed", np.float32)
            if Xs.shape != X.shape:
                raise ValueError(f"smoothed must be smooth_rows(X, graph), of X's shape "
                                 f"{X.shape}; got {Xs.shape}")
        rs = ROWS_SMOOTH_FEW if len(lab) <= SMOOTH_FEW_LABELS else SMOOTH
        parts = [(1.0, Xs, rs)] if len(lab) <= ROWS_ALONE else [(1 - ROWS_SHARE, X, smooth),
                                                                  (ROWS_SHARE, Xs, rs)]
    probs, cal, T, cv_acc = _mixed(parts, codes, n_classes, folds, seed, self_train, graph,
                                   SHIFT_POWER)
    un = codes < 0
    pred = probs.argmax(axis=1).astype(np.int32)
    i = np.arange(n)
    conf = cal[i, pred]
    pred[lab] = codes[lab]
    conf[lab] = 1.0
    est = float(conf[un].mean()) if un.any() else cv_acc
    if second_opinion and graph is not None and un.any():
        second, second_cal, _, _ = _mixed(parts, codes, n_classes, folds, seed, True, graph,
                                          SECOND_SHIFT_POWER)
        pred[un], conf[un], mixed = _second_opinion(probs[un], second[un], cal[un],
                                                     second_cal[un])
        est = float(mixed.mean())
    thr = sure_threshold(conf[un], precision) if un.any() else float("inf")
    sure = un & (conf >= thr)
    return Propagation(pred, conf, sure, thr, est, cv_acc, T, probs)


def _second_opinion(probe: np.ndarray, second: np.ndarray, probe_cal: np.ndarray,
                    second_cal: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(predicted code, confidence, mixed probability of the prediction) per row from the
    probe's and the self-trained model's probabilities (:func:`_mixed`'s mixes as they are, and
    the same re-calibrated; all the same shape): the likeliest label of the two as they are
    (:data:`PREDICT_SHARE` of the second); as the confidence, :data:`SECOND_SHARE` of the
    second's re-calibrated probability of that label plus the rest of the probe's; and the
    re-calibrated mix's probability of it (:data:`PREDICT_SHARE` of the second; the estimate is
    their mean)."""
    mix = (1 - PREDICT_SHARE) * probe + PREDICT_SHARE * second
    pred = mix.argmax(axis=1).astype(np.int32)
    i = np.arange(len(pred))
    p, s = probe_cal[i, pred], second_cal[i, pred]
    conf = SECOND_SHARE * s + (1 - SECOND_SHARE) * p
    return pred, conf.astype(np.float32), (1 - PREDICT_SHARE) * p + PREDICT_SHARE * s


# ---------------------------------------------------------------------- pick next
def _kmeans(X: np.ndarray, k: int, seed: int):
    """k-means of the rows into ``k`` groups, or as many as there are distinct rows if fewer
    (scikit-learn would warn; no warnings filter here: the app runs this in its threads,
    where ``warnings.catch_warnings`` is not safe). (group per row, centres)."""
    from sklearn.cluster import KMeans, MiniBatchKMeans

    X = np.ascontiguousarray(X)
    rows = X.view(np.dtype((np.void, X.dtype.itemsize * X.shape[1]))).ravel()
    k = max(1, min(k, len(np.unique(rows))))
    if len(X) > 20_000:
        km = MiniBatchKMeans(k, random_state=seed, n_init=3, batch_size=4096)
    else:
        km = KMeans(k, random_state=seed, n_init=3)
    lab = km.fit_predict(X)
    return lab, km.cluster_centers_


def _coverage(X: np.ndarray, codes: np.ndarray, n: int, seed: int) -> tuple[np.ndarray, list[str]]:
    """``n`` rows that stand for the parts of the map no label covers yet: k-means with
    (labelled + n) clusters; of the clusters without a label, the ``n`` with the largest
    size x distance from their centre to the nearest label, the row nearest each centre."""
    rng = np.random.default_rng(seed)
    cand = np.arange(len(X))
    if len(cand) > 100_000:
        cand = np.sort(rng.choice(cand, 100_000, replace=False))
    labelled = codes >= 0
    k = min(len(cand), int(labelled.sum()) + n)
    assign, centres = _kmeans(X[cand], k, seed)
    k = len(centres)  # fewer where the rows repeat
    taken = set(assign[labelled[cand]].tolist())
    sizes = np.bincount(assign, minlength=k)
    # the biggest clusters first, weighted by how far their centre is from any label
    far = np.ones(k)
    lab_rows = np.flatnonzero(labelled)
    if len(lab_rows):
        L = X[lab_rows]
        d2 = (centres ** 2).sum(1)[:, None] - 2 * centres @ L.T + (L ** 2).sum(1)[None, :]
        far = np.sqrt(np.maximum(d2.min(axis=1), 0))
    out, why = [], []
    for c in np.argsort(-(sizes * far), kind="stable"):
        if c in taken:
            continue
        members = cand[(assign == c) & ~labelled[cand]]
        if len(members) == 0:
            continue
        d = ((X[members] - centres[c]) ** 2).sum(axis=1)
        out.append(int(members[d.argmin()]))
        why.append(f"stands for {int(sizes[c])} images no label covers yet")
        if len(out) == n:
            break
    return np.asarray(out, np.int64), why


def pick_next(X: Any, codes: Any, n: int = 20, *, probs: np.ndarray | None = None,
              graph: Any = None, classes: Sequence[str] | None = None, pool: int = 10,
              space: Any = None, random_state: int | None = 0) -> tuple[np.ndarray, list[str]]:
    """The ``n`` unlabelled rows whose labels would teach the model most, with a reason each.

    Coverage first: before two classes are labelled every pick stands for a part of the map no
    label covers (:func:`_coverage`); then a share of each batch that shrinks to nothing at
    :data:`COVERAGE_LABELS` labels. The rest are unsure rows: the ``pool * n`` with the
    smallest margin between their two likeliest labels (``probs`` from :func:`propagate`,
    computed when not given), spread by k-means into groups so one batch is not ten
    near-copies; in each group the least sure row.

    ``graph``: the neighbour graph :func:`propagate` smooths over, or a function that makes
    it (called only when the picks need the model's probabilities), for when ``probs`` is not
    given: the picks are then the ones a propagation over that graph would lead to, as in
    bench/labelling.py. Without it the probabilities are the unsmoothed probe's.

    ``space``: :func:`smooth_rows` of ``X`` over ``graph``, which the picks' k-means (coverage
    and spread) run on, and which a propagation made here takes rather than smoothing again
    (default ``X``; :func:`next_rows` passes them when it has a graph).
    """
    X, codes, _ = _check(X, codes)
    K = X if space is None else as_matrix(space, "space", np.float32)
    if len(K) != len(X):
        raise ValueError(f"space must have one row per row of X ({len(X)}); got {len(K)}")
    n = check_int("n", n, 1)
    pool = check_int("pool", pool, 1)
    seed = check_random_state(random_state) or 0
    un = np.flatnonzero(codes < 0)
    n = min(n, len(un))
    if n == 0:
        return np.zeros(0, np.int64), []
    lab = codes[codes >= 0]
    if len(lab) < 2 or len(np.unique(lab)) < 2:
        return _coverage(K, codes, n, seed)
    n_cover = int(round(n * max(0.0, 1 - len(lab) / COVERAGE_LABELS)))
    rows, why = _coverage(K, codes, n_cover, seed) if n_cover else (np.zeros(0, np.int64), [])
    if len(rows) == n:
        return rows, why
    if probs is None:
        if callable(graph):
            graph = graph()
        probs = propagate(X, codes, graph=graph, second_opinion=False, smoothed=space,
                          random_state=seed).probs
    probs = np.asarray(probs)
    if probs.shape[0] != len(X):
        raise ValueError(f"probs must have one row per row of X ({len(X)}); got {probs.shape}")
    un = np.setdiff1d(un, rows)
    more, more_why = _unsure(K, un, probs, n - len(rows), pool, seed, classes)
    return np.concatenate([rows, more]).astype(np.int64), list(why) + more_why


def _unsure(X, un, probs, n, pool, seed, classes):
    p = probs[un]
    top2 = np.partition(p, p.shape[1] - 2, axis=1)[:, -2:]
    margin = top2[:, 1] - top2[:, 0]
    m = min(len(un), pool * n)
    cand = np.argpartition(margin, m - 1)[:m] if m < len(un) else np.arange(len(un))
    if len(cand) > n:
        groups, _ = _kmeans(X[un[cand]], n, seed)
    else:
        groups = np.arange(len(cand))
    out, why, marg = [], [], []
    names = list(classes) if classes is not None else None
    for g in np.unique(groups):
        members = cand[groups == g]
        best = members[margin[members].argmin()]
        row = int(un[best])
        first, second = np.argsort(-probs[row])[:2]
        a = names[first] if names else str(first)
        b = names[second] if names else str(second)
        out.append(row)
        marg.append(float(margin[best]))
        why.append(f"unsure between {a!r} and {b!r} (margin {float(margin[best]):.2f})")
    order = np.argsort(marg, kind="stable")
    return np.asarray(out, np.int64)[order], [why[i] for i in order]


# ---------------------------------------------------------------------- tables (CLI, app, API)
def label_table(paths: Sequence[str], labels: Sequence[Any], sources: Sequence[str], X: Any, *,
                graph: Any = "auto", precision: float = SURE_PRECISION,
                smoothed: Any = None, random_state: int | None = 0):
    """Every row's label and prediction as a table, plus the figures the person sees.

    ``labels`` per row (``""`` = none), ``sources`` per row (``"person"``/``"accepted"``/``""``
    from :meth:`explorer.curation.labels.LabelBook.sources`). Returns ``(df, info)``: ``df`` has
    ``path``, ``label``, ``label_source`` (person | accepted | predicted; ``""`` when there is
    no model yet), ``predicted_label`` (the label itself for labelled rows), ``confidence``
    and ``sure``; ``info`` has ``labels`` (by a person), ``accepted``, ``classes``,
    ``estimated_accuracy``, ``cv_accuracy``, ``threshold``, ``sure`` (count) and
    ``sure_precision`` (``precision``: what "sure" was asked to mean, :func:`check_precision`).
    ``graph``: ``"auto"`` makes :func:`neighbours` of ``X`` (minutes at 200,000 rows: a caller
    that propagates again passes the one it kept), else that graph or ``None``. ``smoothed``:
    :func:`smooth_rows` of ``X`` over that graph, when the caller keeps it (seconds at 200,000
    rows), as for :func:`propagate`.
    """
    import pandas as pd

    paths = [str(p) for p in paths]
    precision = check_precision(precision)
    if not (len(paths) == len(labels) == len(sources)):
        raise ValueError(f"paths, labels and sources differ in length: "
                         f"{len(paths)}, {len(labels)}, {len(sources)}")
    codes, classes = encode(labels)
    if isinstance(graph, str):
        if graph != "auto":
            raise ValueError(f"graph must be 'auto', None or neighbour indices; got {graph!r}")
        graph = neighbours(X)
    prop = propagate(X, codes, len(classes), graph=graph, precision=precision,
                     smoothed=smoothed,
                     random_state=random_state)
    names = np.asarray(classes + [""], dtype=object)
    src = np.asarray([s or "" for s in sources], dtype=object)
    model = prop.estimated_accuracy is not None
    src = np.where(codes >= 0, np.where(src == "accepted", "accepted", "person"),
                   "predicted" if model else "")
    df = pd.DataFrame({
        "path": paths,
        "label": names[codes],
        "label_source": src,
        "predicted_label": names[prop.predicted],
        "confidence": np.round(prop.confidence.astype(np.float64), 4),
        "sure": prop.sure,
    })
    thr = prop.threshold if np.isfinite(prop.threshold) else None
    info = {
        "labels": int((src == "person").sum()),
        "accepted": int((src == "accepted").sum()),
        "classes": classes,
        "estimated_accuracy": None if prop.estimated_accuracy is None else round(prop.estimated_accuracy, 4),
        "cv_accuracy": None if prop.cv_accuracy is None else round(prop.cv_accuracy, 4),
        "threshold": None if thr is None else round(float(thr), 4),
        "sure": int(prop.sure.sum()),
        "sure_precision": precision,
    }
    return df, info


def next_rows(paths: Sequence[str], labels: Sequence[Any], X: Any, n: int = 20, *,
              graph: Any = None, smoothed: Any = None,
              random_state: int | None = 0) -> list[dict[str, Any]]:
    """The images to label next: ``[{"path", "row", "reason"}, ...]`` (see :func:`pick_next`;
    ``graph``, the neighbour graph or a function that makes it, as for :func:`propagate`;
    ``smoothed``, :func:`smooth_rows` of ``X`` over that graph or a function that makes it,
    when the caller keeps it; made here otherwise)."""
    codes, classes = encode(labels)
    if len(paths) != len(codes):
        raise ValueError(f"paths and labels differ in length: {len(paths)}, {len(codes)}")
    if callable(graph):
        graph = graph()
    space = None
    if graph is not None:  # the picks' k-means on the smoothed rows
        space = smoothed() if callable(smoothed) else smoothed
        if space is None:
            space = smooth_rows(X, graph)
    rows, why = pick_next(X, codes, n, graph=graph, classes=classes, space=space,
                          random_state=random_state)
    return [{"path": str(paths[r]), "row": int(r), "reason": w} for r, w in zip(rows, why)]
