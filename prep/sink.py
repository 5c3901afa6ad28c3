"""Atomic output writers: unified JSON Lines, unified Parquet, and the rejects JSON Lines.

Everything is written to a temporary file in the destination folder and moved into place with
`os.replace` only when the writer's `with` block ends without an error, so a reader never sees a
half-written file and a failed run leaves the previous output untouched. An output URL (`s3://...`) is
written to a local temporary file and uploaded in one put at the same moment (prep.remote.staged_file):
object stores publish an object whole, so readers see the old object or the new one.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pydantic_core

from prep.errors import OutputExistsError
from prep.remote import is_url
from schemas.conversation import Conversation

PARQUET_ROW_GROUP = 65_536


@contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success move it onto `path`, on error delete it.

    >>> with atomic_path("out.txt") as tmp:  # doctest: +SKIP
    ...     tmp.write_text("done")
    """
    if is_url(os.fspath(path)):
        from prep.remote import staged_file

        with staged_file(os.fspath(path)) as tmp:
            yield tmp
        return
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = _create_beside(final)
    try:
        yield tmp
        os.replace(tmp, final)
    finally:
        tmp.unlink(missing_ok=True)


def _create_beside(final: Path) -> Path:
    """Create a new empty file `.NAME.XXXXXXXX.tmp` beside `final`, mode 0o666 less the process umask.

    Not `tempfile.mkstemp`: it makes owner-only files, and reading the umask to fix that means setting it
    (`os.umask` has no read-only form), which changes process state. `open(..., O_EXCL, 0o666)` lets the
    kernel apply the umask in force right now, as for any file a program creates.
    """
    while True:
        tmp = final.parent / f".{final.name}.{secrets.token_hex(4)}.tmp"
        try:
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
            return tmp
        except FileExistsError:
            continue


def check_outputs(outputs: Sequence[str], inputs: Sequence[str], overwrite: bool) -> None:
    """Refuse to overwrite an existing output (without `overwrite`) or any input.

    Raises:
        OutputExistsError: an output exists and overwrite is False, or an output is also an input.

    >>> check_outputs(["new.jsonl"], ["in.jsonl"], overwrite=False)
    """
    real_inputs = {os.path.realpath(p) for p in inputs if not is_url(p)} | {p for p in inputs if is_url(p)}
    for out in outputs:
        if is_url(out):
            _check_url_output(out, real_inputs, overwrite)
            continue
        if os.path.realpath(out) in real_inputs:
            raise OutputExistsError(f"{out}: output is also an input; choose another output path")
        if os.path.exists(out) and not overwrite:
            raise OutputExistsError(f"{out}: already exists; pass --overwrite to replace it")
        if os.path.isdir(out):
            raise OutputExistsError(f"{out}: is a folder; give a file path")


def _check_url_output(url: str, inputs: set[str], overwrite: bool) -> None:
    """check_outputs for an output URL: not an input; reachable, its bucket there, and new unless `overwrite`."""
    from prep.remote import check_output_url, display

    if display(url) in inputs:
        raise OutputExistsError(f"{display(url)}: output is also an input; choose another output path")
    check_output_url(url, overwrite=overwrite, folder=False)


class JsonlSink:
    """Write JSON lines atomically; count them.

    >>> with JsonlSink("out.jsonl") as sink:  # doctest: +SKIP
    ...     sink.write([b'{"a":1}'])
    """

    def __init__(self, path: str | os.PathLike[str]):
        self.path = Path(path)
        self.written = 0
        self._atomic = atomic_path(path)  # the path as given: a URL must not go through Path

    def __enter__(self) -> JsonlSink:
        self._file = open(self._atomic.__enter__(), "wb", buffering=1 << 20)
        return self

    def write(self, lines: Sequence[bytes]) -> None:
        """Append lines (serialized JSON, without their newline)."""
        if lines:
            self._file.write(b"\n".join(lines) + b"\n")
            self.written += len(lines)

    def __exit__(self, *exc: Any) -> None:
        self._file.close()
        self._atomic.__exit__(*exc)


class ParquetSink:
    """Write unified conversations to Parquet atomically; `meta` is stored as a JSON string; count them.

    Columns: id string, source struct<path, line, format>, messages list<struct<role, content, train,
    tool_calls list<struct<id, name, arguments>>, name, tool_call_id>>, meta string, tools string. `meta`,
    `tools` and each call's `arguments` are JSON text (their shapes vary). prep reads such a file back as the
    `unified` format.
    """

    def __init__(self, path: str | os.PathLike[str]):
        self.path = Path(path)
        self.written = 0
        self._atomic = atomic_path(path)  # the path as given: a URL must not go through Path
        self._rows: list[dict[str, Any]] = []

    def __enter__(self) -> ParquetSink:
        import pyarrow.parquet as pq

        self._writer = pq.ParquetWriter(self._atomic.__enter__(), conversation_arrow_schema(), compression="zstd")
        return self

    def write(self, conversations: Iterable[Conversation]) -> None:
        """Buffer conversations and write a row group whenever enough are buffered."""
        for c in conversations:
            row = c.model_dump()
            row["meta"] = pydantic_core.to_json(row["meta"]).decode()
            if "tools" in row:
                row["tools"] = pydantic_core.to_json(row["tools"]).decode()
            for m in row["messages"]:
                for call in m.get("tool_calls") or ():
                    call["arguments"] = pydantic_core.to_json(call["arguments"]).decode()
            self._rows.append(row)
            self.written += 1
        if len(self._rows) >= PARQUET_ROW_GROUP:
            self._flush()

    def _flush(self) -> None:
        """Write the buffered rows as one row group."""
        import pyarrow as pa

        if self._rows:
            self._writer.write_table(pa.Table.from_pylist(self._rows, schema=conversation_arrow_schema()))
            self._rows = []

    def __exit__(self, *exc: Any) -> None:
        try:
            if exc[0] is None:
                self._flush()
        finally:
            self._writer.close()
            self._atomic.__exit__(*exc)


def conversation_arrow_schema() -> Any:
    """The Arrow schema of unified Parquet output."""
    import pyarrow as pa

    source = pa.struct([("path", pa.string()), ("line", pa.int64()), ("format", pa.string())])
    call = pa.struct([("id", pa.string()), ("name", pa.string()), ("arguments", pa.string())])
    message = pa.struct([("role", pa.string()), ("content", pa.string()), ("train", pa.bool_()),
                         ("tool_calls", pa.list_(call)), ("name", pa.string()), ("tool_call_id", pa.string())])
    return pa.schema([("id", pa.string()), ("source", source), ("messages", pa.list_(message)), ("meta", pa.string()),
                      ("tools", pa.string())])
