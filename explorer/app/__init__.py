"""The explorer Bokeh server app: ``bokeh serve NAME --args NAME.csv``.

``app_files/main.py`` (copied to ``NAME/main.py`` by ``explorer build``) calls
:func:`build_document`; ``app_files/app_hooks.py`` adds our Tornado handlers (exports for
their own session, thumbnails by row: :mod:`explorer.app.downloads`) once per server.

* :mod:`explorer.app.project` - everything read-only about a CSV, once per server process
* :mod:`explorer.app.state` - one session (:class:`AppState`): selection, filters, view state
  (split into :mod:`~explorer.app.selection`, :mod:`~explorer.app.curation`;
  paths: :mod:`~explorer.app.files`; exports: :mod:`~explorer.app.downloads`)
* :mod:`explorer.app.work` - the process-wide pools that keep slow work off the event loop
* :mod:`explorer.app.session` - every attribute of a session, declared once
* :mod:`explorer.app.view` - the page: the map, the Explore tab, grid and table, layout and
  wiring; the other tabs are panels (:mod:`explorer.app.panel`: label_panel, overview_panel,
  metadata_panel, finder)
* :mod:`explorer.app.mapimage` - big maps as one server-rendered image; lasso, box and
  click resolved on the server (pure numpy parts: :mod:`explorer.app.density`)
* :mod:`explorer.app.html` - every HTML and JavaScript fragment, escaping in one place
* :mod:`explorer.app.serving` - the Host check (403 to any host but this computer)

Importing this package does not import Bokeh.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

from explorer.app.state import AppState, ExportError, SaveResult, check_export_name

__all__ = [
    "AppState",
    "ExportError",
    "SaveResult",
    "build_document",
    "check_export_name",
    "find_csv",
]


def find_csv(argv: Sequence[str], app_dir: str | os.PathLike) -> Path:
    """The CSV an app session shows.

    ``argv[0]`` if given (relative to the current directory); else
    ``<app dir>/../<app dir name>.csv``; else the only ``.csv`` beside the app folder.
    Raises ``FileNotFoundError`` with a message saying what was tried.
    """
    app_dir = Path(app_dir).resolve()
    args = [a for a in argv if a.strip()]
    if args:
        csv = Path(args[0]).expanduser()
        csv = csv if csv.is_absolute() else Path.cwd() / csv
        if not csv.is_file():
            raise FileNotFoundError(f"CSV not found: {csv} (from --args {args[0]!r})")
        return csv.resolve()
    default = app_dir.parent / f"{app_dir.name}.csv"
    if default.is_file():
        return default
    beside = sorted(app_dir.parent.glob("*.csv"))
    if len(beside) == 1:
        return beside[0]
    how = f"bokeh serve {app_dir.name} --args {app_dir.name}.csv"
    if beside:
        raise FileNotFoundError(
            f"no {default.name} beside the app and {len(beside)} other CSVs there; "
            f"name one: {how}"
        )
    raise FileNotFoundError(f"no CSV given and {default} does not exist; start with: {how}")


def build_document(doc: Any, app_dir: str | os.PathLike, argv: Sequence[str] = ()) -> Any:
    """Fill a Bokeh ``Document`` with the explorer for the CSV named by ``argv``.

    Returns the session's :class:`explorer.app.view.AppView`, or ``None`` when the CSV
    cannot be shown (then the page shows the reason instead of the plot).
    """
    from explorer.app.view import build_document as _build

    return _build(doc, app_dir, argv)
