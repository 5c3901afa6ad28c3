"""PackConfig: every `prep pack` option, validated once, echoed into the manifest."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from schemas.config import FormatOption

# Declared once: prep.encode takes its valid values from these (typing.get_args), recipes reuse them.
TrainOn = Literal["completion", "last", "all"]
Overflow = Literal["split", "truncate", "drop"]
ExpandTurns = Literal["auto", "off", "all"]
# A row must hold a template's markers plus some text: below 8 tokens nothing useful fits, and a value that small
# is a typo. The encoder (library) and `prep pack` (this config) accept the same range.
MIN_MAX_LEN = 8


class PackConfig(BaseModel):
    """Options of `prep pack`; each CLI flag is the field of the same name.

    >>> PackConfig(inputs=["a.jsonl"], output="shards").max_len
    2048
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    inputs: list[str] = Field(min_length=1, description="input files, folders, globs or URLs (unified or raw)")
    output: str = Field(description="output folder (or s3://, gs://, az:// URL) for the shards")
    format: FormatOption = Field("auto", description="input format, or auto to detect per file")
    tokenizer: str | None = Field(None, description="local folder or hub id; None = embedded demo tokenizer")
    trust_remote_code: bool = Field(False, description="allow a hub tokenizer's own code to run")
    template: str = Field("markers", description="markers | chatml | tokenizer | path to a TOML/YAML template")
    max_len: int = Field(2048, ge=MIN_MAX_LEN, description="tokens per row")
    train_on: TrainOn = Field("completion", description="which tokens carry a loss")
    overflow: Overflow = Field("split", description="what to do with an example longer than max_len")
    expand_turns: ExpandTurns = Field("auto", description="one example per trained reply: auto (where the chat "
                                      "template renders a reply differently once later turns follow), off, all")
    pack: bool = Field(True, description="pack several examples per row (False: one per row, padded by the collator)")
    pad_to_multiple_of: int = Field(1, ge=1, description="pad every example to a multiple of N tokens (context "
                                    "parallelism: 2 x the CP size); 1 = no padding")
    seed: int = Field(0, description="seed of the row shuffle")
    shard_size: str = Field("256MB", description="target size of each shard file")
    add_special_tokens: bool = Field(False, description="register the template markers as special tokens")
    batch_size: int = Field(2048, ge=1, description="conversations per tokenizer call, at most")
    batch_bytes: str = Field("1MiB", description="message text per tokenizer call, at most (a longer conversation "
                             "goes alone): bounds the memory of encoding")
    workers: int = Field(0, ge=0, description="encoding processes; 0 = one per CPU (at most 8) for inputs >= 64 MiB")
    dedup: bool = Field(False, description="drop exact duplicate conversations before encoding")
    fields: dict[str, str] | None = Field(None, description="field mapping TARGET -> SOURCE key for every input "
                                          "(messages -> traj, message.role -> speaker)")
    overwrite: bool = Field(False, description="replace an existing output folder")
    strict: bool = Field(False, description="exit non-zero if any record or example was rejected")
    recipe: str | None = Field(None, description="recipe file (YAML/TOML): sources, weights, split, options")
    val_fraction: float | None = Field(None, ge=0, lt=1, description="share of every source held out for validation")
    val_size: int | None = Field(None, ge=0, description="conversations of every source held out for validation")
    subset: str | None = Field(None, description="config of hub dataset inputs (hf://datasets/...); None = default")
    split: str | None = Field(None, description="split of hub dataset inputs (a+b joins); None = the only or train")

    @model_validator(mode="after")
    def _one_split_policy(self) -> "PackConfig":
        if self.val_fraction is not None and self.val_size is not None:
            raise ValueError("--val-fraction and --val-size exclude each other: give one")
        if self.max_len % self.pad_to_multiple_of:
            raise ValueError(f"--max-len {self.max_len} is not a multiple of --pad-to-multiple-of "
                             f"{self.pad_to_multiple_of}: a padded example could not fit in a row")
        return self
