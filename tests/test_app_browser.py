"""The app in real headless Chromium against ``bokeh serve`` (mouse lasso, save, downloads).

Needs Debian's chromium + chromium-driver (``apt-get install -y chromium chromium-driver``);
skipped with a reason when they are absent. The server is started from another directory
with relative paths, as a person might.
"""

from __future__ import annotations

import csv as csvmod
import io
import sys
import time
import zipfile
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from _appdata import HOSTILE, HOSTILE_LABEL, make_app  # noqa: E402

import _browser as B  # noqa: E402

from explorer.curation.exports import safe_name  # noqa: E402

pytestmark = pytest.mark.browser

if B.find_chromium() is None:
    pytest.skip(
        "chromium/chromedriver not installed (apt-get install -y chromium chromium-driver)",
        allow_module_level=True,
    )

DEEP_JS = """
// elements matching arguments[1] inside the view of the model named arguments[0]
function deep(root, sel, out) {
  root.querySelectorAll(sel).forEach(e => out.push(e));
  root.querySelectorAll("*").forEach(e => { if (e.shadowRoot) deep(e.shadowRoot, sel, out); });
  return out;
}
let root = document;
if (arguments[0]) {
  const m = Bokeh.documents[0].get_model_by_name(arguments[0]);
  const v = m && Bokeh.index.find_one(m);
  if (!v) return [];
  root = v.el.shadowRoot || v.el;
}
return deep(root, arguments[1], []);
"""


def deep(drv, name, selector):
    return drv.execute_script(DEEP_JS, name, selector)


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    root = tmp_path_factory.mktemp("browser")
    app_dir, csv = make_app(root)
    elsewhere = root / "elsewhere"
    elsewhere.mkdir()
    downloads = root / "downloads"
    downloads.mkdir()
    # started from another directory, with paths relative to it
    with B.serve(Path("..") / app_dir.name, Path("..") / csv.name, cwd=elsewhere) as url:
        with B.chromium(download_dir=downloads) as drv:
            yield {"url": url, "drv": drv, "app_dir": app_dir, "downloads": downloads, "root": root}


@pytest.fixture
def page(site):
    drv = site["drv"]
    drv.get(site["url"])
    B.wait_for(drv, B.PLOT_DRAWN_JS, timeout=30)
    drv.execute_script("window.__alerts = []; window.alert = m => window.__alerts.push(String(m));")
    return drv


def lasso_clusters_0_and_1(drv):
    B.lasso(drv, [(-3, -3), (13, -3), (13, 3), (-3, 3)])
    B.wait_model(drv, "table_source", "m.data['_file'].length == 16")


def injected(drv):
    """Elements a hostile file name or label would have created."""
    return drv.execute_script(
        DEEP_JS.replace("return deep(root, arguments[1], []);", "")
        + "return deep(document, 'img[src=\"x\"], [onerror], b', [])"
        + ".filter(e => e.tagName !== 'B' || e.textContent === 'bold').length;",
        None,
        "",
    )


def test_page_shows_map_and_no_errors(page):
    assert B.model_value(page, "points", "m.data['x'].length") == 35
    title = deep(page, "title", ".ex-title")[0].text
    assert "35 images" in title and "4 clusters" in title
    severe = [e for e in page.get_log("browser") if e["level"] == "SEVERE"]
    assert severe == []


def test_lasso_fills_table_grid_and_multiselect(page):
    lasso_clusters_0_and_1(page)
    assert B.model_value(page, "labels", "m.value") == ["0", "1"]
    assert B.model_value(page, "points", "m.selected.indices.length") == 16
    # what the person sees: 16 thumbnails in the grid and table rows
    assert len(deep(page, "grid", "figure img")) == 16
    rows = deep(page, "table", ".slick-row")
    assert len(rows) >= 5  # the grid's viewport shows the first rows
    names = [e.text for e in deep(page, "grid", ".ex-name")]
    assert HOSTILE in names  # shown as text
    assert injected(page) == 0 and page.execute_script("return window.__alerts") == []


