"""Real packed shards for tests, built with prep's own stages (a test helper, not part of `prep`).

Alpaca records (../shared/data) → Conversations (user = instruction [+ "\\n\\n" + input], assistant =
output) → `prep.encode.Encoder` → `prep.spill.ExampleStore` → `prep.pack.plan_bfd` + `shuffle_rows` →
`prep.write.write_shards`, with the tokenizer saved in `tokenizer/` and described in the manifest.
Folders are built once per process and cached: copy one (`copy_packed`) before changing it.

>>> path = packed_shards(n=200, max_len=256)       # doctest: +SKIP
>>> json.loads((path / "manifest.json").read_text())["counts"]["rows"] > 0   # doctest: +SKIP
True
"""

from __future__ import annotations

import atexit
import json
import os
import shutil
import tempfile
from functools import lru_cache
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from schemas.conversation import Conversation, Message, SourceRef  # noqa: E402

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
ALPACA_EN = DATA / "alpaca" / "alpaca_en_demo.json"
TOKENIZERS = DATA / "tokenizers"
_ROOT = Path(tempfile.mkdtemp(prefix="prep-test-packed-"))
atexit.register(shutil.rmtree, _ROOT, ignore_errors=True)


def alpaca_conversations(n: int = 200, path: Path = ALPACA_EN) -> list[Conversation]:
    """The first `n` Alpaca records as single-turn Conversations."""
    records = json.loads(path.read_text(encoding="utf-8"))[:n]
    out = []
    for row, r in enumerate(records):
        user = r["instruction"] + (f"\n\n{r['input']}" if r.get("input") else "")
        messages = [Message(role="user", content=user), Message(role="assistant", content=r["output"])]
        out.append(
            Conversation(
                id=f"alpaca-{row}", messages=messages, source=SourceRef(path=str(path), line=row, format="alpaca")
            )
        )
    return out


@lru_cache(maxsize=None)
def tokenizer(name: str = "smollm2-135m"):
    """A real local tokenizer from ../shared/data/tokenizers (or the embedded demo one for "default")."""
    from prep.tokenizer import load_tokenizer

    return load_tokenizer(None if name == "default" else str(TOKENIZERS / name))


@lru_cache(maxsize=None)
def packed_shards(
    n: int = 200,
    max_len: int = 256,
    tokenizer_name: str = "smollm2-135m",
    template: str = "markers",
    overflow: str = "truncate",
    shard_size: str = "40KB",
    packed: bool = True,
) -> Path:
    """A shard folder built from the first `n` Alpaca records (cached; do not modify it, copy it)."""
    out = _ROOT / f"shards-{n}-{max_len}-{tokenizer_name}-{template}-{overflow}-{shard_size}-{packed}"
    build_packed(
        out,
        n=n,
        max_len=max_len,
        tokenizer_name=tokenizer_name,
        template=template,
        overflow=overflow,
        shard_size=shard_size,
        packed=packed,
    )
    return out


def copy_packed(dest: Path, **kwargs) -> Path:
    """A private, modifiable copy of `packed_shards(**kwargs)` at `dest`."""
    shutil.copytree(packed_shards(**kwargs), dest)
    return dest


