"""Benchmark `prep convert` end to end (read + validate + convert + write JSONL) against a datasets baseline.

The real Alpaca and conversation files in ../shared/data are repeated until each set holds at
least --records records and written to a temporary folder. Each set is then converted

- by prep: `convert_files` (median of --repeat runs), and
- by the baseline: `datasets.load_dataset("json")`, a `map` doing the same field mapping, `to_json`.

The process is pinned to one core (unless --all-cores), so both sides get one CPU.

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
SETS: dict[str, list[tuple[str, list[str]]]] = {
    # name -> [(output file, [source files])]; one output file per format, so each file has one format.
    "alpaca": [("alpaca.jsonl", ["alpaca/alpaca_en_demo.json", "alpaca/alpaca_zh_demo.json", "alpaca/identity.json"])],
    "alpaca-json-array": [("alpaca.json", ["alpaca/alpaca_en_demo.json", "alpaca/alpaca_zh_demo.json",
                                           "alpaca/identity.json"])],
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


def run_prep(paths: list[Path], folder: Path) -> float:
    """Seconds for one `convert_files` run (records are written to folder/prep.jsonl)."""
    from prep.convert import convert_files
    from schemas.config import ConvertConfig

    config = ConvertConfig(inputs=[str(p) for p in paths], output=str(folder / "prep.jsonl"), overwrite=True)
    start = time.perf_counter()
    report = convert_files(config)
    elapsed = time.perf_counter() - start
    assert report.total.accepted > 0
    return elapsed


def _baseline_map(row: dict[str, Any]) -> dict[str, Any]:
    """The same field mapping as prep's converters, written the usual way."""
    if row.get("instruction") is not None:
        user = row["instruction"] + ("\n\n" + row["input"] if row.get("input") else "")
        messages = [{"role": "user", "content": user}, {"role": "assistant", "content": row["output"]}]
    elif row.get("conversations") is not None:
        roles = {"human": "user", "observation": "user", "gpt": "assistant", "function_call": "assistant"}
        messages = [{"role": roles[m["from"]], "content": m["value"]} for m in row["conversations"]]
    else:
        messages = [{"role": m["role"], "content": m["content"]} for m in row["messages"]]
    return {"messages": messages}


def run_baseline(paths: list[Path], folder: Path) -> float:
    """Seconds for load_dataset("json") + map + to_json over the same files (one dataset per file)."""
    import datasets

    datasets.disable_progress_bars()
    start = time.perf_counter()
    for i, path in enumerate(paths):
        ds = datasets.load_dataset("json", data_files=str(path), split="train", cache_dir=str(folder / f"hf{i}"))
        ds = ds.map(_baseline_map, remove_columns=ds.column_names)
        ds.to_json(str(folder / f"baseline{i}.jsonl"))
    return time.perf_counter() - start


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
            n = sum(1 for p in paths for line in p.open("rb") if line.strip()) if paths[0].suffix == ".jsonl" \
                else len(pydantic_core.from_json(paths[0].read_bytes()))
            mb = sum(p.stat().st_size for p in paths) / 1e6
            times = [run_prep(paths, folder) for _ in range(args.repeat)]
            t = statistics.median(times)
            line = f"{name:18s} {n:>8,} records {mb:8.1f} MB | prep {n / t:>9,.0f} rec/s {mb / t:7.1f} MB/s ({t:.2f} s)"
            if not args.no_baseline:
                b = run_baseline(paths, folder)
                line += f" | baseline {n / b:>8,.0f} rec/s {mb / b:6.1f} MB/s ({b:.1f} s) | speedup {b / t:.1f}x"
            print(line, flush=True)


if __name__ == "__main__":
    main()
