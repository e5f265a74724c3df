"""The Metadata tab: join a CSV or JSON of per-image metadata, select images by tag
(state: :meth:`explorer.app.curation.Curation.metadata_compute` and friends)."""

from __future__ import annotations

import base64
from typing import Any

from bokeh.layouts import column
from bokeh.models import Button, Div, FileInput, Select, TextInput

from explorer.app.html import muted
from explorer.app.panel import PanelHost

__all__ = ["MetadataPanel"]


class MetadataPanel:
    title = "Metadata"

    def __init__(self, host: PanelHost, width: int) -> None:
        self.host = host
        W = width
        self.meta_file = FileInput(name="meta_file", accept=".csv,.tsv,.json,.jsonl", width=W)
        self.meta_key = TextInput(name="meta_key", title="Key column (file names; empty = guess)", width=W)
        self.meta_join = Button(name="meta_join", label="Join metadata", button_type="primary", width=W)
        self.tag_column = Select(name="tag_column", title="Tag column", options=[], width=W)
        self.tag_value = Select(name="tag_value", title="Tag (images) - selects them", options=[], width=W)
        self.panel = column(
            Div(text=muted("CSV or JSON with one row per image file name"), stylesheets=host.css),
            self.meta_file, self.meta_key, self.meta_join, self.tag_column, self.tag_value,
            name="metadata_panel", width=W,
        )  # fmt: skip
        self.meta_join.on_click(self._on_meta_join)
        self.tag_column.on_change("value", lambda a, o, n: self._render_tags())
        self.tag_value.on_change("value", self._on_tag_value)

    def _on_meta_join(self) -> None:
        st = self.host.state
        if not self.meta_file.value:
            st.refuse("choose a CSV or JSON file first")
            return
        value = self.meta_file.value
        name = self.meta_file.filename
        value = value[0] if isinstance(value, list) else value
        name = name[0] if isinstance(name, list) else name
        try:
            data = base64.b64decode(value)
        except ValueError as exc:
            st.refuse(f"upload unreadable: {exc}")
            return
        key = self.meta_key.value or None
        self.host.background(f"joining {name or 'the upload'}", lambda: st.metadata_compute(data, name or "", key),
                             lambda found: st.metadata_show(found, name or ""), drop_if_moved=False)

    def _on_tag_value(self, attr: str, old: Any, new: str) -> None:
        if self.host.syncing or not new or not self.tag_column.value:
            return
        self.host.state.select_tag(self.tag_column.value, new)

    def _render_tags(self) -> None:
        st = self.host.state
        col = self.tag_column.value
        if not (col and col in st.table.columns):
            self.tag_value.options = []
            return

        def show(counts: Any) -> None:
            if isinstance(counts, Exception) or self.tag_column.value != col:
                return
            self.tag_value.options = [("", "")] + [(v, f"{v} ({c:,})") for v, c in list(counts.items())[:500]]

        if self.host.served and not self.host.busy:
            self.host.background(f"counting tags of {col}", lambda: st.tag_counts(col), show, drop_if_moved=False)
        elif not self.host.served:
            show(st.tag_counts(col))

    def render(self, what: frozenset[str]) -> None:
        if "columns" not in what:
            return
        tags = self.host.state.tag_columns()
        self.tag_column.options = [""] + tags
        if self.tag_column.value not in tags:
            self.tag_column.value = tags[0] if tags else ""
        self._render_tags()
