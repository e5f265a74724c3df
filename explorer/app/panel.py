"""What a sidebar panel is, and what it may use of its session's view.

A panel is an object with a ``title`` (its tab's name), a ``panel`` (the Bokeh layout shown
in the tab) and ``render(what)`` (called after every state change with the aspects that
changed, see :data:`explorer.app.selection.ASPECTS`); ``opened()``, if it has one, is called
when a person opens its tab. It is built with the session's view as its :class:`PanelHost`
and uses nothing else of it. To add a panel: a module with such a class, and one line in
``AppView._build_panels``.
"""

from __future__ import annotations

from typing import Any, Callable, Protocol

__all__ = ["Panel", "PanelHost"]


class PanelHost(Protocol):
    """The view as a panel sees it."""

    #: the session's :class:`explorer.app.state.AppState`
    state: Any
    #: stylesheets for Divs (the app's CSS)
    css: list[Any]

    @property
    def served(self) -> bool:
        """Whether a ``bokeh serve`` session shows the page (else: tests, scripts)."""

    @property
    def busy(self) -> str:
        """What slow work runs now ("" when none)."""

    @property
    def syncing(self) -> bool:
        """True while the view brings widgets in line with the state (ignore their events)."""

    def thumb(self, row: int) -> str:
        """The URL of a row's thumbnail."""

    def background(self, what: str, compute: Callable[..., Any], finish: Callable[[Any], None], *,
                   drop_if_moved: bool = True, pool: str = "threads", args: tuple = ()) -> None:
        """Run ``compute(*args)`` off the event loop, then ``finish(result)`` on it."""

    def save_export(self, what: str, make_plan: Callable[[], Any], imagefolder: bool = False) -> None:
        """Plan a save now, write it in the background, offer the files to this session."""


class Panel(Protocol):
    title: str
    panel: Any

    def render(self, what: frozenset[str]) -> None: ...
