"""Multi-turn chat and agent data: `prep pack` against a bare render-and-tokenize script, and memory on long
conversations.

    python benchmarks/chat.py speed  [--data chat|agent] [--repeats 3] [--max-len 2048 --max-len 32768]
    python benchmarks/chat.py memory [--conversations 1000] [--workers 1]

speed: each run is a whole process (`python -m prep pack ...` / `python benchmarks/chat.py bare ...`), from
interpreter start to exit, with `--template tokenizer` and the SmolLM2 tokenizer (chat) or Qwen2.5-Instruct's
(agent: SmolLM2's chat template has no notion of tools, so prep rejects every tool conversation with it); the
runs of one repeat are
interleaved, so a busy spell on a shared machine hits every side, and the median of the repeats is printed,
with wall and CPU seconds (user + system, all threads) and peak RSS.
- bare: read the conversations (unified JSON Lines, made by `prep convert` beforehand, not timed), one
  `apply_chat_template(tokenize=False)` over all of them, one batched `tokenizer(texts)`: the tokens any
  pipeline has to produce, and nothing else (no masks, no checks, no output).
- prep: `prep pack RAW -o OUT --max-len N` on the raw file: convert, render, tokenize, labels, verification,
  splitting at turn boundaries, spill, packing, shards with sha256 and manifest.
Figures: prep's time relative to bare (bare seconds / prep seconds: 1.0 = as fast as the bare script), and
tokens per second relative to bare (prep writes more tokens when it splits: context turns repeat).

Data sets (from ../shared/data, repeated or joined; nothing is invented):
- chat: sharegpt/sharegpt_zh_1K_format.jsonl repeated 10 times (10,000 Chinese multi-turn chats);
- agent: the glaive tool-call chats (sharegpt/glaive_toolcall_en_demo.json and _zh_: 600 chats with function
  calls and their results) joined 6 at a time, in a seeded random choice, into 3,000 trajectories.

memory: `prep pack --max-len 32768` on long conversations (each joins shared chats until it holds 16k-32k
SmolLM2 tokens, seeded), at 1x (conversations / 8) and 8x; peak RSS of the main process and of its largest
encoding worker (a child process reports both), against the bound the README states.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import NamedTuple

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
SMOLLM2 = SHARED / "tokenizers" / "smollm2-135m"
QWEN25 = SHARED / "tokenizers" / "qwen2.5-0.5b-instruct"  # agent data needs a chat template that renders tools
CHATS = SHARED / "sharegpt" / "sharegpt_zh_1K_format.jsonl"
AGENT = [SHARED / "sharegpt" / "glaive_toolcall_en_demo.json", SHARED / "sharegpt" / "glaive_toolcall_zh_demo.json"]

_MEASURED_CHILD = """
import json, resource, sys
from prep.pipeline import pack_shards
from schemas.pack_config import PackConfig
pack_shards(PackConfig(**json.loads(sys.argv[1])))
print(json.dumps({"main": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "worker": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024}))
"""


class Run(NamedTuple):
    """One finished process: wall seconds, CPU seconds (user + system, all threads) and peak RSS in MiB."""

    wall: float
    cpu: float
    rss: float


def run_process(args: list[str]) -> tuple[Run, str]:
    """Run a command to completion; return its Run and its stdout (raise with its stderr if it fails).

    The rusage comes from `os.wait4` on the child: its CPU time includes the encoding workers it waited for,
    and its peak RSS is the largest of its own and theirs.
    """
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        start = time.perf_counter()
        proc = subprocess.Popen(args, cwd=ROOT, stdout=out, stderr=err, env={**os.environ, "HF_HUB_OFFLINE": "1"})
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - start
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0), err.seek(0)
        if proc.returncode != 0:
            raise SystemExit(f"{' '.join(args[:4])} failed ({proc.returncode}): {err.read().decode(errors='replace')[-3000:]}")
        return Run(wall, usage.ru_utime + usage.ru_stime, usage.ru_maxrss / 1024), out.read().decode()


# --------------------------------------------------------------------------------------------------
# Data


def chat_data(work: Path, repeat: int = 10) -> Path:
    """The ShareGPT chats repeated `repeat` times, as the raw file prep reads."""
    raw = work / "chat.jsonl"
    data = CHATS.read_bytes()
    raw.write_bytes(data * repeat)
    return raw


def agent_data(work: Path, trajectories: int = 3000, per_trajectory: int = 6, seed: int = 0) -> Path:
    """Glaive tool-call chats joined `per_trajectory` at a time into trajectories (their tools united)."""
    chats = [r for path in AGENT for r in json.loads(path.read_text(encoding="utf-8"))]
    rng = random.Random(seed)
    out = []
    for _ in range(trajectories):
        picked = rng.sample(chats, per_trajectory)
        turns = [t for chat in picked for t in chat["conversations"]]
        tools: dict[str, object] = {}
        for chat in picked:
            for tool in json.loads(chat.get("tools") or "[]"):
                tools.setdefault(tool.get("name", json.dumps(tool)), tool)
        out.append({"conversations": turns, "tools": json.dumps(list(tools.values()), ensure_ascii=False)})
    raw = work / "agent.json"
    raw.write_text(json.dumps(out, ensure_ascii=False), encoding="utf-8")
    return raw


def long_conversations(path: Path, n: int, seed: int = 0, low: int = 16_000, high: int = 32_000) -> int:
    """Write `n` unified conversations of `low`..`high` SmolLM2 tokens each (the shared chats joined in a seeded
    order until each reaches its drawn length); return the tokens of their message contents."""
    from prep.convert import iter_conversations
    from prep.tokenizer import load_tokenizer

    chats = [c for c in iter_conversations([str(CHATS)]) if c.__class__.__name__ == "Conversation"]
    tok = load_tokenizer(str(SMOLLM2))
    counts = [sum(map(len, tok([m.content for m in c.messages], add_special_tokens=False)["input_ids"]))
              for c in chats]
    rng = random.Random(seed)
    order, total = [], 0
    with open(path, "w", encoding="utf-8") as f:
        for i in range(n):
            goal, tokens, messages = rng.randrange(low, high), 0, []
            while True:
                if not order:
                    order = rng.sample(range(len(chats)), len(chats))
                k = order[-1]
                if tokens + counts[k] > high and messages:
                    break
                order.pop()
                messages += [m.model_dump() for m in chats[k].messages]
                tokens += counts[k]
                if tokens >= goal:
                    break
            total += tokens
            f.write(json.dumps({"id": f"long-{i}", "messages": messages}, ensure_ascii=False) + "\n")
    return total


def unified(raw: Path, work: Path) -> Path:
    """`prep convert` of a raw file (what the bare script reads), not timed."""
    out = work / f"{raw.stem}.unified.jsonl"
    run_process([sys.executable, "-m", "prep", "convert", str(raw), "-o", str(out), "--overwrite"])
    return out


# --------------------------------------------------------------------------------------------------
# The bare script (run as `python benchmarks/chat.py bare UNIFIED TOKENIZER`)


def bare(path: str, tokenizer: str) -> None:
    """Render every conversation with the chat template and tokenize all texts in one batched call; print tokens."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer)
    conversations, tools = [], []
    with open(path, encoding="utf-8") as f:
        for line in f:
            record = json.loads(line)
            conversations.append([_chat_message(m) for m in record["messages"]])
            tools.append(record.get("tools"))
    if any(tools):  # tool definitions differ per conversation: one call each, as a user would write it
        texts = [tok.apply_chat_template(c, tools=t, tokenize=False) for c, t in zip(conversations, tools)]
    else:
        texts = tok.apply_chat_template(conversations, tokenize=False)
    ids = tok(texts, add_special_tokens=False)["input_ids"]
    print(sum(map(len, ids)))


