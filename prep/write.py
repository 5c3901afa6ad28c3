"""Write planned rows as Arrow shards that `datasets.load_from_disk` opens as they are, atomically.

Layout (docs/contract.md): `data-0000i-of-0000n.arrow` (Arrow IPC stream, `huggingface` schema metadata),
`dataset_info.json`, `state.json`, anything `before_commit` adds (the tokenizer), and `manifest.json` last.
Everything is written into `.<name>.tmp-XXXX` next to the output and renamed into place at the end.
An output URL (`s3://bucket/shards`) is written into a local temporary folder instead and published by
prep.remote.upload_folder: uploaded under a temporary prefix, then copied into place with the manifest last.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import secrets
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa

from prep import __version__
from prep.contract import FORMAT, FORMAT_VERSION, MANIFEST, WRITER_KEYS, check_manifest
from prep.errors import ConfigError, OutputExistsError
from prep.example_templates import EXAMPLE_TEMPLATES_FILE, write_example_templates
from prep.remote import is_url
from prep.pack import PackPlan, build_rows, packing_stats, shard_schema
from prep.spill import ExampleStore

BATCH_ROWS = 1000  # rows per Arrow record batch, fixed so that output bytes never depend on timing (datasets uses 1000)
BATCH_TOKENS = 2**21  # ... and fewer when max_len is long: a record batch is built in memory, 4 columns at once
MAX_SHARD_BYTES = 2**31  # keeps every shard well inside int32 list offsets and mmap-friendly
_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}  # fmt: skip
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*$")


def parse_size(size: str | int, flag: str = "--shard-size") -> int:
    """Bytes in a size such as "256MB" (decimal KB/MB/GB/TB), "1GiB" (binary KiB/MiB/GiB/TiB) or "1048576".

    `flag` names the option in the error message.

    Raises:
        ConfigError: not a positive size with a known unit.

    >>> parse_size("256MB"), parse_size("1.5KiB"), parse_size(4096)
    (256000000, 1536, 4096)
    """
    match = _SIZE.match(str(size))
    unit = match.group(2).lower() if match else None
    if match is None or unit not in _UNITS or float(match.group(1)) * _UNITS[unit] < 1:
        raise ConfigError(
            f"invalid {flag} {size!r}: expected a positive number of bytes with an optional unit "
            "(B, KB, MB, GB, TB, KiB, MiB, GiB, TiB), e.g. 256MB"
        )
    return int(float(match.group(1)) * _UNITS[unit])


def sha256_file(path: str | Path, chunk_bytes: int = 1 << 22) -> str:
    """Hex sha256 of a file, read in chunks.

    >>> import tempfile, os; p = os.path.join(tempfile.mkdtemp(), "x"); _ = open(p, "wb").write(b"abc")
    >>> sha256_file(p)[:16]
    'ba7816bf8f01cfea'
    """
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk_bytes):
            digest.update(block)
    return digest.hexdigest()


def plan_shards(row_bytes: np.ndarray, target_bytes: int) -> np.ndarray:
    """Row boundaries cutting rows, in order, into ceil(total / target) shards of about equal bytes.

    Returns:
        int64 array [0, ..., n_rows]; shard i holds rows bounds[i]:bounds[i + 1]. No rows: [0, 0].

    >>> plan_shards(np.array([10, 10, 10, 10]), target_bytes=20).tolist()
    [0, 2, 4]
    """
    n_rows = len(row_bytes)
    if n_rows == 0:
        return np.zeros(2, dtype=np.int64)
    cum = np.cumsum(np.asarray(row_bytes, dtype=np.int64))
    total = int(cum[-1])
    n_shards = max(1, min(n_rows, -(-total // min(target_bytes, MAX_SHARD_BYTES))))
    goals = total * np.arange(1, n_shards, dtype=np.int64) // n_shards
    cuts = np.searchsorted(cum, goals, side="left") + 1
    return np.unique(np.concatenate(([0], cuts, [n_rows]))).astype(np.int64)


def estimate_row_bytes(plan: PackPlan, lengths: np.ndarray) -> np.ndarray:
    """Approximate Arrow bytes of each row: 4 bytes per token per token column, plus seq_lengths and offsets."""
    token_columns = 3 if plan.packed else 4
    row_columns = 2 if plan.padded else 1  # seq_lengths (and seq_lengths_unpadded)
    columns = token_columns + row_columns
    return plan.row_tokens(lengths) * 4 * token_columns + np.diff(plan.row_offsets) * 4 * row_columns + 4 * columns


def check_output(out_dir: str | Path, overwrite: bool) -> None:
    """Fail early when the output exists and may not, or must not, be replaced.

    Raises:
        OutputExistsError: it exists and `overwrite` is False, or it exists but is not a prep shards folder.
    """
    if is_url(os.fspath(out_dir)):
        from prep.remote import check_output_url

        check_output_url(os.fspath(out_dir), overwrite=overwrite, folder=True)
        return
    out_dir = Path(out_dir)
    if not out_dir.exists() and not out_dir.is_symlink():
        return
    if not overwrite:
        raise OutputExistsError(f"{out_dir} already exists; pass --overwrite to replace it")
    if not out_dir.is_dir() or (any(out_dir.iterdir()) and not (out_dir / "manifest.json").is_file()):
        raise OutputExistsError(
            f"{out_dir} exists and is not a prep shards folder (no manifest.json); "
            "refusing to replace it even with --overwrite: choose another output or remove it yourself"
        )


@contextlib.contextmanager
def staging_dir(out_dir: str | Path, *, overwrite: bool = False) -> Iterator[Path]:
    """Yield a fresh temporary folder next to `out_dir`; on success it replaces `out_dir` in one rename.

    On an exception the temporary folder is deleted and `out_dir` is left as it was. With `overwrite`,
    an existing output is moved aside only once the new one is complete, and deleted after the rename.

    Raises:
        OutputExistsError: see `check_output`.

    >>> import tempfile, os; out = os.path.join(tempfile.mkdtemp(), "shards")
    >>> with staging_dir(out) as tmp:
    ...     _ = (tmp / "manifest.json").write_text("{}")
    >>> sorted(os.listdir(out))
    ['manifest.json']
    """
    if is_url(os.fspath(out_dir)):
        from prep.remote import staged_folder

        with staged_folder(os.fspath(out_dir), overwrite=overwrite) as tmp:
            yield tmp
        return
    out_dir = Path(out_dir)
    check_output(out_dir, overwrite)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = _make_dir_beside(out_dir)
    try:
        yield tmp
        _commit(tmp, out_dir, overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _make_dir_beside(out_dir: Path) -> Path:
    """Create `.NAME.tmp-XXXXXXXX` beside `out_dir`, mode 0o777 less the process umask.

    Not `tempfile.mkdtemp`: its folders are owner-only (0o700), and this one becomes the output.
    """
    while True:
        tmp = out_dir.parent / f".{out_dir.name}.tmp-{secrets.token_hex(4)}"
        try:
            tmp.mkdir(0o777)
            return tmp
        except FileExistsError:
            continue


def _commit(tmp: Path, out_dir: Path, overwrite: bool) -> None:
    """Rename the finished folder into place, moving any old output aside first (a folder cannot be replaced)."""
    check_output(out_dir, overwrite)  # the output may have appeared while we were writing
    old = None
    if out_dir.exists() or out_dir.is_symlink():
        old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-", dir=out_dir.parent))
        os.replace(out_dir, old / "shards")
    try:
        os.replace(tmp, out_dir)
    except BaseException:
        if old is not None:
            os.replace(old / "shards", out_dir)
        raise
    _fsync_dir(out_dir.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def write_shards(
    store: ExampleStore,
    plan: PackPlan,
    out_dir: str | Path,
    *,
    max_len: int,
    seed: int,
    shard_size: str | int = "256MB",
    manifest_extra: dict | None = None,
    overwrite: bool = False,
    before_commit: Callable[[Path], None] | None = None,
    example_templates: bool = False,
) -> dict:
    """Write the planned rows as shards + datasets files + manifest into `out_dir`, atomically.

    Args:
        store: the spilled examples the plan indexes.
        plan: rows in final (shuffled) order; `plan.packed` decides the columns.
        out_dir: output folder (must not exist unless `overwrite`).
        max_len: the row capacity, recorded in the manifest and used for packing stats.
        seed: the shuffle seed, recorded in the manifest.
        shard_size: target bytes per shard file ("256MB", "1GiB", 1000000).
        manifest_extra: caller's manifest parts (tokenizer, template, inputs, train_on, overflow, fingerprint,
            other counts), deep-merged with ours; a key both set to different values raises ValueError.
        overwrite: replace an existing output (only once the new one is complete).
        before_commit: called with the temporary folder once the shards are written, before the datasets
            files, the manifest and the rename (e.g. `lambda tmp: tok.save_pretrained(tmp / "tokenizer")`).
        example_templates: also write `example_templates.arrow`, the store's `groups` (template indices) laid
            out like the rows (see prep.example_templates), and name it in the manifest.

    Returns:
        The manifest as written to `manifest.json`.

    Raises:
        OutputExistsError: the output exists and `overwrite` is False (or it is not a prep shards folder).
        ConfigError: invalid `shard_size`, or a row longer than `max_len`.

    >>> import tempfile; from prep.pack import plan_bfd
    >>> with ExampleStore(parent=tempfile.mkdtemp()) as store:
    ...     store.append(pa.table({"input_ids": [[1, 2], [3]], "labels": [[-100, 2], [-100]]}))
    ...     m = write_shards(store, plan_bfd(store.lengths, 4), tempfile.mkdtemp() + "/shards", max_len=4, seed=0)
    >>> m["counts"]["rows"], m["counts"]["tokens"], [s["file"] for s in m["shards"]]
    (1, 3, ['data-00000-of-00001.arrow'])
    """
    target = parse_size(shard_size)
    check_output(out_dir, overwrite)
    row_tokens = _checked_row_tokens(plan, store.lengths, max_len)
    bounds = plan_shards(estimate_row_bytes(plan, store.lengths), target)
    names = [f"data-{i:05d}-of-{len(bounds) - 1:05d}.arrow" for i in range(len(bounds) - 1)]
    with staging_dir(out_dir, overwrite=overwrite) as tmp:
        batch_rows = rows_per_batch(max_len)
        shards = [
            _write_shard(store, plan, tmp / name, range(start, stop), int(row_tokens[start:stop].sum()), batch_rows)
            for name, start, stop in zip(names, bounds[:-1].tolist(), bounds[1:].tolist(), strict=True)
        ]
        ours = _our_manifest(store, plan, max_len=max_len, seed=seed, shards=shards)
        if example_templates:
            ours["example_templates"] = write_example_templates(
                tmp / EXAMPLE_TEMPLATES_FILE, store.groups, plan.order, plan.row_offsets)
        manifest = merge_manifest(ours, manifest_extra or {})
        manifest.setdefault("fingerprint", _fallback_fingerprint(manifest))
        problem = check_manifest(manifest, required=WRITER_KEYS)
        if problem:  # a bug in prep or in the caller's manifest_extra, caught before anything is published
            raise ValueError(f"the manifest to write breaks the shard contract: {problem}")
        if before_commit is not None:
            before_commit(tmp)
        # datasets can open the folder once these two exist, so they come after every shard is complete.
        _write_datasets_files(tmp, names, manifest["columns"], manifest["fingerprint"])
        write_json(tmp / MANIFEST, manifest)  # last: its presence marks a complete output
    return manifest


def _checked_row_tokens(plan: PackPlan, lengths: np.ndarray, max_len: int) -> np.ndarray:
    """Tokens per row, after checking that the plan covers every example and no row is longer than max_len."""
    if len(plan.order) != len(lengths):
        raise ValueError(f"the plan places {len(plan.order)} examples but the store holds {len(lengths)}")
    row_tokens = plan.row_tokens(lengths)
    if len(row_tokens) and row_tokens.max() > max_len:
        raise ConfigError(
            f"a row has {int(row_tokens.max())} tokens > max_len {max_len}; "
            "set --overflow truncate|split or raise --max-len"
        )
    return row_tokens


def rows_per_batch(max_len: int) -> int:
    """Rows per Arrow record batch: 1000 (as datasets writes), fewer when rows may be longer than 2,097 tokens,
    so that building one batch never holds more than BATCH_TOKENS token slots (a function of max_len only,
    so the output bytes stay a function of the options).

    >>> rows_per_batch(2048), rows_per_batch(4096), rows_per_batch(32768), rows_per_batch(10**7)
    (1000, 512, 64, 1)
    """
    return max(1, min(BATCH_ROWS, BATCH_TOKENS // max_len))


def _write_shard(store: ExampleStore, plan: PackPlan, path: Path, rows: range, tokens: int, batch_rows: int) -> dict:
    """Write rows as one Arrow IPC stream file in fixed-size record batches; return its manifest entry."""
    schema = shard_schema(plan.packed, plan.padded)
    schema = schema.with_metadata(_hf_schema_metadata(schema.names))
    with open(path, "wb") as f:
        with pa.ipc.new_stream(f, schema) as writer:
            for start in range(rows.start, rows.stop, batch_rows):
                table = build_rows(store, plan, slice(start, min(start + batch_rows, rows.stop)))
                writer.write_table(table.replace_schema_metadata(schema.metadata))
        f.flush()
        os.fsync(f.fileno())
    return {"file": path.name, "rows": len(rows), "sha256": sha256_file(path), "tokens": tokens}


def _our_manifest(store: ExampleStore, plan: PackPlan, *, max_len: int, seed: int, shards: list[dict]) -> dict:
    """The manifest parts this module knows."""
    columns = list(shard_schema(plan.packed, plan.padded).names)
    laid_out = int(sum(s["tokens"] for s in shards))
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "prep_version": __version__,
        "packed": plan.packed,
        "max_len": max_len,
        "pack_strategy": plan.strategy,
        "seed": seed,
        "pad_to_multiple_of": plan.pad_to_multiple_of,
        "columns": columns,
        "counts": {
            "examples": len(store),
            "rows": plan.num_rows,
            "tokens": store.num_tokens,
            "padding_tokens": laid_out - store.num_tokens,
            "trained_tokens": int(store.trained_counts.sum(dtype=np.int64)),
        },
        "packing": packing_stats(plan, store.lengths, max_len),
        "shards": shards,
    }


def merge_manifest(ours: dict, theirs: dict, _path: str = "") -> dict:
    """Deep-merge two manifest dicts; a key set in both to different non-dict values raises ValueError.

    >>> merge_manifest({"counts": {"rows": 2}}, {"counts": {"split": 1}, "train_on": "completion"})
    {'counts': {'rows': 2, 'split': 1}, 'train_on': 'completion'}
    """
    merged = dict(ours)
    for key, value in theirs.items():
        if isinstance(merged.get(key), dict) and isinstance(value, dict):
            merged[key] = merge_manifest(merged[key], value, f"{_path}{key}.")
        elif key in merged and merged[key] != value:
            raise ValueError(f"manifest key {_path}{key}: writer has {merged[key]!r}, caller passed {value!r}")
        else:
            merged[key] = value
    return merged


def _fallback_fingerprint(manifest: dict) -> str:
    """sha256 of the manifest (shard hashes included) when the caller gave no fingerprint."""
    return hashlib.sha256(_json_bytes(manifest)).hexdigest()


def _hf_features(columns: list[str]) -> dict:
    """datasets Features JSON for the shard columns.

    "Sequence" (not "List", which datasets >= 4 writes) because every datasets version reads it:
    datasets >= 4 maps Sequence(Value) to List(Value), and older versions know no "List".
    """
    feature = {"feature": {"dtype": "int32", "_type": "Value"}, "_type": "Sequence"}
    return {name: dict(feature) for name in columns}


def _hf_schema_metadata(columns: list[str]) -> dict[bytes, bytes]:
    """The `huggingface` schema metadata that datasets' ArrowWriter stores in each file."""
    return {b"huggingface": json.dumps({"info": {"features": _hf_features(columns)}}).encode()}


def _write_datasets_files(tmp: Path, names: list[str], columns: list[str], fingerprint: str) -> None:
    """dataset_info.json and state.json as `Dataset.save_to_disk` writes them."""
    info = {"citation": "", "description": "", "features": _hf_features(columns), "homepage": "", "license": ""}
    state = {
        "_data_files": [{"filename": name} for name in names],
        "_fingerprint": fingerprint,
        "_format_columns": None,
        "_format_kwargs": {},
        "_format_type": None,
        "_output_all_columns": False,
        "_split": None,
    }
    write_json(tmp / "dataset_info.json", info)
    write_json(tmp / "state.json", state)


def _json_bytes(obj: dict) -> bytes:
    """Canonical JSON: sorted keys, 2-space indent, trailing newline."""
    return (json.dumps(obj, sort_keys=True, indent=2) + "\n").encode()


def write_json(path: Path, obj: dict) -> None:
    """Write canonical JSON (sorted keys, 2-space indent, trailing newline) and fsync it."""
    with open(path, "wb") as f:
        f.write(_json_bytes(obj))
        f.flush()
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    """Persist a rename in `path` (no-op where directories cannot be opened)."""
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
