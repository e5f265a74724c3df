"""Property-based tests from the published schema: schemathesis against the service's app,
in this process (``create_app`` over ASGI).

Every operation of ``/openapi.json`` gets a few generated requests (valid and invalid bodies,
paths and query strings) with a valid token; none may answer with a server error, and every
error must be JSON with a message.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import schemathesis
from hypothesis import HealthCheck, settings

sys.path.insert(0, str(Path(__file__).parent))
from _imagegen import image_folder  # noqa: E402
from _service import Local, grant, local_user  # noqa: E402


pytestmark = pytest.mark.slow  # property-based runs over the whole API (make test-fast leaves it out)


@pytest.fixture(scope="module")
def service(tmp_path_factory):
    base = tmp_path_factory.mktemp("schema")
    image_folder(base / "root" / "photos", 6, size=32)
    token = local_user(base / "data", "fuzz", projects=("p1",))
    grant(base / "data", "photos", project="p1")
    # not entered: schemathesis runs the app's lifespan (the job queue) once, for the process
    return Local(base / "root", base / "data"), token


# schemathesis' own pytest plugin (``schemathesis.pytest.from_fixture``) does not run under
# pytest 9 here, so each operation's strategy drives a plain hypothesis test.
@pytest.mark.parametrize("mode, existing", [("positive", False), ("negative", False),
                                           ("positive", True)])
def test_no_server_error_and_errors_are_json(service, mode, existing):
    from hypothesis import given
    from schemathesis import GenerationMode

    local, token = service
    schema = schemathesis.openapi.from_asgi("/openapi.json", local.app)
    gen = GenerationMode.POSITIVE if mode == "positive" else GenerationMode.NEGATIVE
    ops = [r.ok() for r in schema.get_all_operations()]
    assert len(ops) >= 12, "every endpoint is in the published schema"
    paths = {}
    if existing:  # requests about a dataset that exists (not deleted, no builds queued)
        r = local.client(token).post("/api/datasets", json={"name": "fuzzed",
                                                            "folder": "photos"})
        paths = {"dataset_id": r.json()["id"]}
        ops = [op for op in ops if "{dataset_id}" in op.path and op.method.upper() != "DELETE"
               and not op.path.endswith("/builds")]
    seen = []
    for op in ops:
        @given(case=op.as_strategy(gen, path_parameters=paths or None))
        @settings(max_examples=8, deadline=None, derandomize=True, database=None,
                  suppress_health_check=list(HealthCheck))
        def check(case):
            r = case.call(headers={"Authorization": f"Bearer {token}"})
            seen.append(r.status_code)
            assert r.status_code < 500, (case.method, case.formatted_path, r.status_code,
                                         r.text[:300])
            if r.status_code >= 400:
                body = r.json()
                assert isinstance(body.get("error"), str) and body["error"], r.text[:300]

        check()
    assert len(seen) >= len(ops)
    if existing:
        assert any(c == 200 for c in seen)
