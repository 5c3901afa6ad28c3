"""What over-long conversations cost: prep's `--overflow split` versus truncation at max-len.

Usage: python benchmarks/overflow.py [--max-len 2048] [--tokenizer ../shared/data/tokenizers/qwen2-1.5b-instruct-boundless]

On the real multi-turn ShareGPT chats in ../shared/data, with the ChatML template, it prints:
- how many conversations are longer than max-len, and the share of all tokens and of trained (reply) tokens
  that truncating each conversation at max-len would discard (what a truncating packer does);
- for prep (`pack_shards`, overflow=split): conversations split, extra examples made, examples dropped, and the
  share of reply tokens that are trained in the shards (every reply that fits is trained exactly once; a reply is
  lost only when it alone cannot fit, and it is then counted as dropped).
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"


def whole_conversations(path: Path, tokenizer: str, max_len: int) -> tuple[np.ndarray, np.ndarray]:
    """Token and trained-token counts of every whole conversation (no overflow handling), and their cut at max_len."""
    from prep.convert import iter_conversations
    from prep.encode import Encoder
    from prep.render import load_template
    from prep.tokenizer import load_tokenizer

    tok = load_tokenizer(tokenizer)
    encoder = Encoder(tok, load_template("chatml", tok), max_len=10**9, overflow="truncate")
    conversations = [c for c in iter_conversations([str(path)]) if c.__class__.__name__ == "Conversation"]
    table = encoder.encode(conversations).table
    labels = table.column("labels").to_pylist()
    total = np.array([len(x) for x in labels])
    trained = np.array([sum(1 for v in x if v != -100) for x in labels])
    kept_trained = np.array([sum(1 for v in x[:max_len] if v != -100) for x in labels])
    return np.stack([total, trained]), np.stack([np.minimum(total, max_len), kept_trained])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--max-len", type=int, default=2048)
    parser.add_argument("--tokenizer", default=str(SHARED / "tokenizers" / "qwen2-1.5b-instruct-boundless"))
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    data = SHARED / "sharegpt" / "sharegpt_zh_1K_format.jsonl"
    whole, cut = whole_conversations(data, args.tokenizer, args.max_len)
    long = int((whole[0] > args.max_len).sum())
    print(f"data: {data.name}, {whole.shape[1]} conversations, {int(whole[0].sum()):,} tokens "
          f"({int(whole[1].sum()):,} in replies), tokenizer {Path(args.tokenizer).name}, chatml, max-len {args.max_len}")
    print(f"truncation at max-len: {long} conversations cut, {1 - cut[0].sum() / whole[0].sum():.1%} of all tokens and "
          f"{1 - cut[1].sum() / whole[1].sum():.1%} of reply tokens discarded")
    from prep.pipeline import pack_shards
    from schemas.pack_config import PackConfig

    with tempfile.TemporaryDirectory() as tmp:
        report = pack_shards(PackConfig(inputs=[str(data)], output=f"{tmp}/shards", tokenizer=args.tokenizer,
                                        template="chatml", max_len=args.max_len))
        c = report.manifest["counts"]
        print(f"prep --overflow split: {c['split_conversations']} conversations split into {c['split']} extra examples, "
              f"{c['dropped']} examples dropped (a reply that cannot fit even alone), "
              f"{c['trained_tokens'] / whole[1].sum():.1%} of reply tokens trained "
              f"({c['trained_tokens']:,} of {int(whole[1].sum()):,})")


if __name__ == "__main__":
    main()
