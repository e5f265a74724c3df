"""The app's HTML: every fragment built from data goes through :func:`esc` here.

Text from the collection (file names, labels, CSV column names, metadata values, messages)
is untrusted: a CSV is a file someone hands you. Bokeh renders ``Div.text`` and a
``DataTable`` column's ``title`` as HTML, so both are built here, escaped in one place.
"""

from __future__ import annotations

import html
from typing import Any

__all__ = ["esc", "column_title"]


def esc(text: Any) -> str:
    """``text`` as HTML text (``& < > " '`` escaped), safe inside an element or a quoted attribute."""
    return html.escape(str(text), quote=True)


def column_title(name: Any) -> str:
    """A DataTable header for column ``name``: the grid puts titles into the page as HTML
    (SlickGrid's header), so a column named ``<img onerror=...>`` would run (review N3)."""
    return esc(name)
