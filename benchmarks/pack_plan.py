"""Benchmark BFD planning on one million real-looking lengths; optionally, peak memory of spill + write.

Lengths are resampled (seeded) from the real records in shared/data/alpaca (UTF-8 bytes / 4 per record,
a rough token count); a lognormal stands in when that data is absent.

    python benchmarks/pack_plan.py                 # plan 1M lengths: time, efficiency, rows vs lower bound
    python benchmarks/pack_plan.py --rss           # also: peak RSS of spill + plan + write at 1x and 10x

Prints, for the whole-set BFD (prep.pack.plan_bfd), a TRL-style BFD run per batch of 1000 examples,
and an item-by-item Python BFD (the naive loop, which must give the identical plan).
"""

from __future__ import annotations

import argparse
import bisect
import json
import os
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from collections import deque
from pathlib import Path

import numpy as np

from prep.pack import packing_stats, plan_bfd, shuffle_rows

SHARED_DATA = Path(os.environ.get("PREP_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
ALPACA = SHARED_DATA / "alpaca"
FILES = ("alpaca_en_demo.json", "alpaca_zh_demo.json", "gpteacher_codegen-instruct.json")


def realistic_lengths(n: int, max_len: int, seed: int = 0) -> tuple[np.ndarray, str]:
    """n lengths resampled from real Alpaca-style records, or a lognormal if the data is missing."""
    rng = np.random.default_rng(seed)
    base = []
    for name in FILES:
        if (ALPACA / name).is_file():
            records = json.loads((ALPACA / name).read_text(encoding="utf-8"))
            base += [len("".join(v for v in r.values() if isinstance(v, str)).encode()) // 4 for r in records]
    if base:
        source = f"{len(base)} real records from {ALPACA}"
        return np.clip(rng.choice(np.array(base), size=n), 1, max_len), source
    return np.clip(rng.lognormal(5.0, 0.8, size=n).astype(np.int64), 1, max_len), "lognormal(5.0, 0.8)"


def itemwise_bfd(lengths: list[int], max_len: int) -> list[int]:
    """Naive loop: one item at a time, bins found by bisect over sorted rooms. Returns the row of each slot."""
    queues: dict[int, deque[int]] = {}
    rooms: list[int] = []
    bin_of_slot, n_bins = [], 0
    for length in sorted(lengths, reverse=True):
        k = bisect.bisect_left(rooms, length)
        if k == len(rooms):
            b, room, n_bins = n_bins, max_len, n_bins + 1
        else:
            room = rooms[k]
            b = queues[room].popleft()
            if not queues[room]:
                rooms.pop(k)
        bin_of_slot.append(b)
        left = room - length
        if left > 0:
            if not queues.get(left):
                bisect.insort(rooms, left)
                queues[left] = deque()
            queues[left].append(b)
    return bin_of_slot


def per_batch_rows(lengths: np.ndarray, max_len: int, batch: int) -> int:
    """Rows when BFD runs on each batch of `batch` examples separately (TRL packs per map batch)."""
    return sum(plan_bfd(lengths[s : s + batch], max_len).num_rows for s in range(0, len(lengths), batch))


def timed(fn, repeat: int) -> tuple[float, object]:
    """Median seconds over `repeat` runs, and the last result."""
    times, result = [], None
    for _ in range(repeat):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def report_planning(n: int, max_len: int, repeat: int) -> None:
    lengths, source = realistic_lengths(n, max_len)
    tokens = int(lengths.sum())
    print(f"lengths: {n:,} from {source}; mean {lengths.mean():.1f}, max {lengths.max()}, max_len {max_len}")
    t_plan, plan = timed(lambda: plan_bfd(lengths, max_len), repeat)
    t_shuffle, _ = timed(lambda: shuffle_rows(plan, 0), repeat)
    stats = packing_stats(plan, lengths, max_len)
    over = stats["rows"] / stats["lower_bound_rows"] - 1
    print(f"whole-set BFD  : {t_plan:6.3f} s (median of {repeat}), shuffle {t_shuffle:.3f} s")
    print(f"  rows {stats['rows']:,} vs lower bound {stats['lower_bound_rows']:,} (+{over:.3%}), "
          f"efficiency {stats['efficiency']:.4%}")  # fmt: skip
    t_batch, rows = timed(lambda: per_batch_rows(lengths, max_len, 1000), 1)
    print(f"per-1000 BFD   : {t_batch:6.3f} s, rows {rows:,} (+{rows / stats['lower_bound_rows'] - 1:.3%}), "
          f"efficiency {tokens / (rows * max_len):.4%}")  # fmt: skip
    t_naive, slots = timed(lambda: itemwise_bfd(lengths.tolist(), max_len), 1)
    by_length = np.argsort(-lengths, kind="stable")
    same = np.array_equal(by_length[np.argsort(np.array(slots), kind="stable")], plan.order)
    print(f"item-by-item   : {t_naive:6.3f} s ({t_naive / t_plan:.0f}x slower), identical plan: {same}")


RSS_SCRIPT = textwrap.dedent(
    """
    import resource, sys, time
    import numpy as np, pyarrow as pa
    from prep.pack import plan_bfd, shuffle_rows
    from prep.spill import ExampleStore
    from prep.write import write_shards
    lengths, parent = np.load(sys.argv[1]), sys.argv[2]
    rng = np.random.default_rng(0)
    start = time.perf_counter()
    with ExampleStore(parent=parent) as store:
        for s in range(0, len(lengths), 4096):
            part = lengths[s : s + 4096]
            offsets = np.concatenate(([0], np.cumsum(part))).astype(np.int32)
            ids = rng.integers(0, 50_000, size=int(offsets[-1]), dtype=np.int32)
            labels = ids.copy()
            labels[offsets[:-1]] = -100
            store.append(pa.table({"input_ids": pa.ListArray.from_arrays(offsets, ids),
                                   "labels": pa.ListArray.from_arrays(offsets, labels)}))
        plan = shuffle_rows(plan_bfd(store.lengths, 2048), 0)
        m = write_shards(store, plan, parent + "/out", max_len=2048, seed=0, shard_size="256MB")
    print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, len(m["shards"]), time.perf_counter() - start)
    """
)


def report_rss(n: int) -> None:
    """Peak RSS of a child process that spills, plans and writes n and then 10n examples."""
    peaks = []
    for scale in (1, 10):
        lengths, _ = realistic_lengths(n * scale, 2048, seed=scale)
        with tempfile.TemporaryDirectory() as parent:
            np.save(f"{parent}/lengths.npy", lengths)
            out = subprocess.run([sys.executable, "-c", RSS_SCRIPT, f"{parent}/lengths.npy", parent],
                                 capture_output=True, text=True, check=True).stdout.split()  # fmt: skip
        peaks.append(int(out[0]) / 1024)
        print(f"spill+write {scale:>2}x: {n * scale:,} examples, {int(lengths.sum()):,} tokens, "
              f"{out[1]} shards, {float(out[2]):.1f} s, peak RSS {peaks[-1]:.0f} MiB")  # fmt: skip
    print(f"peak RSS 10x / 1x = {peaks[1] / peaks[0]:.2f} (target <= 1.5)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=1_000_000, help="lengths to plan")
    parser.add_argument("--max-len", type=int, default=2048)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--rss", action="store_true", help="also measure peak RSS of spill + write")
    parser.add_argument("--rss-n", type=int, default=50_000, help="examples at 1x for --rss")
    args = parser.parse_args()
    report_planning(args.n, args.max_len, args.repeat)
    if args.rss:
        report_rss(args.rss_n)


if __name__ == "__main__":
    main()
