"""The Label tab: label the selection, undo, rename and merge labels, "label similar"
suggestions, re-cluster the selection and save the labels (state: :mod:`explorer.app.curation`)."""

from __future__ import annotations

from typing import Any

from bokeh.layouts import column, row
from bokeh.models import Button, ColumnDataSource, DataTable, NumberFormatter, Select, TableColumn, TextInput, Toggle

from explorer.app.panel import PanelHost

__all__ = ["LabelPanel", "SUGGEST_LIMIT"]

#: the suggestions table shows at most this many (most confident first)
SUGGEST_LIMIT = 2000


class LabelPanel:
    title = "Label"

    def __init__(self, host: PanelHost, width: int) -> None:
        self.host = host
        st = host.state
        W = width
        half = (W - 10) // 2
        self.label_input = TextInput(name="label_input", title="Label", placeholder="e.g. cat", width=W)
        self.apply_label = Button(name="apply_label", label="Apply to selection", button_type="primary", width=half)
        self.discard = Button(name="discard", label="Discard selection", button_type="danger", width=half)
        self.clear_label = Button(name="clear_label", label="Remove label of selection", width=W)
        self.undo = Button(name="undo", label="↶ Undo", width=half)
        self.redo = Button(name="redo", label="Redo ↷", width=half)
        self.label_pick = Select(name="label_pick", title="Label to rename / merge", options=[], width=W)
        self.rename_to = TextInput(name="rename_to", title="New name / merge into", width=W)
        self.rename = Button(name="rename", label="Rename", width=half)
        self.merge = Button(name="merge", label="Merge into", width=half)
        self.propose = Button(name="propose", label="Label similar (suggest)", width=W)
        self.suggest_source = ColumnDataSource(data=self._suggest_data(), name="suggest_source")
        self.suggest_table = DataTable(
            name="suggest_table", source=self.suggest_source, width=W, height=150, index_position=None,
            columns=[
                TableColumn(field="file", title="image", width=120),
                TableColumn(field="proposed_label", title="label", width=80),
                TableColumn(field="confidence", title="agree", width=50, formatter=NumberFormatter(format="0%")),
            ],
        )  # fmt: skip
        self.accept_all = Button(name="accept_all", label="Accept all", button_type="success", width=95)
        self.accept_sel = Button(name="accept_selected", label="Accept chosen", width=100)
        self.reject = Button(name="reject", label="Reject", width=85)
        self.recluster = Button(name="recluster", label="Re-cluster selection", width=W)
        self.labels_name = TextInput(name="labels_name", title="Save labels as", value="labels", width=W)
        self.imagefolder = Toggle(name="imagefolder", label="+ ImageFolder zip", active=True, width=half)
        self.save_labels = Button(name="save_labels", label="Save labels", button_type="success", width=half)
        self.panel = column(
            self.label_input, row(self.apply_label, self.discard), self.clear_label, row(self.undo, self.redo),
            self.label_pick, self.rename_to, row(self.rename, self.merge), self.propose, self.suggest_table,
            row(self.accept_all, self.accept_sel, self.reject), self.recluster, self.labels_name,
            row(self.imagefolder, self.save_labels), name="label_panel", width=W,
        )  # fmt: skip
        self.apply_label.on_click(lambda: st.apply_label(self.label_input.value or ""))
        self.discard.on_click(st.discard_selection)
        self.clear_label.on_click(st.clear_selection_labels)
        self.undo.on_click(st.undo_labels)
        self.redo.on_click(st.redo_labels)
        self.rename.on_click(lambda: st.rename_label(self.label_pick.value or "", self.rename_to.value or ""))
        self.merge.on_click(lambda: st.merge_labels(self.label_pick.value or "", self.rename_to.value or ""))
        self.propose.on_click(self._on_propose)
        self.accept_all.on_click(lambda: st.accept_suggestions(None))
        self.accept_sel.on_click(lambda: st.accept_suggestions(list(self.suggest_source.selected.indices)))
        self.reject.on_click(self._on_reject)
        self.recluster.on_click(self._on_recluster)
        self.save_labels.on_click(self._on_save_labels)

    def _suggest_data(self) -> dict[str, Any]:
        # the most confident first; Accept all applies every one, shown or not
        sg = self.host.state.suggestions.head(SUGGEST_LIMIT)
        return {
            "file": [p[max(p.rfind("/"), 0) + (1 if "/" in p else 0):] for p in sg["file"].tolist()],
            "proposed_label": sg["proposed_label"].tolist(),
            "confidence": sg["confidence"].to_numpy(dtype=float),
        }

    # ------------------------------------------------------------------ callbacks
    def _on_propose(self) -> None:
        st = self.host.state
        plan = st.propose_plan()
        if plan is None:
            return
        self.host.background("finding label suggestions", lambda: st.propose_compute(plan),
                             lambda df: st.propose_show(plan, df), drop_if_moved=False)

    def _on_recluster(self) -> None:
        from explorer.app.work import recluster_in_worker

        st = self.host.state
        plan = st.recluster_plan()
        if plan is None:
            return
        rows, parent = plan
        if self.host.served:  # numba + warnings filters: in the worker process, never a thread
            self.host.background(
                f"re-clustering {len(rows):,} images", recluster_in_worker,
                lambda rc: st.recluster_show(rows, parent, rc), pool="processes",
                args=(st.features(rows), parent, 42),
            )  # fmt: skip
        else:
            st.recluster_show(rows, parent, st.recluster_compute(rows, parent))

    def _on_reject(self) -> None:
        chosen = list(self.suggest_source.selected.indices)
        self.host.state.reject_suggestions(chosen or None)

    def _on_save_labels(self) -> None:
        name = self.labels_name.value or ""
        folder = bool(self.imagefolder.active)
        self.host.save_export(f"saving labels to {name}", lambda: self.host.state.labels_plan(name, folder),
                              imagefolder=folder)

    # ------------------------------------------------------------------ rendering
    def render(self, what: frozenset[str]) -> None:
        st = self.host.state
        if "labels" in what:
            names = st.label_names()
            self.label_pick.options = names
            if self.label_pick.value not in names:
                self.label_pick.value = names[0] if names else ""
            can = st.book is not None
            self.undo.disabled = not (can and st.book.can_undo)
            self.redo.disabled = not (can and st.book.can_redo)
        if "suggestions" in what:
            self.suggest_source.selected.indices = []
            self.suggest_source.data = self._suggest_data()
            none = len(st.suggestions) == 0
            self.accept_all.disabled = self.accept_sel.disabled = self.reject.disabled = none
        self.propose.disabled = self.recluster.disabled = not st.has_features
