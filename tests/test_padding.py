"""`prep pack --pad-to-multiple-of N`: every example padded (masked, positions continuing) for context parallelism.

Exact layouts on hand-computed cases, the invariants on real data (checked by `prep verify` too), the cu_seqlens
pair, and the bundled trainer's loss: the same with and without the padding.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch

from prep.errors import ConfigError
from prep.load import Collator, PackedDataset, cu_seqlens_pair, iter_rows, load_shards
from prep.pack import build_rows, pad_examples, padded_lengths, plan_bfd, with_padding
from prep.pipeline import build_config, pack_shards
from prep.spill import ExampleStore
from prep.verify import verify_shards
from schemas.pack_config import PackConfig


def test_pad_examples_exact():
    ids, labels, lengths = pad_examples(np.array([5, 6, 7, 8, 9]), np.array([-100, 6, 7, -100, 9]),
                                        np.array([3, 2]), 4, pad_id=0)
    assert ids.tolist() == [5, 6, 7, 0, 8, 9, 0, 0]
    assert labels.tolist() == [-100, 6, 7, -100, -100, 9, -100, -100]
    assert lengths.tolist() == [4, 4]


def test_build_rows_lays_out_padding_with_continuing_positions(tmp_path):
    ids, labels = [[1, 2, 3], [4, 5, 6, 7, 8], [9]], [[-100, 2, 3], [-100, 5, 6, 7, 8], [-100]]
    with ExampleStore(parent=tmp_path) as store:
        store.append(pa.table({"input_ids": ids, "labels": labels}))
        lengths = store.lengths
        plan = with_padding(plan_bfd(padded_lengths(lengths, 4), 8), 4, pad_id=99)
        rows = build_rows(store, plan, slice(0, plan.num_rows)).to_pydict()
    assert rows["input_ids"] == [[4, 5, 6, 7, 8, 99, 99, 99], [1, 2, 3, 99, 9, 99, 99, 99]]
    assert rows["labels"] == [[-100, 5, 6, 7, 8, -100, -100, -100], [-100, 2, 3, -100, -100, -100, -100, -100]]
    assert rows["position_ids"] == [[0, 1, 2, 3, 4, 5, 6, 7], [0, 1, 2, 3, 0, 1, 2, 3]]
    assert rows["seq_lengths"] == [[8], [4, 4]] and rows["seq_lengths_unpadded"] == [[5], [3, 1]]


def test_cu_seqlens_pair():
    cu, cu_padded = cu_seqlens_pair(torch.tensor([4, 4, 8]), torch.tensor([3, 1, 5]))
    assert cu.tolist() == [0, 3, 4, 9] and cu_padded.tolist() == [0, 4, 8, 16]
    assert [c.dtype for c in (cu, cu_padded)] == [torch.int32, torch.int32]
    same = cu_seqlens_pair(torch.tensor([2, 3]))
    assert same[0].tolist() == same[1].tolist() == [0, 2, 5]


def test_max_len_must_be_a_multiple():
    with pytest.raises(ConfigError, match="--max-len 1000 is not a multiple of --pad-to-multiple-of 16"):
        build_config(inputs=["a.json"], output="o", max_len=1000, pad_to_multiple_of=16)
    with pytest.raises(ConfigError, match="--pad-to-multiple-of"):
        build_config(inputs=["a.json"], output="o", pad_to_multiple_of=0)


@pytest.fixture(scope="module")
def padded_pair(tmp_path_factory, shared_data) -> dict[int, Path]:
    """Real ShareGPT chats, Mistral tokenizer, packed without padding and with N = 8."""
    root = tmp_path_factory.mktemp("pad")
    common = dict(inputs=[str(shared_data / "sharegpt" / "sharegpt_zh_1K_format.jsonl")], max_len=1024,
                  tokenizer=str(shared_data / "tokenizers" / "mistral-7b-instruct-v0.3"), template="chatml", workers=1)
    return {n: Path(pack_shards(PackConfig(output=str(root / f"n{n}"), pad_to_multiple_of=n, **common)).output)
            for n in (1, 8)}


def test_padded_shards_hold_the_same_examples_and_pass_verify(padded_pair):
    plain, padded = padded_pair[1], padded_pair[8]
    assert verify_shards(padded).ok and verify_shards(plain).ok
    m, m1 = (json.loads((p / "manifest.json").read_text()) for p in (padded, plain))
    assert m["pad_to_multiple_of"] == 8 and m1["pad_to_multiple_of"] == 1 and m1["counts"]["padding_tokens"] == 0
    assert m["columns"][-1] == "seq_lengths_unpadded" and m["counts"]["tokens"] == m1["counts"]["tokens"]
    found_padding, examples = 0, []
    for row in iter_rows(load_shards(padded)):
        seq, real = row["seq_lengths"], row["seq_lengths_unpadded"]
        assert (seq % 8 == 0).all() and (seq - real < 8).all() and (real >= 1).all()
        starts = np.cumsum(seq) - seq
        for s, n, r in zip(starts, seq, real):
            assert (row["input_ids"][s + r : s + n] == m["tokenizer"]["pad_token_id"]).all()
            assert (row["labels"][s + r : s + n] == -100).all()
            assert row["position_ids"][s : s + n].tolist() == list(range(n))  # positions continue into the padding
            examples.append((row["input_ids"][s : s + r].tobytes(), row["labels"][s : s + r].tobytes()))
            found_padding += int(n - r)
    assert found_padding == m["counts"]["padding_tokens"] > 0
    plain_examples = []
    for row in iter_rows(load_shards(plain)):
        starts = np.cumsum(row["seq_lengths"]) - row["seq_lengths"]
        plain_examples += [(row["input_ids"][s : s + n].tobytes(), row["labels"][s : s + n].tobytes())
                           for s, n in zip(starts, row["seq_lengths"])]
    assert sorted(examples) == sorted(plain_examples)


def corrupt(src: Path, dest: Path, change) -> Path:
    """A copy of `src` whose first shard's rows went through `change(rows)` (hashes updated: only values differ)."""
    import shutil

    from prep.write import sha256_file

    shutil.copytree(src, dest)
    manifest = json.loads((dest / "manifest.json").read_text())
    shard = dest / manifest["shards"][0]["file"]
    table = pa.ipc.open_stream(pa.memory_map(str(shard))).read_all()
    rows = table.to_pydict()
    change(rows)
    with pa.ipc.new_stream(str(shard), table.schema) as w:
        w.write_table(pa.table(rows, schema=table.schema), max_chunksize=1000)
    manifest["shards"][0]["sha256"] = sha256_file(shard)
    (dest / "manifest.json").write_text(json.dumps(manifest))
    return dest


