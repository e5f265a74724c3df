"""The state of one app session: selection, filters, view state; the data is shared.

Plain Python (pandas/numpy only, no Bokeh import) so tests drive it directly and the
Bokeh layer (:mod:`explorer.app.view`) only wires widgets to it. One :class:`AppState`
per browser session; everything read-only about the CSV lives in one
:class:`explorer.app.project.Project` per server process, shared by every session.

What a session does is split by subject:

* :mod:`explorer.app.selection` - selection, label filter, colours (:class:`SelectionModel`)
* :mod:`explorer.app.curation` - labels, neighbours, propagation, drill-down, overview, metadata
* :mod:`explorer.app.files` - thumbnail URLs, original files and exports (the one path rule)
* :mod:`explorer.app.project` - the per-process data

Views subscribe with :meth:`AppState.subscribe` and re-render from the state when told
which aspects changed (see :data:`ASPECTS`).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import pandas as pd

from explorer.app.curation import ORIGINAL_LAYOUT, Curation, empty_suggestions
from explorer.app.downloads import DownloadStore, ExportPlan, SaveResult, describe, write_export
from explorer.app.files import (
    ExportError,
    check_export_name,
    original_file,
    thumb_url,
    thumbnail_file,
)
from explorer.app.project import Project, label_strings, load_project, thumb_url_prefix
from explorer.app.selection import (
    ASPECTS,
    LABEL_COLUMNS,
    MAX_CATEGORIES,
    MUTED_ALPHA,
    MUTED_COLOR,
    MUTED_VALUES,
    PALETTE,
    POINT_ALPHA,
    SUBCLUSTER,
    SelectionModel,
    default_point_size,
    sort_labels,
)
from explorer.app.work import Generation

__all__ = [
    "AppState", "ExportError", "SaveResult", "check_export_name", "thumb_url", "sort_labels",
    "label_strings", "default_point_size", "ASPECTS", "LABEL_COLUMNS", "MUTED_VALUES", "PALETTE",
    "MUTED_COLOR", "MUTED_ALPHA", "POINT_ALPHA", "SUBCLUSTER", "MAX_CATEGORIES",
]  # fmt: skip


class AppState(SelectionModel, Curation):
    """Selection, filters, toggles and curation of one app session over one project.

    Parameters
    ----------
    table : a :class:`Project` (shared) or a DataFrame (explorer.table schema; wrapped in a
        private project with no CSV); not modified
    app_dir : the app folder (thumbnails resolve inside it); ``None`` disables thumbnails
    route : URL route of the app (``bokeh serve NAME`` serves it at ``/NAME``)
    problems : extra messages about the input to show on the page
    session_key : the key this session's exports are handed out under (made if not given)
    """

    def __init__(
        self,
        table: pd.DataFrame | Project,
        *,
        app_dir: str | os.PathLike | None = None,
        route: str | None = None,
        problems: Sequence[str] = (),
        label_column: str = "cluster",
        point_size: float | None = None,
        session_key: str | None = None,
    ) -> None:
        if isinstance(table, Project):
            project = table
        else:
            project = Project(None, app_dir, route, table=table)
        self.project = project
        self.app_dir = project.app_dir
        self.route = project.route
        self.csv_path = project.csv_path
        self.problems: list[str] = list(project.problems) + list(problems)
        self.n_rows = project.n_rows
        #: rows that can be drawn (finite x and y; the drill-down's rows while drilled in)
        self.valid = project.valid
        if point_size is None:
            point_size = default_point_size(self.n_rows)
        self._table: pd.DataFrame | None = None  # this session's table after a metadata join
        self._label_cache: dict[str, np.ndarray] = {}
        self._derived: dict[tuple[str, str], Any] = {}
        self._subscribers: list[Callable[[frozenset[str]], None]] = []
        self._initial = {"label_column": label_column, "point_size": float(point_size)}
        #: the key that this session's exports are handed out under
        self.session_key = session_key or DownloadStore.new_key()
        #: bumped whenever the person moves on; background results check it (review L12)
        self.generation = Generation()
        #: the served app finds a clicked image's neighbours in the background
        self.defer_neighbours = False
        #: the labels (a LabelBook over the journal); None until attach_journal
        self.book: Any = None
        #: proposals of 'label similar': DataFrame[row, file, proposed_label, confidence, votes, distance]
        self.suggestions = empty_suggestions()
        #: (row, neighbour rows, cosine distances) of the one selected image, or None
        self.neighbours: tuple[int, np.ndarray, np.ndarray] | None = None
        #: drill-down levels: dicts with rows, xy, ids, parent, column, selection
        self.drill: list[dict[str, Any]] = []
        self._base_valid: np.ndarray | None = None
        #: the rows the map shows besides those without coordinates (None: all of them); set
        #: by the quality-flag filter of :mod:`explorer.app.finder`
        self.row_filter: np.ndarray | None = None
        self.overview_id = "root"
        self._extra_columns: list[str] | None = None
        #: colour columns this session made (name -> ColourColumn), after the table's
        self.colour_columns: dict[str, Any] = {}
        #: map layouts besides the build's (name -> {"x", "y", "x32", "y32"}) and the one shown
        self.layouts: dict[str, dict[str, np.ndarray]] = {}
        self.layout = ORIGINAL_LAYOUT
        self._check_label_column(label_column)
        self._check_point_size(point_size)
        self.label_column = label_column
        self.point_size = float(point_size)
        self.selection = np.zeros(0, dtype=np.int64)
        self.scope = np.zeros(0, dtype=np.int64)
        self.label_filter: tuple[str, ...] = ()
        self.only_selected = False
        self.message: tuple[str, str] = ("info", "")

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_csv(
        cls,
        csv_path: str | os.PathLike,
        app_dir: str | os.PathLike | None = None,
        route: str | None = None,
        journal: bool = True,
        **kwargs: Any,
    ) -> "AppState":
        """A session over the process-wide project of ``csv_path`` (read once per process).

        Raises :class:`explorer.table.SchemaError` only when there is nothing to draw
        (file missing or unreadable, no x/y columns). Every other problem is listed in
        :attr:`problems`.
        """
        state = cls(load_project(csv_path, app_dir, route), **kwargs)
        if journal:
            state.attach_journal(state.project.build.journal())
        return state

    # ------------------------------------------------------------------ shared data
    @property
    def table(self) -> pd.DataFrame:
        """The rows (the project's, or this session's after a metadata join); do not modify."""
        return self._table if self._table is not None else self.project.table

    @property
    def keys(self) -> list[str]:
        return self.project.keys

    @property
    def image_dir(self) -> Path | None:
        """The checked original-image folder (None if the run record names none or a refused one)."""
        return self.project.image_root

    @property
    def file_names(self) -> np.ndarray:
        return self.project.file_names

    def label_columns(self) -> list[str]:
        """Columns the map can be coloured by: cluster, label, duplicate_group, the
        drill-down's sub-clusters and every extra (metadata) column with at most
        :data:`MAX_CATEGORIES` distinct values."""
        if self._extra_columns is None:
            from explorer.table import COLUMNS

            def make() -> list[str]:
                return [c for c in self.table.columns
                        if isinstance(c, str) and c not in COLUMNS and c not in LABEL_COLUMNS
                        and self.table[c].nunique(dropna=True) <= MAX_CATEGORIES]

            self._extra_columns = make() if self._table is not None else self.project.cached("extra_columns", make)
        out = list(LABEL_COLUMNS)
        if self.drill:
            out.append(SUBCLUSTER)
        made = list(self.colour_columns)  # the session's own (explorer.app.labelling)
        return out + made + [c for c in self._extra_columns if c not in made]

    def attach_journal(self, journal: Any) -> None:
        """Take labels from ``journal`` (replayed) on top of the CSV's ``label`` column."""
        from explorer.curation.labels import LabelBook

        # the keys and the CSV's labels are the project's (one copy per process); the labels
        # themselves live in the journal's per-process read model (explorer.curation.labels.LabelState)
        keys, initial = self.project.key_set(), self.project.initial_labels()
        try:
            self.book = LabelBook.from_journal(journal, keys=keys, initial=initial)
        except OSError as exc:
            self.book = LabelBook(None, keys=keys, initial=initial)
            self.problems.append(f"cannot read the label journal {journal.path} ({exc}): labels will NOT be saved")
        self.invalidate_labels("label")

    # ------------------------------------------------------------------ files
    def thumb_url(self, row_or_value: int | str) -> str:
        """URL of a row's thumbnail (served by our handler), or of an ``image`` value."""
        if isinstance(row_or_value, (int, np.integer)):
            return thumb_url_prefix(self.route) + str(int(row_or_value))
        return thumb_url(row_or_value, self.route)

    def thumb_file(self, value: str) -> Path | None:
        """Thumbnail image on disk for an ``image`` value, or ``None`` if not a safe app path."""
        return thumbnail_file(self.app_dir, value)

    def original_file(self, path: str) -> Path | None:
        """The original image of a ``path`` value, if the one path rule allows it."""
        return original_file(self.image_dir, path)

    def _export_stem(self, name: str) -> str:
        return check_export_name(name)

    def export_plan(self, name: str, images: bool = False) -> ExportPlan:
        """Check a Save request and snapshot the selected rows (on the event loop)."""
        stem = self._export_stem(name)
        if len(self.selection) == 0:
            raise ExportError("nothing selected: nothing saved")
        rows = self.selection.copy()
        return ExportPlan(
            stem=stem, table=self.selected_table(), images=bool(images), imagefolder=False,
            owner=self.session_key, route=self.route, image_root=self.image_dir, app_dir=self.app_dir,
            thumb_values=self.project.image_values[rows],
        )  # fmt: skip

    def labels_plan(self, name: str, imagefolder: bool = False) -> ExportPlan:
        """Check a Save labels request and snapshot every row with its label."""
        stem = self._export_stem(name)
        if imagefolder and self.image_dir is None:
            raise ExportError("the original images were not found (see the warning above): no ImageFolder zip")
        return ExportPlan(
            stem=stem, table=self.labelled(), images=False, imagefolder=bool(imagefolder),
            owner=self.session_key, route=self.route, image_root=self.image_dir, app_dir=self.app_dir,
        )  # fmt: skip

    @staticmethod
    def export_write(plan: ExportPlan, progress: bool = False) -> SaveResult:
        """Write an export (slow: zips stream into a private temporary file); thread-safe."""
        return write_export(plan, progress=progress)

    def export_finish(self, result: SaveResult | Exception, imagefolder: bool = False) -> SaveResult | None:
        """Tell the person what was saved (or why not)."""
        if isinstance(result, Exception):
            self.refuse(f"not saved: {result}")
            return None
        result.message = describe(result, imagefolder)
        self.say(result.message)
        self.emit("message")
        return result

    def export(self, name: str, images: bool = False, progress: bool = False) -> SaveResult:
        """Save the selected rows as ``NAME.csv`` and, with ``images``, their images as
        ``NAME.zip`` (originals when the path rule allows them, else thumbnails), for this
        session to download. Raises :class:`ExportError` (with a message for the person)
        when nothing is selected, the name is refused or a size cap is hit."""
        result = self.export_write(self.export_plan(name, images), progress=progress)
        return self.export_finish(result)

    def save_labels(self, name: str, imagefolder: bool = False, progress: bool = False) -> SaveResult:
        """Every row with its current label as ``NAME.csv`` and, with ``imagefolder``,
        ``NAME.zip``: one folder per label (ImageFolder layout; unlabelled and discarded
        images left out). ``NAME.csv`` of the project is never touched."""
        result = self.export_write(self.labels_plan(name, imagefolder), progress=progress)
        return self.export_finish(result, imagefolder=imagefolder)
