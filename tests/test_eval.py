"""prep train on shards with a validation split: evaluate() is the loss on trained tokens only, with packed
examples kept apart, independent of the batch size, and logged beside the training metrics."""

from __future__ import annotations

import json
import math

import pytest
import torch
from _shards import single_thread  # noqa: F401 (autouse fixture)

from prep.errors import ConfigError
from prep.load import Collator, PackedDataset, iter_rows, load_shards
from prep.pipeline import build_config, pack_shards
from prep.train import (
    Dist,
    TrainConfig,
    build_model,
    evaluate,
    finish_distributed,
    token_losses,
    train_model,
)


@pytest.fixture(scope="module")
def split_shards(tmp_path_factory, shared_data):
    """Real Alpaca records (identity + the first file's), 20% held out, byte-level demo tokenizer."""
    out = tmp_path_factory.mktemp("eval") / "shards"
    pack_shards(build_config(inputs=[str(shared_data / "alpaca" / "identity.json")], output=str(out), max_len=256,
                             val_fraction=0.2))
    return out


@pytest.fixture(scope="module")
def tiny_model(split_shards):
    shards = load_shards(split_shards)
    model, _ = build_model(TrainConfig(shards=str(split_shards), attn_implementation="sdpa"), shards,
                           torch.device("cpu"))
    return model.eval()


def reference_loss(model, shards) -> tuple[float, int]:
    """Sum of token losses and trained tokens, every example run alone (no packing at all)."""
    total, n = 0.0, 0
    for row in iter_rows(shards):
        start = 0
        for length in row["seq_lengths"].tolist():
            ids = torch.tensor(row["input_ids"][start:start + length], dtype=torch.long)[None]
            labels = torch.tensor(row["labels"][start:start + length], dtype=torch.long)[None]
            with torch.no_grad():
                logits = model(input_ids=ids, use_cache=False).logits
            total += float(token_losses(logits, labels))
            n += int((labels[:, 1:] != -100).sum())
            start += length
    return total, n


@pytest.mark.parametrize("batch_size", [1, 3])
def test_evaluate_is_the_loss_of_each_example_alone(split_shards, tiny_model, batch_size):
    shards = load_shards(split_shards, split="validation")
    dataset = PackedDataset(shards, shuffle=False)
    collate = Collator(shards.max_len, shards.pad_token_id)
    config = TrainConfig(shards=str(split_shards), batch_size=batch_size)
    scores = evaluate(tiny_model, dataset, collate, config, "sdpa", Dist())
    total, n = reference_loss(tiny_model, shards)
    assert scores["val_tokens"] == n == shards.manifest["counts"]["trained_tokens"]
    assert scores["val_loss"] == pytest.approx(total / n, rel=1e-5)
    assert scores["val_ppl"] == pytest.approx(math.exp(total / n), rel=1e-5)
    assert not tiny_model.training


def test_eval_batches_limits_the_pass(split_shards, tiny_model):
    shards = load_shards(split_shards, split="validation")
    dataset, collate = PackedDataset(shards, shuffle=False), Collator(shards.max_len, shards.pad_token_id)
    one = evaluate(tiny_model, dataset, collate, TrainConfig(batch_size=1, eval_batches=1), "sdpa", Dist())
    assert 0 < one["val_tokens"] < shards.manifest["counts"]["trained_tokens"]


def test_train_logs_validation_every_n_steps_and_at_the_end(split_shards, tmp_path):
    config = TrainConfig(shards=str(split_shards), out_dir=str(tmp_path / "run"), max_steps=3, batch_size=2,
                         eval_every=2, lr=3e-3, progress=False)
    final = train_model(config)
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    evals = [x for x in lines if x.get("split") == "validation"]
    assert [x["step"] for x in evals] == [2, 3]
    assert [x["step"] for x in lines if "loss" in x] == [1, 2, 3]
    assert final["val_loss"] == evals[-1]["val_loss"]
    assert evals[-1]["val_ppl"] == pytest.approx(math.exp(evals[-1]["val_loss"]))
    trained = load_shards(split_shards, split="validation").manifest["counts"]["trained_tokens"]
    assert all(x["val_tokens"] == trained for x in evals)


def test_eval_every_needs_a_validation_split(tmp_path, examples):
    plain = tmp_path / "plain"
    pack_shards(build_config(inputs=[str(examples / "openai.jsonl")], output=str(plain), max_len=256))
    with pytest.raises(ConfigError, match="--eval-every.*no validation split"):
        train_model(TrainConfig(shards=str(plain), out_dir=str(tmp_path / "run"), max_steps=1, eval_every=1,
                                progress=False))
    final = train_model(TrainConfig(shards=str(plain), out_dir=str(tmp_path / "run2"), max_steps=1, batch_size=2,
                                    progress=False))
    assert "val_loss" not in final


def eval_worker(rank: int, world_size: int, port: int, shards_dir, out_dir) -> None:
    """evaluate() on one gloo rank; writes its scores."""
    import os

    import torch.distributed as dist

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    train_shards = load_shards(shards_dir)
    model, _ = build_model(TrainConfig(shards=str(shards_dir), attn_implementation="sdpa"), train_shards,
                           torch.device("cpu"))
    shards = load_shards(shards_dir, split="validation")
    dataset = PackedDataset(shards, rank, world_size, shuffle=False)
    scores = evaluate(model.eval(), dataset, Collator(shards.max_len, shards.pad_token_id),
                      TrainConfig(batch_size=2), "sdpa", Dist(rank, world_size))
    (out_dir / f"rank{rank}.json").write_text(json.dumps(scores))
    finish_distributed()  # leaves the process (exit code 0); an exception above reaches mp.spawn instead


def test_evaluate_all_reduces_over_ranks(split_shards, tiny_model, tmp_path):
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(eval_worker, args=(2, port, split_shards, tmp_path), nprocs=2, join=True)
    scores = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert scores[0] == scores[1]
    shards = load_shards(split_shards, split="validation")
    assert shards.num_rows % 2 == 0  # so the two ranks together read every row
    single = evaluate(tiny_model, PackedDataset(shards, shuffle=False), Collator(shards.max_len, shards.pad_token_id), TrainConfig(batch_size=2),
                      "sdpa", Dist())
    assert scores[0]["val_tokens"] == single["val_tokens"]
    assert scores[0]["val_loss"] == pytest.approx(single["val_loss"], rel=1e-5)
