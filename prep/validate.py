"""Detect each file's format and validate raw rows into raw models, or Rejects that say why.

Validation runs in pydantic-core (Rust): JSON Lines payloads go straight from bytes through
`TypeAdapter.validate_json`, dict rows through a list TypeAdapter's `validate_python` in one call
per batch. Only a batch that fails is validated again record by record, to find the bad ones.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from typing import Any, NamedTuple

import pydantic_core
from pydantic import ValidationError

from prep.errors import InputError, location_path
from prep.fieldmap import map_payload
from prep.read import BATCH_SIZE, RawBatch, read_batches
from schemas.raw import (
    BATCH_ADAPTERS,
    FIELD_ALIASES,
    FORMAT_NAMES,
    OPENAI_ROLES,
    RECORD_ADAPTERS,
    SHAREGPT_ROLES,
    RawRecord,
)
from schemas.reject import ErrorDetail, Reject

SAMPLE_SIZE = 32
JSON_TEXT_FIELDS = ("conversations", "messages", "history")  # list fields that may come as JSON text
STAGE = "convert"

# Detection: a record's format is the first whose signature it matches (most specific first).
SIGNATURES: dict[str, str] = {
    "unified": "id + messages + (meta or source)",
    "openai": "messages",
    "sharegpt": "conversations",
    "alpaca": "instruction (or prompt + completion texts)",
    "prompt_completion": "prompt + completion or chosen (messages or texts), or chosen messages",
    "transcript": "text or chosen",
}


class ValidatedBatch(NamedTuple):
    """A RawBatch after validation: one raw model or Reject per row, in row order, with the payloads as read."""

    path: str
    format: str
    lines: list[int]
    records: list[RawRecord | Reject]
    payloads: list[Any]
    done: float


class ValidatedFile(NamedTuple):
    """One input's format (`detected` when chosen by auto-detection) and its validated batches."""

    path: str
    format: str
    detected: bool
    batches: Iterator[ValidatedBatch]


def record_format(keys: Any) -> str | None:
    """The format a record's keys point to (and, given the record, its values), or None.

    Text prompt/completion pairs are alpaca; message lists in them, or a `prompt` with a `chosen` answer, are
    TRL's prompt_completion; a `chosen` text without a prompt is a whole transcript (hh-rlhf).

    >>> record_format({"instruction": "x", "output": "y"})
    'alpaca'
    >>> record_format({"id": "a", "messages": [], "meta": {}})
    'unified'
    >>> record_format({"prompt": [{"role": "user", "content": "x"}], "completion": [], "label": True})
    'prompt_completion'
    """
    values = keys if isinstance(keys, dict) else {}
    if "messages" in keys:
        return "unified" if "id" in keys and ("meta" in keys or "source" in keys) else "openai"
    if "conversations" in keys:
        return "sharegpt"
    if "instruction" in keys:
        return "alpaca"
    if "prompt" in keys and "completion" in keys:
        lists = any(isinstance(values.get(k), list) for k in ("prompt", "completion"))
        return "prompt_completion" if lists else "alpaca"
    if "text" in keys:
        return "transcript"
    if "chosen" in keys:
        return "prompt_completion" if "prompt" in keys or isinstance(values.get("chosen"), list) else "transcript"
    return None


def detect_format(path: str, payloads: list[Any]) -> str:
    """Detect a file's format from its first records (JSON bytes or dicts); unreadable ones are skipped.

    Args:
        path: the file, for error messages.
        payloads: the first rows of the file.
    Returns:
        the format name.
    Raises:
        InputError: no record matches a format, or records match different formats.

    >>> detect_format("a.jsonl", [b'{"conversations": []}', b'not json'])
    'sharegpt'
    """
    seen: dict[str, str] = {}
    key_sets: list[str] = []
    for payload in payloads:
        record = _as_object(payload)
        if record is None:
            continue
        keys = "{" + ", ".join(sorted(record)) + "}"
        fmt = record_format(record)
        if fmt is None:
            key_sets.append(keys)
        else:
            seen.setdefault(fmt, keys)
    if len(seen) == 1:
        return next(iter(seen))
    hint = "; pass --format NAME (" + ", ".join(FORMAT_NAMES) + ")"
    if len(seen) > 1:
        found = "; ".join(f"{fmt} (keys {keys})" for fmt, keys in seen.items())
        raise InputError(f"ambiguous format: the first records look like {found}{hint}", path=path)
    shown = ", ".join(dict.fromkeys(key_sets)) or "no JSON objects"
    expected = "; ".join(f"{fmt}: {sig}" for fmt, sig in SIGNATURES.items())
    raise InputError(f"cannot detect the format: saw {shown}; expected keys {expected}{hint}", path=path)


