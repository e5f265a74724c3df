"""``explorer dedupe``: keep one image per near-duplicate group, mark or move the others.

::

    explorer dedupe NAME.csv --keep largest|sharpest|earliest|shortest|first
                    [--method duplicate_group|cnn+orb [--threshold T]]
                    [--override GROUP=PATH ...] [--dry-run] [--csv FILE] [--move-to DIR]
    explorer dedupe --undo MANIFEST

The groups are the build's ``duplicate_group`` column, or (``--method cnn+orb``) regrouped
from the build's CNN vectors (``NAME.features.npy``) verified by ORB keypoints of the
images (:func:`explorer.stages.duplicates.group_cnn_orb`: finds edited copies, crops and rotations
that the phash misses). Nothing is ever deleted:

* by default the images not kept get the reserved label ``discard`` in the label journal
  (``NAME.labels.sqlite``: one undoable step, the app shows it, exports leave them out);
* ``--csv FILE`` writes what would be removed (also with ``--dry-run``, which changes nothing);
* ``--move-to DIR`` also moves those files to ``DIR/<their path>`` and writes a manifest
  (``DIR/dedupe-manifest-<time>.json``); ``--undo MANIFEST`` moves every file back and takes
  the marks back (a manifest is written for a marking-only run too, beside the CSV).

Library errors are ``ValueError``/``OSError``; :func:`explorer.cli.main` prints them.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import shutil
from pathlib import Path

MANIFEST_VERSION = 1


def add_parser(sub) -> None:
    """Register ``dedupe`` on the ``explorer`` sub-command parsers (imports nothing heavy:
    the rule is checked by :func:`explorer.curation.dedupe.check_rule` when the command runs)."""
    d = sub.add_parser("dedupe", help="keep one image per near-duplicate group; mark or move "
                       "the others (never deletes)",
                       description="Pick the image to keep in every near-duplicate group of "
                       "NAME.csv (its duplicate_group, or found again with --method cnn+orb) "
                       "by a rule; the others get the label 'discard' (undoable; exports leave "
                       "them out) and, with --move-to, are moved to DIR with a manifest that "
                       "--undo reads to move them back.")
    d.add_argument("csv", nargs="?", metavar="NAME.csv")
    d.add_argument("--keep", default=None, metavar="RULE",
                   help="largest|sharpest|earliest|shortest|first: largest resolution, "
                   "sharpest, earliest EXIF date, shortest path or first in folder order")
    d.add_argument("--method", default="duplicate_group", metavar="METHOD",
                   help="duplicate_group (the build's column, default) or cnn+orb (regroup "
                   "by the build's CNN vectors, verified by ORB keypoints: heavier edits)")
    d.add_argument("--threshold", type=float, default=None, metavar="T",
                   help="cnn+orb: link a pair when (cosine + orb) / 2 >= T (default 0.45)")
    d.add_argument("--override", action="append", default=[], metavar="GROUP=PATH",
                   help="keep PATH in group GROUP whatever the rule says (repeatable)")
    d.add_argument("--images", default=None, metavar="IMAGE_DIR",
                   help="where the images are (default: from NAME.run.json)")
    d.add_argument("--dry-run", action="store_true",
                   help="change nothing; print the summary (and write --csv)")
    d.add_argument("--csv", dest="removal_csv", default=None, metavar="FILE",
                   help="write the images that would be removed to FILE (CSV)")
    d.add_argument("--move-to", default=None, metavar="DIR",
                   help="move the images not kept to DIR/<path> and write a manifest there")
    d.add_argument("--undo", default=None, metavar="MANIFEST",
                   help="move the files of a manifest back and take its marks back")


def _overrides(items: list[str], paths: list[str], group) -> dict[int, int]:
    row_of = {p: r for r, p in enumerate(paths)}
    out: dict[int, int] = {}
    for item in items:
        gid, sep, path = item.partition("=")
        if not sep or not gid.strip().lstrip("-").isdigit():
            raise ValueError(f"--override expects GROUP=PATH, got {item!r}")
        if path not in row_of:
            raise ValueError(f"--override {item!r}: no row with path {path!r}")
        out[int(gid)] = row_of[path]
    return out


def _stamp() -> str:
    return _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%S%fZ")


def _new_file(folder: Path, stem: str) -> Path:
    """A manifest path that does not exist yet (never overwrite one)."""
    path = folder / f"{stem}-{_stamp()}.json"
    k = 2
    while path.exists():
        path = folder / f"{stem}-{_stamp()}-{k}.json"
        k += 1
    return path


def _write_manifest(path: Path, manifest: dict) -> None:
    from explorer.table import write_json

    write_json(path, manifest)


def _image_root(csv: Path, override: str | None) -> Path:
    from explorer.paths import require_image_root

    if override:
        if not Path(override).is_dir():
            raise ValueError(f"--images {override}: not a folder")
        return Path(override)
    return require_image_root(csv)


def _groups(a: argparse.Namespace, build, root: Path):
    """The duplicate group of every row of ``build`` (:class:`explorer.dataset.Build`) by
    ``--method``."""
    import numpy as np

    from explorer.stages import duplicates

    df, csv, vec_path = build.table, build.csv_path, build.features_path
    if a.method not in duplicates.GROUP_METHODS:
        raise ValueError(f"--method must be one of {', '.join(duplicates.GROUP_METHODS)}; "
                         f"got {a.method!r}")
    if a.method == "duplicate_group":
        if a.threshold is not None:
            raise ValueError("--threshold goes with --method cnn+orb")
        return df["duplicate_group"].to_numpy(dtype=np.int64)
    if not vec_path.is_file():
        raise ValueError(f"--method cnn+orb needs the build's vectors {vec_path.name} beside "
                         f"{csv.name} (a build with the CNN, the default method)")
    from explorer.paths import resolver

    labels, info = duplicates.group_cnn_orb(
        np.asarray(build.vectors, np.float32),  # checked: one row per CSV row
        duplicates.orb_reader(build.keys, resolver(root, must_be_image=True)),
        threshold=duplicates.CNN_ORB_THRESHOLD if a.threshold is None else a.threshold)
    print(f"cnn+orb: {info['candidates']} candidate pairs by cosine, {info['links']} linked "
          f"(threshold {info['threshold']})")
    return labels


def cmd_dedupe(a: argparse.Namespace) -> int:
    if a.undo:
        if a.csv or a.keep or a.move_to or a.dry_run:
            raise ValueError("--undo MANIFEST takes no other argument")
        return undo(Path(a.undo))
    if not a.csv or not a.keep:
        raise ValueError("give NAME.csv and --keep RULE (or --undo MANIFEST)")
    return run(a)


def run(a: argparse.Namespace) -> int:
    import numpy as np

    from explorer import dataset, table
    from explorer.curation import dedupe
    from explorer.stages import duplicates
    from explorer.curation.labels import labelled_table
    from explorer.paths import resolver

    dedupe.check_rule(a.keep)
    csv = Path(a.csv)
    build = dataset.open(csv)
    df = build.table
    root = _image_root(csv, a.images)
    paths = build.keys
    group = _groups(a, build, root)
    book = build.label_book()
    current = labelled_table(df, book)["label"].tolist()
    date, sharp = dedupe.member_facts(root, paths, group,
                                      rule="sharpest" if a.keep == "sharpest" else "earliest")
    keep = dedupe.choose_keepers(group, a.keep, width=df["width"], height=df["height"],
                                 sharpness=sharp, date=date, path=paths,
                                 overrides=_overrides(a.override, paths, group))
    removal = dedupe.removal_table(paths, group, keep, a.keep, width=df["width"],
                                   height=df["height"], sharpness=sharp, date=date)
    n_groups = len(dedupe.group_order(group))
    if a.removal_csv:
        table.atomic_write_text(a.removal_csv, removal.to_csv(index=False))
    print(f"{n_groups} duplicate groups; keeping 1 of each by '{a.keep}': "
          f"{len(removal)} images to remove" + (f" (listed in {a.removal_csv})"
                                                 if a.removal_csv else ""))
    if a.dry_run:
        print("dry run: nothing marked or moved")
        return 0
    changes = dedupe.mark_changes(paths, group, keep, current,
                                  df["label"].fillna("").astype(str).tolist())
    rec = book.assign(changes) if changes else None
    manifest = {"version": MANIFEST_VERSION, "csv": str(csv.resolve()),
                "image_root": str(Path(root).resolve()), "rule": a.keep,
                "session": book.journal.session, "seq": rec["seq"] if rec else None,
                "marked": len(changes), "moves": []}
    if a.move_to is None:
        out = _new_file(csv.resolve().parent, table.sidecar(csv, "dedupe").name)
        _write_manifest(out, manifest)
        print(f"marked {len(changes)} images '{dedupe.MARK}' (undo: explorer dedupe --undo {out})")
        return 0
    dest = Path(a.move_to).resolve()
    resolve = resolver(root, must_be_image=True)
    moves = []
    for rel in removal["path"]:
        try:
            src = resolve(rel)
        except ValueError as exc:
            print(f"not moved: {exc}")
            continue
        dst = dest.joinpath(*[p for p in rel.replace("\\", "/").split("/") if p not in ("", ".")])
        if dst.exists():
            raise ValueError(f"{dst} exists already; nothing is overwritten (choose another "
                             "--move-to folder)")
        moves.append([str(src), str(dst)])
    manifest["moves"] = moves
    dest.mkdir(parents=True, exist_ok=True)
    out = _new_file(dest, "dedupe-manifest")
    _write_manifest(out, manifest)  # first, so an interrupted run can still be undone
    for src, dst in moves:
        Path(dst).parent.mkdir(parents=True, exist_ok=True)
        shutil.move(src, dst)
    print(f"marked {len(changes)} images '{dedupe.MARK}', moved {len(moves)} files to {dest} "
          f"(undo: explorer dedupe --undo {out})")
    return 0


def undo(manifest_path: Path) -> int:
    from explorer.curation.journal import journal_for
    from explorer.curation.labels import LabelBook

    try:
        m = json.loads(manifest_path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"cannot read the manifest {manifest_path}: {exc}") from None
    if not isinstance(m, dict) or m.get("version") != MANIFEST_VERSION:
        raise ValueError(f"{manifest_path} is not a dedupe manifest (version {MANIFEST_VERSION})")
    back, missing = 0, []
    for src, dst in m.get("moves", []):
        s, d = Path(src), Path(dst)
        if s.exists():
            continue  # never moved (interrupted run) or already back
        if not d.is_file():
            missing.append(dst)
            continue
        s.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(str(d), str(s))
        back += 1
    unmarked = 0
    if m.get("seq") is not None:
        book = LabelBook.from_journal(journal_for(m["csv"], session=m["session"]))
        steps = book.journal.steps(m["session"])
        if steps and steps[-1][0] == m["seq"]:  # the run's mark is still this session's last step
            rec = book.undo()
            unmarked = sum(len(k) for _, _, k in rec["args"]["changes"]) if rec else 0
    print(f"moved {back} files back, took back {unmarked} marks"
          + (f"; {len(missing)} files were not where the manifest left them: "
             + ", ".join(missing[:5]) if missing else ""))
    return 0 if not missing else 1


__all__ = ["add_parser", "cmd_dedupe", "MANIFEST_VERSION"]
