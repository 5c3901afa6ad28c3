"""Megatron export: Megatron-Core indexed datasets (.bin/.idx) and Megatron-Bridge packed-SFT Parquet.

Layout (matched to megatron/core/datasets/indexed_dataset.py and Megatron-Bridge's
src/megatron/bridge/data/packing/{parquet,gpt_sft}.py; versions in the README):

    tokens.bin / tokens.idx        token ids; one sequence per example, one document per shard row
    loss_mask.bin / loss_mask.idx  uint8, the same sequences: 1 where the token is trained (labels != -100)
    bridge/data-0000i-of-0000n.idx.parquet   one packed row per shard row: input_ids list<int32>,
                                   loss_mask list<int8> (rolled by one: 1 where the NEXT token is trained),
                                   seq_start_id list<int32> (where each example starts)

The .idx file: magic `MMIDIDX\\x00\\x00`, version <Q 1, dtype code <B, sequence count <Q, document count <Q,
int32 sequence lengths, int64 byte pointers, int64 document indices (0, then the sequence count at the end
of each document). Token ids use uint16 below 65,500 (Megatron's `DType.optimal_dtype`), else int32: its
reader has no uint32 code. Lengths, pointers and document indices are spilled to side files while the
tokens stream, then joined into the .idx, so memory stays flat.

Megatron-Bridge shifts each example itself (tokens = ids[s:e-1], labels = ids[s+1:e], mask = loss_mask[s:e-1]).
With `--pad-to-multiple-of N` shards, its CP layout differs from prep's by that shift: each example is
rewritten as its real tokens padded to `ceil((len - 1) / N) * N + 1` with the EOS id (mask 0), so that
Bridge's runtime lengths are multiples of N (`pad_seq_to_mult=N`) and its logical lengths (up to the last
non-EOS token) exclude the padding.
"""

from __future__ import annotations

import shutil
import struct
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from prep.spill import concat_ranges

_INDEX_HEADER = b"MMIDIDX\x00\x00"
_DTYPE_CODES = {np.uint8: 1, np.int32: 4, np.uint16: 8}  # megatron.core.datasets.indexed_dataset.DType
BRIDGE_DIR = "bridge"
BRIDGE_ROW_GROUP = 500  # rows per row group, as Megatron-Bridge's write_packed_parquet (it reads whole groups)
_BRIDGE_SCHEMA = pa.schema([("input_ids", pa.list_(pa.int32())), ("loss_mask", pa.list_(pa.int8())),
                            ("seq_start_id", pa.list_(pa.int32()))])


def token_dtype(vocab_size: int | None) -> type:
    """The token dtype Megatron's own preprocessing picks: uint16 below 65,500 ids, else int32.

    >>> token_dtype(50257).__name__, token_dtype(151665).__name__
    ('uint16', 'int32')
    """
    return np.uint16 if vocab_size is not None and vocab_size < 65500 else np.int32


class IndexedDatasetWriter:
    """Write one Megatron-Core indexed dataset (`prefix.bin` + `prefix.idx`) from streamed documents.

    >>> import tempfile; w = IndexedDatasetWriter(Path(tempfile.mkdtemp()) / "t", np.int32)
    >>> w.add(np.array([1, 2, 3]), np.array([2, 1]), np.array([0, 1, 2]))
    >>> w.finish()["sequences"]
    2
    """

    def __init__(self, prefix: Path, dtype: type):
        self.prefix, self.dtype = prefix, np.dtype(dtype)
        self.bin = open(f"{prefix}.bin", "wb")
        self.side = {k: open(f"{prefix}.{k}.tmp", "wb") for k in ("lengths", "pointers", "documents")}
        self.side["documents"].write(np.zeros(1, np.int64).tobytes())
        self.sequences = self.documents = self.values = 0

    def add(self, values: np.ndarray, lengths: np.ndarray, document_ends: np.ndarray) -> None:
        """Append sequences (`lengths` split `values`); `document_ends` are cumulative sequence counts, from 0."""
        self.bin.write(values.astype(self.dtype, copy=False).tobytes())
        lengths = np.asarray(lengths, dtype=np.int64)
        starts = self.values + np.cumsum(lengths) - lengths
        self.side["lengths"].write(lengths.astype(np.int32).tobytes())
        self.side["pointers"].write((starts * self.dtype.itemsize).astype(np.int64).tobytes())
        self.side["documents"].write((self.sequences + np.asarray(document_ends[1:], np.int64)).tobytes())
        self.sequences += len(lengths)
        self.documents += len(document_ends) - 1
        self.values += int(lengths.sum())

    def finish(self) -> dict[str, Any]:
        """Close the .bin and assemble the .idx from the side files; return a summary for the manifest."""
        self.bin.close()
        for f in self.side.values():
            f.close()
        with open(f"{self.prefix}.idx", "wb") as idx:
            idx.write(_INDEX_HEADER + struct.pack("<Q", 1) + struct.pack("<B", _DTYPE_CODES[self.dtype.type]))
            idx.write(struct.pack("<Q", self.sequences) + struct.pack("<Q", self.documents + 1))
            for key in ("lengths", "pointers", "documents"):
                with open(f"{self.prefix}.{key}.tmp", "rb") as part:
                    shutil.copyfileobj(part, idx, 1 << 22)
                Path(f"{self.prefix}.{key}.tmp").unlink()
        return {"dtype": self.dtype.name, "sequences": self.sequences, "documents": self.documents}


