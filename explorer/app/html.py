"""The app's HTML and JavaScript fragments; every fragment built from data is escaped here.

Text from the collection (file names, labels, CSV column names, metadata values, messages)
is untrusted: a CSV is a file someone hands you. Bokeh renders ``Div.text`` and a
``DataTable`` column's ``title`` as HTML, so both are built here, escaped in one place.
"""

from __future__ import annotations

import html
from typing import Any

__all__ = [
    "DOWNLOAD_JS", "GEOMETRY_JS", "THUMBS_JS", "TOOLTIP", "TOOLTIP_NO_NAME",
    "column_title", "crumbs", "error_message", "error_title", "esc", "group_cell", "image_cell",
    "image_grid", "legend", "muted", "page_info", "status", "title",
]  # fmt: skip


def esc(text: Any) -> str:
    """``text`` as HTML text (``& < > " '`` escaped), safe inside an element or a quoted attribute."""
    return html.escape(str(text), quote=True)


def column_title(name: Any) -> str:
    """A DataTable header for column ``name``: the grid puts titles into the page as HTML
    (SlickGrid's header), so a column named ``<img onerror=...>`` would run (review N3)."""
    return esc(name)


# --------------------------------------------------------------------------- page fragments
def muted(text: str) -> str:
    return f"<div class='ex-muted'>{esc(text)}</div>"


def page_info(text: str) -> str:
    return f"<div class='ex-pageinfo'>{esc(text)}</div>"


def title(route: str, n_rows: int, n_clusters: int | None, csv_path: Any) -> str:
    """The page's title line: app, images, clusters, CSV."""
    parts = [f"<b>{esc(route)}</b>", f"{n_rows:,} images"]
    if n_clusters is not None:
        parts.append(f"{n_clusters:,} clusters")
    if csv_path is not None:
        parts.append(f"<span class='ex-muted'>{esc(csv_path)}</span>")
    return f"<div class='ex-title'>{' &middot; '.join(parts)}</div>"


def error_title(text: str) -> str:
    return f"<div class='ex-title'><b>{esc(text)}</b></div>"


def error_message(text: str) -> str:
    return f"<div class='ex-msg ex-error'>&#9888; {esc(text)}</div>"


def crumbs(names: list[str]) -> str:
    """The drill-down's breadcrumbs ("" for the whole map)."""
    if len(names) <= 1:
        return ""
    return "<div class='ex-crumbs'>" + " &rsaquo; ".join(esc(c) for c in names) + "</div>"


def image_cell(thumb: str, name: str, label: str, note: str = "", query: bool = False) -> str:
    """One image of the grid: thumbnail, file name, label and an optional note (e.g. a distance)."""
    note_html = f"<span class='ex-dist'>{esc(note)}</span>" if note else ""
    return (
        f"<figure class='ex-cell{' ex-query' if query else ''}'><img src='{esc(thumb)}' alt='' "
        f"loading='lazy' title='{esc(name)}'><figcaption><span class='ex-name'>{esc(name)}</span>"
        f"<span class='ex-label'>{esc(label)}</span>{note_html}</figcaption></figure>"
    )


def image_grid(cells: list[str], extra_class: str = "") -> str:
    """Cells from :func:`image_cell` as the grid."""
    return f"<div class='ex-grid{' ' + extra_class if extra_class else ''}'>{''.join(cells)}</div>"


def legend(items: list[tuple[str, str, int]], more: int = 0) -> str:
    """The colour legend: (text, colour, count) per value, and how many more are not shown."""
    rows = "".join(
        f"<div class='ex-legend-item'><span class='ex-swatch' style='background:{esc(c)}'></span>"
        f"<span class='ex-legend-text'>{esc(t)}</span><span class='ex-count'>{n:,}</span></div>"
        for t, c, n in items
    )
    tail = f"<div class='ex-muted'>... and {more:,} more</div>" if more > 0 else ""
    return f"<div class='ex-legend'>{rows}{tail}</div>"


def status(problems: list[str], level: str, text: str, links: list[tuple[str, str]]) -> str:
    """Notes about the input, the last message, and download links (file name, URL)."""
    out = [f"<div class='ex-msg ex-warning'>&#9888; {esc(p)}</div>" for p in problems]
    if text:
        out.append(f"<div class='ex-msg ex-{esc(level)}'>{esc(text)}</div>")
    if links and level != "error":
        out.append(
            "<div class='ex-msg'>download: "
            + ", ".join(f"<a href='{esc(u)}' download='{esc(n)}'>{esc(n)}</a>" for n, u in links)
            + "</div>"
        )
    return "".join(out)


