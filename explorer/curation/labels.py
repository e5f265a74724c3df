"""Labels a person gives to images: undo/redo per session over a shared, journaled state.

:class:`LabelBook` is one session's view of the labels, keyed by the CSV ``path`` column
(stable across sessions). Every edit is one undoable step and, when the book has a
:class:`~explorer.curation.journal.Journal`, one committed SQLite transaction *before* the in-memory
state changes: when a method returns, the change is on disk.

Memory
------
The labels themselves live in a :class:`LabelState`, one per journal file and process,
shared by every book (browser session) on that journal and caught up with
``WHERE seq > ?``; it holds only the keys the journal touched. A book holds its undo/redo
stacks (record numbers) and references to what the caller shares: the set of valid keys
(``keys``: pass a ``frozenset``/``dict`` the process owns, it is not copied) and the CSV's
own labels (``initial``: a mapping, not copied).

Discard
-------
"Discard" is the reserved label :data:`DISCARD` (``"discard"``), not a separate flag: it
shows in ``counts()``, can be coloured and filtered like any label, ``export_imagefolder``
skips it by default, and undo restores whatever label the image had before.

Journal records
---------------
Each record's ``args`` holds the operation's own arguments and ``changes``: a list of
groups ``[old, new, [keys]]`` of exactly what it changed (``""`` = no label), each key once.
Undo and redo are records too (``args = {"target": seq, "changes": ...}``), so each
session's undo/redo stacks are rebuilt from the journal by the rules the live book follows.

Accepted predictions
--------------------
:meth:`LabelBook.accept` records op ``"accept"`` (one step, undoable like any edit): its
labels have the source ``"accepted"`` (:meth:`LabelBook.sources`) until a person changes
them; every other edit is a person's (``"person"``). An edit that overwrites accepted labels
lists those keys in ``args["was_accepted"]``, so its undo gives them their source back.

Several sessions (browser tabs, processes) on one journal
---------------------------------------------------------
Each session has its own undo/redo stacks; undo only takes back that session's own edits.
Undo restores a key only if it still holds the value the edit set, so it never overwrites a
later change made in another tab (such keys are left alone; when that is every key, undo
records nothing and returns ``None``). Before every edit the book catches up with what other
sessions committed (inside the write transaction), and :meth:`LabelBook.sync` does the same
for polling.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import os
import threading
import unicodedata
import weakref
from collections import Counter, deque
from collections.abc import Set as AbstractSet
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import numpy as np

from explorer._checks import check_int
import pandas as pd

from explorer.curation.journal import Journal, change_groups

__all__ = [
    "DISCARD",
    "MAX_LABEL_LENGTH",
    "LabelBook",
    "LabelState",
    "validate_label",
    "propose_labels",
    "labelled_table",
    "nearest",
    "ACCEPT_OP",
    "LABEL_SOURCES",
]

from explorer.stages.neighbours import nearest  # noqa: E402  (re-exported for the app)

#: the reserved label that marks an image as discarded
DISCARD = "discard"
#: the longest label accepted, in characters
MAX_LABEL_LENGTH = 100

#: the operations a book records (undo and redo besides)
EDIT_OPS = ("apply", "assign", "rename", "merge", "discard", "clear", "accept")
#: the op of accepted predictions: their labels have the source "accepted", not "person"
ACCEPT_OP = "accept"
#: where a row's label comes from (``propagate`` adds "predicted" for rows with none)
LABEL_SOURCES = ("person", "accepted", "predicted")

#: how many changed keys a LabelState remembers for sync(); older gaps are read from disk
SYNC_LOG_KEYS = 200_000


def validate_label(label) -> str:
    """Return ``label`` stripped of surrounding white space, or raise a clear ``ValueError``.

    Refused: non-strings, empty or white-space-only labels, labels longer than
    :data:`MAX_LABEL_LENGTH` characters and labels with control characters (tabs, new lines,
    NUL, bidi overrides and other invisible format characters).
    """
    if not isinstance(label, str):
        raise ValueError(f"a label must be text, got {type(label).__name__} {label!r}")
    s = unicodedata.normalize("NFC", label.strip())
    if not s:
        raise ValueError("a label cannot be empty")
    if len(s) > MAX_LABEL_LENGTH:
        raise ValueError(
            f"a label can have at most {MAX_LABEL_LENGTH} characters; "
            f"this one has {len(s)}: {s[:30]!r}..."
        )
    bad = sorted({c for c in s if unicodedata.category(c) in ("Cc", "Cf", "Zl", "Zp")})
    if bad:
        names = ", ".join(f"U+{ord(c):04X}" for c in bad)
        raise ValueError(f"a label cannot contain control characters ({names}): {s!r}")
    return s


def _validated(mapping: Mapping[str, Any], keys: list[str], clear: bool = False) -> dict[str, str]:
    """``{key: validate_label(mapping[key])}`` for ``keys``, each distinct label checked once
    (an edit of 100,000 images has a handful of labels); ``clear``: ``""`` stays ``""``."""
    done: dict[str, str] = {"": ""} if clear else {}
    out = {}
    for k in keys:
        v = mapping[k]
        s = done.get(v) if isinstance(v, str) else None
        if s is None:
            s = validate_label(v)
            done[v] = s
        out[k] = s
    return out


def _validate_keys(keys, known) -> list[str]:
    if isinstance(keys, str):
        keys = [keys]
    try:
        out = list(dict.fromkeys(keys))  # unique, order kept
    except TypeError:
        raise ValueError(f"keys must be an iterable of strings, got {keys!r}") from None
    for k in out:
        if not isinstance(k, str) or not k:
            raise ValueError(f"every key must be a non-empty string (a CSV path), got {k!r}")
    if known is not None:
        unknown = [k for k in out if k not in known]
        if unknown:
            more = f" and {len(unknown) - 3} more" if len(unknown) > 3 else ""
            raise ValueError(f"unknown image key(s): {unknown[:3]!r}{more}")
    return out


def _key_set(keys):
    """The caller's set of keys, shared (not copied) when it already is a set or mapping."""
    if keys is None or isinstance(keys, (AbstractSet, Mapping)):
        return keys
    return frozenset(keys)


