"""Errors the library raises; the CLI formats them once and exits 1."""

from __future__ import annotations

from collections.abc import Sequence


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


def location_path(loc: Sequence[str | int]) -> str:
    """A pydantic error location as a path: keys joined by dots, list indices in brackets ("" for the root).

    >>> location_path(("sources", 1, "weight"))
    'sources[1].weight'
    """
    text = ""
    for part in loc:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text


def flag_error(error: Exception) -> ConfigError:
    """One ConfigError naming the flag, from a pydantic ValidationError raised by a stage config.

    Takes the first error only: one clear line is the CLI's contract. (No pydantic import here, so that
    `prep train` runs where pydantic is missing.)
    """
    detail = error.errors(include_url=False)[0]  # type: ignore[attr-defined]
    flag = "--" + "-".join(str(p) for p in detail["loc"]).replace("_", "-") if detail["loc"] else "options"
    return ConfigError(f"{flag}: {str(detail['msg']).removeprefix('Value error, ')}")
