"""Benchmark `prep convert` end to end (read + validate + convert + write JSONL) against a datasets baseline.

The real Alpaca and conversation files in ../shared/data are repeated until each set holds at
least --records records and written to a temporary folder. Each set is then converted

- by prep: `convert_files` (median of --repeat runs), and
- by the baseline: `datasets.load_dataset("json")` and a `map` doing the same field mapping, timed
  before and after a final `to_json` (with it, the baseline does prep's work: read, convert, write JSONL).

The process is pinned to one core (unless --all-cores), so both sides get one CPU. Wall time is
the end-to-end figure; CPU time (process_time) is printed too because on a shared machine other
processes' load inflates wall time but barely changes CPU time.

    HF_HUB_OFFLINE=1 python benchmarks/convert.py            # both sets, 200k records each
    HF_HUB_OFFLINE=1 python benchmarks/convert.py --sets alpaca --records 50000 --no-baseline
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import pydantic_core

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"
ALPACA = ["alpaca/alpaca_en_demo.json", "alpaca/alpaca_zh_demo.json", "alpaca/identity.json"]
GPTEACHER = ["alpaca/gpteacher_codegen-instruct.json"]  # `response` instead of `output`: its own file
SETS: dict[str, list[tuple[str, list[str]]]] = {
    # name -> [(output file, [source files])]; each output file holds one format (and one key set).
    "alpaca": [("alpaca.jsonl", ALPACA), ("gpteacher.jsonl", GPTEACHER)],
    "alpaca-json-array": [("alpaca.json", ALPACA), ("gpteacher.json", GPTEACHER)],
    "conversations": [
        ("sharegpt.jsonl", ["sharegpt/sharegpt_zh_1K_format.jsonl"]),
        ("glaive.jsonl", ["sharegpt/glaive_toolcall_en_demo.json", "sharegpt/glaive_toolcall_zh_demo.json"]),
        ("openai.jsonl", ["messages/kto_en_demo.json"]),
    ],
}


def load_records(source: str) -> list[dict[str, Any]]:
    """Records of one real data file (JSON array or JSON Lines)."""
    data = (DATA / source).read_bytes()
    if source.endswith(".jsonl"):
        return [pydantic_core.from_json(line) for line in data.splitlines() if line.strip()]
    return pydantic_core.from_json(data)


def build_set(name: str, folder: Path, records: int) -> list[Path]:
    """Write the set's files, each scaled by repetition to about records / number of files."""
    paths = []
    per_file = -(-records // len(SETS[name]))
    for out, sources in SETS[name]:
        base = [r for s in sources for r in load_records(s)]
        rows = (base * (-(-per_file // len(base))))[:max(per_file, len(base))]
        path = folder / out
        if out.endswith(".json"):
            path.write_bytes(pydantic_core.to_json(rows))
        else:
            path.write_bytes(b"\n".join(pydantic_core.to_json(r) for r in rows) + b"\n")
        paths.append(path)
    return paths


def count_records(path: Path) -> int:
    """Records in a JSON Lines file or a JSON array file."""
    if path.suffix == ".jsonl":
        return sum(1 for line in path.open("rb") if line.strip())
    return len(pydantic_core.from_json(path.read_bytes()))


def run_prep(paths: list[Path], folder: Path) -> tuple[float, float]:
    """(wall, CPU) seconds for one `convert_files` run (records are written to folder/prep.jsonl)."""
    from prep.convert import convert_files
    from schemas.config import ConvertConfig

    config = ConvertConfig(inputs=[str(p) for p in paths], output=str(folder / "prep.jsonl"), overwrite=True)
    start, cpu = time.perf_counter(), time.process_time()
    report = convert_files(config)
    elapsed = time.perf_counter() - start, time.process_time() - cpu
    if report.total.accepted == 0:
        raise SystemExit("prep accepted nothing: the benchmark input is broken")
    return elapsed


def _baseline_map(row: dict[str, Any]) -> dict[str, Any]:
    """The same field mapping as prep's converters, written the usual way."""
    if row.get("instruction") is not None:
        user = row["instruction"] + ("\n\n" + row["input"] if row.get("input") else "")
        answer = row["output"] if row.get("output") is not None else row["response"]
        messages = [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]
    elif row.get("conversations") is not None:
        roles = {"human": "user", "observation": "user", "gpt": "assistant", "function_call": "assistant"}
        messages = [{"role": roles[m["from"]], "content": m["value"]} for m in row["conversations"]]
    else:
        messages = [{"role": m["role"], "content": m["content"]} for m in row["messages"]]
    return {"messages": messages}


def run_baseline(paths: list[Path], folder: Path) -> tuple[float, float, float]:
    """Seconds for load_dataset("json") + map over the same files (one dataset per file), then + to_json.

    Returns:
        (wall seconds without writing, wall seconds with to_json, CPU seconds with to_json).
    """
    import datasets

    datasets.disable_progress_bars()
    warm = folder / "warm-up.jsonl"  # first-call imports inside datasets are not part of the measurement
    warm.write_bytes(paths[0].open("rb").readline())
    datasets.load_dataset("json", data_files=str(warm), split="train", cache_dir=str(folder / "hf-warm"))
    start, cpu, writing = time.perf_counter(), time.process_time(), 0.0
    for i, path in enumerate(paths):
        ds = datasets.load_dataset("json", data_files=str(path), split="train", cache_dir=str(folder / f"hf{i}"))
        ds = ds.map(_baseline_map, remove_columns=ds.column_names)
        before = time.perf_counter()
        ds.to_json(str(folder / f"baseline{i}.jsonl"))
        writing += time.perf_counter() - before
    wall = time.perf_counter() - start
    return wall - writing, wall, time.process_time() - cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sets", nargs="+", default=list(SETS), choices=list(SETS))
    parser.add_argument("--records", type=int, default=200_000, help="records per set (at least)")
    parser.add_argument("--repeat", type=int, default=3, help="prep runs per set (median reported)")
    parser.add_argument("--no-baseline", action="store_true")
    parser.add_argument("--all-cores", action="store_true", help="do not pin the process to one core")
    args = parser.parse_args()
    if not args.all_cores and hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
    sys.path.insert(0, str(REPO))
    print(f"python {sys.version.split()[0]}, cores used: {len(os.sched_getaffinity(0))}")
    for name in args.sets:
        with tempfile.TemporaryDirectory(prefix=f"bench-{name}-") as tmp:
            folder = Path(tmp)
            paths = build_set(name, folder, args.records)
            n = sum(count_records(p) for p in paths)
            mb = sum(p.stat().st_size for p in paths) / 1e6
            runs = [run_prep(paths, folder) for _ in range(args.repeat)]
            wall, cpu = (statistics.median(r[i] for r in runs) for i in (0, 1))
            line = (f"{name:18s} {n:>8,} rec {mb:6.1f} MB | prep {n / wall:>8,.0f} rec/s {mb / wall:5.1f} MB/s wall"
                    f" ({wall:.2f} s), {n / cpu:>8,.0f} rec/s CPU ({cpu:.2f} s)")
            if not args.no_baseline:
                b_map, b_wall, b_cpu = run_baseline(paths, folder)
                line += (f"\n{'':18s} baseline load+map {n / b_map:>7,.0f} rec/s wall; load+map+to_json"
                         f" {n / b_wall:>7,.0f} rec/s wall, {n / b_cpu:>7,.0f} rec/s CPU"
                         f" | prep speedup {b_map / wall:.1f}x vs load+map, {b_wall / wall:.1f}x vs load+map+to_json"
                         f" (wall), {b_cpu / cpu:.1f}x (CPU)")
            print(line, flush=True)


if __name__ == "__main__":
    main()