def test_hover_shows_thumbnail_name_and_label_as_text(page):
    page.execute_script(
        "const p = Bokeh.documents[0].get_model_by_name('points'); window.__hostile = p.data['name'].indexOf(arguments[0]);",
        HOSTILE,
    )
    i = page.execute_script("return window.__hostile")
    x, y = B.model_value(page, "points", f"[m.data['x'][{i}], m.data['y'][{i}]]")
    px, py = B.data_to_page(page, x, y)
    from selenium.webdriver.common.actions.action_builder import ActionBuilder

    for dx in (-12, -6, -1, 0):  # move onto the point like a hand would
        ab = ActionBuilder(page)
        ab.pointer_action.move_to_location(int(px) + dx, int(py))
        ab.perform()
        time.sleep(0.15)
    tip = B.wait_for(
        page,
        DEEP_JS.replace("return deep(root, arguments[1], []);", "")
        + "const t = deep(document, '.bk-tooltip-content', []).map(e => e.textContent).join(' ');"
        + "return t.includes(arguments[1]) ? t : null;",
        None,
        HOSTILE,
        timeout=10,
    )
    assert "cluster: 0" in tip
    imgs = deep(page, None, ".bk-tooltip-content img")
    assert imgs and "/app/_thumb/" in imgs[0].get_attribute("src")
    assert injected(page) == 0 and page.execute_script("return window.__alerts") == []


def test_multiselect_selects_points_of_chosen_labels(page):
    select = deep(page, "labels", "select")[0]
    page.execute_script(
        "for (const o of arguments[0].options) o.selected = (o.value === '3');"
        "arguments[0].dispatchEvent(new Event('change', {bubbles: true}));",
        select,
    )
    B.wait_model(page, "points", "m.selected.indices.length == 8")
    B.wait_model(page, "table_source", "m.data['_file'].length == 8")
    assert all(n.startswith("rocket_") for n in B.model_value(page, "table_source", "m.data['_file']"))


def test_colour_by_label_with_string_labels(page):
    select = deep(page, "color_by", "select")[0]
    page.execute_script(
        "arguments[0].value = 'label'; arguments[0].dispatchEvent(new Event('change', {bubbles: true}));",
        select,
    )
    B.wait_model(page, "labels", "m.options.length == 6")
    legend = " ".join(e.text for e in deep(page, "legend", ".ex-legend-text"))
    assert HOSTILE_LABEL in legend  # as text
    assert injected(page) == 0
    assert [e for e in page.get_log("browser") if e["level"] == "SEVERE"] == []


