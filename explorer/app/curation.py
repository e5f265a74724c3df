"""Curation of one session (mixed into :class:`AppState`): labels, neighbours, label
propagation, drill-down re-cluster, the overview and metadata.

Slow parts come in three steps so the served app runs the middle one off the event loop:
``*_plan`` (on the loop: checks and a snapshot), ``*_compute`` (touches no session state;
safe in a worker) and ``*_show`` (on the loop: the result becomes state). Called together
(tests, scripts) they behave as one synchronous method.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np
import pandas as pd

from explorer.app.selection import SUBCLUSTER
from explorer.app.session import SessionFields


#: the build's own map layout (``NAME.csv``'s x, y), always there
ORIGINAL_LAYOUT = "original"


def empty_suggestions() -> pd.DataFrame:
    return pd.DataFrame({
        "row": pd.Series(dtype=np.int64), "file": pd.Series(dtype=object),
        "proposed_label": pd.Series(dtype=object), "confidence": pd.Series(dtype=float),
        "votes": pd.Series(dtype=np.int64), "distance": pd.Series(dtype=float),
    })


class Curation(SessionFields):
    """Curation methods of :class:`explorer.app.state.AppState` (its attributes:
    :class:`explorer.app.session.SessionFields`)."""

    # ------------------------------------------------------------------ embeddings
    @property
    def has_features(self) -> bool:
        return self.project.features is not None

    @property
    def features_problem(self) -> str | None:
        return self.project.features_problem

    @property
    def features_path(self) -> Path | None:
        return getattr(self.project, "features_path", None)

    def features(self, rows: np.ndarray | None = None) -> np.ndarray:
        """Embeddings (float32) of ``rows`` (all rows by default); ValueError if there are none."""
        return self.project.feature_rows(rows)

    # ------------------------------------------------------------------ labels
    def labelled(self, rows: np.ndarray | None = None) -> pd.DataFrame:
        """The table (or its ``rows``) with its ``label`` column as it is now (CSV + journal)."""
        t = self.table if rows is None else self.table.iloc[np.asarray(rows, dtype=np.int64)]
        if self.book is None:
            return t
        out = t.copy()
        idx = np.arange(self.n_rows) if rows is None else np.asarray(rows, dtype=np.int64)
        out["label"] = self.labels("label")[idx] if len(idx) else np.zeros(0, dtype=object)
        return out

    def label_names(self) -> list[str]:
        """Labels in use on this map, most frequent first."""
        # the book counts only labelled keys of this table (no pass over every row)
        return list(self.book.counts()) if self.book is not None else []

    def _labels_changed(self) -> None:
        self.invalidate_labels("label")
        self.emit("labels", "message")

    def _label_edit(self, what: Callable[[], Any], done: str | Callable[[dict], str]) -> bool:
        """Run a LabelBook edit; say "saved: ..." only after the journal write returned
        (``done`` may make the words from the record written)."""
        if self.book is None:
            self.refuse("labels are not available in this session")
            return False
        try:
            record = what()
        except ValueError as exc:
            self.refuse(f"not changed: {exc}")
            return False
        except OSError as exc:
            self.refuse(f"NOT saved (journal write failed: {exc})")
            return False
        if record is None:
            self.say("nothing changed")
            self.emit("message")
            return False
        if callable(done):
            done = done(record)
        journal = self.book.journal
        if journal is None:
            self.say(f"{done} (in memory only: NOT saved, there is no journal)", "warning")
        else:
            self.say(f"saved: {done} to {Path(journal.path).name}")
        self._labels_changed()
        return True

    def _selected_keys(self) -> list[str] | None:
        if len(self.selection) == 0:
            self.refuse("select images first (lasso or box on the map)")
            return None
        keys = self.keys
        return [keys[i] for i in self.selection]

    def apply_label(self, label: str) -> bool:
        """Give every selected image ``label`` (one undoable, journaled step)."""
        keys = self._selected_keys()
        if keys is None:
            return False
        return self._label_edit(lambda: self.book.apply(keys, label),
                                f"label {str(label).strip()!r} on {len(keys):,} image(s)")

    def assign_labels(self, compute: Callable[[], Any], done: str) -> bool:
        """Give each key its own label (``compute()`` -> {key: label}) in one undoable,
        journaled step; a ValueError from ``compute`` is shown as a refusal."""
        return self._label_edit(lambda: self.book.assign(compute()), done)

    def discard_selection(self) -> bool:
        """Mark the selected images 'discard'."""
        keys = self._selected_keys()
        if keys is None:
            return False
        return self._label_edit(lambda: self.book.discard(keys), f"{len(keys):,} image(s) discarded")

    def clear_selection_labels(self) -> bool:
        keys = self._selected_keys()
        if keys is None:
            return False
        return self._label_edit(lambda: self.book.clear(keys), f"labels of {len(keys):,} image(s) removed")

    def rename_label(self, old: str, new: str) -> bool:
        return self._label_edit(lambda: self.book.rename(old, new), f"label {old!r} renamed to {str(new).strip()!r}")

    def merge_labels(self, a: str, b: str, into: str | None = None) -> bool:
        target = b if not into else into
        return self._label_edit(lambda: self.book.merge(a, b, into or None),
                                f"{a!r} and {b!r} merged into {str(target).strip()!r}")

    def undo_labels(self) -> bool:
        return self._label_edit(lambda: self.book.undo(), "undone")

    def redo_labels(self) -> bool:
        return self._label_edit(lambda: self.book.redo(), "redone")

    def sync_labels(self) -> list[str]:
        """Apply other sessions' label edits; returns the changed keys (re-renders only then)."""
        if self.book is None or self.book.journal is None:
            return []
        try:
            changed = self.book.sync()
        except OSError:
            return []
        if changed:
            self.say(f"{len(changed):,} label change(s) from another session")
            self._labels_changed()
        return changed

    # ------------------------------------------------------------------ neighbours
    def neighbours_for(self, rows: np.ndarray, k: int = 12) -> tuple[int, np.ndarray, np.ndarray] | None:
        """The neighbours of a one-image selection (None for any other selection or without embeddings)."""
        if len(rows) != 1 or not self.has_features:
            return None
        return self.neighbours_compute(int(rows[0]), k)

    def neighbours_compute(self, row: int, k: int = 12) -> tuple[int, np.ndarray, np.ndarray]:
        """The slow part: a chunked X @ q from the shared memory map (no N x D copy)."""
        idx, dist = self.project.nearest(row, k=k)
        return row, np.asarray(idx, dtype=np.int64), np.asarray(dist, dtype=float)

    def neighbours_show(self, found: Any) -> bool:
        """Show neighbours found in the background, if that image is still the selection."""
        if isinstance(found, Exception):
            self.refuse(f"no neighbours: {found}")
            return False
        row = found[0]
        if len(self.selection) != 1 or int(self.selection[0]) != row:
            return False  # the person moved on
        self.neighbours = found
        self.emit("neighbours")
        return True

    def show_neighbours(self, row: int, k: int = 12) -> None:
        """Select image ``row`` and show its ``k`` nearest neighbours (with distances)."""
        if not self.has_features:
            self.refuse(f"no neighbours: {self.features_problem}")
            return
        deferred, self.defer_neighbours = self.defer_neighbours, True
        try:
            self.select([row])  # no search here: done once below
        finally:
            self.defer_neighbours = deferred
        if len(self.selection) == 1:
            self.neighbours = self.neighbours_compute(int(self.selection[0]), k)
        self.emit("neighbours")

    def select_neighbours(self) -> None:
        """Select the shown image and its neighbours (e.g. to label them together)."""
        if self.neighbours is None:
            self.refuse("click one image first to see its neighbours")
            return
        row, idx, _ = self.neighbours
        self.select(np.concatenate([[row], idx]))

    # ------------------------------------------------------------------ propagate
    def propose(self, k: int = 10, min_agreement: float = 0.6) -> int:
        """'Label similar': proposals for unlabelled images from labelled neighbours.

        Nothing is applied; returns the number of proposals (see :attr:`suggestions`)."""
        plan = self.propose_plan()
        if plan is None:
            return 0
        return self.propose_show(plan, self.propose_compute(plan, k, min_agreement), k, min_agreement)

    def propose_plan(self) -> tuple[np.ndarray, np.ndarray] | None:
        """(rows that may vote or get a proposal, their labels), or None (reason in the message)."""
        if not self.has_features:
            self.refuse(f"cannot propose labels: {self.features_problem}")
            return None
        from explorer.curation.labels import DISCARD

        labels = self.labels("label")
        rows = np.flatnonzero(labels != DISCARD)
        lab = labels[rows]
        if not (lab != "").any():
            self.refuse("label some images first: proposals come from labelled neighbours")
            return None
        return rows, lab

    def propose_compute(self, plan: tuple[np.ndarray, np.ndarray], k: int = 10, min_agreement: float = 0.6) -> Any:
        """The slow part (nearest labelled neighbours); safe in a thread. A DataFrame or the ValueError."""
        from explorer.curation.labels import propose_labels

        rows, lab = plan
        try:
            return propose_labels(self.features(rows), lab.tolist(), k=k, min_agreement=min_agreement)
        except ValueError as exc:
            return exc

    def propose_show(self, plan: tuple[np.ndarray, np.ndarray], df: Any, k: int = 10, min_agreement: float = 0.6) -> int:
        if isinstance(df, Exception):
            self.refuse(f"cannot propose labels: {df}")
            return 0
        r = plan[0][df["index"].to_numpy(dtype=np.int64)]
        keys = self.keys
        self.suggestions = pd.DataFrame({
            "row": r,
            "file": [keys[i] for i in r],
            "proposed_label": df["proposed_label"].astype(str).to_numpy(),
            "confidence": df["confidence"].to_numpy(dtype=float),
            "votes": df["votes"].to_numpy(dtype=np.int64),
            "distance": df["distance"].to_numpy(dtype=float),
        })
        n = len(self.suggestions)
        self.say(f"{n:,} suggestion(s) for unlabelled images: accept or reject them" if n
                  else f"no suggestions (no unlabelled image has {min_agreement:.0%} of its {k} nearest labelled neighbours agreeing)")
        self.emit("suggestions", "message")
        return n

    def _suggestion_positions(self, positions: Iterable[int] | None) -> np.ndarray:
        n = len(self.suggestions)
        if positions is None:
            return np.arange(n)
        pos = np.unique(np.asarray(list(positions), dtype=np.int64))
        return pos[(pos >= 0) & (pos < n)]

    def accept_suggestions(self, positions: Iterable[int] | None = None) -> bool:
        """Apply the suggestions at ``positions`` (default: all) in one undoable step.
        Images labelled meanwhile (e.g. in another tab) keep their label."""
        pos = self._suggestion_positions(positions)
        if len(pos) == 0:
            self.refuse("no suggestions chosen")
            return False
        sub = self.suggestions.iloc[pos]
        now = self.labels("label")
        keys = self.keys
        mapping = {keys[r]: lab for r, lab in zip(sub["row"], sub["proposed_label"]) if now[r] == ""}
        ok = self._label_edit(lambda: self.book.assign(mapping) if mapping else None,
                              f"{len(mapping):,} suggested label(s) accepted")
        self.suggestions = self.suggestions.drop(self.suggestions.index[pos]).reset_index(drop=True)
        self.emit("suggestions")
        return ok

    def accept_predictions(self, mapping: dict[str, str], **info: Any) -> bool:
        """Accept predicted labels (key -> label) in one undoable step, journaled as accepted
        predictions (:meth:`explorer.curation.labels.LabelBook.accept`), not as a person's labels;
        images labelled meanwhile keep their label."""
        return self._label_edit(lambda: self.book.accept(mapping, **info) if mapping else None,
                                lambda rec: f"{rec['args']['n']:,} sure prediction(s) accepted")

    def reject_suggestions(self, positions: Iterable[int] | None = None) -> None:
        pos = self._suggestion_positions(positions)
        self.suggestions = self.suggestions.drop(self.suggestions.index[pos]).reset_index(drop=True)
        self.say(f"{len(pos):,} suggestion(s) rejected")
        self.emit("suggestions", "message")

    # ------------------------------------------------------------------ row filter
    def set_row_filter(self, keep: np.ndarray | None, why: str = "") -> bool:
        """Show only the rows where ``keep`` is True (``None``: every row) on the map, in the
        legend, the MultiSelect and the selection; selected rows no longer shown drop out of
        the selection. ``why`` is said on the page. Refused (False, with a message) while a
        drill-down map is shown. Raises ``ValueError`` for a mask of the wrong shape."""
        if keep is not None:
            keep = np.asarray(keep)
            if keep.dtype != bool or keep.shape != (self.n_rows,):
                raise ValueError(f"keep must be a bool array of shape ({self.n_rows},), "
                                 f"got {keep.dtype} {keep.shape}")
        if self.drill:
            self.refuse("go back to the whole map first (the filter applies to the whole map)")
            return False
        self.generation.bump()
        self.row_filter = keep
        # no filter: the project's own mask again, so the shared per-process caches apply
        self.valid = self.project.valid if keep is None else (self.project.valid & keep)
        self.invalidate_labels()
        self.selection = self.selection[self.valid[self.selection]]
        self.scope = self.scope[self.valid[self.scope]]
        self.label_filter = self.present_labels()
        self.neighbours = None
        shown = int(self.valid.sum())
        self.say(f"{why}: {shown:,} of {self.n_rows:,} images shown" if why else
                  f"{shown:,} of {self.n_rows:,} images shown")
        self.emit("map", "label_column", "selection", "filter", "message", "neighbours")
        return True

    # ------------------------------------------------------------------ drill down
    def xy(self) -> tuple[np.ndarray, np.ndarray]:
        """Map coordinates of every row (the drill-down's own map while drilled in)."""
        if self.drill:
            top = self.drill[-1]
            x, y = np.full(self.n_rows, np.nan), np.full(self.n_rows, np.nan)
            x[top["rows"]], y[top["rows"]] = top["xy"][:, 0], top["xy"][:, 1]
            return x, y
        if self.layout != ORIGINAL_LAYOUT:
            lay = self.layouts[self.layout]
            return lay["x"], lay["y"]
        return self.project.x, self.project.y

    def xy32(self) -> tuple[np.ndarray, np.ndarray]:
        """float32 x, y of every row of the whole map's layout (shared arrays, no copy)."""
        if self.layout != ORIGINAL_LAYOUT:
            lay = self.layouts[self.layout]
            return lay["x32"], lay["y32"]
        return self.project.x32, self.project.y32

    # ------------------------------------------------------------------ layouts
    @staticmethod
    def layout_arrays(xy: np.ndarray) -> dict[str, np.ndarray]:
        """The arrays a layout is kept as (``add_layout``): float64 and float32 x, y, read-only."""
        xy = np.asarray(xy)
        if xy.ndim != 2 or xy.shape[1] != 2:
            raise ValueError(f"a layout is (N, 2) coordinates, got shape {xy.shape}")
        out = {"x": xy[:, 0].astype(np.float64), "y": xy[:, 1].astype(np.float64)}
        out["x32"], out["y32"] = out["x"].astype(np.float32), out["y"].astype(np.float32)
        for a in out.values():
            a.setflags(write=False)
        return out

    def add_layout(self, name: str, arrays: dict[str, np.ndarray], announce: bool = True) -> None:
        """Offer layout ``name`` (:meth:`layout_arrays`; shared arrays may be handed in) beside
        the original; shown at once if it is the layout on the map (unless ``announce`` is
        False: a panel being built). ``ValueError`` for a layout of another length or the
        name "original"."""
        if name == ORIGINAL_LAYOUT:
            raise ValueError(f"{ORIGINAL_LAYOUT!r} is the build's layout; choose another name")
        if len(arrays["x"]) != self.n_rows:
            raise ValueError(f"layout {name!r} has {len(arrays['x'])} rows, the table {self.n_rows}")
        self.layouts[name] = arrays
        if announce and self.layout == name and not self.drill:
            self.emit("map")

    def set_layout(self, name: str) -> bool:
        """Show layout ``name`` ("original" or one of :attr:`layouts`) on the map; the
        selection, colours and labels stay. Refused while a drill-down map is shown."""
        if name != ORIGINAL_LAYOUT and name not in self.layouts:
            raise ValueError(f"layout must be one of {[ORIGINAL_LAYOUT, *self.layouts]}, got {name!r}")
        if name == self.layout:
            return True
        if self.drill:
            self.refuse("go back to the whole map first (the layouts are of the whole map)")
            return False
        self.layout = name
        self.say(f"map layout: {name}")
        self.emit("map", "message")
        return True

    def subcluster_labels(self) -> np.ndarray:
        """Every row's drill-down sub-cluster id ("" outside the drill-down)."""
        out = np.full(self.n_rows, "", dtype=object)
        if self.drill:
            top = self.drill[-1]
            out[top["rows"]] = np.asarray(top["ids"], dtype=object)
        return out

    def breadcrumbs(self) -> list[str]:
        """"all" then the id of every drill-down level."""
        return ["all"] + [lvl["parent"] for lvl in self.drill]

    def recluster_selection(self, seed: int = 42) -> bool:
        """Cluster just the selected images again (their embeddings, no re-embedding) and
        show their own map; sub-cluster ids read ``3.1``, ``3.2``, ... ``3.noise``."""
        plan = self.recluster_plan()
        if plan is None:
            return False
        result = self.recluster_compute(*plan, seed=seed)
        return self.recluster_show(*plan, result)

    def recluster_plan(self) -> tuple[np.ndarray, str] | None:
        """(rows, parent id) to re-cluster, or None (the reason is in the message)."""
        if not self.has_features:
            self.refuse(f"cannot re-cluster: {self.features_problem}")
            return None
        rows = self.selection.copy()
        if len(rows) < 2:
            self.refuse("select at least 2 images to re-cluster")
            return None
        present = self.present_labels(rows)
        parent = str(present[0]) if len(present) == 1 and present[0] != self.muted_value() else "sel"
        return rows, re.sub(r"\s+", "_", parent)[:60] or "sel"

    def recluster_compute(self, rows: np.ndarray, parent: str, seed: int = 42) -> Any:
        """The slow part (UMAP + clustering), in this process. The served app sends
        ``features(rows)`` to :func:`explorer.app.work.recluster_in_worker` instead."""
        from explorer.app.work import recluster_in_worker

        return recluster_in_worker(self.features(rows), parent, seed)

    def recluster_show(self, rows: np.ndarray, parent: str, rc: Any) -> bool:
        """Swap the map to the re-clustered rows (a new drill-down level)."""
        if isinstance(rc, Exception):
            self.refuse(f"cannot re-cluster: {rc}")
            return False
        if self._base_valid is None:
            self._base_valid = self.valid
        self.drill.append({
            "rows": rows.copy(), "xy": np.asarray(rc.xy, dtype=float), "ids": list(rc.sub_ids),
            "parent": parent, "column": self.label_column, "selection": rows.copy(),
        })
        self._enter_level(rows)
        note = f" ({'; '.join(rc.notes)})" if rc.notes else ""
        self.say(f"re-clustered {len(rows):,} images into {rc.n_clusters} sub-cluster(s){note}")
        self.emit("map", "label_column", "selection", "filter", "message", "columns")
        return True

    def _enter_level(self, rows: np.ndarray) -> None:
        self.generation.bump()
        valid = np.zeros(self.n_rows, dtype=bool)
        valid[rows] = True
        self.valid = valid & self._base_valid
        self.label_column = SUBCLUSTER if self.drill else self.label_column
        self.invalidate_labels()
        self.selection = np.zeros(0, dtype=np.int64)
        self.scope = self.selection
        self.label_filter = ()
        self.neighbours = None

    def drill_up(self, to_depth: int | None = None) -> None:
        """Back to the parent map (or to level ``to_depth``: 0 = the whole map); the
        selection that was re-clustered is selected again."""
        if not self.drill:
            return
        depth = len(self.drill) - 1 if to_depth is None else max(0, min(int(to_depth), len(self.drill)))
        if depth >= len(self.drill):
            return
        self.generation.bump()
        left = self.drill[depth]
        del self.drill[depth:]
        if self.drill:
            self._enter_level(self.drill[-1]["rows"])
        else:
            self.valid = self._base_valid
            self._base_valid = None
            self.invalidate_labels()
        self.label_column = left["column"]
        self.selection = left["selection"]
        self.scope = self.selection
        self.label_filter = self.present_labels()
        self.say(f"back to {self.breadcrumbs()[-1]}")
        self.emit("map", "label_column", "selection", "filter", "message", "columns")

    # ------------------------------------------------------------------ overview
    @property
    def tree(self) -> Any:
        """The overview hierarchy if the process has built it, else None."""
        return self.project.tree_ready

    @tree.setter
    def tree(self, value: Any) -> None:  # kept for callers that hand in a built tree
        if value is not None:
            self.project.adopt_tree(value)

    def overview(self) -> Any:
        """The group hierarchy (built once per process on first use), or None."""
        if self.project.tree_ready is None:
            if not self.has_features:
                self.refuse(f"no overview: {self.features_problem}")
                return None
            self.overview_compute()
        return self.project.tree_ready

    def overview_compute(self) -> Any:
        """Build the hierarchy once per process (slow; touches no session state, safe in a thread)."""
        return self.project.tree()

    def open_group(self, group_id: str) -> bool:
        """Show group ``group_id`` (``root``, ``root-3``, ``3-14`` ...) in the overview."""
        tree = self.overview()
        if tree is None:
            return False
        try:
            node = tree.node(group_id)
        except (ValueError, KeyError) as exc:
            self.refuse(str(exc).strip("'\""))
            return False
        self.overview_id = node.id
        self.say(f"group {node.id}: {node.count:,} images" + ("" if node.children else " (not split further)"))
        self.emit("overview", "message")
        return True

    def overview_groups(self) -> list[tuple[str, int, np.ndarray]]:
        """(id, image count, representative rows) of the open group's sub-groups (itself if a leaf)."""
        tree = self.overview()
        if tree is None:
            return []
        node = tree.node(self.overview_id)
        nodes = tree.children(node.id) or [node]
        return [(c.id, c.count, np.asarray(c.representatives, dtype=np.int64)) for c in nodes]

    def select_group(self, group_id: str | None = None) -> None:
        """Select (on the map) every image of an overview group."""
        tree = self.overview()
        if tree is None:
            return
        try:
            node = tree.node(group_id or self.overview_id)
        except (ValueError, KeyError) as exc:
            self.refuse(str(exc).strip("'\""))
            return
        self.select(node.members)

    # ------------------------------------------------------------------ metadata
    def join_metadata(self, data: bytes, filename: str = "", key: str | None = None) -> bool:
        """Join an uploaded CSV/JSON of per-image metadata by file name (``key`` column)."""
        found = self.metadata_compute(data, filename, key)
        return self.metadata_show(found, filename)

    def metadata_compute(self, data: bytes, filename: str = "", key: str | None = None) -> Any:
        """Parse and join (slow; safe in a thread): (new table, report) or the ValueError."""
        from explorer.stages.metadata import join_metadata, read_metadata

        suffix = Path(filename).suffix.lower().lstrip(".")
        fmt = suffix if suffix in ("csv", "tsv", "json", "jsonl") else None
        try:
            meta = read_metadata(data, (key or "").strip() or None, fmt=fmt)
            return join_metadata(self.table, meta, (key or "").strip() or None)
        except ValueError as exc:
            return exc

    def metadata_show(self, found: Any, filename: str = "") -> bool:
        if isinstance(found, Exception):
            self.refuse(f"metadata not joined: {found}")
            return False
        df, report = found
        self._table = df.reset_index(drop=True)  # this session's own table from now on
        self._extra_columns = None
        self.invalidate_labels()
        self.say(f"metadata {filename or 'upload'}: {report.summary()}", "info" if report.matched else "warning")
        self.emit("columns", "label_column", "message")
        return True

    def tag_columns(self) -> list[str]:
        """Extra columns that hold hashtags or comma-separated tags."""
        from explorer.stages.metadata import looks_like_tags
        from explorer.table import COLUMNS

        def make() -> list[str]:
            return [c for c in self.table.columns
                    if isinstance(c, str) and c not in COLUMNS and looks_like_tags(self.table[c])]

        return make() if self._table is not None else list(self.project.cached("tag_columns", make))

    def tag_counts(self, column: str) -> dict[str, int]:
        """Images per tag of ``column`` (slow on big tables: once per process for CSV columns)."""
        from explorer.stages.metadata import tag_values

        if column not in self.table.columns:
            raise ValueError(f"no column {column!r}")
        if self._table is None:
            return dict(self.project.cached(f"tags\0{column}", lambda: tag_values(self.table[column])))
        return tag_values(self.table[column])

    def select_tag(self, column: str, value: str) -> None:
        """Select (highlight on the map) every image whose ``column`` carries tag ``value``."""
        from explorer.stages.metadata import rows_with_tag

        if column not in self.table.columns:
            self.refuse(f"no column {column!r}")
            return
        try:
            mask = rows_with_tag(self.table[column], value)
        except ValueError as exc:
            self.refuse(str(exc))
            return
        self.select(np.flatnonzero(mask & self.valid))
        self.say(f"{len(self.selection):,} image(s) tagged {value!r} in {column}")
        self.emit("message")
