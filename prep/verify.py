"""Verify a shard folder against its manifest and the shard contract (docs/contract.md).

Checks: every listed shard exists and its sha256 matches; no unlisted shard files; the column schema
(names, list<int32>, no nulls); per row, equal lengths of input_ids/labels/position_ids(/attention_mask),
sum(seq_lengths) == row length <= max_len, position_ids restarting at 0 at every example, every label
-100 or equal to its token, the first label of every example -100, token ids inside the vocabulary;
the saved tokenizer's fingerprint and size; rows/tokens/examples/trained tokens against the manifest; and
example_templates.arrow when sources used several templates (sha256, one entry per example, known indices).

Each check runs on whole record batches with numpy (flat values + offsets; no per-token Python), and the
hashes are computed in threads while the main thread checks values, so verifying is bound by disk and
sha256 speed. Every failure is one `Problem` naming the file, the row and what is wrong; after
`limit` rows failing the same check in one file, the rest are counted in one summary problem.

>>> report = verify_shards("shards/")             # doctest: +SKIP
>>> report.ok, report.rows                        # doctest: +SKIP
(True, 120)
"""

from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from prep.contract import (
    IGNORE_INDEX,
    MANIFEST,
    UNPADDED_COLUMN,
    check_manifest,
    is_plain_name,
    shard_columns,
)
from prep.errors import PrepError, ShardError
from prep.remote import is_url
from prep.spill import concat_ranges
from prep.write import sha256_file

TOKEN_COLUMNS = ("labels", "position_ids", "attention_mask")  # aligned with input_ids, token by token
LIST_INT32 = pa.list_(pa.int32())


@dataclass(frozen=True)
class Problem:
    """One failed check: the file (a shard, manifest.json, ...), its row in that file, the check, what is wrong."""

    file: str
    row: int | None
    check: str
    message: str

    def __str__(self) -> str:
        return f"{self.file}{'' if self.row is None else f' row {self.row}'}: {self.message}"


@dataclass
class VerifyReport:
    """What `verify_shards` found: the problems (empty when every check holds) and what was read."""

    path: str
    problems: list[Problem] = field(default_factory=list)
    shards: int = 0
    rows: int = 0
    tokens: int = 0
    bytes: int = 0

    @property
    def ok(self) -> bool:
        """True when every check holds."""
        return not self.problems


@dataclass
class _Totals:
    """What the shards hold, summed while scanning; `complete` is False when a shard could not be read whole."""

    rows: int = 0
    tokens: int = 0
    trained: int = 0
    examples: int = 0
    padding: int = 0
    complete: bool = True


class _Problems:
    """Problems in order, at most `limit` per (file, check); the overflow is counted and summarised at the end."""

    def __init__(self, limit: int):
        self.limit, self.items, self.seen = limit, [], Counter()

    def add(self, file: str, row: int | None, check: str, message: str) -> None:
        """Record one problem (or only count it once the limit for its file and check is reached)."""
        self.seen[file, check] += 1
        if self.seen[file, check] <= self.limit:
            self.items.append(Problem(file, row, check, message))

    def rows(self, file: str, check: str, rows: np.ndarray, describe: Callable[[int], tuple[int, str]]) -> None:
        """Record the failing batch-local `rows`; `describe(k)` gives (row number in the file, message) of rows[k]."""
        room = max(self.limit - self.seen[file, check], 0)
        for k in range(min(room, len(rows))):
            row, message = describe(k)
            self.add(file, row, check, message)
        self.seen[file, check] += max(len(rows) - room, 0)

    def finish(self) -> list[Problem]:
        """The problems, with one "... and N more" line per (file, check) over the limit."""
        more = [
            Problem(f, None, c, f"... and {n - self.limit} more rows fail the {c} check")
            for (f, c), n in self.seen.items()
            if n > self.limit
        ]
        return self.items + more


