"""Progress bars (rich, on stderr) for every stage that can take more than a second.

One helper for the whole project: :func:`track` wraps an iterable, :class:`Bar` is a counter
that a loop advances itself (it shows done/total, the rate and the time left).
"""

from __future__ import annotations

import time
from typing import Iterable, Iterator, Sequence, TypeVar

T = TypeVar("T")


class Bar:
    """``bar = Bar(total, "Embedding", unit="img")``; ``bar.update(done)``; ``bar.close()``.

    With ``enabled=False`` (or ``total == 0``) every call does nothing.
    """

    def __init__(self, total: int | None, description: str, *, unit: str = "",
                 enabled: bool = True):
        self.enabled = bool(enabled) and total != 0
        self.t0 = time.perf_counter()
        self.unit = unit
        self.done = 0
        if not self.enabled:
            return
        from rich.console import Console
        from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn,
                                   TimeElapsedColumn, TimeRemainingColumn)

        self.progress = Progress(TextColumn("[bold]{task.description}"), BarColumn(),
                                 MofNCompleteColumn(), TextColumn("{task.fields[rate]}"),
                                 TimeElapsedColumn(), TimeRemainingColumn(),
                                 console=Console(stderr=True), transient=False)
        self.task = self.progress.add_task(description, total=total, rate="")
        self.progress.start()

    def update(self, done: int) -> None:
        self.done = done
        if not self.enabled:
            return
        dt = time.perf_counter() - self.t0
        rate = f"{done / dt:.0f} {self.unit}/s" if dt > 0 and self.unit else ""
        self.progress.update(self.task, completed=done, rate=rate)

    def advance(self, n: int = 1) -> None:
        self.update(self.done + n)

    def close(self) -> None:
        if self.enabled:
            self.progress.stop()
            self.enabled = False

    def __enter__(self) -> "Bar":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def track(items: Sequence[T] | Iterable[T], description: str, enabled: bool = True,
          total: int | None = None) -> Iterator[T]:
    """Iterate ``items`` with a rich progress bar on stderr (nothing when ``enabled`` is false)."""
    if not enabled:
        yield from items
        return
    if total is None:
        try:
            total = len(items)  # type: ignore[arg-type]
        except TypeError:
            total = None
    with Bar(total, description) as bar:
        for item in items:
            yield item
            bar.advance()
