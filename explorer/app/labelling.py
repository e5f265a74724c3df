"""The Label tab's "label a few, the tool labels the rest" section.

:class:`LabellingFlow` is the logic over an :class:`~explorer.app.state.AppState`, through its
public methods only (``select``, ``apply_label``, ``accept_predictions``, ``undo_labels``,
``features``, ``book``): the batch to label next and the cursor in it, the last propagation
and the accuracy curve. :class:`LabellingPanel` is its Bokeh widgets: "Label next" shows a
grid of the proposed images, one button per label (keys 1-9 press them: a small JS listener
on the page), Propagate, "Select sure" / "Select unsure" (on the map), "Accept all sure",
"Review unsure" (the least confident first) and the curve of the estimated accuracy against
the number of labels. The view adds it to the Label tab with one line.
"""

from __future__ import annotations

import html
from typing import Any

import numpy as np

from explorer.curation import active

#: images proposed per "Label next"
BATCH = 20
#: label buttons (keys 1-9)
KEYS = 9


class LabellingFlow:
    """Label next -> label with one click -> propagate -> accept sure, over one session."""

    def __init__(self, state: Any):
        self.state = state
        self.batch: list[int] = []
        self.reasons: list[str] = []
        self.cursor = 0
        self.table = None  # explorer.curation.active.label_table's DataFrame
        self.info: dict[str, Any] | None = None
        self.curve: list[tuple[int, float]] = []  # (labels, estimated accuracy)
        self._X = None

    # ------------------------------------------------------------------ inputs
    @property
    def X(self) -> np.ndarray:
        if self._X is None:
            self._X = active.features(self.state.features())
        return self._X

    def _labels(self) -> list[str]:
        return list(self.state.labels_of(range(self.state.n_rows), "label"))

    def classes(self) -> list[str]:
        """The label buttons, most used first ("discard" last)."""
        names = [n for n in self.state.label_names() if n != "discard"]
        return names[:KEYS - 1] + ["discard"]

    # ------------------------------------------------------------------ label next
    def label_next(self, n: int = BATCH) -> list[int]:
        """Propose the next batch (rows), the first one current."""
        picks = active.next_rows(self.state.keys, self._labels(), self.X, n)
        self.batch = [p["row"] for p in picks]
        self.reasons = [p["reason"] for p in picks]
        self.cursor = 0
        self._show_current()
        return self.batch

    def review_unsure(self, n: int = BATCH) -> list[int]:
        """The least confident predictions of the last propagation, as the batch."""
        if self.table is None:
            self.propagate()
        t = self.table
        un = np.flatnonzero((t["label"] == "").to_numpy() & (t["label_source"] == "predicted").to_numpy())
        order = un[np.argsort(t["confidence"].to_numpy()[un], kind="stable")][:n]
        self.batch = [int(r) for r in order]
        self.reasons = [f"least sure: {t['predicted_label'].iat[r]!r} at {t['confidence'].iat[r]:.0%}"
                        for r in order]
        self.cursor = 0
        self._show_current()
        return self.batch

    @property
    def current(self) -> int | None:
        return self.batch[self.cursor] if self.cursor < len(self.batch) else None

    def _show_current(self) -> None:
        if self.current is not None:
            self.state.select([self.current])

    def label_current(self, label: str) -> bool:
        """Give the current image of the batch ``label`` (one journaled step), go to the next."""
        row = self.current
        if row is None:
            return False
        self.state.select([row])
        ok = self.state.apply_label(label)
        self.skip_labelled()
        return ok

    def skip_labelled(self) -> None:
        """Move the cursor past images of the batch that have a label now (given by a button,
        a key, or typed in the label field) and select the next one on the map."""
        moved = False
        while self.current is not None and self.state.labels_of([self.current], "label")[0]:
            self.cursor += 1
            moved = True
        if moved:
            self._show_current()

    def press(self, key: int) -> bool:
        """Keys 1-9: the label of button ``key``."""
        names = self.classes()
        if not 1 <= key <= len(names):
            return False
        return self.label_current(names[key - 1])

    # ------------------------------------------------------------------ propagate / accept
    def propagate(self) -> dict[str, Any]:
        keys = self.state.keys
        self.table, self.info = active.label_table(
            keys, self._labels(), self.state.book.sources(keys), self.X)
        if self.info["estimated_accuracy"] is not None:
            n = self.info["labels"]
            self.curve = [p for p in self.curve if p[0] != n] + [(n, self.info["estimated_accuracy"])]
            self.curve.sort()
        return self.info

    def rows_where(self, sure: bool) -> np.ndarray:
        if self.table is None:
            return np.zeros(0, np.int64)
        t = self.table
        pred = (t["label_source"] == "predicted").to_numpy()
        return np.flatnonzero(pred & (t["sure"].to_numpy() == sure))

    def accept_sure(self) -> bool:
        """Every sure prediction becomes a label: one undoable step, journaled as accepted."""
        if self.table is None:
            self.propagate()
        t = self.table.iloc[self.rows_where(True)]
        ok = self.state.accept_predictions(dict(zip(t["path"], t["predicted_label"])),
                                           threshold=self.info["threshold"])
        if ok:
            self.propagate()
        return ok


