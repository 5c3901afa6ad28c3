"""Recipe: stream an MDS export (`prep export SHARDS --to mds -o mds/`) with MosaicML Streaming into a PyTorch loop.

    python examples/trainers/streaming_mds.py mds/manifest.json --local mds/ --max-steps 20
    python examples/trainers/streaming_mds.py manifest.json --remote s3://bucket/mds --local /tmp/mds-cache

Needs `mosaicml-streaming` beside torch and transformers (it pins transformers<5; prep's `prep.load` needs only
torch, numpy and pyarrow, so it installs there too). The export's `manifest.json` (a small file: keep a copy
next to the script) gives the row length, the pad id and the vocabulary size.

What to set, and why:
- every sample is one packed shard row (`input_ids`, `labels`, `position_ids`, `seq_lengths`, int32 arrays);
  `prep.load.Collator` pads rows to max_len as `prep train` does;
- pass `position_ids` and the example boundaries (`PackedAttention.of(model).kwargs(position_ids)`) with
  `use_cache=False`, so packed examples never attend to each other;
- StreamingDataset shuffles, splits across ranks/nodes and resumes deterministically by itself: give it the
  global `batch_size` per rank and use `StreamingDataLoader` to checkpoint its position with `state_dict()`.
"""

from __future__ import annotations

import argparse
import json

import torch
import torch.nn.functional as F
from streaming import StreamingDataLoader, StreamingDataset
from transformers import AutoModelForCausalLM

from prep.load import Collator, PackedAttention
from prep.models import model_config


def main(
    manifest: str,
    local: str,
    remote: str | None = None,
    model: str | None = None,
    max_steps: int = 20,
    batch_size: int = 4,
    lr: float = 3e-3,
) -> dict:
    """Train for `max_steps` on the streamed rows; return every step's loss and the examples seen per row."""
    info = json.loads(open(manifest, encoding="utf-8").read())
    max_len, tok = info["max_len"], info["tokenizer"]
    pad_id = next((tok[k] for k in ("pad_token_id", "eos_token_id") if tok.get(k) is not None), 0)
    torch.manual_seed(0)
    if model:
        net = AutoModelForCausalLM.from_pretrained(model, attn_implementation="sdpa")
    else:
        net = AutoModelForCausalLM.from_config(model_config("tiny", tok["vocab_size"], max_len), attn_implementation="sdpa")
    dataset = StreamingDataset(remote=remote, local=local, shuffle=True, shuffle_seed=0, batch_size=batch_size)
    loader = StreamingDataLoader(dataset, batch_size=batch_size, collate_fn=Collator(max_len, pad_id))
    boundaries_of = PackedAttention.of(net)
    optimizer = torch.optim.AdamW(net.parameters(), lr=lr)
    losses, examples_per_row = [], []
    while len(losses) < max_steps:
        for batch in loader:
            logits = net(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False,
                         **boundaries_of.kwargs(batch["position_ids"])).logits
            labels = batch["labels"][:, 1:]
            loss_sum = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels.flatten(), ignore_index=-100,
                                       reduction="sum")
            loss = loss_sum / (labels != -100).sum().clamp(min=1)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            losses.append(loss.item())
            examples_per_row += (batch["position_ids"] == 0).sum(dim=1).tolist()
            if len(losses) == max_steps:
                break
    return {"losses": losses, "examples_per_row": examples_per_row, "rows": len(dataset)}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("manifest", help="the export's manifest.json")
    parser.add_argument("--local", required=True, help="the export folder, or a cache folder with --remote")
    parser.add_argument("--remote", default=None, help="s3://, gs://, oci://, hf://, ... or a path")
    parser.add_argument("--model", default=None)
    parser.add_argument("--max-steps", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--lr", type=float, default=3e-3)
    print(json.dumps(main(**vars(parser.parse_args()))))
