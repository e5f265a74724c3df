"""The Overview tab: the cluster hierarchy level by level, as groups of thumbnails
(state: :meth:`explorer.app.curation.Curation.open_group` and friends)."""

from __future__ import annotations

from bokeh.layouts import column, row
from bokeh.models import Button, Div, TextInput

from explorer.app.html import group_cell
from explorer.app.panel import PanelHost

__all__ = ["OverviewPanel", "GROUP_BUTTONS"]

#: a level shows at most this many groups (the hierarchy is 16-way)
GROUP_BUTTONS = 16


class OverviewPanel:
    title = "Overview"

    def __init__(self, host: PanelHost, width: int) -> None:
        self.host = host
        st = host.state
        W = width
        half = (W - 10) // 2
        self.group_id = TextInput(name="group_id", title="Group id (e.g. root-3-14)", value="root", width=W - 70)
        self.group_go = Button(name="group_go", label="Go", width=60)
        self.group_up = Button(name="group_up", label="▲ Up", width=half)
        self.group_select = Button(name="group_select", label="Select on map", width=half)
        self.group_buttons = [Button(name=f"group_{i}", label="", width=W, visible=False)
                              for i in range(GROUP_BUTTONS)]  # fmt: skip
        self.overview_div = Div(name="overview", text="", stylesheets=host.css, width=W)
        self.panel = column(
            row(self.group_id, self.group_go), row(self.group_up, self.group_select), self.overview_div,
            *self.group_buttons, name="overview_panel", width=W,
        )  # fmt: skip
        self.group_go.on_click(lambda: st.open_group(self.group_id.value or "root"))
        self.group_up.on_click(self._on_group_up)
        self.group_select.on_click(lambda: st.select_group())
        for i, b in enumerate(self.group_buttons):
            b.on_click(lambda i=i: self._on_group(i))
        #: whether the overview was opened (its tree built or being built)
        self.started = False

    def opened(self) -> None:
        """The tab was opened: build the hierarchy once (in the background when served)."""
        st = self.host.state
        if self.started:
            return
        if st.tree is not None:
            self.started = True
            st.open_group("root")
            return
        if not st.has_features:
            st.overview()  # says why there is no overview
            return
        self.started = True

        def finish(tree: object) -> None:
            if isinstance(tree, Exception):
                self.started = False  # try again next time (review L12)
                st.refuse(f"no overview: {tree}")
                return
            st.open_group("root")

        self.host.background("building the overview (once for every session)", st.overview_compute,
                             finish, drop_if_moved=False)

    def _on_group(self, i: int) -> None:
        groups = self.host.state.overview_groups()
        if i < len(groups):
            self.host.state.open_group(groups[i][0])

    def _on_group_up(self) -> None:
        gid = self.host.state.overview_id
        if gid != "root":
            self.host.state.open_group(gid.rsplit("-", 1)[0])

    def render(self, what: frozenset[str]) -> None:
        if "overview" not in what:
            return
        st = self.host.state
        groups = st.overview_groups() if st.tree is not None else []
        self.group_id.value = st.overview_id
        cells = []
        for gid, count, reps in groups:
            cells.append(group_cell(gid, count, [self.host.thumb(r) for r in reps[:4]]))
        self.overview_div.text = "".join(cells)
        node = st.tree.node(st.overview_id) if st.tree is not None else None
        for i, b in enumerate(self.group_buttons):
            if node is not None and node.children and i < len(groups):
                b.label = f"open {groups[i][0]} ({groups[i][1]:,})"
                b.visible = True
            else:
                b.visible = False
        self.group_up.disabled = st.overview_id == "root"
