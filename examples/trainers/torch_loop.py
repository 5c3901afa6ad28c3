"""Recipe: a plain PyTorch training loop on prep shards, packed examples kept apart.

    python examples/trainers/torch_loop.py shards/ --max-steps 20 [--model path/or/hub-id] [--device cuda]

What to set, and why:
- pass `position_ids` from the batch (they restart at 0 at every example) and `use_cache=False`;
- pass the example boundaries of the attention path: `PackedAttention.of(model).kwargs(position_ids)` gives a
  4D block-diagonal causal mask for sdpa/eager, with the model's sliding windows where it has them (cu_seq_lens
  for flash attention on a padding-free batch). transformers 5.24
  also detects packing from position_ids alone, but only with no attention_mask and no KV cache, and the
  default `use_cache=True` silently lets packed examples attend to each other;
- normalise the summed token loss by the number of trained tokens (labels != -100 after the shift);
- move the model and every batch to the device (the flash kernels run only on CUDA, in bf16; flex_attention too,
  since PyTorch's CPU flex kernel is wrong on some CPUs and prep refuses it there). Boundaries are built from the
  batch's position_ids after the move, so they live where the model does.
"""

from __future__ import annotations

import argparse
import contextlib
import json

import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, AutoTokenizer

from prep.load import Collator, PackedAttention, PackedDataset, load_shards
from prep.models import model_config
from prep.train import cast_flex_attention_inputs


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
    model: str | None = None,
    max_steps: int = 20,
    batch_size: int = 4,
    lr: float = 3e-3,
    attn: str = "sdpa",
    device: str = "auto",
) -> dict:
    """Train for `max_steps` on `device` (auto = cuda when available) and return the loss of every step."""
    dev = torch.device(device if device != "auto" else "cuda" if torch.cuda.is_available() else "cpu")
    # bf16 autocast on CUDA (fp32 weights): the flash kernels take only 16-bit inputs
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if dev.type == "cuda" else contextlib.nullcontext()
    if attn == "flex_attention":
        cast_flex_attention_inputs()  # flex is on none of autocast's lists: q, k, v would reach it in mixed dtypes
    shards_ = load_shards(shards)
    tokenizer = AutoTokenizer.from_pretrained(shards_.tokenizer_path)
    net = load_model(model, tokenizer, shards_.max_len, attn).to(dev)
    dataset = PackedDataset(shards_, rank=0, world_size=1, seed=0)  # under torchrun: rank=RANK, world_size=WORLD_SIZE
    collate = Collator(shards_.max_len, shards_.pad_token_id, padding_free=attn.startswith("flash"))
    boundaries_of = PackedAttention.of(net)  # the attention path and the sliding window of each layer type
    optimizer = torch.optim.AdamW(net.parameters(), lr=lr)
    losses, epoch = [], 0
    while len(losses) < max_steps:
        dataset.set_epoch(epoch)
        for batch in torch.utils.data.DataLoader(
            dataset, batch_size=batch_size, collate_fn=collate, pin_memory=dev.type == "cuda"
        ):
            batch = {k: v.to(dev, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}
            boundaries = boundaries_of.kwargs(batch["position_ids"])
            with autocast:
                logits = net(
                    input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False, **boundaries
                ).logits
            labels = batch["labels"][:, 1:]
            loss_sum = F.cross_entropy(
                logits[:, :-1].flatten(0, 1).float(), labels.flatten(), ignore_index=-100, reduction="sum"
            )
            loss = loss_sum / (labels != -100).sum().clamp(min=1)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            losses.append(loss.item())
            if len(losses) == max_steps:
                break
        epoch += 1
    return {"losses": losses}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("shards")
    parser.add_argument("--model", default=None)
    parser.add_argument("--max-steps", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--attn", default="sdpa")
    parser.add_argument("--device", default="auto", help="auto (cuda when available) | cpu | cuda | cuda:N")
    print(json.dumps(main(**vars(parser.parse_args()))))