def wait_files(folder: Path, names: list[str], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        have = {p.name for p in folder.iterdir()}
        if all(n in have for n in names) and not any(p.suffix == ".crdownload" for p in folder.iterdir()):
            return
        time.sleep(0.1)
    raise TimeoutError(f"downloads {names} not in {sorted(p.name for p in folder.iterdir())}")


def test_save_downloads_csv_and_zip_of_originals(page, site):
    lasso_clusters_0_and_1(page)
    box = deep(page, "save_name", "input")[0]
    box.clear()
    box.send_keys("picked\n")
    B.wait_model(page, "save_name", "m.value == 'picked'")
    deep(page, "save_images", "button")[0].click()
    B.wait_model(page, "save_images", "m.active")
    deep(page, "save", "button")[0].click()
    wait_files(site["downloads"], ["picked.csv", "picked.zip"])
    rows = list(csvmod.DictReader(io.StringIO((site["downloads"] / "picked.csv").read_text())))
    assert len(rows) == 16 and {r["cluster"] for r in rows} == {"0", "1"}
    assert {"x", "y", "photographer"} <= set(rows[0])
    with zipfile.ZipFile(site["downloads"] / "picked.zip") as zf:
        names = set(zf.namelist())
    assert len(names) == 16 and f"cat/{safe_name(HOSTILE)}" in names  # made filesystem-safe by explorer.curation.exports
    assert not (site["app_dir"] / "exports").exists() and not (site["app_dir"] / "static" / "exports").exists()
    status = " ".join(e.text for e in deep(page, "status", ".ex-msg"))
    assert "saved 16 row(s)" in status and "16 original image(s)" in status


def test_bad_name_and_clear_then_save_say_so(page, site):
    lasso_clusters_0_and_1(page)
    box = deep(page, "save_name", "input")[0]
    box.clear()
    box.send_keys("../escape\n")
    B.wait_model(page, "save_name", "m.value == '../escape'")
    deep(page, "save", "button")[0].click()
    B.wait_for(page, "return (" + _status_js() + ").includes('refused')")
    deep(page, "clear_labels", "button")[0].click()
    B.wait_model(page, "points", "m.selected.indices.length == 0")
    box.clear()
    box.send_keys("empty\n")
    B.wait_model(page, "save_name", "m.value == 'empty'")
    deep(page, "save", "button")[0].click()
    B.wait_for(page, "return (" + _status_js() + ").includes('nothing selected')")
    assert not (site["downloads"] / "empty.csv").exists()
    assert not list(site["root"].glob("**/escape*"))


def _status_js() -> str:
    return (
        "(() => { const m = Bokeh.documents[0].get_model_by_name('status');"
        " const v = Bokeh.index.find_one(m); return v ? v.el.shadowRoot.textContent : ''; })()"
    )


def test_bad_csv_shows_message_not_blank_page(tmp_path, site):
    app_dir, csv = make_app(tmp_path, per_group=2, noise=1, hostile=False)
    text = csv.read_text().replace("\nx,", "\nxx,", 1)
    header, rest = text.split("\n", 1)
    csv.write_text(header.replace(",x,", ",not_x,") + "\n" + rest)
    drv = site["drv"]  # the module's browser: one Chromium start less
    with B.serve(app_dir, csv) as url:
        drv.get(url)
        msg = B.wait_for(drv, "return (" + _status_js() + ")", timeout=30)
        assert "missing column(s) x" in msg


def test_reset_data_clears_selection_and_zoom(page):
    lasso_clusters_0_and_1(page)
    before = B.model_value(page, "plot", "[m.x_range.start, m.x_range.end]")
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.actions.wheel_input import ScrollOrigin

    px, py = B.data_to_page(page, 5, 5)
    for _ in range(3):  # zoom in with the mouse wheel
        ActionChains(page).scroll_from_origin(ScrollOrigin.from_viewport(int(px), int(py)), 0, -200).perform()
    width = before[1] - before[0]
    assert B.wait_model(page, "plot", f"(m.x_range.end - m.x_range.start) < {0.8 * width!r}")
    deep(page, "reset", "button")[0].click()
    B.wait_model(page, "points", "m.selected.indices.length == 0")
    B.wait_model(page, "table_source", "m.data['_file'].length == 0")
    B.wait_model(page, "labels", "m.value.length == 0")
    after = B.model_value(page, "plot", "[m.x_range.start, m.x_range.end]")
    assert after == pytest.approx(before)


def test_hostile_project_save_with_images_zips_no_system_file(tmp_path, site):
    """H1 end to end: run record says the images are at /, CSV paths point into /etc; a
    person presses Save with images in the browser; the zip holds no /etc/passwd, nothing
    that is not an image, and the page says the root was refused."""
    import json

    import pandas as pd

    from explorer.table import sidecar

    app_dir, csv = make_app(tmp_path, per_group=2, noise=1, hostile=False)
    df = pd.read_csv(csv)
    df["path"] = ["etc/passwd", "etc/hostname", "etc/os-release"] + [f"etc/x{i}" for i in range(len(df) - 3)]
    df.loc[1, "image"] = "main.py"  # a thumbnail value naming the app's own code
    df.to_csv(csv, index=False)
    sidecar(csv, "run.json").write_text(json.dumps({"image_dir": "/", "image_dir_from_csv": "../" * 40}))
    downloads, drv = site["downloads"], site["drv"]  # the module's browser
    with B.serve(app_dir, csv) as url:
        drv.get(url)
        B.wait_for(drv, B.PLOT_DRAWN_JS, timeout=30)
        assert "refused" in B.wait_for(drv, "return (" + _status_js() + ")", timeout=10)
        drv.execute_script(  # select every point, as a lasso around the whole map would
            "const m = Bokeh.documents[0].get_model_by_name('points');"
            "m.selected.indices = [...Array(m.data.x.length).keys()];"
        )
        B.wait_model(drv, "table_source", f"m.data['_file'].length == {len(df)}")
        box = deep(drv, "save_name", "input")[0]
        box.clear()
        box.send_keys("grab\n")
        B.wait_model(drv, "save_name", "m.value == 'grab'")
        deep(drv, "save_images", "button")[0].click()
        B.wait_model(drv, "save_images", "m.active")
        deep(drv, "save", "button")[0].click()
        wait_files(downloads, ["grab.csv", "grab.zip"], timeout=40)
    with zipfile.ZipFile(downloads / "grab.zip") as zf:
        names = zf.namelist()
        content = b"".join(zf.read(n) for n in names)
    assert b"root:" not in content and not any("passwd" in n for n in names)
    from PIL import Image

    with zipfile.ZipFile(downloads / "grab.zip") as zf:
        for n in names:
            if n != "MISSING.txt":
                Image.open(io.BytesIO(zf.read(n))).verify()  # every file in it is an image
    assert "thumbnails/" in " ".join(names) and not any(n.endswith(".py") for n in names)


def test_thumbnails_drawn_on_the_map_when_few_points_are_in_view(page):
    """35 points are always "a few": the image glyph shows each thumbnail at its point,
    fetched from our per-row handler; zooming in keeps only those in view."""
    B.wait_model(page, "thumbs_source", "m.data.url.length == 35")
    urls = B.model_value(page, "thumbs_source", "m.data.url")
    assert all(u.startswith("/app/_thumb/") for u in urls)
    loaded = page.execute_script(
        "return Promise.all(arguments[0].map(u => fetch(u).then(r => r.status)));", urls[:3]
    )
    assert loaded == [200, 200, 200]
    page.execute_script(  # zoom to cluster 0 (around 0, 0), as the wheel would
        "const p = Bokeh.documents[0].get_model_by_name('plot');"
        "p.x_range.setv({start: -3, end: 3}); p.y_range.setv({start: -3, end: 3});"
    )
    n = B.wait_model(page, "thumbs_source", "m.data.url.length < 35 && m.data.url.length >= 8 ? m.data.url.length : null")
    assert n <= 10


# --------------------------------------------------------------------------- big maps: one image
BIG_POINTS = 2000
IMAGE_ABOVE = 1000  # a small threshold, so a big-map test stays fast

IMAGE_JS = """
const m = Bokeh.documents[0].get_model_by_name("map_image_source");
const d = m.data;
if (!d.n.length) return null;
const img = d.image[0];
let lit = 0;  // pixels with a visible colour (alpha above 40 of 255)
for (let i = 0; i < img.length; i++) if ((img[i] >>> 24) > 40) lit++;
return {n: d.n[0], total: d.total[0], x: d.x[0], dw: d.dw[0], y: d.y[0], dh: d.dh[0], lit: lit};
"""


def polygon_contains(px, py, x, y):
    """Even-odd point-in-polygon, one edge at a time (a plain reference for the test)."""
    import numpy as np

    inside = np.zeros(len(x), dtype=bool)
    for i in range(len(px)):
        ax, ay, bx, by = px[i], py[i], px[(i + 1) % len(px)], py[(i + 1) % len(py)]
        crosses = (ay > y) != (by > y)
        with np.errstate(divide="ignore", invalid="ignore"):
            xint = ax + (y - ay) * (bx - ax) / (by - ay)
        inside ^= crosses & (x < xint)
    return inside


@pytest.fixture(scope="module")
def big_site(tmp_path_factory, site):
    from _appdata import make_big_csv

    root = tmp_path_factory.mktemp("bigmap")
    app_dir, csv = make_big_csv(root, BIG_POINTS)
    with B.serve(app_dir, csv, env={"EXPLORER_IMAGE_MAP_ABOVE": str(IMAGE_ABOVE)}) as url:
        yield {"url": url, "drv": site["drv"], "csv": csv}  # the module's browser


def _selected_count(drv):
    text = B.model_value(drv, "table_info", "m.text") or ""
    import re

    found = re.search(r"([\d,]+) selected row", text) or re.search(r"of ([\d,]+)\s+selected", text)
    return int(found.group(1).replace(",", "")) if found else None


def test_big_map_is_an_image_and_a_real_lasso_selects_on_the_server(big_site):
    """Above the threshold the map is one server-rendered image holding every point; a
    real mouse lasso sends only its polygon (no per-point list) and the table shows
    exactly the points inside it; Shift+lasso appends."""
    import numpy as np
    import pandas as pd

    drv = big_site["drv"]
    drv.get(big_site["url"])
    B.wait_for(drv, B.PLOT_DRAWN_JS, timeout=60)
    assert B.model_value(drv, "points", "m.data['x'].length") == 0  # no dots sent
    first = drv.execute_script(IMAGE_JS)
    assert first["n"] == first["total"] == BIG_POINTS
    assert first["lit"] > 500  # coloured pixels, not a blank image
    assert B.model_value(drv, "map_image", "m.visible") and not B.model_value(drv, "scatter", "m.visible")

    table = pd.read_csv(big_site["csv"])
    x, y = table["x"].to_numpy(np.float32), table["y"].to_numpy(np.float32)
    names = table["path"].str.rsplit("/", n=1).str[-1].to_numpy()

    B.lasso(drv, [(-22, -22), (0, -22), (0, 0), (-22, 0)])
    B.wait_for(drv, "const m = Bokeh.documents[0].get_model_by_name('table_source');"
                    "return m.data['_file'].length > 0;", timeout=20)  # fmt: skip
    geom = B.model_value(drv, "lasso_geometry", "[Array.from(m.data.x), Array.from(m.data.y), m.data.kind[0]]")
    assert geom[2] == "poly" and len(geom[0]) >= 4
    want = polygon_contains(np.asarray(geom[0]), np.asarray(geom[1]), x, y)
    assert 0 < want.sum() < BIG_POINTS
    assert _selected_count(drv) == int(want.sum())
    shown = B.model_value(drv, "table_source", "m.data['_file']")
    assert sorted(shown) == sorted(names[want].tolist())
    assert B.model_value(drv, "points", "m.selected.indices.length") == 0  # no per-point list
    # the image shows the selection: fewer strongly coloured pixels than before
    B.wait_for(drv, "return (" + "(() => {" + IMAGE_JS + "})()" + f").lit < {first['lit']}", timeout=20)

    # Shift + lasso elsewhere: appended
    B.lasso(drv, [(2, 2), (22, 2), (22, 22), (2, 22)], shift=True)
    geom2 = B.wait_for(
        drv, "const m = Bokeh.documents[0].get_model_by_name('lasso_geometry');"
             "return m.data.seq[0] > 1 ? [Array.from(m.data.x), Array.from(m.data.y), m.data.mode[0]] : null;",
        timeout=20,
    )  # fmt: skip
    assert geom2[2] == "append"
    both = want | polygon_contains(np.asarray(geom2[0]), np.asarray(geom2[1]), x, y)
    B.wait_for(drv, "const t = Bokeh.documents[0].get_model_by_name('table_info').text;"
                    f"return t.includes('{int(both.sum()):,} selected') || t.includes('of {int(both.sum()):,}');",
               timeout=20)  # fmt: skip
    assert _selected_count(drv) == int(both.sum())


def test_big_map_zoom_re_renders_the_image_for_the_view(big_site):
    """Wheel-zooming re-renders the image for the visible range (fewer points, same
    pixels); zoomed in far enough, the thumbnails are drawn."""
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.actions.wheel_input import ScrollOrigin

    drv = big_site["drv"]
    drv.get(big_site["url"])
    B.wait_for(drv, B.PLOT_DRAWN_JS, timeout=60)
    first = drv.execute_script(IMAGE_JS)
    import pandas as pd

    table = pd.read_csv(big_site["csv"])
    blob = table[table["cluster"] == 0]  # zoom into a group of points
    px, py = B.data_to_page(drv, float(blob["x"].median()), float(blob["y"].median()))
    for _ in range(4):
        ActionChains(drv).scroll_from_origin(ScrollOrigin.from_viewport(int(px), int(py)), 0, -300).perform()
    zoomed = B.wait_for(drv, "const r = (() => {" + IMAGE_JS + "})(); return r.dw < arguments[0] * 0.7 ? r : null;",
                        first["dw"], timeout=20)  # fmt: skip
    assert zoomed["n"] < first["n"] and zoomed["lit"] > 0
    xr = B.model_value(drv, "plot", "[m.x_range.start, m.x_range.end]")
    assert zoomed["x"] == pytest.approx(min(xr), abs=1e-6 * abs(first["dw"]) + 1e-9)
    # far in: a few hundred points or fewer in view -> their thumbnails on the map
    for _ in range(10):
        ActionChains(drv).scroll_from_origin(ScrollOrigin.from_viewport(int(px), int(py)), 0, -300).perform()
    n = B.wait_model(drv, "thumbs_source", "m.data.url.length > 0 ? m.data.url.length : null", timeout=20)
    img = drv.execute_script(IMAGE_JS)
    assert n == img["n"] <= 300


XSS_COLUMN = "<img src=x onerror=\"document.title='XSS-COLUMN';window.__xss=1\">"
XSS_TAG = "<img src=x onerror=\"window.__xss=2\">"


def test_hostile_column_names_and_values_are_shown_as_text_never_run(tmp_path, site):
    """XSS through a CSV (review N3): the DataTable header rendered a column's name as HTML,
    so a column named ``<img onerror=...>`` ran on page load. Column names and tag values
    from the CSV appear as text in the table header, the cells, the legend, the colour-by
    and tag menus; no script of theirs runs."""
    import pandas as pd

    app_dir, csv = make_app(tmp_path)
    df = pd.read_csv(csv)
    df[XSS_COLUMN] = [XSS_TAG if i % 2 else "#plain" for i in range(len(df))]
    df["tags"] = [f"#ok, {XSS_TAG}" for _ in range(len(df))]
    df.to_csv(csv, index=False)
    drv = site["drv"]  # the module's browser
    with B.serve(app_dir, csv) as url:
        drv.get(url)
        B.wait_for(drv, B.PLOT_DRAWN_JS, timeout=30)
        # colour by the hostile column (legend of its values), select images (table cells)
        B.set_model(drv, "color_by", "value", XSS_COLUMN)
        B.wait_model(drv, "legend", f"m.text.includes('onerror')")
        lasso_clusters_0_and_1(drv)
        tab = next(t for t in deep(drv, None, ".bk-tab") if t.text.strip() == "Metadata")
        tab.click()
        B.set_model(drv, "tag_column", "value", "tags")
        B.wait_model(drv, "tag_value", "m.options.length > 1")
        time.sleep(0.5)  # an onerror handler runs once the broken image fails to load
        headers = [e.get_attribute("textContent") for e in deep(drv, "table", ".slick-column-name")]
        assert XSS_COLUMN in headers, headers
        cells = [e.get_attribute("textContent") for e in deep(drv, "table", ".slick-cell")]
        assert XSS_TAG in cells
        legend = [e.get_attribute("textContent") for e in deep(drv, "legend", ".ex-legend-text")]
        assert any(XSS_TAG in t for t in legend), legend
        assert drv.execute_script("return window.__xss") is None
        assert drv.title != "XSS-COLUMN"
        assert injected(drv) == 0
