"""`prep export`: shard folder → the formats other trainers read (Megatron, MosaicML MDS, Parquet).

The shards are read record batch by record batch (memory holds a few batches, whatever the size), while the
sha256 of every source file is computed in a thread and compared with the source manifest: an export is
made only from exactly the bytes `prep pack` wrote. Everything is written into a temporary folder beside
the output and renamed into place at the end, with `manifest.json` last (prep.write.staging_dir), so a
killed export leaves no output. The same shards give byte-identical exports.

One writer per format (prep/export/megatron.py, mds.py, parquet.py) consumes `RowBatch`es.

>>> report = export_shards(ExportConfig(shards="shards", to="parquet", output="pq"))  # doctest: +SKIP
>>> report.manifest["counts"]["rows"]  # doctest: +SKIP
120
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from prep import __version__
from prep.contract import UNPADDED_COLUMN
from prep.errors import ConfigError, ShardError
from prep.load import load_shards, read_manifest, split_names
from prep.verify import flat_list
from prep.write import sha256_file, staging_dir, write_json
from schemas.export_config import ExportConfig

FORMAT = "prep-export"
FORMAT_VERSION = 1
SPLITS_FORMAT = "prep-export-splits"


@dataclass(frozen=True)
class RowBatch:
    """A record batch of shard rows as flat numpy arrays: per column (offsets int64 from 0, values int32).

    `rows` offsets index `input_ids`/`labels` (token level); `examples` offsets index `seq_lengths` and
    `real_lengths` (example level: the real lengths, equal to `seq_lengths` without padding).
    """

    input_ids: np.ndarray
    labels: np.ndarray
    token_offsets: np.ndarray
    seq_lengths: np.ndarray
    real_lengths: np.ndarray
    example_offsets: np.ndarray
    table: pa.RecordBatch

    @property
    def num_rows(self) -> int:
        """Rows in the batch."""
        return len(self.token_offsets) - 1


@dataclass(frozen=True)
class ShardSource:
    """One shard folder to export: its path, manifest and the name of each shard file."""

    path: Path
    manifest: dict[str, Any]

    @property
    def files(self) -> list[str]:
        """The shard files in manifest order."""
        return [e["file"] for e in self.manifest["shards"]]

    @property
    def pad_multiple(self) -> int:
        """`pad_to_multiple_of` of the shards (1 when unpadded)."""
        return int(self.manifest.get("pad_to_multiple_of", 1))

    def schema(self, file: str) -> pa.Schema:
        """The Arrow schema of one shard file."""
        with pa.memory_map(str(self.path / file)) as source:
            return pa.ipc.open_stream(source).schema

    def batches(self, file: str) -> Iterator[RowBatch]:
        """The record batches of one shard file as RowBatch, read one at a time.

        Read, not memory-mapped: every page of a map that has been touched counts in the process's RSS until
        the map closes, so mapping a 256 MB shard would hold 256 MB; reading holds one batch.
        """
        with pa.OSFile(str(self.path / file)) as source:
            for batch in pa.ipc.open_stream(source):
                yield row_batch(batch)


@dataclass
class ExportReport:
    """What `export_shards` wrote: the output folder, its manifest, and each split's manifest."""

    output: str
    manifest: dict[str, Any]
    splits: dict[str, dict[str, Any]] = field(default_factory=dict)


def row_batch(batch: pa.RecordBatch) -> RowBatch:
    """Flat numpy views of a shard record batch (zero-copy for the values).

    >>> b = pa.record_batch({"input_ids": [[5, 6]], "labels": [[-100, 6]], "position_ids": [[0, 1]],
    ...                      "seq_lengths": [[2]]})
    >>> row_batch(b).token_offsets.tolist(), row_batch(b).real_lengths.tolist()
    ([0, 2], [2])
    """
    ids_off, ids = flat_list(batch.column("input_ids"))
    _, labels = flat_list(batch.column("labels"))
    seq_off, seq = flat_list(batch.column("seq_lengths"))
    names = batch.schema.names
    real = flat_list(batch.column(UNPADDED_COLUMN))[1] if UNPADDED_COLUMN in names else seq
    return RowBatch(ids, labels, ids_off, seq, real, seq_off, batch)


