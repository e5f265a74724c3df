"""Every attribute of one session's state, declared in one place.

:class:`explorer.app.state.AppState` is assembled from two parts, the selection
(:class:`explorer.app.selection.SelectionModel`) and the curation
(:class:`explorer.app.curation.Curation`); both read and write the attributes declared
here, and only these (``tests/test_app_state.py`` holds a live session to this list).
``AppState.__init__`` gives each its first value.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import numpy as np
import pandas as pd

__all__ = ["SessionFields", "declared_fields"]


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


def declared_fields(cls: type) -> set[str]:
    """Names declared (annotated) on ``cls`` and its bases."""
    names: set[str] = set()
    for klass in cls.__mro__:
        names.update(vars(klass).get("__annotations__", {}))
    return names