def _as_object(payload: Any) -> dict[str, Any] | None:
    """A payload as a dict for detection, or None when it is not a JSON object."""
    if isinstance(payload, dict):
        return payload
    try:
        value = pydantic_core.from_json(payload)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def validate_file(path: str, format: str = "auto", batch_size: int = BATCH_SIZE,
                  fields: dict[str, str] | None = None) -> ValidatedFile:
    """Open one input, settle its format (detecting it from the first records when `auto`) and validate it lazily.

    Args:
        path: one input (see prep.read).
        format: a name from schemas.raw.FORMAT_NAMES, or "auto".
        batch_size: rows per batch.
        fields: a field mapping (prep.fieldmap), applied to every row before detection and validation.
    Returns:
        a ValidatedFile whose `batches` streams the file.
    Raises:
        InputError: the file is empty, unreadable, or its format cannot be detected.

    >>> vf = validate_file("examples/alpaca.json")
    >>> vf.format, vf.detected
    ('alpaca', True)
    """
    batches = read_batches(path, batch_size)
    if fields:
        batches = (b._replace(payloads=[map_payload(p, fields) for p in b.payloads]) for b in batches)
    head: list[RawBatch] = []
    sample: list[Any] = []
    for batch in batches:
        head.append(batch)
        sample.extend(batch.payloads[:SAMPLE_SIZE - len(sample)])
        if len(sample) >= SAMPLE_SIZE:
            break
    if not head:
        raise InputError("empty file: no records", path=path)
    detected = format == "auto"
    fmt = detect_format(path, sample) if detected else format
    validated = (validate_batch(b, fmt) for b in itertools.chain(head, batches))
    return ValidatedFile(path, fmt, detected, validated)


def validate_batch(batch: RawBatch, format: str) -> ValidatedBatch:
    """Validate every row of a batch as `format`; each row becomes a raw model or a Reject.

    >>> from prep.read import RawBatch
    >>> vb = validate_batch(RawBatch("a.jsonl", [1, 2], [b'{"instruction": "a", "output": "b"}', b"{"], 1.0), "alpaca")
    >>> [type(r).__name__ for r in vb.records]
    ['AlpacaRecord', 'Reject']
    """
    payloads = batch.payloads
    try:
        if payloads and isinstance(payloads[0], bytes):
            validate = RECORD_ADAPTERS[format].validator.validate_json  # pydantic-core's own: no wrapper per row
            records: list[Any] = [validate(p) for p in payloads]
        else:
            records = BATCH_ADAPTERS[format].validate_python(payloads)
    except ValidationError:
        records = [_validate_one(batch.path, line, p, format) for line, p in zip(batch.lines, payloads, strict=True)]
    return ValidatedBatch(batch.path, format, batch.lines, records, payloads, batch.done)


def _validate_one(path: str, line: int, payload: Any, format: str) -> RawRecord | Reject:
    """Validate one row; a failure becomes a Reject carrying every error.

    A list field given as JSON text (a CSV cell, a string column of a Parquet or HF export) is decoded and the
    row validated again; only rows that fail take this path, so valid rows pay nothing for it.
    """
    adapter = RECORD_ADAPTERS[format]
    try:
        if isinstance(payload, bytes):
            return adapter.validate_json(payload)
        return adapter.validate_python(payload)
    except ValidationError as e:
        error = e
    decoded = _json_text_decoded(payload, error)
    if decoded is not None:
        try:
            return adapter.validate_python(decoded)
        except ValidationError as e:
            return reject_from_error(path, line, format, payload, e, decoded)
    return reject_from_error(path, line, format, payload, error)


def _json_text_decoded(payload: Any, error: ValidationError) -> dict[str, Any] | None:
    """The row with its JSON_TEXT_FIELDS that hold a JSON list as a string decoded, when `error` is about such a
    field being a string; otherwise None.

    >>> from schemas.raw import RECORD_ADAPTERS
    >>> row = {"messages": '[{"role": "user", "content": "hi"}]'}
    >>> try:
    ...     RECORD_ADAPTERS["openai"].validate_python(row)
    ... except ValidationError as e:
    ...     _json_text_decoded(row, e)
    {'messages': [{'role': 'user', 'content': 'hi'}]}
    """
    fields = {d["loc"][0] for d in error.errors() if d["type"] in ("list_type", "tuple_type") and len(d["loc"]) == 1}
    fields &= set(JSON_TEXT_FIELDS)
    record = _as_object(payload) if fields else None
    if record is None:
        return None
    decoded = dict(record)
    for field in fields:
        value = record.get(field)
        try:
            items = pydantic_core.from_json(value) if isinstance(value, str) else None
        except ValueError:
            continue
        if isinstance(items, list):
            decoded[field] = items
    return decoded if decoded != record else None


