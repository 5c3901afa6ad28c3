"""Recipe: the Hugging Face `Trainer` on prep shards, with a transformers model.

    python examples/trainers/hf_trainer.py shards/ --max-steps 20 [--model path/or/hub-id]

What to set, and why:
- `data_collator=Collator(max_len, pad_id, attn_implementation=model.config._attn_implementation,
  windows=attention_windows(model.config))`: every batch then carries the 4D block-diagonal causal mask
  (sdpa/eager) with the model's sliding windows, so `model(**batch)` keeps packed examples apart whatever else
  the Trainer does. For flash_attention_2 use `padding_free=True` (cu_seq_lens) instead;
- `model.config.use_cache = False`: with a KV cache (the default) and no explicit mask, transformers 5.24
  silently lets packed examples attend to each other;
- the dataset is prep's PackedDataset with rank=0, world_size=1: the Trainer (accelerate) shards it itself;
- the Trainer already normalises the loss by the trained tokens of the whole accumulation window
  (`num_items_in_batch`), which matches `prep train`.
"""

from __future__ import annotations

import argparse
import json

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer, TrainingArguments

from prep.load import Collator, PackedDataset, attention_windows, load_shards
from prep.models import model_config


def load_model(name: str | None, tokenizer, max_len: int, attn: str):
    """A pretrained model (folder or hub id) or the built-in tiny config with random weights."""
    if name:
        model = AutoModelForCausalLM.from_pretrained(name, attn_implementation=attn)
        model.resize_token_embeddings(max(len(tokenizer), model.get_input_embeddings().num_embeddings))
        return model
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(model_config("tiny", len(tokenizer), max_len), attn_implementation=attn)


def main(
    shards: str,
    out_dir: str = "hf-trainer-out",
    model: str | None = None,
    max_steps: int = 20,
    batch_size: int = 4,
    lr: float = 3e-3,
    attn: str = "sdpa",
) -> dict:
    """Train for `max_steps` with transformers.Trainer; return the logged losses."""
    shards_ = load_shards(shards)
    tokenizer = AutoTokenizer.from_pretrained(shards_.tokenizer_path)
    net = load_model(model, tokenizer, shards_.max_len, attn)
    net.config.use_cache = False
    args = TrainingArguments(
        output_dir=out_dir,
        max_steps=max_steps,
        per_device_train_batch_size=batch_size,
        learning_rate=lr,
        bf16=torch.cuda.is_available(),
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        dataloader_pin_memory=False,
    )
    trainer = Trainer(
        model=net,
        args=args,
        train_dataset=PackedDataset(shards_, rank=0, world_size=1, seed=0),
        data_collator=Collator(
            shards_.max_len,
            shards_.pad_token_id,
            padding_free=attn.startswith("flash"),
            attn_implementation=net.config._attn_implementation,
            windows=attention_windows(net.config),
        ),
    )
    trainer.train()
    return {"losses": [log["loss"] for log in trainer.state.log_history if "loss" in log]}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("shards")
    parser.add_argument("--out-dir", default="hf-trainer-out")
    parser.add_argument("--model", default=None)
    parser.add_argument("--max-steps", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--attn", default="sdpa")
    print(json.dumps(main(**vars(parser.parse_args()))))
