"""Atomic output writers: unified JSON Lines, unified Parquet, and the rejects JSON Lines.

Everything is written to a temporary file in the destination folder and moved into place with
`os.replace` only when the writer's `with` block ends without an error, so a reader never sees a
half-written file and a failed run leaves the previous output untouched.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pydantic_core

from prep.errors import OutputExistsError
from schemas.conversation import Conversation

PARQUET_ROW_GROUP = 65_536
# mkstemp creates files readable by the owner only; outputs get the usual umask-based mode instead.
_UMASK = os.umask(0)
os.umask(_UMASK)


@contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success move it onto `path`, on error delete it.

    >>> with atomic_path("out.txt") as tmp:  # doctest: +SKIP
    ...     tmp.write_text("done")
    """
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent)
    os.close(fd)
    tmp = Path(name)
    os.chmod(tmp, 0o666 & ~_UMASK)
    try:
        yield tmp
        os.replace(tmp, final)
    finally:
        tmp.unlink(missing_ok=True)


def check_outputs(outputs: Sequence[str], inputs: Sequence[str], overwrite: bool) -> None:
    """Refuse to overwrite an existing output (without `overwrite`) or any input.

    Raises:
        OutputExistsError: an output exists and overwrite is False, or an output is also an input.

    >>> check_outputs(["new.jsonl"], ["in.jsonl"], overwrite=False)
    """
    real_inputs = {os.path.realpath(p) for p in inputs}
    for out in outputs:
        if os.path.realpath(out) in real_inputs:
            raise OutputExistsError(f"{out}: output is also an input; choose another output path")
        if os.path.exists(out) and not overwrite:
            raise OutputExistsError(f"{out}: already exists; pass --overwrite to replace it")
        if os.path.isdir(out):
            raise OutputExistsError(f"{out}: is a folder; give a file path")


class JsonlSink:
    """Write JSON lines atomically; count them.

    >>> with JsonlSink("out.jsonl") as sink:  # doctest: +SKIP
    ...     sink.write([b'{"a":1}'])
    """

    def __init__(self, path: str | os.PathLike[str]):
        self.path = Path(path)
        self.written = 0
        self._atomic = atomic_path(self.path)

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
        self._atomic = atomic_path(self.path)
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
