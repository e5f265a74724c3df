"""``BuildIn``: the body of ``POST /api/datasets/{id}/builds`` (the build options the service
accepts). Kept on its own so it can be replaced by a model derived from the one build-options
schema without touching the routes."""

from __future__ import annotations

import re
from typing import Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, field_validator


class BuildIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    method: Literal["timm", "phash", "ssim", "orb", "minhash", "tm"] = "timm"
    model: Optional[str] = Field(None, max_length=100, pattern=r"^[A-Za-z0-9_.\-/]+$",
                                 description="timm model name (default tf_efficientnet_lite0)")
    cluster: Literal["hdbscan", "kmeans", "agglomerative", "dbscan", "gmm", "auto"] = "hdbscan"
    k: Optional[int] = Field(None, ge=1, le=1000)
    cluster_params: Optional[dict[str, int | float | str | bool]] = Field(
        None, max_length=20, description="extra clustering parameters, e.g. min_cluster_size")
    threshold: Optional[float] = Field(None, ge=0, le=1)
    duplicates: Literal["phash", "ssim", "orb", "minhash", "tm", "none"] = "phash"
    seed: int = Field(42, ge=0, le=2**31 - 1)
    batch_size: Optional[int] = Field(None, ge=1, le=512)
    thumb_size: int = Field(256, ge=16, le=1024)

    @field_validator("cluster_params")
    @classmethod
    def _params(cls, v):
        for k in v or {}:
            if not re.match(r"^[a-z_][a-z0-9_]{0,40}$", k):
                raise ValueError(f"cluster parameter name {k!r} is not a parameter name")
        return v


def build_methods() -> tuple[str, ...]:
    """The method names a build accepts (the upload form's ``build`` field checks them)."""
    return BuildIn.model_fields["method"].annotation.__args__
