"""Build small contract-conforming shards from real Alpaca data (a test helper, not part of `prep`).

The real writer is prep/write.py; the train-side tests must not depend on it, so this helper writes the
same layout (docs/contract.md) with pyarrow: `data-0000i-of-0000n.arrow` in Arrow IPC *stream* format,
`dataset_info.json` + `state.json` (so `datasets.load_from_disk` works), `tokenizer/` and `manifest.json` last.

>>> path = build_shards(tmp / "shards", n_examples=64, max_len=256)   # doctest: +SKIP
>>> sorted(p.name for p in path.iterdir())[:2]                       # doctest: +SKIP
['data-00000-of-00002.arrow', 'data-00001-of-00002.arrow']
"""

from __future__ import annotations

import bisect
import hashlib
import json
import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("PREP_SHARED_DATA", REPO.parent / "shared" / "data"))
ALPACA_EN = SHARED_DATA / "alpaca" / "alpaca_en_demo.json"
TOKENIZERS = SHARED_DATA / "tokenizers"
MARKERS = ["###instruction###", "###response###"]
LIST_INT32 = pa.list_(pa.int32())


def byte_tokenizer():
    """A byte-level tokenizer of 257 tokens (256 bytes + <|endoftext|>): fast tiny-model tests on real text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<|endoftext|>": 0, **{c: i + 1 for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    eos = "<|endoftext|>"
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=eos, eos_token=eos, pad_token=eos, unk_token=eos)


def load_tokenizer(name: str = "smollm2-135m", markers: bool = False):
    """A real local tokenizer (no download) or "bytes", optionally with the two marker tokens added."""
    from transformers import AutoTokenizer

    tokenizer = byte_tokenizer() if name == "bytes" else AutoTokenizer.from_pretrained(TOKENIZERS / name)
    if markers:
        tokenizer.add_tokens(MARKERS, special_tokens=True)
    return tokenizer


def alpaca_pairs(n: int, path: Path | list[Path] = ALPACA_EN) -> list[tuple[str, str]]:
    """The first `n` Alpaca records of the file(s) as (prompt, completion) text pairs, in the markers template."""
    records = [
        r for p in ([path] if isinstance(path, Path) else path) for r in json.loads(p.read_text(encoding="utf-8"))
    ][:n]
    pairs = []
    for r in records:
        user = r["instruction"] + (f"\n\n{r['input']}" if r.get("input") else "")
        pairs.append((f"{MARKERS[0]}\n{user}\n{MARKERS[1]}\n", r.get("output", r.get("response", ""))))
    return pairs


def encode_pairs(tokenizer, pairs: list[tuple[str, str]], max_len: int) -> list[tuple[list[int], list[int]]]:
    """Tokenize (prompt, completion) pairs into (input_ids, labels); prompt labels are -100; truncate to max_len."""
    prompts = tokenizer([p for p, _ in pairs], add_special_tokens=False)["input_ids"]
    completions = tokenizer([c for _, c in pairs], add_special_tokens=False)["input_ids"]
    eos = [tokenizer.eos_token_id]
    examples = []
    for p, c in zip(prompts, completions):
        ids = (p + c + eos)[:max_len]
        labels = ([-100] * len(p) + c + eos)[:max_len]
        labels[0] = -100  # contract: no example learns its first token
        examples.append((ids, labels))
    return examples


def pack_best_fit(lengths: list[int], max_len: int) -> list[list[int]]:
    """Best-fit decreasing: indices of examples per row, each row's total length <= max_len."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    free: list[tuple[int, int]] = []  # sorted (space left, row id)
    rows: list[list[int]] = []
    for i in order:
        k = bisect.bisect_left(free, (lengths[i], -1))
        if k == len(free):
            rows.append([i])
            bisect.insort(free, (max_len - lengths[i], len(rows) - 1))
        else:
            space, row = free.pop(k)
            rows[row].append(i)
            bisect.insort(free, (space - lengths[i], row))
    return rows


def rows_table(examples: list[tuple[list[int], list[int]]], rows: list[list[int]], packed: bool) -> pa.Table:
    """A shard table (contract columns, all list<int32>) from examples grouped into rows."""
    cols: dict[str, list] = {"input_ids": [], "labels": [], "position_ids": [], "seq_lengths": []}
    for row in rows:
        cols["input_ids"].append([t for i in row for t in examples[i][0]])
        cols["labels"].append([t for i in row for t in examples[i][1]])
        cols["position_ids"].append([p for i in row for p in range(len(examples[i][0]))])
        cols["seq_lengths"].append([len(examples[i][0]) for i in row])
    if not packed:
        cols["attention_mask"] = [[1] * len(ids) for ids in cols["input_ids"]]
    return pa.table({k: pa.array(v, type=LIST_INT32) for k, v in cols.items()})