def _norm(v) -> str:
    if type(v) is str:
        return v
    if v is None or (isinstance(v, float) and np.isnan(v)):
        return ""
    return str(v)


# ---------------------------------------------------------------------- the in-memory journal
class _MemoryJournal:
    """What a book without a journal records into (this process only, nothing on disk)."""

    path = None

    def __init__(self):
        self.session = "local"
        self._records: list[dict] = []
        self._lock = threading.RLock()

    @contextlib.contextmanager
    def locked(self):
        with self._lock:
            yield self

    def append(self, record: Mapping[str, Any]) -> int:
        with self._lock:
            seq = len(self._records) + 1
            ts = _dt.datetime.now(_dt.timezone.utc).isoformat()
            self._records.append({"seq": seq, "ts": ts, "session": self.session, **record})
            return seq

    def read_since(self, seq: int) -> list[dict]:
        return list(self._records[seq:])

    def record(self, seq: int) -> dict | None:
        return self._records[seq - 1] if 0 < seq <= len(self._records) else None

    @property
    def last_seq(self) -> int:
        return len(self._records)

    def steps(self, session: str, after: int = 0) -> list[tuple]:
        out = []
        for r in self._records[after:]:
            if r["session"] == session:
                target = (r.get("args") or {}).get("target")
                out.append((r["seq"], r["op"], target if isinstance(target, int) else None))
        return out

    def snapshot(self) -> tuple[int, dict[str, str]]:
        labels: dict[str, str] = {}
        for r in self._records:
            for _, new, keys in change_groups((r.get("args") or {}).get("changes")):
                labels.update(dict.fromkeys(keys, new))
        return len(self._records), labels


