"""The `prep` commands end to end, as a user runs them (subprocesses), on the bundled examples."""

from __future__ import annotations

import dataclasses
import inspect
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "examples"


def prep(*args: str, cwd: Path, **env_vars: str) -> subprocess.CompletedProcess:
    """Run `python -m prep ARGS` offline and capture its output."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", COLUMNS="200", **env_vars)
    return subprocess.run([sys.executable, "-m", "prep", *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=600)


@pytest.fixture(scope="module")
def packed(tmp_path_factory) -> Path:
    """Examples converted and packed by the CLI (the demo's first two steps)."""
    tmp = tmp_path_factory.mktemp("cli")
    inputs = [str(p) for p in sorted(EXAMPLES.glob("*.json*")) + sorted(EXAMPLES.glob("*.csv"))
              if not p.name.endswith(".yaml")]
    done = prep("convert", *inputs, "-o", "unified.jsonl", cwd=tmp)
    assert done.returncode == 0, done.stderr
    done = prep("pack", "unified.jsonl", "-o", "shards", "--max-len", "512", cwd=tmp)
    assert done.returncode == 0, done.stderr
    return tmp


def test_pack_writes_verified_shards_with_a_summary(packed):
    manifest = json.loads((packed / "shards" / "manifest.json").read_text())
    unified = (packed / "unified.jsonl").read_text().splitlines()
    assert manifest["counts"]["conversations"] == len(unified)
    assert manifest["counts"]["examples"] == len(unified) - sum(manifest["counts"]["rejected"].values())
    done = prep("verify", "shards", cwd=packed)
    assert done.returncode == 0 and "every check holds" in done.stdout


def test_pack_rerun_is_up_to_date_and_existing_output_needs_overwrite(packed):
    done = prep("pack", "unified.jsonl", "-o", "shards", "--max-len", "512", cwd=packed)
    assert done.returncode == 0 and "up to date" in done.stdout
    done = prep("pack", "unified.jsonl", "-o", "shards", "--max-len", "256", cwd=packed)
    assert done.returncode == 1
    assert "--overwrite" in done.stderr and len(done.stderr.strip().splitlines()) == 1


def test_shards_are_byte_identical_whatever_the_tokenizer_thread_count(packed):
    """One tokenizer thread instead of one per core: the same bytes in every file."""
    done = prep("pack", "unified.jsonl", "-o", "shards-1thread", "--max-len", "512", cwd=packed,
                RAYON_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    assert done.returncode == 0, done.stderr
    ours = sorted(p.relative_to(packed / "shards") for p in (packed / "shards").rglob("*") if p.is_file())
    theirs = sorted(p.relative_to(packed / "shards-1thread") for p in (packed / "shards-1thread").rglob("*")
                    if p.is_file())
    assert ours == theirs
    for name in ours:
        assert (packed / "shards" / name).read_bytes() == (packed / "shards-1thread" / name).read_bytes(), name


def test_verify_fails_on_a_flipped_byte(packed, tmp_path):
    import shutil

    copy = tmp_path / "shards"
    shutil.copytree(packed / "shards", copy)
    shard = next(copy.glob("data-*.arrow"))
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    done = prep("verify", str(copy), cwd=tmp_path)
    assert done.returncode == 1 and "sha256" in done.stdout


def test_inspect_shows_a_row_and_a_record(packed):
    done = prep("inspect", "shards", "--row", "0", cwd=packed)
    assert done.returncode == 0 and "example 0" in done.stdout
    done = prep("inspect", str(EXAMPLES / "alpaca.json"), "--record", "0", "--template", "chatml", cwd=packed)
    assert done.returncode == 0 and "Give three tips for staying healthy." in done.stdout
    done = prep("inspect", str(EXAMPLES / "alpaca.json"), cwd=packed)
    assert done.returncode == 1 and "--record" in done.stderr


def test_stats_writes_a_png_plot(packed):
    done = prep("stats", "shards", "--plot", "lengths.png", cwd=packed)
    assert done.returncode == 0 and "packing efficiency" in done.stdout
    assert (packed / "lengths.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_train_runs_a_few_steps_and_saves_a_model(packed):
    done = prep("train", "shards", "-o", "run", "--max-steps", "3", "--batch-size", "2", "--no-progress", cwd=packed)
    assert done.returncode == 0, done.stderr
    lines = [json.loads(line) for line in (packed / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines if "loss" in m] == [1, 2, 3]
    assert (packed / "run" / "config.json").is_file() and (packed / "run" / "tokenizer.json").is_file()


def test_pack_cli_defaults_equal_pack_config_defaults():
    from prep import cli
    from schemas.pack_config import PackConfig

    fields = PackConfig.model_fields
    for name, param in inspect.signature(cli.pack).parameters.items():
        if name in fields and param.default is not inspect.Parameter.empty and param.default is not None:
            assert param.default == fields[name].default, name


def test_train_cli_flags_are_exactly_the_train_config_fields():
    from prep import cli
    from prep.train import TrainConfig

    params = inspect.signature(cli.train).parameters
    defaults = {f.name: f.default for f in dataclasses.fields(TrainConfig)}
    assert set(params) == set(defaults)
    for name, param in params.items():
        if param.default is not inspect.Parameter.empty:
            assert param.default == defaults[name], name
