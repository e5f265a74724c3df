"""The Label tab's flow in a real Bokeh Document: label next -> propagate -> accept sure -> undo."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))
from _appdata import click, copy_app, make_app, widget as w, app_document, blank_labels, served_on_ticks  # noqa: E402

from explorer.curation.journal import Journal, journal_for  # noqa: E402
from explorer.table import read_table  # noqa: E402


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    return make_app(tmp_path_factory.mktemp("labdoc"), per_group=12, hostile=False)


@pytest.fixture
def app(built, tmp_path):
    app_dir, csv = copy_app(*built, tmp_path, sidecars=("run.json", "features.npy"))
    blank_labels(csv)
    return app_dir, csv


def make_doc(app):
    return app_document(*app)


def truth(path: str) -> str:
    return path.split("/")[0]


def test_label_next_propagate_accept_sure_undo(app, monkeypatch):
    app_dir, csv = app
    doc = make_doc(app)
    paths = read_table(csv)["path"].tolist()
    assert doc.select_one({"name": "labelling_panel"}) is not None
    # Label next: a batch of images is proposed, the first one selected on the map; the
    # picks are made on the rows smoothed over the neighbour graph (made now, once per
    # process), as bench/labelling.py measures the loop
    from explorer.curation import active

    made, smoothed, real_smooth = [], [], active.smooth_rows
    monkeypatch.setattr(active, "neighbours", lambda X, _make=active.neighbours: made.append(1) or _make(X))
    monkeypatch.setattr(active, "smooth_rows",
                        lambda *a, _make=active.smooth_rows, **k: smoothed.append(1) or _make(*a, **k))
    click(w(doc, "label_next"))
    assert made == [1] and smoothed == [1]
    assert w(doc, "label_batch").text.count("<figure") > 0
    assert "left" in w(doc, "label_batch").text
    flow = _flow(doc)
    first = flow.batch[0]
    assert list(flow.state.selection) == [first]
    # the first images get their labels typed; then one-click buttons appear for them
    seen: set[str] = set()
    for _ in range(8):
        row = flow.current
        name = truth(paths[row])
        if name in seen:
            key = [b.label.split("  ", 1)[1] for b in flow_buttons(doc)].index(name) + 1
            click(w(doc, f"label_key_{key}"))
        else:
            w(doc, "label_input").value = name
            click(w(doc, "apply_label"))
            seen.add(name)
        assert flow.state.labels_of([row], "label")[0] == name
        assert flow.current != row  # moved on to the next image of the batch
    assert sum(1 for b in flow_buttons(doc)) >= 2
    # the next batch comes from the model over the neighbour graph (kept from the first
    # batch, not made again), as propagate's
    click(w(doc, "label_next"))
    assert made == [1]
    assert smoothed == [1]  # ... and the smoothed rows: made once per process, not per click
    codes, _ = active.encode(flow.state.labels_of(range(len(paths)), "label"))
    want, _ = active.pick_next(flow.X, codes, len(flow.batch), graph=flow.graph,
                               space=flow.smoothed)
    assert flow.batch == want.tolist()
    np.testing.assert_array_equal(flow.smoothed, real_smooth(flow.X, flow.graph))
    # Propagate: an estimate, sure predictions, a point on the curve
    click(w(doc, "propagate"))
    assert smoothed == [1]  # propagate's second probe takes the kept rows too
    report = w(doc, "label_report").text
    assert "estimated accuracy" in report and "sure" in report
    n_sure = flow.info["sure"]
    assert n_sure > 0
    before = len(flow.state.book)
    # Accept all sure: one journaled step, recorded as accepted predictions
    click(w(doc, "accept_sure"))
    assert len(flow.state.book) == before + n_sure
    ops = [r["op"] for r in Journal(journal_for(csv).path).replay()]
    assert ops[-1] == "accept" and ops.count("accept") == 1
    keys = flow.state.keys
    sources = flow.state.book.sources(keys)
    assert sources.count("accepted") == n_sure and sources.count("person") == before
    # the accepted labels are mostly right (the noise images have no label of their own)
    labels = flow.state.book.labels_for(keys)
    acc = [labels[i] == truth(paths[i]) for i, s in enumerate(sources) if s == "accepted"]
    assert np.mean(acc) > 0.8
    # Undo takes the whole acceptance back
    click(w(doc, "undo"))
    assert len(flow.state.book) == before
    assert "accepted" not in flow.state.book.sources(keys)


def test_a_correction_made_after_propagate_survives_accept_all_sure(app):
    """Propagate, select the sure images, correct one of them by hand, accept all sure: the
    person's correction stays (and stays theirs); only the others become accepted."""
    doc = make_doc(app)
    flow = _flow(doc)
    paths = read_table(app[1])["path"].tolist()
    keys = flow.state.keys
    first = {}
    for i, p in enumerate(paths):  # three labels per group, as a person would give them
        first.setdefault(truth(p), []).append(keys[i])
    flow.state.assign_labels(lambda: {k: g for g, ks in first.items() for k in ks[:3]}, "3 each")
    click(w(doc, "propagate"))
    click(w(doc, "select_sure"))
    sure = list(flow.state.selection)
    assert len(sure) >= 2 and flow.info["sure"] == len(sure)
    fixed = sure[0]
    flow.state.select([fixed])
    w(doc, "label_input").value = "corrected"
    click(w(doc, "apply_label"))
    click(w(doc, "accept_sure"))
    assert flow.state.book.labels_for([keys[fixed]]) == ["corrected"]
    assert flow.state.book.sources([keys[fixed]]) == ["person"]
    sources = flow.state.book.sources([keys[r] for r in sure])
    assert sources.count("accepted") == len(sure) - 1
    assert f"{len(sure) - 1:,} sure prediction(s) accepted" in flow.state.message[1]


