"""Tests for prep.verify: valid real shards pass; each kind of damage gives precise problems."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import pyarrow as pa
import pytest
from rich.console import Console

from _packed import copy_packed, packed_shards
from prep.verify import verify_summary, verify_shards
from prep.write import sha256_file

SHARD = "data-00003-of-00010.arrow"


def manifest(path: Path) -> dict:
    return json.loads((path / "manifest.json").read_text())


def edit_manifest(path: Path, change: Callable[[dict], None]) -> None:
    m = manifest(path)
    change(m)
    (path / "manifest.json").write_text(json.dumps(m))


def rewrite_shard(path: Path, name: str, change: Callable[[dict], None], refresh_hash: bool = True) -> None:
    """Rewrite one shard with pyarrow after `change` edits its columns (dict of lists of lists); keep the hash valid."""
    file = path / name
    with pa.memory_map(str(file)) as source:
        table = pa.ipc.open_stream(source).read_all()
    columns = table.to_pydict()
    change(columns)
    new = pa.table({k: pa.array(v, type=pa.list_(pa.int32())) for k, v in columns.items()}, schema=table.schema)
    with pa.OSFile(str(file), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(new)
    if refresh_hash:
        sha = sha256_file(file)
        edit_manifest(path, lambda m: next(s for s in m["shards"] if s["file"] == name).update(sha256=sha))


def checks(report) -> list[tuple[str, str, int | None]]:
    return [(p.check, p.file, p.row) for p in report.problems]


@pytest.fixture
def shards(tmp_path) -> Path:
    return copy_packed(tmp_path / "shards")


# ---------- valid shards ----------


def test_real_shards_pass_every_check():
    path = packed_shards()
    report = verify_shards(path)
    assert report.ok, [str(p) for p in report.problems]
    m = manifest(path)
    assert (report.shards, report.rows, report.tokens) == (len(m["shards"]), m["counts"]["rows"], m["counts"]["tokens"])
    assert report.bytes == sum((path / s["file"]).stat().st_size for s in m["shards"])
    console = Console(record=True, width=300)
    console.print(verify_summary(report))
    assert console.export_text().startswith("ok:")


def test_unpacked_shards_pass_every_check():
    report = verify_shards(packed_shards(n=40, packed=False))
    assert report.ok, [str(p) for p in report.problems]


# ---------- damaged files ----------


def test_flipped_byte_fails_the_hash(shards):
    file = shards / SHARD
    data = bytearray(file.read_bytes())
    data[len(data) // 2] ^= 0x01
    file.write_bytes(bytes(data))
    report = verify_shards(shards)
    assert not report.ok
    assert ("sha256", SHARD, None) in checks(report)
    assert all(p.file in (SHARD, "manifest.json") for p in report.problems)


def test_truncated_shard_fails_the_hash_and_the_read(shards):
    file = shards / SHARD
    os.truncate(file, file.stat().st_size // 2)
    report = verify_shards(shards)
    found = checks(report)
    assert ("sha256", SHARD, None) in found
    assert any(c in ("unreadable", "rows") and f == SHARD for c, f, _ in found)
    assert all(f == SHARD for _, f, _ in found)  # totals are not compared when a shard cannot be read whole


def test_missing_shard_is_one_precise_problem(shards):
    (shards / SHARD).unlink()
    report = verify_shards(shards)
    assert checks(report) == [("missing", SHARD, None)]
    assert str(report.problems[0]) == f"{SHARD}: listed in manifest.json but missing"


def test_stray_shard_is_reported(shards):
    shutil.copy(shards / SHARD, shards / "data-00099-of-00100.arrow")
    assert checks(verify_shards(shards)) == [("stray", "data-00099-of-00100.arrow", None)]


# ---------- contract invariants (shards rewritten with pyarrow, hashes kept valid) ----------


def test_label_pointing_at_the_wrong_token(shards):
    target = {}

    def change(cols):
        ids, labels = cols["input_ids"][2], cols["labels"][2]
        pos = next(i for i, label in enumerate(labels) if label != -100 and i > 0)
        labels[pos] = (ids[pos] + 1) % 49152
        target.update(pos=pos, label=labels[pos], token=ids[pos])

    rewrite_shard(shards, SHARD, change)
    report = verify_shards(shards)
    assert checks(report) == [("labels", SHARD, 2)]
    message = str(report.problems[0])
    first_row = sum(s["rows"] for s in manifest(shards)["shards"][:3])
    assert message == (
        f"{SHARD} row 2: labels[{target['pos']}] is {target['label']} but input_ids[{target['pos']}] "
        f"is {target['token']}: a label is -100 or its own token (row {first_row + 2} overall)"
    )


def _trained_first_label(cols):
    cols["labels"][1][0] = cols["input_ids"][1][0]


def _bad_position(cols):
    cols["position_ids"][1][5] += 1


def _bad_seq_lengths(cols):
    cols["seq_lengths"][1][0] += 1


def _token_outside_vocab(cols):
    cols["input_ids"][1][0] = 10**6  # label 0 is -100, so only the id is wrong


def _short_labels(cols):
    cols["labels"][1].pop()


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (_trained_first_label, {("first_label", SHARD, 1), ("counts", "manifest.json", None)}),
        (_bad_position, {("position_ids", SHARD, 1)}),
        (_bad_seq_lengths, {("seq_lengths", SHARD, 1)}),
        (_token_outside_vocab, {("token_ids", SHARD, 1)}),
        (_short_labels, {("lengths", SHARD, 1)}),
    ],
)
def test_broken_invariants_are_named(shards, change, expected):
    rewrite_shard(shards, SHARD, change)
    found = set(checks(verify_shards(shards)))
    assert expected <= found and all(f in (SHARD, "manifest.json") for _, f, _ in found)
    assert ("sha256", SHARD, None) not in found


def test_every_row_broken_is_capped_and_counted(shards):
    def change(cols):
        for labels, ids in zip(cols["labels"], cols["input_ids"]):
            labels[0] = ids[0]

    rewrite_shard(shards, SHARD, change)
    report = verify_shards(shards, limit=3)
    first = [p for p in report.problems if p.check == "first_label"]
    rows = manifest(shards)["shards"][3]["rows"]
    assert [p.row for p in first[:3]] == [0, 1, 2]
    assert first[3].message == f"... and {rows - 3} more rows fail the first_label check"


def test_row_longer_than_max_len(shards):
    edit_manifest(shards, lambda m: m.update(max_len=100))
    found = {c for c, _, _ in checks(verify_shards(shards))}
    assert "max_len" in found


# ---------- manifest and tokenizer ----------


def test_tokenizer_fingerprint_mismatch(shards):
    edit_manifest(shards, lambda m: m["tokenizer"].update(fingerprint="0" * 64))
    report = verify_shards(shards)
    assert checks(report) == [("tokenizer", "tokenizer/", None)]
    assert "fingerprint" in report.problems[0].message


def test_counts_that_disagree_with_the_data(shards):
    edit_manifest(shards, lambda m: m["counts"].update(trained_tokens=m["counts"]["trained_tokens"] + 1))
    report = verify_shards(shards)
    assert checks(report) == [("counts", "manifest.json", None)]
    assert report.problems[0].message.startswith("counts.trained_tokens is")


def test_missing_manifest(shards):
    (shards / "manifest.json").unlink()
    assert checks(verify_shards(shards)) == [("manifest", "manifest.json", None)]
