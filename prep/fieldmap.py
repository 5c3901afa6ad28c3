"""Per-source field mapping: read a record's fields from the keys a source actually uses.

Agent-trajectory dumps and exports keep the conversation or the tools under their own keys (`traj`,
`functions`, `dialog.turns`, a message's `speaker`/`text`). A mapping `TARGET=SOURCE` (`--field
messages=traj` on the command line, `fields: {messages: traj}` in a recipe source) moves each record's
`SOURCE` to `TARGET` before the format is detected and the record validated, so the data needs no editing:

- `TARGET` is a key a format reads (`messages`, `conversations`, `tools`, `system`, `instruction`, ...), or
  `message.KEY` for a key inside every message (`message.role=speaker`, `message.content=text`);
- `SOURCE` is a key of the record (of each message, for `message.` targets), or a dotted path into nested
  objects (`trajectory.steps`).

The moved value leaves its old place (so it is not also kept in `meta`); a record without `SOURCE` is left
as it is (and is rejected if the format needs `TARGET`).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import pydantic_core

from prep.errors import ConfigError

MESSAGE_PREFIX = "message."
MESSAGE_LISTS = ("messages", "conversations", "prompt", "completion", "chosen")  # where messages live


def parse_fields(specs: Iterable[str] | Mapping[str, str] | None, flag: str = "--field") -> dict[str, str]:
    """`TARGET=SOURCE` strings (or a mapping) as a {target: source} dict.

    Raises:
        ConfigError: a spec without `=`, an empty side, or a target given twice.

    >>> parse_fields(["messages=traj", "message.role=speaker"])
    {'messages': 'traj', 'message.role': 'speaker'}
    """
    if specs is None:
        return {}
    pairs = list(specs.items()) if isinstance(specs, Mapping) else [_split(s, flag) for s in specs]
    out: dict[str, str] = {}
    for target, source in pairs:
        if not isinstance(target, str) or not isinstance(source, str) or not target.strip() or not source.strip():
            raise ConfigError(f"{flag} {target}={source}: expected TARGET=SOURCE with two non-empty keys")
        if target in out:
            raise ConfigError(f"{flag} {target}: given twice")
        if target == MESSAGE_PREFIX.rstrip(".") or target.endswith("."):
            raise ConfigError(f"{flag} {target}={source}: name the message key, e.g. message.role=speaker")
        out[target.strip()] = source.strip()
    return out


def _split(spec: str, flag: str) -> tuple[str, str]:
    """One `TARGET=SOURCE` spec."""
    target, sep, source = spec.partition("=")
    if not sep:
        raise ConfigError(f"{flag} {spec!r}: expected TARGET=SOURCE, e.g. messages=traj or message.role=speaker")
    return target, source


def map_payload(payload: Any, fields: Mapping[str, str]) -> Any:
    """A raw row (JSON bytes or a dict) with the mapping applied; a row that is not a JSON object is returned as is.

    >>> map_payload(b'{"traj": [{"speaker": "user", "text": "hi"}], "k": 1}',
    ...             {"messages": "traj", "message.role": "speaker", "message.content": "text"})
    {'k': 1, 'messages': [{'role': 'user', 'content': 'hi'}]}
    """
    record = payload
    if isinstance(payload, (bytes, str)):
        try:
            record = pydantic_core.from_json(payload)
        except ValueError:
            return payload
    if not isinstance(record, dict):
        return payload
    return map_record(record, fields)


def map_record(record: dict[str, Any], fields: Mapping[str, str]) -> dict[str, Any]:
    """`record` with each SOURCE moved to its TARGET (top-level keys first, then keys inside messages)."""
    out = dict(record)
    for target, source in fields.items():
        if not target.startswith(MESSAGE_PREFIX):
            found, value = _take(out, source)
            if found:
                out[target] = value
    message_fields = {t[len(MESSAGE_PREFIX):]: s for t, s in fields.items() if t.startswith(MESSAGE_PREFIX)}
    if message_fields:
        for key in MESSAGE_LISTS:
            if isinstance(out.get(key), list):
                out[key] = [_map_message(m, message_fields) for m in out[key]]
    return out


def _map_message(message: Any, fields: Mapping[str, str]) -> Any:
    """One message with its keys moved (anything that is not an object is left for validation to reject)."""
    if not isinstance(message, dict):
        return message
    out = dict(message)
    for target, source in fields.items():
        found, value = _take(out, source)
        if found:
            out[target] = value
    return out


def _take(record: dict[str, Any], path: str) -> tuple[bool, Any]:
    """Remove and return the value at a dotted `path` of `record` (copying the objects along the way).

    An object left empty by the removal is removed too.
    """
    head, _, rest = path.partition(".")
    if head not in record:
        return False, None
    if not rest:
        return True, record.pop(head)
    inner = record[head]
    if not isinstance(inner, dict):
        return False, None
    inner = dict(inner)
    found, value = _take(inner, rest)
    if found:
        if inner:
            record[head] = inner
        else:
            del record[head]
    return found, value