def _track_accepted(accepted: set[str], record: Mapping, groups, lookup) -> None:
    """Update ``accepted`` (keys labelled by accepted predictions) by one record.

    An accept (or its redo) marks the keys it labelled; any other edit unmarks the keys it
    changed, and its undo marks again the keys it had taken from accepted predictions
    (``args["was_accepted"]``); the undo of an accept unmarks.
    """
    op = record.get("op")
    args = record.get("args") or {}
    target_op, target_args = None, {}
    if op in ("undo", "redo") and isinstance(args.get("target"), int):
        target = lookup(args["target"]) or {}
        target_op, target_args = target.get("op"), target.get("args") or {}
    if op == ACCEPT_OP or (op == "redo" and target_op == ACCEPT_OP):
        for _, new, keys in groups:
            (accepted.update if new else accepted.difference_update)(keys)
        return
    for _, _, keys in groups:
        accepted.difference_update(keys)
    if op == "undo" and target_op != ACCEPT_OP:
        was = target_args.get("was_accepted") or []
        if was:
            changed = {k for _, new, keys in groups if new for k in keys}
            accepted.update(k for k in was if k in changed)


# ---------------------------------------------------------------------- the shared read model
class LabelState:
    """The labels of one journal, shared (per process) by every :class:`LabelBook` on it.

    Holds ``{key: label}`` for the keys the journal touched (``""`` = cleared), the ``seq`` it
    reflects, and the keys recent records changed (for :meth:`changed_since`). Thread-safe:
    hold :attr:`lock` while iterating; :meth:`refresh` reads only records newer than
    :attr:`seq`. Get the one for a journal with :meth:`shared`; ``LabelState()`` is a
    private, in-memory one (a book without a journal).
    """

    _registry: "weakref.WeakValueDictionary[tuple, LabelState]" = weakref.WeakValueDictionary()
    _registry_lock = threading.Lock()

    def __init__(self, journal: Journal | None = None):
        self.journal = journal if journal is not None else _MemoryJournal()
        self.lock = threading.RLock()
        self.seq = 0
        self._labels: dict[str, str] = {}
        #: changes whenever the labels may have (cached summaries compare it)
        self.version = 0
        self._loaded = False
        self._log: deque[tuple[int, list[list[str]], int]] = deque()  # (seq, key lists, n)
        self._log_keys = 0
        self._log_floor = 0  # changed_since(s) is answered from memory for s >= this
        self._accepted: set[str] | None = None  # keys labelled by accepted predictions

    @classmethod
    def shared(cls, journal: Journal) -> "LabelState":
        """The state of ``journal``'s file in this process (created on first use, kept while
        any book or caller holds it)."""
        key = (str(journal.path.absolute()), os.getpid())
        with cls._registry_lock:
            state = cls._registry.get(key)
            if state is None:
                state = cls(Journal(journal.path, session="label-state"))
                cls._registry[key] = state
            return state

    def __repr__(self) -> str:
        where = getattr(self.journal, "path", None)
        return f"LabelState({str(where) if where else 'in memory'}, seq={self.seq}, {len(self._labels)} keys)"

    def refresh(self) -> int:
        """Catch up with records committed since :attr:`seq`; return the new ``seq``."""
        with self.lock:
            if not self._loaded:
                self.seq, self._labels = self.journal.snapshot()
                self.version += 1
                self._log_floor = self.seq
                self._loaded = True
                return self.seq
            records = self.journal.read_since(self.seq)
            if not records and self.seq and self.journal.last_seq < self.seq:
                # the file was deleted or replaced (labels reset by hand): start again
                self._loaded = False
                self._log.clear()
                self._log_keys = 0
                self._accepted = None
                return self.refresh()
            for rec in records:
                args = rec.get("args")
                try:
                    groups = change_groups(args.get("changes")) if isinstance(args, dict) else []
                except ValueError:
                    groups = []  # not a label record (or a newer format): nothing to apply
                self.apply(rec["seq"], groups, rec)
            return self.seq

    def apply(self, seq: int, groups: Sequence[Sequence], record: Mapping | None = None) -> None:
        """Take the ``new`` label of every group (the caller committed record ``seq``);
        ``record`` (its op and args) keeps :meth:`accepted` up to date."""
        with self.lock:
            if self._accepted is not None:
                if record is None:
                    self._accepted = None  # recomputed from the journal when next asked
                else:
                    _track_accepted(self._accepted, record, groups, self.journal.record)
            changed = [keys for _, _, keys in groups]
            n = 0
            for _, new, keys in groups:
                self._labels.update(dict.fromkeys(keys, new))
                n += len(keys)
            self.version += 1
            self.seq = max(self.seq, seq)
            self._log.append((seq, changed, n))
            self._log_keys += n
            while self._log and self._log_keys > SYNC_LOG_KEYS:
                s, _, k = self._log.popleft()
                self._log_floor, self._log_keys = s, self._log_keys - k

    def accepted(self) -> set[str]:
        """The keys whose current label is an accepted prediction (op :data:`ACCEPT_OP`, not
        since changed by a person); computed from the journal once, then kept up to date.
        Hold :attr:`lock` while using the set."""
        with self.lock:
            if self._accepted is None:
                acc: set[str] = set()
                for rec in self.journal.read_since(0):
                    if rec["seq"] > self.seq:
                        break
                    try:
                        groups = change_groups((rec.get("args") or {}).get("changes"))
                    except (ValueError, AttributeError):
                        continue
                    _track_accepted(acc, rec, groups, self.journal.record)
                self._accepted = acc
            return self._accepted

    def get(self, key: str) -> str | None:
        """The journal's label of ``key`` (``""`` = cleared), ``None`` if never touched."""
        return self._labels.get(key)

    def changed_since(self, seq: int) -> list[str]:
        """Keys changed by records after ``seq`` (as far as this state has caught up)."""
        with self.lock:
            if seq >= self.seq:
                return []
            if seq >= self._log_floor:
                lists = [keys for s, ls, _ in self._log if s > seq for keys in ls]
                if len(lists) == 1:
                    return list(lists[0])  # one record: its keys are unique already
                out: dict[str, None] = {}
                for keys in lists:
                    out.update(dict.fromkeys(keys))
                return list(out)
            top = self.seq
        out = {}
        for rec in self.journal.read_since(seq):
            if rec["seq"] > top:
                break
            args = rec.get("args")
            with contextlib.suppress(ValueError, AttributeError):
                for _, _, keys in change_groups(args.get("changes")):
                    out.update(dict.fromkeys(keys))
        return list(out)


