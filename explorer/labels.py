"""Labels a person gives to images: a plain-Python book with undo/redo and a journal.

:class:`LabelBook` holds the label of every row, keyed by the CSV ``path`` column (stable
across sessions). Every edit is one undoable step and, when the book has a
:class:`~explorer.journal.Journal`, one journal record written (fsync'd) *before* the
in-memory state changes: when a method returns, the change is on disk.

Discard
-------
"Discard" is the reserved label :data:`DISCARD` (``"discard"``), not a separate flag: it
shows in ``counts()``, can be coloured and filtered like any label, ``export_imagefolder``
skips it by default, and undo restores whatever label the image had before.

Journal records
---------------
Each record's ``args`` holds the operation's own arguments and ``changes``: a mapping
``key -> [old, new]`` of exactly what it changed (``""`` = no label). Undo and redo are
records too (``args = {"target": seq, "changes": ...}``), so :meth:`LabelBook.from_journal`
rebuilds the exact state by applying the ``changes`` in order, and rebuilds each session's
undo/redo stacks by the same rules the live book follows.

Several sessions (browser tabs) on one journal
----------------------------------------------
Each session has its own undo/redo stacks; undo only takes back that session's own edits.
Undo restores a key only if it still holds the value the edit set, so it never overwrites a
later change made in another tab (such keys are left alone). Before every edit the book
reads and applies what other sessions appended (under the journal's lock), and
:meth:`LabelBook.sync` does the same for polling.
"""

from __future__ import annotations

import unicodedata
from collections import Counter
from typing import Iterable, Mapping, Sequence

import numpy as np
import pandas as pd

from explorer.journal import Journal

__all__ = [
    "DISCARD",
    "MAX_LABEL_LENGTH",
    "LabelBook",
    "validate_label",
    "propose_labels",
    "labelled_table",
    "nearest",
]

from explorer.neighbours import nearest  # noqa: E402  (re-exported for the app)

#: the reserved label that marks an image as discarded
DISCARD = "discard"
#: the longest label accepted, in characters
MAX_LABEL_LENGTH = 100

#: the operations a book records (undo and redo besides)
EDIT_OPS = ("apply", "assign", "rename", "merge", "discard", "clear")


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


def _validate_keys(keys, known: set | None) -> list[str]:
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