def group_cell(group_id: str, count: int, thumbs: list[str]) -> str:
    """One group of the Overview: a few thumbnails, its id and size."""
    imgs = "".join(f"<img src='{esc(t)}' alt=''>" for t in thumbs)
    return (f"<div class='ex-group'><div class='ex-group-imgs'>{imgs}</div>"
            f"<div><b>{esc(group_id)}</b> &middot; {count:,} images</div></div>")


# --------------------------------------------------------------------------- JavaScript
#: the hover: thumbnail, file name and the colour column's value (Bokeh escapes the fields)
TOOLTIP = """
<div style="max-width:180px">
  <img src="@row{custom}" alt="" style="max-width:160px;max-height:160px;display:block;margin-bottom:4px">
  <div style="font-weight:600;word-break:break-all">@name</div>
  <div>@code{custom}</div>
</div>
"""
TOOLTIP_NO_NAME = TOOLTIP.replace('<div style="font-weight:600;word-break:break-all">@name</div>', "")

#: hands a save's files to the browser as downloads (the session key as a cookie per file)
DOWNLOAD_JS = """
const d = source.data;
const urls = d["url"] || [];
const names = d["filename"] || [];
const paths = d["cookie_path"] || [];
// the session key travels only over this session's websocket; the export handler wants it
// back in a cookie scoped to the one export's path
for (let i = 0; i < paths.length; i++) {
  document.cookie = "explorer_dl=" + key + "; path=" + paths[i] + "; SameSite=Strict";
}
for (let i = 0; i < urls.length; i++) {
  const a = document.createElement("a");
  a.href = urls[i];
  a.download = names[i];
  a.style.display = "none";
  document.body.appendChild(a);
  a.click();
  a.remove();
}
"""

#: the thumbnails in view (client-side; throttled; nothing goes to the server)
THUMBS_JS = """
if (image.visible) return;  // image mode: the server sends the thumbnails in view
if (thumbs._ex_timer) clearTimeout(thumbs._ex_timer);
thumbs._ex_timer = setTimeout(() => {
  const d = points.data, xs = d.x, ys = d.y, rows = d.row;
  const xa = Math.min(xr.start, xr.end), xb = Math.max(xr.start, xr.end);
  const ya = Math.min(yr.start, yr.end), yb = Math.max(yr.start, yr.end);
  const url = [], x = [], y = [];
  let n = 0;
  for (let i = 0; i < xs.length; i++) {
    const a = xs[i], b = ys[i];
    if (a >= xa && a <= xb && b >= ya && b <= yb) {
      if (++n > limit) break;
      url.push(prefix + rows[i]); x.push(a); y.push(b);
    }
  }
  if (n > limit) { if (thumbs.data.url.length) thumbs.data = {url: [], x: [], y: []}; }
  else thumbs.data = {url: url, x: x, y: y};
}, 120);
"""

#: the browser side of the lasso channel: on the final geometry of a select tool, send
#: the polygon (data coordinates) and the mode; ``seq`` makes a repeated shape a change
GEOMETRY_JS = """
if (!cb_obj.final || !image.visible) return;
const g = cb_obj.geometry;
let xs, ys, mode;
if (g.type == "poly") { xs = Array.from(g.x); ys = Array.from(g.y); mode = lasso.mode; }
else if (g.type == "rect") { xs = [g.x0, g.x1, g.x1, g.x0]; ys = [g.y0, g.y0, g.y1, g.y1]; mode = box.mode; }
else if (g.type == "point") { xs = [g.x]; ys = [g.y]; mode = "replace"; }
else return;
const k = window.explorerKeys || {};
if (k.shift && k.ctrl) mode = "subtract";
else if (k.shift) mode = g.type == "point" ? "toggle" : "append";
else if (k.ctrl) mode = "intersect";
window.__explorerSeq = (window.__explorerSeq || 0) + 1;
const seq = window.__explorerSeq;
geometry.data = {x: xs, y: ys, kind: xs.map(() => g.type), mode: xs.map(() => mode),
                 seq: xs.map(() => seq)};
"""
