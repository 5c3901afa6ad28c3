"""`prep verify` speed: build valid synthetic shards of N tokens, then time `verify_shards` (median of runs).

Usage: python benchmarks/verify.py [--tokens 100000000] [--runs 5]

Prints GB/s, rows/s and tokens/s, next to the speed of sha256 alone over the same files (the ceiling: every
shard byte must be hashed).
"""

from __future__ import annotations

import argparse
import hashlib
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))


def sha256_seconds(folder: Path) -> float:
    """Seconds to sha256 every shard file once, on one thread."""
    start = time.perf_counter()
    for f in sorted(folder.glob("data-*.arrow")):
        digest = hashlib.sha256()
        with open(f, "rb") as fh:
            while block := fh.read(1 << 22):
                digest.update(block)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=100_000_000)
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    from _packed import build_synthetic

    from prep.verify import verify_shards

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "shards"
        build_synthetic(folder, n_tokens=args.tokens)
        size = sum(f.stat().st_size for f in folder.glob("data-*.arrow"))
        verify_shards(folder)  # warm-up: page cache and imports
        times, report = [], None
        for _ in range(args.runs):
            start = time.perf_counter()
            report = verify_shards(folder)
            times.append(time.perf_counter() - start)
        assert report is not None and report.ok, report
        t = statistics.median(times)
        print(f"verify: {report.shards} shards, {report.rows:,} rows, {report.tokens:,} tokens, {size / 1e9:.2f} GB")
        print(f"  median {t:.2f}s of {args.runs}: {size / t / 1e9:.2f} GB/s, {report.rows / t:,.0f} rows/s, "
              f"{report.tokens / t / 1e6:,.0f}M tokens/s")
        print(f"  sha256 alone, one thread: {size / sha256_seconds(folder) / 1e9:.2f} GB/s")


if __name__ == "__main__":
    main()