def verify_shards(path: str | Path, limit: int = 10, threads: int | None = None) -> VerifyReport:
    """Check a shard folder; return every problem found (the folder is valid when `report.ok`).

    Args:
        path: the shard folder.
        limit: problems listed per file and check before the rest are only counted.
        threads: sha256 threads (default: CPUs - 1, at least 1).

    Returns:
        VerifyReport(path, problems, shards, rows, tokens, bytes).

    >>> verify_shards("no/such/folder").problems[0].check
    'manifest'
    """
    if is_url(path):
        return _verify_url(str(path), limit, threads)
    path = Path(path)
    report, problems = VerifyReport(str(path)), _Problems(limit)
    manifest = _read_manifest(path, problems)
    if manifest is None:
        report.problems = problems.finish()
        return report
    columns = list(shard_columns(manifest["packed"], _pad_multiple(manifest) > 1))
    if manifest["columns"] != columns:
        problems.add(MANIFEST, None, "columns", f"columns are {manifest['columns']}, expected {columns}")
    totals = _Totals()
    workers = threads or max(1, (os.cpu_count() or 2) - 1)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        hashes = {
            e["file"]: pool.submit(sha256_file, path / e["file"])
            for e in manifest["shards"]
            if (path / e["file"]).is_file()
        }
        for entry in manifest["shards"]:
            report.bytes += _verify_shard(path, entry, manifest, columns, hashes, problems, totals)
    report.shards, report.rows, report.tokens = len(manifest["shards"]), totals.rows, totals.tokens
    _check_totals(manifest, totals, problems)
    _check_files(path, manifest, problems)
    _check_example_templates(path, manifest, problems, totals.complete)
    _check_tokenizer(path, manifest, problems)
    report.problems = problems.finish()
    return report


def _verify_url(url: str, limit: int, threads: int | None) -> VerifyReport:
    """verify_shards of a URL: its local copy (each shard checked against the manifest's sha256 when fetched,
    everything checked again here), plus the store's listing for `.arrow` files the manifest does not list
    (not on https://, where a folder cannot be listed)."""
    from prep.remote import display, local_shards, remote_strays

    try:
        local = local_shards(url)
    except ShardError as e:  # no manifest (an unfinished writer), a damaged object, a store error
        return VerifyReport(display(url), problems=[Problem(MANIFEST, None, "fetch", str(e))])
    report = verify_shards(local, limit=limit, threads=threads)
    report.path = display(url)
    manifest = json.loads((local / MANIFEST).read_text(encoding="utf-8"))
    for stray in remote_strays(url, _listed_arrow_files(manifest)) or []:
        report.problems.append(Problem(stray, None, "stray", "an .arrow file at the URL that manifest.json does not "
                                                             "list: the folder mixes two runs"))
    return report


# --------------------------------------------------------------------------------------------------
# Manifest, files, tokenizer, totals


def _read_manifest(path: Path, problems: _Problems) -> dict[str, Any] | None:
    """The manifest, or None after recording why it cannot be used."""
    file = path / MANIFEST
    if not file.is_file():
        problems.add(MANIFEST, None, "manifest", f"{file} not found: not a shard folder, or the writer did not finish")
        return None
    try:
        manifest = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        problems.add(MANIFEST, None, "manifest", f"unreadable JSON: {e}")
        return None
    problem = check_manifest(manifest)
    if problem:
        problems.add(MANIFEST, None, "manifest", problem)
        return None
    return manifest


def _check_files(path: Path, manifest: dict[str, Any], problems: _Problems) -> None:
    """No unlisted shard files, and state.json (read by datasets) lists the same files in the same order."""
    listed = [e["file"] for e in manifest["shards"]]
    for stray in sorted(set(p.name for p in path.glob("*.arrow")) - set(_listed_arrow_files(manifest))):
        problems.add(stray, None, "stray", "an .arrow file that manifest.json does not list: the folder mixes two runs")
    state = path / "state.json"
    if state.is_file():
        try:
            files = [f["filename"] for f in json.loads(state.read_text(encoding="utf-8"))["_data_files"]]
        except (OSError, ValueError, KeyError, TypeError) as e:
            problems.add("state.json", None, "state", f"unreadable: {e}")
            return
        if files != listed:
            problems.add("state.json", None, "state", f"lists {files}, manifest.json lists {listed}")


