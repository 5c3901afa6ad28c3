"""Benchmark `prep train`: useful tokens/s and MFU, packed rows versus one example per padded row, same run.

    python benchmarks/train.py                       # CUDA: 0.5B (the 0.5b-qwen config), max_len 2048, bf16
    python benchmarks/train.py --cpu                 # tiny config, max_len 512 (also the mode without CUDA)
    python benchmarks/train.py --attn flex_attention # the packed run's attention path (default: the trainer's auto)
    python benchmarks/train.py --save-shards DIR --max-len 2048   # only build DIR/packed and DIR/padded
    python benchmarks/train.py --shards DIR/packed --padded-shards DIR/padded   # shards built elsewhere
    python benchmarks/train.py ... --only packed --compile --json out.json        # one run (benchmarks/gpu_check.py)

The shards come from `prep pack` itself (packed, and `--no-pack` for one example per row) on the real Alpaca
data in ../shared/data (en, zh, identity): on a GPU with the Qwen2.5 tokenizer (151,665 tokens, the vocabulary of
the 0.5B model), on the CPU with the Mistral one. A GPU machine without pydantic or ../shared takes shards built
by `--save-shards` (or benchmarks/gpu_prepare.py) on another machine (the trainer needs neither).
Both runs go through `train_model` (the real trainer) with the same model, batch size and steps. The padded run
really pads: sdpa with the padding mask, every row holding one example, rows padded to the batch's longest
(rounded up to 64, as the trainer does for unpacked shards), never flash's padding-free concatenation. Useful
tokens are the real, non-pad tokens; MFU counts only their FLOPs (causal attention within each example), so
padding never inflates it. Reported: the median over the steps after warmup, and which kernel each run used.
Targets on an H100/H200 in bf16: packed >= 2x the padded useful tokens/s, and MFU >= 40%.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from prep.train import TrainConfig, train_model  # noqa: E402

SHARED_DATA = Path(os.environ.get("PREP_SHARED_DATA", REPO.parent / "shared" / "data"))
ALPACA = [SHARED_DATA / "alpaca" / name for name in ("alpaca_en_demo.json", "alpaca_zh_demo.json", "identity.json")]
TOKENIZERS = SHARED_DATA / "tokenizers"
GPU = dict(model_config="0.5b-qwen", tokenizer="qwen2.5-0.5b-instruct", max_len=2048, batch_size=8, warmup=5,
           steps=20)
CPU = dict(model_config="tiny", tokenizer="mistral-7b-instruct-v0.3", max_len=512, batch_size=4, warmup=2, steps=8)
PADDED_ATTN = "sdpa"  # the padded baseline's kernel: a real padding mask, whatever the packed run uses


def build(out: Path, max_len: int, tokenizer: str) -> tuple[Path, Path]:
    """`prep pack` the Alpaca data twice into out/packed and out/padded (one example per row)."""
    from prep.pipeline import pack_shards  # needs pydantic: not on the GPU machines, hence --save-shards
    from schemas.pack_config import PackConfig

    folders = []
    for name, pack in (("packed", True), ("padded", False)):
        config = PackConfig(
            inputs=[str(p) for p in ALPACA],
            output=str(out / name),
            tokenizer=str(TOKENIZERS / tokenizer),
            max_len=max_len,
            pack=pack,
            overwrite=True,
        )
        pack_shards(config)
        folders.append(out / name)
    return folders[0], folders[1]


def run(shards: Path, out: Path, setup: dict, attn: str, compile_model: bool) -> dict:
    """Train warmup + steps optimizer steps; return medians of the measured steps and the kernel used."""
    config = TrainConfig(
        shards=str(shards),
        out_dir=str(out),
        model_config=setup["model_config"],
        attn_implementation=attn,
        batch_size=setup["batch_size"],
        max_steps=setup["warmup"] + setup["steps"],
        lr=3e-4,
        compile=compile_model,
        progress=False,
        overwrite=True,
    )
    final = train_model(config)
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    lines = [m for m in lines if "loss" in m][setup["warmup"] :]
    result = {
        key: statistics.median(m[key] for m in lines) for key in ("tokens_per_s", "trained_tokens_per_s", "step_time_s")
    }
    result["examples_per_step"] = statistics.median(m["examples"] for m in lines)
    if "mfu" in lines[0]:
        result["mfu"] = statistics.median(m["mfu"] for m in lines)
    if "max_memory_gib" in lines[-1]:
        result["max_memory_gib"] = max(m["max_memory_gib"] for m in lines)
    result.update(kernel=final["attn_implementation"], compile=compile_model, final_loss=final["loss"],
                  timed_steps=len(lines), model_config=setup["model_config"], batch_size=setup["batch_size"])
    return result


def report(runs: dict[str, dict], mode: str) -> dict:
    """Print a rich table of the runs and return them with the packed / padded ratio when both ran."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"prep train: packed vs padded ({mode})")
    for column in ("rows", "kernel", "useful tok/s", "trained tok/s", "examples/step", "step s", "MFU", "peak GiB"):
        table.add_column(column, justify="right")
    for name, r in runs.items():
        table.add_row(
            name,
            r["kernel"] + (" +compile" if r["compile"] else ""),
            f"{r['tokens_per_s']:,.0f}",
            f"{r['trained_tokens_per_s']:,.0f}",
            f"{r['examples_per_step']:.0f}",
            f"{r['step_time_s']:.3f}",
            f"{r['mfu']:.1%}" if "mfu" in r else "n/a",
            f"{r['max_memory_gib']:.1f}" if "max_memory_gib" in r else "n/a",
        )
    Console().print(table)
    result = {"mode": mode, **runs}
    if "packed" in runs and "padded" in runs:
        result["speedup"] = runs["packed"]["tokens_per_s"] / runs["padded"]["tokens_per_s"]
        Console().print(f"packed / padded useful tokens/s: [bold]{result['speedup']:.2f}x[/] (target >= 2x)")
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cpu", action="store_true", help="tiny CPU configuration even when CUDA is available")
    parser.add_argument("--shards", type=Path, help="packed shards (default: built here from the Alpaca data)")
    parser.add_argument("--padded-shards", type=Path, help="one-example-per-row shards (default: built here)")
    parser.add_argument("--save-shards", type=Path, help="only build DIR/packed and DIR/padded, then stop")
    parser.add_argument("--max-len", type=int, help="max-len of the shards built here (default: 2048 GPU, 512 CPU)")
    parser.add_argument("--tokenizer", help="folder name under ../shared/data/tokenizers for shards built here")
    parser.add_argument("--model-config", help="built-in model config (default: 0.5b-qwen GPU, tiny CPU)")
    parser.add_argument("--attn", default="auto", help="the packed run's attention path (padded: always sdpa)")
    parser.add_argument("--only", choices=("packed", "padded"), help="one of the two runs")
    parser.add_argument("--steps", type=int, help="measured steps (after warmup)")
    parser.add_argument("--warmup", type=int, help="steps before the measured ones (compile needs a few)")
    parser.add_argument("--batch-size", type=int)
    parser.add_argument("--compile", action="store_true", help="torch.compile the model")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    gpu = torch.cuda.is_available() and not args.cpu
    overrides = {k: getattr(args, k) for k in ("steps", "warmup", "batch_size", "max_len", "tokenizer", "model_config")}
    setup = {**(GPU if gpu else CPU), **{k: v for k, v in overrides.items() if v is not None}}
    if args.save_shards:
        print("built", *build(args.save_shards, setup["max_len"], setup["tokenizer"]))
        return
    mode = (
        f"GPU {torch.cuda.get_device_name()} bf16, {setup['model_config']}"
        if gpu
        else f"CPU, {setup['model_config']} config"
    )
    if not gpu:
        print(f"No GPU in use: running the tiny CPU configuration ({setup}); the targets apply to an H100/H200.")
    names = [args.only] if args.only else ["packed", "padded"]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        folders = {"packed": args.shards, "padded": args.padded_shards}
        if any(folders[name] is None for name in names):
            folders = dict(zip(("packed", "padded"), build(tmp, setup["max_len"], setup["tokenizer"])))
        attn = {"packed": args.attn, "padded": PADDED_ATTN}
        runs = {name: run(folders[name], tmp / f"out-{name}", setup, attn[name], args.compile) for name in names}
    result = report(runs, mode)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
