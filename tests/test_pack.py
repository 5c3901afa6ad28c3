"""Tests for prep.pack: BFD planning (exact vs references), shuffling, row building, packing efficiency."""

from __future__ import annotations

import bisect
import json
import os
from collections import deque
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from prep.errors import ConfigError
from prep.pack import PackPlan, build_rows, packing_stats, plan_bfd, plan_unpacked, shuffle_rows
from prep.spill import ExampleStore

SHARED_DATA = Path(os.environ.get("PREP_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))


# ---------- references ----------


def textbook_bfd(lengths: list[int], max_len: int) -> list[list[int]]:
    """Item-by-item BFD scanning every bin: O(n * bins); ties go to the lowest bin."""
    rows: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        fits = [b for b in range(len(rows)) if room[b] >= lengths[i]]
        if fits:
            best = min(fits, key=lambda b: room[b])
            rows[best].append(i)
            room[best] -= lengths[i]
        else:
            rows.append([i])
            room.append(max_len - lengths[i])
    return rows


def fifo_bfd(lengths: list[int], max_len: int) -> list[list[int]]:
    """Item-by-item BFD with plan_bfd's tie-break: among equal rooms, the bin that reached it first."""
    rows: list[list[int]] = []
    queues: dict[int, deque[int]] = {}
    rooms: list[int] = []  # sorted non-empty rooms
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        k = bisect.bisect_left(rooms, lengths[i])
        if k == len(rooms):
            b, room = len(rows), max_len
            rows.append([])
        else:
            room = rooms[k]
            b = queues[room].popleft()
            if not queues[room]:
                rooms.pop(k)
        rows[b].append(i)
        left = room - lengths[i]
        if left > 0:
            if not queues.get(left):
                bisect.insort(rooms, left)
                queues[left] = deque()
            queues[left].append(b)
    return rows


def rows_of(plan: PackPlan) -> list[list[int]]:
    return [plan.row(r).tolist() for r in range(plan.num_rows)]


def encoded_table(token_lists: list[list[int]], trained: list[list[bool]] | None = None) -> pa.Table:
    """An encoded batch: labels = ids where trained (first label always -100)."""
    labels = []
    for k, ids in enumerate(token_lists):
        mask = trained[k] if trained else [True] * len(ids)
        labels.append([-100 if (j == 0 or not mask[j]) else t for j, t in enumerate(ids)])
    return pa.table({
        "input_ids": pa.array(token_lists, pa.list_(pa.int32())),
        "labels": pa.array(labels, pa.list_(pa.int32())),
        "example_id": [f"ex{k}" for k in range(len(token_lists))],
    })  # fmt: skip


@pytest.fixture
def store(tmp_path):
    with ExampleStore(tmp_path / "spill") as s:
        yield s


def random_store(store: ExampleStore, rng: np.random.Generator, n: int, max_len: int) -> list[list[int]]:
    lengths = rng.integers(1, max_len + 1, size=n)
    examples = [rng.integers(0, 50_000, size=int(k)).tolist() for k in lengths]
    trained = [(rng.random(len(e)) < 0.6).tolist() for e in examples]
    for start in range(0, n, 97):  # several appends, uneven batches
        store.append(encoded_table(examples[start : start + 97], trained[start : start + 97]))
    return examples


# ---------- planning: exact small cases ----------


@pytest.mark.parametrize(
    ("lengths", "max_len", "rows"),
    [
        ([3, 4, 1], 4, [[1], [0, 2]]),
        ([3, 4, 1], 8, [[1, 0, 2]]),
        ([2, 2, 2, 2, 2], 6, [[0, 1, 2], [3, 4]]),  # equal items fill one row before the next
        ([5, 5, 3, 3, 2, 2], 8, [[0, 2], [1, 3], [4, 5]]),  # ties: the row that reached room 3 first
        ([1, 6, 3, 6, 2], 7, [[1, 0], [3], [2, 4]]),  # 2 joins the 3 (room 4); 1 fills the first room-1 row
        ([4], 4, [[0]]),
        ([], 4, []),
    ],
)
def test_plan_bfd_exact_rows(lengths, max_len, rows):
    assert rows_of(plan_bfd(np.array(lengths, dtype=np.int64), max_len)) == rows


def test_plan_bfd_offsets_and_dtypes():
    plan = plan_bfd(np.array([3, 4, 1]), 4)
    assert plan.order.tolist() == [1, 0, 2]
    assert plan.row_offsets.tolist() == [0, 1, 3]
    assert plan.order.dtype == np.int64 and plan.row_offsets.dtype == np.int64
    assert plan.row_tokens(np.array([3, 4, 1])).tolist() == [4, 4]
    assert plan.packed and plan.strategy == "bfd"


@pytest.mark.parametrize(("lengths", "match"), [([3, 5], "5 tokens > max_len 4"), ([3, 0], "empty")])
def test_plan_bfd_rejects_bad_lengths(lengths, match):
    with pytest.raises(ConfigError, match=match):
        plan_bfd(np.array(lengths), 4)


# ---------- planning: equal to item-by-item BFD ----------


@settings(max_examples=150, deadline=None)
@given(st.integers(1, 48).flatmap(lambda m: st.tuples(st.just(m), st.lists(st.integers(1, m), max_size=150))))
def test_plan_bfd_equals_itemwise_fifo_reference(case):
    max_len, lengths = case
    assert rows_of(plan_bfd(np.array(lengths, dtype=np.int64), max_len)) == fifo_bfd(lengths, max_len)


@pytest.mark.parametrize("seed", range(6))
def test_plan_bfd_matches_textbook_bfd_up_to_ties(seed):
    rng = np.random.default_rng(seed)
    max_len = int(rng.integers(8, 200))
    lengths = rng.integers(1, max_len + 1, size=400) // int(rng.integers(1, 4)) + 1
    lengths = np.minimum(lengths, max_len)
    plan = plan_bfd(lengths, max_len)
    reference = textbook_bfd(lengths.tolist(), max_len)
    # Bins with equal room are interchangeable, so the multiset of row fills is tie-independent.
    assert plan.num_rows == len(reference)
    assert sorted(plan.row_tokens(lengths).tolist()) == sorted(int(lengths[r].sum()) for r in reference)


def test_plan_bfd_large_matches_fifo_reference():
    rng = np.random.default_rng(7)
    lengths = np.clip(rng.lognormal(4.5, 0.9, size=50_000).astype(np.int64), 1, 512)
    assert rows_of(plan_bfd(lengths, 512)) == fifo_bfd(lengths.tolist(), 512)


# ---------- shuffling and --no-pack ----------


def test_shuffle_rows_is_seeded_permutation_of_rows():
    lengths = np.random.default_rng(0).integers(1, 64, size=500)
    plan = plan_bfd(lengths, 64)
    a, b, c = shuffle_rows(plan, 1), shuffle_rows(plan, 1), shuffle_rows(plan, 2)
    assert rows_of(a) == rows_of(b)
    assert rows_of(a) != rows_of(c) != rows_of(plan)
    assert sorted(map(tuple, rows_of(a))) == sorted(map(tuple, rows_of(plan)))
    assert a.strategy == "bfd"


def test_plan_unpacked_one_example_per_row_seeded():
    plan = plan_unpacked(6, seed=3)
    assert sorted(plan.order.tolist()) == list(range(6))
    assert plan.row_offsets.tolist() == list(range(7))
    assert plan.order.tolist() == plan_unpacked(6, seed=3).order.tolist()
    assert not plan.packed and plan.strategy == "none"
    assert plan_unpacked(0, seed=0).num_rows == 0


# ---------- building rows ----------


def test_build_rows_hand_computed(store):
    # TRL's example: [[1,2,3],[4,5,6,7],[8]] with max_len 4 -> [[4,5,6,7],[1,2,3,8]]
    store.append(encoded_table([[1, 2, 3], [4, 5, 6, 7], [8]], [[True, False, True], [True] * 4, [True]]))
    table = build_rows(store, plan_bfd(store.lengths, 4), slice(0, 2))
    assert table.schema.names == ["input_ids", "labels", "position_ids", "seq_lengths"]
    assert all(t == pa.list_(pa.int32()) for t in table.schema.types)
    assert table.to_pydict() == {
        "input_ids": [[4, 5, 6, 7], [1, 2, 3, 8]],
        "labels": [[-100, 5, 6, 7], [-100, -100, 3, -100]],
        "position_ids": [[0, 1, 2, 3], [0, 1, 2, 0]],
        "seq_lengths": [[4], [3, 1]],
    }


def test_build_rows_slice_and_unpacked_attention_mask(store):
    store.append(encoded_table([[1, 2, 3], [4, 5, 6, 7], [8]]))
    assert build_rows(store, plan_bfd(store.lengths, 4), slice(1, 2)).to_pydict()["seq_lengths"] == [[3, 1]]
    plan = PackPlan(order=np.array([2, 0]), row_offsets=np.array([0, 1, 2]), strategy="none")
    table = build_rows(store, plan, slice(0, 2))
    assert table.to_pydict() == {
        "input_ids": [[8], [1, 2, 3]],
        "labels": [[-100], [-100, 2, 3]],
        "position_ids": [[0], [0, 1, 2]],
        "seq_lengths": [[1], [3]],
        "attention_mask": [[1], [1, 1, 1]],
    }
    assert build_rows(store, plan, slice(2, 2)).num_rows == 0


@pytest.mark.parametrize("packed", [True, False])
def test_build_rows_invariants_random(store, packed):
    rng = np.random.default_rng(11)
    max_len = 96
    examples = random_store(store, rng, 700, max_len // 3)
    plan = plan_bfd(store.lengths, max_len) if packed else plan_unpacked(len(store), 0)
    plan = shuffle_rows(plan, 5)
    rows = build_rows(store, plan, slice(0, plan.num_rows)).to_pydict()
    seen = []
    for r, (ids, labels, pos, seqs) in enumerate(
        zip(rows["input_ids"], rows["labels"], rows["position_ids"], rows["seq_lengths"], strict=True)
    ):
        assert len(ids) == len(labels) == len(pos) == sum(seqs) <= max_len
        assert pos == [p for k in seqs for p in range(k)]
        assert all(label in (-100, t) for label, t in zip(labels, ids, strict=True))
        starts = np.cumsum([0, *seqs])[:-1]
        assert all(labels[s] == -100 for s in starts)
        for e, s, k in zip(plan.row(r).tolist(), starts, seqs, strict=True):
            assert ids[s : s + k] == examples[e]  # the example's tokens, whole and in order
            seen.append(e)
        if not packed:
            assert rows["attention_mask"][r] == [1] * len(ids)
    assert sorted(seen) == list(range(len(examples)))  # every example exactly once
    assert ("attention_mask" in rows) is not packed


# ---------- efficiency on real length distributions ----------


def real_lengths(name: str, repeat: int = 50, seed: int = 0) -> np.ndarray:
    """UTF-8 bytes / 4 of each real record (all string fields), repeated `repeat` times, shuffled."""
    path = SHARED_DATA / "alpaca" / name
    if not path.is_file():
        pytest.skip(f"shared data not found: {path}")
    records = json.loads(path.read_text(encoding="utf-8"))
    base = [max(1, len("".join(v for v in r.values() if isinstance(v, str)).encode()) // 4) for r in records]
    return np.random.default_rng(seed).permutation(np.tile(np.array(base, dtype=np.int64), repeat))


@pytest.mark.parametrize("name", ["alpaca_en_demo.json", "alpaca_zh_demo.json", "gpteacher_codegen-instruct.json"])
def test_bfd_efficiency_on_alpaca_like_lengths(name):
    lengths = real_lengths(name)
    stats = packing_stats(shuffle_rows(plan_bfd(lengths, 2048), 0), lengths, 2048)
    assert stats["efficiency"] >= 0.995
    assert stats["rows"] <= stats["lower_bound_rows"] * 1.005
    assert stats["lower_bound_rows"] == -(-int(lengths.sum()) // 2048)


def test_packing_stats_hand_computed():
    lengths = np.array([3, 4, 1, 2])
    assert packing_stats(plan_bfd(lengths, 4), lengths, 4) == {"efficiency": 0.833333, "lower_bound_rows": 3, "rows": 3}
    assert packing_stats(plan_bfd(np.zeros(0, np.int64), 4), np.zeros(0), 4) == {
        "efficiency": 0.0,
        "lower_bound_rows": 0,
        "rows": 0,
    }
