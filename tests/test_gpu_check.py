"""benchmarks/gpu_check.py, the one GPU run of the trainer's checks, exercised on the CPU: its step runner keeps
going past a failing or hanging step and rewrites the JSON after every step, and its --cpu-smoke mode runs the
real steps (inputs from benchmarks/gpu_prepare.py --smoke, benchmarks/train.py runs, pytest with recorded
isolation figures) into one JSON of the documented shape. The GPU figures themselves come from a GPU only."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import tarfile
import time

import pytest
from _shards import REPO

SCRIPT = REPO / "benchmarks" / "gpu_check.py"


def gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = module  # its dataclasses look their module up while being built
    spec.loader.exec_module(module)
    return module


def python(code: str) -> list[str]:
    return [sys.executable, "-c", code]


def test_a_failing_or_hanging_step_is_recorded_and_the_next_steps_still_run(tmp_path):
    gc = gpu_check()
    out = tmp_path / "out"
    check = gc.Check(out, budget_s=60, mode="cpu-smoke")
    figures = tmp_path / "figures.json"
    check.run(gc.Step("fails", python("import sys; print('boom'); sys.exit(3)"), timeout_s=30, min_s=1))
    t0 = time.monotonic()
    check.run(gc.Step("hangs", python("import subprocess, time; subprocess.Popen(['sleep', '60']); time.sleep(60)"),
                      timeout_s=2, min_s=1))
    assert time.monotonic() - t0 < 10  # killed at its timeout, with the process it started
    # the JSON on disk already holds the two steps above when the third one runs
    reads = f"import json; d = json.load(open({str(out / 'gpu_check.json')!r})); " \
            f"json.dump({{'seen': sorted(d['steps'])}}, open({str(figures)!r}, 'w'))"
    check.run(gc.Step("reads", python(reads), timeout_s=30, min_s=1, figures=figures))
    check.run(gc.Step("too_long", python("pass"), timeout_s=30, min_s=10_000))
    steps = json.loads((out / "gpu_check.json").read_text())["steps"]
    assert steps["fails"]["status"] == "failed" and steps["fails"]["returncode"] == 3
    assert "boom" in steps["fails"]["log_tail"]
    assert steps["hangs"]["status"] == "timeout" and steps["hangs"]["seconds"] < 10
    assert steps["reads"] == {**steps["reads"], "status": "passed", "figures": {"seen": ["fails", "hangs"]}}
    assert steps["too_long"]["status"] == "skipped" and "out of budget" in steps["too_long"]["reason"]
    assert "===== fails: failed" in (out / "gpu_check.log").read_text()
    assert gc.summarize(check.result)["all_steps_passed"] is False


def test_missing_inputs_are_one_clear_error(tmp_path):
    proc = subprocess.run([sys.executable, str(SCRIPT), "--inputs", str(tmp_path), "--out", str(tmp_path / "o")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and "error:" in proc.stderr and "gpu_prepare.py" in proc.stderr
    assert "Traceback" not in proc.stderr
    env = {"PATH": "/usr/bin:/bin", "PREP_GPU_INPUTS": str(tmp_path / "none.tar.gz"), "OUT": str(tmp_path / "o")}
    shell = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_check.sh")], capture_output=True, text=True,
                           env=env, timeout=60)
    assert shell.returncode == 1 and shell.stderr.startswith("error: ") and "gpu_prepare.py" in shell.stderr


@pytest.fixture(scope="module")
def smoke(tmp_path_factory, shared_data):
    """gpu_prepare.py --smoke, then `bash benchmarks/gpu_check.sh --cpu-smoke` on its archive, as on a GPU machine
    (python3 first on the PATH is this interpreter; the tests read only what the archive holds)."""
    root = tmp_path_factory.mktemp("gpu_check")
    bin_dir = root / "bin"
    bin_dir.mkdir()
    (bin_dir / "python3").write_text(f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')  # a link would leave the venv
    (bin_dir / "python3").chmod(0o755)
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "PREP_SHARED_DATA": str(shared_data), "TMPDIR": str(root)}
    prepare = subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu_prepare.py"), "--smoke", "--out",
                              str(root)], capture_output=True, text=True, env=env, timeout=600)
    assert prepare.returncode == 0, prepare.stderr[-3000:]
    env.update(PREP_GPU_INPUTS=str(root / "gpu-inputs.tar.gz"), OUT=str(root / "out"))
    del env["PREP_SHARED_DATA"]  # gpu_check.sh points it at the unpacked archive
    proc = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_check.sh"), "--cpu-smoke"], capture_output=True,
                          text=True, env=env, timeout=900)
    return root, proc


def test_prepared_inputs_hold_the_shards_and_the_test_data(smoke):
    root, _ = smoke
    with tarfile.open(root / "gpu-inputs.tar.gz") as tar:
        tar.extractall(root / "inputs", filter="data")
    prepared = json.loads((root / "inputs" / "prepared.json").read_text())
    assert prepared["packed"]["tokens"] == prepared["padded"]["tokens"] > 0
    assert prepared["padded"]["rows"] == prepared["padded"]["examples"] > prepared["packed"]["rows"]
    for name in ("PROVENANCE.md", "alpaca/alpaca_en_demo.json", "tokenizers/smollm2-135m/tokenizer.json"):
        assert (root / "inputs" / "data" / name).is_file()
    for rows in ("packed", "padded"):
        assert (root / "inputs" / "shards" / rows / "tokenizer").is_dir()


def test_cpu_smoke_writes_one_json_of_every_step(smoke):
    root, proc = smoke
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert sorted(p.name for p in (root / "out").iterdir()) == ["gpu_check.json", "gpu_check.log"]
    result = json.loads((root / "out" / "gpu_check.json").read_text())
    assert result["schema"] == "prep-gpu-check/1" and result["mode"] == "cpu-smoke"
    assert result["env"]["torch"] and result["env"]["cuda_available"] is False
    steps = result["steps"]
    assert list(steps) == ["env", "train_packed_sdpa", "train_padded_sdpa", "tests", "train_packed_compile",
                           "train_packed_flex", "train_packed_flash"]
    for name, rows in (("train_packed_sdpa", "packed"), ("train_padded_sdpa", "padded")):
        run = steps[name]["figures"][rows]
        assert steps[name]["status"] == "passed" and run["kernel"] == "sdpa" and run["timed_steps"] == 2
        assert run["tokens_per_s"] > 0 and run["trained_tokens_per_s"] > 0
    assert steps["tests"]["figures"]["counts"] == {"passed": 1, "failed": 0, "skipped": 1, "error": 0}
    isolation = steps["tests"]["figures"]["isolation"]["packed_vs_alone/sdpa/llama/cpu"]
    assert 0 <= isolation["max_difference"] < isolation["below"] == 1e-5
    for name in ("train_packed_flex", "train_packed_flash", "train_packed_compile"):
        assert steps[name]["status"] == "skipped" and steps[name]["reason"]
    summary = result["summary"]
    assert summary["all_steps_passed"] is True and summary["best_packed_run"] == "packed_sdpa"
    assert summary["packed_over_padded"] == pytest.approx(
        steps["train_packed_sdpa"]["figures"]["packed"]["tokens_per_s"]
        / steps["train_padded_sdpa"]["figures"]["padded"]["tokens_per_s"])
    assert "mfu_bf16" not in summary  # no bf16 peak on a CPU: MFU comes from a GPU only
    log = (root / "out" / "gpu_check.log").read_text()
    assert "===== train_packed_sdpa: passed" in log and "===== tests: passed" in log
