"""Interruption: SIGKILL at any point leaves no output that loads, and a rerun is byte-identical to an
uninterrupted run; Ctrl-C (SIGINT) prints one line, exits 130 and leaves no temporary files.

`prep convert` and `prep pack` run in subprocesses on inputs large enough to last a few seconds; the kill
points are fractions of the measured uninterrupted run time, so they fall in the import, read, encode,
spill and write phases alike.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pytest

from prep.convert import iter_conversations
from prep.errors import PrepError
from prep.load import load_shards
from prep.sink import JsonlSink, ParquetSink
from prep.spill import ExampleStore
from prep.verify import verify_shards

REPO = Path(__file__).resolve().parents[1]
CONVERT_KILLS = (0.1, 0.3, 0.5, 0.7, 0.9)
PACK_KILLS = (0.35, 0.6, 0.85)  # the first ~40% of a pack run is imports
CONVERT_RECORDS = 60_000
PACK_RECORDS = 3_000
# Temporary names the stages create beside their outputs (prep/sink.py, prep/spill.py, prep/write.py).
TEMP_NAME = re.compile(r"^\.(conv\.jsonl|conv\.rejects\.jsonl)\..+\.tmp$|^\.shards\.tmp-.+$|^\.prep-spill-.+$")


def _write_alpaca(path: Path, shared_data: Path, n_records: int) -> Path:
    """Real Alpaca records repeated to `n_records` JSON lines (a few malformed lines among them, to be rejected)."""
    records = json.loads((shared_data / "alpaca" / "alpaca_en_demo.json").read_text(encoding="utf-8"))
    with open(path, "w", encoding="utf-8") as f:
        for i in range(n_records):
            record = {"instruction": 1} if i % 997 == 0 else {"id": i, **records[i % len(records)]}
            f.write(json.dumps(record) + "\n")
    return path


def _start(args: list[str]) -> subprocess.Popen[bytes]:
    """Start `python -m prep ARGS` with captured output."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "COLUMNS": "200"}
    return subprocess.Popen([sys.executable, "-m", "prep", *args], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def _run(args: list[str]) -> float:
    """Run prep to completion; return its wall time; fail the test if it fails."""
    start = time.perf_counter()
    proc = _start(args)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err.decode()
    return time.perf_counter() - start


def _tree(path: Path) -> dict[str, str]:
    """sha256 of every file under `path` (or of `path` itself), by relative name."""
    if path.is_file():
        return {path.name: hashlib.sha256(path.read_bytes()).hexdigest()}
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(path.rglob("*")) if p.is_file()}


def _outputs(folder: Path, names: list[str]) -> dict[str, dict[str, str]]:
    """The file hashes of the named outputs in `folder` that exist."""
    return {n: _tree(folder / n) for n in names if (folder / n).exists()}


def _kill_after(args: list[str], seconds: float) -> int:
    """Start prep, SIGKILL it after `seconds` (unless it already ended); return its exit code."""
    proc = _start(args)
    try:
        proc.wait(timeout=seconds)
    except subprocess.TimeoutExpired:
        os.kill(proc.pid, signal.SIGKILL)
    proc.communicate()
    return proc.returncode


def _leftovers(folder: Path, keep: set[str]) -> list[str]:
    """Names in `folder` other than `keep`."""
    return sorted(p.name for p in folder.iterdir() if p.name not in keep)


@pytest.fixture(scope="module")
def convert_case(tmp_path_factory, shared_data: Path) -> tuple[Path, dict, float]:
    """An input for `prep convert`, its uninterrupted output hashes and run time."""
    work = tmp_path_factory.mktemp("convert-ref")
    source = _write_alpaca(work / "in.jsonl", shared_data, CONVERT_RECORDS)
    seconds = _run(["convert", str(source), "-o", str(work / "conv.jsonl")])
    return source, _outputs(work, ["conv.jsonl", "conv.rejects.jsonl"]), seconds


@pytest.fixture(scope="module")
def pack_case(tmp_path_factory, shared_data: Path) -> tuple[Path, dict, float]:
    """An input for `prep pack`, its uninterrupted output hashes and run time."""
    work = tmp_path_factory.mktemp("pack-ref")
    source = _write_alpaca(work / "in.jsonl", shared_data, PACK_RECORDS)
    seconds = _run(["pack", str(source), "-o", str(work / "shards"), "--max-len", "512"])
    return source, _outputs(work, ["shards"]), seconds


