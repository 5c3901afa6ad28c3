"""Scale check: `prep convert` and `prep pack` on at least a million records, with peak RSS and time.

The real Alpaca-style records in ../shared/data (alpaca_en, alpaca_zh, identity, gpteacher) are repeated,
each copy with a unique `id` (kept in meta), until there are `--records` records in one JSON Lines file.
Each stage runs in its own subprocess (`python -m prep ...`); its peak RSS is the child's `ru_maxrss`
from `os.wait4`, so the parent's own memory never counts.

    HF_HUB_OFFLINE=1 python benchmarks/scale.py                          # 1,000,000 records, GPT-2 tokenizer
    HF_HUB_OFFLINE=1 python benchmarks/scale.py --records 20000 --tokenizer default
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import NamedTuple

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
SOURCES = ["alpaca/alpaca_en_demo.json", "alpaca/alpaca_zh_demo.json", "alpaca/identity.json",
           "alpaca/gpteacher_codegen-instruct.json"]
GPT2 = SHARED / "tokenizers" / "gpt2-dialogpt-small"


class Run(NamedTuple):
    """One finished subprocess: seconds of wall time and peak resident memory in MiB."""

    seconds: float
    peak_mib: float


def real_records() -> list[dict[str, str]]:
    """The real Alpaca-style records, with GPTeacher's `response` renamed to `output`."""
    records = []
    for name in SOURCES:
        for r in json.loads((SHARED / name).read_text(encoding="utf-8")):
            records.append({"instruction": r["instruction"], "input": r.get("input", ""),
                            "output": r.get("output", r.get("response", ""))})
    return records


def write_input(path: Path, n_records: int) -> int:
    """Write `n_records` Alpaca JSON lines (real records repeated, unique ids); return the bytes written."""
    records = real_records()
    with open(path, "w", encoding="utf-8") as f:
        for i in range(n_records):
            f.write(json.dumps({"id": f"rec-{i:08d}", **records[i % len(records)]}, ensure_ascii=False) + "\n")
    return path.stat().st_size


def run_measured(args: list[str]) -> Run:
    """Run `python -m prep ARGS`; return its wall time and peak RSS; raise if it fails."""
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "prep", *args], cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    stderr = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
    if proc.returncode != 0:
        raise SystemExit(f"prep {args[0]} failed ({proc.returncode}): {stderr[-2000:]}")
    return Run(seconds, usage.ru_maxrss / 1024)  # ru_maxrss is in KiB on Linux


def convert_and_pack(work: Path, n_records: int, tokenizer: str, max_len: int) -> tuple[Run, Run, dict]:
    """Generate the input, run convert then pack; return both runs and the pack manifest."""
    raw, unified, shards = work / "raw.jsonl", work / "unified.jsonl", work / "shards"
    write_input(raw, n_records)
    convert = run_measured(["convert", str(raw), "-o", str(unified)])
    tok = [] if tokenizer == "default" else ["--tokenizer", tokenizer]
    pack = run_measured(["pack", str(unified), "-o", str(shards), "--max-len", str(max_len), *tok])
    manifest = json.loads((shards / "manifest.json").read_text())
    return convert, pack, manifest


def main() -> None:
    """Parse flags, run once, print the figures."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=1_000_000)
    parser.add_argument("--tokenizer", default=str(GPT2), help="a tokenizer folder, or 'default' (embedded)")
    parser.add_argument("--max-len", type=int, default=2048)
    parser.add_argument("--workdir", default=None, help="where to write (default: a temporary folder)")
    args = parser.parse_args()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="prep-scale-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        convert, pack, manifest = convert_and_pack(work, args.records, args.tokenizer, args.max_len)
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)
    counts = manifest["counts"]
    print(f"records: {args.records:,}  tokenizer: {Path(args.tokenizer).name}  max_len: {args.max_len}")
    print(f"convert: {convert.seconds:8.1f} s  peak RSS {convert.peak_mib:8.1f} MiB")
    print(f"pack:    {pack.seconds:8.1f} s  peak RSS {pack.peak_mib:8.1f} MiB  "
          f"({counts['examples']:,} examples, {counts['tokens']:,} tokens, {counts['rows']:,} rows, "
          f"efficiency {manifest['packing']['efficiency']:.4f})")


if __name__ == "__main__":
    main()