# ---------------------------------------------------------------------- one session's book
class LabelBook:
    """One session's labels: edits with undo/redo over a shared :class:`LabelState`.

    Parameters
    ----------
    journal:
        Where every edit is recorded (committed before the method returns). ``None``: in
        memory only. The book's session id is ``journal.session``.
    keys:
        The valid keys (the CSV's ``path`` column). Edits naming any other key raise
        ``ValueError``, and counts, label names and ``keys_with`` ignore keys not in it (a
        journal may hold keys of images no longer in the CSV). Pass a ``frozenset`` (or
        ``dict``) the process shares between sessions: a set or mapping is used as is, any
        other iterable is copied into a new ``frozenset``. ``None``: any non-empty string.
    initial:
        Labels the images had before this journal began (the CSV's ``label`` column, ideally
        with the unlabelled rows left out); ``""``/``None``/NaN = no label. Used as is (not
        copied) and never journaled: the journal records changes relative to it.
    state:
        The shared read model; default :meth:`LabelState.shared` of ``journal`` (or a
        private in-memory one when there is no journal).

    Every edit method returns the record it appended (a dict with ``seq``, ``session``,
    ``op``, ``args``), or ``None`` when it changed nothing (nothing is recorded).
    """

    def __init__(
        self,
        journal: Journal | None = None,
        *,
        keys: Iterable[str] | None = None,
        initial: Mapping[str, str] | None = None,
        state: LabelState | None = None,
    ):
        self.journal = journal
        self.session = journal.session if journal is not None else "local"
        if state is None:
            state = LabelState.shared(journal) if journal is not None else LabelState()
        elif journal is not None and getattr(state.journal, "path", None) != journal.path:
            raise ValueError(f"state {state!r} is not the state of {journal!r}")
        self._state = state
        self._writer = journal if journal is not None else state.journal
        self._known = _key_set(keys)
        if initial is not None and not isinstance(initial, Mapping):
            initial = dict(initial)
        self._initial = initial or None
        self._undo: list[int] = []
        self._redo: list[int] = []
        self._steps_seq = 0
        self._counts: tuple[int, dict[str, int]] | None = None  # (state version, counts)
        with state.lock:
            state.refresh()
            self._catch_up_steps()
            self.seq = state.seq  # the last journal seq this book has shown

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_journal(
        cls,
        journal: Journal,
        *,
        keys: Iterable[str] | None = None,
        initial: Mapping[str, str] | None = None,
        state: LabelState | None = None,
    ) -> "LabelBook":
        """A book on ``journal``: the current labels and this session's undo/redo stacks.

        The book continues as session ``journal.session``: open the journal with the id of an
        earlier session to keep undoing that session's edits.
        """
        return cls(journal, keys=keys, initial=initial, state=state)

    # ------------------------------------------------------------------ queries
    def label_of(self, key: str) -> str:
        """The label of one image ("" = none)."""
        v = self._state._labels.get(key)
        if v is None:
            return _norm(self._initial.get(key)) if self._initial else ""
        return v

    def labels_for(self, keys: Iterable[str]) -> list[str]:
        """The labels of ``keys`` in order ("" = none)."""
        get = self._state._labels.get
        init = self._initial
        if not init:
            return [get(k) or "" for k in keys]
        out = []
        for k in keys:
            v = get(k)
            out.append(_norm(init.get(k)) if v is None else v)
        return out

    def touched_labels(self, keys: Iterable[str]) -> list[str | None]:
        """The book's own label of each key: the journal's (``""`` = cleared) or else a
        non-empty ``initial`` one; ``None`` where the book has none."""
        get = self._state._labels.get
        init = self._initial
        if not init:
            return [get(k) for k in keys]
        out = []
        for k in keys:
            v = get(k)
            if v is None:
                v = _norm(init.get(k)) or None
            out.append(v)
        return out

    def _items(self) -> Iterator[tuple[str, str]]:
        """(key, label) of every labelled key in the table (hold the state's lock)."""
        known = self._known
        labels = self._state._labels
        for k, v in labels.items():
            if v and (known is None or k in known):
                yield k, v
        if self._initial:
            for k, v in self._initial.items():
                if k not in labels:
                    v = _norm(v)
                    if v and (known is None or k in known):
                        yield k, v

    def counts(self) -> dict[str, int]:
        """Images per label, most frequent first (ties by label); unlabelled not counted.
        Counted again only after the labels changed (the app asks on every render: 0.1-0.2 s
        at 200,000 images)."""
        with self._state.lock:
            version = self._state.version
            if self._counts is None or self._counts[0] != version:
                c = Counter(v for _, v in self._items())
                self._counts = (version, dict(sorted(c.items(), key=lambda kv: (-kv[1], kv[0]))))
            return dict(self._counts[1])

    def keys_with(self, label: str) -> list[str]:
        """Keys whose label is ``label``."""
        with self._state.lock:
            return [k for k, v in self._items() if v == label]

    def as_dict(self) -> dict[str, str]:
        """Every labelled key -> label (unlabelled keys omitted)."""
        with self._state.lock:
            return dict(self._items())

    @property
    def can_undo(self) -> bool:
        return bool(self._undo)

    @property
    def can_redo(self) -> bool:
        return bool(self._redo)

    def __len__(self) -> int:
        with self._state.lock:
            return sum(1 for _ in self._items())

    def __repr__(self) -> str:
        return f"LabelBook({len(self)} labelled, {len(self.counts())} labels, seq={self.seq})"

    # ------------------------------------------------------------------ edits
    def apply(self, keys: Iterable[str], label: str):
        """Give every image in ``keys`` the label ``label``."""
        label = validate_label(label)
        keys = _validate_keys(keys, self._known)
        return self._edit("apply", {"label": label}, lambda: dict.fromkeys(keys, label))

    def assign(self, mapping: Mapping[str, str]):
        """Give each key its own label in one undoable step (e.g. accepting suggestions, or
        keeping one image per duplicate group); ``""`` clears a key's label."""
        if not isinstance(mapping, Mapping):
            raise ValueError(f"assign needs a mapping key -> label, got {type(mapping).__name__}")
        keys = _validate_keys(list(mapping), self._known)
        new = _validated(mapping, keys, clear=True)
        return self._edit("assign", {"n": len(new)}, lambda: new)

    def accept(self, mapping: Mapping[str, str], **info):
        """Accept predictions: give each key its predicted label in one undoable step, recorded
        as op :data:`ACCEPT_OP` so the labels keep the source ``"accepted"`` (told apart from a
        person's). ``info`` (e.g. ``threshold=0.93``) is recorded with it. Only keys without a
        label at the time of writing change: a prediction made before a person (or another
        session) labelled the image never replaces that label; ``None`` when none is left."""
        if not isinstance(mapping, Mapping):
            raise ValueError(f"accept needs a mapping key -> label, got {type(mapping).__name__}")
        bad = sorted(set(info) & {"changes", "target", "n", "was_accepted"})
        if bad:
            raise ValueError(f"accept: reserved record field(s) {bad}")
        keys = _validate_keys(list(mapping), self._known)
        new = _validated(mapping, keys)
        args = {"n": 0, **info}

        def unlabelled():  # under the write lock, caught up with the journal
            todo = {k: v for (k, v), now in zip(new.items(), self.labels_for(new)) if not now}
            args["n"] = len(todo)
            return todo

        return self._edit(ACCEPT_OP, args, unlabelled)

    def sources(self, keys: Iterable[str]) -> list[str]:
        """Where each key's label comes from: ``"person"``, ``"accepted"`` (an accepted
        prediction not since changed by a person) or ``""`` (no label)."""
        keys = list(keys)
        with self._state.lock:
            acc = self._state.accepted()
            return ["" if not v else ("accepted" if k in acc else "person")
                    for k, v in zip(keys, self.labels_for(keys))]

    def discard(self, keys: Iterable[str]):
        """Mark images as discarded (the label :data:`DISCARD`)."""
        keys = _validate_keys(keys, self._known)
        return self._edit("discard", {}, lambda: dict.fromkeys(keys, DISCARD))

    def clear(self, keys: Iterable[str]):
        """Remove the label of every image in ``keys``."""
        keys = _validate_keys(keys, self._known)
        return self._edit("clear", {}, lambda: dict.fromkeys(keys, ""))

    def rename(self, old: str, new: str):
        """Rename label ``old`` to ``new`` on every image that has it.

        Raises ``ValueError`` if no image has ``old`` or if ``new`` is already in use (use
        :meth:`merge` to combine two labels).
        """
        old = validate_label(old)
        new = validate_label(new)
        if old == new:
            raise ValueError(f"cannot rename label {old!r} to itself")

        def compute():
            in_use = self.counts()
            if old not in in_use:
                raise ValueError(f"no image has the label {old!r}")
            if new in in_use:
                raise ValueError(
                    f"the label {new!r} is already in use; merge {old!r} into {new!r} instead"
                )
            return dict.fromkeys(self.keys_with(old), new)

        return self._edit("rename", {"old": old, "new": new}, compute)

    def merge(self, a: str, b: str, into: str | None = None):
        """Give every image labelled ``a`` or ``b`` the label ``into`` (default: ``b``)."""
        a = validate_label(a)
        b = validate_label(b)
        into = b if into is None else validate_label(into)
        if a == b:
            raise ValueError(f"cannot merge label {a!r} with itself")

        def compute():
            with self._state.lock:
                hit = [k for k, v in self._items() if v in (a, b)]
            if not hit:
                raise ValueError(f"no image has the label {a!r} or {b!r}")
            return dict.fromkeys(hit, into)

        return self._edit("merge", {"a": a, "b": b, "into": into}, compute)

    def undo(self):
        """Take back this session's last edit (or redo). Returns the record, or ``None`` when
        there is nothing to undo (also when other sessions have since changed every image it
        touched: then nothing is recorded and that edit leaves the undo stack)."""
        return self._step("undo")

    def redo(self):
        """Re-apply the last edit this session undid. Returns the record, or ``None``."""
        return self._step("redo")

    def sync(self) -> list[str]:
        """Catch up with what other sessions committed; return the keys that changed (those in
        the table) since this book last looked."""
        if self.journal is None:
            return []
        st = self._state
        with st.lock:
            st.refresh()
            if st.seq < self.seq:
                # the journal file was deleted or replaced: anything may have changed
                self._undo, self._redo, self._steps_seq = [], [], 0
                self._catch_up_steps()
                self.seq = st.seq
                return list(self._known if self._known is not None else st._labels)
            if st.seq > self._steps_seq:
                self._catch_up_steps()
            changed = st.changed_since(self.seq)
            self.seq = st.seq
        known = self._known
        return changed if known is None else [k for k in changed if k in known]

    # ------------------------------------------------------------------ internals
    def _catch_up_steps(self) -> None:
        """Rebuild this session's stacks from its records not seen yet (any book, any process)."""
        for seq, op, target in self._writer.steps(self.session, self._steps_seq):
            self._push_step(seq, op, target)

    def _push_step(self, seq: int, op: str, target: int | None) -> None:
        if op in EDIT_OPS:
            self._undo.append(seq)
            self._redo.clear()
        elif op in ("undo", "redo"):
            src, dst = (self._undo, self._redo) if op == "undo" else (self._redo, self._undo)
            if src and src[-1] == target:
                dst.append(src.pop())
        # unknown ops (written by a newer version) are skipped, never fatal
        self._steps_seq = max(self._steps_seq, seq)

    @contextlib.contextmanager
    def _writing(self) -> Iterator[Callable[[dict], dict]]:
        """One write transaction: catch up, let the caller compute and append, commit, and
        only then change the shared state and this book's stacks."""
        st = self._state
        with st.lock:
            done: list[dict] = []

            def commit(record: dict) -> dict:
                seq = self._writer.append(record)  # committed when the block below exits
                full = {"seq": seq, "session": self.session, **record}
                done.append(full)
                return full

            with self._writer.locked():
                st.refresh()
                self._catch_up_steps()
                yield commit
            for full in done:  # on disk now
                st.apply(full["seq"], full["args"]["changes"], full)
                self._push_step(full["seq"], full["op"], full["args"].get("target"))
            self.seq = st.seq

    def _edit(self, op: str, args: dict, compute):
        with self._writing() as commit:
            wanted = compute()
            groups: dict[tuple[str, str], list[str]] = {}
            get, init = self._state._labels.get, self._initial
            for k, v in wanted.items():
                old = get(k)
                if old is None:
                    old = _norm(init.get(k)) if init else ""
                if old != v:
                    key = (old, v)
                    group = groups.get(key)
                    if group is None:
                        groups[key] = group = []
                    group.append(k)
            if not groups:
                return None
            changes = [[o, n, ks] for (o, n), ks in groups.items()]
            extra = {}
            if op != ACCEPT_OP:
                acc = self._state.accepted()
                if acc:
                    was = [k for ks in groups.values() for k in ks if k in acc]
                    if was:  # so that undoing this edit gives them back their source
                        extra["was_accepted"] = was
            return commit({"op": op, "args": {**args, **extra, "changes": changes}})

    def _step(self, op: str):
        with self._writing() as commit:
            stack = self._undo if op == "undo" else self._redo
            if not stack:
                return None
            target = stack[-1]
            rec = self._writer.record(target) or {}
            try:
                groups = change_groups((rec.get("args") or {}).get("changes"))
            except ValueError:
                groups = []
            out: dict[tuple[str, str], list[str]] = {}
            for old, new, keys in groups:
                frm, to = (new, old) if op == "undo" else (old, new)
                ks = [k for k, now in zip(keys, self.labels_for(keys)) if now == frm]  # untouched
                if ks:
                    out.setdefault((frm, to), []).extend(ks)
            if not out:
                # other sessions changed every key since (review L6): nothing to take back,
                # nothing recorded; the step leaves the stack so the next one is reachable
                stack.pop()
                return None
            changes = [[f, t, ks] for (f, t), ks in out.items()]
            return commit({"op": op, "args": {"target": target, "changes": changes}})


