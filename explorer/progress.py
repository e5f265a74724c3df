"""Progress as structured events, and the one way to show them.

Work that takes more than a second reports :class:`Event` s: ``(stage, done, total)``, plus
what runs inside the stage and, on a stage's last event, how long it took. Who listens:

* :func:`explorer.build` (``on_progress=callback``) listens with :func:`reporting`; the
  command line renders the events with :class:`RichDisplay` (one rich display for the whole
  build), the service stores them in the job row;
* the embedding child process forwards its events to the build over a queue
  (:func:`forward_to`);
* with nobody listening, :class:`Bar`, :func:`track` and :func:`spinner` draw their own rich
  display on stderr (exports, the threshold plot, notebooks).
"""

from __future__ import annotations

import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, Sequence, TypeVar

T = TypeVar("T")

#: a running counter reports at most this often (and always its last count)
MIN_INTERVAL = 0.1


@dataclass(frozen=True)
class Event:
    """``stage``: the build stage (``embed``, ``map``, ...; a bar's description outside a
    build). ``done`` of ``total`` (``None``: unknown, a spinner). ``what``: the step inside
    the stage ("Embedding"). ``seconds``: set on the stage's last event only."""

    stage: str
    done: int
    total: int | None
    what: str = ""
    seconds: float | None = None

    @property
    def finished(self) -> bool:
        return self.seconds is not None

    @property
    def fraction(self) -> float | None:
        if self.finished:
            return 1.0
        if not self.total:
            return None
        return max(0.0, min(1.0, self.done / self.total))


Listener = Callable[[Event], None]
_listeners: list[Listener] = []
_stages: list[str] = []
_lock = threading.Lock()


def listening() -> bool:
    """True when someone receives events (then counters draw nothing themselves)."""
    return bool(_listeners)


def emit(event: Event) -> None:
    """Send ``event`` to every listener."""
    for cb in list(_listeners):
        cb(event)


def current_stage() -> str:
    return _stages[-1] if _stages else ""


def add_listener(cb: Listener) -> None:
    with _lock:
        _listeners.append(cb)


def remove_listener(cb: Listener) -> None:
    with _lock:
        if cb in _listeners:
            _listeners.remove(cb)


@contextmanager
def reporting(*callbacks: Listener | None) -> Iterator[None]:
    """Within the block, every event goes to ``callbacks`` (``None`` s are skipped)."""
    cbs = [cb for cb in callbacks if cb is not None]
    for cb in cbs:
        add_listener(cb)
    try:
        yield
    finally:
        for cb in cbs:
            remove_listener(cb)


class _Timer:
    seconds: float = 0.0


@contextmanager
def stage(name: str) -> Iterator[_Timer]:
    """A build stage: events inside carry ``name``; a start event, and a last event with the
    seconds it took (``timer.seconds`` after the block)."""
    timer = _Timer()
    t0 = time.perf_counter()
    _stages.append(name)
    emit(Event(name, 0, None))
    try:
        yield timer
    finally:
        _stages.pop()
    timer.seconds = time.perf_counter() - t0
    emit(Event(name, 1, 1, seconds=timer.seconds))


class _QueueListener:
    """In a child process: events go to the parent over a multiprocessing queue."""

    def __init__(self, queue):
        self.queue = queue

    def __call__(self, event: Event) -> None:
        self.queue.put((event.done, event.total, event.what))


def forward_to(queue) -> None:
    """In a child process (an executor's initializer): send every event of this process to
    ``queue``; the parent re-emits them under its stage with :func:`relay`."""
    add_listener(_QueueListener(queue))


@contextmanager
def relay(queue) -> Iterator[None]:
    """In the parent: a thread re-emits what a child :func:`forward_to` s ``queue`` under the
    current stage until the block ends (put the child's last events first: shut it down)."""
    name = current_stage()

    def pump() -> None:
        while True:
            item = queue.get()
            if item is None:
                return
            done, total, what = item
            emit(Event(name, done, total, what))

    t = threading.Thread(target=pump, name="explorer-progress-relay", daemon=True)
    t.start()
    try:
        yield
    finally:
        queue.put(None)
        t.join(timeout=10)


