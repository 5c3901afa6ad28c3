"""prep.pipeline.pack_shards end to end on real data: worker processes change nothing, accounting holds."""

from __future__ import annotations

from pathlib import Path

import pytest

from prep.pipeline import pack_shards
from prep.verify import verify_shards
from schemas.pack_config import PackConfig


def folder_bytes(folder: Path) -> dict[str, bytes]:
    """Every file under `folder`, by relative path."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def inputs(shared_data: Path) -> list[str]:
    return [str(shared_data / "alpaca" / "alpaca_en_demo.json"), str(shared_data / "messages" / "kto_en_demo.json")]


@pytest.mark.parametrize("workers", [2, 3])
def test_worker_processes_give_byte_identical_shards(inputs, shared_data, tmp_path, workers):
    tokenizer = str(shared_data / "tokenizers" / "smollm2-135m")
    common = dict(inputs=inputs, tokenizer=tokenizer, template="chatml", max_len=1024, batch_size=97)
    one = pack_shards(PackConfig(output=str(tmp_path / "one"), workers=1, **common))
    many = pack_shards(PackConfig(output=str(tmp_path / "many"), workers=workers, **common))
    assert folder_bytes(tmp_path / "one") == folder_bytes(tmp_path / "many")
    assert one.counts == many.counts and one.rejected == many.rejected
    c = many.manifest["counts"]
    assert c["conversations"] + c["split"] == c["examples"] + c["dropped"] + sum(many.rejected.values())
    assert verify_shards(tmp_path / "many").ok


def test_a_tokenizer_shipped_only_as_a_sentencepiece_model_packs_and_verifies(inputs, shared_data, tmp_path):
    """Older Llama-2-style repos have tokenizer.model and no tokenizer.json: transformers converts it to a fast
    tokenizer (with sentencepiece + protobuf, prep dependencies), whose offsets prep's labels need."""
    import shutil

    spm = tmp_path / "spm-only"
    spm.mkdir()
    for name in ("tokenizer.model", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(shared_data / "tokenizers" / "mistral-7b-instruct-v0.3" / name, spm / name)
    report = pack_shards(PackConfig(inputs=inputs, output=str(tmp_path / "out"), tokenizer=str(spm), max_len=1024))
    official = pack_shards(PackConfig(inputs=inputs, output=str(tmp_path / "json"), max_len=1024,
                                      tokenizer=str(shared_data / "tokenizers" / "mistral-7b-instruct-v0.3")))
    assert report.manifest["counts"]["examples"] == official.manifest["counts"]["examples"] > 1000
    assert report.rejected == official.rejected  # the same records (one real `###` marker in a reply)
    assert report.manifest["tokenizer"]["bos_token_id"] == 1
    assert verify_shards(tmp_path / "out").ok


def test_messages_a_chat_template_leaves_out_are_counted_and_shown(shared_data, tmp_path):
    from rich.console import Console

    from prep.report import pack_summary

    examples = Path(__file__).resolve().parents[1] / "examples"
    report = pack_shards(PackConfig(inputs=[str(examples / "openai.jsonl")], output=str(tmp_path / "out"),
                                    tokenizer=str(shared_data / "tokenizers" / "mistral-7b-instruct-v0.3"),
                                    template="tokenizer", max_len=1024))
    dropped = report.manifest["counts"]["template_dropped_message"]
    assert dropped > 0  # Mistral's template drops system prompts
    console = Console(record=True, width=200)
    console.print(pack_summary(report))
    assert f"left out by the chat template, in examples that were written: {dropped:,} message(s)" in console.export_text()


def test_auto_workers_one_per_usable_cpu_at_most_the_cap():
    import os

    from prep.pipeline import MAX_AUTO_WORKERS, auto_workers, usable_cpus

    assert usable_cpus() == len(os.sched_getaffinity(0))
    assert auto_workers(64 * 2**20 - 1) == 1  # small inputs stay in-process
    assert auto_workers(64 * 2**20) == min(usable_cpus(), MAX_AUTO_WORKERS) == auto_workers(2**40)


def test_auto_workers_follow_the_cpu_set_not_the_machine():
    import subprocess
    import sys

    code = ("import os; os.sched_setaffinity(0, {min(os.sched_getaffinity(0))}); "
            "from prep.pipeline import auto_workers, usable_cpus; print(usable_cpus(), auto_workers(2**40))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.stdout.split() == ["1", "1"], done.stderr


def test_the_workers_rule_is_stated_as_the_code_applies_it():
    import re
    import typing

    from prep import cli
    from prep.pipeline import MAX_AUTO_WORKERS

    cap = f"at most {MAX_AUTO_WORKERS}"
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    assert re.search(rf"one per usable\s+CPU, {cap}, for inputs of 64 MiB and more", readme)
    assert cap in typing.get_type_hints(cli.pack, include_extras=True)["workers"].__metadata__[0].help
    assert cap in PackConfig.model_fields["workers"].description


def test_batches_by_bytes_and_slicing_give_byte_identical_shards(shared_data, tmp_path):
    """--batch-bytes only groups conversations for the tokenizer: 8 KiB batches (most long chats alone, in the
    overlapped in-process path) give the shards of one 64 MiB batch, and so do split pieces cut from their
    conversation's ids versus the same run with every piece tokenized again."""
    common = dict(inputs=[str(shared_data / "sharegpt" / "sharegpt_zh_1K_format.jsonl")],
                  tokenizer=str(shared_data / "tokenizers" / "smollm2-135m"), template="tokenizer", max_len=1024,
                  workers=1)
    small = pack_shards(PackConfig(output=str(tmp_path / "small"), batch_bytes="8KiB", **common))
    pack_shards(PackConfig(output=str(tmp_path / "big"), batch_bytes="64MiB", **common))
    assert folder_bytes(tmp_path / "small") == folder_bytes(tmp_path / "big")
    assert small.counts["pieces_sliced"] > 1000 and small.counts["extra_pieces"] > 1000
    assert verify_shards(tmp_path / "small").ok


def test_a_bad_batch_bytes_fails_before_reading(shared_data, tmp_path):
    from prep.errors import ConfigError

    with pytest.raises(ConfigError, match=r"invalid --batch-bytes '12XB'"):
        pack_shards(PackConfig(inputs=["missing.jsonl"], output=str(tmp_path / "out"), batch_bytes="12XB"))


def test_long_rows_are_written_in_smaller_record_batches(shared_data, tmp_path):
    """At --max-len 8192 a record batch holds 256 rows (2^21 token slots), not 1000: writing never builds more."""
    import pyarrow as pa

    from prep.write import rows_per_batch

    chats = tmp_path / "chats.jsonl"
    chats.write_bytes((shared_data / "sharegpt" / "sharegpt_zh_1K_format.jsonl").read_bytes() * 2)
    report = pack_shards(PackConfig(inputs=[str(chats)], output=str(tmp_path / "out"), max_len=8192, pack=False))
    assert rows_per_batch(8192) == 256 and report.manifest["counts"]["rows"] > 256
    for shard in report.manifest["shards"]:
        with pa.ipc.open_stream(tmp_path / "out" / shard["file"]) as reader:
            sizes = [batch.num_rows for batch in reader]
        assert max(sizes) == 256 and sum(sizes) == shard["rows"]
    assert verify_shards(tmp_path / "out").ok
