"""Plan packed rows on example lengths (best-fit-decreasing over the whole set) and build them as Arrow.

Planning sees lengths only; tokens stay in the spill store until `build_rows` gathers one slice of rows.
"""

from __future__ import annotations

import bisect
from collections import deque
from dataclasses import dataclass, replace

import numpy as np
import pyarrow as pa

from prep.contract import IGNORE_INDEX, packing_figures, shard_columns
from prep.errors import ConfigError
from prep.spill import ExampleStore, concat_ranges


@dataclass(frozen=True)
class PackPlan:
    """Rows as runs of example indices: row r holds `order[row_offsets[r]:row_offsets[r + 1]]`.

    `strategy` is "bfd" for packed rows and "none" for one example per row (`--no-pack`). With
    `pad_to_multiple_of` N > 1 every example is laid out padded to a multiple of N tokens with `pad_id`
    (labels -100, position_ids continuing), as context-parallel attention needs (`pad_examples`).
    """

    order: np.ndarray  # int64, example indices in row order
    row_offsets: np.ndarray  # int64, len = rows + 1
    strategy: str = "bfd"
    pad_to_multiple_of: int = 1
    pad_id: int = 0

    @property
    def packed(self) -> bool:
        """True when rows may hold several examples (no attention_mask column)."""
        return self.strategy != "none"

    @property
    def num_rows(self) -> int:
        """Number of rows in the plan."""
        return len(self.row_offsets) - 1

    def row(self, r: int) -> np.ndarray:
        """Example indices of row `r`, in the order they are laid out."""
        return self.order[self.row_offsets[r] : self.row_offsets[r + 1]]

    @property
    def padded(self) -> bool:
        """True when examples are padded to a multiple of `pad_to_multiple_of` (> 1)."""
        return self.pad_to_multiple_of > 1

    def row_tokens(self, lengths: np.ndarray) -> np.ndarray:
        """Tokens per row (int64) as laid out (padding included), given the real example lengths."""
        per_slot = padded_lengths(lengths, self.pad_to_multiple_of)[self.order]
        cum = np.concatenate(([0], np.cumsum(per_slot)))
        return cum[self.row_offsets[1:]] - cum[self.row_offsets[:-1]]