def reject_from_error(path: str, line: int, format: str, payload: Any, error: ValidationError,
                      record: Any = None) -> Reject:
    """Turn a ValidationError into a Reject: a reason code for the first error, and every error listed.

    For a field that may hold several types (text or messages), only the errors of the type the record actually
    has are listed, and pydantic's type tags are left out of the field paths. `record` is the row the error's
    locations refer to (default: the payload, parsed).

    >>> from schemas.raw import RECORD_ADAPTERS
    >>> try:
    ...     RECORD_ADAPTERS["sharegpt"].validate_python({"conversations": [{"from": "robot", "value": "hi"}]})
    ... except ValidationError as e:
    ...     r = reject_from_error("a.jsonl", 1, "sharegpt", {}, e)
    >>> r.reason, r.errors[0].field
    ('unknown_role', 'conversations[0].from')
    """
    record = _as_object(payload) if record is None else record
    located = [(d, *_untagged(d["loc"], record)) for d in error.errors(include_url=False)]
    fitting = [(d, loc) for d, loc, fits in located if fits] or [(d, loc) for d, loc, _ in located]
    details = [{**d, "loc": loc} for d, loc in fitting]
    reason = _reason(details[0], payload)
    errors = [ErrorDetail(field=field_path(d["loc"]), message=_record_error_text(d, payload)) for d in details]
    return Reject(path=path, line=line, stage=STAGE, reason=reason, errors=errors, raw=raw_text(payload), format=format)


_TYPE_TAGS = {"str": str, "list": list, "dict": dict, "int": int, "float": float, "bool": bool}


def _untagged(loc: tuple[Any, ...], record: Any) -> tuple[tuple[Any, ...], bool]:
    """An error location without pydantic's union tags (`str`, `list[OpenAIMessage]`...), and whether every tag
    names the type the record has there (an error of another branch says nothing about this record).

    >>> _untagged(("prompt", "list[OpenAIMessage]", 0, "role"), {"prompt": [{"role": "robot"}]})
    (('prompt', 0, 'role'), True)
    >>> _untagged(("prompt", "str"), {"prompt": [{"role": "robot"}]})
    (('prompt',), False)
    """
    value, kept, fits = record, [], True
    for part in loc:
        if isinstance(part, str) and not (isinstance(value, dict) and part in value) and _is_type_tag(part):
            expected = _TYPE_TAGS.get(part.split("[", 1)[0])
            fits = fits and (expected is None or isinstance(value, expected))
            continue
        kept.append(part)
        if isinstance(part, int):
            value = value[part] if isinstance(value, list) and 0 <= part < len(value) else None
        else:
            value = value.get(part) if isinstance(value, dict) else None
    return tuple(kept), fits


def _is_type_tag(part: str) -> bool:
    """True for a pydantic union tag such as `str`, `none`, `list[ContentPart]` or `literal[0,1]` (no field of
    prep's raw models has such a name)."""
    return part in _TYPE_TAGS or part == "none" or ("[" in part and part.endswith("]"))


def _reason(detail: Any, payload: Any) -> str:
    """A short, stable reason code for one pydantic error."""
    kind, loc = detail["type"], detail["loc"]
    if kind == "json_invalid":
        return "invalid_utf8" if _bad_utf8(payload) else "invalid_json"
    if not loc and kind in ("model_type", "model_attributes_type", "dict_type"):
        return "not_an_object"
    if loc and loc[0] == "tools":
        return "invalid_tools"
    if "tool_calls" in loc:
        return "invalid_tool_call"
    if kind == "missing":
        return "missing_field"
    if kind == "string_pattern_mismatch" and loc and loc[-1] in ("from", "role"):
        return "unknown_role"
    if kind == "extra_forbidden":
        return "unexpected_field"
    if kind.endswith("_type"):
        return "wrong_type"
    return "invalid_value"


def _record_error_text(detail: Any, payload: Any) -> str:
    """A readable message for one pydantic error (names the role, the alias, the bad byte)."""
    kind, loc, msg = detail["type"], detail["loc"], detail["msg"]
    if kind == "string_pattern_mismatch" and loc and loc[-1] in ("from", "role"):
        roles = SHAREGPT_ROLES if loc[0] == "conversations" else OPENAI_ROLES
        return f"unknown role {detail['input']!r}; expected one of {', '.join(roles)} (in any case)"
    if kind == "missing" and loc and loc[-1] in FIELD_ALIASES:
        others = " or ".join(repr(a) for a in FIELD_ALIASES[loc[-1]])
        return f"{msg} (also accepted as {others})"
    if kind == "json_invalid" and _bad_utf8(payload):
        try:
            payload.decode("utf-8")
        except UnicodeDecodeError as e:
            return f"line is not valid UTF-8: {e.reason} at byte {e.start}"
    return msg


def _bad_utf8(payload: Any) -> bool:
    """True for bytes that do not decode as UTF-8."""
    if not isinstance(payload, bytes):
        return False
    try:
        payload.decode("utf-8")
    except UnicodeDecodeError:
        return True
    return False


def field_path(loc: tuple[Any, ...]) -> str:
    """Render a pydantic location as a field path; the whole record is `$`.

    >>> field_path(("conversations", 2, "from"))
    'conversations[2].from'
    """
    return location_path(loc) or "$"


def raw_text(payload: Any) -> str:
    """The record as read: a line's text (bad bytes as backslash escapes), or a row as JSON.

    >>> raw_text(b'{"a": "\\xff"}\\n')
    '{"a": "\\\\xff"}'
    """
    if isinstance(payload, bytes):
        return payload.decode("utf-8", "backslashreplace").rstrip("\r\n")
    return pydantic_core.to_json(payload, fallback=repr).decode()