def export_shards(config: ExportConfig) -> ExportReport:
    """Export a shard folder (every split of a split folder) to `config.to`, atomically.

    Args:
        config: the shard folder, the format, the output folder and options.

    Returns:
        ExportReport(output, manifest, splits).

    Raises:
        ShardError: the shards are not readable or differ from their manifest (sha256).
        OutputExistsError: the output exists and `overwrite` is off (or it is not an export folder).
        ConfigError: the output is inside the shard folder.
    """
    from prep.export import megatron, mds, parquet
    from prep.write import parse_size

    writers = {"megatron": megatron.write, "mds": mds.write, "parquet": parquet.write}
    shards, out = Path(config.shards), Path(config.output)
    try:
        parse_size(config.mds_shard_size)
    except ConfigError:
        raise ConfigError(f"invalid --mds-shard-size {config.mds_shard_size!r}: expected a size such as 64MiB") from None
    if out.resolve().is_relative_to(shards.resolve()):
        raise ConfigError(f"--output {out} lies inside the shard folder {shards}: choose a folder outside it")
    names = split_names(shards)
    report = ExportReport(str(out), {})
    with staging_dir(out, overwrite=config.overwrite) as tmp:
        if not names:
            report.manifest = _export_one(ShardSource(shards, read_manifest(shards)), tmp, config, writers[config.to])
        else:
            for name in names:
                source = ShardSource(shards / name, read_manifest(shards / name))
                report.splits[name] = _export_one(source, tmp / name, config, writers[config.to], top=False)
            report.manifest = _splits_manifest(shards, names, report.splits, config)
            write_json(tmp / "manifest.json", report.manifest)
    return report


def _export_one(source: ShardSource, out: Path, config: ExportConfig, writer, top: bool = True) -> dict[str, Any]:
    """Export one shard folder into `out` (created), checking every source file's sha256 as it is read."""
    load_shards(source.path)  # schema, row counts and column types checked before anything is written
    out.mkdir(parents=True, exist_ok=True)
    with ThreadPoolExecutor(max_workers=1) as pool:
        hashes = {f: pool.submit(sha256_file, source.path / f) for f in source.files}
        details = writer(source, out, config)
        for entry in source.manifest["shards"]:
            digest = hashes[entry["file"]].result()
            if digest != entry.get("sha256"):
                raise ShardError(f"{source.path / entry['file']}: sha256 {digest[:16]}… differs from the manifest's "
                                 f"{str(entry.get('sha256'))[:16]}…: the shards changed after `prep pack`; "
                                 "run `prep verify` and repack")
    tokenizer = source.manifest["tokenizer"]
    folder = source.path / tokenizer.get("path", "tokenizer")
    if folder.is_dir():
        shutil.copytree(folder, out / "tokenizer")
    manifest = _manifest(source, out, config, details)
    write_json(out / "manifest.json", manifest)  # last: its presence marks a complete export
    return manifest


def _manifest(source: ShardSource, out: Path, config: ExportConfig, details: dict[str, Any]) -> dict[str, Any]:
    """The export's manifest: the format, the source shards (fingerprint, files, sha256), tokenizer, counts, files."""
    m = source.manifest
    files = sorted(p for p in out.rglob("*") if p.is_file() and "tokenizer" not in p.relative_to(out).parts)
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "prep_version": __version__,
        "to": config.to,
        "source": {
            "format": m["format"],
            "format_version": m["format_version"],
            "fingerprint": m.get("fingerprint"),
            "shards": [{"file": e["file"], "rows": e["rows"], "sha256": e["sha256"]} for e in m["shards"]],
        },
        "tokenizer": m["tokenizer"] | {"path": "tokenizer"},
        "template": m.get("template"),
        "train_on": m.get("train_on"),
        "packed": m["packed"],
        "max_len": m["max_len"],
        "pad_to_multiple_of": source.pad_multiple,
        "columns": m["columns"],
        "counts": {k: m["counts"][k] for k in ("rows", "examples", "tokens", "padding_tokens", "trained_tokens")
                   if k in m["counts"]},
        config.to: details,
        "files": [{"file": p.relative_to(out).as_posix(), "bytes": p.stat().st_size, "sha256": sha256_file(p)}
                  for p in files],
    }


def _splits_manifest(shards: Path, names: list[str], splits: dict[str, dict], config: ExportConfig) -> dict[str, Any]:
    """The top manifest of an exported split folder: each split's fingerprint and counts."""
    top = json.loads((shards / "manifest.json").read_text(encoding="utf-8"))
    return {
        "format": SPLITS_FORMAT,
        "format_version": FORMAT_VERSION,
        "prep_version": __version__,
        "to": config.to,
        "source": {"format": top.get("format"), "fingerprint": top.get("fingerprint")},
        "splits": {n: {"path": n, "source_fingerprint": splits[n]["source"]["fingerprint"],
                       "counts": splits[n]["counts"]} for n in names},
    }


def export_summary(report: ExportReport) -> Any:
    """One line per exported folder: rows, examples, tokens and files written."""
    from rich.console import Group
    from rich.text import Text

    folders = {name: Path(report.output) / name for name in report.splits} or {"": Path(report.output)}
    lines = []
    for name, path in folders.items():
        m = report.splits.get(name, report.manifest)
        c = m["counts"]
        lines.append(Text(f"{m['to']}: {c['rows']:,} rows, {c['examples']:,} examples, {c['tokens']:,} tokens, "
                          f"{len(m['files'])} file(s) in {path}"))
    return Group(*lines)