def _chat_message(m: dict) -> dict:
    """A unified message as the OpenAI-style dict chat templates take (tool calls under `function`)."""
    out = {"role": m["role"], "content": m["content"]}
    if m.get("tool_calls"):
        out["tool_calls"] = [{"type": "function", "id": c.get("id"),
                              "function": {"name": c["name"], "arguments": c["arguments"]}} for c in m["tool_calls"]]
    for key in ("name", "tool_call_id"):
        if m.get(key) is not None:
            out[key] = m[key]
    return out


# --------------------------------------------------------------------------------------------------
# Speed


def speed(args: argparse.Namespace) -> None:
    """Interleave bare and `prep pack` at each max-len, `--repeats` times; print medians and ratios."""
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        work = Path(tmp)
        raw = chat_data(work) if args.data == "chat" else agent_data(work)
        conversations = unified(raw, work)
        lines = sum(1 for _ in open(conversations, encoding="utf-8"))
        tokenizer = Path(args.tokenizer) if args.tokenizer else SMOLLM2 if args.data == "chat" else QWEN25
        print(f"data: {args.data}, {lines:,} conversations ({raw.stat().st_size / 1e6:.0f} MB raw); tokenizer "
              f"{tokenizer.name}, --template tokenizer; {os.cpu_count()} CPUs; load average {os.getloadavg()[0]:.1f}")
        runs: dict[str, list[Run]] = {}
        tokens: dict[str, int] = {}
        for _ in range(args.repeats):
            run, out = run_process([sys.executable, __file__, "bare", str(conversations), str(tokenizer)])
            runs.setdefault("bare", []).append(run)
            tokens["bare"] = int(out.strip().splitlines()[-1])
            for max_len in args.max_len:
                shards = work / f"shards-{max_len}"
                run, _ = run_process([sys.executable, "-m", "prep", "pack", str(raw), "-o", str(shards),
                                      "--overwrite", "--max-len", str(max_len), "--tokenizer", str(tokenizer),
                                      "--template", "tokenizer", "--workers", str(args.workers)])
                runs.setdefault(f"--max-len {max_len}", []).append(run)
                manifest = json.loads((shards / "manifest.json").read_text())
                tokens[f"--max-len {max_len}"] = manifest["counts"]["tokens"]
        _print_speed(runs, tokens, args.repeats)
        print(f"load average after: {os.getloadavg()[0]:.1f}")