def write_stream(table: pa.Table, path: Path) -> str:
    """Write `table` as one Arrow IPC stream file; return its sha256."""
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table, max_chunksize=64)
    return hashlib.sha256(path.read_bytes()).hexdigest()


def datasets_metadata(columns: list[str], files: list[str], fingerprint: str) -> tuple[dict, dict]:
    """dataset_info.json and state.json in the form `datasets.save_to_disk` writes them."""
    feature = {"feature": {"dtype": "int32", "_type": "Value"}, "_type": "List"}
    info = {"citation": "", "description": "", "features": {c: feature for c in columns}, "homepage": "", "license": ""}
    state = {
        "_data_files": [{"filename": f} for f in files],
        "_fingerprint": fingerprint[:16],
        "_format_columns": None,
        "_format_kwargs": {},
        "_format_type": None,
        "_output_all_columns": False,
        "_split": None,
    }
    return info, state


def build_shards(
    out: Path,
    n_examples: int = 200,
    max_len: int = 256,
    num_shards: int = 2,
    packed: bool = True,
    tokenizer_name: str = "smollm2-135m",
    markers: bool = False,
    data: Path | list[Path] = ALPACA_EN,
) -> Path:
    """Tokenize the first `n_examples` Alpaca records and write a contract-conforming shard folder at `out`."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = load_tokenizer(tokenizer_name, markers)
    examples = encode_pairs(tokenizer, alpaca_pairs(n_examples, data), max_len)
    lengths = [len(ids) for ids, _ in examples]
    rows = pack_best_fit(lengths, max_len) if packed else [[i] for i in range(len(examples))]
    table = rows_table(examples, rows, packed)
    bounds = np.linspace(0, table.num_rows, num_shards + 1).astype(int)
    fingerprint = hashlib.sha256(
        f"{data}:{n_examples}:{max_len}:{packed}:{tokenizer_name}:{markers}".encode()
    ).hexdigest()
    shard_entries = []
    for k in range(num_shards):
        name = f"data-{k:05d}-of-{num_shards:05d}.arrow"
        part = table.slice(bounds[k], bounds[k + 1] - bounds[k])
        sha = write_stream(part, out / name)
        tokens = sum(len(x) for x in part.column("input_ids").to_pylist())
        shard_entries.append({"file": name, "rows": part.num_rows, "tokens": tokens, "sha256": sha})
    info, state = datasets_metadata(table.column_names, [s["file"] for s in shard_entries], fingerprint)
    (out / "dataset_info.json").write_text(json.dumps(info, indent=2))
    (out / "state.json").write_text(json.dumps(state, indent=2))
    tokenizer.save_pretrained(out / "tokenizer")
    trained = sum(sum(1 for t in lab if t != -100) for _, lab in examples)
    manifest = {
        "format": "prep-shards",
        "format_version": 1,
        "prep_version": "0.1.0",
        "fingerprint": fingerprint,
        "packed": packed,
        "max_len": max_len,
        "pack_strategy": "bfd" if packed else None,
        "seed": 0,
        "template": {"name": "markers", "sha256": "0" * 64},
        "train_on": "completion",
        "overflow": "truncate",
        "tokenizer": {
            "name": tokenizer_name,
            "fingerprint": "0" * 64,
            "path": "tokenizer",
            "vocab_size": len(tokenizer),
            "added_tokens": MARKERS if markers else [],
            "resize_embeddings": markers,
            "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
        },
        "inputs": [
            {"path": p.name, "sha256": "0" * 64, "bytes": p.stat().st_size}
            for p in ([data] if isinstance(data, Path) else data)
        ],
        "columns": table.column_names,
        "counts": {
            "conversations": len(examples),
            "examples": len(examples),
            "rows": table.num_rows,
            "tokens": sum(lengths),
            "trained_tokens": trained,
            "truncated": 0,
            "dropped": 0,
            "split": 0,
            "rejected": {},
        },
        "packing": {
            "efficiency": sum(lengths) / (table.num_rows * max_len),
            "lower_bound_rows": -(-sum(lengths) // max_len),
            "rows": table.num_rows,
        },
        "shards": shard_entries,
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return out


@pytest.fixture(autouse=True, scope="module")
def single_thread():
    """Tiny models on a shared 2-core machine: one torch thread avoids oversubscription (25x faster under load)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