def test_served_the_model_runs_off_the_event_loop(app):
    """Served, "Label next", Propagate and "Accept all sure" compute in the pool (at 200,000
    images the first one makes the neighbour graph: 20 s in which no session of the server
    could do anything); the page shows the result when it is back."""
    doc = make_doc(app)
    view = doc.explorer_view
    flow = _flow(doc)
    drain = served_on_ticks(view)
    click(w(doc, "label_next"))
    assert flow.batch == [] and view.busy  # nothing picked on the loop
    drain()
    assert len(flow.batch) > 0 and list(flow.state.selection) == [flow.batch[0]]
    paths = read_table(app[1])["path"].tolist()
    keys = flow.state.keys
    flow.state.assign_labels(lambda: {keys[i]: truth(p) for i, p in enumerate(paths) if i % 4 == 0},
                             "a quarter labelled")
    click(w(doc, "propagate"))
    assert flow.info is None and view.busy
    drain()
    assert flow.info["sure"] > 0 and "estimated accuracy" in w(doc, "label_report").text
    n_sure, labelled = flow.info["sure"], len(flow.state.book)
    click(w(doc, "accept_sure"))  # accepted at once, the model fitted again in the pool
    assert len(flow.state.book) == labelled + n_sure and view.busy
    drain()
    assert flow.info["accepted"] == n_sure
    # nothing left to propose: said, not a silent empty grid
    flow.state.assign_labels(lambda: {k: "x" for k in keys if not flow.state.book.labels_for([k])[0]},
                             "the rest")
    click(w(doc, "label_next"))
    drain()
    assert flow.batch == [] and "every image has a label" in flow.state.message[1]


def test_without_embeddings_the_label_tab_says_why(tmp_path):
    """A CSV without its features file: every action of the flow says why it cannot run
    (no exception in a callback, nothing half done)."""
    doc = app_document(*make_app(tmp_path, features=False))
    for name in ("label_next", "propagate", "accept_sure", "review_unsure"):
        click(w(doc, name))
        kind, text = doc.explorer_view.state.message
        assert kind == "error" and "no embeddings" in text, (name, text)
    assert _flow(doc).batch == [] and _flow(doc).info is None


def test_sure_means_a_stricter_share_when_asked(app):
    """"Sure means 99% of them right": Propagate again by itself, fewer (never more) sure
    predictions at a higher threshold, said in the report; Accept takes those and records
    what was asked."""
    doc = make_doc(app)
    flow = _flow(doc)
    paths = read_table(app[1])["path"].tolist()
    keys = flow.state.keys
    flow.state.assign_labels(lambda: {keys[i]: truth(p) for i, p in enumerate(paths) if i % 8 == 0},
                             "an eighth labelled")
    click(w(doc, "propagate"))
    usual = dict(flow.info)
    assert "expected 97% right" in w(doc, "label_report").text
    w(doc, "sure_precision").value = "0.99"
    assert flow.info["sure_precision"] == 0.99 and "expected 99% right" in w(doc, "label_report").text
    assert 0 < flow.info["sure"] < usual["sure"], (flow.info["sure"], usual["sure"])
    assert flow.info["threshold"] > usual["threshold"]
    sure = set(flow.rows_where(True).tolist())
    click(w(doc, "accept_sure"))
    rec = list(Journal(journal_for(app[1]).path).replay())[-1]
    assert rec["op"] == "accept" and rec["args"]["sure_precision"] == 0.99
    assert {k for g in rec["args"]["changes"] for k in g[2]} == {keys[r] for r in sure}


def test_keys_1_to_9_label_the_framed_image(app):
    doc = make_doc(app)
    flow = _flow(doc)
    paths = read_table(app[1])["path"].tolist()
    click(w(doc, "label_next"))
    row = flow.current
    w(doc, "label_input").value = "first"
    click(w(doc, "apply_label"))
    nxt = flow.current
    assert nxt != row
    # key "1" (the hidden input the page's key listener writes) = the first label button
    w(doc, "label_key").value = "1:1000"
    assert flow.state.labels_of([nxt], "label")[0] == "first"
    # a key without a button does nothing
    cur = flow.current
    w(doc, "label_key").value = "9:1001"
    assert flow.state.labels_of([cur], "label")[0] == ""
    assert paths  # the table was read


def flow_buttons(doc):
    return [w(doc, f"label_key_{i}") for i in range(1, 10) if w(doc, f"label_key_{i}").visible]


def _flow(doc):
    """The session's LabellingFlow (the view is kept on the document as ``explorer_view``)."""
    return doc.explorer_view.labelling.flow
