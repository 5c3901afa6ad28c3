"""On-disk store for encoded examples: one flat int32 file that is appended to, then read back by example.

Only per-example lengths and trained-token counts stay in memory (8 bytes per example), so packing a
data set ten times larger costs ten times the disk, not ten times the RAM.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from prep.contract import IGNORE_INDEX
from prep.errors import ShardError

_SPILL_FILE = "examples.i32"  # per example: its input_ids, then its labels, as native-endian int32


def concat_ranges(starts: np.ndarray, sizes: np.ndarray) -> np.ndarray:
    """Concatenate arange(s, s + k) for every (s, k) without a Python loop (int64).

    >>> concat_ranges(np.array([5, 0]), np.array([2, 3])).tolist()
    [5, 6, 0, 1, 2]
    """
    sizes = np.asarray(sizes, dtype=np.int64)
    out_starts = np.cumsum(sizes) - sizes
    shift = np.repeat(np.asarray(starts, dtype=np.int64) - out_starts, sizes)
    return shift + np.arange(int(sizes.sum()), dtype=np.int64)


class ExampleStore:
    """Append-only spill of encoded examples (`input_ids`, `labels`) to one flat int32 file.

    Append Arrow tables while encoding; read `lengths`/`trained_counts` to plan; then `gather` the
    examples of a few rows at a time. Each example is stored as its input_ids followed by its labels,
    so one positioned read (preadv) fetches both straight into the output arrays. Nothing is memory-mapped:
    the kernel maps whole cached folios (up to MiBs) around every fault, so scattered reads from a mapping
    make resident memory grow with the file, whereas reads copy exactly the bytes asked for. Use as a
    context manager, or call `close()`, to delete the file (and the folder when the store created it).

    Args:
        directory: folder for the spill file; a fresh temporary folder when None.
        parent: where to create that temporary folder (e.g. the output's parent) when `directory` is None.

    >>> import tempfile
    >>> t = pa.table({"input_ids": [[5, 6, 7], [8]], "labels": [[-100, 6, 7], [-100]], "example_id": ["a", "b"]})
    >>> with ExampleStore(parent=tempfile.gettempdir()) as store:
    ...     store.append(t)
    ...     ids, labels, lengths = store.gather(np.array([1, 0]))
    >>> ids.tolist(), labels.tolist(), lengths.tolist()
    ([8, 5, 6, 7], [-100, -100, 6, 7], [1, 3])
    """

    def __init__(self, directory: str | Path | None = None, *, parent: str | Path | None = None):
        self._owns_dir = directory is None
        if directory is None:
            directory = tempfile.mkdtemp(prefix=".prep-spill-", dir=parent)
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.path = self.directory / _SPILL_FILE
        self._writer = open(self.path, "wb")
        self._reader: int | None = None
        self._length_parts: list[np.ndarray] = []
        self._trained_parts: list[np.ndarray] = []
        self._group_runs: list[tuple[int, int]] = []  # (group, examples) per append: a few bytes per batch
        self._lengths: np.ndarray | None = None
        self._trained: np.ndarray | None = None
        self._byte_offsets: np.ndarray | None = None

    def __enter__(self) -> ExampleStore:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def append(self, table: pa.Table | pa.RecordBatch, group: int = 0) -> None:
        """Spill one batch of encoded examples (columns `input_ids`, `labels`: list of ints; others ignored).

        `group` tags every example of the batch (e.g. the index of the template that rendered it); see `groups`.

        Raises:
            ShardError: the batch breaks the encoded-example contract (nulls, length mismatch, empty
                example, first label not -100, or a label that is neither -100 nor its token), or
                examples are appended after reading has started.
        """
        if self._writer is None:
            raise ShardError("ExampleStore.append after gather/close: append all examples before gathering")
        ids, id_lengths = _flat_int32(table, "input_ids")
        labels, label_lengths = _flat_int32(table, "labels")
        if not np.array_equal(id_lengths, label_lengths):
            raise ShardError("encoded batch: labels and input_ids differ in length for some example")
        _check_examples(ids, labels, id_lengths)
        self._writer.write(_interleave(ids, labels, id_lengths).tobytes())
        self._length_parts.append(id_lengths)
        self._trained_parts.append(_segment_sums(labels != IGNORE_INDEX, id_lengths))
        self._group_runs.append((group, len(id_lengths)))
        self._lengths = self._trained = None

    @property
    def groups(self) -> np.ndarray:
        """The `group` of every example (int32), in append order."""
        runs = np.array(self._group_runs, dtype=np.int64).reshape(-1, 2)
        return np.repeat(runs[:, 0], runs[:, 1]).astype(np.int32)

    @property
    def lengths(self) -> np.ndarray:
        """Tokens per example (int32), in append order."""
        if self._lengths is None:
            self._lengths = np.concatenate([np.zeros(0, np.int32), *self._length_parts])
            self._length_parts = [self._lengths]
        return self._lengths

    @property
    def trained_counts(self) -> np.ndarray:
        """Trained tokens (labels != -100) per example (int32), in append order."""
        if self._trained is None:
            self._trained = np.concatenate([np.zeros(0, np.int32), *self._trained_parts])
            self._trained_parts = [self._trained]
        return self._trained

    def __len__(self) -> int:
        return len(self.lengths)

    @property
    def num_tokens(self) -> int:
        """Total tokens in the store."""
        return int(self.lengths.sum(dtype=np.int64))

    def gather(self, examples: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Read the tokens of `examples` (indices, in the given order) back from disk.

        Returns:
            (input_ids int32, labels int32), each the examples' values concatenated in that order,
            and the example lengths (int64).

        Raises:
            ShardError: the spill file is shorter than recorded (deleted or truncated underneath us).
        """
        self._open_reader()
        examples = np.asarray(examples, dtype=np.int64)
        lengths = self.lengths[examples].astype(np.int64)
        input_ids = np.empty(int(lengths.sum()), dtype=np.int32)
        labels = np.empty_like(input_ids)
        ids_bytes, labels_bytes = memoryview(input_ids).cast("B"), memoryview(labels).cast("B")
        sizes = (lengths * 4).tolist()
        ends = np.cumsum(lengths * 4).tolist()
        # One syscall per example (not per token): it fills both outputs from one contiguous record.
        for offset, size, end in zip(self._byte_offsets[examples].tolist(), sizes, ends, strict=True):
            got = os.preadv(self._reader, [ids_bytes[end - size : end], labels_bytes[end - size : end]], offset)
            if got != 2 * size:
                raise ShardError(f"spill file {self.path} is truncated: it was changed while packing")
        return input_ids, labels, lengths

    def close(self) -> None:
        """Close and delete the spill file (and the folder if the store created it)."""
        self._close_writer()
        if self._reader is not None:
            os.close(self._reader)
            self._reader = None
        self.path.unlink(missing_ok=True)
        if self._owns_dir:
            shutil.rmtree(self.directory, ignore_errors=True)

    def _close_writer(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def _open_reader(self) -> None:
        """Finish appending and open the spill file for positioned reads (once)."""
        if self._reader is not None:
            return
        self._close_writer()
        self._byte_offsets = 8 * (np.cumsum(self.lengths, dtype=np.int64) - self.lengths)
        self._reader = os.open(self.path, os.O_RDONLY)


def _interleave(ids: np.ndarray, labels: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Per example, its ids then its labels: [ids_0, labels_0, ids_1, labels_1, ...] (int32).

    >>> _interleave(np.array([1, 2, 3]), np.array([-1, -2, -3]), np.array([2, 1])).tolist()
    [1, 2, -1, -2, 3, -3]
    """
    starts = np.cumsum(lengths, dtype=np.int64) - lengths
    out = np.empty(2 * len(ids), dtype=np.int32)
    out[concat_ranges(2 * starts, lengths)] = ids
    out[concat_ranges(2 * starts + lengths, lengths)] = labels
    return out


def _flat_int32(table: pa.Table | pa.RecordBatch, name: str) -> tuple[np.ndarray, np.ndarray]:
    """A list column as (flat int32 values, int32 lengths), honouring slices and chunks."""
    if name not in table.column_names:
        raise ShardError(f"encoded batch has no {name!r} column (got {table.column_names})")
    column = table.column(name)
    chunks = column.chunks if isinstance(column, pa.ChunkedArray) else [column]
    values, lengths = [np.zeros(0, np.int32)], [np.zeros(0, np.int32)]
    for chunk in chunks:
        if chunk.null_count or chunk.flatten().null_count:
            raise ShardError(f"encoded batch: {name!r} has nulls")
        values.append(pc.cast(chunk.flatten(), pa.int32()).to_numpy(zero_copy_only=False))
        lengths.append(pc.list_value_length(chunk).to_numpy(zero_copy_only=False).astype(np.int32))
    return np.concatenate(values), np.concatenate(lengths)


def _segment_sums(mask: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Per-example count of True in a flat mask split by `lengths` (int32)."""
    cum = np.concatenate(([0], np.cumsum(mask, dtype=np.int64)))
    ends = np.cumsum(lengths, dtype=np.int64)
    return (cum[ends] - cum[ends - lengths]).astype(np.int32)


def _check_examples(ids: np.ndarray, labels: np.ndarray, lengths: np.ndarray) -> None:
    """Enforce the encoded-example contract cheaply on whole arrays."""
    if len(lengths) and lengths.min() < 1:
        raise ShardError("encoded batch has an empty example; the encoder must drop or reject it")
    starts = np.cumsum(lengths, dtype=np.int64) - lengths
    if np.any(labels[starts] != IGNORE_INDEX):
        raise ShardError("encoded batch: the first label of every example must be -100")
    if np.any((labels != IGNORE_INDEX) & (labels != ids)):
        raise ShardError("encoded batch: every label must be -100 or equal to its input_id")