def _print_speed(runs: dict[str, list[Run]], tokens: dict[str, int], repeats: int) -> None:
    """One line per side: median wall/CPU seconds, tokens, tokens/s, peak RSS, and the ratios to bare."""
    med = statistics.median
    base_wall, base_cpu = med(r.wall for r in runs["bare"]), med(r.cpu for r in runs["bare"])
    base_rate = tokens["bare"] / base_wall
    print(f"{'':18s} {'wall s':>8s} {'cpu s':>8s} {'tokens':>12s} {'tokens/s':>10s} {'peak RSS':>9s}  "
          f"time vs bare (wall, cpu)  tokens/s vs bare   [wall of each run]")
    for name, rs in runs.items():
        wall, cpu = med(r.wall for r in rs), med(r.cpu for r in rs)
        rate = tokens[name] / wall
        print(f"{name:18s} {wall:8.1f} {cpu:8.1f} {tokens[name]:12,} {rate:10,.0f} {med(r.rss for r in rs):7,.0f} MiB"
              f"  {base_wall / wall:5.2f}x, {base_cpu / cpu:5.2f}x        {rate / base_rate:5.2f}x"
              f"            [{', '.join(f'{r.wall:.1f}' for r in rs)}]")
    print(f"(medians of {repeats}; time vs bare = bare seconds / prep seconds)")


# --------------------------------------------------------------------------------------------------
# Memory


def peak_rss(data: Path, out: Path, max_len: int, workers: int, batch_bytes: str | None,
             tokenizer: str = str(SMOLLM2)) -> dict[str, float]:
    """Peak RSS (MiB) of the main process and of its largest encoding worker, for one `pack_shards` run."""
    config = {"inputs": [str(data)], "output": str(out), "tokenizer": tokenizer, "template": "tokenizer",
              "max_len": max_len, "overwrite": True, "workers": workers}
    if batch_bytes:
        config["batch_bytes"] = batch_bytes
    _, stdout = run_process([sys.executable, "-c", _MEASURED_CHILD, json.dumps(config)])
    return json.loads(stdout.strip().splitlines()[-1])


def memory(args: argparse.Namespace) -> None:
    """Peak RSS of a one-conversation run (P), and at 1x and 8x long conversations, against P + 200 MiB + 100 x
    --batch-bytes (the README's bound per encoding process)."""
    from prep.write import parse_size

    batch_bytes = args.batch_bytes or "1MiB"
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        work = Path(tmp)
        tiny = work / "tiny.jsonl"
        tiny.write_text('{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}]}\n')
        baseline = peak_rss(tiny, work / "out-tiny", args.max_len, 1, None)["main"]
        bound = baseline + 200 + 100 * parse_size(batch_bytes, "--batch-bytes") / 2**20
        print(f"long conversations (16k-32k SmolLM2 tokens each), --max-len {args.max_len}, --workers {args.workers}, "
              f"--batch-bytes {batch_bytes}; load average {os.getloadavg()[0]:.1f}")
        print(f"P (one short conversation, in-process): {baseline:,.0f} MiB; bound per encoding process "
              f"P + 200 MiB + 100 x --batch-bytes = {bound:,.0f} MiB")
        peaks = []
        for n in (args.conversations // 8, args.conversations):
            data = work / f"long-{n}.jsonl"
            tokens = long_conversations(data, n)
            peak = peak_rss(data, work / f"out-{n}", args.max_len, args.workers, batch_bytes)
            peaks.append(peak)
            worker = f", largest worker {peak['worker']:,.0f} MiB" if args.workers > 1 else ""
            print(f"{n:6,} conversations, {tokens:,} content tokens ({data.stat().st_size / 1e6:.0f} MB): peak RSS "
                  f"main {peak['main']:,.0f} MiB{worker}; within the bound: "
                  f"{max(peak['main'], peak['worker']) <= bound}")
        print(f"ratio 8x / 1x (main process): {peaks[1]['main'] / peaks[0]['main']:.2f} (target <= 1.2)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    s = sub.add_parser("speed")
    s.add_argument("--data", choices=("chat", "agent"), default="chat")
    s.add_argument("--repeats", type=int, default=3)
    s.add_argument("--max-len", type=int, action="append")
    s.add_argument("--workers", type=int, default=0)
    s.add_argument("--tokenizer", default=None, help="default: SmolLM2 for chat, Qwen2.5-Instruct for agent data")
    s.add_argument("--workdir", default=None)
    m = sub.add_parser("memory")
    m.add_argument("--conversations", type=int, default=1000)
    m.add_argument("--max-len", type=int, default=32768)
    m.add_argument("--workers", type=int, default=1)
    m.add_argument("--batch-bytes", default=None)
    m.add_argument("--workdir", default=None)
    b = sub.add_parser("bare")
    b.add_argument("path")
    b.add_argument("tokenizer")
    args = parser.parse_args()
    if args.command == "bare":
        bare(args.path, args.tokenizer)
    elif args.command == "speed":
        args.max_len = args.max_len or [2048, 32768]
        speed(args)
    else:
        memory(args)


if __name__ == "__main__":
    main()
