"""One reader of a build: ``explorer.open("NAME.csv")`` -> :class:`Build`.

A build's outputs are files beside ``NAME.csv``::

    NAME.csv             the table (one row per image)
    NAME.run.json        the run record (parameters, model, model key, timings)
    NAME.features.npy    one embedding row per CSV row (float16)
    NAME.concepts.npz    top ImageNet classes per row
    NAME.layout.npz      per row: content hash, map xy, cluster space, cluster ...
    NAME.store/          the vector store (vectors per content hash and model key)
    NAME.labels.sqlite   the app's label journal

:class:`Build` finds each of them once, from the CSV's path, and reads each only when asked
(the table, the run record and the layout once per object; the features memory-mapped).
Consumers take a ``Build`` instead of a CSV path and stop re-deriving file names:
:func:`explorer.curation.search.search`, the app's per-process project, ``explorer export``,
the labelling and dedupe commands and the service's results, labels, exports and search routes
do (``build = explorer.open(csv)``, then ``build.table``, ``build.run``, ``build.vectors``,
``build.label_book(session)`` ...).
"""

from __future__ import annotations

import json
import os
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np

from explorer import table


class BuildFileError(ValueError):
    """A file of the build is missing or unreadable (names the file and what to do)."""


class Build:
    """One build, opened from its CSV. Nothing is read until asked for. Raises
    :class:`BuildFileError` (a ``ValueError``) when the CSV is not there.

    - ``csv_path``; ``file(kind)``: the path of ``NAME.<kind>`` beside it.
    - ``table``: the CSV as a DataFrame (:func:`explorer.table.read_table`), read once.
    - ``run``: the run record (``{}`` when missing or unreadable), read once; ``model``
      its model entry (name, model key, precision, runtime ...).
    - ``vectors``: the stored embeddings (``NAME.features.npy``, memory-mapped, one row per
      CSV row); :class:`BuildFileError` when missing or out of step with the CSV.
    - ``concepts()``: ``(idx, p)`` top ImageNet classes per row, or ``None`` when the build
      has none yet (:func:`explorer.curation.search.concepts_for` computes and keeps them).
    - ``layout``: the arrays of ``NAME.layout.npz`` as a dict, or ``None``.
    - ``run_path``, ``features_path``, ``concepts_path``, ``layout_path``, ``labels_path``,
      ``store_path``, ``errors_path``, ``hierarchy_path``: where each file lives (they may not exist).
    - ``keys``, ``initial_labels()``, ``journal(session)``, ``label_book(session)``,
      ``labelled_table(session)``: the labels as the app sees them (the CSV's own, then the
      journal's edits).
    - ``embed(paths)``: embed image files exactly as this build did (same model key:
      :func:`explorer.stages.embed.embed_as_built`), e.g. a query image.
    """

    def __init__(self, csv_path: str | os.PathLike):
        path = Path(csv_path)
        if path.suffix.lower() != ".csv":
            raise ValueError(f"a build is opened from its NAME.csv, got {str(path)!r}")
        if not path.is_file():
            raise BuildFileError(f"no build at {str(path)!r}: the CSV is not there "
                                 "(run explorer build first)")
        self.csv_path = path

    def __repr__(self) -> str:
        return f"Build({str(self.csv_path)!r})"

    def file(self, kind: str) -> Path:
        """``NAME.<kind>`` beside the CSV (``run.json``, ``features.npy`` ...)."""
        return table.sidecar(self.csv_path, kind)

    # ------------------------------------------------------------------ files
    @cached_property
    def table(self):
        return table.read_table(self.csv_path)

    @property
    def n_rows(self) -> int:
        return len(self.table)

    @cached_property
    def run(self) -> dict[str, Any]:
        try:
            rec = json.loads(self.run_path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return {}
        return rec if isinstance(rec, dict) else {}

    @property
    def model(self) -> dict[str, Any]:
        """The run record's model entry (``{}`` for builds without one)."""
        m = self.run.get("model")
        return m if isinstance(m, dict) else {}

    @property
    def parameters(self) -> dict[str, Any]:
        p = self.run.get("parameters")
        return p if isinstance(p, dict) else {}

    @cached_property
    def vectors(self) -> np.ndarray:
        path = self.features_path
        try:
            arr = np.load(path, allow_pickle=False, mmap_mode="r")
        except (OSError, ValueError) as exc:
            raise BuildFileError(f"cannot read the build's features {str(path)!r}: {exc}"
                                 ) from exc
        if arr.ndim != 2 or len(arr) != self.n_rows:
            raise BuildFileError(f"{path.name} has {len(arr)} rows but the CSV {self.n_rows}; "
                                 "rebuild to bring them in step")
        return arr

    def concepts(self) -> tuple[np.ndarray, np.ndarray] | None:
        path = self.concepts_path
        if not path.is_file():
            return None
        from explorer.stages import concepts as C

        return C.load_concepts(path)

    @cached_property
    def layout(self) -> dict[str, np.ndarray] | None:
        path = self.layout_path
        try:
            with np.load(path, allow_pickle=False) as f:
                return {k: f[k] for k in f.files}
        except (OSError, ValueError):
            return None

    @property
    def run_path(self) -> Path:
        return self.file("run.json")

    @property
    def features_path(self) -> Path:
        return self.file("features.npy")

    @property
    def concepts_path(self) -> Path:
        return self.file("concepts.npz")

    @property
    def layout_path(self) -> Path:
        return self.file("layout.npz")

    @property
    def labels_path(self) -> Path:
        return self.file("labels.sqlite")

    @property
    def store_path(self) -> Path:
        return self.file("store")

    @property
    def errors_path(self) -> Path:
        return self.file("errors.csv")

    @property
    def hierarchy_path(self) -> Path:
        return self.file("hierarchy.npz")

    # ------------------------------------------------------------------ labels
    @cached_property
    def keys(self) -> list[str]:
        """Each row's key (its ``path``), in CSV order: what labels are recorded against."""
        df = self.table
        if "path" not in df.columns:
            raise BuildFileError(f"{self.csv_path.name} has no path column to key labels by")
        return df["path"].fillna("").astype(str).tolist()

    def initial_labels(self) -> dict[str, str]:
        """The CSV's own non-empty labels by key (the journal records changes to them)."""
        if "label" not in self.table.columns:
            return {}
        return {k: v for k, v in zip(self.keys, self.table["label"].fillna("").astype(str))
                if v}

    def journal(self, session: str | None = None):
        """The label journal (``NAME.labels.sqlite``), written as ``session``."""
        from explorer.curation.journal import journal_for

        return journal_for(self.csv_path, session=session)

    def label_book(self, session: str | None = None):
        """The labels as the app sees them: the CSV's own, then the journal's edits (a
        :class:`explorer.curation.labels.LabelBook` that records edits as ``session``)."""
        from explorer.curation.labels import LabelBook

        return LabelBook.from_journal(self.journal(session), keys=frozenset(self.keys),
                                      initial=self.initial_labels())

    def labelled_table(self, session: str | None = None):
        """A copy of the table with its ``label`` column as the label book has it (the table
        itself when no journal exists)."""
        from explorer.curation.labels import labelled_table

        if not self.journal(session).exists():
            return self.table
        return labelled_table(self.table, self.label_book(session))

    # ------------------------------------------------------------------ embedding
    def embed(self, paths, **kw):
        """Embed image files the way this build did (its model key); an
        :class:`explorer.stages.embed.EmbedResult`. ``ValueError`` when the model changed since."""
        from explorer.stages.embed import embed_as_built

        return embed_as_built(paths, self.run, **kw)


def open(csv_path: str | os.PathLike | Build) -> Build:  # noqa: A001 - explorer.open
    """The build whose table is ``csv_path`` (a :class:`Build` passes through)."""
    return csv_path if isinstance(csv_path, Build) else Build(csv_path)
