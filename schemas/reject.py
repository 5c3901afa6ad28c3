"""What every dropping stage emits: where the record was, what it was, and every reason."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class ErrorDetail(BaseModel):
    """One problem with a record: the field path (`conversations[2].from`) and a message."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    field: str
    message: str


class Reject(BaseModel):
    """A record that was not kept, with its source, a short reason code and every error.

    `raw` is the record as read (the line's text for JSON Lines, JSON for other formats;
    undecodable bytes are shown with backslash escapes).

    >>> Reject(path="a.jsonl", line=3, stage="convert", reason="invalid_json",
    ...        errors=[ErrorDetail(field="$", message="EOF while parsing")], raw="{").reason
    'invalid_json'
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    path: str
    line: int
    stage: str
    reason: str
    errors: list[ErrorDetail]
    raw: str | None = None
    format: str | None = None
    id: str | None = None
