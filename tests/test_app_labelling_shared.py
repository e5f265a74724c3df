"""The labelling's features and neighbour graph belong to the server process's project, not to a
session: a second person's propagate makes neither again (the graph takes minutes at 200,000
rows), and both sessions' predictions come from the same graph."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))
from _appdata import app_document, blank_labels, copy_app, make_app  # noqa: E402

from explorer.curation import active  # noqa: E402


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    return make_app(tmp_path_factory.mktemp("labshared"), per_group=8, hostile=False)


def test_a_second_session_propagates_without_making_the_graph_again(built, tmp_path,
                                                                      monkeypatch):
    """Fails with the graph kept per session (as before 2026-12-07: tried once, the second
    session made it again)."""
    app_dir, csv = copy_app(*built, tmp_path, sidecars=("run.json", "features.npy"))
    blank_labels(csv)
    made = {"features": 0, "graph": 0}
    real_features, real_neighbours = active.features, active.neighbours

    def features(*a, **k):
        made["features"] += 1
        return real_features(*a, **k)

    def neighbours(*a, **k):
        made["graph"] += 1
        return real_neighbours(*a, **k)

    monkeypatch.setattr(active, "features", features)
    monkeypatch.setattr(active, "neighbours", neighbours)
    first, second = app_document(app_dir, csv), app_document(app_dir, csv)
    flows = [doc.explorer_view.labelling.flow for doc in (first, second)]
    assert flows[0].state.project is flows[1].state.project  # one project per process
    st = flows[0].state
    groups = [k.split("/")[0] for k in st.keys]
    for g in sorted(set(groups)):  # the first person labels two of each group
        for row in [i for i, x in enumerate(groups) if x == g][:2]:
            st.select([row])
            assert st.apply_label(g)
    info = flows[0].propagate()
    assert info["labels"] == 2 * len(set(groups))
    assert made == {"features": 1, "graph": 1}
    second_info = flows[1].propagate()  # the other session sees the same labels (journal)
    assert made == {"features": 1, "graph": 1}
    assert second_info["labels"] == info["labels"]
    assert flows[1].graph is flows[0].graph and not flows[1].graph.flags.writeable
    assert np.array_equal(flows[0].table["predicted_label"], flows[1].table["predicted_label"])