def _listed_arrow_files(manifest: dict[str, Any]) -> list[str]:
    """The .arrow files a manifest names: its shards, and example_templates.arrow when there is one."""
    sidecar = manifest.get("example_templates")
    return [e["file"] for e in manifest.get("shards", [])] + ([str(sidecar.get("file"))] if sidecar else [])


def _check_example_templates(path: Path, manifest: dict[str, Any], problems: _Problems, complete: bool) -> None:
    """example_templates.arrow (sources with several templates): its sha256, one entry per example of every row,
    each naming one of the manifest's `templates`."""
    entry = manifest.get("example_templates")
    if not entry:
        return
    name = entry.get("file")
    if not is_plain_name(name):
        problems.add(MANIFEST, None, "manifest", f"example_templates {name!r} is not a plain file name; not read")
        return
    if not (path / name).is_file():
        problems.add(name, None, "missing", "named in manifest.json (example_templates) but missing")
        return
    digest = sha256_file(path / name)
    if digest != entry.get("sha256"):
        problems.add(name, None, "sha256", f"sha256 {digest[:16]}… differs from the manifest's "
                     f"{str(entry.get('sha256'))[:16]}…: the file was changed or damaged after writing")
    try:
        with pa.memory_map(str(path / name)) as source:
            column = pa.ipc.open_stream(source).read_all().column("templates").combine_chunks()
    except (pa.ArrowException, OSError, KeyError) as e:
        problems.add(name, None, "unreadable", f"not an Arrow stream with a `templates` column ({e})")
        return
    values = np.asarray(column.flatten(), dtype=np.int64)
    outside = np.flatnonzero((values < 0) | (values >= len(manifest.get("templates") or [])))
    if len(outside):
        problems.add(name, None, "templates", f"{len(outside)} example(s) name a template outside manifest.json's "
                     f"`templates`, e.g. {int(values[outside[0]])}")
    if complete:
        per_row = np.diff(np.asarray(column.offsets, dtype=np.int64))
        _compare_examples_per_row(path, manifest, name, per_row, problems)


def _compare_examples_per_row(path: Path, manifest: dict[str, Any], name: str, per_row: np.ndarray,
                              problems: _Problems) -> None:
    """The sidecar's entries per row against the shards' examples per row (len of seq_lengths)."""
    import pyarrow.compute as pc

    parts = []
    for entry in manifest["shards"]:
        with pa.memory_map(str(path / entry["file"])) as source:
            seq = pa.ipc.open_stream(source).read_all().column("seq_lengths")
            parts.append(np.asarray(pc.list_value_length(seq), dtype=np.int64))
    examples = np.concatenate([np.zeros(0, np.int64), *parts])
    if len(examples) != len(per_row):
        problems.add(name, None, "rows", f"has {len(per_row)} rows, the shards have {len(examples)}")
        return
    bad = np.flatnonzero(examples != per_row)
    problems.rows(name, "examples", bad, lambda k: (int(bad[k]), f"{per_row[bad[k]]} template entries for "
                                                    f"{examples[bad[k]]} examples"))


def _check_tokenizer(path: Path, manifest: dict[str, Any], problems: _Problems) -> None:
    """The saved tokenizer loads, and its fingerprint and size equal the manifest's."""
    from prep.tokenizer import load_tokenizer, tokenizer_fingerprint

    entry = manifest["tokenizer"]
    folder = path / entry.get("path", "tokenizer")
    name = f"{folder.name}/"
    if not folder.is_dir():
        problems.add(name, None, "tokenizer", f"{folder} missing: the shards cannot be decoded or checked")
        return
    try:
        tok = load_tokenizer(str(folder))
    except PrepError as e:
        problems.add(name, None, "tokenizer", str(e))
        return
    fingerprint = tokenizer_fingerprint(tok)
    if fingerprint != entry.get("fingerprint"):
        problems.add(
            name,
            None,
            "tokenizer",
            f"fingerprint {fingerprint[:16]}… differs from the manifest's {str(entry.get('fingerprint'))[:16]}…: "
            "the saved tokenizer is not the one the shards were made with",
        )
    if entry.get("vocab_size") is not None and len(tok) != entry["vocab_size"]:
        problems.add(
            name, None, "tokenizer", f"has {len(tok)} tokens, the manifest's vocab_size is {entry['vocab_size']}"
        )


