"""Recipe: a training mixture in one file (sources, weights, validation split, pack options)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from schemas.config import FormatOption
from schemas.pack_config import ExpandTurns, Overflow, TrainOn


class Source(BaseModel):
    """One input of a mixture: files, their format, an optional template/system override and a weight.

    `weight` below 1 keeps that fraction of the source (a seeded subset); 1 keeps it; above 1 repeats it
    (2.5 = two full copies plus a seeded half).

    >>> Source(path="data/a.jsonl", weight=0.5).weight
    0.5
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    path: str | list[str] = Field(description="file, folder, glob or URL (or a list of them)")
    format: FormatOption = Field("auto", description="input format, or auto to detect per file")
    weight: float = Field(1.0, description="fraction (< 1) to keep, or epochs (>= 1) to repeat")
    template: str | None = Field(None, description="template for this source only")
    system: str | None = Field(None, description="system prompt that replaces (or adds) the system message")
    val_fraction: float | None = Field(None, description="share of this source held out for validation")
    val_size: int | None = Field(None, description="conversations of this source held out for validation")
    name: str | None = Field(None, description="label in the manifest (default: the path)")
    subset: str | None = Field(None, description="config of a hub dataset path (hf://datasets/...)")
    split: str | None = Field(None, description="split of a hub dataset path (a+b joins them)")
    fields: dict[str, str] | None = Field(None, description="field mapping TARGET -> SOURCE key for this source "
                                          "(messages: traj, tools: functions, message.role: speaker)")

    @field_validator("weight")
    @classmethod
    def _positive_weight(cls, v: float) -> float:
        if not v > 0:
            raise ValueError("must be > 0 (a fraction to keep, or a number of epochs)")
        return v

    @model_validator(mode="after")
    def _check_split(self) -> "Source":
        check_split(self.val_fraction, self.val_size)
        return self

    @property
    def paths(self) -> list[str]:
        """The path(s) as a list."""
        return [self.path] if isinstance(self.path, str) else list(self.path)

    @property
    def label(self) -> str:
        """The name shown in reports and manifests."""
        return self.name or ",".join(self.paths)


class Recipe(BaseModel):
    """A training mixture: pack options shared by every source, and the sources.

    Every option is optional here: unset ones fall back to `prep pack`'s defaults, and a flag given on
    the command line wins over the file.

    >>> Recipe(sources=[{"path": "a.json"}]).sources[0].weight
    1.0
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    sources: list[Source] = Field(min_length=1)
    output: str | None = None
    tokenizer: str | None = None
    template: str | None = None
    max_len: int | None = Field(None, ge=8)
    train_on: TrainOn | None = None
    overflow: Overflow | None = None
    expand_turns: ExpandTurns | None = None
    pack: bool | None = None
    seed: int | None = None
    shard_size: str | None = None
    batch_bytes: str | None = None
    add_special_tokens: bool | None = None
    dedup: bool | None = None
    fields: dict[str, str] | None = None
    val_fraction: float | None = None
    val_size: int | None = None

    @model_validator(mode="after")
    def _check_split(self) -> "Recipe":
        check_split(self.val_fraction, self.val_size)
        return self


def check_split(val_fraction: float | None, val_size: int | None) -> None:
    """A validation split is a fraction in [0, 1) or a size >= 0, never both.

    >>> check_split(0.1, None)
    """
    if val_fraction is not None and val_size is not None:
        raise ValueError("give val_fraction or val_size, not both")
    if val_fraction is not None and not 0 <= val_fraction < 1:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    if val_size is not None and val_size < 0:
        raise ValueError(f"val_size must be >= 0, got {val_size}")
