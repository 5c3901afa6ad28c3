"""`prep export` speed against copying the shard files, per format (median of runs, same machine, same run).

Usage: python benchmarks/export.py [--tokens 100000000] [--runs 3] [--formats megatron mds parquet]

The source is valid synthetic packed shards (random examples, embedded 264-token tokenizer, built with prep's
own writer), because the real data in ../shared holds far fewer than 100M tokens. The baseline copies the
shard files (shutil.copyfile, one after another); the ratio is copy time / export time, so 1.0 means the
export runs as fast as a copy. Every export reads, converts and writes every token and hashes every source
and output file (sha256 for the manifests), which a copy does not.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))


def copy_seconds(src: Path, dest: Path) -> float:
    """Seconds to copy the shard files of `src` into `dest`."""
    dest.mkdir()
    start = time.perf_counter()
    for f in sorted(src.glob("data-*.arrow")):
        shutil.copyfile(f, dest / f.name)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=100_000_000)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--formats", nargs="+", default=["megatron", "mds", "parquet"])
    args = parser.parse_args()
    from _packed import build_synthetic

    from prep.export import export_shards
    from schemas.export_config import ExportConfig

    with tempfile.TemporaryDirectory(dir=ROOT.parent) as tmp:
        src = Path(tmp) / "shards"
        manifest = build_synthetic(src, n_tokens=args.tokens)
        size = sum(f.stat().st_size for f in src.glob("data-*.arrow"))
        print(f"source: {manifest['counts']['tokens']:,} tokens, {manifest['counts']['rows']:,} rows, "
              f"{len(manifest['shards'])} shards, {size / 1e9:.2f} GB (synthetic, valid)")
        for fmt in args.formats:
            copies, exports, out_bytes = [], [], 0
            for run in range(args.runs):
                copies.append(copy_seconds(src, Path(tmp) / f"copy-{fmt}-{run}"))
                shutil.rmtree(Path(tmp) / f"copy-{fmt}-{run}")
                out = Path(tmp) / f"{fmt}-{run}"
                start = time.perf_counter()
                export_shards(ExportConfig(shards=str(src), to=fmt, output=str(out)))
                exports.append(time.perf_counter() - start)
                out_bytes = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
                shutil.rmtree(out)
            c, e = statistics.median(copies), statistics.median(exports)
            print(f"{fmt:9s} export {e:6.2f}s ({size / e / 1e9:.2f} GB/s of shards, {args.tokens / e / 1e6:.0f}M tokens/s, "
                  f"writes {out_bytes / 1e9:.2f} GB) | copy {c:5.2f}s ({size / c / 1e9:.2f} GB/s) | "
                  f"ratio copy/export {c / e:.2f} (medians of {args.runs})")


if __name__ == "__main__":
    main()