def _check_totals(manifest: dict[str, Any], totals: _Totals, problems: _Problems) -> None:
    """Rows, tokens, examples and trained tokens over all shards against manifest counts (when all were read)."""
    if not totals.complete:
        return
    counts = manifest["counts"]
    found = {
        "rows": totals.rows,
        "tokens": totals.tokens - totals.padding,
        "padding_tokens": totals.padding,
        "examples": totals.examples,
        "trained_tokens": totals.trained,
    }
    for key, value in found.items():
        if key in counts and counts[key] != value:
            problems.add(MANIFEST, None, "counts", f"counts.{key} is {counts[key]}, the shards hold {value}")
    rows = manifest.get("packing", {}).get("rows")
    if rows is not None and rows != totals.rows:
        problems.add(MANIFEST, None, "counts", f"packing.rows is {rows}, the shards hold {totals.rows}")


# --------------------------------------------------------------------------------------------------
# One shard


def _verify_shard(
    path: Path,
    entry: dict[str, Any],
    manifest: dict[str, Any],
    columns: list[str],
    hashes: dict[str, Future],
    problems: _Problems,
    totals: _Totals,
) -> int:
    """Check one shard file (existence, hash, schema, values, its row/token counts); return its size."""
    name, file = entry["file"], path / entry["file"]
    if not file.is_file():
        problems.add(name, None, "missing", "listed in manifest.json but missing")
        totals.complete = False
        return 0
    shard = _Totals()
    _scan_shard(file, manifest, columns, totals.rows, problems, shard)
    digest = hashes[name].result()
    if digest != entry.get("sha256"):
        problems.add(
            name,
            None,
            "sha256",
            f"sha256 {digest[:16]}… differs from the manifest's {str(entry.get('sha256'))[:16]}…: "
            "the file was changed or damaged after writing",
        )
    if shard.complete and shard.rows != entry.get("rows"):
        problems.add(name, None, "rows", f"holds {shard.rows} rows, the manifest says {entry.get('rows')}")
    if shard.complete and "tokens" in entry and shard.tokens != entry["tokens"]:
        problems.add(name, None, "tokens", f"holds {shard.tokens} tokens, the manifest says {entry['tokens']}")
    totals.rows += shard.rows if shard.complete else int(entry.get("rows") or 0)
    totals.tokens, totals.trained = totals.tokens + shard.tokens, totals.trained + shard.trained
    totals.examples += shard.examples
    totals.padding += shard.padding
    totals.complete &= shard.complete
    return file.stat().st_size


def _scan_shard(
    file: Path, manifest: dict[str, Any], columns: list[str], first_row: int, problems: _Problems, shard: _Totals
) -> None:
    """Read the Arrow stream batch by batch (memory-mapped), checking the schema and every batch."""
    name = file.name
    try:
        with pa.memory_map(str(file)) as source:
            reader = pa.ipc.open_stream(source)
            if not _check_schema(name, reader.schema, columns, problems):
                shard.complete = False
                return
            for batch in reader:
                _check_batch(batch, _Where(name, shard.rows, first_row + shard.rows), manifest, problems, shard)
                shard.rows += batch.num_rows
    except (pa.ArrowException, OSError) as e:
        problems.add(
            name,
            shard.rows,
            "unreadable",
            f"the Arrow stream breaks after {shard.rows} rows ({e}): the file is truncated or corrupt",
        )
        shard.complete = False


def _check_schema(name: str, schema: pa.Schema, columns: list[str], problems: _Problems) -> bool:
    """Column names in order and list<int32> types; False (after recording it) when they differ."""
    ok = schema.names == columns
    if not ok:
        problems.add(name, None, "schema", f"columns {schema.names}, expected {columns}")
    for f in schema:
        if f.name in columns and f.type != LIST_INT32:
            problems.add(name, None, "schema", f"column {f.name!r} is {f.type}, expected list<int32>")
            ok = False
    return ok


@dataclass(frozen=True)
class _Where:
    """Where a record batch sits: its file, its first row in the file and over all shards."""

    file: str
    row: int
    global_row: int

    def overall(self, local: int) -> str:
        """ "(row R overall)" for a batch-local row: the row number `prep inspect --row` takes."""
        return f"(row {self.global_row + local} overall)"