# --------------------------------------------------------------------------- counters
class Bar:
    """``bar = Bar(total, "Embedding", unit="img")``; ``bar.update(done)``; ``bar.close()``.

    With listeners, it sends events (at most every :data:`MIN_INTERVAL` s, and its last
    count); else it draws a rich bar on stderr. With ``enabled=False`` (or ``total == 0``)
    every call does nothing.
    """

    def __init__(self, total: int | None, description: str, *, unit: str = "",
                 enabled: bool = True, transient: bool = False):
        self.enabled = bool(enabled) and total != 0
        self.t0 = time.perf_counter()
        self.unit = unit
        self.done = 0
        self.total = total
        self.description = description
        self.events = self.enabled and listening()
        self._sent = 0.0
        self._sent_done = -1
        if not self.enabled:
            return
        if self.events:
            self._send()
            return
        from rich.console import Console
        from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn,
                                   TimeElapsedColumn, TimeRemainingColumn)

        self.progress = Progress(TextColumn("[bold]{task.description}"), BarColumn(),
                                 MofNCompleteColumn(), TextColumn("{task.fields[rate]}"),
                                 TimeElapsedColumn(), TimeRemainingColumn(),
                                 console=Console(stderr=True), transient=transient)
        self.task = self.progress.add_task(description, total=total, rate="")
        self.progress.start()

    def _send(self) -> None:
        self._sent = time.perf_counter()
        self._sent_done = self.done
        emit(Event(current_stage() or self.description, self.done, self.total,
                   self.description))

    def update(self, done: int) -> None:
        self.done = done
        if not self.enabled:
            return
        if self.events:
            last = self.total is not None and done >= self.total
            if last or time.perf_counter() - self._sent >= MIN_INTERVAL:
                self._send()
            return
        dt = time.perf_counter() - self.t0
        rate = f"{done / dt:.0f} {self.unit}/s" if dt > 0 and self.unit else ""
        self.progress.update(self.task, completed=done, rate=rate)

    def advance(self, n: int = 1) -> None:
        self.update(self.done + n)

    def close(self) -> None:
        if self.enabled:
            if self.events:
                if self.done != self._sent_done:
                    self._send()
            else:
                self.progress.stop()
            self.enabled = False

    def __enter__(self) -> "Bar":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def track(items: Sequence[T] | Iterable[T], description: str, enabled: bool = True,
          total: int | None = None) -> Iterator[T]:
    """Iterate ``items`` with a :class:`Bar` (nothing when ``enabled`` is false)."""
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


@contextmanager
def spinner(enabled: bool, text: str) -> Iterator[None]:
    """Work without a count: one event (total unknown) with listeners, else a transient
    rich spinner on stderr."""
    if not enabled:
        yield
        return
    if listening():
        emit(Event(current_stage() or text, 0, None, text))
        yield
        return
    from rich.console import Console
    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    with Progress(SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(),
                  console=Console(stderr=True), transient=True) as bar:
        bar.add_task(text, total=None)
        yield


# --------------------------------------------------------------------------- display
class RichDisplay:
    """Renders a build's events as one rich display on ``console`` (stderr): a line per
    stage with its current step, count and time; a finished stage keeps its last step and
    count, and its time stops."""

    def __init__(self, console=None):
        from rich.console import Console

        self.console = console if console is not None else Console(stderr=True)
        self._progress = None
        self._tasks: dict[str, int] = {}
        self._lock = threading.Lock()

    def _start(self):
        from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

        self._progress = Progress(TextColumn("[bold]{task.fields[stage]}[/bold]"),
                                  TextColumn("{task.description}"), BarColumn(),
                                  TextColumn("{task.fields[count]}"), TimeElapsedColumn(),
                                  console=self.console, transient=False)
        self._progress.start()

    def __call__(self, ev: Event) -> None:
        with self._lock:
            if self._progress is None:
                self._start()
            p = self._progress
            task = self._tasks.get(ev.stage)
            if task is None:
                task = self._tasks[ev.stage] = p.add_task("", total=None, stage=ev.stage,
                                                          count="")
            if ev.finished:  # the bar full; the last step and count stay, the time stops
                total = p.tasks[p.task_ids.index(task)].total or 1
                p.update(task, total=total, completed=total)
            elif ev.total:
                p.update(task, total=ev.total, completed=ev.done, description=ev.what,
                         count=f"{ev.done:,}/{ev.total:,}")
            elif ev.what:
                p.update(task, description=ev.what)

    def close(self) -> None:
        with self._lock:
            if self._progress is not None:
                self._progress.stop()
                self._progress = None
