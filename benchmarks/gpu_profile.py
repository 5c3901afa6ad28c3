"""Where a training step's GPU time goes: torch.profiler over three steps of `prep train` (after five warm-up steps).

    python3 benchmarks/gpu_profile.py SHARDS [--attn flex_attention] [--compile] [--model-config 0.5b-qwen]

SHARDS is a packed shard folder, e.g. the one benchmarks/gpu_prepare.py puts in its archive
(`tar -xzf .device/gpu-inputs.tar.gz -C /tmp/in`, then /tmp/in/shards/packed). Prints the kernels with the most
GPU time and writes the full tables to --out. This is how the unaligned language-model-head GEMMs were found
(README, "Training on a GPU"). Needs CUDA; imports only what `prep train` does.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
import torch.optim.optimizer as optimizer_hooks
from torch.profiler import ProfilerActivity, profile, schedule

from prep.train import TrainConfig, train_model


def main() -> None:
    """Train for ten steps under the profiler and print the top kernels by GPU time."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("shards")
    parser.add_argument("--attn", default="flex_attention")
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--model-config", default="0.5b-qwen")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--out", default="gpu_profile.txt")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("error: benchmarks/gpu_profile.py needs CUDA")
    prof = profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA],
                   schedule=schedule(wait=5, warmup=1, active=3, repeat=1))
    optimizer_hooks.register_optimizer_step_post_hook(lambda *_: prof.step())  # one profiler step per optimizer step
    config = TrainConfig(shards=args.shards, out_dir=tempfile.mkdtemp(), model_config=args.model_config,
                         attn_implementation=args.attn, compile=args.compile, max_steps=10, progress=False,
                         batch_size=args.batch_size)
    prof.start()
    final = train_model(config)
    prof.stop()
    averages = prof.key_averages()
    by_gpu = averages.table(sort_by="self_cuda_time_total", row_limit=30, max_name_column_width=60)
    by_cpu = averages.table(sort_by="cpu_time_total", row_limit=40, max_name_column_width=60)
    Path(args.out).write_text(by_gpu + "\n\n" + by_cpu + "\n")
    print({k: final[k] for k in ("step_time_s", "tokens_per_s", "mfu") if k in final})
    print("\n".join(by_gpu.splitlines()[:24]))


if __name__ == "__main__":
    main()
