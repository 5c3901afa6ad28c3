"""Memory stays flat as data grows: peak RSS of `prep convert` and `prep pack` subprocesses at two sizes, 10x
apart, differ by a ratio <= 1.5 and by far less than holding the data would cost.

The inputs and the measurement (child `ru_maxrss` via os.wait4) come from benchmarks/scale.py, which runs
the same thing at a million records; the long conversations (16k-32k tokens each) from benchmarks/chat.py,
which runs them at 125 and 1,000.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
MAX_RATIO = 1.5


def _scale_module():
    """benchmarks/scale.py, imported by path (benchmarks/ is not a package)."""
    spec = importlib.util.spec_from_file_location("prep_benchmark_scale", REPO / "benchmarks" / "scale.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


scale = _scale_module()


def _peaks(tmp_path: Path, sizes: tuple[int, int], stage_args) -> list[float]:
    """Peak RSS (MiB) of one stage at each size; `stage_args(raw, out)` gives the prep arguments."""
    peaks = []
    for n in sizes:
        raw = tmp_path / f"raw-{n}.jsonl"
        scale.write_input(raw, n)
        peaks.append(scale.run_measured(stage_args(raw, tmp_path / f"out-{n}")).peak_mib)
    return peaks


def test_convert_memory_is_flat(tmp_path: Path):
    """10k vs 100k records (5.6 MB vs 56 MB of JSON Lines): ratio <= 1.5 and under 32 MiB more.
    Holding the records as Python objects would add several hundred MiB."""
    small, big = _peaks(tmp_path, (10_000, 100_000), lambda raw, out: ["convert", str(raw), "-o", f"{out}.jsonl"])
    assert big / small <= MAX_RATIO, (small, big)
    assert big - small <= 32, (small, big)


@pytest.mark.parametrize("tokenizer", ["gpt2-dialogpt-small"])
def test_pack_memory_is_flat(tmp_path: Path, shared_data: Path, tokenizer: str):
    """1.5k vs 15k records (~0.3M vs ~3M tokens), batches of 256: ratio <= 1.5 and under 96 MiB more.
    Keeping every example's tokens as Python lists would add over 200 MiB; only lengths stay in memory."""
    def args(raw: Path, out: Path) -> list[str]:
        return ["pack", str(raw), "-o", str(out), "--max-len", "2048", "--tokenizer",
                str(shared_data / "tokenizers" / tokenizer), "--batch-size", "256"]

    small, big = _peaks(tmp_path, (1_500, 15_000), args)
    assert big / small <= MAX_RATIO, (small, big)
    assert big - small <= 96, (small, big)


def test_a_validation_split_holds_hashes_not_conversations(tmp_path: Path, shared_data: Path):
    """30k records packed with and without --val-fraction 0.1: the split run's peak RSS is within 20 MiB of the
    plain run's (measured: within 1 MiB; holding the source's conversations until the split is decided, as
    prep did before, cost 42 MiB more here)."""
    raw = tmp_path / "raw.jsonl"
    scale.write_input(raw, 30_000)
    common = ["--max-len", "2048", "--batch-size", "256", "--tokenizer",
              str(shared_data / "tokenizers" / "gpt2-dialogpt-small")]
    plain = scale.run_measured(["pack", str(raw), "-o", str(tmp_path / "plain"), *common]).peak_mib
    split = scale.run_measured(["pack", str(raw), "-o", str(tmp_path / "split"), "--val-fraction", "0.1",
                                *common]).peak_mib
    assert split - plain <= 20, (plain, split)


def _chat_module():
    """benchmarks/chat.py, imported by path: its long-conversation data set."""
    spec = importlib.util.spec_from_file_location("prep_benchmark_chat", REPO / "benchmarks" / "chat.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


BATCH_BYTES = 256 * 2**10


def _bound(baseline: float) -> float:
    """The README's bound for one encoding process: its baseline + 200 MiB + 100 x --batch-bytes (in MiB)."""
    return baseline + 200 + 100 * BATCH_BYTES / 2**20


@pytest.fixture(scope="module")
def long_inputs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A one-conversation input, and 12 and 96 conversations of 16k-32k SmolLM2 tokens each (0.3M, 2.4M tokens)."""
    chat = _chat_module()
    tmp = tmp_path_factory.mktemp("long")
    paths = {"tiny": tmp / "tiny.jsonl", "small": tmp / "small.jsonl", "big": tmp / "big.jsonl"}
    paths["tiny"].write_text('{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}]}\n')
    chat.long_conversations(paths["small"], 12)
    chat.long_conversations(paths["big"], 96)
    return paths


def test_pack_memory_is_bounded_on_long_conversations(tmp_path: Path, shared_data: Path, long_inputs: dict[str, Path]):
    """12 vs 96 long conversations, --max-len 32768, --batch-bytes 256KiB: ratio <= 1.2, and the peak within the
    README's bound, the process with its tokenizer (measured here on the one-conversation input) + 200 MiB +
    100 x --batch-bytes. (Batches of 2,048 conversations, as prep made before, grew with such data: 1.0 GB at
    250 conversations, 5.1 GB at 2,000.)"""

    def peak(name: str) -> float:
        return scale.run_measured(["pack", str(long_inputs[name]), "-o", str(tmp_path / name), "--max-len", "32768",
                                   "--tokenizer", str(shared_data / "tokenizers" / "smollm2-135m"), "--template",
                                   "tokenizer", "--batch-bytes", str(BATCH_BYTES)]).peak_mib

    baseline, small_peak, big_peak = peak("tiny"), peak("small"), peak("big")
    assert big_peak / small_peak <= 1.2, (small_peak, big_peak)
    assert big_peak <= _bound(baseline), (baseline, small_peak, big_peak)


def test_pack_memory_with_workers_is_bounded_per_process(tmp_path: Path, shared_data: Path,
                                                          long_inputs: dict[str, Path]):
    """--workers 2 on the 96 long conversations: the main process (it converts, queues up to 2 batches per
    worker and writes the shards) and each worker stay within the same per-process bound."""
    chat = _chat_module()
    tokenizer = str(shared_data / "tokenizers" / "smollm2-135m")
    baseline = chat.peak_rss(long_inputs["tiny"], tmp_path / "tiny", 32768, 1, None, tokenizer=tokenizer)["main"]
    peaks = chat.peak_rss(long_inputs["big"], tmp_path / "big", 32768, 2, str(BATCH_BYTES), tokenizer=tokenizer)
    assert 0 < peaks["worker"] <= _bound(baseline), (baseline, peaks)
    assert peaks["main"] <= _bound(baseline), (baseline, peaks)
