"""Throughput of `Encoder.encode` on agent data vs a bare `tokenizer(texts)` call on the same rendered texts.

The real tool-calling data in ../shared/data (glaive_toolcall en + zh: ShareGPT function_call/observation with
tools; drone_training: OpenAI tools + tool_calls), converted by prep and repeated to about 10k conversations
(ids kept unique). The encoder renders every conversation with its tools and calls, locates every message (the
placeholder skeletons are cached per shape), tokenizes, builds the labels and verifies every example; the
baseline only tokenizes the texts the encoder's render produces. Both sides get the same batches; runs are
interleaved and the median tokens/s is reported, with the ratio per CPU-second too. The issue's target is a ratio
>= 0.8, as for plain chat data (benchmarks/encode.py).

    python benchmarks/tools.py                                  # qwen2.5 with its own template, 5 runs
    python benchmarks/tools.py --tokenizer mistral-7b-instruct-v0.3 --template tokenizer --template chatml
    python benchmarks/tools.py --expansion     # tokens written under --expand-turns off / auto / all (Qwen3)
    python benchmarks/tools.py --profile 2000 --tokenizer mistral-7b-instruct-v0.3   # where encode's time goes
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from prep.convert import iter_conversations  # noqa: E402
from prep.encode import Encoder  # noqa: E402
from prep.render import chat_dicts, load_template, render_batch  # noqa: E402
from prep.tokenizer import adds_bos, load_tokenizer  # noqa: E402

DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data"
FILES = ("sharegpt/glaive_toolcall_en_demo.json", "sharegpt/glaive_toolcall_zh_demo.json", "messages/drone_training.jsonl")


def tool_conversations(n: int) -> list:
    """The real tool conversations (as prep converts them), repeated to `n` with unique ids."""
    base = [c for f in FILES for c in iter_conversations(str(DATA / f)) if hasattr(c, "messages")]
    return [base[i % len(base)].model_copy(update={"id": f"{base[i % len(base)].id}-{i}"}) for i in range(n)]


def bench(tokenizer_name: str, template_name: str, convs: list, args: argparse.Namespace) -> None:
    """Print median tokens/s of encode and of the bare tokenizer call on the same texts, and their ratio."""
    tok = load_tokenizer(str(DATA / "tokenizers" / tokenizer_name))
    template = load_template(template_name, tok)
    encoder = Encoder(tok, template, max_len=args.max_len)
    batches = [convs[i : i + args.batch_size] for i in range(0, len(convs), args.batch_size)]
    bos = tok.bos_token if adds_bos(tok) and not template.uses_chat_template else ""
    text_batches = [[r.text for r in render_batch([c.messages for c in b], template, tok, bos=bos, eos=tok.eos_token,
                                                   tools=[c.tools for c in b]) if hasattr(r, "text")] for b in batches]
    chats = [(chat_dicts(_ids(c.messages, tok, template)), c.tools) for c in convs] if template.uses_chat_template else []
    ours, bare, ours_cpu, bare_cpu, hf = [], [], [], [], []
    for _ in range(args.runs):  # interleaved, so a slow spell on a shared machine hits both sides
        wall, cpu = time.perf_counter(), time.process_time()
        results = [encoder.encode(b) for b in batches]
        tokens = sum(r.counts["tokens"] for r in results)
        ours.append(tokens / (time.perf_counter() - wall))
        ours_cpu.append(tokens / (time.process_time() - cpu))
        wall, cpu = time.perf_counter(), time.process_time()
        bare_tokens = sum(sum(map(len, tok(texts)["input_ids"])) for texts in text_batches)
        bare.append(bare_tokens / (time.perf_counter() - wall))
        bare_cpu.append(bare_tokens / (time.process_time() - cpu))
        if chats:  # what transformers' own way costs: apply_chat_template(tokenize=False), then the tokenizer
            wall = time.perf_counter()
            texts = [_apply(tok, messages, tools) for messages, tools in chats]
            hf_tokens = sum(sum(map(len, tok(texts[i : i + args.batch_size])["input_ids"]))
                            for i in range(0, len(texts), args.batch_size))
            hf.append(hf_tokens / (time.perf_counter() - wall))
    med = statistics.median
    written = sum(r.counts["examples"] for r in results)
    rejected = sum(r.counts["rejected"] for r in results)
    versus_hf = f" | apply_chat_template + tokenizer {med(hf):9,.0f} tok/s (ratio {med(ours) / med(hf):.2f})" if hf else ""
    print(
        f"{tokenizer_name:26s} {template_name:9s} {len(convs)} conv ({written} written, {rejected} rejected) "
        f"{tokens:,} tok | encode {med(ours):9,.0f} tok/s | bare tokenizer(texts) {med(bare):9,.0f} tok/s | "
        f"ratio {med(ours) / med(bare):.2f} (per CPU-second: {med(ours_cpu) / med(bare_cpu):.2f}){versus_hf}"
    )


def _ids(messages: list, tok, template) -> list:
    """The messages with the call ids prep gives a template that needs them (Mistral's), as the baseline's input."""
    from prep.render import _template_info, _with_call_ids

    info = _template_info(tok, template, repr(sorted(tok.special_tokens_map.items())))
    return _with_call_ids(list(messages), fresh=True)[0] if info.needs_ids else list(messages)


def _apply(tok, messages: list, tools: list | None) -> str:
    """apply_chat_template(tokenize=False), as a user of transformers gets the same text."""
    return tok.apply_chat_template(messages, tools=tools, tokenize=False)


def expansion_cost(args: argparse.Namespace) -> None:
    """Tokens written under --expand-turns off / auto / all with Qwen3's chat template (tests/_agent.py) on the real
    glaive conversations, alone and with reasoning folded into every reply (as a reasoning model's data has it)."""
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from _agent import qwen3_tokenizer

    from prep.convert import fold_reasoning

    tok = qwen3_tokenizer()
    template = load_template("tokenizer", tok)
    base = [c for c in iter_conversations(str(DATA / FILES[0])) if hasattr(c, "messages")]
    reasoning = [c.model_copy(update={"messages": [
        m.model_copy(update={"content": fold_reasoning(f"Step {i}: decide what to do.", m.content)})
        if m.role == "assistant" else m for i, m in enumerate(c.messages)]}) for c in base]
    for label, convs in (("glaive_en", base), ("glaive_en + reasoning", reasoning)):
        tokens = {}
        for mode in ("off", "auto", "all"):
            result = Encoder(tok, template, max_len=args.max_len, expand_turns=mode).encode(convs)
            tokens[mode] = (result.counts["tokens"], result.counts["examples"], result.counts["trained_tokens"])
        off = tokens["off"][0]
        print(f"Qwen3 template, {label}: " + ", ".join(
            f"{mode}: {n:,} tokens in {e:,} examples ({n / off:.2f}x), {t:,} trained" for mode, (n, e, t) in tokens.items()))


def profile(tokenizer_name: str, template_name: str, convs: list, args: argparse.Namespace) -> None:
    """cProfile of one `Encoder.encode` call over `convs` (after a warm-up batch); prints the top functions."""
    import cProfile
    import pstats

    tok = load_tokenizer(str(DATA / "tokenizers" / tokenizer_name))
    encoder = Encoder(tok, load_template(template_name, tok), max_len=args.max_len)
    encoder.encode(convs[:100])
    profiler = cProfile.Profile()
    profiler.runcall(encoder.encode, convs)
    pstats.Stats(profiler).sort_stats("cumulative").print_stats(25)


def main() -> None:
    """Parse arguments and run the benchmark for each tokenizer and template."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--examples", type=int, default=10_000)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=2048)
    parser.add_argument("--max-len", type=int, default=32768)
    parser.add_argument("--template", action="append", help="tokenizer | chatml | markers (repeatable)")
    parser.add_argument("--tokenizer", action="append", help="default: qwen2.5-0.5b-instruct")
    parser.add_argument("--expansion", action="store_true", help="print the token cost of --expand-turns instead")
    parser.add_argument("--profile", type=int, metavar="N", help="profile encode on N conversations instead")
    args = parser.parse_args()
    if args.expansion:
        expansion_cost(args)
        return
    if args.profile:
        profile((args.tokenizer or ["qwen2.5-0.5b-instruct"])[0], (args.template or ["tokenizer"])[0],
                tool_conversations(args.profile), args)
        return
    convs = tool_conversations(args.examples)
    for name in args.tokenizer or ["qwen2.5-0.5b-instruct"]:
        for template in args.template or ["tokenizer"]:
            bench(name, template, convs, args)


if __name__ == "__main__":
    main()
