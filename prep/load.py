"""Read prep shards: memory-mapped Arrow tables, a rank-aware torch Dataset, and a collator for packed rows.

Imports only torch, pyarrow, numpy and the stdlib: the GPU machines have no pydantic and no datasets.
A shard folder URL (`s3://bucket/shards`) is read from a checked local copy (prep.remote.local_shards); fsspec
and the store's package are imported only then.

Packed rows hold several whole examples. The model must not let one example attend to another, so
`packed_attention_kwargs` turns each batch's `position_ids` (which restart at 0 at every example) into the
boundaries the attention path takes: a 4D block-diagonal causal mask for sdpa/eager, a block-sparse
BlockMask for flex_attention, `cu_seq_lens` for flash-attention varlen kernels.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from prep.contract import (
    IGNORE_INDEX,
    PACKED_COLUMNS,
    SPLITS_FILE,
    UNPADDED_COLUMN,
    check_manifest,
)
from prep.errors import ConfigError, ShardError
from prep.remote import is_url

LIST_INT32 = pa.list_(pa.int32())
MASK_PATHS = ("sdpa", "eager")  # take an explicit 4D block-diagonal causal mask
FLEX_PATHS = ("flex_attention",)  # take a BlockMask: masked-out blocks are skipped, not computed
VARLEN_PATHS = ("flash_attention_2", "flash_attention_3")  # take cu_seq_lens on a padding-free batch
ISOLATED_PATHS = MASK_PATHS + FLEX_PATHS + VARLEN_PATHS  # every path prep can keep packed examples apart on


@dataclass(frozen=True)
class Shards:
    """An opened shard folder: the manifest (plain dict), one memory-mapped table, and where the tokenizer is."""

    path: Path
    manifest: dict[str, Any]
    table: pa.Table

    @property
    def tokenizer_path(self) -> Path:
        """Folder to pass to `AutoTokenizer.from_pretrained`."""
        return self.path / self.manifest["tokenizer"].get("path", "tokenizer")

    @property
    def max_len(self) -> int:
        """The longest row the shards may hold (the collator pads to this)."""
        return int(self.manifest["max_len"])

    @property
    def pad_token_id(self) -> int:
        """Pad id from the manifest, falling back to eos, then 0."""
        tok = self.manifest["tokenizer"]
        for key in ("pad_token_id", "eos_token_id"):
            if tok.get(key) is not None:
                return int(tok[key])
        return 0

    @property
    def num_rows(self) -> int:
        """Rows over all shards."""
        return self.table.num_rows


def read_manifest(path: str | Path) -> dict[str, Any]:
    """Read and check `manifest.json` of a shard folder (format, version, columns, shard files present).

    Args:
        path: the shard folder.
    Returns:
        The manifest as a plain dict.
    Raises:
        ShardError: missing/unreadable manifest, wrong format or version, missing columns or shard files.

    >>> read_manifest("shards/")["format"]  # doctest: +SKIP
    'prep-shards'
    """
    path = Path(path)
    file = path / "manifest.json"
    if not file.is_file():
        hint = (
            "the writer did not finish (manifest.json is written last); rerun `prep pack`"
            if path.is_dir()
            else "no such folder"
        )
        raise ShardError(f"{file}: not found: {hint}")
    try:
        manifest = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ShardError(f"{file}: unreadable JSON: {e}") from e
    problem = check_manifest(manifest)
    if problem:
        raise ShardError(f"{file}: {problem}")
    for entry in manifest["shards"]:
        if not (file.parent / entry["file"]).is_file():
            raise ShardError(f"{file.parent / entry['file']}: listed in manifest.json but missing")
    return manifest


def _open_shard(file: Path, rows: int) -> pa.Table:
    """Memory-map one Arrow IPC stream file as a table without copying its buffers."""
    try:
        # The table's buffers point into the map, so the map must stay open as long as the table lives.
        table = pa.ipc.open_stream(pa.memory_map(str(file), "r")).read_all()
    except (pa.ArrowInvalid, OSError) as e:
        raise ShardError(
            f"{file}: not a readable Arrow IPC stream ({e}); run `prep verify` or rewrite the shards"
        ) from e
    if table.num_rows != rows:
        raise ShardError(f"{file}: {table.num_rows} rows, manifest.json says {rows}: the folder mixes two runs")
    return table


def _check_columns(file: Path, table: pa.Table, expected: Sequence[str]) -> None:
    """Every expected column is present, list<int32>, and null-free."""
    for name in expected:
        if name not in table.column_names:
            raise ShardError(f"{file}: column {name!r} missing (has {table.column_names})")
        col = table.column(name)
        if col.type != LIST_INT32:
            raise ShardError(f"{file}: column {name!r} is {col.type}, expected list<int32>")
        if col.null_count:
            raise ShardError(f"{file}: column {name!r} has {col.null_count} null rows")


def split_names(path: str | Path) -> list[str]:
    """The splits of a folder written with a validation split (`["train", "validation"]`), else [].

    >>> split_names("shards/")  # doctest: +SKIP
    ['train', 'validation']
    """
    file = Path(_local(path)) / SPLITS_FILE
    if not file.is_file():
        return []
    try:
        return list(json.loads(file.read_text(encoding="utf-8"))["splits"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ShardError(f"{file}: unreadable split list: {e}") from e


def split_path(path: str | Path, split: str = "train") -> Path | str:
    """The shard folder of `split`: `path/split` in a split folder; `path` itself for "train" otherwise.
    A URL gives a URL (its copy is fetched by `load_shards`).

    Raises:
        ShardError: the folder has no such split.
    """
    names = split_names(path)
    if split in names:
        return f"{str(path).rstrip('/')}/{split}" if is_url(path) else Path(path) / split
    if not names and split == "train":
        return path if is_url(path) else Path(path)
    raise ShardError(f"{path}: no {split!r} split (has {names or ['train']}); pack with --val-fraction or --val-size")


def _local(path: str | Path) -> str | Path:
    """The folder itself, or for a URL its fetched, checked local copy."""
    if is_url(path):
        from prep.remote import local_shards

        return local_shards(str(path))
    return path


def load_shards(path: str | Path, split: str = "train") -> Shards:
    """Open a shard folder: validate the manifest, memory-map every shard, check column names and types.

    Opening costs O(number of files + record batches), not O(data): no buffer is copied into memory,
    and sha256 checks are left to `prep verify`. A folder packed with a validation split holds `train/`
    and `validation/`; `split` picks one (the train split by default).

    Args:
        path: folder written by `prep pack`, or its URL (fetched once into a local cache, checked against the
            manifest's sha256, memory-mapped from there).
        split: "train" or "validation".
    Returns:
        Shards(path, manifest, table) with one zero-copy table over all shard files, in manifest order.
    Raises:
        ShardError: see `read_manifest`; also unreadable files, row counts or column types that disagree,
            or a split the folder does not have.

    >>> shards = load_shards("shards/")          # doctest: +SKIP
    >>> shards.table.column_names[:2], shards.max_len  # doctest: +SKIP
    (['input_ids', 'labels'], 2048)
    """
    path = Path(_local(split_path(path, split)))
    manifest = read_manifest(path)
    tables = []
    for entry in manifest["shards"]:
        file = path / entry["file"]
        table = _open_shard(file, int(entry["rows"]))
        _check_columns(file, table, manifest["columns"])
        tables.append(table)
    try:
        table = pa.concat_tables(tables)
    except pa.ArrowInvalid as e:
        raise ShardError(f"{path}: shard files have different schemas: {e}") from e
    return Shards(path=path, manifest=manifest, table=table)


class _ListColumn:
    """Row access into a chunked list<int32> column through zero-copy numpy views of offsets and values."""

    def __init__(self, column: pa.ChunkedArray):
        self.starts = np.cumsum([0] + [len(c) for c in column.chunks])
        self.offsets = [c.offsets.to_numpy() for c in column.chunks]
        self.values = [c.values.to_numpy() for c in column.chunks]

    def __getitem__(self, row: int) -> np.ndarray:
        k = int(np.searchsorted(self.starts, row, side="right")) - 1
        i = row - self.starts[k]
        return self.values[k][self.offsets[k][i] : self.offsets[k][i + 1]]


class PackedDataset(torch.utils.data.Dataset):
    """Rows of a shard folder as a map-style torch Dataset, shuffled per epoch and split across ranks.

    Every epoch is a fresh permutation of all rows seeded by (seed, epoch), identical on every rank; rank r
    takes positions r, r + world_size, ... of it, so ranks see disjoint rows and the same number of them
    (the last `num_rows % world_size` rows of each epoch's permutation are skipped that epoch).
    Call `set_epoch(e)` before each epoch, as with DistributedSampler.

    Items are dicts of int64 tensors: input_ids, labels, position_ids, seq_lengths.

    >>> ds = PackedDataset(load_shards("shards/"), rank=0, world_size=2, seed=0)  # doctest: +SKIP
    >>> ds.set_epoch(1); sorted(ds[0])  # doctest: +SKIP
    ['input_ids', 'labels', 'position_ids', 'seq_lengths']
    """

    def __init__(self, shards: Shards, rank: int = 0, world_size: int = 1, seed: int = 0, shuffle: bool = True):
        if not 0 <= rank < world_size:
            raise ConfigError(f"rank {rank} is outside 0..{world_size - 1}")
        if shards.num_rows < world_size:
            raise ShardError(f"{shards.path}: {shards.num_rows} rows cannot feed {world_size} ranks: pack more data")
        self.shards, self.rank, self.world_size, self.seed, self.shuffle = shards, rank, world_size, seed, shuffle
        self.columns = {name: _ListColumn(shards.table.column(name)) for name in _row_columns(shards)}
        self.set_epoch(0)

    def set_epoch(self, epoch: int) -> None:
        """Select the row order for `epoch` (deterministic in seed and epoch)."""
        n = self.shards.num_rows
        order = np.random.default_rng([self.seed, epoch]).permutation(n) if self.shuffle else np.arange(n)
        per_rank = n // self.world_size
        self.epoch = epoch
        self.rows = order[self.rank : per_rank * self.world_size : self.world_size]

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        row = int(self.rows[index])
        return {name: torch.from_numpy(col[row].astype(np.int64)) for name, col in self.columns.items()}


def block_causal_mask(
    position_ids: torch.Tensor, dtype: torch.dtype = torch.bool, window: int | None = None
) -> torch.Tensor:
    """A (batch, 1, len, len) causal mask that is block-diagonal over the examples of each row.

    An example starts wherever position_ids is 0, so padding built as its own 0..k run is its own block.
    bool (True = attend) for sdpa; for eager pass a float dtype: 0 where allowed, dtype min elsewhere
    (eager adds the mask to the scores, so a bool mask would be silently wrong there). With a sliding
    `window`, a token also sees only the `window` latest tokens (itself included), as transformers does.

    >>> block_causal_mask(torch.tensor([[0, 1, 0]]))[0, 0].int().tolist()
    [[1, 0, 0], [1, 1, 0], [0, 0, 1]]
    >>> block_causal_mask(torch.tensor([[0, 1, 2]]), window=2)[0, 0].int().tolist()
    [[1, 0, 0], [1, 1, 0], [0, 1, 1]]
    """
    doc = example_index(position_ids)
    same_doc = doc[:, :, None] == doc[:, None, :]
    idx = torch.arange(position_ids.shape[1], device=position_ids.device)
    distance = idx[None, :, None] - idx[None, None, :]  # query index - key index
    allowed = distance >= 0 if window is None else (distance >= 0) & (distance < window)
    mask = (same_doc & allowed)[:, None]
    if dtype == torch.bool:
        return mask
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask, torch.finfo(dtype).min)


def _row_columns(shards: Shards) -> tuple[str, ...]:
    """The columns a row item carries: the shard columns, plus seq_lengths_unpadded when the shards are padded."""
    return PACKED_COLUMNS + ((UNPADDED_COLUMN,) if UNPADDED_COLUMN in shards.table.column_names else ())


def cu_seqlens_pair(seq_lengths: torch.Tensor, seq_lengths_unpadded: torch.Tensor | None = None):
    """(cu_seqlens, cu_seqlens_padded), int32, of examples laid out one after another (a THD batch).

    Transformer Engine's naming: `cu_seqlens` are the cumulative real lengths, `cu_seqlens_padded` the
    cumulative lengths as laid out (with `--pad-to-multiple-of` padding). Shards store `seq_lengths`
    (laid out) and, when padded, `seq_lengths_unpadded`; without padding both results are equal.

    >>> [c.tolist() for c in cu_seqlens_pair(torch.tensor([4, 8]), torch.tensor([3, 5]))]
    [[0, 3, 8], [0, 4, 12]]
    """
    real = seq_lengths if seq_lengths_unpadded is None else seq_lengths_unpadded
    zero = torch.zeros(1, dtype=torch.int32, device=seq_lengths.device)
    return tuple(torch.cat([zero, torch.cumsum(x, 0).to(torch.int32)]) for x in (real, seq_lengths))


def example_index(position_ids: torch.Tensor) -> torch.Tensor:
    """For every token, which example of its row it belongs to (examples start where position_ids is 0).

    >>> example_index(torch.tensor([[0, 1, 0, 1, 2]])).tolist()
    [[1, 1, 2, 2, 2]]
    """
    return (position_ids == 0).cumsum(dim=1)


def block_mask(position_ids: torch.Tensor, window: int | None = None):
    """A flex-attention BlockMask, causal within each example of each row, built on position_ids' device.

    Unlike the dense 4D mask, its kernel skips the blocks between examples, so attention costs what the
    examples need rather than what the row length needs. `window` as in `block_causal_mask`. On CUDA the
    builder is compiled (once per shape), so no dense batch x len x len mask is materialised per micro-batch.

    >>> block_mask(torch.tensor([[0, 1, 2, 0, 1]])).mask_mod(0, 0, torch.tensor(3), torch.tensor(2)).item()
    False
    """
    doc = example_index(position_ids)

    def same_example_causal(b, h, q, k):
        allowed = (doc[b, q] == doc[b, k]) & (q >= k)
        return allowed if window is None else allowed & (q - k < window)

    batch, length = position_ids.shape
    build = _block_mask_builder(position_ids.device.type == "cuda")
    return build(same_example_causal, B=batch, H=None, Q_LEN=length, KV_LEN=length, device=position_ids.device)


_COMPILED_BLOCK_MASK: list = []  # torch.compile(create_block_mask), made on first use on CUDA


def _block_mask_builder(compiled: bool):
    """`create_block_mask`, compiled when asked (the way PyTorch recommends; uncompiled it builds a dense mask)."""
    from torch.nn.attention.flex_attention import create_block_mask

    if not compiled:
        return create_block_mask
    if not _COMPILED_BLOCK_MASK:
        _COMPILED_BLOCK_MASK.append(torch.compile(create_block_mask))
    return _COMPILED_BLOCK_MASK[0]


def cu_seq_lens(position_ids: torch.Tensor) -> torch.Tensor:
    """Cumulative example lengths of a flattened (1, total) batch, int32, for flash-attention varlen kernels.

    >>> cu_seq_lens(torch.tensor([[0, 1, 2, 0, 1, 0]])).tolist()
    [0, 3, 5, 6]
    """
    flat = position_ids.reshape(-1)
    starts = (flat == 0).nonzero().reshape(-1)
    end = torch.tensor([flat.numel()], device=flat.device)
    return torch.cat([starts, end]).to(torch.int32)


def _mask(position_ids: torch.Tensor, attn_implementation: str, dtype: torch.dtype, window: int | None) -> Any:
    """The block-diagonal mask in the form the path takes: BlockMask (flex), bool (sdpa) or additive (eager)."""
    if attn_implementation in FLEX_PATHS:
        check_flex_device(position_ids.device)
        return block_mask(position_ids, window)
    return block_causal_mask(position_ids, torch.bool if attn_implementation == "sdpa" else dtype, window)


FLEX_ON_CPU = (  # why, for the messages that refuse flex_attention off CUDA
    "PyTorch's compiled CPU flex_attention kernel returns wrong values on some CPUs (measured on AVX2 machines "
    "without AVX-512: errors near 1 or NaN for sequence lengths of 8 mod 16, torch 2.13) and has no backward; use "
    "sdpa on the CPU (the same block-diagonal mask as a dense tensor)"
)


def check_flex_device(device: torch.device | str) -> None:
    """Refuse flex_attention off CUDA (see FLEX_ON_CPU); ConfigError saying why and what to use instead.

    >>> check_flex_device("cuda:0")
    """
    if torch.device(device).type != "cuda":
        raise ConfigError(f"flex_attention runs only on CUDA: {FLEX_ON_CPU}")


ALL_LAYERS = "*"  # the key of `attention_windows` when every layer has the same window
WINDOWED_LAYER_TYPES = {"full_attention": False, "sliding_attention": True}  # transformers' names


def attention_windows(config: Any) -> dict[str, int | None]:
    """The attention window of each layer type of a transformers model config (None = full causal attention).

    With `layer_types` (Gemma 2/3, Qwen2 with use_sliding_window, GPT-OSS, ...): one entry per type,
    `sliding_window` for "sliding_attention". Without: `{"*": config.sliding_window}`, the window transformers
    applies to every layer (Mistral v0.1, Mixtral, Phi-3, Starcoder2; None for Llama).

    Raises:
        ConfigError: a layer type that is neither full nor sliding attention (e.g. recurrent or chunked layers),
            for which prep cannot pass packed-example boundaries.

    >>> attention_windows(type("Cfg", (), {"sliding_window": 2047})())
    {'*': 2047}
    """
    window = getattr(config, "sliding_window", None)
    layer_types = getattr(config, "layer_types", None)
    if not layer_types:
        return {ALL_LAYERS: window}
    unknown = sorted(set(layer_types) - set(WINDOWED_LAYER_TYPES))
    if unknown:
        raise ConfigError(
            f"the model has {unknown[0]!r} layers; prep keeps packed examples apart only on full and sliding-window "
            "attention layers, so it cannot train this model on packed rows"
        )
    return {t: window if WINDOWED_LAYER_TYPES[t] else None for t in dict.fromkeys(layer_types)}


def packed_attention_kwargs(
    position_ids: torch.Tensor,
    attn_implementation: str,
    dtype: torch.dtype = torch.float32,
    windows: Mapping[str, int | None] | None = None,
) -> dict[str, Any]:
    """Keyword arguments that keep packed examples apart on the given transformers attention path.

    sdpa/eager: `attention_mask` = 4D block-diagonal causal mask (bool for sdpa, additive `dtype` for eager).
    flex_attention: `attention_mask` = the same mask as a BlockMask (pass position_ids on the model's device).
    flash_attention_2/3: `cu_seq_lens_q/k` and `max_length_q/k`; needs a padding-free (1, total) batch.
    `windows` (from `attention_windows(model.config)`) adds the model's sliding windows to the masks: one mask
    for every layer, or a dict of masks by layer type when the types differ within the row length (transformers
    models with `layer_types` take such a dict). Flash kernels get their window from the model itself.

    Raises:
        ConfigError: another attention path (its isolation of packed examples is not guaranteed here),
            or a flash path with more than one row.

    >>> sorted(packed_attention_kwargs(torch.tensor([[0, 1, 0]]), "flash_attention_2"))
    ['cu_seq_lens_k', 'cu_seq_lens_q', 'max_length_k', 'max_length_q']
    """
    if attn_implementation in MASK_PATHS + FLEX_PATHS:
        length = position_ids.shape[1]
        effective = {t: w if w is not None and w < length else None for t, w in (windows or {ALL_LAYERS: None}).items()}
        if len(set(effective.values())) == 1:  # one mask serves every layer
            return {"attention_mask": _mask(position_ids, attn_implementation, dtype, next(iter(effective.values())))}
        return {"attention_mask": {t: _mask(position_ids, attn_implementation, dtype, w) for t, w in effective.items()}}
    if attn_implementation in VARLEN_PATHS:
        if position_ids.shape[0] != 1:
            raise ConfigError(
                f"{attn_implementation} keeps packed examples apart only on a padding-free (1, total) batch, got "
                f"{position_ids.shape[0]} rows: use Collator(..., padding_free=True)"
            )
        cu = cu_seq_lens(position_ids)
        longest = int((cu[1:] - cu[:-1]).max())
        return {"cu_seq_lens_q": cu, "cu_seq_lens_k": cu, "max_length_q": longest, "max_length_k": longest}
    raise ConfigError(
        f"attn_implementation {attn_implementation!r} cannot be given explicit packed-example boundaries, so "
        f"examples in a packed row could attend to each other; use one of {list(ISOLATED_PATHS)}"
    )


@dataclass(frozen=True)
class PackedAttention:
    """What keeps a model's packed examples apart: its attention path and the window of each layer type.

    >>> PackedAttention("sdpa").kwargs(torch.tensor([[0, 1, 0]]))["attention_mask"].shape
    torch.Size([1, 1, 3, 3])
    """

    implementation: str
    windows: Mapping[str, int | None] | None = None

    @classmethod
    def of(cls, model: Any) -> PackedAttention:
        """The spec of a transformers model (its `_attn_implementation` and `attention_windows`)."""
        return cls(model.config._attn_implementation, attention_windows(model.config))

    def kwargs(self, position_ids: torch.Tensor, dtype: torch.dtype = torch.float32) -> dict[str, Any]:
        """`packed_attention_kwargs` for this path and these windows."""
        return packed_attention_kwargs(position_ids, self.implementation, dtype, self.windows)


class Collator:
    """Collate shard rows into model inputs: input_ids, labels, position_ids (+ boundaries on request).

    Default (static shapes): every row is padded to `max_len`. The pad tail gets input_ids = pad_id,
    labels = -100 and position_ids 0..k-1, i.e. it is its own fake example, so under a block-diagonal mask
    pad tokens attend only to each other and no real token attends to them.
    pad_to_multiple_of=m: pad only to the batch's longest row rounded up to a multiple of m (at most max_len),
    as trainers with dynamic padding do; the trainer uses it for unpacked (one example per row) shards.
    padding_free=True: rows are concatenated into one (1, total) row, with cu_seq_lens_q/k and
    max_length_q/k for flash-attention varlen kernels.
    attn_implementation: if given, also add `packed_attention_kwargs` (e.g. the 4D mask for sdpa), so that
    `model(**batch)` is isolated as is (HF Trainer); leave it None to build masks on the device instead.
    windows: the model's sliding windows for those masks, `attention_windows(model.config)`.
    Labels at every example start (position 0) are set to -100, as the shard contract already requires.

    >>> c = Collator(max_len=4, pad_id=0)
    >>> c([{"input_ids": [5, 6, 7], "labels": [-100, 6, 7], "position_ids": [0, 1, 0]}])["position_ids"].tolist()
    [[0, 1, 0, 0]]
    """

    def __init__(
        self,
        max_len: int,
        pad_id: int,
        padding_free: bool = False,
        attn_implementation: str | None = None,
        windows: Mapping[str, int | None] | None = None,
        pad_to_multiple_of: int | None = None,
    ):
        if attn_implementation in FLEX_PATHS:
            raise ConfigError(
                "Collator(attn_implementation='flex_attention'): a BlockMask must be built on the model's device and "
                "trainers do not move it there; call packed_attention_kwargs(position_ids.to(device), "
                "'flex_attention') in the training step instead"
            )
        if pad_to_multiple_of is not None and pad_to_multiple_of < 1:
            raise ConfigError(f"Collator(pad_to_multiple_of={pad_to_multiple_of}): must be >= 1 (or None for max_len)")
        self.max_len, self.pad_id, self.padding_free = max_len, pad_id, padding_free
        self.attn_implementation, self.windows = attn_implementation, windows
        self.pad_to_multiple_of = pad_to_multiple_of

    def __call__(self, rows: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        ids, labels, pos = (
            [torch.as_tensor(r[k], dtype=torch.long) for r in rows] for k in ("input_ids", "labels", "position_ids")
        )
        too_long = [len(x) for x in ids if len(x) > self.max_len]
        if too_long:
            raise ShardError(f"row of {too_long[0]} tokens exceeds max_len {self.max_len}: pass the shards' max_len")
        if self.padding_free:
            batch = {
                "input_ids": torch.cat(ids)[None],
                "labels": torch.cat(labels)[None],
                "position_ids": torch.cat(pos)[None],
            }
        else:
            batch = {
                "input_ids": self._pad(ids, lambda n: torch.full((n,), self.pad_id)),
                "labels": self._pad(labels, lambda n: torch.full((n,), IGNORE_INDEX)),
                "position_ids": self._pad(pos, torch.arange),
            }
        batch["labels"][batch["position_ids"] == 0] = IGNORE_INDEX
        if self.padding_free:
            batch.update(packed_attention_kwargs(batch["position_ids"], "flash_attention_2"))
        if self.attn_implementation and not (self.padding_free and self.attn_implementation in VARLEN_PATHS):
            batch.update(packed_attention_kwargs(batch["position_ids"], self.attn_implementation, windows=self.windows))
        return batch

    def _pad(self, seqs: list[torch.Tensor], tail) -> torch.Tensor:
        """Stack `seqs` into (batch, padded length), filling each row's tail with `tail(n)`."""
        length = self.max_len
        if self.pad_to_multiple_of:
            m = self.pad_to_multiple_of
            length = min(self.max_len, -(-max(len(s) for s in seqs) // m) * m)
        return torch.stack([torch.cat([s, tail(length - len(s)).to(torch.long)]) for s in seqs])


def iter_rows(shards: Shards) -> Iterator[dict[str, np.ndarray]]:
    """Every row in file order as dict of zero-copy int32 numpy arrays (for inspection and tests)."""
    columns = {name: _ListColumn(shards.table.column(name)) for name in _row_columns(shards)}
    for row in range(shards.num_rows):
        yield {name: col[row] for name, col in columns.items()}