class LabellingPanel:
    """Widgets of :class:`LabellingFlow` (``panel`` goes into the Label tab)."""

    def __init__(self, state: Any, css: list[Any], width: int):
        from bokeh.models import Button, CustomJS, Div, TextInput
        from bokeh.layouts import column, row

        self.state = state
        self.flow = LabellingFlow(state)
        half = (width - 10) // 2
        self.next = Button(name="label_next", label=f"Label next ({BATCH})", button_type="primary",
                           width=half)
        self.review = Button(name="review_unsure", label="Review unsure", width=half)
        self.batch = Div(name="label_batch", text="", stylesheets=css, width=width)
        self.buttons = [Button(name=f"label_key_{i + 1}", label="", width=half, visible=False)
                        for i in range(KEYS)]
        self.key = TextInput(name="label_key", value="", visible=False)
        self.propagate = Button(name="propagate", label="Propagate", width=half)
        self.accept = Button(name="accept_sure", label="Accept all sure", button_type="success",
                             width=half)
        self.sure = Button(name="select_sure", label="Select sure", width=half)
        self.unsure = Button(name="select_unsure", label="Select unsure", width=half)
        self.report = Div(name="label_report", text="", stylesheets=css, width=width)
        pairs = [row(*self.buttons[i:i + 2]) for i in range(0, KEYS, 2)]
        self.panel = column(Div(text="<b>Label a few, the tool labels the rest</b>", width=width),
                            row(self.next, self.review), self.batch, *pairs, self.key,
                            row(self.propagate, self.accept), row(self.sure, self.unsure),
                            self.report, name="labelling_panel", width=width)
        # keys 1-9 anywhere on the page but in a text field: the hidden input carries them
        self.keys_js = CustomJS(args={"key": self.key}, code="""
            if (window._explorer_keys) { return; }
            window._explorer_keys = true;
            document.addEventListener('keydown', (e) => {
                const t = e.target && e.target.tagName;
                if (t === 'INPUT' || t === 'TEXTAREA' || e.ctrlKey || e.metaKey || e.altKey) { return; }
                if (e.key >= '1' && e.key <= '9') { key.value = e.key + ':' + Date.now(); }
            });""")
        self.next.js_on_click(self.keys_js)
        self.next.on_click(self._on_next)
        self.review.on_click(self._on_review)
        for i, b in enumerate(self.buttons):
            b.on_click(lambda i=i: self._on_press(i + 1))
        self.key.on_change("value", self._on_key)
        self.propagate.on_click(self._on_propagate)
        self.accept.on_click(self._on_accept)
        self.sure.on_click(lambda: self.state.select(self.flow.rows_where(True)))
        self.unsure.on_click(lambda: self.state.select(self.flow.rows_where(False)))
        state.subscribe(self._on_state)
        self.render()

    # ------------------------------------------------------------------ callbacks
    def _on_next(self) -> None:
        self.flow.label_next()
        self.render()

    def _on_review(self) -> None:
        self.flow.review_unsure()
        self.render()

    def _on_press(self, k: int) -> None:
        self.flow.press(k)
        self.render()

    def _on_key(self, attr: str, old: str, new: str) -> None:
        if new and new[0].isdigit():
            self._on_press(int(new[0]))

    def _on_propagate(self) -> None:
        self.flow.propagate()
        self.render()

    def _on_accept(self) -> None:
        self.flow.accept_sure()
        self.render()

    def _on_state(self, what: frozenset[str]) -> None:
        if "labels" in what:
            self.flow.skip_labelled()
            self.render()

    # ------------------------------------------------------------------ rendering
    def _render_buttons(self) -> None:
        names = self.flow.classes()
        for i, b in enumerate(self.buttons):
            b.visible = i < len(names)
            b.label = f"{i + 1}  {names[i]}" if i < len(names) else ""

    def render(self) -> None:
        f = self.flow
        self._render_buttons()
        cells = []
        for i, (r, why) in enumerate(zip(f.batch, f.reasons)):
            cur = " style='outline:3px solid #e6550d'" if i == f.cursor else ""
            done = i < f.cursor
            cells.append(f"<figure class='ex-cell'{cur}><img src='{html.escape(self.state.thumb_url(r))}' "
                         f"alt='' title='{html.escape(why)}'><figcaption>"
                         f"{'&#10003; ' if done else ''}{i + 1}</figcaption></figure>")
        left = len(f.batch) - f.cursor
        self.batch.text = (f"<div class='ex-grid'>{''.join(cells)}</div>"
                           f"<div class='ex-muted'>{left} of {len(f.batch)} left; keys 1-9 label the "
                           "framed image</div>") if f.batch else ""
        info = f.info
        if info is None:
            self.report.text = "<div class='ex-muted'>Propagate: a predicted label and a confidence for every image</div>"
            return
        acc = info["estimated_accuracy"]
        curve = " ".join(f"{n}:{a:.0%}" for n, a in f.curve)
        self.report.text = (
            f"<div>estimated accuracy <b>{'-' if acc is None else f'{acc:.1%}'}</b> "
            f"({info['labels']} labels, {info['accepted']} accepted); "
            f"{info['sure']:,} sure (confidence &ge; {info['threshold']})</div>"
            f"<div class='ex-muted' title='labels: estimated accuracy'>curve {curve}</div>")
