"""The Treemap tab: the squarified layout, one level's tiles, and the tab in a real Document
(drill down, breadcrumbs back, selection both ways)."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _appdata import click, copy_app, make_app, plot_positions, app_document  # noqa: E402
from _appdata import widget as w  # noqa: E402

from explorer.stages.hierarchy import build_hierarchy  # noqa: E402
from explorer.curation.treemap import level_tiles, squarify  # noqa: E402


def _overlap(a, b) -> float:
    ox = min(a[2], b[2]) - max(a[0], b[0])
    oy = min(a[3], b[3]) - max(a[1], b[1])
    return max(ox, 0) * max(oy, 0)


@pytest.mark.parametrize("sizes", [[1], [5, 1], [6, 6, 4, 3, 2, 2, 1], [100, 1, 1, 1], list(range(16, 0, -1))])
def test_squarify_tiles_the_box_with_areas_in_proportion(sizes):
    r = squarify(sizes, 1.6, 1.0)
    areas = (r[:, 2] - r[:, 0]) * (r[:, 3] - r[:, 1])
    np.testing.assert_allclose(areas, np.asarray(sizes) / sum(sizes) * 1.6, rtol=1e-9)
    assert r[:, [0, 1]].min() >= -1e-12 and r[:, 2].max() <= 1.6 + 1e-12 and r[:, 3].max() <= 1 + 1e-12
    for i in range(len(r)):
        for j in range(i + 1, len(r)):
            assert _overlap(r[i], r[j]) < 1e-12
    # the largest tile starts at the top left
    assert r[0, 0] == 0 and r[0, 3] == 1.0


def test_squarify_keeps_tiles_near_square():
    r = squarify([1] * 16, 1.0, 1.0)
    w, h = r[:, 2] - r[:, 0], r[:, 3] - r[:, 1]
    assert (np.maximum(w / h, h / w)).max() < 2.0  # a slice-and-dice layout would give 16:1


@pytest.mark.parametrize("bad", [[], [1, 0], [1, -2], [1, float("nan")]])
def test_squarify_names_bad_sizes(bad):
    with pytest.raises(ValueError, match="sizes"):
        squarify(bad)


def _tree(n_per=60, groups=4, seed=0):
    rng = np.random.default_rng(seed)
    X = np.concatenate([np.eye(groups)[g] * 5 + rng.normal(0, 0.05, (n_per, groups)) for g in range(groups)])
    truth = np.repeat(np.arange(groups), n_per)
    return build_hierarchy(X.astype(np.float32), branching=4, min_size=20, seed=0), truth


def test_level_tiles_count_dominant_values_and_selected_images():
    tree, truth = _tree()
    sel = np.zeros(len(truth), dtype=bool)
    sel[truth == 2] = True
    t = level_tiles(tree, "root", 1.0, 1.0, codes=truth, selected=sel)
    assert t.counts.sum() == len(truth) and list(t.counts) == sorted(t.counts, reverse=True)
    for gid, dom, share, chosen in zip(t.ids, t.dominant, t.dominant_share, t.selected):
        members = tree.node(gid).members
        assert dom == np.bincount(truth[members]).argmax()
        assert share == pytest.approx(np.mean(truth[members] == dom))
        assert chosen == np.count_nonzero(truth[members] == 2)
    assert t.selected.sum() == sel.sum() and (t.selected > 0).sum() >= 1
    leaf = next(n.id for n in tree if n.is_leaf)
    lt = level_tiles(tree, leaf)
    assert lt.leaf and lt.ids == [leaf]
    with pytest.raises(ValueError, match="codes"):
        level_tiles(tree, "root", codes=truth[:5])


# --------------------------------------------------------------------------- the tab in a Document
@pytest.fixture(scope="module")
def built(tmp_path_factory):
    return make_app(tmp_path_factory.mktemp("treemap"), per_group=40)


@pytest.fixture
def doc(built, tmp_path):
    app = copy_app(*built, tmp_path, sidecars=("run.json", "features.npy"))
    return app_document(*app)


def _open_tab(doc):
    tabs = w(doc, "tabs")
    tabs.active = [t.title for t in tabs.tabs].index("Treemap")


def test_treemap_tab_draws_the_first_level_with_thumbnails(doc):
    st = doc.explorer_view.state
    assert st.tree is None  # nothing is built before the tab is opened
    _open_tab(doc)
    tiles = w(doc, "treemap_tiles").data
    root_children = st.tree.children("root")
    assert len(tiles["id"]) == len(root_children) >= 2
    assert sum(tiles["count"]) == st.tree.n_images
    assert any(u.startswith(doc.explorer_view.thumb_prefix) for u in tiles["url"])
    assert all("images" in t for t in tiles["text"] if t)
    assert w(doc, "treemap_crumb_0").visible and w(doc, "treemap_crumb_0").label.startswith("All")


def test_tapping_a_tile_selects_its_images_and_opens_it_then_all_goes_back(doc):
    st = doc.explorer_view.state
    _open_tab(doc)
    tiles = w(doc, "treemap_tiles")
    i = int(np.argmax(tiles.data["count"]))
    gid = tiles.data["id"][i]
    members = st.tree.node(gid).members
    tiles.selected.indices = [i]  # a tap in the browser
    points = w(doc, "points")
    picked = np.asarray(doc.explorer_view.plot_rows)[points.selected.indices]
    assert sorted(picked.tolist()) == sorted(members.tolist())
    if st.tree.children(gid):
        assert st.overview_id == gid
        assert len(tiles.data["id"]) == len(st.tree.children(gid))
        assert w(doc, "treemap_crumb_1").visible and gid in w(doc, "treemap_crumb_1").label
    click(w(doc, "treemap_crumb_0"))
    assert st.overview_id == "root" and len(points.selected.indices) == 0
    assert len(tiles.data["id"]) == len(st.tree.children("root"))


def test_a_lasso_on_the_map_outlines_the_tiles_it_touches(doc):
    st = doc.explorer_view.state
    _open_tab(doc)
    lasso = plot_positions(doc, 1)
    w(doc, "points").selected.indices = lasso
    data = w(doc, "treemap_tiles").data
    assert sum(data["selected"]) == len(lasso)
    touched = [i for i, s in enumerate(data["selected"]) if s]
    assert touched and all(data["line"][i] == "#111111" for i in touched)
    assert all(data["line"][i] == "#ffffff" for i in range(len(data["id"])) if i not in touched)
    rows = set(np.flatnonzero(st.labels("cluster") == "1").tolist())
    for i in touched:
        assert data["selected"][i] == len(rows & set(st.tree.node(data["id"][i]).members.tolist()))


# --------------------------------------------------------------------------- in headless Chromium
TILE_CENTRE_JS = """
const fig = Bokeh.documents[0].get_model_by_name("treemap");
const src = Bokeh.documents[0].get_model_by_name("treemap_tiles");
const v = Bokeh.index.find_one(fig);
if (!v || !v.has_finished() || !src.data.id.length) return null;
v.el.scrollIntoView({block: "center"});
const canvas = v.canvas_view.el.getBoundingClientRect();
const i = arguments[0];
const x = (src.data.left[i] + src.data.right[i]) / 2, y = (src.data.bottom[i] + src.data.top[i]) / 2;
return [canvas.left + v.frame.x_scale.compute(x), canvas.top + v.frame.y_scale.compute(y)];
"""


@pytest.mark.browser
def test_treemap_in_the_browser_tap_back_and_lasso(built):
    import _browser as B

    if B.find_chromium() is None:
        pytest.skip("chromium/chromedriver not installed (apt-get install -y chromium chromium-driver)")
    from selenium.webdriver.common.action_chains import ActionChains

    app_dir, csv = built

    def wait(name, expr, timeout=30):
        return B.wait_model(B_drv, name, expr, timeout=timeout)

    with B.serve(app_dir, csv) as url, B.chromium(width=1600, height=1400) as B_drv:
        B_drv.get(url)
        B.wait_for(B_drv, B.PLOT_DRAWN_JS, timeout=60)
        titles = B_drv.execute_script(
            "return Bokeh.documents[0].get_model_by_name('tabs').tabs.map(t => t.title)")
        B.set_model(B_drv, "tabs", "active", titles.index("Treemap"))
        n_tiles = wait("treemap_tiles", "m.data.id.length >= 2 && m.data.id.length", timeout=90)
        counts = B.model_value(B_drv, "treemap_tiles", "Array.from(m.data.count)")
        i = max(range(n_tiles), key=lambda k: counts[k])
        x, y = B.wait_for(B_drv, TILE_CENTRE_JS, i)
        ActionChains(B_drv).move_by_offset(int(x), int(y)).click().perform()
        ActionChains(B_drv).reset_actions()
        # the tile's images are selected on the map and in the table
        wait("table_source", f"m.data['_file'].length == {counts[i]}")
        B.click_button(B_drv, "treemap_crumb_0")
        wait("points", "m.selected.indices.length == 0")
        wait("treemap_tiles", f"m.data.id.length == {n_tiles}")
        # a lasso around one corner group outlines the tiles holding its images
        B.lasso(B_drv, [(-3, -3), (3, -3), (3, 3), (-3, 3)])
        n_sel = wait("table_source", "m.data['_file'].length > 0 && m.data['_file'].length")
        assert wait("treemap_tiles", f"m.data.selected.reduce((a, b) => a + b, 0) == {n_sel}")
        assert B.model_value(B_drv, "treemap_tiles", "m.data.line.filter(c => c == '#111111').length") >= 1
