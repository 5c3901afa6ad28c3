"""Read input files into batches of raw rows: no checks beyond "can the bytes be read".

Supported inputs: `.jsonl` / `.ndjson` (one JSON value per line), `.json` (an array, or an object
holding one list), `.csv`, each optionally compressed (`.gz`, `.zst`, `.bz2`, `.xz`), `.parquet`, `.arrow`
(Arrow IPC, stream or file format: the files of datasets' cache and of save_to_disk, Feather v2), and a
folder written by `datasets.Dataset.save_to_disk`. Several paths and globs are expanded and sorted, so the same
arguments always read the same rows in the same order.

Inputs may also be URLs (prep.remote): object stores and the web (`s3://`, `gs://`, `az://`, `https://`, globs
on stores), streamed in blocks like local files, and Hugging Face Hub datasets (`hf://datasets/ORG/NAME`,
prep.hub), resolved to their data files and read from the Hugging Face cache. Either way a row keeps the URL
(credentials masked) as its path.

JSON Lines payloads stay `bytes` (validated later straight from the bytes); the other formats give
`dict` rows. JSON Lines, Parquet, CSV, Arrow and save_to_disk folders are streamed in batches; a `.json`
array is parsed whole (a single JSON value cannot be streamed cheaply).

Line numbers: 1-based file lines for JSON Lines, 0-based row indices for everything else.
"""

from __future__ import annotations

import bz2
import csv
import glob
import gzip
import io
import json
import lzma
import os
import posixpath
import re
import zlib
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import IO, Any, NamedTuple

import pydantic_core

from prep.errors import InputError
from prep.remote import is_url

BATCH_SIZE = 2048
BATCH_BYTES = 2**20  # JSON Lines and CSV batches also end after this much input, so long records keep memory bounded
SUPPORTED = (".jsonl, .ndjson, .json, .csv (each optionally .gz, .zst, .bz2 or .xz), .parquet, .arrow, "
             "or a datasets.save_to_disk folder")
CODECS = {".gz": "gzip", ".zst": "zstd", ".bz2": "bz2", ".xz": "xz"}  # compressed-file suffix -> codec
_BOM = b"\xef\xbb\xbf"
# What a damaged compressed stream raises (bz2 and pyarrow's zstd raise OSError, handled with the read errors).
_DECOMPRESS_ERRORS = (EOFError, zlib.error, lzma.LZMAError)


class RawRow(NamedTuple):
    """One record as read: its file, its line (JSONL, 1-based) or row (others, 0-based), its payload."""

    path: str
    line: int
    payload: bytes | dict[str, Any]


class RawBatch(NamedTuple):
    """Consecutive rows of one file; `done` is the fraction of the file read so far (for progress)."""

    path: str
    lines: list[int]
    payloads: list[Any]
    done: float


def expand_inputs(inputs: Iterable[str | os.PathLike[str]], *, subset: str | None = None,
                  split: str | None = None) -> list[str]:
    """Expand globs, drop repeats and sort, so the same arguments always give the same order.

    Args:
        inputs: file or folder paths and glob patterns (`data/**/*.jsonl`), or URLs (see the module docstring).
        subset, split: the config and split of hub dataset URLs (default: the default config, its train split).
    Returns:
        the matching paths, sorted; a hub dataset becomes its data files' URLs, pinned to the resolved commit.
    Raises:
        InputError: a path does not exist or a glob matches nothing.

    >>> expand_inputs(["examples/sharegpt.jsonl", "examples/*.json"])
    ['examples/alpaca.json', 'examples/sharegpt.jsonl']
    """
    found: set[str] = set()
    for item in inputs:
        text = os.fspath(item)
        if is_url(text):
            found.update(_url_inputs(text, subset, split))
        elif os.path.exists(text):
            found.add(os.path.normpath(text))
        elif glob.has_magic(text):
            matches = glob.glob(text, recursive=True)
            if not matches:
                raise InputError("no file matches this pattern", path=text)
            found.update(os.path.normpath(m) for m in matches)
        else:
            raise InputError("no such file or folder" + _hub_hint(text), path=text)
    return sorted(found)


