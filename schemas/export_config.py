"""ExportConfig: every `prep export` option, validated once, echoed into the export's manifest."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

ExportFormat = Literal["megatron", "mds", "parquet"]


class ExportConfig(BaseModel):
    """Options of `prep export`; each CLI flag is the field of the same name.

    >>> ExportConfig(shards="shards", to="mds", output="mds-out").mds_shard_size
    '64MiB'
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    shards: str = Field(description="shard folder written by `prep pack` (a split folder exports every split)")
    to: ExportFormat = Field(description="megatron | mds | parquet")
    output: str = Field(description="output folder of the export")
    mds_shard_size: str = Field("64MiB", description="size limit of each MDS shard file (streaming's default)")
    overwrite: bool = Field(False, description="replace an existing export folder")
