"""The shard contract (docs/contract.md) in one place: format and file names, columns, the manifest check.

Standard library only: `prep.load` and `prep.train` import it on machines without pydantic or datasets. Every
other module imports these facts from here rather than restating them. (The option vocabularies, train-on,
overflow and expand-turns, and the bounds of max_len are declared once in schemas/pack_config.py.)

>>> check_manifest({"format": FORMAT, "format_version": FORMAT_VERSION})
"missing keys ['max_len', 'packed', 'tokenizer', 'columns', 'shards', 'counts']"
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

FORMAT = "prep-shards"
FORMAT_VERSION = 1
SPLITS_FORMAT = "prep-shards-splits"  # the top-level manifest of a folder holding train/ and validation/
SPLITS_FILE = "dataset_dict.json"  # marks a folder of split shard folders (what datasets.load_from_disk reads)
MANIFEST = "manifest.json"  # written last: its presence means the folder is complete
REJECTS_FILE = "rejects.jsonl"  # beside the manifest: every rejected record or example, one JSON line each
SPLITS = ("train", "validation")  # the split folders of an output packed with a validation split
IGNORE_INDEX = -100  # the label of a token without a loss (PyTorch cross-entropy and HF convention)

PACKED_COLUMNS = ("input_ids", "labels", "position_ids", "seq_lengths")
UNPACKED_COLUMNS = (*PACKED_COLUMNS, "attention_mask")
UNPADDED_COLUMN = "seq_lengths_unpadded"  # the real example lengths, present with --pad-to-multiple-of N > 1
REQUIRED_KEYS = ("max_len", "packed", "tokenizer", "columns", "shards", "counts")
WRITER_KEYS = tuple(k for k in REQUIRED_KEYS if k != "tokenizer")  # the tokenizer entry comes from write's caller


def shard_columns(packed: bool, padded: bool = False) -> tuple[str, ...]:
    """The columns of shard rows, in order: packed rows, or one example per row with attention_mask.

    >>> shard_columns(True, padded=True)
    ('input_ids', 'labels', 'position_ids', 'seq_lengths', 'seq_lengths_unpadded')
    """
    return (*(PACKED_COLUMNS if packed else UNPACKED_COLUMNS), *((UNPADDED_COLUMN,) if padded else ()))


def packing_figures(tokens: int, rows: int, max_len: int) -> dict[str, Any]:
    """The manifest's `packing`: efficiency = tokens / (rows * max_len), the row lower bound ceil(tokens / max_len).

    >>> packing_figures(1000, 3, 512)
    {'efficiency': 0.651042, 'lower_bound_rows': 2, 'rows': 3}
    """
    efficiency = round(tokens / (rows * max_len), 6) if rows else 0.0
    return {"efficiency": efficiency, "lower_bound_rows": -(-tokens // max_len), "rows": rows}


def is_plain_name(name: Any) -> bool:
    """A bare file name (a string without separators, not `.`/`..`): what a manifest may name.

    >>> is_plain_name("example_templates.arrow"), is_plain_name("../x.arrow")
    (True, False)
    """
    return isinstance(name, str) and name not in ("", ".", "..") and "/" not in name and "\\" not in name


def check_manifest(manifest: Any, required: Sequence[str] = REQUIRED_KEYS) -> str | None:
    """What is wrong with a shard folder's manifest (format, version, required keys, columns, file names), or None.

    The one check that reading (`prep.load`), verifying (`prep.verify`) and writing (`prep.write`) share; it
    looks at the manifest alone, so the callers check files on disk themselves and name the manifest's path.
    `prep.write.write_shards` passes `required=WRITER_KEYS`: its caller (`prep pack`) adds the tokenizer entry.

    >>> check_manifest({"format": "other"})
    "format is 'other', expected 'prep-shards': not a prep shard folder"
    """
    if not isinstance(manifest, Mapping):
        return f"holds a JSON {type(manifest).__name__}, expected an object: not a prep shard folder"
    if manifest.get("format") != FORMAT:
        return f"format is {manifest.get('format')!r}, expected {FORMAT!r}: not a prep shard folder"
    if manifest.get("format_version") != FORMAT_VERSION:
        return (f"format_version {manifest.get('format_version')!r}, this prep reads {FORMAT_VERSION}: "
                "rewrite the shards with this version of `prep pack`")
    missing = [key for key in required if key not in manifest]
    if missing:
        return f"missing keys {missing}"
    columns, shards, tokenizer = manifest["columns"], manifest["shards"], manifest.get("tokenizer", {})
    if not isinstance(columns, list) or any(c not in columns for c in PACKED_COLUMNS):
        lacking = [c for c in PACKED_COLUMNS if not isinstance(columns, list) or c not in columns]
        return f"columns {columns} lack {lacking}; expected {list(PACKED_COLUMNS)}"
    if not isinstance(shards, list) or not shards:
        return "lists no shard files"
    if not all(isinstance(e, Mapping) and isinstance(e.get("file"), str) for e in shards):
        return "every entry of `shards` needs a `file` name"
    if not isinstance(tokenizer, Mapping):
        return "`tokenizer` is not an object"
    for name in [e["file"] for e in shards] + [tokenizer.get("path", "tokenizer")]:
        if not is_plain_name(name):
            return f"{name!r} is not a plain file name inside the shard folder; refusing to read it"
    return None
