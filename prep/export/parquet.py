"""Parquet export: one Parquet file per shard file, one row per shard row, the shard columns as list<int32>.

The schema carries the `huggingface` metadata that datasets writes (the shards' features), so
`datasets.load_dataset("parquet", data_files=...)` restores the same `Sequence(Value("int32"))` features
as `load_from_disk` on the shards; Spark, DuckDB and polars read the same files as plain list<int32>.
zstd-compressed, one row group per 1,000-row record batch of the source.
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq


def write(source, out: Path, config) -> dict[str, Any]:
    """Write the Parquet export of one shard folder into `out`; return the manifest's `parquet` part."""
    features = json.loads((source.path / "dataset_info.json").read_text(encoding="utf-8"))["features"]
    metadata = {b"huggingface": json.dumps({"info": {"features": features}}).encode()}
    names = [f"data-{i:05d}-of-{len(source.files):05d}.parquet" for i in range(len(source.files))]
    # Parquet's list encoding is the slow part and releases the GIL: two files are written at a time.
    with ThreadPoolExecutor(max_workers=2) as pool:
        list(pool.map(lambda f, n: _write_file(source, f, out / n, metadata), source.files, names))
    return {"files": names, "compression": "zstd", "features": features}


def _write_file(source, file: str, path: Path, metadata: dict[bytes, bytes]) -> None:
    """One shard file as one Parquet file, a row group per source record batch."""
    schema = source.schema(file).with_metadata(metadata)
    with pq.ParquetWriter(path, schema, compression="zstd", use_dictionary=False, write_statistics=False) as writer:
        for batch in source.batches(file):
            writer.write_table(pa.Table.from_batches([batch.table]).replace_schema_metadata(metadata))