def _url_inputs(url: str, subset: str | None, split: str | None) -> list[str]:
    """The inputs a URL names: a hub dataset's data files (pinned), a store glob's matches, or the URL itself."""
    from prep import hub, remote

    if hub.is_hub(url):
        if hub.commit_of(url) and hub.parse(url).path and not glob.has_magic(url):
            return [url]  # already pinned to a commit: resolved before
        return hub.resolve(url, subset, split)
    return remote.stored_input(url)


def _hub_hint(path: str) -> str:
    """A hint when a missing path looks like a hub dataset id (ORG/NAME).

    >>> _hub_hint("HuggingFaceH4/no_robots")
    '; for the Hugging Face dataset HuggingFaceH4/no_robots write hf://datasets/HuggingFaceH4/no_robots'
    """
    if re.fullmatch(r"[\w.-]+/[\w.-]+", path) and not os.path.splitext(path)[1]:
        return f"; for the Hugging Face dataset {path} write hf://datasets/{path}"
    return ""


def input_kind(path: str) -> str:
    """Name the reader for a path: `jsonl`, `json`, `csv`, `parquet`, `arrow` or `saved` (save_to_disk folder).

    Raises:
        InputError: the extension is not supported or the folder is not a save_to_disk folder.

    >>> input_kind("data/train.jsonl.gz")
    'jsonl'
    """
    if is_url(path):
        return _url_kind(path)
    if os.path.isdir(path):
        if os.path.exists(os.path.join(path, "dataset_dict.json")):
            raise InputError("this is a DatasetDict folder; pass one split's folder (e.g. PATH/train)", path=path)
        if not os.path.exists(os.path.join(path, "state.json")):
            raise InputError(f"folder is not a datasets.save_to_disk folder (no state.json); expected {SUPPORTED}",
                             path=path)
        return "saved"
    return _file_kind(path)


def _url_kind(url: str) -> str:
    """input_kind of a URL: a store folder must be a save_to_disk folder; files go by their suffix."""
    from prep import hub, remote

    if not hub.is_hub(url) and remote.isdir(url):
        if remote.exists(remote.join(url, "dataset_dict.json")):
            raise InputError("this is a DatasetDict folder; pass one split's folder (e.g. URL/train)", path=url)
        if not remote.exists(remote.join(url, "state.json")):
            raise InputError(f"folder is not a datasets.save_to_disk folder (no state.json); expected {SUPPORTED}",
                             path=url)
        return "saved"
    return _file_kind(url.split("?", 1)[0])


def _file_kind(path: str) -> str:
    """input_kind of a file, by its suffix."""
    codec = compression(path)
    name = path.lower()
    if codec:
        name = name[: name.rindex(".")]
    for suffix, kind in ((".jsonl", "jsonl"), (".ndjson", "jsonl"), (".json", "json"), (".csv", "csv")):
        if name.endswith(suffix):
            return kind
    if name.endswith(".parquet") and not codec:
        return "parquet"
    if name.endswith(".arrow") and not codec:
        return "arrow"
    raise InputError(f"unsupported file type; expected {SUPPORTED}", path=path)


def read_batches(path: str, batch_size: int = BATCH_SIZE) -> Iterator[RawBatch]:
    """Read one input in batches of at most `batch_size` rows.

    Args:
        path: a file or save_to_disk folder (see the module docstring for the formats).
        batch_size: rows per batch.
    Returns:
        an iterator of RawBatch; JSONL payloads are bytes (one line, newline included), others dicts.
    Raises:
        InputError: the file cannot be read (corrupt gzip or Parquet, a `.json` that is not JSON...).

    >>> [b.lines for b in read_batches("examples/sharegpt.jsonl", 4)][:2]
    [[1, 2, 3, 4], [5, 6, 7, 8]]
    """
    kind = input_kind(path)
    readers = {"jsonl": _jsonl_batches, "json": _json_batches, "csv": _csv_batches,
               "parquet": _parquet_batches, "arrow": _arrow_batches, "saved": _saved_batches}
    if is_url(path):
        return _url_batches(path, readers[kind], batch_size)
    return readers[kind](path, batch_size)