def first_padded(rows) -> int:
    return next(i for i, (a, b) in enumerate(zip(rows["seq_lengths"], rows["seq_lengths_unpadded"])) if a[0] > b[0])


def test_verify_finds_broken_padding(padded_pair, tmp_path):
    def wrong_pad_id(rows):
        r = first_padded(rows)
        rows["input_ids"][r][rows["seq_lengths_unpadded"][r][0]] = 7

    problems = verify_shards(corrupt(padded_pair[8], tmp_path / "a", wrong_pad_id)).problems
    assert [p.check for p in problems] == ["padding"] and "pad token at [" in str(problems[0])

    def longer_than_padded(rows):
        r = first_padded(rows)
        rows["seq_lengths_unpadded"][r][0] = rows["seq_lengths"][r][0] + 1

    problems = verify_shards(corrupt(padded_pair[8], tmp_path / "b", longer_than_padded)).problems
    assert problems[0].check == "padding" and "padded to a multiple of 8" in str(problems[0])


def test_trainer_loss_is_unchanged_by_padding(tmp_path, shared_data):
    """The bundled trainer's summed token loss and trained-token count over every row: equal with and without
    padding, one example per row (row by row) and packed (over the whole set; the rows differ)."""
    from transformers import AutoModelForCausalLM

    from prep.models import model_config
    from prep.train import token_loss_sum, trained_tokens

    records = json.loads((shared_data / "alpaca" / "alpaca_en_demo.json").read_text(encoding="utf-8"))[:48]
    (tmp_path / "alpaca48.json").write_text(json.dumps(records))
    common = dict(inputs=[str(tmp_path / "alpaca48.json")], max_len=128, workers=1, overflow="truncate")
    torch.manual_seed(0)
    model = None
    for pack in (False, True):
        results = {}
        for n in (1, 16):
            out = pack_shards(PackConfig(output=str(tmp_path / f"{pack}{n}"), pack=pack, pad_to_multiple_of=n,
                                         **common)).output
            shards = load_shards(out)
            if model is None:
                torch.manual_seed(0)
                model = AutoModelForCausalLM.from_config(
                    model_config("tiny", shards.manifest["tokenizer"]["vocab_size"], 128),
                    attn_implementation="sdpa").eval()
            rows = PackedDataset(shards, shuffle=False)
            collate = Collator(shards.max_len, shards.pad_token_id)
            losses, counted = [], 0
            with torch.no_grad():
                for start in range(0, len(rows), 8):
                    batch = collate([rows[i] for i in range(start, min(start + 8, len(rows)))])
                    losses.append(token_loss_sum(model, batch, "sdpa").item())
                    counted += trained_tokens(batch["labels"])
            results[n] = (np.array(losses), counted)
        (plain, plain_count), (padded, padded_count) = results[1], results[16]
        assert plain_count == padded_count > 0
        if not pack:  # the same example in the same row: every batch's loss is the same
            np.testing.assert_allclose(padded, plain, rtol=1e-5)
        assert padded.sum() == pytest.approx(plain.sum(), rel=1e-5)
