"""Recipe: read prep shards with Hugging Face `datasets` and batch them with prep's Collator.

    python examples/trainers/datasets_load_from_disk.py shards/

The shard folder is also a saved `datasets.Dataset` (dataset_info.json + state.json beside the Arrow stream
files), so `load_from_disk` memory-maps the same files, without a copy. Rows keep their packed form
(input_ids, labels, position_ids, seq_lengths); prep's Collator pads them to max_len (pad tail = its own
example). Before feeding a model, add the example boundaries of its attention path: see torch_loop.py.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from datasets import load_from_disk

from prep.load import Collator


def main(shards: str, batch_size: int = 4) -> dict:
    """Load the shards as a datasets.Dataset and collate one shuffled batch; return what was seen."""
    manifest = json.loads((Path(shards) / "manifest.json").read_text())
    dataset = load_from_disk(shards).with_format("torch")
    collate = Collator(max_len=manifest["max_len"], pad_id=manifest["tokenizer"]["pad_token_id"])
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=True, collate_fn=collate)
    batch = next(iter(loader))
    return {
        "rows": len(dataset),
        "columns": dataset.column_names,
        "batch": {k: list(v.shape) for k, v in batch.items()},
    }


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("shards")
    parser.add_argument("--batch-size", type=int, default=4)
    print(json.dumps(main(**vars(parser.parse_args()))))
