"""``explorer labels``: add labels from a CSV, ask what to label next, propagate, accept.

    explorer labels add NAME.csv --from FILE.csv        # columns path,label; one journal step
    explorer labels next NAME.csv [--n 20] [--json]     # the images to label next, with reasons
    explorer labels propagate NAME.csv [--out FILE.csv] [--json] [--sure 0.97]
    explorer labels accept NAME.csv [--sure 0.97]       # accept every "sure" prediction (one step)
    explorer labels remap NAME.csv                      # a map that learns the labels, written
                                                        # beside the build: NAME.layout-labels.npz

Labels go to the build's journal (``NAME.labels.sqlite``), as in the app; the model is fitted
on the build's stored vectors (``NAME.features.npy``) by :mod:`explorer.curation.active`. Registered
by :func:`register` from :mod:`explorer.cli`; errors are ``ValueError``/``OSError`` (the CLI
turns them into messages and exit codes).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

__all__ = ["register", "cmd_labels", "Labelling", "open_labelling"]


def register(sub) -> None:
    """Add the ``labels`` subcommand to the CLI's subparsers."""
    p = sub.add_parser("labels", help="label a few images, let the tool label the rest",
                       description="Add labels from a CSV, list the images worth labelling "
                       "next, predict a label and a calibrated confidence for every image, "
                       "accept the sure predictions. Labels go to NAME.labels.sqlite (undo in "
                       "the app).")
    lsub = p.add_subparsers(dest="labels_command", metavar="ACTION", required=True)
    a = lsub.add_parser("add", help="labels from a CSV (columns path,label) in one step")
    a.add_argument("csv", metavar="NAME.csv")
    a.add_argument("--from", dest="source", required=True, metavar="FILE.csv")
    n = lsub.add_parser("next", help="the images whose labels would teach the model most")
    n.add_argument("csv", metavar="NAME.csv")
    n.add_argument("--n", type=int, default=20, help="how many (default 20)")
    n.add_argument("--json", action="store_true", help="a JSON list of {path, reason, row}")
    g = lsub.add_parser("propagate", help="predicted label + confidence for every image")
    g.add_argument("csv", metavar="NAME.csv")
    g.add_argument("--out", default=None, metavar="FILE.csv",
                   help="write every row (path, label, label_source, predicted_label, "
                   "confidence, sure)")
    g.add_argument("--json", action="store_true",
                   help="print {estimated_accuracy, ..., rows: [...]} instead of a summary")
    c = lsub.add_parser("accept", help="accept every sure prediction as a label (one step)")
    c.add_argument("csv", metavar="NAME.csv")
    for q in (g, c):
        q.add_argument("--sure", type=float, default=None, metavar="P",
                       help="what 'sure' means: the share of the sure predictions expected "
                       "right, 0.5-0.999 (default 0.97; the calibration is off by up to about "
                       "0.01, docs/labelling.md)")
    r = lsub.add_parser("remap", help="a map computed with the labels (semi-supervised UMAP) "
                        "and its clusters, beside the original map",
                        description="Write NAME.layout-labels.npz: a semi-supervised layout "
                        "(UMAP with the labels as target, unlabelled images as unknown) of the "
                        "stored vectors and clusters of it. The original map (NAME.csv, "
                        "NAME.layout.npz) is not touched; the app offers a switch between the two.")
    r.add_argument("csv", metavar="NAME.csv")