# ---------------------------------------------------------------------- propagation
def propose_labels(
    embeddings,
    labels: Sequence[str],
    *,
    k: int = 10,
    min_agreement: float = 0.6,
    batch_size: int = 4096,
) -> pd.DataFrame:
    """Suggest labels for unlabelled images from their nearest labelled neighbours.

    ``labels`` has one entry per row of ``embeddings``; ``""`` (or ``None``/NaN) = unlabelled.
    For each unlabelled image, its ``k`` nearest labelled images (cosine distance) vote; the
    winner is proposed when its share of the votes is at least ``min_agreement``.

    Returns a DataFrame with one row per proposal, most confident first: ``index`` (row of
    ``embeddings``), ``proposed_label``, ``confidence`` (share of the k votes for it, in
    (0, 1]), ``votes`` and ``distance`` (mean cosine distance to the neighbours that voted
    for it). Nothing is applied: the caller shows these for a person to accept or reject.
    """
    from sklearn.neighbors import NearestNeighbors

    X = np.asarray(embeddings)
    if X.ndim != 2:
        raise ValueError(f"embeddings must be a 2-D array, got shape {X.shape}")
    labels = ["" if (v is None or (isinstance(v, float) and np.isnan(v))) else str(v)
              for v in labels]
    if len(labels) != X.shape[0]:
        raise ValueError(f"got {len(labels)} labels for {X.shape[0]} embeddings")
    k = check_int("k", k, 1)
    if not (isinstance(min_agreement, (int, float)) and 0 < min_agreement <= 1):
        raise ValueError(f"min_agreement must be in (0, 1], got {min_agreement!r}")
    cols = {"index": np.int64, "proposed_label": object, "confidence": float,
            "votes": np.int64, "distance": float}
    empty = pd.DataFrame({c: pd.Series(dtype=t) for c, t in cols.items()})
    lab = np.asarray(labels, dtype=object)
    have = np.flatnonzero(lab != "")
    need = np.flatnonzero(lab == "")
    if len(have) == 0 or len(need) == 0:
        return empty
    if not np.all(np.isfinite(X)):
        raise ValueError("embeddings contain NaN or infinite values")
    kk = min(int(k), len(have))
    nn = NearestNeighbors(n_neighbors=kk, metric="cosine", algorithm="brute").fit(X[have])
    classes, codes = np.unique(lab[have], return_inverse=True)
    out = []
    for start in range(0, len(need), batch_size):
        rows = need[start : start + batch_size]
        dist, nbr = nn.kneighbors(X[rows])
        votes_by = codes[nbr]  # (b, kk) class codes
        counts = np.zeros((len(rows), len(classes)), dtype=np.int64)
        np.add.at(counts, (np.repeat(np.arange(len(rows)), kk), votes_by.ravel()), 1)
        # winner: most votes, ties broken by the smaller summed distance
        dsum = np.zeros_like(counts, dtype=float)
        np.add.at(dsum, (np.repeat(np.arange(len(rows)), kk), votes_by.ravel()), dist.ravel())
        score = counts - dsum / (kk * 4.0 + 1.0)  # distance only separates equal counts
        win = score.argmax(axis=1)
        nvotes = counts[np.arange(len(rows)), win]
        conf = nvotes / float(kk)
        keep = conf >= min_agreement - 1e-12
        for r, w, v, c, ds in zip(rows[keep], win[keep], nvotes[keep], conf[keep],
                                  dsum[np.arange(len(rows)), win][keep]):
            out.append((int(r), classes[w], float(c), int(v), float(ds / v)))
    if not out:
        return empty
    df = pd.DataFrame(out, columns=list(cols))
    df = df.sort_values(["confidence", "distance", "index"], ascending=[False, True, True],
                        kind="mergesort").reset_index(drop=True)
    return df.astype({"index": np.int64, "votes": np.int64})


# ---------------------------------------------------------------------- export
def labelled_table(df: pd.DataFrame, book: LabelBook, *, key_col: str = "path") -> pd.DataFrame:
    """A copy of ``df`` with its ``label`` column filled from ``book``.

    Keys the book has touched (labelled, relabelled or cleared) take the book's value;
    other rows keep the label they had in ``df`` (``""`` if ``df`` has no ``label``
    column). ``df`` itself is not modified; write the result to a new file.
    """
    if key_col not in df.columns:
        raise ValueError(f"the table has no {key_col!r} column to match labels by")
    out = df.copy()
    base = (out["label"].fillna("").astype(str) if "label" in out.columns
            else pd.Series([""] * len(out), index=out.index))
    keys = out[key_col].astype(str)
    mapped = pd.Series(book.touched_labels(keys.tolist()), index=out.index, dtype=object)
    out["label"] = mapped.where(mapped.notna(), base).astype(str)
    return out
