"""MosaicML Streaming (MDS) export, written without the `streaming` package (it pins transformers<5).

Matched to mosaicml/streaming's streaming/base/format/mds/{writer,encodings}.py and base/writer.py
(version in the README). A shard file `shard.NNNNN.mds` is: uint32 sample count, uint32 byte offsets of
every sample and of the end (absolute), the shard's config as JSON (sorted keys), then the samples. A
sample is the uint32 sizes of its variable-size columns, then each column's bytes, columns sorted by name.
`ndarray:int32` values are one byte (ndim << 2 | shape dtype code), the shape in the smallest unsigned
type, then the int32 values. `index.json` lists the shards (version 2), written last.

Samples are the shard rows: `input_ids`, `labels`, `position_ids`, `seq_lengths` (and `attention_mask`
for `--no-pack` shards, `seq_lengths_unpadded` for padded ones), each `ndarray:int32`. Shards with one
example per row (`--no-pack`) also get `turns` (json), llm-foundry's tokenized fine-tuning form: the
example as (context, target) pairs, context = a run of untrained tokens, target = the trained run after it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from prep.write import parse_size

MAX_SHARD_BYTES = 2**32 - 1  # MDS sample offsets are uint32


def write(source, out: Path, config) -> dict[str, Any]:
    """Write the MDS export of one shard folder into `out`; return the manifest's `mds` part."""
    limit = min(parse_size(config.mds_shard_size), MAX_SHARD_BYTES)
    names = list(source.manifest["columns"]) + ([] if source.manifest["packed"] else ["turns"])
    encodings = {n: "json" if n == "turns" else "ndarray:int32" for n in names}
    writer = MDSShardWriter(out, encodings, limit)
    for file in source.files:
        for batch in source.batches(file):
            columns = {n: _column(batch, n) for n in source.manifest["columns"]}
            turns = None if source.manifest["packed"] else example_turns(batch)
            for r in range(batch.num_rows):
                sample = {n: values[offsets[r] : offsets[r + 1]] for n, (offsets, values) in columns.items()}
                if turns is not None:
                    sample["turns"] = turns[r]
                writer.write(sample)
    shards = writer.finish()
    return {"columns": dict(sorted(encodings.items())), "shards": shards, "size_limit": limit,
            "llm_foundry_turns": not source.manifest["packed"]}


def _column(batch, name: str) -> tuple[np.ndarray, np.ndarray]:
    """(int64 offsets, int32 values) of one shard column of the batch."""
    column = batch.table.column(name)
    offsets = np.asarray(column.offsets, dtype=np.int64)
    return offsets - offsets[0], np.asarray(column.values)[offsets[0] : offsets[-1]]


def example_turns(batch) -> list[bytes]:
    """Per row (one example each), llm-foundry's `turns` as encoded JSON: [{"input_ids": ctx, "labels": target}].

    Context is a run of untrained tokens, target the run of trained tokens after it. Untrained tokens after
    the last trained one are left out: they are context for no trained token, so the loss is unchanged.

    >>> import pyarrow as pa; from prep.export import row_batch
    >>> b = row_batch(pa.record_batch({"input_ids": [[1, 2, 3, 4, 5]], "labels": [[-100, 2, -100, 4, -100]],
    ...     "position_ids": [[0, 1, 2, 3, 4]], "seq_lengths": [[5]]}))
    >>> example_turns(b)[0].decode()
    '[{"input_ids": [1], "labels": [2]}, {"input_ids": [3], "labels": [4]}]'
    """
    out = []
    for r in range(batch.num_rows):
        ids = batch.input_ids[batch.token_offsets[r] : batch.token_offsets[r + 1]]
        trained = batch.labels[batch.token_offsets[r] : batch.token_offsets[r + 1]] != -100
        change = np.flatnonzero(np.diff(trained.astype(np.int8))) + 1
        bounds = np.concatenate(([0], change, [len(ids)])).tolist()
        runs = [(bool(trained[a]), ids[a:b].tolist()) for a, b in zip(bounds[:-1], bounds[1:])]
        turns, context = [], []
        for is_target, tokens in runs:
            if is_target:
                turns.append({"input_ids": context, "labels": tokens})
                context = []
            else:
                context = tokens
        out.append(json.dumps(turns).encode())
    return out


def _ndarray_int32(values: np.ndarray) -> bytes:
    """streaming's `ndarray:int32` encoding of a 1-D array (static dtype, dynamic shape)."""
    n = len(values)
    code, shape = (0, np.uint8) if n < 1 << 8 else (1, np.uint16) if n < 1 << 16 else (2, np.uint32)
    return bytes([(1 << 2) | code]) + np.array([n], shape).tobytes() + values.astype(np.int32, copy=False).tobytes()


class MDSShardWriter:
    """Joint MDS shards of at most `limit` bytes, and `index.json`, as streaming's MDSWriter writes them.

    >>> import tempfile; out = Path(tempfile.mkdtemp())
    >>> w = MDSShardWriter(out, {"input_ids": "ndarray:int32"}, 1 << 20)
    >>> w.write({"input_ids": np.array([1, 2], np.int32)}); [s["samples"] for s in w.finish()]
    [1]
    """

    def __init__(self, out: Path, encodings: dict[str, str], limit: int):
        self.out, self.limit = out, limit
        self.names = sorted(encodings)
        self.encodings = [encodings[n] for n in self.names]
        self.base = {"compression": None, "format": "mds", "hashes": [], "size_limit": limit, "version": 2,
                     "column_encodings": self.encodings, "column_names": self.names,
                     "column_sizes": [None] * len(self.names)}
        self.config = json.dumps(self.base, sort_keys=True).encode()
        self.samples: list[bytes] = []
        self.size = 8 + len(self.config)
        self.shards: list[dict[str, Any]] = []

    def write(self, sample: dict[str, Any]) -> None:
        """Add one sample (numpy int32 arrays, or encoded bytes for json columns)."""
        data = [v if isinstance(v, bytes) else _ndarray_int32(v) for v in (sample[n] for n in self.names)]
        encoded = np.array([len(d) for d in data], np.uint32).tobytes() + b"".join(data)
        if self.samples and self.size + len(encoded) + 4 > self.limit:
            self._flush()
        if 8 + len(self.config) + len(encoded) + 4 > MAX_SHARD_BYTES:
            raise ValueError(f"a sample of {len(encoded)} bytes does not fit in an MDS shard (uint32 offsets)")
        self.samples.append(encoded)
        self.size += len(encoded) + 4

    def _flush(self) -> None:
        """Write the pending samples as the next shard file."""
        n = len(self.samples)
        offsets = np.cumsum([0] + [len(s) for s in self.samples], dtype=np.int64) + 4 + 4 * (n + 1) + len(self.config)
        name = f"shard.{len(self.shards):05d}.mds"
        with open(self.out / name, "wb") as f:
            f.write(np.uint32(n).tobytes() + offsets.astype(np.uint32).tobytes() + self.config)
            for s in self.samples:
                f.write(s)
            size = f.tell()
        self.shards.append({"samples": n, "raw_data": {"basename": name, "bytes": size, "hashes": {}},
                            "zip_data": None, **self.base})
        self.samples, self.size = [], 8 + len(self.config)

    def finish(self) -> list[dict[str, Any]]:
        """Flush the last shard and write index.json; return the shard entries."""
        if self.samples:
            self._flush()
        (self.out / "index.json").write_text(json.dumps({"shards": self.shards, "version": 2}, sort_keys=True))
        return [{"file": s["raw_data"]["basename"], "samples": s["samples"]} for s in self.shards]
