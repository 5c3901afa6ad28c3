"""Benchmark `prep train`: useful tokens/s and MFU, packed rows versus one example per padded row, same run.

    python benchmarks/train.py                       # CUDA: the "0.5b" Llama-style config, max_len 2048, bf16
    python benchmarks/train.py --cpu                 # tiny config, max_len 512 (also the mode without CUDA)
    python benchmarks/train.py --attn flex_attention # another attention path (default: the trainer's auto)
    python benchmarks/train.py --save-shards DIR --max-len 2048   # only build DIR/packed and DIR/padded
    python benchmarks/train.py --shards DIR/packed --padded-shards DIR/padded   # shards built elsewhere

The shards come from `prep pack` itself (packed, and `--no-pack` for one example per row) on the real Alpaca
data in ../shared/data (en, zh, identity), with the Mistral tokenizer there. A GPU machine without pydantic or
../shared takes shards built by `--save-shards` on another machine (the trainer needs neither).
Both runs go through `train_model` (the real trainer) with the same model, batch size and steps. Useful tokens
are the real, non-pad tokens; MFU counts only their FLOPs (attention within each example), so padding never
inflates it. Reported: the median over the steps after warmup.
Targets on an H100 in bf16: packed >= 2x the padded useful tokens/s, and MFU >= 40%.
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
TOKENIZER = SHARED_DATA / "tokenizers" / "mistral-7b-instruct-v0.3"
GPU = dict(model_config="0.5b", max_len=2048, batch_size=8, warmup=5, steps=25)
CPU = dict(model_config="tiny", max_len=512, batch_size=4, warmup=2, steps=8)


def build(out: Path, max_len: int) -> tuple[Path, Path]:
    """`prep pack` the Alpaca data twice into out/packed and out/padded (one example per row)."""
    from prep.pipeline import pack_shards  # needs pydantic: not on the GPU machines, hence --save-shards
    from schemas.pack_config import PackConfig

    folders = []
    for name, pack in (("packed", True), ("padded", False)):
        config = PackConfig(
            inputs=[str(p) for p in ALPACA],
            output=str(out / name),
            tokenizer=str(TOKENIZER),
            max_len=max_len,
            pack=pack,
            overwrite=True,
        )
        pack_shards(config)
        folders.append(out / name)
    return folders[0], folders[1]


def run(shards: Path, out: Path, setup: dict, attn: str, compile_model: bool) -> dict:
    """Train warmup + steps optimizer steps; return medians of the measured steps."""
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
    train_model(config)
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    lines = [m for m in lines if "loss" in m][setup["warmup"] :]
    result = {
        key: statistics.median(m[key] for m in lines) for key in ("tokens_per_s", "trained_tokens_per_s", "step_time_s")
    }
    result["examples_per_step"] = statistics.median(m["examples"] for m in lines)
    if "mfu" in lines[0]:
        result["mfu"] = statistics.median(m["mfu"] for m in lines)
    return result


def report(packed: dict, padded: dict, mode: str) -> dict:
    """Print a rich table and return the comparison as a dict."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"prep train: packed vs padded ({mode})")
    for column in ("rows", "useful tok/s", "trained tok/s", "examples/step", "step s", "MFU"):
        table.add_column(column, justify="right")
    for name, r in (("packed", packed), ("padded", padded)):
        mfu = f"{r['mfu']:.1%}" if "mfu" in r else "n/a"
        table.add_row(
            name,
            f"{r['tokens_per_s']:,.0f}",
            f"{r['trained_tokens_per_s']:,.0f}",
            f"{r['examples_per_step']:.0f}",
            f"{r['step_time_s']:.3f}",
            mfu,
        )
    Console().print(table)
    speedup = packed["tokens_per_s"] / padded["tokens_per_s"]
    Console().print(f"packed / padded useful tokens/s: [bold]{speedup:.2f}x[/] (target >= 2x)")
    return {"mode": mode, "packed": packed, "padded": padded, "speedup": speedup}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cpu", action="store_true", help="tiny CPU configuration even when CUDA is available")
    parser.add_argument("--shards", type=Path, help="packed shards (default: built here from the Alpaca data)")
    parser.add_argument("--padded-shards", type=Path, help="one-example-per-row shards (default: built here)")
    parser.add_argument("--save-shards", type=Path, help="only build DIR/packed and DIR/padded, then stop")
    parser.add_argument("--max-len", type=int, help="max-len of the shards built here (default: 2048 GPU, 512 CPU)")
    parser.add_argument("--attn", default="auto", help="attention path (the trainer's --attn-implementation)")
    parser.add_argument("--steps", type=int, help="measured steps (after warmup)")
    parser.add_argument("--batch-size", type=int)
    parser.add_argument("--compile", action="store_true", help="torch.compile the model")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    gpu = torch.cuda.is_available() and not args.cpu
    setup = {
        **(GPU if gpu else CPU),
        **{k: v for k, v in (("steps", args.steps), ("batch_size", args.batch_size), ("max_len", args.max_len)) if v},
    }
    if args.save_shards:
        print("built", *build(args.save_shards, setup["max_len"]))
        return
    mode = (
        f"GPU {torch.cuda.get_device_name()} bf16, {setup['model_config']}, attn {args.attn}"
        if gpu
        else f"CPU, {setup['model_config']} config, attn {args.attn}"
    )
    if not gpu:
        print(f"No GPU in use: running the tiny CPU configuration ({setup}); the targets apply to an H100.")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        packed_dir, padded_dir = (
            (args.shards, args.padded_shards) if args.shards and args.padded_shards else build(tmp, setup["max_len"])
        )
        packed = run(packed_dir, tmp / "out-packed", setup, args.attn, args.compile)
        padded = run(padded_dir, tmp / "out-padded", setup, args.attn, args.compile)
    result = report(packed, padded, mode)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
