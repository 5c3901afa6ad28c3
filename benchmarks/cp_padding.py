"""The cost of `--pad-to-multiple-of N` (context-parallel padding) in tokens and rows, on the real data.

Usage: python benchmarks/cp_padding.py [--tokenizer DIR] [--max-len 2048] [--multiples 2 4 8 16]

For each data set (real ShareGPT zh chats and Alpaca from ../shared/data) it packs once with `prep pack`
(N = 1), then plans the rows for every N exactly as `prep pack --pad-to-multiple-of N` does (best-fit-decreasing
on the padded lengths) and prints the padding tokens (share of the real tokens) and the rows (against N = 1).
One N per set is also packed for real, and its manifest must agree with the plan.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
SETS = {"ShareGPT zh (multi-turn)": SHARED / "sharegpt" / "sharegpt_zh_1K_format.jsonl",
        "Alpaca en": SHARED / "alpaca" / "alpaca_en_demo.json"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokenizer", default=str(SHARED / "tokenizers" / "qwen2.5-0.5b-instruct"))
    parser.add_argument("--template", default="tokenizer")
    parser.add_argument("--max-len", type=int, default=2048)
    parser.add_argument("--multiples", type=int, nargs="+", default=[2, 4, 8, 16])
    args = parser.parse_args()
    from prep.load import iter_rows, load_shards
    from prep.pack import padded_lengths, plan_bfd
    from prep.pipeline import pack_shards
    from schemas.pack_config import PackConfig

    print(f"tokenizer {Path(args.tokenizer).name}, template {args.template}, max-len {args.max_len}")
    with tempfile.TemporaryDirectory() as tmp:
        for name, path in SETS.items():
            common = dict(inputs=[str(path)], tokenizer=args.tokenizer, template=args.template, max_len=args.max_len)
            base = pack_shards(PackConfig(output=f"{tmp}/{path.stem}-1", **common)).manifest
            lengths = np.concatenate([r["seq_lengths"] for r in iter_rows(load_shards(f"{tmp}/{path.stem}-1"))])
            tokens, rows = int(lengths.sum()), base["counts"]["rows"]
            print(f"\n{name}: {len(lengths):,} examples, {tokens:,} tokens, {rows:,} rows at N = 1")
            print(f"  {'N':>3} {'padding tokens':>15} {'share':>7} {'rows':>7} {'rows vs N=1':>12}")
            for n in args.multiples:
                padded = padded_lengths(lengths, n)
                plan_rows = plan_bfd(padded, args.max_len).num_rows
                pad = int(padded.sum()) - tokens
                print(f"  {n:>3} {pad:>15,} {pad / tokens:>7.2%} {plan_rows:>7,} {plan_rows / rows - 1:>+12.2%}")
            n = args.multiples[len(args.multiples) // 2]
            real = pack_shards(PackConfig(output=f"{tmp}/{path.stem}-{n}", pad_to_multiple_of=n, **common)).manifest
            expected = int(padded_lengths(lengths, n).sum()) - tokens
            assert real["counts"]["padding_tokens"] == expected, (real["counts"], expected)
            assert real["counts"]["rows"] == plan_bfd(padded_lengths(lengths, n), args.max_len).num_rows
            print(f"  (checked: `prep pack --pad-to-multiple-of {n}` wrote {real['counts']['padding_tokens']:,} "
                  f"padding tokens in {real['counts']['rows']:,} rows)")


if __name__ == "__main__":
    sys.exit(main())