def write(source, out: Path, config) -> dict[str, Any]:
    """Write the Megatron export of one shard folder into `out`; return the manifest's `megatron` part."""
    dtype = token_dtype(source.manifest["tokenizer"].get("vocab_size"))
    tokens, mask = IndexedDatasetWriter(out / "tokens", dtype), IndexedDatasetWriter(out / "loss_mask", np.uint8)
    eos = source.manifest["tokenizer"].get("eos_token_id")
    pad_id = eos if eos is not None else source.manifest["tokenizer"].get("pad_token_id") or 0
    (out / BRIDGE_DIR).mkdir()
    n = len(source.files)
    # Parquet encoding is the slow part and releases the GIL: it runs in a thread, one batch behind the rest.
    with ThreadPoolExecutor(max_workers=1) as pool:
        for i, file in enumerate(source.files):
            name = out / BRIDGE_DIR / f"data-{i:05d}-of-{n:05d}.idx.parquet"
            with pq.ParquetWriter(name, _BRIDGE_SCHEMA, compression="zstd", use_dictionary=False,
                                  write_statistics=False) as bridge:
                pending = None
                for batch in source.batches(file):
                    rows = bridge_rows(batch, source.pad_multiple, pad_id)
                    if pending is not None:
                        pending.result()
                    pending = pool.submit(bridge.write_table, rows, row_group_size=BRIDGE_ROW_GROUP)
                    tokens.add(batch.input_ids, batch.seq_lengths, batch.example_offsets)
                    mask.add((batch.labels != -100).view(np.uint8), batch.seq_lengths, batch.example_offsets)
                if pending is not None:
                    pending.result()
    return {
        "tokens": tokens.finish() | {"prefix": "tokens"},
        "loss_mask": mask.finish() | {"prefix": "loss_mask"},
        "bridge": {"path": BRIDGE_DIR, "pad_seq_to_mult": source.pad_multiple, "pad_id": int(pad_id),
                   "columns": _BRIDGE_SCHEMA.names},
    }


def bridge_rows(batch, multiple: int, pad_id: int) -> pa.Table:
    """Shard rows in Megatron-Bridge's packed-SFT form (input_ids, rolled loss_mask, seq_start_id).

    Each example keeps its real tokens; with `multiple` > 1 it is padded with `pad_id` to
    `ceil((len - 1) / multiple) * multiple + 1` tokens, Bridge's CP layout.

    >>> import pyarrow as pa; from prep.export import row_batch
    >>> b = row_batch(pa.record_batch({"input_ids": [[5, 6, 7, 8]], "labels": [[-100, 6, -100, 8]],
    ...     "position_ids": [[0, 1, 0, 1]], "seq_lengths": [[2, 2]]}))
    >>> bridge_rows(b, 1, 0).to_pylist()
    [{'input_ids': [5, 6, 7, 8], 'loss_mask': [1, 0, 1, 0], 'seq_start_id': [0, 2]}]
    """
    seq, real = batch.seq_lengths.astype(np.int64), batch.real_lengths.astype(np.int64)
    ids, labels = batch.input_ids, batch.labels
    if batch.real_lengths is not batch.seq_lengths:  # drop prep's padding: Bridge pads its own way
        pos = concat_ranges(np.cumsum(seq) - seq, real)
        ids, labels = ids[pos], labels[pos]
    starts = np.cumsum(real) - real
    rolled = np.zeros(len(ids), dtype=np.int8)
    rolled[:-1] = labels[1:] != -100
    rolled[starts + real - 1] = 0  # the last token of an example predicts nothing in it
    stored = real
    out_ids, out_mask = ids, rolled
    if multiple > 1:
        stored = -(-(real - 1) // multiple) * multiple + 1
        where = concat_ranges(np.cumsum(stored) - stored, real)
        out_ids = np.full(int(stored.sum()), pad_id, dtype=np.int32)
        out_mask = np.zeros(len(out_ids), dtype=np.int8)
        out_ids[where], out_mask[where] = ids, rolled
    row_offsets = np.concatenate(([0], np.cumsum(stored)))[batch.example_offsets]
    starts_in_row = (np.cumsum(stored) - stored) - np.repeat(row_offsets[:-1], np.diff(batch.example_offsets))
    return pa.Table.from_arrays(
        [_lists(row_offsets, out_ids), _lists(row_offsets, out_mask),
         _lists(batch.example_offsets, starts_in_row.astype(np.int32))], schema=_BRIDGE_SCHEMA)


def _lists(offsets: np.ndarray, values: np.ndarray) -> pa.ListArray:
    """A list array from int offsets and values (offsets as int32, the Arrow list type)."""
    return pa.ListArray.from_arrays(pa.array(np.asarray(offsets, dtype=np.int32)), pa.array(values))
