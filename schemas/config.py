"""Stage configs: every CLI flag is a field here, with the same name and default."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

FormatOption = Literal["auto", "alpaca", "sharegpt", "openai", "prompt_completion", "transcript", "unified"]


class ConvertConfig(BaseModel):
    """Options of `prep convert INPUT... -o OUTPUT`.

    >>> ConvertConfig(inputs=["data/*.jsonl"], output="out.jsonl").format
    'auto'
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    inputs: list[str] = Field(min_length=1, description="Input files, globs, save_to_disk folders or URLs.")
    output: str = Field(description="Unified output (a path or URL): .parquet writes Parquet, anything else JSON Lines.")
    format: FormatOption = Field("auto", description="Input format; 'auto' detects it per file.")
    rejects: str | None = Field(None, description="Rejects JSONL; default OUTPUT with .rejects.jsonl.")
    overwrite: bool = Field(False, description="Replace existing output files.")
    strict: bool = Field(False, description="Fail (exit 1) when any record is rejected.")
    dedup: bool = Field(False, description="Drop exact duplicate conversations (same messages).")
    subset: str | None = Field(None, description="Config of hub dataset inputs (hf://datasets/...); None = default.")
    split: str | None = Field(None, description="Split of hub dataset inputs (a+b joins); None = the only or train.")
    fields: dict[str, str] | None = Field(None, description="Field mapping TARGET -> SOURCE key (messages -> traj, "
                                          "message.role -> speaker), applied to every record before validation.")
