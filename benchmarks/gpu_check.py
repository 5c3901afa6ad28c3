"""The GPU checks of `prep train` as one bounded run that writes one JSON file of figures (see gpu_check.sh).

    python3 benchmarks/gpu_check.py --inputs DIR --out OUT            # on a GPU machine (DIR: gpu_prepare's archive)
    python3 benchmarks/gpu_check.py --inputs DIR --out OUT --cpu-smoke   # the same steps, tiny, on a CPU (CI)

Every step runs in its own process with its own timeout (its process group is killed when it runs over), inside a
total budget; OUT/gpu_check.json is rewritten after every step, so a step that fails or hangs never loses the
figures of the others, and OUT/gpu_check.log holds every step's output. Exit code 0 only when every step that ran
passed. Budget on an H100/H200 (seconds; each step's timeout in brackets):

    env                  GPU, driver, versions, flash-attn present?                      ~10   [60]
    train_packed_sdpa    0.5B (0.5b-qwen), max-len 2048, bf16, 8 rows, 3 + 10 steps         ~40   [120]
    train_padded_sdpa    the same on one example per row, padded to the batch (sdpa)        ~35   [120]
    tests                pytest on CUDA: flex/flash isolation (their max differences are
                         recorded), the flex and --compile training paths, torch_loop       ~120  [200]
    train_packed_compile flash_attention_2 (flex_attention without flash-attn) + --compile,
                         4 + 10 steps                                                       ~150  [240]
    train_packed_flex    as train_packed_sdpa with flex_attention (its kernels compile)    ~80   [150]
    train_packed_flash   with flash_attention_2, only where flash-attn is installed         ~40   [120]
                                                                     total budget (--budget-s)  450

A step that would start with less than its minimum left is recorded as skipped (out of budget), never half-run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SCHEMA = "prep-gpu-check/1"
MFU_TARGET, SPEEDUP_TARGET = 0.40, 2.0
TRAIN_STEPS = {"gpu": dict(warmup=3, steps=10), "cpu-smoke": dict(warmup=1, steps=2)}
COMPILE_STEPS = {"gpu": dict(warmup=4, steps=10), "cpu-smoke": dict(warmup=1, steps=2)}
GPU_TESTS = [  # the tests that run a GPU kernel (their CPU-only neighbours run in CI)
    "tests/test_attention_isolation.py",
    "tests/test_train.py::test_checkpointing_compile_and_other_attention_paths_train_like_the_default",
    "tests/test_trainer_recipes.py::test_torch_loop_recipe_learns",
    "-k", "flex or flash or compile or torch_loop",
]
# On a CPU (--cpu-smoke): one isolation test that runs (sdpa) and one that is skipped without CUDA (flex)
SMOKE_TESTS = ["tests/test_attention_isolation.py::test_packed_rows_give_the_loss_of_each_example_alone",
               "-k", "llama and (sdpa or flex)"]


@dataclass
class Step:
    """One check: a command, its timeout, and the least time it needs to be worth starting."""

    name: str
    argv: list[str]
    timeout_s: float
    min_s: float = 20.0
    figures: Path | None = None  # a JSON file the command writes; merged into the step's record
    env: dict[str, str] = field(default_factory=dict)


class Check:
    """Runs steps one by one within a budget and keeps OUT/gpu_check.json up to date after each."""

    def __init__(self, out: Path, budget_s: float, mode: str):
        self.out, self.budget_s, self.mode = out, budget_s, mode
        self.start = time.monotonic()
        self.log = out / "gpu_check.log"
        self.result: dict = {"schema": SCHEMA, "mode": mode, "budget_s": budget_s, "started": _now(), "steps": {}}
        out.mkdir(parents=True, exist_ok=True)
        self.log.write_text("")
        self.save()

    def left(self) -> float:
        """Seconds left in the budget."""
        return self.budget_s - (time.monotonic() - self.start)

    def skip(self, name: str, reason: str) -> None:
        """Record a step that is not run, and why."""
        self.result["steps"][name] = {"status": "skipped", "reason": reason}
        self._say(f"[{name}] skipped: {reason}")
        self.save()

    def run(self, step: Step) -> dict:
        """Run `step` in its own process group; record status, time, exit code, output tail and its figures."""
        if self.left() < step.min_s:
            self.skip(step.name, f"out of budget ({self.left():.0f} s left of {self.budget_s:.0f})")
            return self.result["steps"][step.name]
        timeout = min(step.timeout_s, self.left())
        self._say(f"[{step.name}] start (timeout {timeout:.0f} s): {' '.join(step.argv)}")
        t0 = time.monotonic()
        status, code, output = _run(step.argv, timeout, {**os.environ, **step.env})
        record = {"status": status, "seconds": round(time.monotonic() - t0, 1), "timeout_s": round(timeout),
                  "returncode": code}
        if status != "passed":
            record["log_tail"] = output[-3000:]
        if step.figures is not None and step.figures.is_file():
            try:
                record["figures"] = json.loads(step.figures.read_text())
            except ValueError as e:
                record["figures_error"] = f"{step.figures.name}: {e}"
        with self.log.open("a") as f:
            f.write(f"===== {step.name}: {status} in {record['seconds']} s (exit {code})\n{output}\n")
        self.result["steps"][step.name] = record
        self._say(f"[{step.name}] {status} in {record['seconds']} s")
        self.save()
        return record

    def save(self, **extra) -> None:
        """Write the JSON atomically (a crash leaves the previous complete version)."""
        self.result.update(extra, wall_s=round(time.monotonic() - self.start, 1), updated=_now())
        tmp = self.out / "gpu_check.json.tmp"
        tmp.write_text(json.dumps(self.result, indent=2, default=str))
        os.replace(tmp, self.out / "gpu_check.json")

    def _say(self, line: str) -> None:
        print(f"{time.monotonic() - self.start:6.1f}s {line}", flush=True)


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


def _run(argv: list[str], timeout: float, env: dict[str, str]) -> tuple[str, int | None, str]:
    """(passed | failed | timeout, exit code, stdout+stderr) of a command run in a process group of its own."""
    with tempfile.TemporaryFile("w+") as buffer:
        proc = subprocess.Popen(argv, stdout=buffer, stderr=subprocess.STDOUT, cwd=REPO, env=env, process_group=0)
        previous = signal.signal(signal.SIGTERM, lambda *_: _stop(proc))  # stopped from outside: take the step along
        try:
            code = proc.wait(timeout=timeout)
            status = "passed" if code == 0 else "failed"
        except subprocess.TimeoutExpired:
            _kill_group(proc)  # the step and everything it started (compile workers too)
            code, status = proc.wait(), "timeout"
        finally:
            signal.signal(signal.SIGTERM, previous)
        buffer.seek(0)
        return status, code, buffer.read()


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:  # already gone
        pass


def _stop(proc: subprocess.Popen) -> None:
    _kill_group(proc)
    raise SystemExit("error: stopped from outside (SIGTERM); gpu_check.json holds the steps that finished")


def environment() -> dict:
    """The machine and the versions the figures come from (run as the `env` step, in its own process)."""
    import torch
    import transformers

    info = {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
            "cuda_available": torch.cuda.is_available(), "cpu_count": os.cpu_count(), "machine": platform.machine()}
    for name in ("triton", "flash_attn", "pyarrow", "numpy"):
        try:
            info[name] = __import__(name).__version__
        except Exception as e:  # absent, or broken on import: say which
            info[name] = f"unavailable ({type(e).__name__})"
    from transformers.utils import is_flash_attn_2_available

    info["flash_attention_2"] = bool(is_flash_attn_2_available())
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(gpu=torch.cuda.get_device_name(0), gpu_memory_gib=round(props.total_memory / 2**30, 1),
                    capability=f"{props.major}.{props.minor}", cuda=torch.version.cuda,
                    bf16=torch.cuda.is_bf16_supported())
        from prep.train import peak_bf16_flops

        peak = peak_bf16_flops(info["gpu"])
        info["peak_bf16_tflops"] = peak / 1e12 if peak else None
        try:
            info["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                            capture_output=True, text=True, timeout=20).stdout.strip()
        except (OSError, subprocess.SubprocessError) as e:
            info["driver"] = f"unknown ({type(e).__name__})"
    return info


def train_step(name: str, inputs: Path, work: Path, mode: str, rows: str, attn: str, compile_model: bool = False,
               timeout_s: float = 120, min_s: float = 30) -> Step:
    """A benchmarks/train.py run on the prepared shards, its figures in work/<name>.json."""
    steps = (COMPILE_STEPS if compile_model else TRAIN_STEPS)[mode]
    argv = [sys.executable, str(REPO / "benchmarks" / "train.py"), "--only", rows, "--attn", attn,
            "--shards", str(inputs / "shards" / "packed"), "--padded-shards", str(inputs / "shards" / "padded"),
            "--warmup", str(steps["warmup"]), "--steps", str(steps["steps"]), "--json", str(work / f"{name}.json")]
    if compile_model:
        argv.append("--compile")
    if mode == "cpu-smoke":
        argv += ["--cpu", "--batch-size", "2"]
    return Step(name, argv, timeout_s, min_s, figures=work / f"{name}.json")


def summarize(result: dict) -> dict:
    """The headline figures against the issue's targets, from the steps' records."""
    steps = result["steps"]
    runs = {name.removeprefix("train_"): rec["figures"][name.split("_")[1]]  # train_packed_x -> figures["packed"]
            for name, rec in steps.items() if name.startswith("train_") and "figures" in rec}
    summary: dict = {"targets": {"mfu_bf16": MFU_TARGET, "packed_over_padded": SPEEDUP_TARGET}}
    padded = runs.get("padded_sdpa")
    packed = {name: r for name, r in runs.items() if name.startswith("packed_")}
    if packed:
        best = max(packed, key=lambda n: packed[n]["tokens_per_s"])
        summary["best_packed_run"] = best
        summary["best_packed_tokens_per_s"] = packed[best]["tokens_per_s"]
        with_mfu = {n: r["mfu"] for n, r in packed.items() if "mfu" in r}
        if with_mfu:
            top = max(with_mfu, key=with_mfu.get)
            summary.update(mfu_bf16=with_mfu[top], mfu_run=top, mfu_target_met=with_mfu[top] >= MFU_TARGET)
        memory = [r["max_memory_gib"] for r in runs.values() if "max_memory_gib" in r]
        if memory:
            summary["peak_memory_gib"] = max(memory)
    if padded and packed:
        summary["padded_tokens_per_s"] = padded["tokens_per_s"]
        summary["packed_over_padded"] = summary["best_packed_tokens_per_s"] / padded["tokens_per_s"]
        if "packed_sdpa" in packed:  # the same kernel on both sides: packing alone
            summary["packed_over_padded_same_kernel"] = packed["packed_sdpa"]["tokens_per_s"] / padded["tokens_per_s"]
        summary["speedup_target_met"] = summary["packed_over_padded"] >= SPEEDUP_TARGET
    tests = steps.get("tests", {}).get("figures")
    if tests:
        summary["tests"] = tests.get("counts")
        summary["isolation_max_difference"] = tests.get("isolation")
    summary["all_steps_passed"] = all(rec["status"] in ("passed", "skipped") for rec in steps.values())
    return summary


def tests_step(inputs: Path, work: Path, timeout_s: float, tests: list[str]) -> Step:
    """pytest (on CUDA): the isolation tests record their measured differences in work/isolation.jsonl."""
    argv = [sys.executable, str(REPO / "benchmarks" / "gpu_check.py"), "--pytest-figures", str(work / "tests.json"),
            "--", "-q", "-rA", "-p", "no:cacheprovider", *tests]
    env = {"PREP_ISOLATION_FIGURES": str(work / "isolation.jsonl"), "PREP_SHARED_DATA": str(inputs / "data")}
    return Step("tests", argv, timeout_s, 60, figures=work / "tests.json", env=env)


def pytest_with_figures(figures: Path, args: list[str]) -> int:
    """Run pytest in this process; write pass/fail counts and the isolation figures the tests recorded."""
    import pytest

    class Counts:
        def __init__(self):
            self.counts = {"passed": 0, "failed": 0, "skipped": 0, "error": 0}
            self.failed: list[str] = []

        def pytest_runtest_logreport(self, report):
            if report.when == "call" or report.outcome != "passed":
                outcome = "error" if report.when != "call" and report.outcome == "failed" else report.outcome
                self.counts[outcome] += 1
                if report.outcome == "failed":
                    self.failed.append(report.nodeid)

    counts = Counts()
    code = int(pytest.main(args, plugins=[counts]))
    isolation = {}
    records = Path(os.environ.get("PREP_ISOLATION_FIGURES", ""))
    if records.is_file():
        for line in records.read_text().splitlines():
            entry = json.loads(line)
            isolation[entry.pop("test")] = entry
    figures.write_text(json.dumps({"counts": counts.counts, "failed": counts.failed, "isolation": isolation,
                                   "exit_code": code}, indent=2))
    return code


def plan(inputs: Path, work: Path, mode: str, flash: bool) -> list[Step | tuple[str, str]]:
    """The steps in order of importance; (name, reason) for a step this machine cannot run."""
    gpu = mode == "gpu"
    no_cuda = "needs CUDA (the flex and flash kernels run only there; prep refuses flex_attention on the CPU)"
    no_flash = "flash-attn is not installed" if gpu else no_cuda
    fast = "flash_attention_2" if flash else "flex_attention"  # kernels that skip the attention between examples
    steps: list[Step | tuple[str, str]] = [
        train_step("train_packed_sdpa", inputs, work, mode, "packed", "sdpa"),
        train_step("train_padded_sdpa", inputs, work, mode, "padded", "sdpa"),
        tests_step(inputs, work, 200, GPU_TESTS if gpu else SMOKE_TESTS),
    ]
    if gpu:
        steps += [
            train_step("train_packed_compile", inputs, work, mode, "packed", fast, compile_model=True, timeout_s=240,
                       min_s=90),
            train_step("train_packed_flex", inputs, work, mode, "packed", "flex_attention", timeout_s=150, min_s=60),
            train_step("train_packed_flash", inputs, work, mode, "packed", "flash_attention_2") if flash
            else ("train_packed_flash", no_flash),
        ]
    else:
        steps += [("train_packed_compile", "a CPU compile of the model takes minutes; tests/test_train.py[compile] "
                   "covers the path on the CPU"), ("train_packed_flex", no_cuda), ("train_packed_flash", no_cuda)]
    return steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--inputs", type=Path, help="the unpacked archive of benchmarks/gpu_prepare.py")
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "/tmp/gpu-check")))
    parser.add_argument("--budget-s", type=float, default=450.0, help="total seconds for all steps")
    parser.add_argument("--cpu-smoke", action="store_true", help="the same steps, tiny, on the CPU (no figures)")
    parser.add_argument("--env-json", type=Path, help=argparse.SUPPRESS)  # the env step, in its own process
    parser.add_argument("--pytest-figures", type=Path, help=argparse.SUPPRESS)  # the tests step
    args, rest = parser.parse_known_args()
    if args.env_json:
        args.env_json.write_text(json.dumps(environment(), indent=2))
        return
    if args.pytest_figures:
        sys.exit(pytest_with_figures(args.pytest_figures, [a for a in rest if a != "--"]))
    if args.inputs is None or not (args.inputs / "shards" / "packed" / "manifest.json").is_file():
        sys.exit(f"error: --inputs {args.inputs}: no shards/packed/manifest.json there; make the inputs with "
                 "`python benchmarks/gpu_prepare.py` and unpack them (gpu_check.sh does)")
    mode = "cpu-smoke" if args.cpu_smoke else "gpu"
    check = Check(args.out, args.budget_s, mode)
    prepared = args.inputs / "prepared.json"
    check.result["inputs"] = json.loads(prepared.read_text()) if prepared.is_file() else None
    work = Path(tempfile.mkdtemp(prefix="gpu-check-"))
    env = check.run(Step("env", [sys.executable, __file__, "--env-json", str(work / "env.json")], 60, 5,
                         figures=work / "env.json"))
    info = env.get("figures", {})
    check.result["env"] = info
    if mode == "gpu" and not info.get("cuda_available"):
        check.save(summary={"all_steps_passed": False, "error": "no CUDA device: run with --cpu-smoke on a CPU"})
        sys.exit("error: no CUDA device seen by torch (see gpu_check.log); --cpu-smoke runs the steps on a CPU")
    for step in plan(args.inputs, work, mode, bool(info.get("flash_attention_2"))):
        if isinstance(step, tuple):
            check.skip(*step)
        else:
            check.run(step)
    summary = summarize(check.result)
    check.save(summary=summary, finished=_now())
    print(json.dumps(summary, indent=2))
    sys.exit(0 if summary["all_steps_passed"] else 1)


if __name__ == "__main__":
    main()
