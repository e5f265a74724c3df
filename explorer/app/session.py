"""Every attribute of one session's state, and what its parts ask of each other, declared
in one place.

:class:`explorer.app.state.AppState` is assembled from two parts, the selection
(:class:`explorer.app.selection.SelectionModel`) and the curation
(:class:`explorer.app.curation.Curation`). Both read and write the attributes declared
here, and only these; ``AppState.__init__`` gives each its first value. A part calls the
other (or ``AppState``) only through the operations declared at the end of
:class:`SessionFields`, each defined by the class its comment names.
``tests/test_app_state.py`` holds a live session to the attributes, and the source of
both parts to "its own names or declared ones" (no private names across the parts).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np
import pandas as pd

__all__ = ["SessionFields", "declared_fields", "declared_operations"]


class SessionFields:
    """The declared attributes of a session (no values: ``AppState.__init__`` sets them)."""

    # ---------------------------------------------------------------- the data (shared)
    #: the per-process :class:`explorer.app.project.Project` (read-only, shared by sessions)
    project: Any
    #: the app folder (thumbnails resolve inside it), or None
    app_dir: Path | None
    #: URL route of the app (``bokeh serve NAME`` serves it at ``/NAME``)
    route: str | None
    #: the CSV shown, or None (a table handed in)
    csv_path: Path | None
    #: notes about the input shown on the page
    problems: list[str]
    #: rows of the table
    n_rows: int
    #: rows that can be drawn (finite x and y; the drill-down's rows while drilled in)
    valid: np.ndarray
    #: ``valid`` before the drill-down / row filter narrowed it (None: not narrowed)
    _base_valid: np.ndarray | None
    #: the flag filter's rows (None: every row)
    row_filter: np.ndarray | None
    # ---------------------------------------------------------------- this session
    #: this session's table after a metadata join (None: the project's)
    _table: pd.DataFrame | None
    #: extra columns the map can be coloured by (None: not yet computed)
    _extra_columns: list[str] | None
    #: labels per colour column, as strings
    _label_cache: dict[str, np.ndarray]
    #: per-session derived values: (kind, column) -> value (see ``SelectionModel.cached``)
    _derived: dict[tuple[str, str], Any]
    #: views to tell after a change (``subscribe``)
    _subscribers: list[Callable[[frozenset[str]], None]]
    #: the colour column and point size a Reset goes back to
    _initial: dict[str, Any]
    #: the key this session's exports are handed out under
    session_key: str
    #: bumped whenever the person moves on; background results check it
    generation: Any
    #: the served app finds a clicked image's neighbours in the background
    defer_neighbours: bool
    #: the labels (a LabelBook over the journal); None until attach_journal
    book: Any
    #: proposals of 'label similar': DataFrame[row, file, proposed_label, confidence, votes, distance]
    suggestions: pd.DataFrame
    #: (row, neighbour rows, cosine distances) of the one selected image, or None
    neighbours: tuple[int, np.ndarray, np.ndarray] | None
    #: drill-down levels: dicts with rows, xy, ids, parent, column, selection
    drill: list[dict[str, Any]]
    #: the Overview tab's group
    overview_id: str
    #: colour columns this session made (name -> explorer.app.selection.ColourColumn)
    colour_columns: dict[str, Any]
    #: map layouts besides the build's (name -> {"x", "y", "x32", "y32"} per row)
    layouts: dict[str, dict[str, np.ndarray]]
    #: the layout the map shows ("original": the build's x, y)
    layout: str
    #: the column the map is coloured by (and the label filter filters on)
    label_column: str
    point_size: float
    #: the selected rows (sorted)
    selection: np.ndarray
    #: the rows "only change selected" works within
    scope: np.ndarray
    #: the label filter's values (the MultiSelect)
    label_filter: tuple[str, ...]
    only_selected: bool
    #: (level, text) shown on the page
    message: tuple[str, str]

    # ---------------------------------------------------------------- what the parts offer each other
    # Declared here so that neither part uses a name it does not define; the definitions
    # (earlier in AppState's method order) replace these.

    # defined by AppState
    @property
    def table(self) -> pd.DataFrame:
        """The rows (the project's, or this session's after a metadata join)."""
        raise NotImplementedError

    @property
    def keys(self) -> list[str]:
        """Every row's journal key."""
        raise NotImplementedError

    def label_columns(self) -> list[str]:
        """Columns the map can be coloured by."""
        raise NotImplementedError

    # defined by SelectionModel
    def emit(self, *aspects: str) -> None:
        """Tell every view that ``aspects`` changed."""
        raise NotImplementedError

    def say(self, text: str, level: str = "info") -> None:
        """Set the page's message."""
        raise NotImplementedError

    def refuse(self, text: str) -> None:
        """Show ``text`` as an error now."""
        raise NotImplementedError

    def select(self, rows: Iterable[int], mode: str = "replace") -> None:
        """Combine ``rows`` with the selection by ``mode``."""
        raise NotImplementedError

    def labels(self, column: str | None = None) -> np.ndarray:
        """Every row's value (string) in ``column``."""
        raise NotImplementedError

    def invalidate_labels(self, column: str | None = None) -> None:
        """Forget derived label data."""
        raise NotImplementedError

    def muted_value(self, column: str | None = None) -> str:
        """The value of ``column`` that means "no group"."""
        raise NotImplementedError

    def present_labels(self, rows: np.ndarray | None = None) -> tuple[str, ...]:
        """The colour column's values present in ``rows`` (default: the selection)."""
        raise NotImplementedError

    # defined by Curation
    def labelled(self, rows: np.ndarray | None = None) -> pd.DataFrame:
        """The table (or its ``rows``) with its current ``label`` column."""
        raise NotImplementedError

    def neighbours_for(self, rows: np.ndarray, k: int = 12) -> tuple[int, np.ndarray, np.ndarray] | None:
        """The neighbours of a one-image selection (None otherwise)."""
        raise NotImplementedError

    def subcluster_labels(self) -> np.ndarray:
        """Every row's drill-down sub-cluster id ("" outside the drill-down)."""
        raise NotImplementedError


def declared_fields(cls: type) -> set[str]:
    """Names declared (annotated) on ``cls`` and its bases."""
    names: set[str] = set()
    for klass in cls.__mro__:
        names.update(vars(klass).get("__annotations__", {}))
    return names


def declared_operations() -> set[str]:
    """The operations the parts of a session offer each other (declared on :class:`SessionFields`)."""
    return {name for name in vars(SessionFields) if not name.startswith("__")}
