"""The JSON bodies of the API (``BuildIn`` lives in :mod:`explorer.service.build_request`)."""

from __future__ import annotations

import re
from typing import Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, field_validator

_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def clean_text(v: str, what: str) -> str:
    """``v`` stripped; ValueError naming ``what`` for control characters or a blank."""
    if _CONTROL.search(v):
        raise ValueError(f"{what} must not contain control characters")
    if not v.strip():
        raise ValueError(f"{what} must not be blank")
    return v.strip()


class DatasetIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(min_length=1, max_length=200)
    folder: Optional[str] = Field(None, max_length=4096, description=(
        "image folder relative to the server's --root; omit for an empty dataset that "
        "uploads and URL downloads fill"))
    visibility: Literal["private", "project"] = "private"
    project: Optional[str] = Field(None, max_length=64, description=(
        "one of the owner's projects (default: the owner's only project)"))

    @field_validator("name")
    @classmethod
    def _name(cls, v):
        return clean_text(v, "name")


class DatasetPatch(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: Optional[str] = Field(None, min_length=1, max_length=200)
    visibility: Optional[Literal["private", "project"]] = None
    project: Optional[str] = Field(None, max_length=64)

    @field_validator("name")
    @classmethod
    def _name(cls, v):
        return None if v is None else clean_text(v, "name")


class ExportIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    by: Literal["cluster", "label"] = "cluster"
    sample: Optional[float | str] = Field(None, description="share of each folder copied to "
                                          "sample/, e.g. 0.1 or \"10%\"")


class LabelsIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    op: Literal["apply", "clear", "discard", "rename", "merge"]
    keys: list[str] = Field(default_factory=list, max_length=1_000_000,
                            description="image paths (the CSV's path column)")
    label: Optional[str] = Field(None, max_length=200)
    old: Optional[str] = Field(None, max_length=200)
    new: Optional[str] = Field(None, max_length=200)
    into: Optional[str] = Field(None, max_length=200)


class SearchIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    text: str = Field(min_length=1, max_length=500, description="what to look for, in words")
    top: int = Field(10, ge=1, le=200)


class URLsIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    urls: list[str] = Field(min_length=1, max_length=500)