def _kill_at_each_point(args: list[str], folder: Path, outputs: list[str], reference: dict,
                        points: list[float]) -> set[str]:
    """SIGKILL a run after each of `points` seconds; check what each kill left; return the temp names.

    After every kill the outputs are absent or complete and identical (a run may finish before its kill), and
    each leftover carries a temporary name. A complete output is removed so that the next run starts afresh.
    """
    temps: set[str] = set()
    for seconds in points:
        _kill_after(args, seconds)
        survived = _outputs(folder, outputs)
        assert survived in ({}, reference), f"partial output after a kill at {seconds:.2f} s"
        for name in outputs:
            _remove(folder / name)
        leftovers = set(_leftovers(folder, set()))
        assert all(TEMP_NAME.match(name) for name in leftovers), leftovers
        temps |= leftovers
    return temps


def _remove(path: Path) -> None:
    """Delete a file or folder if it exists."""
    import shutil

    if path.is_dir():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def test_convert_killed_leaves_nothing_valid_and_reruns_identically(tmp_path: Path, convert_case):
    """SIGKILL at several points: no output or the complete one; leftover temp files are refused by the reader;
    a rerun (beside the leftovers) writes the uninterrupted bytes."""
    source, reference, seconds = convert_case
    outputs = ["conv.jsonl", "conv.rejects.jsonl"]
    assert set(reference) == set(outputs)
    work = tmp_path / "work"
    work.mkdir()
    args = ["convert", str(source), "-o", str(work / "conv.jsonl")]
    temps = _kill_at_each_point(args, work, outputs, reference, [seconds * f for f in CONVERT_KILLS])
    assert temps, "no kill landed while the output was being written; raise CONVERT_RECORDS"
    for name in temps:
        with pytest.raises(PrepError, match="unsupported file type"):
            list(iter_conversations(work / name))
    _run(args)
    assert _outputs(work, outputs) == reference


def test_pack_killed_leaves_nothing_valid_and_reruns_identically(tmp_path: Path, pack_case):
    """SIGKILL at several points: no shards folder (or the complete one); leftover temp folders neither load
    nor verify; a rerun gives byte-identical shards, manifest, rejects and tokenizer files."""
    source, reference, seconds = pack_case
    work = tmp_path / "work"
    work.mkdir()
    args = ["pack", str(source), "-o", str(work / "shards"), "--max-len", "512"]
    temps = _kill_at_each_point(args, work, ["shards"], reference, [seconds * f for f in PACK_KILLS])
    assert temps, "no kill landed while packing; raise PACK_RECORDS"
    for name in temps:
        with pytest.raises(PrepError):
            load_shards(work / name)
        assert not verify_shards(work / name).ok
    _run(args)
    assert _outputs(work, ["shards"]) == reference
    assert verify_shards(work / "shards").ok


def _interrupt_when(args: list[str], folder: Path, pattern: re.Pattern[str]) -> tuple[int, str, bool]:
    """Start prep; send SIGINT as soon as a file matching `pattern` appears in `folder` (the work has begun).

    Returns (exit code, stderr, whether the signal was sent before the run ended).
    """
    proc = _start(args)
    sent = False
    while proc.poll() is None:
        if any(pattern.match(p.name) for p in folder.iterdir()):
            time.sleep(0.05)
            proc.send_signal(signal.SIGINT)
            sent = True
            break
        time.sleep(0.005)
    _, err = proc.communicate(timeout=120)
    return proc.returncode, err.decode(), sent


@pytest.mark.parametrize("stage", ["convert", "pack"])
def test_ctrl_c_prints_one_line_and_cleans_up(tmp_path: Path, stage: str, convert_case, pack_case):
    """SIGINT while writing: exit 130, exactly `interrupted; no output written` on stderr, and the folder holds
    nothing but the input (no .tmp, .prep-spill-*, .shards.tmp-* leftovers)."""
    source = (convert_case if stage == "convert" else pack_case)[0]
    (tmp_path / "in.jsonl").symlink_to(source)
    output = "conv.jsonl" if stage == "convert" else "shards"
    args = [stage, str(tmp_path / "in.jsonl"), "-o", str(tmp_path / output)]
    rc, err, sent = _interrupt_when(args, tmp_path, TEMP_NAME)
    assert sent, "the run ended before any temporary file appeared"
    assert rc == 130, err
    assert err.strip() == "interrupted; no output written"
    assert _leftovers(tmp_path, set()) == ["in.jsonl"]


def test_sinks_and_spill_clean_up_on_keyboard_interrupt(tmp_path: Path):
    """In-process Ctrl-C inside the writers' `with` blocks deletes their temporary files and folders."""
    conversation_sink = ParquetSink(tmp_path / "c.parquet")
    for sink in (JsonlSink(tmp_path / "c.jsonl"), conversation_sink):
        with pytest.raises(KeyboardInterrupt), sink:
            raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt), ExampleStore(parent=tmp_path) as store:
        store.append(pa.table({"input_ids": [[1, 2]], "labels": [[-100, 2]]}))
        raise KeyboardInterrupt
    assert os.listdir(tmp_path) == []