def _url_batches(url: str, reader: Any, batch_size: int) -> Iterator[RawBatch]:
    """A reader's batches for a URL: a hub file is read from its cached copy, a store object streamed; every
    batch and error names the URL."""
    from prep import hub, remote

    if hub.is_hub(url):
        local = hub.local_file(url)
        try:
            for batch in reader(local, batch_size):
                yield batch._replace(path=url)
        except InputError as e:
            raise InputError(e.msg, path=url, line=e.line, field=e.field) from None
        return
    with remote.translated(url):
        yield from reader(url, batch_size)


def read_rows(paths: Iterable[str | os.PathLike[str]], batch_size: int = BATCH_SIZE) -> Iterator[RawRow]:
    """Read every row of every input, in sorted path order.

    >>> next(read_rows(["examples/alpaca.json"])).line
    0
    """
    for path in expand_inputs(paths):
        for batch in read_batches(path, batch_size):
            for line, payload in zip(batch.lines, batch.payloads, strict=True):
                yield RawRow(batch.path, line, payload)


def compression(path: str) -> str | None:
    """The codec of a compressed file from its suffix (`gzip`, `zstd`, `bz2`, `xz`), or None.

    >>> compression("data/train.jsonl.zst"), compression("data/train.jsonl")
    ('zstd', None)
    """
    return CODECS.get(os.path.splitext(path.lower())[1])


@contextmanager
def _open_bytes(path: str) -> Iterator[tuple[IO[bytes], IO[bytes]]]:
    """Open a file for binary reading, decompressing by suffix; yields (stream, raw file for tell())."""
    try:
        raw = _open_raw(path)
    except OSError as e:
        raise InputError(f"cannot open: {e.strerror}", path=path) from None
    with raw:
        codec = compression(path)
        if codec is None:
            yield raw, raw
            return
        # BufferedReader: the decompressors' own line iteration is several times slower.
        with io.BufferedReader(_decompressor(codec, raw), 1 << 20) as stream:
            yield stream, raw


def _open_raw(path: str) -> IO[bytes]:
    """The file itself, or a URL's object streamed in blocks (prep.remote)."""
    if is_url(path):
        from prep.remote import open_input

        return open_input(path)
    return open(path, "rb")  # noqa: SIM115  # the caller closes it


def _size(path: str) -> int:
    """Bytes of a file or of a URL's object, at least 1 (a divisor for progress)."""
    if is_url(path):
        from prep.remote import size

        return max(size(path), 1)
    return max(os.path.getsize(path), 1)


def _decompressor(codec: str, raw: IO[bytes]) -> Any:
    """A readable decompressing stream over the open file `raw`."""
    if codec == "gzip":
        return gzip.GzipFile(fileobj=raw, mode="rb")
    if codec == "bz2":
        return bz2.BZ2File(raw, mode="rb")
    if codec == "xz":
        return lzma.LZMAFile(raw, mode="rb")
    import pyarrow as pa  # zstd: pyarrow's codec, no extra dependency

    return pa.CompressedInputStream(pa.PythonFile(raw, mode="r"), "zstd")


def _read_failed(path: str, where: str, error: Exception) -> InputError:
    """The error for a read that broke off: corrupt compressed data, or an I/O error."""
    codec = compression(path)
    corrupt = codec and (isinstance(error, _DECOMPRESS_ERRORS) or type(error) is OSError)  # bz2, zstd: OSError
    if is_url(path) and not corrupt:
        from prep.remote import remote_error

        return remote_error(path, error, where=where)  # type: ignore[return-value]
    what = f"corrupt or truncated {codec}" if codec else "read failed"
    return InputError(f"{what} {where}({error})", path=path)


