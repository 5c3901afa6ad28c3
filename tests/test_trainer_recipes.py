"""The documented recipes (examples/trainers/*.py) run on a tiny model, and the settings they document keep
packed examples apart: per-token losses through each recipe's path equal those of every example run alone."""

from __future__ import annotations

import importlib.util
import math

import pytest
import torch
import torch.nn.functional as F
from _shards import REPO, build_shards, single_thread  # noqa: F401 (autouse fixture)

from prep.load import Collator, PackedDataset, iter_rows, load_shards

TOL = 1e-5


def recipe(name: str):
    """Import examples/trainers/<name>.py as a module."""
    spec = importlib.util.spec_from_file_location(f"recipe_{name}", REPO / "examples" / "trainers" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def shards_dir(tmp_path_factory):
    return build_shards(
        tmp_path_factory.mktemp("trainers") / "shards", n_examples=80, max_len=512, num_shards=2, tokenizer_name="bytes"
    )


@pytest.fixture(scope="module")
def rows(shards_dir):
    ds = PackedDataset(load_shards(shards_dir), shuffle=False)
    return [ds[i] for i in range(len(ds)) if len(ds[i]["seq_lengths"]) >= 2][:3]


@pytest.fixture(scope="module")
def model(shards_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(shards_dir / "tokenizer")
    return recipe("torch_loop").load_model(None, tokenizer, 512, "sdpa").eval()


def trained_losses(logits: torch.Tensor, labels: torch.Tensor, lengths: list[int]) -> torch.Tensor:
    """Per-token losses of trained positions, row by row (each row's first `length` tokens), in order."""
    per_token = F.cross_entropy(
        logits[:, :-1].transpose(1, 2).float(), labels[:, 1:], ignore_index=-100, reduction="none"
    )
    keep = labels[:, 1:] != -100
    return torch.cat([per_token[i, : n - 1][keep[i, : n - 1]] for i, n in enumerate(lengths)])


def isolated(model, rows) -> torch.Tensor:
    """The same, with every example run on its own."""
    out = []
    for r in rows:
        starts = [0] + torch.cumsum(r["seq_lengths"], 0).tolist()
        for a, b in zip(starts[:-1], starts[1:]):
            ids, labels = r["input_ids"][a:b][None], r["labels"][a:b][None]
            with torch.no_grad():
                out.append(trained_losses(model(input_ids=ids, use_cache=False).logits, labels, [b - a]))
    return torch.cat(out)


def test_datasets_load_from_disk_recipe(shards_dir):
    result = recipe("datasets_load_from_disk").main(str(shards_dir), batch_size=4)
    assert result["rows"] == load_shards(shards_dir).num_rows
    assert result["columns"] == ["input_ids", "labels", "position_ids", "seq_lengths"]
    assert result["batch"] == {"input_ids": [4, 512], "labels": [4, 512], "position_ids": [4, 512]}
    from datasets import load_from_disk

    hf, prep_rows = load_from_disk(str(shards_dir)), list(iter_rows(load_shards(shards_dir)))
    assert [hf[i]["input_ids"] for i in (0, len(hf) - 1)] == [prep_rows[i]["input_ids"].tolist() for i in (0, -1)]


def test_torch_loop_recipe_learns(shards_dir):
    losses = recipe("torch_loop").main(str(shards_dir), max_steps=12, batch_size=2)["losses"]
    assert len(losses) == 12 and losses[0] == pytest.approx(math.log(257), abs=0.3)
    assert sum(losses[-3:]) / 3 < losses[0] - 0.5


def test_hf_trainer_recipe_trains(shards_dir, tmp_path):
    losses = recipe("hf_trainer").main(str(shards_dir), out_dir=str(tmp_path), max_steps=8, batch_size=2)["losses"]
    assert len(losses) == 8 and all(math.isfinite(x) for x in losses) and losses[-1] < losses[0]


def test_hf_trainer_recipe_batches_are_isolated(model, rows):
    """What the Trainer does with a batch from the recipe's collator: model(**batch)."""
    batch = Collator(512, 0, attn_implementation=model.config._attn_implementation)(rows)
    model.config.use_cache = False
    with torch.no_grad():
        logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
    packed = trained_losses(logits, batch["labels"], [len(r["input_ids"]) for r in rows])
    torch.testing.assert_close(packed, isolated(model, rows), rtol=0, atol=TOL)


def test_trl_recipe_trains(shards_dir, tmp_path):
    losses = recipe("trl_sft").main(str(shards_dir), out_dir=str(tmp_path), max_steps=8, batch_size=2)["losses"]
    assert len(losses) == 8 and all(math.isfinite(x) for x in losses) and losses[-1] < losses[0]


def test_trl_recipe_batches_are_isolated(shards_dir, model, rows, tmp_path):
    """SFTTrainer built with the recipe's config: its padding-free collator + TRL's forward (use_cache=False)."""
    from datasets import load_from_disk
    from transformers import AutoTokenizer
    from trl import SFTTrainer

    trl_sft = recipe("trl_sft")
    trainer = SFTTrainer(
        model=model,
        args=trl_sft.sft_config(str(tmp_path), 1, 3, 1e-3),
        train_dataset=load_from_disk(str(shards_dir)),
        processing_class=AutoTokenizer.from_pretrained(shards_dir / "tokenizer"),
    )
    batch = trainer.data_collator([{k: v.tolist() for k, v in r.items()} for r in rows])
    assert batch["input_ids"].shape[0] == 1 and "attention_mask" not in batch  # flattened, boundaries from seq_lengths
    with torch.no_grad():
        logits = model(**{k: v for k, v in batch.items() if k != "labels"}, use_cache=False).logits
    packed = trained_losses(logits, batch["labels"], [batch["input_ids"].shape[1]])
    torch.testing.assert_close(packed, isolated(model, rows), rtol=0, atol=TOL)