def build_packed(
    out: Path,
    *,
    n: int = 200,
    max_len: int = 256,
    tokenizer_name: str = "smollm2-135m",
    template: str = "markers",
    overflow: str = "truncate",
    shard_size: str = "40KB",
    packed: bool = True,
) -> dict:
    """Encode, pack and write shards at `out` with prep's stages; return the manifest."""
    from prep.encode import Encoder
    from prep.pack import plan_bfd, plan_unpacked, shuffle_rows
    from prep.render import load_template, template_sha256
    from prep.spill import ExampleStore
    from prep.tokenizer import tokenizer_fingerprint
    from prep.write import sha256_file, write_shards

    tok = tokenizer(tokenizer_name)
    tmpl = load_template(template, tok)
    result = Encoder(tok, tmpl, train_on="completion", max_len=max_len, overflow=overflow).encode(
        alpaca_conversations(n)
    )
    extra = {
        "fingerprint": f"test-{out.name}",
        "template": {"name": tmpl.name, "sha256": template_sha256(tmpl)},
        "train_on": "completion",
        "overflow": overflow,
        "tokenizer": _tokenizer_entry(tok, tokenizer_name, tokenizer_fingerprint(tok)),
        "inputs": [{"path": ALPACA_EN.name, "sha256": sha256_file(ALPACA_EN), "bytes": ALPACA_EN.stat().st_size}],
        "counts": {k: result.counts[k] for k in ("conversations", "truncated", "dropped")}
        | {"split": result.counts["extra_pieces"], "rejected": dict(result.rejected)},
    }
    with ExampleStore(parent=out.parent) as store:
        store.append(result.table)
        plan = shuffle_rows(plan_bfd(store.lengths, max_len), 0) if packed else plan_unpacked(len(store), 0)
        return write_shards(
            store,
            plan,
            out,
            max_len=max_len,
            seed=0,
            shard_size=shard_size,
            manifest_extra=extra,
            before_commit=lambda d: tok.save_pretrained(d / "tokenizer"),
        )


def _tokenizer_entry(tok, name: str, fingerprint: str) -> dict:
    """The manifest's `tokenizer` section (docs/contract.md)."""
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    return {
        "name": name,
        "fingerprint": fingerprint,
        "path": "tokenizer",
        "vocab_size": len(tok),
        "added_tokens": [],
        "resize_embeddings": False,
        "bos_token_id": tok.bos_token_id,
        "eos_token_id": tok.eos_token_id,
        "pad_token_id": pad,
    }


def build_synthetic(
    out: Path, n_tokens: int = 10_000_000, max_len: int = 2048, seed: int = 0, shard_size: str = "256MB"
) -> dict:
    """Valid packed shards of random examples (the embedded 267-token tokenizer), `n_tokens` in all, for speed tests.

    Examples are 16..max_len tokens of random bytes; the first half of each is masked, the rest trained.
    """
    import numpy as np
    import pyarrow as pa

    from prep.pack import plan_bfd, shuffle_rows
    from prep.spill import ExampleStore
    from prep.tokenizer import tokenizer_fingerprint
    from prep.write import write_shards

    rng = np.random.default_rng(seed)
    tok = tokenizer("default")
    with ExampleStore(parent=Path(out).parent) as store:
        left = n_tokens
        while left > 0:
            lengths = np.minimum(rng.integers(16, max_len + 1, size=4096), max_len)
            lengths = lengths[np.cumsum(lengths) <= left] if lengths.sum() > left else lengths
            if not len(lengths):
                lengths = np.array([max(left, 1)])
            offsets = np.concatenate(([0], np.cumsum(lengths))).astype(np.int32)
            ids = rng.integers(0, 256, size=int(offsets[-1]), dtype=np.int32)
            position = np.arange(len(ids)) - np.repeat(offsets[:-1], lengths)
            labels = np.where(position >= np.repeat(lengths // 2, lengths), ids, -100).astype(np.int32)
            labels[offsets[:-1]] = -100
            store.append(
                pa.table(
                    {
                        "input_ids": pa.ListArray.from_arrays(offsets, ids),
                        "labels": pa.ListArray.from_arrays(offsets, labels),
                    }
                )
            )
            left -= int(lengths.sum())
        plan = shuffle_rows(plan_bfd(store.lengths, max_len), seed)
        extra = {"tokenizer": _tokenizer_entry(tok, "default", tokenizer_fingerprint(tok))}
        return write_shards(
            store,
            plan,
            out,
            max_len=max_len,
            seed=seed,
            shard_size=shard_size,
            manifest_extra=extra,
            before_commit=lambda d: tok.save_pretrained(d / "tokenizer"),
        )
