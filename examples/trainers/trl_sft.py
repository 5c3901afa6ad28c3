"""Recipe: TRL's `SFTTrainer` on prep shards: pre-tokenized, padding-free.

    python examples/trainers/trl_sft.py shards/ --max-steps 20 [--model path/or/hub-id]

What to set, and why:
- `train_dataset=load_from_disk(shards)`: the folder is a saved datasets.Dataset; its `seq_lengths` column is
  what TRL's padding-free collator reads to restart position_ids at every packed example;
- `padding_free=True, packing=False, max_length=None, dataset_kwargs={"skip_prepare_dataset": True}`: keep prep's
  tokens, labels and packing as they are (no re-tokenising, re-packing or truncation);
- TRL then flattens each batch into one row without an attention_mask and calls the model with
  `use_cache=False`: flash attention uses the cu_seq_lens it passes, and sdpa/eager in transformers 5.24 detect
  the examples from position_ids (a single row, no mask, no cache). Set `model.config.use_cache = False` too,
  for anything that calls the model outside TRL's compute_loss.
"""

from __future__ import annotations

import argparse
import json

import torch
from datasets import load_from_disk
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl import SFTConfig, SFTTrainer

from prep.models import model_config


def load_model(name: str | None, tokenizer, max_len: int, attn: str):
    """A pretrained model (folder or hub id) or the built-in tiny config with random weights."""
    if name:
        model = AutoModelForCausalLM.from_pretrained(name, attn_implementation=attn)
        model.resize_token_embeddings(max(len(tokenizer), model.get_input_embeddings().num_embeddings))
        return model
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(model_config("tiny", len(tokenizer), max_len), attn_implementation=attn)


def sft_config(out_dir: str, max_steps: int, batch_size: int, lr: float) -> SFTConfig:
    """The SFTConfig for pre-tokenized, pre-packed prep shards."""
    return SFTConfig(
        output_dir=out_dir,
        max_steps=max_steps,
        per_device_train_batch_size=batch_size,
        learning_rate=lr,
        padding_free=True,
        packing=False,
        max_length=None,
        dataset_kwargs={"skip_prepare_dataset": True},
        bf16=torch.cuda.is_available(),
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        dataloader_pin_memory=False,
    )


def main(
    shards: str,
    out_dir: str = "trl-out",
    model: str | None = None,
    max_steps: int = 20,
    batch_size: int = 4,
    lr: float = 3e-3,
    attn: str = "sdpa",
) -> dict:
    """Train for `max_steps` with trl.SFTTrainer; return the logged losses."""
    tokenizer = AutoTokenizer.from_pretrained(f"{shards}/tokenizer")
    max_len = json.loads(open(f"{shards}/manifest.json").read())["max_len"]
    net = load_model(model, tokenizer, max_len, attn)
    net.config.use_cache = False
    trainer = SFTTrainer(
        model=net,
        args=sft_config(out_dir, max_steps, batch_size, lr),
        train_dataset=load_from_disk(shards),
        processing_class=tokenizer,
    )
    trainer.train()
    return {"losses": [log["loss"] for log in trainer.state.log_history if "loss" in log]}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("shards")
    parser.add_argument("--out-dir", default="trl-out")
    parser.add_argument("--model", default=None)
    parser.add_argument("--max-steps", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--attn", default="sdpa")
    print(json.dumps(main(**vars(parser.parse_args()))))