class LabelBook:
    """The label of every image, with undo/redo and an optional journal.

    Parameters
    ----------
    journal:
        Where every edit is recorded (fsync'd before the method returns). ``None``: in memory
        only. The book's session id is ``journal.session``.
    keys:
        The valid keys (the CSV's ``path`` column). Given: edits naming any other key raise
        ``ValueError``. ``None``: any non-empty string is a key.
    initial:
        Labels the images had before this journal began (e.g. the CSV's ``label`` column);
        ``""`` entries mean no label. They are not journaled: the journal records changes
        relative to them.

    Every edit method returns the record it appended (a dict with ``op``, ``args``, and
    ``seq`` when journaled), or ``None`` when it changed nothing (nothing is recorded and the
    undo stack is untouched).
    """

    def __init__(
        self,
        journal: Journal | None = None,
        *,
        keys: Iterable[str] | None = None,
        initial: Mapping[str, str] | None = None,
    ):
        self.journal = journal
        self.session = journal.session if journal is not None else "local"
        self._known = None if keys is None else set(keys)
        self._labels: dict[str, str] = {}
        if initial:
            for k, v in initial.items():
                v = "" if v is None or (isinstance(v, float) and np.isnan(v)) else str(v)
                if v:
                    self._labels[str(k)] = v
        self._undo: dict[str, list[int]] = {}
        self._redo: dict[str, list[int]] = {}
        self._by_seq: dict[int, dict] = {}
        self.seq = 0  # the last journal seq applied to this book
        self._local_seq = 0

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_journal(
        cls,
        journal: Journal,
        *,
        keys: Iterable[str] | None = None,
        initial: Mapping[str, str] | None = None,
    ) -> "LabelBook":
        """A book with every record of ``journal`` replayed (state and undo/redo stacks).

        The book continues as session ``journal.session``: open the journal with the id of an
        earlier session to keep undoing that session's edits.
        """
        book = cls(journal, keys=keys, initial=initial)
        book._apply_records(journal.replay())
        return book

    # ------------------------------------------------------------------ queries
    def label_of(self, key: str) -> str:
        """The label of one image ("" = none)."""
        return self._labels.get(key, "")

    def labels_for(self, keys: Iterable[str]) -> list[str]:
        """The labels of ``keys`` in order ("" = none)."""
        get = self._labels.get
        return [get(k, "") for k in keys]

    def counts(self) -> dict[str, int]:
        """Images per label, most frequent first (ties by label); unlabelled not counted."""
        c = Counter(v for v in self._labels.values() if v)
        return dict(sorted(c.items(), key=lambda kv: (-kv[1], kv[0])))

    def keys_with(self, label: str) -> list[str]:
        """Keys whose label is ``label``."""
        return [k for k, v in self._labels.items() if v == label]

    def as_dict(self) -> dict[str, str]:
        """Every labelled key -> label (unlabelled keys omitted)."""
        return {k: v for k, v in self._labels.items() if v}

    @property
    def can_undo(self) -> bool:
        return bool(self._undo.get(self.session))

    @property
    def can_redo(self) -> bool:
        return bool(self._redo.get(self.session))

    def __len__(self) -> int:
        return sum(1 for v in self._labels.values() if v)

    def __repr__(self) -> str:
        return f"LabelBook({len(self)} labelled, {len(self.counts())} labels, seq={self.seq})"

    # ------------------------------------------------------------------ edits
    def apply(self, keys: Iterable[str], label: str):
        """Give every image in ``keys`` the label ``label``."""
        label = validate_label(label)
        keys = _validate_keys(keys, self._known)
        return self._edit("apply", {"keys": keys, "label": label},
                          lambda: {k: label for k in keys})

    def assign(self, mapping: Mapping[str, str]):
        """Give each key its own label in one undoable step (e.g. accepting suggestions)."""
        if not isinstance(mapping, Mapping):
            raise ValueError(f"assign needs a mapping key -> label, got {type(mapping).__name__}")
        keys = _validate_keys(list(mapping), self._known)
        new = {k: validate_label(mapping[k]) for k in keys}
        return self._edit("assign", {"n": len(new)}, lambda: new)

    def discard(self, keys: Iterable[str]):
        """Mark images as discarded (the label :data:`DISCARD`)."""
        keys = _validate_keys(keys, self._known)
        return self._edit("discard", {"keys": keys}, lambda: {k: DISCARD for k in keys})

    def clear(self, keys: Iterable[str]):
        """Remove the label of every image in ``keys``."""
        keys = _validate_keys(keys, self._known)
        return self._edit("clear", {"keys": keys}, lambda: {k: "" for k in keys})

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
            if old not in self._labels.values():
                raise ValueError(f"no image has the label {old!r}")
            if new in self._labels.values():
                raise ValueError(
                    f"the label {new!r} is already in use; merge {old!r} into {new!r} instead"
                )
            return {k: new for k in self.keys_with(old)}

        return self._edit("rename", {"old": old, "new": new}, compute)

    def merge(self, a: str, b: str, into: str | None = None):
        """Give every image labelled ``a`` or ``b`` the label ``into`` (default: ``b``)."""
        a = validate_label(a)
        b = validate_label(b)
        into = b if into is None else validate_label(into)
        if a == b:
            raise ValueError(f"cannot merge label {a!r} with itself")

        def compute():
            present = set(self._labels.values())
            missing = [x for x in (a, b) if x not in present]
            if len(missing) == 2:
                raise ValueError(f"no image has the label {a!r} or {b!r}")
            return {k: into for k, v in self._labels.items() if v in (a, b)}

        return self._edit("merge", {"a": a, "b": b, "into": into}, compute)

    def undo(self):
        """Take back this session's last edit (or redo). Returns the record, or ``None``."""
        return self._step("undo")

    def redo(self):
        """Re-apply the last edit this session undid. Returns the record, or ``None``."""
        return self._step("redo")

    def sync(self) -> list[str]:
        """Apply what other sessions appended to the journal; return the keys that changed."""
        if self.journal is None:
            return []
        return self._apply_records(self.journal.read_since(self.seq))

    # ------------------------------------------------------------------ internals
    def _edit(self, op: str, args: dict, compute):
        with self._transaction():
            wanted = compute()
            changes = {
                k: [self._labels.get(k, ""), v]
                for k, v in wanted.items()
                if self._labels.get(k, "") != v
            }
            if not changes:
                return None
            return self._commit({"op": op, "args": {**args, "changes": changes}})

    def _step(self, op: str):
        with self._transaction():
            stack = (self._undo if op == "undo" else self._redo).get(self.session)
            if not stack:
                return None
            target = self._by_seq[stack[-1]]
            changes = self._step_changes(op, target)
            return self._commit({"op": op, "args": {"target": target["seq"], "changes": changes}})

    def _step_changes(self, op: str, target: dict) -> dict:
        out = {}
        for k, (old, new) in target["args"]["changes"].items():
            frm, to = (new, old) if op == "undo" else (old, new)
            if self._labels.get(k, "") == frm:  # untouched since: safe to change back
                out[k] = [frm, to]
        return out

    def _transaction(self):
        if self.journal is None:
            import contextlib

            return contextlib.nullcontext()
        return _Catchup(self)

    def _commit(self, record: dict) -> dict:
        if self.journal is not None:
            seq = self.journal.append(record)  # on disk before memory changes
        else:
            self._local_seq = max(self._local_seq, self.seq) + 1
            seq = self._local_seq
        full = {"seq": seq, "session": self.session, **record}
        self._apply_records([full])
        return full

    def _apply_records(self, records: Sequence[dict]) -> list[str]:
        changed: list[str] = []
        for rec in records:
            seq = rec.get("seq", 0)
            if seq <= self.seq:
                continue
            op = rec.get("op")
            args = rec.get("args") or {}
            changes = args.get("changes") or {}
            session = rec.get("session", "")
            if op in EDIT_OPS or op in ("undo", "redo"):
                for k, pair in changes.items():
                    try:
                        self._labels[k] = str(pair[1])
                    except (TypeError, IndexError):
                        continue
                    changed.append(k)
            if op in EDIT_OPS:
                self._by_seq[seq] = rec
                self._undo.setdefault(session, []).append(seq)
                self._redo[session] = []
            elif op in ("undo", "redo"):
                src, dst = (self._undo, self._redo) if op == "undo" else (self._redo, self._undo)
                stack = src.get(session, [])
                target = args.get("target")
                if stack and stack[-1] == target:
                    stack.pop()
                    dst.setdefault(session, []).append(target)
            # unknown ops (written by a newer version) are skipped, never fatal
            self.seq = seq
        return list(dict.fromkeys(changed))


class _Catchup:
    """Hold the journal lock and apply other sessions' records before an edit."""

    def __init__(self, book: LabelBook):
        self.book = book
        self._cm = book.journal.locked()

    def __enter__(self):
        self._cm.__enter__()
        try:
            self.book._apply_records(self.book.journal.read_since(self.book.seq))
        except BaseException:
            self._cm.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc):
        return self._cm.__exit__(*exc)


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
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise ValueError(f"k must be an integer >= 1, got {k!r}")
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
    touched = book._labels
    keys = out[key_col].astype(str)
    mapped = keys.map(touched)
    out["label"] = mapped.where(mapped.notna(), base).astype(str)
    return out