def _jsonl_batches(path: str, batch_size: int) -> Iterator[RawBatch]:
    """JSON Lines: one payload per non-blank line; blank lines are skipped but keep their numbers."""
    size = _size(path)
    with _open_bytes(path) as (stream, raw):
        lines: list[int] = []
        payloads: list[bytes] = []
        number = held = 0
        try:
            for number, line in enumerate(stream, 1):
                if number == 1 and line.startswith(_BOM):
                    line = line[len(_BOM):]
                if line.isspace():
                    continue
                lines.append(number)
                payloads.append(line)
                held += len(line)
                if len(payloads) == batch_size or held >= BATCH_BYTES:
                    yield RawBatch(path, lines, payloads, raw.tell() / size)
                    lines, payloads, held = [], [], 0
        except (*_DECOMPRESS_ERRORS, OSError) as e:
            raise _read_failed(path, f"after line {number} ", e) from None
        if payloads:
            yield RawBatch(path, lines, payloads, 1.0)


def _json_batches(path: str, batch_size: int) -> Iterator[RawBatch]:
    """A JSON array (or an object holding one list), parsed whole; a `.json` holding JSON Lines is read as such."""
    with _open_bytes(path) as (stream, _):
        try:
            data = stream.read()
        except (*_DECOMPRESS_ERRORS, OSError) as e:
            raise _read_failed(path, "", e) from None
    if data.startswith(_BOM):
        data = data[len(_BOM):]
    try:
        value = pydantic_core.from_json(data)
    except ValueError as e:
        if _looks_like_jsonl(data):
            yield from _jsonl_batches(path, batch_size)
            return
        raise InputError(f"not valid JSON ({e}); a .json file must hold one array or object", path=path) from None
    rows = _records_of(value, path)
    for start in range(0, len(rows), batch_size):
        chunk = rows[start:start + batch_size]
        yield RawBatch(path, list(range(start, start + len(chunk))), chunk, (start + len(chunk)) / len(rows))


def _looks_like_jsonl(data: bytes) -> bool:
    """True when the first line alone is a JSON object (a JSON Lines file named .json)."""
    first = data.split(b"\n", 1)[0]
    try:
        return isinstance(pydantic_core.from_json(first), dict)
    except ValueError:  # includes pydantic-core's nesting limit: no RecursionError from deep arrays
        return False


def _records_of(value: Any, path: str) -> list[Any]:
    """The list of records in a parsed `.json`: the array itself, or the one list inside an object."""
    if isinstance(value, list):
        return value
    if isinstance(value, dict):
        lists = [k for k, v in value.items() if isinstance(v, list)]
        if len(lists) == 1:
            return value[lists[0]]
        keys = ", ".join(sorted(value)[:10])
        if not lists:
            raise InputError(f"JSON object holds no list of records (keys: {keys})", path=path)
        raise InputError(f"JSON object holds several lists ({', '.join(lists)}); keep one", path=path)
    raise InputError(f"JSON holds a {type(value).__name__}, expected an array of records", path=path)


def _csv_batches(path: str, batch_size: int) -> Iterator[RawBatch]:
    """CSV with a header row; cells missing from a short row are left out (a missing field, not None)."""
    size = _size(path)
    with _open_bytes(path) as (stream, raw):
        text = io.TextIOWrapper(stream, encoding="utf-8-sig", newline="")
        reader = csv.DictReader(text)
        lines: list[int] = []
        rows: list[dict[str, Any]] = []
        index = -1
        held = 0
        try:
            for index, row in enumerate(reader):
                rows.append({k: v for k, v in row.items() if k is not None and v is not None})
                lines.append(index)
                held += sum(len(v) for v in rows[-1].values() if isinstance(v, str))
                if len(rows) == batch_size or held >= BATCH_BYTES:
                    yield RawBatch(path, lines, rows, raw.tell() / size)
                    lines, rows, held = [], [], 0
        except UnicodeDecodeError as e:
            raise InputError(f"not UTF-8 after {index + 1} row(s) ({e.reason}); re-save the file as UTF-8",
                             path=path) from None
        except csv.Error as e:
            raise InputError(f"malformed CSV after row {index} ({e})", path=path) from None
        except (*_DECOMPRESS_ERRORS, OSError) as e:
            raise _read_failed(path, f"after row {index} ", e) from None
        if rows:
            yield RawBatch(path, lines, rows, 1.0)


