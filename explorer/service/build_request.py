"""``BuildIn``: the body of ``POST /api/datasets/{id}/builds``: every option of ``explorer
build`` that makes sense remotely, with the CLI's defaults, choices and checks, derived from
the one build-options schema (:func:`explorer.options.build_request_model`)."""

from __future__ import annotations

from explorer.options import build_request_model

BuildIn = build_request_model()


def build_methods() -> tuple[str, ...]:
    """The method names a build accepts (the upload form's ``build`` field checks them)."""
    return BuildIn.model_fields["method"].annotation.__args__
