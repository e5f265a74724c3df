"""The app's Duplicates tab: near-duplicate groups side by side, keep rules, overrides, undo.

* the groups of the build's ``duplicate_group`` column, largest first, a page at a time,
  each member side by side with its thumbnail, file size, resolution, sharpness, EXIF date
  and path, and whether it is kept or marked;
* a keep rule (:data:`explorer.curation.dedupe.KEEP_RULES`) applied to all groups at once, and a
  per-group override ("keep this one instead"); both are ONE journaled, undoable label edit
  each: the images not kept get the reserved label ``discard`` (the Label tab's Undo and the
  tab's own Undo take it back; exports leave them out);
* "CSV of what would be removed": the plan for the chosen rule and overrides, downloaded by
  the browser from the text the panel holds (nothing is written on the server).

Facts: width and height come from the CSV; file size and EXIF date are read from the
original files of the group members (headers only) once per process; sharpness (the quality
statistic of a 256 px thumbnail) is computed for the members shown and, when the rule is
"sharpest", for every member (one decode each, once per process). Served, the files are read
in the view's thread pool (6,000 members: 1.7 s of headers, 31 s of decodes for "sharpest",
which held every session's event loop before); the tab says so meanwhile and draws (or
applies the rule) when they are in.
"""

from __future__ import annotations

import html
import os
import threading
from typing import Any, Callable

import numpy as np

from explorer.curation import dedupe

__all__ = ["DuplicatesPanel", "GROUPS_PER_PAGE"]

#: groups shown per page
GROUPS_PER_PAGE = 12

_DOWNLOAD_CSV_JS = """
const text = source.data.csv[0] || "";
const blob = new Blob([text], {type: "text/csv"});
const a = document.createElement("a");
a.href = URL.createObjectURL(blob);
a.download = "duplicates-to-remove.csv";
document.body.appendChild(a);
a.click();
setTimeout(() => { URL.revokeObjectURL(a.href); a.remove(); }, 1000);
"""


class _Facts:
    """File size, EXIF date and sharpness of group members (NaN = unknown), filled lazily
    and shared by every session of the process (through the project cache)."""

    def __init__(self, image_dir, keys, group: np.ndarray) -> None:
        n = len(group)
        self.image_dir, self.keys = image_dir, keys
        self.members = np.flatnonzero(group >= 0)
        self.bytes = np.full(n, np.nan)
        self.date = np.full(n, np.nan)
        self.sharpness = np.full(n, np.nan)
        self._headers = False
        self._sharp_done = np.zeros(n, bool)
        #: held while files are read (sessions share the facts; the second waits, then finds
        #: them read)
        self._lock = threading.RLock()

    def _file(self, row: int):
        from explorer.app.files import original_file

        return original_file(self.image_dir, str(self.keys[row]))

    def headers(self) -> None:
        with self._lock:
            if self._headers:
                return
            for r in self.members:
                f = self._file(r)
                if f is None:
                    continue
                try:
                    self.bytes[r] = os.stat(f).st_size
                except OSError:
                    continue
                self.date[r] = dedupe.exif_date(f)
            self._headers = True

    def sharp(self, rows) -> None:
        """Sharpness of ``rows`` not known yet (:func:`explorer.curation.dedupe.sharpness_many`:
        one decode each, on every core)."""
        with self._lock:
            todo = [int(r) for r in rows if not self._sharp_done[r]]
            if todo:
                self.sharpness[todo] = dedupe.sharpness_many([self._file(r) for r in todo])
                self._sharp_done[todo] = True

    def _needed(self, rule: str, rows) -> np.ndarray:
        rows = np.asarray(rows, np.int64)
        return np.union1d(rows, self.members) if rule == "sharpest" else rows

    def missing(self, rule: str, rows) -> bool:
        """Whether showing ``rows`` (and applying ``rule``) still has files to read."""
        return not self._headers or not self._sharp_done[self._needed(rule, rows)].all()

    def read(self, rule: str, rows) -> None:
        """Read what :meth:`missing` says is missing (any thread)."""
        self.headers()
        self.sharp(self._needed(rule, rows))


