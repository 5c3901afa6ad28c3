"""prep.load: opening shards (zero-copy, validated), the rank-aware dataset, the collator and the masks."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pyarrow as pa
import pytest
import torch
from _shards import build_shards, single_thread, write_stream  # noqa: F401 (autouse fixture)

from prep.errors import ConfigError, ShardError
from prep.load import (
    Collator,
    PackedDataset,
    attention_windows,
    block_causal_mask,
    block_mask,
    cu_seq_lens,
    iter_rows,
    load_shards,
    packed_attention_kwargs,
)


@pytest.fixture(scope="module")
def shards_dir(tmp_path_factory):
    return build_shards(tmp_path_factory.mktemp("load") / "shards", n_examples=120, max_len=256, num_shards=3)


@pytest.fixture
def broken(shards_dir, tmp_path):
    """A writable copy of the shard folder to damage."""
    return shutil.copytree(shards_dir, tmp_path / "shards")


def edit_manifest(path, **changes):
    manifest = json.loads((path / "manifest.json").read_text())
    manifest.update(changes)
    (path / "manifest.json").write_text(json.dumps(manifest))


# --- opening -------------------------------------------------------------------------------------------


def test_load_shards_is_zero_copy_and_matches_manifest(shards_dir):
    before = pa.total_allocated_bytes()
    shards = load_shards(shards_dir)
    assert pa.total_allocated_bytes() - before == 0  # buffers point into the memory maps
    manifest = json.loads((shards_dir / "manifest.json").read_text())
    assert shards.num_rows == manifest["counts"]["rows"] == sum(s["rows"] for s in manifest["shards"])
    assert shards.table.column_names == ["input_ids", "labels", "position_ids", "seq_lengths"]
    assert shards.max_len == 256 and shards.pad_token_id == 0
    assert shards.tokenizer_path == shards_dir / "tokenizer"


def test_rows_follow_the_contract(shards_dir):
    rows = list(iter_rows(load_shards(shards_dir)))
    assert (
        sum(int(r["seq_lengths"].sum()) for r in rows)
        == json.loads((shards_dir / "manifest.json").read_text())["counts"]["tokens"]
    )
    for r in rows:
        starts = np.concatenate([[0], np.cumsum(r["seq_lengths"])[:-1]])
        assert len(r["input_ids"]) == len(r["labels"]) == len(r["position_ids"]) == r["seq_lengths"].sum() <= 256
        np.testing.assert_array_equal(r["position_ids"], np.concatenate([np.arange(n) for n in r["seq_lengths"]]))
        assert (r["labels"][starts] == -100).all()


def test_unpacked_shards_with_attention_mask_column_load(tmp_path):
    shards = load_shards(build_shards(tmp_path / "s", n_examples=20, packed=False, num_shards=1))
    assert "attention_mask" in shards.table.column_names
    assert all(len(r["seq_lengths"]) == 1 for r in iter_rows(shards))


def damage_format(p):
    edit_manifest(p, format="something-else")


def damage_version(p):
    edit_manifest(p, format_version=2)


def damage_missing_file(p):
    (p / "data-00001-of-00003.arrow").unlink()


def damage_no_manifest(p):
    (p / "manifest.json").unlink()


def damage_rows(p):
    manifest = json.loads((p / "manifest.json").read_text())
    manifest["shards"][0]["rows"] += 1
    (p / "manifest.json").write_text(json.dumps(manifest))


def damage_columns(p):
    edit_manifest(p, columns=["input_ids", "labels"])


def damage_dtype(p):
    f = p / "data-00000-of-00003.arrow"
    table = pa.ipc.open_stream(f.read_bytes()).read_all()  # a copy: rewriting a mapped file would SIGBUS
    write_stream(table.set_column(0, "input_ids", table.column("input_ids").cast(pa.list_(pa.int64()))), f)


def damage_file_format(p):
    f = p / "data-00000-of-00003.arrow"
    table = pa.ipc.open_stream(f.read_bytes()).read_all()  # a copy: rewriting a mapped file would SIGBUS
    with pa.OSFile(str(f), "wb") as sink, pa.ipc.new_file(sink, table.schema) as w:  # IPC *file*, not stream
        w.write_table(table)


def damage_truncated(p):
    f = p / "data-00000-of-00003.arrow"
    f.write_bytes(f.read_bytes()[:1000])


@pytest.mark.parametrize(
    "damage, message",
    [
        (damage_no_manifest, "manifest.json: not found"),
        (damage_format, "format is 'something-else', expected 'prep-shards'"),
        (damage_version, "format_version 2, this prep reads 1"),
        (damage_missing_file, "data-00001-of-00003.arrow: listed in manifest.json but missing"),
        (damage_rows, "rows, manifest.json says"),
        (damage_columns, "lack ['position_ids', 'seq_lengths']"),
        (damage_dtype, "column 'input_ids' is list<item: int64>, expected list<int32>"),
        (damage_file_format, "not a readable Arrow IPC stream"),
        (damage_truncated, "data-00000-of-00003.arrow"),
    ],
)
def test_bad_shards_raise_shard_error_with_a_precise_message(broken, damage, message):
    damage(broken)
    with pytest.raises(ShardError, match=None) as err:
        load_shards(broken)
    assert message in str(err.value)


# --- dataset ------------------------------------------------------------------------------------------------


def row_key(item):
    return tuple(item["input_ids"].tolist())


def test_ranks_get_disjoint_rows_and_epochs_reshuffle(shards_dir):
    shards = load_shards(shards_dir)
    ranks = [PackedDataset(shards, rank=r, world_size=3, seed=7) for r in range(3)]
    seen = [{row_key(ds[i]) for i in range(len(ds))} for ds in ranks]
    assert len({len(ds) for ds in ranks}) == 1 and len(ranks[0]) == shards.num_rows // 3
    assert not (seen[0] & seen[1]) and not (seen[0] & seen[2]) and not (seen[1] & seen[2])
    assert sum(map(len, seen)) == 3 * (shards.num_rows // 3)
    order = lambda ds: [int(x) for x in ds.rows]  # noqa: E731
    again = PackedDataset(shards, rank=0, world_size=3, seed=7)
    assert order(again) == order(ranks[0])  # deterministic in (seed, epoch)
    again.set_epoch(1)
    assert order(again) != order(ranks[0])
    assert order(PackedDataset(shards, rank=0, world_size=3, seed=8)) != order(ranks[0])


def test_dataset_items_are_int64_rows(shards_dir):
    shards = load_shards(shards_dir)
    item = PackedDataset(shards, shuffle=False)[0]
    first = next(iter_rows(shards))
    assert set(item) == {"input_ids", "labels", "position_ids", "seq_lengths"}
    assert all(v.dtype == torch.int64 for v in item.values())
    assert item["input_ids"].tolist() == first["input_ids"].tolist()


def test_dataset_rejects_bad_rank(shards_dir):
    with pytest.raises(ConfigError, match="rank 2 is outside 0..1"):
        PackedDataset(load_shards(shards_dir), rank=2, world_size=2)


# --- collator and masks: exact small cases ------------------------------------------------------------------

ROWS = [
    {"input_ids": [11, 12, 13, 21, 22], "labels": [-100, 12, 13, -100, 22], "position_ids": [0, 1, 2, 0, 1]},
    {"input_ids": [31, 32, 33], "labels": [-100, -100, 33], "position_ids": [0, 1, 2]},
]


def test_collator_pads_to_max_len_with_pad_tail_as_own_example():
    batch = Collator(max_len=6, pad_id=0)(ROWS)
    assert set(batch) == {"input_ids", "labels", "position_ids"}
    assert batch["input_ids"].tolist() == [[11, 12, 13, 21, 22, 0], [31, 32, 33, 0, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 12, 13, -100, 22, -100], [-100, -100, 33, -100, -100, -100]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1, 0], [0, 1, 2, 0, 1, 2]]


def test_collator_padding_free_concatenates_with_cu_seq_lens():
    batch = Collator(max_len=6, pad_id=0, padding_free=True)(ROWS)
    assert batch["input_ids"].tolist() == [[11, 12, 13, 21, 22, 31, 32, 33]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1, 0, 1, 2]]
    assert batch["cu_seq_lens_q"].tolist() == batch["cu_seq_lens_k"].tolist() == [0, 3, 5, 8]
    assert batch["cu_seq_lens_q"].dtype == torch.int32
    assert batch["max_length_q"] == batch["max_length_k"] == 3


def test_collator_forces_first_label_of_every_example_to_ignore():
    row = {"input_ids": [1, 2, 3, 4], "labels": [1, 2, 3, 4], "position_ids": [0, 1, 0, 1]}
    assert Collator(max_len=4, pad_id=0)([row])["labels"].tolist() == [[-100, 2, -100, 4]]


def test_collator_rejects_rows_longer_than_max_len():
    with pytest.raises(ShardError, match="row of 5 tokens exceeds max_len 4"):
        Collator(max_len=4, pad_id=0)(ROWS)


def test_block_causal_mask_exact():
    mask = block_causal_mask(torch.tensor([[0, 1, 2, 0, 1, 0]]))[0, 0].int().tolist()
    assert mask == [
        [1, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0],
        [1, 1, 1, 0, 0, 0],
        [0, 0, 0, 1, 0, 0],
        [0, 0, 0, 1, 1, 0],
        [0, 0, 0, 0, 0, 1],
    ]
    additive = block_causal_mask(torch.tensor([[0, 1, 0]]), dtype=torch.float32)[0, 0]
    assert additive[1, 0] == 0 and additive[0, 1] == torch.finfo(torch.float32).min and additive[2, 1] < -1e38


def test_flex_block_mask_allows_exactly_what_the_dense_mask_allows():
    position_ids = torch.tensor([[0, 1, 2, 0, 1, 0, 0, 1, 2, 3], [0, 1, 2, 3, 4, 5, 0, 1, 0, 1]])
    mask = block_mask(position_ids)  # what packed_attention_kwargs passes on CUDA (it refuses flex on the CPU)
    b, q, k = torch.meshgrid(torch.arange(2), torch.arange(10), torch.arange(10), indexing="ij")
    allowed = mask.mask_mod(b, torch.zeros_like(b), q, k)
    assert mask.shape == (2, 1, 10, 10)
    assert torch.equal(allowed, block_causal_mask(position_ids)[:, 0])


def test_windows_give_one_mask_per_layer_type_only_where_they_matter():
    position_ids = torch.tensor([[0, 1, 2, 3, 4, 0, 1, 2, 0, 1]])
    mixed = {"full_attention": None, "sliding_attention": 3}
    masks = packed_attention_kwargs(position_ids, "sdpa", windows=mixed)["attention_mask"]
    assert torch.equal(masks["full_attention"], block_causal_mask(position_ids))
    assert torch.equal(masks["sliding_attention"], block_causal_mask(position_ids, window=3))
    assert masks["sliding_attention"][0, 0, 4].int().tolist() == [0, 0, 1, 1, 1, 0, 0, 0, 0, 0]
    wide = packed_attention_kwargs(position_ids, "sdpa", windows={"full_attention": None, "sliding_attention": 10})
    assert torch.equal(wide["attention_mask"], block_causal_mask(position_ids))  # a window >= the row changes nothing
    with pytest.raises(ConfigError, match="flex_attention runs only on CUDA"):
        packed_attention_kwargs(position_ids, "flex_attention", windows={"*": 3})
    flex = block_mask(position_ids, window=3)  # what it passes on CUDA
    b, q, k = torch.meshgrid(torch.arange(1), torch.arange(10), torch.arange(10), indexing="ij")
    assert torch.equal(flex.mask_mod(b, torch.zeros_like(b), q, k), block_causal_mask(position_ids, window=3)[:, 0])


def test_attention_windows_read_transformers_configs():
    from transformers import LlamaConfig, MistralConfig, Qwen2Config

    assert attention_windows(LlamaConfig()) == {"*": None}
    assert attention_windows(MistralConfig(sliding_window=4096)) == {"*": 4096}
    assert attention_windows(Qwen2Config()) == {"full_attention": None}  # use_sliding_window=False
    mixed = Qwen2Config(use_sliding_window=True, sliding_window=512, max_window_layers=2, num_hidden_layers=4)
    assert attention_windows(mixed) == {"full_attention": None, "sliding_attention": 512}


def test_collator_refuses_to_build_a_flex_block_mask_on_the_host():
    with pytest.raises(ConfigError, match="built on the model's device"):
        Collator(max_len=6, pad_id=0, attn_implementation="flex_attention")


def test_cu_seq_lens_exact():
    assert cu_seq_lens(torch.tensor([[0, 1, 2, 0, 0, 1]])).tolist() == [0, 3, 4, 6]


def test_collator_attaches_the_mask_for_the_named_attention_path():
    sdpa = Collator(max_len=6, pad_id=0, attn_implementation="sdpa")(ROWS)
    eager = Collator(max_len=6, pad_id=0, attn_implementation="eager")(ROWS)
    assert sdpa["attention_mask"].shape == (2, 1, 6, 6) and sdpa["attention_mask"].dtype == torch.bool
    assert eager["attention_mask"].dtype == torch.float32
    assert torch.equal(sdpa["attention_mask"], eager["attention_mask"] == 0)


@pytest.mark.parametrize("attn", ["paged|eager", "paged_attention", "my_kernel"])
def test_unsupported_attention_paths_are_refused(attn):
    with pytest.raises(ConfigError, match="could attend to each other"):
        packed_attention_kwargs(torch.tensor([[0, 1, 0]]), attn)


def test_flash_boundaries_need_a_padding_free_batch():
    with pytest.raises(ConfigError, match="padding-free"):
        packed_attention_kwargs(torch.tensor([[0, 1], [0, 1]]), "flash_attention_2")


def test_shards_written_by_prep_pack_load_and_follow_the_contract(tmp_path):
    """Cross-check with the real writer (prep.pipeline / prep.write), not only this file's helper."""
    pipeline = pytest.importorskip("prep.pipeline")
    config = pytest.importorskip("schemas.pack_config")
    from _shards import ALPACA_EN

    source = tmp_path / "alpaca.json"
    source.write_text(json.dumps(json.loads(ALPACA_EN.read_text())[:60]))
    pipeline.pack_shards(config.PackConfig(inputs=[str(source)], output=str(tmp_path / "shards"), max_len=512))
    shards = load_shards(tmp_path / "shards")
    rows = list(iter_rows(shards))
    assert len(rows) == shards.num_rows > 0
    for r in rows:
        starts = np.concatenate([[0], np.cumsum(r["seq_lengths"])[:-1]])
        np.testing.assert_array_equal(r["position_ids"], np.concatenate([np.arange(n) for n in r["seq_lengths"]]))
        assert (r["labels"][starts] == -100).all() and len(r["input_ids"]) <= shards.max_len
    batch = Collator(shards.max_len, shards.pad_token_id)([PackedDataset(shards)[0]])
    assert batch["input_ids"].shape == (1, 512)


@pytest.mark.parametrize("name", ["../outside.arrow", "/tmp/outside.arrow", "..", "sub/x.arrow"])
def test_manifest_paths_outside_the_folder_are_refused(broken, name):
    """A manifest may only name plain files inside its folder: no absolute paths, no `..`, no separators."""
    manifest = json.loads((broken / "manifest.json").read_text())
    manifest["shards"][0]["file"] = name
    (broken / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ShardError, match="not a plain file name"):
        load_shards(broken)
