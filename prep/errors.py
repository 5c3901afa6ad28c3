"""Errors the library raises; the CLI formats them once and exits 1."""

from __future__ import annotations


class PrepError(Exception):
    """Base class: a problem the user can fix, with a message that says how."""


class InputError(PrepError):
    """Unusable input: names the file, and the line and field where known.

    >>> str(InputError("missing file", path="a.jsonl"))
    'a.jsonl: missing file'
    """

    def __init__(self, msg: str, path: str | None = None, line: int | None = None, field: str | None = None):
        self.msg, self.path, self.line, self.field = msg, path, line, field
        where = ":".join(str(x) for x in (path, line) if x is not None)
        if field:
            where = f"{where} [{field}]" if where else f"[{field}]"
        super().__init__(f"{where}: {msg}" if where else msg)


class OutputExistsError(PrepError):
    """The output exists and `--overwrite` was not given."""


class ConfigError(PrepError):
    """An option or a config/template/recipe file is invalid."""


class ShardError(PrepError):
    """Shards are missing, corrupt or do not match their manifest."""


class AccountingError(PrepError):
    """read != accepted + rejected (+ deduplicated): a bug, never a user error."""