class Labelling:
    """Labelling over one build (:class:`explorer.dataset.Build`, opened once): its label
    book as ``session`` writes it, and the model's rows."""

    def __init__(self, build, session: str | None = None):
        from explorer import dataset

        self.build = dataset.open(build)
        self.csv = self.build.csv_path
        self.paths = self.build.keys
        self.book = self.build.label_book(session)
        self._X = None
        self._graph: Any = "unset"
        self._smoothed = None

    @property
    def graph(self):
        """The neighbour graph propagation smooths over (:func:`explorer.curation.active.neighbours`
        of :attr:`X`; ``None`` above its size limit), kept in ``NAME.labelling-graph.npy``."""
        from explorer.curation import active

        if isinstance(self._graph, str):
            self._graph = self._kept("labelling-graph.npy",
                                     lambda g: active.check_graph(g, len(self.paths)),
                                     lambda: active.neighbours(self.X))
        return self._graph

    @property
    def smoothed(self):
        """:attr:`X` smoothed over :attr:`graph` (:func:`explorer.curation.active.smooth_rows`;
        ``None`` without a graph), kept in ``NAME.labelling-smoothed.npy`` beside the graph
        (3 s at 200,000 rows, on every call before)."""
        from explorer.curation import active

        if self._smoothed is None and self.graph is not None:
            self._smoothed = self._kept("labelling-smoothed.npy", self._smoothed_match,
                                        lambda: active.smooth_rows(self.X, self.graph))
        return self._smoothed

    @property
    def X(self):
        """The model's rows (:func:`explorer.curation.active.features` of ``NAME.features.npy``),
        kept in ``NAME.labelling.npy``."""
        if self._X is None:
            self._X = self._kept("labelling.npy", self._rows_match, self._model_rows)
        return self._X

    def _rows_match(self, X):
        if len(X) != len(self.paths):
            raise ValueError(f"{len(X)} rows for a table of {len(self.paths)}")
        return X

    def _smoothed_match(self, Z):
        import numpy as np

        if Z.shape != self.X.shape or Z.dtype != np.float32 or not np.isfinite(Z).all():
            raise ValueError(f"smoothed rows {Z.dtype} {Z.shape} for rows {self.X.shape}")
        return Z

    def _model_rows(self):
        from explorer.curation import active
        from explorer.curation.search import load_features

        V = load_features(self.build)
        if len(V) != len(self.paths):
            raise ValueError(f"{self.csv.name}: the stored vectors have {len(V)} rows, "
                             f"the table {len(self.paths)}; build again")
        return active.features(V)

    def _kept(self, kind: str, check, make):
        """An array kept beside the build in ``NAME.<kind>``: read when it is newer than the
        features file and ``check`` returns it (else ``ValueError``); otherwise ``make()``, and
        written for the next call (unless ``None``, or the build folder is read-only)."""
        import io

        import numpy as np

        from explorer.table import atomic_write_bytes

        cache = self.build.file(kind)
        try:
            if cache.stat().st_mtime_ns >= self.build.features_path.stat().st_mtime_ns:
                return check(np.load(cache, allow_pickle=False))
        except (OSError, ValueError):
            pass
        arr = make()
        if arr is not None:
            buf = io.BytesIO()
            np.save(buf, arr)
            try:
                atomic_write_bytes(cache, buf.getvalue())
            except OSError:
                pass  # a read-only build folder: made again next time
        return arr

    def labels(self) -> list[str]:
        return self.book.labels_for(self.paths)

    def next(self, n: int = 20) -> list[dict[str, Any]]:
        from explorer.curation import active

        # the graph is made (or read) only once the picks need the model
        return active.next_rows(self.paths, self.labels(), self.X, n, graph=lambda: self.graph,
                                smoothed=lambda: self.smoothed)

    def propagate(self, precision: float | None = None):
        """:func:`explorer.curation.active.label_table` of the build (``precision``: what
        "sure" means, default :data:`~explorer.curation.active.SURE_PRECISION`)."""
        from explorer.curation import active

        return active.label_table(self.paths, self.labels(), self.book.sources(self.paths),
                                  self.X, graph=self.graph, smoothed=self.smoothed,
                                  precision=active.SURE_PRECISION if precision is None else precision)

    def accept_sure(self, precision: float | None = None):
        """Accept every sure prediction (one journal step); returns (record or None, info)."""
        df, info = self.propagate(precision)
        sure = df[df["sure"]]
        rec = None
        if len(sure):
            rec = self.book.accept(dict(zip(sure["path"], sure["predicted_label"])),
                                   threshold=info["threshold"],
                                   sure_precision=info["sure_precision"])
        return rec, info


def open_labelling(csv, session: str | None = None) -> Labelling:
    return Labelling(Path(csv), session=session)


