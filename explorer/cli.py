"""The ``explorer`` console script: build, threshold, export.

Heavy imports (torch, timm, umap, hdbscan) happen inside the commands that need them, so
``explorer --help`` answers at once. Library code raises ``ValueError`` subclasses; only this
module turns them into messages and exit codes.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from explorer import cli_dedupe, cli_labels

EXIT_USAGE = 2


def _fraction(text: str) -> float:
    t = text.strip()
    try:
        f = float(t[:-1]) / 100 if t.endswith("%") else float(t)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a share like 10% or 0.1, got {text!r}") from None
    if not 0 < f <= 1:
        raise argparse.ArgumentTypeError(f"the share must be in (0, 100%], got {text!r}")
    return f


def make_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="explorer",
        description="bulk image explorer: map, group, clean and export a folder of images.",
    )
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    for add in PARSERS:
        add(sub)
    return p


def add_build(sub) -> None:
    """``explorer build``: its options come from :mod:`explorer.options`."""
    from explorer import options

    b = sub.add_parser("build", help="folder of images -> CSV + app folder for `bokeh serve`",
                       description="Embed, map and cluster every image in SOURCE; write "
                       "NAME.csv and the app folder NAME/ (serve it with "
                       "`bokeh serve NAME --args NAME.csv`). Every option: docs/options.md.")
    b.add_argument("image_dir", metavar="SOURCE", help="a folder of images, a .zip/.tar/"
                   ".tar.gz of them, a CSV or Parquet table with a path column, a .txt list of "
                   "http(s) URLs, or an fsspec URL such as s3://bucket/prefix (docs/inputs.md)")
    b.add_argument("--app", metavar="NAME", help="app folder to create or update (thumbnails "
                   "go to NAME/static/thumbs); the CSV is NAME.csv beside it")
    b.add_argument("--out", metavar="CSV", help="write the CSV here instead of NAME.csv")
    options.add_arguments(b)


def add_threshold(sub) -> None:
    t = sub.add_parser("threshold", help="plot similar pairs against the threshold (HTML)",
                       description="Compute similarities on a sample of IMAGE_DIR and write an "
                       "interactive Bokeh plot: threshold against the number of similar pairs.")
    t.add_argument("image_dir", metavar="IMAGE_DIR")
    t.add_argument("--method", default="phash", choices=["phash", "ssim", "orb", "minhash", "tm"])
    t.add_argument("--sample", type=int, default=500, help="images to sample (default 500)")
    t.add_argument("--out", default=None, help="HTML file (default threshold-METHOD.html)")
    t.add_argument("--seed", type=int, default=42)
    t.add_argument("-q", "--quiet", action="store_true")


def add_export(sub) -> None:
    e = sub.add_parser("export", help="write cluster/label folders, samples or an ImageFolder",
                       description="Write DIR/cluster_0/, DIR/cluster_1/, ... (or one folder "
                       "per label) and DIR/outliers/ from a CSV written by `explorer build`. "
                       "Only image files inside the image folder are exported; the others are "
                       "listed in the summary.")
    e.add_argument("csv", metavar="NAME.csv")
    e.add_argument("--to", required=True, metavar="DIR")
    e.add_argument("--by", default=None, choices=["cluster", "label"],
                   help="one folder per cluster (default) or per label (default with "
                   "--imagefolder)")
    e.add_argument("--sample", type=_fraction, default=None, metavar="SHARE",
                   help="also write DIR/sample/ with this share of each cluster (e.g. 10%%); "
                   "not with --imagefolder")
    mode = e.add_mutually_exclusive_group()
    mode.add_argument("--copy", dest="mode", action="store_const", const="copy")
    mode.add_argument("--link", dest="mode", action="store_const", const="link",
                      help="symbolic links instead of copies (not with --zip)")
    e.add_argument("--imagefolder", action="store_true",
                   help="write a torchvision ImageFolder tree (one folder per label, or per "
                   "cluster with --by cluster) + labels CSV")
    e.add_argument("--zip", action="store_true", help="write the tree into the zip DIR(.zip) "
                   "instead of a folder")
    e.add_argument("--format", default="folders", choices=["folders", "parquet", "hf"],
                   help="folders (default: the folder, zip or ImageFolder options above); "
                   "parquet: one file DIR with the table, labels and vectors (no images); "
                   "hf: a folder that datasets.load_dataset('imagefolder', data_dir=DIR) "
                   "loads, with labels and metadata")
    e.add_argument("--images", default=None, metavar="IMAGE_DIR",
                   help="where the original images are (default: from NAME.run.json)")
    e.add_argument("--seed", type=int, default=42)
    e.add_argument("--drop", default=None, metavar="FLAG,...",
                   help="leave out images with any of these quality flags, e.g. "
                   "blurry,exact_duplicate (flags: blurry, dark, bright, low_information, "
                   "grayscale, odd_aspect, odd_size, exact_duplicate)")
    e.add_argument("--min-confidence", type=float, default=None, metavar="X",
                   help="with --by label: unlabelled images also go to the folder of their "
                   "predicted label when its confidence is at least X (`explorer labels "
                   "propagate`)")
    e.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    e.set_defaults(mode="copy")


def add_serve(sub) -> None:
    s = sub.add_parser("serve", help="run the HTTP API, job queue and apps for a team",
                       description="Serve datasets of images to a team: an HTTP API under "
                       "/api (docs at /docs), a persistent build queue, and each dataset's "
                       "explorer app at /apps/ID. Create users first with `explorer users add`.")
    s.add_argument("--root", required=True, metavar="DIR",
                   help="the only server folder whose sub-folders datasets may register")
    s.add_argument("--data", required=True, metavar="DIR",
                   help="where the service keeps everything (SQLite records, uploads, builds)")
    s.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default 127.0.0.1; put a TLS proxy in front "
                   "before opening it to a network)")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--allowed-host", action="append", default=[], metavar="HOST[:PORT]",
                   help="a Host name the service answers besides localhost/127.0.0.1/[::1] and "
                   "the --host address (the public name behind a proxy; repeat for several; "
                   "anything else gets 403: no DNS rebinding)")
    s.add_argument("--workers", type=int, default=1, metavar="N",
                   help="builds that run at once, each in its own process (default 1)")
    s.add_argument("--allow-private-urls", action="store_true",
                   help="let URL downloads reach loopback, private and link-local addresses "
                   "(off by default: only public addresses)")
    s.add_argument("--url-timeout", type=float, default=10.0, metavar="SECONDS",
                   help="connect/read timeout for each URL download (default 10)")
    s.add_argument("--max-upload-mb", type=float, default=2048,
                   help="largest upload request in MiB (default 2048)")
    s.add_argument("--max-file-mb", type=float, default=50,
                   help="largest single image in MiB (default 50)")
    s.add_argument("--header-timeout", type=float, default=10.0, metavar="SECONDS",
                   help="close a connection that has not sent a request's headers within "
                   "this time (default 10)")
    s.add_argument("--max-connections", type=int, default=1000, metavar="N",
                   help="open connections at most; more are answered 503 (default 1000)")
    s.add_argument("--max-datasets", type=int, default=100, metavar="N",
                   help="datasets per user (default 100); more is answered 429")
    s.add_argument("--max-jobs", type=int, default=10, metavar="N",
                   help="builds queued or running per user (default 10)")
    s.add_argument("--max-user-gb", type=float, default=50, metavar="GB",
                   help="GiB the service keeps for one user's datasets (default 50)")
    s.add_argument("--job-hours", type=float, default=6, metavar="H",
                   help="a build running longer is stopped and failed (default 6)")
    s.add_argument("--max-apps", type=int, default=8, metavar="N",
                   help="dataset apps running at once (each a process of ~200 MB; default 8)")
    s.add_argument("--max-apps-per-user", type=int, default=3, metavar="N",
                   help="dataset apps one user may keep running (default 3)")
    s.add_argument("--log-level", default="info",
                   choices=["critical", "error", "warning", "info", "debug"])


def add_users(sub) -> None:
    u = sub.add_parser("users", help="add, list or remove the users of `explorer serve`",
                       description="Manage the users of `explorer serve --data DIR`.")
    usub = u.add_subparsers(dest="users_command", metavar="ACTION", required=True)
    ua = usub.add_parser("add", help="create a user; prints the API token as the last line")
    ua.add_argument("name", metavar="NAME")
    ua.add_argument("--admin", action="store_true", help="may see and change every dataset")
    ua.add_argument("--project", action="append", default=[], metavar="P",
                    help="a project the user belongs to (repeat for several)")
    ua.add_argument("--data", required=True, metavar="DIR")
    ul = usub.add_parser("list", help="list users and their projects")
    ul.add_argument("--data", required=True, metavar="DIR")
    ur = usub.add_parser("remove", help="remove a user (their token stops working at once)",
                         description="Remove a user. A user who owns datasets is refused "
                         "unless they go to an admin (--transfer-to) or are deleted with "
                         "everything the service keeps for them (--delete-datasets).")
    ur.add_argument("name", metavar="NAME")
    ur.add_argument("--transfer-to", default=None, metavar="ADMIN",
                    help="give the user's datasets to this admin")
    ur.add_argument("--delete-datasets", action="store_true",
                    help="delete the user's datasets (records, uploads and builds)")
    ur.add_argument("--data", required=True, metavar="DIR")
    for action, text in (("revoke", "disable a user: their token and browser sessions stop "
                          "working at once; datasets stay (rotate gives a new token)"),
                         ("rotate", "a new token for a user (the old one stops working; "
                          "a revoked user is enabled again); printed as the last line")):
        ux = usub.add_parser(action, help=text)
        ux.add_argument("name", metavar="NAME")
        ux.add_argument("--data", required=True, metavar="DIR")
    ug = usub.add_parser("grant", help="let a user or a project's members register a folder "
                         "under --root (and its sub-folders)",
                         description="Folders under ROOT/users/NAME/ belong to NAME, under "
                         "ROOT/projects/P/ to P's members, the rest to admins; grant adds "
                         "more (docs/service.md, Access model).")
    ug.add_argument("folder", metavar="FOLDER", help="relative to the server's --root")
    who = ug.add_mutually_exclusive_group(required=True)
    who.add_argument("--user", default=None, metavar="NAME")
    who.add_argument("--project", default=None, metavar="P")
    ug.add_argument("--revoke", action="store_true", help="take the grant back")
    ug.add_argument("--data", required=True, metavar="DIR")


def add_search(sub) -> None:
    s = sub.add_parser("search", help="find images by words or by an example image",
                       description="Rank the images of a build by a text query (search by "
                       "ImageNet concept with a bundled sentence model, or CLIP with "
                       "--text-model/--checkpoint) or by similarity to --image FILE.")
    s.add_argument("csv", metavar="NAME.csv")
    s.add_argument("query", nargs="?", default=None, metavar="TEXT",
                   help='what to look for, e.g. "a red dress"')
    s.add_argument("--image", default=None, metavar="FILE",
                   help="find the images most like FILE (embedded with the build's model)")
    s.add_argument("--top", type=int, default=10, metavar="K", help="results (default 10)")
    s.add_argument("--json", action="store_true",
                   help="print a JSON list of {path, score, ...} instead of a table")
    s.add_argument("--text-model", default=None, metavar="NAME",
                   help="an open_clip model name (or config .json) for CLIP text search")
    s.add_argument("--checkpoint", default=None, metavar="PATH",
                   help="the CLIP weights on disk (with --text-model; nothing is downloaded)")


def cmd_build(a: argparse.Namespace) -> int:
    from explorer import options
    from explorer.stages.pipeline import build

    build(a.image_dir, app=a.app, out=a.out, **options.from_namespace(a))
    return 0


def cmd_threshold(a: argparse.Namespace) -> int:
    from explorer.stages import images, similarity

    root = Path(a.image_dir)
    if not root.is_dir():
        raise ValueError(f"image folder not found: {a.image_dir}")
    paths = images.discover(root)
    if not paths:
        raise ValueError(f"no images found in {root}")
    curve = similarity.threshold_curve(paths, a.method, sample=a.sample, seed=a.seed,
                                       progress=not a.quiet)
    out = Path(a.out or f"threshold-{a.method}.html")
    similarity.threshold_plot(curve, out, a.method)
    print(f"wrote {out} ({len(curve)} thresholds; default for {a.method}: "
          f"{similarity.DEFAULT_THRESHOLDS[a.method]})")
    return 0


class UsageError(ValueError):
    """Options that do not go together, or input the command refuses outright (exit 2)."""


def _image_root(csv: Path, override: str | None) -> Path:
    """The image folder: ``--images`` as given, else the checked one from NAME.run.json
    (:class:`explorer.paths.UnsafePath` for a hostile record: exit 2)."""
    from explorer.paths import require_image_root

    if override:
        from explorer.paths import is_archive_root

        root = Path(override)
        if not root.is_dir() and not (root.is_file() and is_archive_root(root)):
            raise ValueError(f"--images {override}: not a folder (nor a zip or tar file)")
        return root
    try:
        return require_image_root(csv)
    except ValueError as exc:
        from explorer.paths import UnsafePath

        if isinstance(exc, UnsafePath):
            raise UnsafePath(f"{exc}; nothing exported. If the images really are there, pass "
                             "--images IMAGE_DIR", reason=exc.reason, path=exc.path) from None
        raise ValueError(f"cannot tell where the images of {csv} are ({exc}); "
                         "pass --images IMAGE_DIR") from None


def _check_export_options(a: argparse.Namespace) -> None:
    """L8: every option is honoured or refused, never silently ignored."""
    if a.imagefolder and a.sample is not None:
        raise UsageError("--sample cannot be used with --imagefolder (an ImageFolder holds "
                         "every labelled image; sample the folders export instead)")
    if a.zip and a.mode == "link":
        raise UsageError("--link cannot be used with --zip (a zip holds copies)")
    if a.min_confidence is not None and (a.by or ("label" if a.imagefolder else "cluster")) != "label":
        raise UsageError("--min-confidence goes with --by label (predicted labels, not clusters)")
    if a.format != "folders":
        used = [flag for flag, on in (("--imagefolder", a.imagefolder), ("--zip", a.zip),
                                      ("--sample", a.sample is not None),
                                      ("--link", a.mode == "link"), ("--by", a.by is not None))
                if on]
        if used:
            raise UsageError(f"{', '.join(used)} cannot be used with --format {a.format}")


def cmd_export(a: argparse.Namespace) -> int:
    from explorer import dataset

    _check_export_options(a)
    csv = Path(a.csv)
    build = dataset.open(csv)
    df = build.labelled_table()  # the labels of NAME.labels.sqlite (or an old .labels.jsonl)
    root = None if a.format == "parquet" else _image_root(csv, a.images)
    if a.min_confidence is not None:
        df = cli_labels.with_confident_predictions(df, csv, a.min_confidence)
    dropped = None
    if a.drop:
        from explorer.stages.quality import drop_flagged

        df, dropped = drop_flagged(df, a.drop)
    if a.format == "parquet":
        from explorer.curation.exports import export_parquet

        summary = export_parquet(df, Path(a.to), vectors=_table_vectors(build, df))
    elif a.format == "hf":
        from explorer.curation.exports import export_hf

        summary = export_hf(df, root, Path(a.to), progress=not a.quiet)
    elif a.imagefolder:
        from explorer.curation.exports import export_imagefolder

        summary = export_imagefolder(df, root, Path(a.to), as_zip=a.zip, by=a.by or "label",
                                     mode=a.mode, progress=not a.quiet)
    else:
        from explorer.curation.exports import export_folders

        summary = export_folders(df, root, Path(a.to), by=a.by or "cluster", sample=a.sample,
                                 mode=a.mode, seed=a.seed, as_zip=a.zip, progress=not a.quiet)
    if dropped is not None and isinstance(summary, dict):
        summary["dropped_by_flag"] = dropped
    print(json.dumps(summary, indent=2, default=str))
    return 0


def _table_vectors(build, df):
    """The build's vectors (``NAME.features.npy``, one row per CSV row) for the rows of
    ``df`` (a subset of the build's rows, keeping their index), or None when there are none
    or they do not match the CSV."""
    import numpy as np

    from explorer.dataset import BuildFileError

    if not build.features_path.is_file():
        return None
    try:
        feats = build.vectors
    except BuildFileError as exc:
        print(f"note: {exc}; the export has no vectors", file=sys.stderr)
        return None
    return np.asarray(feats[df.index.to_numpy()], np.float32)


def cmd_serve(a: argparse.Namespace) -> int:
    from explorer.service import serve
    from explorer.service.policy import private_data

    if not 0 < a.port < 65536:
        raise ValueError(f"--port must be 1-65535, got {a.port}")
    if a.workers < 1:
        raise ValueError(f"--workers must be >= 1, got {a.workers}")
    if a.max_upload_mb <= 0 or a.max_file_mb <= 0:
        raise ValueError("--max-upload-mb and --max-file-mb must be > 0")
    if a.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"explorer serve: listening on {a.host} without TLS; tokens and images cross "
              "the network in clear text unless an HTTPS proxy sits in front", file=sys.stderr)
    private_data(a.data)  # review N12: 0700 and umask 077 before anything is written in it
    serve(a.root, a.data, host=a.host, port=a.port, concurrency=a.workers,
          allow_private_urls=a.allow_private_urls, url_timeout=a.url_timeout,
          log_level=a.log_level, header_timeout=a.header_timeout,
          max_connections=a.max_connections, app_max_running=a.max_apps,
          app_max_per_user=a.max_apps_per_user, allowed_hosts=tuple(a.allowed_host),
          max_request_bytes=int(a.max_upload_mb * 2**20),
          max_file_bytes=int(a.max_file_mb * 2**20),
          quotas={"max_datasets": a.max_datasets, "max_jobs": a.max_jobs,
                  "max_bytes": int(a.max_user_gb * 2**30), "job_seconds": a.job_hours * 3600})
    return 0


def cmd_users(a: argparse.Namespace) -> int:
    import shutil

    from explorer.service.db import DB, dataset_dir
    from explorer.service.policy import private_data, rel_folder

    private_data(a.data)  # review N12: --data 0700, what is written in it 0600
    db = DB(Path(a.data).expanduser() / "service.db")
    if a.users_command == "add":
        token = db.add_user(a.name, admin=a.admin, projects=a.project)
        print(f"added user {a.name}" + (" (admin)" if a.admin else "")
              + (f", projects: {', '.join(a.project)}" if a.project else "")
              + "; the API token (shown once, keep it secret):")
        print(token)
    elif a.users_command == "list":
        for u in db.users():
            print(f"{u['name']}\t{'admin' if u['admin'] else 'user'}\t"
                  f"{','.join(u['projects']) or '-'}" + ("\trevoked" if u["disabled"] else ""))
    elif a.users_command == "revoke":
        db.disable_user(a.name)
        print(f"revoked user {a.name}: the token and browser sessions no longer work "
              f"(`explorer users rotate {a.name}` gives a new token)")
    elif a.users_command == "rotate":
        token = db.rotate_token(a.name)
        print(f"new token for {a.name} (the old one no longer works; shown once):")
        print(token)
    elif a.users_command == "grant":
        folder = rel_folder(a.folder)
        if a.revoke:
            if not db.revoke_grant(folder, user=a.user, project=a.project):
                raise ValueError(f"no such grant of {folder!r}")
            print(f"took back {folder!r} from {a.user or 'project ' + a.project}")
        else:
            db.grant(folder, user=a.user, project=a.project)
            print(f"granted {folder!r} to {a.user or 'project ' + a.project}")
    else:
        deleted = db.remove_user(a.name, transfer_to=a.transfer_to,
                                 delete_datasets=a.delete_datasets)
        for ds_id in deleted:
            shutil.rmtree(dataset_dir(Path(a.data).expanduser(), ds_id), ignore_errors=True)
        print(f"removed user {a.name}"
              + (f"; their datasets now belong to {a.transfer_to}" if a.transfer_to else "")
              + (f"; {len(deleted)} dataset(s) deleted" if deleted else ""))
    return 0


def cmd_search(a: argparse.Namespace) -> int:
    from explorer.curation.search import search

    hits = search(a.csv, text=a.query, image=a.image, top=a.top, text_model=a.text_model,
                  checkpoint=a.checkpoint)
    if a.json:
        print(json.dumps(hits, indent=2))
        return 0
    if not hits:
        print("no results")
        return 0
    if hits[0].get("query_read_as"):
        print("read as: " + ", ".join(hits[0]["query_read_as"]))
    for rank, h in enumerate(hits, 1):
        what = ", ".join(h.get("concepts", [])) or h.get("cluster_name", "")
        print(f"{rank:3d}  {h['score']:.4f}  {h['path']}" + (f"  ({what})" if what else ""))
    return 0


#: each command: its parser (``add_NAME(subparsers)``) and its function (``cmd_NAME(args)``)
PARSERS = [add_build, add_threshold, add_export, add_serve, add_users, add_search, cli_labels.register,
           cli_dedupe.add_parser]
COMMANDS = {"build": cmd_build, "threshold": cmd_threshold, "export": cmd_export,
            "serve": cmd_serve, "users": cmd_users, "search": cmd_search,
            "labels": cli_labels.cmd_labels, "dedupe": cli_dedupe.cmd_dedupe}


def main(argv: list[str] | None = None) -> int:
    parser = make_parser()
    a = parser.parse_args(argv)
    if a.command is None:
        parser.print_help()
        return EXIT_USAGE
    try:
        return COMMANDS[a.command](a)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except UsageError as exc:
        print(f"explorer {a.command}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except (ValueError, OSError) as exc:  # bad input, missing or existing files, permissions
        from explorer.paths import UnsafePath

        if isinstance(exc, UnsafePath):  # a hostile run record or path: refused outright
            print(f"explorer {a.command}: refused: {exc}", file=sys.stderr)
            return EXIT_USAGE
        print(f"explorer {a.command}: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
