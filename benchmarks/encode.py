"""Throughput of `Encoder.encode` vs a bare `tokenizer(texts)` call on the same rendered texts.

Real Alpaca data (../shared/data/alpaca/alpaca_en_demo.json) repeated to ~20k conversations, for the
gpt2 and qwen2 tokenizers. Both sides get the same batches (the pipeline's --batch-size); runs are
interleaved and the median tokens/s is reported, with the same ratio per CPU-second
(process time of all threads), which a busy shared machine disturbs less. The integrator's
end-to-end target is a ratio >= 0.8.

    python benchmarks/encode.py                      # markers template, 20k examples, 5 runs
    python benchmarks/encode.py --template chatml --runs 3
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from prep.encode import Encoder  # noqa: E402
from prep.render import load_template, render_batch  # noqa: E402
from prep.tokenizer import adds_bos, load_tokenizer  # noqa: E402
from schemas.conversation import Conversation, Message  # noqa: E402

DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data"
TOKENIZERS = ("gpt2-dialogpt-small", "qwen2-1.5b-instruct-boundless")


def alpaca_conversations(n: int) -> list[Conversation]:
    """alpaca_en_demo as Conversations, repeated to `n` (ids stay unique)."""
    records = json.loads((DATA / "alpaca" / "alpaca_en_demo.json").read_text(encoding="utf-8"))
    out = []
    for i in range(n):
        r = records[i % len(records)]
        user = r["instruction"] + ("\n\n" + r["input"] if r["input"] else "")
        msgs = [Message(role="user", content=user), Message(role="assistant", content=r["output"])]
        out.append(Conversation(id=f"alpaca-{i}", messages=msgs))
    return out


def batches(items: list, size: int) -> list[list]:
    """`items` in consecutive batches of `size`."""
    return [items[i : i + size] for i in range(0, len(items), size)]


def bench(tokenizer_name: str, template_name: str, convs: list[Conversation], args: argparse.Namespace) -> None:
    """Print median tokens/s of encode and of the bare tokenizer call, and their ratio."""
    tok = load_tokenizer(str(DATA / "tokenizers" / tokenizer_name))
    template = load_template(template_name, tok)
    encoder = Encoder(tok, template, train_on=args.train_on, max_len=args.max_len)
    conv_batches = batches(convs, args.batch_size)
    bos = tok.bos_token if adds_bos(tok) and not template.uses_chat_template else ""
    text_batches = [
        [r.text for r in render_batch([c.messages for c in b], template, tok, bos=bos, eos=tok.eos_token)]
        for b in conv_batches
    ]
    ours, bare, ours_cpu, bare_cpu = [], [], [], []
    for _ in range(args.runs):  # interleaved, so a slow spell on a shared machine hits both sides
        wall, cpu = time.perf_counter(), time.process_time()
        tokens = sum(encoder.encode(b).counts["tokens"] for b in conv_batches)
        ours.append(tokens / (time.perf_counter() - wall))
        ours_cpu.append(tokens / (time.process_time() - cpu))
        wall, cpu = time.perf_counter(), time.process_time()
        bare_tokens = sum(sum(map(len, tok(texts)["input_ids"])) for texts in text_batches)
        bare.append(bare_tokens / (time.perf_counter() - wall))
        bare_cpu.append(bare_tokens / (time.process_time() - cpu))
    med = statistics.median
    print(
        f"{tokenizer_name:30s} {template_name:9s} {len(convs)} conv {tokens:,} tok | encode {med(ours):10,.0f} tok/s"
        f" | bare tokenizer(texts) {med(bare):10,.0f} tok/s | ratio {med(ours) / med(bare):.2f}"
        f" (per CPU-second: {med(ours_cpu) / med(bare_cpu):.2f})"
    )


def main() -> None:
    """Parse arguments and run the benchmark for each tokenizer."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--examples", type=int, default=20_000)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=2048)
    parser.add_argument("--max-len", type=int, default=2048)
    parser.add_argument("--train-on", default="completion")
    parser.add_argument("--template", action="append", help="markers | chatml | tokenizer (repeatable)")
    parser.add_argument("--tokenizer", action="append", help=f"default: {', '.join(TOKENIZERS)}")
    args = parser.parse_args()
    convs = alpaca_conversations(args.examples)
    for name in args.tokenizer or TOKENIZERS:
        for template in args.template or ["markers"]:
            bench(name, template, convs, args)


if __name__ == "__main__":
    main()
