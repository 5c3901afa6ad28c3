"""The README's GPU figures are the ones the recorded GPU runs wrote (benchmarks/results/*.json).

The runs themselves need a GPU (`bash benchmarks/gpu_check.sh`); this checks that the text did not drift from them.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
README = (ROOT / "README.md").read_text(encoding="utf-8")


def _run(name: str) -> dict:
    return json.loads((RESULTS / f"{name}.json").read_text(encoding="utf-8"))


def _figures(run: dict, step: str) -> dict:
    (figures,) = [v for v in run["steps"][step]["figures"].values() if isinstance(v, dict)]
    return figures


@pytest.mark.parametrize("step", ["train_packed_sdpa", "train_padded_sdpa", "train_packed_flex"])
def test_the_gpu_table_rows_are_the_recorded_figures(step):
    f = _figures(_run("gpu_check-h200"), step)
    row = (f"| {f['tokens_per_s']:,.0f} | {f['step_time_s']:.3f} s | {100 * f['mfu']:.1f} % | "
           f"{f['max_memory_gib']:.1f} GiB |")
    assert row in README, row


def test_the_summary_and_the_before_after_figures_are_the_recorded_ones():
    after, before = _run("gpu_check-h200"), _run("gpu_check-h200-before-vocab-padding")
    summary = after["summary"]
    assert summary["all_steps_passed"] and summary["speedup_target_met"] and not summary["mfu_target_met"]
    assert f"**Packed vs padded: {summary['packed_over_padded']:.2f}x**" in README
    assert f"**{summary['packed_over_padded_same_kernel']:.2f}x with the same kernel**" in README
    assert f"**MFU: {100 * summary['mfu_bf16']:.1f} % at best. The 40 % target is not met.**" in README
    for step in ("train_packed_sdpa", "train_packed_flex"):
        old, new = _figures(before, step), _figures(after, step)
        assert (f"from {old['tokens_per_s']:,.0f} to {new['tokens_per_s']:,.0f}" in README
                or f"{old['tokens_per_s']:,.0f} to {new['tokens_per_s']:,.0f}" in README), step
    compiled = _figures(before, "train_packed_compile")
    assert compiled["compile"] and f"{compiled['tokens_per_s']:,.0f} tokens/s, {100 * compiled['mfu']:.1f} %" in README
    assert after["env"]["gpu"] == "NVIDIA H200" and after["env"]["torch"] in README
    isolation = summary["isolation_max_difference"]
    assert isolation["leak_control/flex_attention/causal_only_mask/cuda"]["max_difference"] > 0.1  # a leak is seen
    assert all(v["max_difference"] < v["below"] for k, v in isolation.items() if "below" in v)