def _parquet_batches(path: str, batch_size: int) -> Iterator[RawBatch]:
    """Parquet, streamed by record batch."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(_open_raw(path) if is_url(path) else path)
        total = max(parquet.metadata.num_rows, 1)
        start = 0
        for batch in parquet.iter_batches(batch_size=batch_size):
            rows = batch.to_pylist()
            yield RawBatch(path, list(range(start, start + len(rows))), rows, (start + len(rows)) / total)
            start += len(rows)
    except (pa.ArrowException, OSError) as e:
        if is_url(path) and not isinstance(e, pa.ArrowException):
            raise _read_failed(path, "", e) from None
        raise InputError(f"unreadable Parquet ({e})", path=path) from None


def _saved_batches(path: str, batch_size: int) -> Iterator[RawBatch]:
    """A `datasets.save_to_disk` folder: its Arrow stream files in the order state.json lists them."""
    try:
        state = json.loads(_read_small(_join(path, "state.json")))
        files = [_join(path, f["filename"]) for f in state["_data_files"]]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise InputError(f"unreadable state.json ({e})", path=path) from None
    yield from _arrow_rows(path, files, batch_size)


def _arrow_batches(path: str, batch_size: int) -> Iterator[RawBatch]:
    """One `.arrow` file (Arrow IPC: datasets' cache and save_to_disk files, Feather v2), streamed by record batch."""
    yield from _arrow_rows(path, [path], batch_size)


def _join(folder: str, name: str) -> str:
    """A file in a folder or under a URL."""
    return posixpath.join(folder, name) if is_url(folder) else os.path.join(folder, name)


def _read_small(path: str) -> bytes:
    """A small file's bytes (local or a URL)."""
    with _open_raw(path) as f:
        return f.read()


def _arrow_rows(path: str, files: list[str], batch_size: int) -> Iterator[RawBatch]:
    """The rows of Arrow IPC files, in order, as RawBatches of `path` with 0-based row indices."""
    import pyarrow as pa

    start = 0
    for number, file in enumerate(files, 1):
        try:
            for record_batch in _ipc_record_batches(file):
                for offset in range(0, record_batch.num_rows, batch_size):
                    rows = record_batch.slice(offset, batch_size).to_pylist()
                    yield RawBatch(path, list(range(start, start + len(rows))), rows, (number - 1) / len(files))
                    start += len(rows)
        except (pa.ArrowException, OSError) as e:
            if is_url(path) and not isinstance(e, pa.ArrowException):
                raise _read_failed(path, "", e) from None
            raise InputError(f"unreadable Arrow file {posixpath.basename(file)} ({e})", path=path) from None


def _ipc_record_batches(file: str) -> Iterator[Any]:
    """The record batches of an Arrow IPC file, memory-mapped: the stream format (what datasets writes) or the
    file format (Feather v2, `pyarrow.ipc.new_file`), told apart by the file format's leading magic bytes."""
    import pyarrow as pa

    with (pa.PythonFile(_open_raw(file), mode="r") if is_url(file) else pa.memory_map(file)) as source:
        if source.read(6) == b"ARROW1":
            reader = pa.ipc.open_file(source)
            for i in range(reader.num_record_batches):
                yield reader.get_batch(i)
            return
        source.seek(0)
        yield from pa.ipc.open_stream(source)
