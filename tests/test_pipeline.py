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
