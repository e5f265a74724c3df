"""The Label tab's map features in a real Bokeh Document: colour by prediction / confidence,
the accuracy chart, "Re-map with my labels" and the switch between the two layouts."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))
from _appdata import click, copy_app, make_app, widget as w, app_document, blank_labels  # noqa: E402

from explorer.curation import remap  # noqa: E402
from explorer.app.labelling import CONFIDENCE_COLOURS, LABELLED, REMAP_CLUSTER  # noqa: E402
from explorer.app.selection import MUTED_COLOR  # noqa: E402
from explorer.table import sidecar  # noqa: E402


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    return make_app(tmp_path_factory.mktemp("labmap"), per_group=12, hostile=False)


@pytest.fixture
def app(built, tmp_path):
    app_dir, csv = copy_app(*built, tmp_path, sidecars=("run.json", "features.npy"))
    blank_labels(csv)
    return app_dir, csv


def make_doc(app):
    return app_document(*app)


def truth(path: str) -> str:
    return path.split("/")[0]


def label_some(doc, per_group: int = 2) -> None:
    """The person labels images until ``per_group`` of each group have their true group name."""
    st = doc.explorer_view.state
    paths = st.keys
    seen: dict[str, int] = {}
    for lab in st.labels("label"):
        if lab:
            seen[lab] = seen.get(lab, 0) + 1
    for row, p in enumerate(paths):
        name = truth(p)
        if seen.get(name, 0) < per_group and not st.labels_of([row])[0]:
            seen[name] = seen.get(name, 0) + 1
            st.select([row])
            assert st.apply_label(name)


def point_colours(doc) -> list[str]:
    """The colour every drawn point gets: the mapper's palette at the point's code."""
    view = doc.explorer_view
    palette = view.color_mapper.palette
    return [palette[int(c)][:7] for c in view.source.data["code"]]


def test_colour_by_prediction_and_confidence(app):
    doc = make_doc(app)
    view = doc.explorer_view
    st = view.state
    assert "prediction" not in w(doc, "color_by").options  # nothing predicted yet
    label_some(doc)
    click(w(doc, "propagate"))
    assert {"prediction", "confidence"} <= set(w(doc, "color_by").options)
    before = point_colours(doc)
    w(doc, "color_by").value = "prediction"
    after = point_colours(doc)
    assert after != before
    table = view.labelling.flow.table
    predicted = table["predicted_label"].tolist()
    rows = view.source.data["row"]
    # one colour per predicted label, and different labels different colours
    colour_of: dict[str, str] = {}
    for r, c in zip(rows, after):
        assert colour_of.setdefault(predicted[int(r)], c) == c
    assert len(set(colour_of.values())) == len(colour_of) >= 4
    # the legend names the predicted labels with those colours
    legend = w(doc, "legend").text
    for name, c in colour_of.items():
        assert name in legend and c in legend
    # a labelled image shows its own label's colour
    labelled = [i for i, lab in enumerate(st.labels("label")) if lab]
    assert all(after[list(rows).index(i)] == colour_of[st.labels("label")[i]] for i in labelled)

    # confidence: a continuous palette over the predictions, labelled images grey
    w(doc, "color_by").value = "confidence"
    conf = point_colours(doc)
    src = table["label_source"].tolist()
    for r, c in zip(rows, conf):
        if src[int(r)] == "predicted":
            assert c in CONFIDENCE_COLOURS
        else:
            assert c == MUTED_COLOR
    # the legend reads low to high
    values = [v for v, *_ in st.legend()]
    assert values[-1] == LABELLED
    bins = values[:-1]
    assert bins and all(v.endswith("%") for v in bins)
    lows = [float(v.split("-")[0].lstrip("< ").rstrip("%")) if "-" in v else 0.0 for v in bins]
    assert lows == sorted(lows)


def test_image_map_uses_the_same_colours(app, monkeypatch):
    """Above the image threshold the server-drawn map is recoloured by the prediction too."""
    monkeypatch.setenv("EXPLORER_IMAGE_MAP_ABOVE", "10")
    doc = make_doc(app)
    view = doc.explorer_view
    assert view.image_mode
    label_some(doc)
    click(w(doc, "propagate"))
    img = np.asarray(view.image_map.source.data["image"][0]).copy()
    w(doc, "color_by").value = "prediction"
    img2 = np.asarray(view.image_map.source.data["image"][0])
    assert not np.array_equal(img, img2)


def test_accuracy_chart_gains_a_point_per_propagate(app):
    doc = make_doc(app)
    chart, curve = w(doc, "accuracy_chart"), w(doc, "accuracy_curve")
    assert not chart.visible and len(curve.data["labels"]) == 0
    label_some(doc, 1)
    click(w(doc, "propagate"))
    assert chart.visible and list(curve.data["labels"]) == [5]
    label_some(doc, 3)
    click(w(doc, "propagate"))
    assert list(curve.data["labels"]) == [5, 15]
    est = list(curve.data["estimated"])
    assert all(0 < a <= 1 for a in est)
    # the text stays beside the chart
    assert "curve 5:" in w(doc, "label_report").text


def test_remap_writes_the_sidecar_and_the_switch_moves_the_points(app):
    app_dir, csv = app
    original = csv.read_bytes()
    others = {p.name: p.read_bytes() for p in csv.parent.iterdir() if p.is_file() and p != csv}
    doc = make_doc(app)
    view = doc.explorer_view
    st = view.state
    assert not w(doc, "layout_switch").visible
    label_some(doc)
    x0 = np.asarray(view.source.data["x"]).copy()
    click(w(doc, "remap"))
    path = sidecar(csv, "layout-labels.npz")
    assert path.is_file(), st.message
    # the original layout is untouched: the CSV byte for byte, every other file as it was
    assert csv.read_bytes() == original
    for name, data in others.items():
        if not name.endswith("labels.sqlite"):  # the journal records the labels given
            assert (csv.parent / name).read_bytes() == data, name
    # the map shows the new layout, the switch says so
    switch = w(doc, "layout_switch")
    assert switch.visible and switch.labels[switch.active] == "with my labels"
    x1 = np.asarray(view.source.data["x"]).copy()
    saved = remap.load(csv, st.keys)
    assert np.allclose(x1, saved["xy"][:, 0])
    assert not np.allclose(x1, x0)
    # labelled groups come out apart on the new map: each group's points nearer each other
    xy = saved["xy"]
    groups = np.asarray([truth(p) for p in st.keys])
    centres = {g: xy[groups == g].mean(axis=0) for g in set(groups)}
    near = [min(centres, key=lambda g: np.linalg.norm(xy[i] - centres[g])) == groups[i]
            for i in range(len(xy))]
    assert np.mean(near) > 0.9
    # the switch moves the points back and forth
    switch.active = 0
    assert np.allclose(view.source.data["x"], x0)
    switch.active = 1
    assert np.allclose(view.source.data["x"], x1)
    # re-cluster from it: its clusters are a colour choice
    assert REMAP_CLUSTER in w(doc, "color_by").options
    w(doc, "color_by").value = REMAP_CLUSTER
    assert len({v for v, *_ in st.legend()} - {"-1"}) >= 4

    # a reload (a new session) finds the layout again: the switch is offered
    doc2 = make_doc(app)
    switch2 = w(doc2, "layout_switch")
    assert switch2.visible and switch2.active == 0
    switch2.active = 1
    assert np.allclose(doc2.explorer_view.source.data["x"], x1)
    assert csv.read_bytes() == original


def test_remap_without_labels_is_refused(app):
    doc = make_doc(app)
    click(w(doc, "remap"))
    assert "label some images first" in doc.explorer_view.state.message[1]
    assert not sidecar(app[1], "layout-labels.npz").exists()
