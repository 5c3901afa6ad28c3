"""Tests for prep.write: datasets-compatible shards, manifest, determinism, sharding, atomicity, memory."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.ipc as ipc
import pytest

from prep.errors import ConfigError, OutputExistsError
from prep.pack import plan_bfd, plan_unpacked, shuffle_rows
from prep.spill import ExampleStore
from prep.write import parse_size, plan_shards, sha256_file, staging_dir, write_shards

MAX_LEN = 64
PACKED = ["input_ids", "labels", "position_ids", "seq_lengths"]


def fill_store(store: ExampleStore, n: int = 600, seed: int = 0) -> None:
    """Random encoded examples (lengths 1..40), appended in uneven batches."""
    rng = np.random.default_rng(seed)
    examples = [rng.integers(0, 50_000, size=int(k)).tolist() for k in rng.integers(1, 41, size=n)]
    labels = [[-100] + [t if rng.random() < 0.5 else -100 for t in e[1:]] for e in examples]
    for s in range(0, n, 128):
        store.append(pa.table({"input_ids": examples[s : s + 128], "labels": labels[s : s + 128]}))


@pytest.fixture
def store(tmp_path):
    with ExampleStore(parent=tmp_path) as s:
        fill_store(s)
        yield s


def write(store, out, packed=True, **kw):
    plan = shuffle_rows(plan_bfd(store.lengths, MAX_LEN), 0) if packed else plan_unpacked(len(store), 0)
    return write_shards(store, plan, out, max_len=MAX_LEN, seed=0, **kw)


def read_shards(out: Path, manifest: dict) -> pa.Table:
    """All shards through pyarrow memory maps, in manifest order."""
    tables = []
    for shard in manifest["shards"]:
        with pa.memory_map(str(out / shard["file"])) as source:
            tables.append(ipc.open_stream(source).read_all())
    return pa.concat_tables(tables)


# ---------- sizes, hashes, shard planning ----------


@pytest.mark.parametrize(
    ("text", "size"),
    [("256MB", 256_000_000), ("1GiB", 2**30), ("1.5KiB", 1536), ("4kb", 4000), ("123", 123), (77, 77)]
    + [("2 MiB", 2**21), ("1TB", 10**12)],
)
def test_parse_size(text, size):
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["", "MB", "12XB", "-1MB", "0", "1.5.2GB"])
def test_parse_size_rejects(text):
    with pytest.raises(ConfigError, match="--shard-size"):
        parse_size(text)


def test_sha256_file(tmp_path):
    (tmp_path / "f").write_bytes(b"abc")
    assert sha256_file(tmp_path / "f") == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"


@pytest.mark.parametrize(
    ("row_bytes", "target", "bounds"),
    [
        ([10, 10, 10, 10], 20, [0, 2, 4]),
        ([10, 10, 10, 10], 1000, [0, 4]),
        ([10, 10, 10], 1, [0, 1, 2, 3]),  # never more shards than rows
        ([100, 1, 1, 1], 50, [0, 1, 4]),  # a big row: cuts merge, no empty shard
        ([], 10, [0, 0]),
    ],
)
def test_plan_shards(row_bytes, target, bounds):
    assert plan_shards(np.array(row_bytes, dtype=np.int64), target).tolist() == bounds


# ---------- layout: datasets and pyarrow open it ----------


def test_datasets_load_from_disk_equals_pyarrow(store, tmp_path):
    datasets = pytest.importorskip("datasets")
    out = tmp_path / "shards"
    manifest = write(store, out, shard_size="8KB")
    assert len(manifest["shards"]) > 1
    ds = datasets.load_from_disk(str(out))
    table = read_shards(out, manifest)
    assert ds.column_names == PACKED and ds.num_rows == table.num_rows == manifest["counts"]["rows"]
    assert ds.data.table.select(PACKED).equals(table)
    assert ds[0] == table.slice(0, 1).to_pylist()[0]
    assert all(isinstance(f, datasets.List) for f in ds.features.values())


def test_shard_files_are_mmappable_streams_with_hf_metadata(store, tmp_path):
    out = tmp_path / "shards"
    manifest = write(store, out, shard_size="8KB")
    info = json.loads((out / "dataset_info.json").read_text())
    state = json.loads((out / "state.json").read_text())
    n = len(manifest["shards"])
    assert [d["filename"] for d in state["_data_files"]] == [f"data-{i:05d}-of-{n:05d}.arrow" for i in range(n)]
    assert state["_fingerprint"] == manifest["fingerprint"]
    for shard in manifest["shards"]:
        with pa.memory_map(str(out / shard["file"])) as source:
            reader = ipc.open_stream(source)
            meta = json.loads(reader.schema.metadata[b"huggingface"])
            table = reader.read_all()
        assert meta == {"info": {"features": info["features"]}}
        assert table.schema.names == PACKED and all(t == pa.list_(pa.int32()) for t in table.schema.types)
        assert table.num_rows == shard["rows"]
        assert pa.compute.sum(pa.compute.list_value_length(table["input_ids"])).as_py() == shard["tokens"]
        assert sha256_file(out / shard["file"]) == shard["sha256"]
        assert max(b.num_rows for b in table.to_batches()) <= 1000


def test_unpacked_has_attention_mask(store, tmp_path):
    out = tmp_path / "shards"
    manifest = write(store, out, packed=False)
    table = read_shards(out, manifest)
    assert table.schema.names == [*PACKED, "attention_mask"] == manifest["columns"]
    assert manifest["packed"] is False and manifest["pack_strategy"] == "none"
    assert table.num_rows == len(store) and all(len(s) == 1 for s in table["seq_lengths"].to_pylist())
    assert pa.compute.all(pa.compute.equal(table["attention_mask"].combine_chunks().flatten(), 1)).as_py()


def test_rows_round_trip_the_plan(store, tmp_path):
    plan = shuffle_rows(plan_bfd(store.lengths, MAX_LEN), 3)
    manifest = write_shards(store, plan, tmp_path / "o", max_len=MAX_LEN, seed=3, shard_size="4KB")
    table = read_shards(tmp_path / "o", manifest)
    ids = table["input_ids"].to_pylist()
    for r in (0, plan.num_rows // 2, plan.num_rows - 1):
        expected, _, _ = store.gather(plan.row(r))
        assert ids[r] == expected.tolist()
    assert table["seq_lengths"].to_pylist()[0] == store.lengths[plan.row(0)].tolist()


def test_empty_store_writes_one_empty_shard(tmp_path):
    datasets = pytest.importorskip("datasets")
    with ExampleStore(parent=tmp_path) as empty:
        manifest = write(empty, tmp_path / "o")
    assert [s["rows"] for s in manifest["shards"]] == [0]
    assert datasets.load_from_disk(str(tmp_path / "o")).num_rows == 0


# ---------- manifest and determinism ----------


def test_manifest_contents_and_format(store, tmp_path):
    extra = {
        "fingerprint": "f" * 64,
        "train_on": "completion",
        "tokenizer": {"name": "gpt2", "path": "tokenizer"},
        "counts": {"conversations": 600, "rejected": {}},
    }
    manifest = write(store, tmp_path / "o", manifest_extra=extra)
    text = (tmp_path / "o" / "manifest.json").read_text()
    assert text == json.dumps(manifest, sort_keys=True, indent=2) + "\n"
    assert manifest["format"] == "prep-shards" and manifest["format_version"] == 1
    assert manifest["packed"] is True and manifest["pack_strategy"] == "bfd" and manifest["max_len"] == MAX_LEN
    assert manifest["columns"] == PACKED and manifest["train_on"] == "completion"
    counts = manifest["counts"]
    assert counts["conversations"] == 600 and counts["examples"] == len(store)
    assert counts["tokens"] == store.num_tokens == sum(s["tokens"] for s in manifest["shards"])
    assert counts["trained_tokens"] == int(store.trained_counts.sum())
    assert counts["rows"] == sum(s["rows"] for s in manifest["shards"]) == manifest["packing"]["rows"]
    assert manifest["packing"]["lower_bound_rows"] == -(-store.num_tokens // MAX_LEN)
    assert json.loads((tmp_path / "o" / "state.json").read_text())["_fingerprint"] == "f" * 64


def test_manifest_conflict_raises(store, tmp_path):
    with pytest.raises(ValueError, match="counts.examples"):
        write(store, tmp_path / "o", manifest_extra={"counts": {"examples": 1}})
    assert not (tmp_path / "o").exists()


def test_byte_identical_across_runs(tmp_path):
    outputs = []
    for run in ("a", "b"):
        with ExampleStore(parent=tmp_path) as s:
            fill_store(s)
            write(s, tmp_path / run / "shards", shard_size="8KB")
        outputs.append({p.name: p.read_bytes() for p in sorted((tmp_path / run / "shards").iterdir())})
    assert outputs[0] == outputs[1] and len(outputs[0]) > 4


# ---------- atomicity ----------


def test_existing_output_needs_overwrite(store, tmp_path):
    out = tmp_path / "o"
    first = write(store, out)
    with pytest.raises(OutputExistsError, match="--overwrite"):
        write(store, out)
    second = write(store, out, overwrite=True, shard_size="8KB")
    assert len(second["shards"]) > len(first["shards"])
    assert sorted(p.name for p in out.iterdir() if p.suffix == ".arrow") == [s["file"] for s in second["shards"]]
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".o.")] == []


def test_overwrite_refuses_a_folder_that_is_not_prep_output(store, tmp_path):
    (tmp_path / "home").mkdir()
    (tmp_path / "home" / "notes.txt").write_text("keep me")
    with pytest.raises(OutputExistsError, match="not a prep shards folder"):
        write(store, tmp_path / "home", overwrite=True)
    assert (tmp_path / "home" / "notes.txt").read_text() == "keep me"


def test_failure_before_commit_leaves_nothing(store, tmp_path):
    def crash(tmp: Path) -> None:
        assert sorted(p.suffix for p in tmp.iterdir()) == [".arrow"] * len(list(tmp.iterdir()))
        raise RuntimeError("tokenizer save failed")

    with pytest.raises(RuntimeError, match="tokenizer save failed"):
        write(store, tmp_path / "o", before_commit=crash)
    assert not (tmp_path / "o").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".o.")] == []


def test_failed_overwrite_keeps_old_output(store, tmp_path):
    out = tmp_path / "o"
    write(store, out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def crash(tmp: Path) -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        write(store, out, overwrite=True, shard_size="4KB", before_commit=crash)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_before_commit_output_is_included(store, tmp_path):
    def save_tokenizer(tmp: Path) -> None:
        (tmp / "tokenizer").mkdir()
        (tmp / "tokenizer" / "tokenizer.json").write_text("{}")
        assert not (tmp / "manifest.json").exists() and not (tmp / "state.json").exists()

    write(store, tmp_path / "o", before_commit=save_tokenizer)
    assert (tmp_path / "o" / "tokenizer" / "tokenizer.json").read_text() == "{}"


def test_leftover_temp_folder_is_not_output(store, tmp_path):
    datasets = pytest.importorskip("datasets")
    stale = tmp_path / ".o.tmp-deadbeef"  # what a killed run leaves: shards but no manifest
    stale.mkdir()
    (stale / "data-00000-of-00001.arrow").write_bytes(b"partial")
    assert not (tmp_path / "o").exists()
    write(store, tmp_path / "o")  # no --overwrite needed
    assert datasets.load_from_disk(str(tmp_path / "o")).num_rows > 0
    assert stale.exists()  # never touched: it may belong to a concurrent run


def test_staging_dir_commits_and_cleans(tmp_path):
    with staging_dir(tmp_path / "o") as tmp:
        assert tmp.parent == tmp_path and tmp.name.startswith(".o.tmp-")
        (tmp / "manifest.json").write_text("{}")
    assert (tmp_path / "o" / "manifest.json").exists() and not tmp.exists()


# ---------- memory bound ----------

RSS_SCRIPT = textwrap.dedent(
    """
    import resource, sys, tempfile
    import numpy as np, pyarrow as pa
    from prep.pack import plan_bfd, shuffle_rows
    from prep.spill import ExampleStore
    from prep.write import write_shards
    n, parent = int(sys.argv[1]), sys.argv[2]
    rng = np.random.default_rng(0)
    with ExampleStore(parent=parent) as store:
        for _ in range(n // 2000):
            lengths = rng.integers(20, 400, size=2000)
            offsets = np.concatenate(([0], np.cumsum(lengths))).astype(np.int32)
            ids = rng.integers(0, 50_000, size=int(offsets[-1]), dtype=np.int32)
            labels = ids.copy()
            labels[offsets[:-1]] = -100
            store.append(pa.table({"input_ids": pa.ListArray.from_arrays(offsets, ids),
                                   "labels": pa.ListArray.from_arrays(offsets, labels)}))
        plan = shuffle_rows(plan_bfd(store.lengths, 2048), 0)
        write_shards(store, plan, parent + "/out", max_len=2048, seed=0, shard_size="16MB")
    print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
    """
)


def peak_rss_kib(n_examples: int, parent: Path) -> int:
    parent.mkdir()
    done = subprocess.run([sys.executable, "-c", RSS_SCRIPT, str(n_examples), str(parent)],
                          capture_output=True, text=True, check=True, env={**os.environ})  # fmt: skip
    return int(done.stdout.split()[-1])


def test_peak_rss_bounded_when_data_grows_10x(tmp_path):
    small = peak_rss_kib(10_000, tmp_path / "x1")  # ~2M tokens
    large = peak_rss_kib(100_000, tmp_path / "x10")  # ~21M tokens: 170 MB spilled, 250 MB of shards
    assert large <= 1.5 * small, (small, large)


def test_rows_longer_than_max_len_or_partial_plans_are_refused(store, tmp_path):
    with pytest.raises(ConfigError, match="> max_len 8"):
        write_shards(store, plan_unpacked(len(store), 0), tmp_path / "o", max_len=8, seed=0)
    with pytest.raises(ValueError, match="places 3 examples"):
        write_shards(store, plan_bfd(store.lengths[:3], MAX_LEN), tmp_path / "o", max_len=MAX_LEN, seed=0)
    assert not (tmp_path / "o").exists()