def padded_lengths(lengths: np.ndarray, multiple: int) -> np.ndarray:
    """Each length rounded up to a multiple of `multiple` (int64).

    >>> padded_lengths(np.array([1, 8, 9]), 8).tolist()
    [8, 8, 16]
    """
    lengths = np.asarray(lengths, dtype=np.int64)
    return -(-lengths // multiple) * multiple


def with_padding(plan: PackPlan, multiple: int, pad_id: int) -> PackPlan:
    """The same rows with every example padded to a multiple of `multiple` tokens using `pad_id`.

    Plan the rows on `padded_lengths` so that they still fit; `build_rows` lays the padding out.

    >>> lengths = np.array([3, 9])
    >>> with_padding(plan_bfd(padded_lengths(lengths, 8), 16), 8, pad_id=0).row_tokens(lengths).tolist()
    [16, 8]
    """
    if multiple < 1:
        raise ConfigError(f"--pad-to-multiple-of must be >= 1, got {multiple}")
    return replace(plan, pad_to_multiple_of=multiple, pad_id=pad_id)


def plan_bfd(lengths: np.ndarray, max_len: int) -> PackPlan:
    """Pack examples into rows of at most `max_len` tokens with best-fit-decreasing over the whole set.

    Equal to item-by-item BFD (longest first; each item goes to the open row with the least room that
    fits it, ties to the row that reached that room first; a new row when none fits), but runs in
    O(n log n): items are handled in groups of equal length and bins in buckets by remaining room, so
    k equal items going into m equally full rows is one numpy step. Rows come out in creation order;
    within a row, examples are in placement order (longest first). Call `shuffle_rows` afterwards.

    Args:
        lengths: tokens per example (each 1..max_len).
        max_len: row capacity in tokens.

    Returns:
        The plan (`strategy="bfd"`).

    Raises:
        ConfigError: an example is longer than `max_len` or empty.

    >>> p = plan_bfd(np.array([3, 4, 1]), max_len=4)
    >>> [p.row(r).tolist() for r in range(p.num_rows)]
    [[1], [0, 2]]
    """
    lengths = _checked_lengths(lengths, max_len)
    by_length = np.argsort(-lengths, kind="stable")
    sorted_lengths = lengths[by_length]
    bin_of_slot = _assign_bins(sorted_lengths, max_len)
    order = by_length[np.argsort(bin_of_slot, kind="stable")]
    rows = np.bincount(bin_of_slot) if len(bin_of_slot) else np.zeros(0, np.int64)
    row_offsets = np.concatenate(([0], np.cumsum(rows))).astype(np.int64)
    return PackPlan(order=order.astype(np.int64), row_offsets=row_offsets, strategy="bfd")


def _checked_lengths(lengths: np.ndarray, max_len: int) -> np.ndarray:
    """Lengths as int64 after checking 1 <= length <= max_len."""
    lengths = np.asarray(lengths, dtype=np.int64)
    if max_len < 1:
        raise ConfigError(f"max_len must be >= 1, got {max_len}; set --max-len")
    if len(lengths) and lengths.max() > max_len:
        i = int(np.argmax(lengths))
        raise ConfigError(
            f"example {i} has {int(lengths[i])} tokens > max_len {max_len}; "
            "set --overflow truncate|split or raise --max-len"
        )
    if len(lengths) and lengths.min() < 1:
        raise ConfigError(f"example {int(np.argmin(lengths))} is empty; empty examples cannot be packed")
    return lengths


class _Buckets:
    """Open bins grouped by remaining room: FIFO queues of bin-id arrays plus a sorted list of non-empty rooms."""

    def __init__(self) -> None:
        self.queues: dict[int, deque[np.ndarray]] = {}
        self.sizes: dict[int, int] = {}
        self.rooms: list[int] = []  # sorted, rooms whose queue is non-empty

    def smallest_room_at_least(self, need: int) -> int | None:
        """The least remaining room >= need that some open bin has, or None."""
        i = bisect.bisect_left(self.rooms, need)
        return self.rooms[i] if i < len(self.rooms) else None

    def push(self, room: int, bins: np.ndarray) -> None:
        """Append bins (in order) to the queue for `room`; full bins (room 0) are dropped."""
        if room <= 0 or len(bins) == 0:
            return
        if not self.sizes.get(room):
            bisect.insort(self.rooms, room)
            self.queues[room] = deque()
            self.sizes[room] = 0
        self.queues[room].append(bins)
        self.sizes[room] += len(bins)

    def pop_front(self, room: int, count: int) -> np.ndarray:
        """Remove and return up to `count` bins from the front of the queue for `room`."""
        queue, taken, need = self.queues[room], [], count
        while need and queue:
            head = queue.popleft()
            if len(head) > need:
                queue.appendleft(head[need:])
                head = head[:need]
            taken.append(head)
            need -= len(head)
        self.sizes[room] -= count - need
        if not self.sizes[room]:
            self.rooms.remove(room)
        return np.concatenate(taken)


def _assign_bins(sorted_lengths: np.ndarray, max_len: int) -> np.ndarray:
    """Bin id for each item of a length-descending array, exactly as item-by-item BFD places it."""
    bin_of_slot = np.empty(len(sorted_lengths), dtype=np.int64)
    buckets, next_bin = _Buckets(), 0
    values, starts, counts = np.unique(-sorted_lengths, return_index=True, return_counts=True)
    for neg_length, start, count in zip(values.tolist(), starts.tolist(), counts.tolist(), strict=True):
        length, pos, left = -neg_length, start, count
        while left:
            room = buckets.smallest_room_at_least(length)
            per_bin = (room or max_len) // length  # a bin keeps the best fit until it has no room for another
            wanted = -(-left // per_bin)
            if room is None:
                bins = np.arange(next_bin, next_bin + wanted, dtype=np.int64)
                next_bin += wanted
                room = max_len
            else:
                bins = buckets.pop_front(room, wanted)
            placed = min(left, len(bins) * per_bin)
            bin_of_slot[pos : pos + placed] = np.repeat(bins, per_bin)[:placed]
            full, last_fill = len(bins), per_bin
            if placed < len(bins) * per_bin:  # the group ran out inside the last bin
                full, last_fill = len(bins) - 1, placed - (len(bins) - 1) * per_bin
            buckets.push(room - per_bin * length, bins[:full])
            buckets.push(room - last_fill * length, bins[full:])
            pos, left = pos + placed, left - placed
    return bin_of_slot


def shuffle_rows(plan: PackPlan, seed: int) -> PackPlan:
    """Permute whole rows with a seeded generator; examples inside a row keep their order.

    Args:
        plan: a plan from `plan_bfd`.
        seed: seed for `numpy.random.default_rng`.

    Returns:
        A new plan with the same rows in shuffled order.

    >>> p = shuffle_rows(plan_bfd(np.array([3, 4, 1]), 4), seed=0)
    >>> sorted(p.row(r).tolist() for r in range(p.num_rows))
    [[0, 2], [1]]
    """
    perm = np.random.default_rng(seed).permutation(plan.num_rows)
    sizes = np.diff(plan.row_offsets)[perm]
    starts = plan.row_offsets[:-1][perm]
    new_offsets = np.concatenate(([0], np.cumsum(sizes))).astype(np.int64)
    order = plan.order[concat_ranges(starts, sizes)]
    return replace(plan, order=order, row_offsets=new_offsets)


def plan_unpacked(n: int, seed: int) -> PackPlan:
    """One example per row, rows in seeded random order (`--no-pack`).

    >>> plan_unpacked(3, seed=0).row_offsets.tolist()
    [0, 1, 2, 3]
    """
    order = np.random.default_rng(seed).permutation(n).astype(np.int64)
    return PackPlan(order=order, row_offsets=np.arange(n + 1, dtype=np.int64), strategy="none")


def build_rows(store: ExampleStore, plan: PackPlan, rows: slice) -> pa.Table:
    """Gather rows `rows` of the plan from the store as an Arrow table in the shard schema.

    Columns (all list<int32>): input_ids, labels, position_ids (restart at 0 per example),
    seq_lengths, and attention_mask (all ones) when the plan is unpacked. A padded plan lays each example
    out padded (see `pad_examples`): seq_lengths are then the padded lengths, and `seq_lengths_unpadded`
    holds the real ones.

    Args:
        store: the spilled examples.
        plan: the row plan.
        rows: a slice of row numbers (step 1).

    Returns:
        A table with one line per row.

    >>> import tempfile
    >>> ids, labels = [[1, 2, 3], [4, 5, 6, 7], [8]], [[-100, 2, 3], [-100, 5, 6, 7], [-100]]
    >>> with ExampleStore(parent=tempfile.mkdtemp()) as store:
    ...     store.append(pa.table({"input_ids": ids, "labels": labels}))
    ...     rows = build_rows(store, plan_bfd(store.lengths, 4), slice(0, 2)).to_pydict()
    >>> rows["input_ids"], rows["position_ids"], rows["seq_lengths"]
    ([[4, 5, 6, 7], [1, 2, 3, 8]], [[0, 1, 2, 3], [0, 1, 2, 0]], [[4], [3, 1]])
    """
    start, stop, _ = rows.indices(plan.num_rows)
    stop = max(start, stop)
    examples = plan.order[plan.row_offsets[start] : plan.row_offsets[stop]]
    examples_per_row = plan.row_offsets[start : stop + 1] - plan.row_offsets[start]  # offsets into `examples`
    input_ids, labels, lengths = store.gather(examples)
    real_lengths = lengths
    if plan.padded:
        input_ids, labels, lengths = pad_examples(input_ids, labels, lengths, plan.pad_to_multiple_of, plan.pad_id)
    example_starts = np.concatenate(([0], np.cumsum(lengths)))  # token offset of each example, then the end
    token_offsets = example_starts[examples_per_row]
    position_ids = np.arange(len(input_ids)) - np.repeat(example_starts[:-1], lengths)
    columns = [
        _list_column(token_offsets, input_ids),
        _list_column(token_offsets, labels),
        _list_column(token_offsets, position_ids),
        _list_column(examples_per_row, lengths),
    ]
    if not plan.packed:
        columns.append(_list_column(token_offsets, np.ones(len(input_ids), dtype=np.int32)))
    if plan.padded:
        columns.append(_list_column(examples_per_row, real_lengths))
    return pa.Table.from_arrays(columns, schema=shard_schema(plan.packed, plan.padded))


def pad_examples(
    input_ids: np.ndarray, labels: np.ndarray, lengths: np.ndarray, multiple: int, pad_id: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pad every example (concatenated in `input_ids`/`labels`) at its end to a multiple of `multiple` tokens.

    Pad tokens get `pad_id` and label -100; the example keeps them, so its position_ids simply continue.

    Returns:
        (input_ids int32, labels int32, padded lengths int64).

    >>> ids, labels, lengths = pad_examples(np.array([5, 6, 7]), np.array([-100, 6, -100]), np.array([2, 1]), 2, 0)
    >>> ids.tolist(), labels.tolist(), lengths.tolist()
    ([5, 6, 7, 0], [-100, 6, -100, -100], [2, 2])
    """
    lengths = np.asarray(lengths, dtype=np.int64)
    padded = padded_lengths(lengths, multiple)
    where = concat_ranges(np.cumsum(padded) - padded, lengths)  # the real tokens' places in the padded layout
    out_ids = np.full(int(padded.sum()), pad_id, dtype=np.int32)
    out_labels = np.full(len(out_ids), IGNORE_INDEX, dtype=np.int32)
    out_ids[where], out_labels[where] = input_ids, labels
    return out_ids, out_labels, padded


def _list_column(offsets: np.ndarray, values: np.ndarray) -> pa.ListArray:
    """list<int32> array from int offsets and int values (int32 on the way in: Arrow list offsets are 32-bit)."""
    if len(offsets) and offsets[-1] >= 2**31:
        raise ValueError(f"{int(offsets[-1])} values in one record batch overflow int32 list offsets")
    return pa.ListArray.from_arrays(pa.array(offsets.astype(np.int32)), pa.array(values.astype(np.int32, copy=False)))


def shard_schema(packed: bool, padded: bool = False) -> pa.Schema:
    """The Arrow schema of shard rows: every column list<int32> (no metadata)."""
    return pa.schema([pa.field(n, pa.list_(pa.int32())) for n in shard_columns(packed, padded)])


def packing_stats(plan: PackPlan, lengths: np.ndarray, max_len: int) -> dict:
    """Fill of the rows: efficiency = tokens / (rows * max_len), and the row lower bound ceil(tokens / max_len).

    >>> packing_stats(plan_bfd(np.array([3, 4, 1]), 4), np.array([3, 4, 1]), 4)
    {'efficiency': 1.0, 'lower_bound_rows': 2, 'rows': 2}
    """
    return packing_figures(int(np.asarray(lengths, dtype=np.int64).sum()), plan.num_rows, max_len)