class DuplicatesPanel:
    """The Duplicates tab of one session. ``view`` is the session's AppView; widgets (by
    name): ``dup_rule``, ``dup_apply``, ``dup_group``, ``dup_keep``, ``dup_override``,
    ``dup_undo``, ``dup_csv``, ``dup_note``, ``dup_prev``, ``dup_next``, ``dup_groups`` (the
    cards, under the map while the tab is open) and the source ``dup_removal``."""

    title = "Duplicates"

    def __init__(self, view: Any, css: list[Any], width: int, groups_width: int) -> None:
        from bokeh.layouts import column, row
        from bokeh.models import Button, ColumnDataSource, CustomJS, Div, Select

        self.view = view
        self.state = st = view.state
        table = st.table
        self.group = (table["duplicate_group"].to_numpy(dtype=np.int64)
                      if "duplicate_group" in table.columns else np.full(st.n_rows, -1, np.int64))
        self.order = dedupe.group_order(self.group)
        self.facts: _Facts = st.project.cached(
            "duplicates.facts", lambda: _Facts(st.image_dir, st.keys, self.group))
        #: per-group overrides in force: group id -> row kept
        self.overrides: dict[int, int] = {}
        self.page = 0
        half = (width - 10) // 2
        self.rule = Select(name="dup_rule", title="Keep in every group", value="largest",
                           options=[(r, _RULE_TEXT[r]) for r in dedupe.KEEP_RULES], width=width)
        self.apply = Button(name="dup_apply", label="Apply to all groups", button_type="primary",
                            width=width)
        self.group_pick = Select(name="dup_group", title="Group", width=half,
                                 options=[str(g) for g in self.order],
                                 value=str(self.order[0]) if len(self.order) else "")
        self.keep_pick = Select(name="dup_keep", title="Keep instead", width=half, options=[])
        self.override = Button(name="dup_override", label="Keep this one in its group",
                               width=width)
        self.undo = Button(name="dup_undo", label="Undo", width=half)
        self.csv = Button(name="dup_csv", label="CSV of what would be removed", width=half)
        self.removal = ColumnDataSource(data={"csv": [""]}, name="dup_removal")
        self.csv.js_on_click(CustomJS(args={"source": self.removal}, code=_DOWNLOAD_CSV_JS))
        self.note = Div(name="dup_note", text="", stylesheets=css, width=width)
        self.prev = Button(name="dup_prev", label="◀", width=half)
        self.next = Button(name="dup_next", label="▶", width=half)
        self.cards = Div(name="dup_groups", text="", stylesheets=css, width=groups_width,
                         visible=False)
        self.panel = column(self.rule, self.apply, row(self.group_pick, self.keep_pick),
                            self.override, row(self.undo, self.csv), row(self.prev, self.next),
                            self.note, name="duplicates_panel", width=width)
        self.apply.on_click(self.apply_rule)
        self.override.on_click(lambda: self.keep_instead(int(self.group_pick.value),
                                                         self.keep_pick.value))
        self.undo.on_click(self.state.undo_labels)
        self.rule.on_change("value", lambda a, o, n: self.refresh())
        self.group_pick.on_change("value", lambda a, o, n: self._members())
        self.prev.on_click(lambda: self.turn(-1))
        self.next.on_click(lambda: self.turn(+1))
        self._members()

    # ------------------------------------------------------------------ decisions
    def keep_mask(self) -> np.ndarray:
        """The row each group keeps under the chosen rule and overrides."""
        rule = dedupe.check_rule(self.rule.value)
        if rule in ("earliest",):
            self.facts.headers()
        if rule == "sharpest":
            self.facts.sharp(self.facts.members)
        t = self.state.table
        return dedupe.choose_keepers(self.group, rule, width=t["width"], height=t["height"],
                                     sharpness=self.facts.sharpness, date=self.facts.date,
                                     path=self.state.keys, overrides=self.overrides)

    def _with_facts(self, rows, then: Callable[[], Any]) -> bool:
        """Read the files the rule and ``rows`` need (in the view's pool), then ``then()``;
        False (what is read is said on the page)."""
        rule = self.rule.value
        self.note.text = ("<div class='ex-muted'>reading the group members' files (once per "
                          "server process)...</div>")
        self.view.background("reading the duplicate groups' files (once per server process)",
                             lambda: self.facts.read(rule, rows), lambda _: then(),
                             drop_if_moved=False)
        return False

    def apply_rule(self) -> bool:
        """Mark every group member not kept (one undoable step); the files the rule needs
        are read first (served: in the pool, and False until they are)."""
        if self.facts.missing(self.rule.value, ()):
            return self._with_facts((), self.apply_rule)
        keep = self.keep_mask()
        n = int(((self.group >= 0) & ~keep).sum())
        return self.state.assign_labels(lambda: dedupe.mark_changes(
            self.state.keys, self.group, keep, self.state.labels("label"), self._original()),
            f"kept 1 image of each of {len(self.order):,} duplicate "
                                     f"groups by '{self.rule.value}', {n:,} marked 'discard'")

    def keep_instead(self, gid: int, path: str) -> bool:
        """Override: keep ``path`` in group ``gid``, mark its other members (one step)."""
        keys = self.state.keys
        hit = [r for r in np.flatnonzero(self.group == gid) if keys[r] == path]

        def changes() -> dict[str, str]:
            if not hit:
                raise ValueError(f"{path!r} is not in duplicate group {gid}")
            keep = np.zeros(len(self.group), bool)
            keep[hit[0]] = True
            sub = np.where(self.group == gid, self.group, -1)  # this group only
            return dedupe.mark_changes(keys, sub, keep, self.state.labels("label"),
                                       self._original())

        ok = self.state.assign_labels(changes, f"group {gid}: keeping {path}")
        if ok:
            self.overrides[int(gid)] = int(hit[0])
            self.refresh()
        return ok

    def _original(self) -> list[str]:
        """The CSV's labels: what a kept image gets back when its mark is taken off."""
        t = self.state.project.table
        return t["label"].fillna("").astype(str).tolist() if "label" in t.columns else [""] * len(t)

    def removal_csv(self) -> str:
        """The CSV of what the chosen rule and overrides would remove."""
        keep = self.keep_mask()
        t = self.state.table
        return dedupe.removal_table(self.state.keys, self.group, keep, self.rule.value,
                                    width=t["width"], height=t["height"],
                                    sharpness=self.facts.sharpness,
                                    date=self.facts.date).to_csv(index=False)

    # ------------------------------------------------------------------ rendering
    def show(self, visible: bool) -> None:
        """The cards are under the map only while the tab is open."""
        self.cards.visible = bool(visible)
        if visible:
            self.refresh()

    def turn(self, step: int) -> None:
        pages = max(1, -(-len(self.order) // GROUPS_PER_PAGE))
        self.page = int(np.clip(self.page + step, 0, pages - 1))
        self.refresh()

    def _members(self) -> None:
        v = self.group_pick.value
        rows = np.flatnonzero(self.group == int(v)) if v else []
        self.keep_pick.options = [self.state.keys[r] for r in rows]
        if self.keep_pick.value not in self.keep_pick.options:
            self.keep_pick.value = self.keep_pick.options[0] if rows is not None and len(rows) else ""

    def opened(self) -> None:
        """The tab was opened: the cards show under the map."""
        self.show(True)

    def closed(self) -> None:
        """Another tab was opened: the cards go."""
        self.show(False)

    def render(self, what: frozenset[str]) -> None:
        """The view calls it after every state change (:mod:`explorer.app.panel`)."""
        if "labels" in what:
            self.refresh()

    def refresh(self) -> None:
        """Redraw the cards, the note and the removal CSV; only while the tab is open (the
        file facts are read on the first opening, not when a session starts)."""
        if not self.cards.visible:
            return
        if not len(self.order):
            self.note.text = "<div class='ex-muted'>no near-duplicate groups in this CSV</div>"
            self.cards.text = ""
            return
        shown = self.order[self.page * GROUPS_PER_PAGE:(self.page + 1) * GROUPS_PER_PAGE]
        rows = np.flatnonzero(np.isin(self.group, shown))
        if self.facts.missing(self.rule.value, rows):
            self._with_facts(rows, self.refresh)
            return
        self.removal.data = {"csv": [self.removal_csv()]}
        keep = self.keep_mask()
        members = self.facts.members
        marked = np.zeros(len(self.group), bool)
        marked[members] = np.asarray(self.state.labels_of(members, "label"), dtype=object) == dedupe.MARK
        n_mem = int((self.group >= 0).sum())
        pages = -(-len(self.order) // GROUPS_PER_PAGE)
        self.note.text = (f"<div>{len(self.order):,} groups, {n_mem:,} images; "
                          f"{int(marked[self.group >= 0].sum()):,} marked 'discard'. "
                          f"Page {self.page + 1} of {pages}.</div>")
        self.cards.text = "".join(self._group_html(g, keep, marked) for g in shown)

    def _group_html(self, gid: int, keep: np.ndarray, marked: np.ndarray) -> str:
        f, st = self.facts, self.state
        t = st.table
        rows = np.flatnonzero(self.group == gid)
        cards = []
        for r in rows:
            state = ("marked" if marked[r] else "kept") if (marked[rows].any()) else \
                ("would keep" if keep[r] else "would mark")
            size = "" if np.isnan(f.bytes[r]) else f"{f.bytes[r] / 1024:,.0f} KB"
            sharp = "" if np.isnan(f.sharpness[r]) else f"{f.sharpness[r]:,.0f}"
            cards.append(
                f"<div class='ex-dup-card' data-row='{int(r)}' data-state='{state}' "
                f"style='display:inline-block;vertical-align:top;width:150px;margin:4px;"
                f"padding:4px;border:2px solid {'#2a7' if 'keep' in state or state == 'kept' else '#c44'}'>"
                f"<img src='{html.escape(st.thumb_url(int(r)))}' style='max-width:140px;max-height:110px'>"
                f"<div><b>{html.escape(state)}</b></div>"
                f"<div>{int(t['width'].iat[r])} x {int(t['height'].iat[r])} px</div>"
                f"<div>{size}</div><div>sharpness {sharp}</div>"
                f"<div>{html.escape(dedupe.format_date(f.date[r]))}</div>"
                f"<div style='word-break:break-all'>{html.escape(str(st.keys[r]))}</div></div>")
        return (f"<div class='ex-dup-group' data-group='{int(gid)}'><div><b>group {int(gid)}</b>"
                f" ({len(rows)} images)</div>{''.join(cards)}</div>")


_RULE_TEXT = {"largest": "largest resolution", "sharpest": "sharpest",
              "earliest": "earliest EXIF date", "shortest": "shortest path",
              "first": "first in folder order"}
