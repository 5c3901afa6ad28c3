"""End-to-end `prep pack` throughput against the bare tokenizer, packing efficiency, and peak RSS at 1x / 10x.

Usage: python benchmarks/pack.py [--examples 200000] [--tokenizer ../shared/data/tokenizers/gpt2-dialogpt-small]

Data: the real Alpaca-style files in ../shared/data (alpaca_en, alpaca_zh, identity, gpteacher), converted once
to the unified form and repeated until there are `--examples` records. Printed, from one run:
- tokens/s of `prep pack` end to end (read unified JSONL, render, tokenize with offsets, labels, verification,
  spill, BFD plan over the whole set, shard writing, sha256), median of `--repeats` runs;
- tokens/s of a bare batched `tokenizer(texts)` call on the same rendered texts (the ceiling), median;
- their ratio (target >= 0.8), packing efficiency and rows versus the lower bound ceil(tokens / max_len);
- peak RSS of a `prep pack` subprocess (plus its largest encoding worker) at 1x (examples / 10) and 10x (examples)
  the data (target: ratio <= 1.5).

`--workers` is passed to `prep pack` (0 = auto: one encoding process per CPU for inputs of 64 MiB and more).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
SOURCES = ["alpaca/alpaca_en_demo.json", "alpaca/alpaca_zh_demo.json", "alpaca/identity.json",
           "alpaca/gpteacher_codegen-instruct.json"]

_RSS_CHILD = """
import json, resource, sys
from prep.pipeline import pack_shards
from schemas.pack_config import PackConfig
cfg = PackConfig(**json.loads(sys.argv[1]))
pack_shards(cfg)
# the main process plus its largest encoding worker (an upper bound when workers run)
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss + resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)
"""


def unified_lines() -> list[bytes]:
    """The real Alpaca-style records as unified JSON lines (each source converted once)."""
    from prep.convert import iter_conversations

    lines = []
    for conv in iter_conversations([str(SHARED / s) for s in SOURCES]):
        if conv.__class__.__name__ == "Conversation":
            lines.append(conv.model_dump_json().encode())
    return lines


def write_input(lines: list[bytes], n: int, path: Path) -> None:
    """Write `n` records (the real ones repeated, ids made unique) as unified JSONL."""
    with open(path, "wb") as f:
        for i in range(n):
            record = json.loads(lines[i % len(lines)])
            record["id"] = f"{record['id']}-{i}"
            f.write(json.dumps(record, ensure_ascii=False).encode() + b"\n")


def time_pack(input_path: Path, out: Path, tokenizer: str, max_len: int, workers: int) -> tuple[float, dict]:
    """Seconds of one in-process `pack_shards` run, and its manifest."""
    from prep.pipeline import pack_shards
    from schemas.pack_config import PackConfig

    cfg = PackConfig(inputs=[str(input_path)], output=str(out), tokenizer=tokenizer, max_len=max_len, overwrite=True,
                     workers=workers)
    start = time.perf_counter()
    report = pack_shards(cfg)
    return time.perf_counter() - start, report.manifest


def time_bare_tokenizer(input_path: Path, tokenizer_name: str, batch: int) -> tuple[float, int]:
    """Seconds of bare batched `tokenizer(texts)` over the same rendered texts (rendering not timed), tokens."""
    from prep.convert import iter_conversations
    from prep.render import load_template, render
    from prep.tokenizer import load_tokenizer

    tok = load_tokenizer(tokenizer_name)
    template = load_template("markers", tok)
    texts = [render(c.messages, template, eos=tok.eos_token or "").text for c in iter_conversations([str(input_path)])]
    start = time.perf_counter()
    tokens = 0
    for i in range(0, len(texts), batch):
        enc = tok(texts[i:i + batch], add_special_tokens=False)
        tokens += sum(len(x) for x in enc["input_ids"])
    return time.perf_counter() - start, tokens


def peak_rss_mib(input_path: Path, out: Path, tokenizer: str, max_len: int, workers: int) -> float:
    """Peak RSS (MiB) of a fresh process running `prep pack` on `input_path` (plus its largest worker)."""
    cfg = {"inputs": [str(input_path)], "output": str(out), "tokenizer": tokenizer, "max_len": max_len,
           "overwrite": True, "workers": workers}
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    done = subprocess.run([sys.executable, "-c", _RSS_CHILD, json.dumps(cfg)], capture_output=True, text=True,
                          env=env, check=True)
    return int(done.stdout.strip().splitlines()[-1]) / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--examples", type=int, default=200_000)
    parser.add_argument("--tokenizer", default=str(SHARED / "tokenizers" / "gpt2-dialogpt-small"))
    parser.add_argument("--max-len", type=int, default=2048)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workers", type=int, default=0, help="prep pack --workers (0 = auto)")
    parser.add_argument("--skip-rss", action="store_true")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    lines = unified_lines()
    with tempfile.TemporaryDirectory() as tmp:
        big, small = Path(tmp) / "10x.jsonl", Path(tmp) / "1x.jsonl"
        write_input(lines, args.examples, big)
        write_input(lines, args.examples // 10, small)
        print(f"data: {args.examples:,} unified records ({big.stat().st_size / 1e6:.0f} MB) from {len(lines):,} real "
              f"Alpaca-style records; tokenizer {Path(args.tokenizer).name}; max-len {args.max_len}; {os.cpu_count()} CPUs")
        pack_times, bare_times = [], []
        for _ in range(args.repeats):
            seconds, manifest = time_pack(big, Path(tmp) / "shards", args.tokenizer, args.max_len, args.workers)
            pack_times.append(seconds)
            bare, tokens = time_bare_tokenizer(big, args.tokenizer, 2048)
            bare_times.append(bare)
        ours = manifest["counts"]["tokens"] / statistics.median(pack_times)
        ceiling = tokens / statistics.median(bare_times)
        print(f"prep pack end to end : {ours:>12,.0f} tokens/s (median of {args.repeats}: "
              f"{', '.join(f'{t:.1f}s' for t in pack_times)})")
        print(f"bare tokenizer(texts): {ceiling:>12,.0f} tokens/s (median of {args.repeats}: "
              f"{', '.join(f'{t:.1f}s' for t in bare_times)}; {tokens:,} tokens)")
        print(f"ratio                : {ours / ceiling:.3f}  (target >= 0.8)")
        p = manifest["packing"]
        print(f"packing              : efficiency {p['efficiency']:.4%}, rows {p['rows']:,} vs lower bound "
              f"{p['lower_bound_rows']:,} (+{p['rows'] / p['lower_bound_rows'] - 1:.3%})")
        if not args.skip_rss:
            rss_1x = peak_rss_mib(small, Path(tmp) / "rss1", args.tokenizer, args.max_len, args.workers)
            rss_10x = peak_rss_mib(big, Path(tmp) / "rss10", args.tokenizer, args.max_len, args.workers)
            print(f"peak RSS             : {rss_1x:,.0f} MiB at 1x ({args.examples // 10:,} records), {rss_10x:,.0f} MiB "
                  f"at 10x ({args.examples:,}); ratio {rss_10x / rss_1x:.2f} (target <= 1.5)")


if __name__ == "__main__":
    main()