def read_label_csv(path: Path) -> dict[str, str]:
    """``{path: label}`` from a CSV with columns ``path`` and ``label`` (empty labels skipped)."""
    import pandas as pd

    try:
        df = pd.read_csv(path, dtype=str, keep_default_na=False)
    except (OSError, ValueError) as exc:
        raise ValueError(f"cannot read {path}: {exc}") from None
    missing = [c for c in ("path", "label") if c not in df.columns]
    if missing:
        raise ValueError(f"{path} needs the columns path,label; it lacks {', '.join(missing)}")
    out = {}
    for p, lab in zip(df["path"], df["label"]):
        if lab.strip():
            if p in out and out[p] != lab.strip():
                raise ValueError(f"{path}: {p!r} has two labels ({out[p]!r}, {lab.strip()!r})")
            out[p] = lab.strip()
    return out


def _summary(info: dict) -> str:
    def pct(v):
        return "-" if v is None else f"{v:.1%}"

    if info["estimated_accuracy"] is None:
        return (f"{info['labels']} labels by a person, {len(info['classes'])} classes: nothing "
                "is predicted before two labels exist (`explorer labels next` shows where to "
                "start)")
    return (f"{info['labels']} labels by a person, {info['accepted']} accepted, "
            f"{len(info['classes'])} classes; estimated accuracy {pct(info['estimated_accuracy'])} "
            f"(cross-validated on the labels: {pct(info['cv_accuracy'])}); "
            f"{info['sure']} sure predictions (expected {info['sure_precision']:.1%} right"
            + (f"; confidence >= {info['threshold']})" if info["threshold"] is not None else ")"))


def cmd_labels(a: argparse.Namespace) -> int:
    b = open_labelling(a.csv)
    if a.labels_command == "add":
        mapping = read_label_csv(Path(a.source))
        known = set(b.paths)
        unknown = [p for p in mapping if p not in known]
        if unknown:
            raise ValueError(f"{len(unknown)} path(s) of {a.source} are not in {a.csv}, e.g. "
                             f"{unknown[0]!r}")
        rec = b.book.assign(mapping) if mapping else None
        print(f"added {len(mapping)} labels from {a.source}"
              + ("" if rec else " (nothing changed)") + f"; {len(b.book)} labelled now")
        return 0
    if a.labels_command == "next":
        if a.n < 1:
            raise ValueError(f"--n must be >= 1, got {a.n}")
        picks = b.next(a.n)
        if a.json:
            print(json.dumps(picks, indent=2))
        else:
            for p in picks:
                print(f"{p['path']}\t{p['reason']}")
        return 0
    if a.labels_command == "propagate":
        df, info = b.propagate(a.sure)
        if a.out:
            from explorer.table import atomic_write_text

            atomic_write_text(a.out, df.to_csv(index=False))
        if a.json:
            rows = df.astype({"confidence": object}).where(df.notna(), None).to_dict("records")
            print(json.dumps({**info, "rows": rows}, indent=1))
        else:
            print(_summary(info) + (f"; wrote {a.out}" if a.out else ""))
        return 0
    if a.labels_command == "remap":
        from explorer.curation import remap

        res = remap.remap_build(b.csv, b.build.features_path, b.labels(), b.paths,
                                model_rows=b.X)
        n_cl = len(set(res.cluster.tolist()) - {-1})
        extra = f" and {res.predicted:,} sure predictions" if res.predicted else ""
        print(f"re-mapped {len(res.xy):,} images with {res.labelled:,} labelled{extra}: {n_cl} "
              f"cluster(s); wrote {remap.sidecar_path(b.csv).name} (the original map is unchanged)"
              + "".join(f"\nnote: {n}" for n in res.notes))
        return 0
    rec, info = b.accept_sure(a.sure)
    n = rec["args"]["n"] if rec else 0
    print(f"accepted {n} sure predictions (confidence >= {info['threshold']}); undo in the app")
    return 0


def with_confident_predictions(df, csv, min_confidence: float):
    """``df`` (the build's table with its labels) where unlabelled rows take a predicted
    label of at least ``min_confidence`` (``explorer export --by label --min-confidence``)."""
    from explorer.curation.exports import with_predictions

    if not 0 <= min_confidence <= 1:
        raise ValueError(f"--min-confidence must be in [0, 1]; got {min_confidence}")
    pred, _ = open_labelling(csv).propagate()
    return with_predictions(df, pred, min_confidence)
