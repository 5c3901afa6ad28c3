"""Tests for prep.spill: appending encoded batches to disk, lengths/trained counts, gathering back, checks."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from prep.errors import ShardError
from prep.spill import ExampleStore, concat_ranges


def batch(ids: list[list[int]], labels: list[list[int]], id_type: pa.DataType | None = None) -> pa.Table:
    id_type = id_type or pa.int32()
    return pa.table({
        "input_ids": pa.array(ids, pa.list_(id_type)),
        "labels": pa.array(labels, pa.list_(id_type)),
        "example_id": [f"e{k}" for k in range(len(ids))],
    })  # fmt: skip


@pytest.fixture
def store(tmp_path):
    with ExampleStore(tmp_path / "spill") as s:
        yield s


def test_append_lengths_trained_and_gather_exact(store):
    store.append(batch([[5, 6, 7], [8]], [[-100, 6, 7], [-100]]))
    store.append(batch([[9, 10]], [[-100, -100]]))
    assert store.lengths.tolist() == [3, 1, 2]
    assert store.trained_counts.tolist() == [2, 0, 0]
    assert len(store) == 3 and store.num_tokens == 6
    ids, labels, lengths = store.gather(np.array([2, 0, 1, 0]))
    assert ids.tolist() == [9, 10, 5, 6, 7, 8, 5, 6, 7]
    assert labels.tolist() == [-100, -100, -100, 6, 7, -100, -100, 6, 7]
    assert lengths.tolist() == [2, 3, 1, 3]
    assert ids.dtype == labels.dtype == np.int32


def test_spill_file_layout_is_ids_then_labels_per_example(store):
    store.append(batch([[5, 6], [8]], [[-100, 6], [-100]]))
    store.gather(np.array([0]))  # finishes appending
    assert np.fromfile(store.path, dtype=np.int32).tolist() == [5, 6, -100, 6, 8, -100]


def test_append_accepts_sliced_chunked_and_int64_columns(store):
    full = batch([[1, 2], [3, 4, 5], [6]], [[-100, 2], [-100, -100, 5], [-100]], id_type=pa.int64())
    chunked = pa.concat_tables([full.slice(1, 1), full.slice(2, 1)])  # two chunks, both with offsets
    store.append(chunked)
    store.append(pa.RecordBatch.from_pylist([{"input_ids": [7, 8], "labels": [-100, 8]}]))
    assert store.lengths.tolist() == [3, 1, 2]
    assert store.trained_counts.tolist() == [1, 0, 1]
    assert store.gather(np.arange(3))[0].tolist() == [3, 4, 5, 6, 7, 8]


def test_gather_nothing_and_empty_store(store):
    ids, labels, lengths = store.gather(np.zeros(0, dtype=np.int64))
    assert ids.size == labels.size == lengths.size == 0
    assert store.lengths.dtype == np.int32 and len(store) == 0 and store.num_tokens == 0


@pytest.mark.parametrize(
    ("ids", "labels", "match"),
    [
        ([[1, 2]], [[-100]], "differ in length"),
        ([[]], [[]], "empty example"),
        ([[1, 2]], [[1, 2]], "first label"),
        ([[1, 2]], [[-100, 3]], "-100 or equal"),
        ([[1, None]], [[-100, 2]], "nulls"),
    ],
)
def test_append_rejects_contract_violations(store, ids, labels, match):
    with pytest.raises(ShardError, match=match):
        store.append(batch(ids, labels))


def test_append_requires_columns_and_no_append_after_gather(store):
    with pytest.raises(ShardError, match="no 'labels' column"):
        store.append(pa.table({"input_ids": [[1]]}))
    store.append(batch([[1]], [[-100]]))
    store.gather(np.array([0]))
    with pytest.raises(ShardError, match="before gathering"):
        store.append(batch([[1]], [[-100]]))


def test_close_removes_files_and_owned_folder(tmp_path):
    given = ExampleStore(tmp_path / "given")
    given.append(batch([[1]], [[-100]]))
    given.close()
    assert (tmp_path / "given").is_dir() and not any((tmp_path / "given").iterdir())
    with ExampleStore(parent=tmp_path) as owned:
        owned.append(batch([[1]], [[-100]]))
        folder = owned.directory
        assert folder.parent == tmp_path and folder.name.startswith(".prep-spill-")
    assert not folder.exists()


def test_truncated_spill_file_is_detected(store):
    store.append(batch([[1, 2, 3]], [[-100, 2, 3]]))
    store.gather(np.array([0]))
    with open(store.path, "r+b") as f:
        f.truncate(8)
    with pytest.raises(ShardError, match="truncated"):
        store.gather(np.array([0]))


def test_memory_holds_lengths_not_tokens(store):
    rng = np.random.default_rng(0)
    for _ in range(5):
        lengths = rng.integers(100, 300, size=200)
        ids = [rng.integers(0, 1000, size=k).tolist() for k in lengths]
        store.append(batch(ids, [[-100] + x[1:] for x in ids]))
    held = sum(a.nbytes for a in vars(store).values() if isinstance(a, np.ndarray))
    held += sum(a.nbytes for parts in (store._length_parts, store._trained_parts) for a in parts)
    assert store.num_tokens > 100_000 and held <= 16 * len(store)


def test_concat_ranges():
    assert concat_ranges(np.array([5, 0, 9]), np.array([2, 3, 0])).tolist() == [5, 6, 0, 1, 2]
    assert concat_ranges(np.zeros(0), np.zeros(0)).tolist() == []