def flat_list(column: pa.ListArray) -> tuple[np.ndarray, np.ndarray]:
    """A list<int32> array as (int64 offsets starting at 0, int32 values), zero-copy for the values.

    >>> flat_list(pa.array([[1, 2], [3]], pa.list_(pa.int32()))[1:])   # a slice starts its offsets at 0
    (array([0, 1]), array([3], dtype=int32))
    """
    offsets = np.asarray(column.offsets, dtype=np.int64)
    values = np.asarray(column.values)[offsets[0] : offsets[-1]]
    return offsets - offsets[0], values


def _segment_sums(values: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """Sum of values[offsets[i]:offsets[i+1]] for every i (int64)."""
    cum = np.concatenate(([0], np.cumsum(values, dtype=np.int64)))
    return cum[offsets[1:]] - cum[offsets[:-1]]


def _check_batch(
    batch: pa.RecordBatch, where: _Where, manifest: dict[str, Any], problems: _Problems, shard: _Totals
) -> None:
    """All row and token checks of one record batch, on whole columns."""
    try:
        batch.validate(full=True)  # offsets in bounds and monotonic: numpy views below rely on it
    except pa.ArrowInvalid as e:
        last = where.row + batch.num_rows - 1
        problems.add(where.file, where.row, "corrupt", f"the record batch of rows {where.row}..{last} is invalid: {e}")
        return
    nulls = [n for n in batch.schema.names if batch.column(n).null_count or batch.column(n).values.null_count]
    if nulls:
        problems.add(
            where.file, where.row, "nulls", f"columns {nulls} hold nulls in the rows from here {where.overall(0)}"
        )
        return
    cols = {n: flat_list(batch.column(n)) for n in batch.schema.names}
    good = _check_rows(cols, where, manifest, problems)
    _check_tokens(cols, good, where, manifest, problems)
    if UNPADDED_COLUMN in cols:
        shard.padding += _check_padding(cols, good, where, manifest, problems)
    labels = cols["labels"][1]
    shard.tokens += len(cols["input_ids"][1])
    shard.trained += int(np.count_nonzero(labels != IGNORE_INDEX))
    shard.examples += len(cols["seq_lengths"][1])


def _check_rows(
    cols: dict[str, tuple[np.ndarray, np.ndarray]], where: _Where, manifest: dict[str, Any], problems: _Problems
) -> np.ndarray:
    """Row checks: column lengths, seq_lengths, max_len, one example per unpacked row.

    Returns:
        A bool mask of the rows whose lengths agree, so that their tokens can be checked.
    """
    offsets = cols["input_ids"][0]
    row_len = np.diff(offsets)
    good = row_len > 0
    _report(problems, where, "empty", ~good, lambda r: "the row is empty")
    for name in TOKEN_COLUMNS:
        if name in cols:
            other = np.diff(cols[name][0])
            bad = other != row_len
            _report(
                problems,
                where,
                "lengths",
                bad,
                lambda r, o=other, n=name: f"{n} has {o[r]} values, input_ids has {row_len[r]}",
            )
            good &= ~bad
    seq_off, seq = cols["seq_lengths"]
    per_row = np.diff(seq_off)
    sums = _segment_sums(seq, seq_off)
    nonpositive = _segment_sums(seq < 1, seq_off) > 0
    _report(
        problems,
        where,
        "seq_lengths",
        nonpositive,
        lambda r: f"seq_lengths {seq[seq_off[r] : seq_off[r + 1]].tolist()[:8]} hold a length < 1",
    )
    bad_sum = (sums != row_len) & ~nonpositive
    _report(
        problems,
        where,
        "seq_lengths",
        bad_sum,
        lambda r: f"seq_lengths sum to {sums[r]}, the row has {row_len[r]} tokens",
    )
    good &= ~(nonpositive | bad_sum)
    max_len = int(manifest["max_len"])
    _report(problems, where, "max_len", row_len > max_len, lambda r: f"{row_len[r]} tokens > max_len {max_len}")
    if not manifest["packed"]:
        _report(
            problems,
            where,
            "unpacked",
            per_row != 1,
            lambda r: f"holds {per_row[r]} examples; unpacked shards hold 1 per row",
        )
    return good


def _check_tokens(
    cols: dict[str, tuple[np.ndarray, np.ndarray]],
    good: np.ndarray,
    where: _Where,
    manifest: dict[str, Any],
    problems: _Problems,
) -> None:
    """Token-level checks on the rows whose lengths are consistent: positions, labels, first labels, ids, mask."""
    offsets = cols["input_ids"][0]
    seq_off, seq = cols["seq_lengths"]
    rows = np.flatnonzero(good)
    row_len = np.diff(offsets)[rows]
    names = [n for n in ("input_ids", *TOKEN_COLUMNS) if n in cols]
    if len(rows) == len(good):  # the usual case: no gather, views of the mapped file
        tok, seq_g = {n: cols[n][1] for n in names}, seq
    else:  # each column through its own offsets: they differ after a row of unequal lengths
        tok = {n: cols[n][1][concat_ranges(cols[n][0][rows], row_len)] for n in names}
        seq_g = seq[concat_ranges(seq_off[rows], np.diff(seq_off)[rows])].astype(np.int64)
    row_start = np.concatenate(([0], np.cumsum(row_len)))
    ex_start = np.cumsum(seq_g, dtype=np.int64) - seq_g
    # int32 is exact here (a record batch holds < 2**31 values: Arrow list offsets are int32) and halves the traffic
    expected_pos = np.arange(int(row_start[-1]), dtype=np.int32) - np.repeat(ex_start.astype(np.int32), seq_g)
    ids_g, labels, positions = tok["input_ids"], tok["labels"], tok["position_ids"]
    checks = [
        (
            "position_ids",
            positions != expected_pos,
            lambda i, p: (
                f"position_ids[{p}] is {positions[i]}, expected {expected_pos[i]} (restart at 0 at each example)"
            ),
        ),
        (
            "labels",
            (labels != IGNORE_INDEX) & (labels != ids_g),
            lambda i, p: (
                f"labels[{p}] is {labels[i]} but input_ids[{p}] is {ids_g[i]}: a label is -100 or its own token"
            ),
        ),
        (
            "first_label",
            _at(len(labels), ex_start, labels[ex_start] != IGNORE_INDEX),
            lambda i, p: f"labels[{p}] is {labels[i]} at the first token of an example; it must be -100",
        ),
    ]
    vocab = manifest["tokenizer"].get("vocab_size")
    if isinstance(vocab, int):
        checks.append(
            (
                "token_ids",
                (ids_g < 0) | (ids_g >= vocab),
                lambda i, p: f"input_ids[{p}] is {ids_g[i]}, outside the vocabulary 0..{vocab - 1}",
            )
        )
    if "attention_mask" in tok:
        mask = tok["attention_mask"]
        checks.append(("attention_mask", mask != 1, lambda i, p: f"attention_mask[{p}] is {mask[i]}, expected 1"))
    for check, bad, describe in checks:
        _report_tokens(problems, where, check, bad, rows, row_start, describe)


def _pad_multiple(manifest: dict[str, Any]) -> int:
    """The manifest's `pad_to_multiple_of` (1 for shards written before the option existed)."""
    value = manifest.get("pad_to_multiple_of", 1)
    return value if isinstance(value, int) and value >= 1 else 1


def _check_padding(
    cols: dict[str, tuple[np.ndarray, np.ndarray]],
    good: np.ndarray,
    where: _Where,
    manifest: dict[str, Any],
    problems: _Problems,
) -> int:
    """The padding invariants of `--pad-to-multiple-of N`; returns the pad tokens of the batch.

    Per example: the padded length (seq_lengths) is a multiple of N and exceeds the real length
    (seq_lengths_unpadded, >= 1) by less than N. Per pad token (the tail of each example): the pad id and
    label -100. Positions continuing through the padding are the position_ids check itself.
    """
    multiple = _pad_multiple(manifest)
    seq_off, seq = cols["seq_lengths"]
    real_off, real = cols[UNPADDED_COLUMN]
    counts_differ = np.diff(real_off) != np.diff(seq_off)
    _report(problems, where, "padding", counts_differ,
            lambda r: f"{UNPADDED_COLUMN} lists {np.diff(real_off)[r]} examples, seq_lengths {np.diff(seq_off)[r]}")
    if counts_differ.any():
        return 0
    seq, real = seq.astype(np.int64), real.astype(np.int64)
    bad = (seq % multiple != 0) | (real < 1) | (real > seq) | (seq - real >= multiple)
    example_row = np.repeat(np.arange(len(seq_off) - 1), np.diff(seq_off))
    _report(problems, where, "padding", np.bincount(example_row[bad], minlength=len(seq_off) - 1) > 0,
            lambda r: f"seq_lengths {seq[seq_off[r]:seq_off[r + 1]].tolist()[:8]} are not "
                      f"{UNPADDED_COLUMN} {real[real_off[r]:real_off[r + 1]].tolist()[:8]} padded to a multiple of {multiple}")
    if bad.any() or not good.all():
        return int(np.clip(seq - real, 0, None).sum())
    pads = concat_ranges(np.cumsum(seq) - seq + real, seq - real)  # flat token index of every pad token
    ids, labels = cols["input_ids"][1], cols["labels"][1]
    pad_id = manifest["tokenizer"].get("pad_token_id")
    wrong = (labels[pads] != IGNORE_INDEX) | ((ids[pads] != pad_id) if isinstance(pad_id, int) else False)
    flags = _at(len(ids), pads, wrong)
    row_start = np.concatenate(([0], np.cumsum(np.diff(cols["input_ids"][0]))))
    _report_tokens(problems, where, "padding", flags, np.arange(len(good)), row_start,
                   lambda i, p: f"pad token at [{p}] has id {ids[i]} and label {labels[i]}; "
                                f"expected the pad id {pad_id} and -100")
    return len(pads)


def _at(n: int, index: np.ndarray, flags: np.ndarray) -> np.ndarray:
    """A length-n bool mask that is `flags` at `index` and False elsewhere."""
    mask = np.zeros(n, dtype=bool)
    mask[index] = flags
    return mask


def _report(problems: _Problems, where: _Where, check: str, bad: np.ndarray, describe: Callable[[int], str]) -> None:
    """Record the batch-local rows where `bad` holds, each with `describe(row)`."""
    rows = np.flatnonzero(bad)
    if len(rows):
        problems.rows(
            where.file,
            check,
            rows,
            lambda k: (where.row + int(rows[k]), f"{describe(int(rows[k]))} {where.overall(int(rows[k]))}"),
        )


def _report_tokens(
    problems: _Problems,
    where: _Where,
    check: str,
    bad: np.ndarray,
    rows: np.ndarray,
    row_start: np.ndarray,
    describe: Callable[[int, int], str],
) -> None:
    """Record each row holding a bad token, describing its first bad token (position in the row)."""
    tokens = np.flatnonzero(bad)
    if not len(tokens):
        return
    sub_rows, first = np.unique(np.searchsorted(row_start, tokens, side="right") - 1, return_index=True)
    first_tokens = tokens[first]

    def describe_row(k: int) -> tuple[int, str]:
        i, local = int(first_tokens[k]), int(rows[sub_rows[k]])
        return where.row + local, f"{describe(i, i - int(row_start[sub_rows[k]]))} {where.overall(local)}"

    problems.rows(where.file, check, sub_rows, describe_row)


# --------------------------------------------------------------------------------------------------
# Rendering (rich)


def verify_summary(report: VerifyReport) -> Any:
    """A rich renderable: one red line per problem, or one green line when every check holds."""
    from rich.console import Group
    from rich.text import Text

    size = f"{report.shards} shards, {report.rows:,} rows, {report.tokens:,} tokens, {report.bytes / 1e6:,.1f} MB"
    if report.ok:
        return Text(f"ok: {report.path}: {size}: every check holds", style="green")
    lines = [Text(f"{report.path}: {len(report.problems)} problem(s) ({size})", style="bold red")]
    lines += [Text(f"  [{p.check}] {p}", style="red") for p in report.problems]
    return Group(*lines)
