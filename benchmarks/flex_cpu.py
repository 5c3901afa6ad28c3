"""Is PyTorch's compiled CPU flex_attention kernel right on this CPU? (why prep refuses flex_attention off CUDA)

For each sequence length, causal attention on the same random q/k/v through `torch.compile(flex_attention)` and
through `scaled_dot_product_attention(is_causal=True)`, in fp32 on the CPU, with the attention shape of prep's
`tiny` model (4 query heads sharing 2 key/value heads, head dim 16); prints the largest absolute difference of the
outputs. Two correct kernels differ by fp32 rounding (about 1e-6); a wrong one by values near 1, or NaN.

    python benchmarks/flex_cpu.py                    # lengths 8..128 in steps of 8
    python benchmarks/flex_cpu.py --lengths 24 64 120 --runs 3 --head-dim 64 --kv-heads 4
"""

from __future__ import annotations

import argparse
import platform

import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import create_block_mask, flex_attention


def causal(b, h, q, kv):
    """The causal mask_mod."""
    return q >= kv


def max_difference(length: int, seed: int, compiled, heads: int, kv_heads: int, head_dim: int) -> float:
    """Largest |flex - sdpa| over one random causal attention of `length` tokens (batch 1)."""
    generator = torch.Generator().manual_seed(seed)
    q = torch.randn(1, heads, length, head_dim, generator=generator)
    k, v = (torch.randn(1, kv_heads, length, head_dim, generator=generator) for _ in range(2))
    mask = create_block_mask(causal, 1, 1, length, length, device="cpu")
    flex = compiled(q, k, v, block_mask=mask, enable_gqa=kv_heads != heads)
    groups = heads // kv_heads
    reference = F.scaled_dot_product_attention(q, k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1),
                                               is_causal=True)
    return float((flex - reference).abs().max())


def main() -> None:
    """Print one line per length: the largest difference of each run."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", type=int, nargs="+", default=list(range(8, 129, 8)))
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--kv-heads", type=int, default=2)
    parser.add_argument("--head-dim", type=int, default=16)
    args = parser.parse_args()
    flags = open("/proc/cpuinfo").read() if platform.system() == "Linux" else ""
    print(f"torch {torch.__version__}, CPU avx512f: {'avx512f' in flags}, avx2: {'avx2' in flags}")
    for limit in ("recompile_limit", "cache_size_limit"):  # one compiled kernel per length, never the eager fallback
        if hasattr(torch._dynamo.config, limit):
            setattr(torch._dynamo.config, limit, 4 * len(args.lengths))
    compiled = torch.compile(flex_attention, dynamic=False)
    for length in args.lengths:
        diffs = [max_difference(length, seed, compiled, args.heads, args.kv_heads, args.head_dim)
                 for seed in range(args.runs)]
        verdict = "ok" if all(d < 1e-4 for d in diffs) else "WRONG"  # NaN compares False: WRONG
        print(f"length {length:4d}: max |flex - sdpa| " + ", ".join(f"{d:.2e}" for d in diffs) + f"  {verdict}")


if __name__ == "__main__":
    main()
