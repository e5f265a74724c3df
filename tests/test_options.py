"""One build-options schema (``explorer.options``): the command line, the service's build
request (its published ``/openapi.json``) and the run record all agree with it.

Broken on purpose once, each check fails: a hand-written default in the parser
(``--thumb-size`` default 128), an extra choice in the API model, a renamed record key
(``map`` for ``map_method``), a stale docs/options.md.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from explorer import options as O
from explorer.cli import main as cli
from explorer.cli import make_parser

sys.path.insert(0, str(Path(__file__).parent))
from _imagegen import image_folder  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def _build_parser():
    p = make_parser()
    sub = next(a for a in p._actions if a.dest == "command")
    return sub.choices["build"]


def _openapi_build_request(tmp_path) -> dict:
    """The build request as the running service publishes it (in-process, no server)."""
    from explorer.service.api import ServiceConfig, create_app

    (tmp_path / "root").mkdir()
    app = create_app(ServiceConfig(root=tmp_path / "root", data=tmp_path / "data"))
    spec = app.openapi()
    route = spec["paths"]["/api/datasets/{dataset_id}/builds"]["post"]
    body = route["requestBody"]["content"]["application/json"]["schema"]
    refs = [body] + body.get("anyOf", [])
    ref = next(r["$ref"] for r in refs if "$ref" in r)
    return spec["components"]["schemas"][ref.rsplit("/", 1)[1]]


def _enum(prop: dict):
    for p in [prop] + prop.get("anyOf", []):
        if "enum" in p:
            return tuple(p["enum"])
        if "const" in p:
            return (p["const"],)
    return None


def test_the_command_line_is_the_schema():
    b = _build_parser()
    actions = {a.dest: a for a in b._actions}
    for o in O.OPTIONS:
        if not o.cli:
            assert o.name not in actions, o.name
            continue
        a = actions[o.name]
        assert o.cli_flag in a.option_strings, (o.name, a.option_strings)
        assert a.default == o.default, (o.name, a.default, o.default)
        want = list(o.choices) if o.choices else None
        assert (list(a.choices) if a.choices else None) == want, o.name
    extra = set(actions) - {o.name for o in O.OPTIONS} - {"help", "image_dir", "app", "out"}
    assert not extra, f"build flags outside the schema: {extra}"


def test_the_published_api_schema_is_the_schema(tmp_path):
    req = _openapi_build_request(tmp_path)
    props = req["properties"]
    remote = [o for o in O.OPTIONS if o.remote]
    assert set(props) == {o.name for o in remote}
    assert not req.get("required"), "every option of a build request has a default"
    for o in remote:
        p = props[o.name]
        if o.default is None:  # pydantic leaves a null default out of the schema
            assert p.get("default") is None, (o.name, p["default"])
        else:
            assert p["default"] == o.default, (o.name, p["default"], o.default)
        assert _enum(p) == o.choices, (o.name, _enum(p), o.choices)
    # what the service asks for and the CLI has: the options the issue named
    assert {"features", "map_method", "runtime", "device", "seed", "k"} <= set(props)
    # and not the server's paths or limits
    assert not {"checkpoint", "metadata", "ray_address", "max_file_mb"} & set(props)
    assert props["seed"].get("default") is None  # one set of defaults: the CLI's (was 42)


def test_the_run_record_is_the_schema(tmp_path):
    image_folder(tmp_path / "imgs", 6, size=32)
    csv = tmp_path / "r.csv"
    assert cli(["build", str(tmp_path / "imgs"), "--out", str(csv), "--method", "phash",
                "--map", "pca", "-q"]) == 0
    run = json.loads((tmp_path / "r.run.json").read_text())
    params = run["parameters"]
    assert set(params) == {o.name for o in O.OPTIONS if o.recorded}
    asked = {"method": "phash", "map_method": "pca"}
    for o in O.OPTIONS:
        if o.recorded:
            assert params[o.name] == asked.get(o.name, o.default), o.name


def test_one_validation_for_the_cli_the_api_and_build(tmp_path, capsys):
    BuildIn = O.build_request_model()
    from pydantic import ValidationError

    (tmp_path / "i").mkdir()
    for bad in [{"seed": -1}, {"thumb_size": 8}, {"cluster": "nope"},
                {"runtime": "onnx", "device": "cuda"}, {"cluster_params": {"Bad Name": 1}}]:
        with pytest.raises(O.BuildError):
            O.check(bad)
        with pytest.raises(ValidationError):
            BuildIn(**bad)
    from explorer.stages.pipeline import build

    with pytest.raises(O.BuildError, match="--seed"):
        build(tmp_path / "i", out=tmp_path / "x.csv", seed=-1, progress=False)
    assert cli(["build", str(tmp_path / "i"), "--out", str(tmp_path / "x.csv"),
                "--runtime", "onnx", "--device", "cuda"]) == 1
    assert "--runtime onnx" in capsys.readouterr().err
    with pytest.raises(TypeError, match="colour"):
        build(tmp_path / "i", out=tmp_path / "x.csv", colour="red")


def test_cluster_params_and_k_from_the_command_line():
    a = _build_parser().parse_args(["d", "--cluster-param", "min_cluster_size=20",
                                    "--cluster-param", "metric=cosine", "--k", "4"])
    opts = O.check(O.from_namespace(a))
    assert O.cluster_params(opts) == {"min_cluster_size": 20, "metric": "cosine", "k": 4}
    assert O.from_namespace(_build_parser().parse_args(["d"]))["cluster_params"] is None


def test_docs_page_is_generated_from_the_schema():
    """docs/options.md is ``python -m explorer.options`` (regenerate it after a change)."""
    assert (REPO / "docs" / "options.md").read_text() == O.markdown()


def test_the_build_route_refuses_what_the_cli_refuses(tmp_path):
    """In-process: the route's body is the schema's model, its whole check included (422
    with a JSON message naming the options)."""
    from fastapi.testclient import TestClient

    from explorer.service.api import ServiceConfig, create_app
    from explorer.service.db import DB

    (tmp_path / "root").mkdir()
    token = DB(tmp_path / "data" / "service.db").add_user("u")
    app = create_app(ServiceConfig(root=tmp_path / "root", data=tmp_path / "data"))
    c = TestClient(app)
    auth = {"Authorization": f"Bearer {token}"}
    r = c.post("/api/datasets/nope/builds", json={"runtime": "onnx", "device": "cuda"},
               headers=auth)
    assert r.status_code == 422 and "--runtime onnx" in json.dumps(r.json())
    r = c.post("/api/datasets/nope/builds", json={"checkpoint": "/etc/passwd"}, headers=auth)
    assert r.status_code == 422  # a server path is not the request's to choose
    r = c.post("/api/datasets/nope/builds", json={"map_method": "pca", "features": "cnn"},
               headers=auth)
    assert r.status_code == 404  # valid: on to the dataset, which does not exist
