"""prep.validate: format detection per file, and raw rows -> raw models or Rejects with reasons."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from prep.errors import InputError
from prep.read import RawBatch
from prep.validate import detect_format, field_path, raw_text, record_format, validate_batch, validate_file
from schemas.raw import AlpacaRecord, ShareGPTRecord
from schemas.reject import Reject


def batch(payloads: list, path: str = "t.jsonl") -> RawBatch:
    return RawBatch(path, list(range(1, len(payloads) + 1)), payloads, 1.0)


def reasons(fmt: str, payloads: list) -> list[str | None]:
    """The reject reason of each payload (None when it validated)."""
    records = validate_batch(batch(payloads), fmt).records
    return [r.reason if isinstance(r, Reject) else None for r in records]


# --- detection --------------------------------------------------------------------------------


@pytest.mark.parametrize("keys, fmt", [
    ({"instruction", "input", "output"}, "alpaca"),
    ({"instruction", "context", "response", "category"}, "alpaca"),
    ({"conversations", "tools"}, "sharegpt"),
    ({"messages", "label"}, "openai"),
    ({"id", "messages"}, "openai"),
    ({"id", "source", "messages", "meta"}, "unified"),
    ({"chosen", "rejected"}, "transcript"),
    ({"prompt", "chosen", "rejected"}, "prompt_completion"),
    ({"chosen": [{"role": "user", "content": "x"}], "rejected": []}, "prompt_completion"),
    ({"prompt": [{"role": "user", "content": "x"}], "completion": [], "label": True}, "prompt_completion"),
    ({"prompt": "x", "completion": "y"}, "alpaca"),
    ({"text"}, "transcript"),
    ({"prompt", "completion"}, "alpaca"),
    ({"prompt"}, None),
    ({"question", "answer"}, None),
])
def test_record_format(keys: set[str], fmt: str | None) -> None:
    assert record_format(keys) == fmt


def test_detect_format_skips_unreadable_lines() -> None:
    assert detect_format("a.jsonl", [b"{broken", b"[1, 2]", b'{"conversations": []}']) == "sharegpt"


def test_unknown_format_names_the_file_and_the_keys() -> None:
    with pytest.raises(InputError) as e:
        detect_format("data/x.jsonl", [b'{"question": "a", "answer": "b"}'])
    msg = str(e.value)
    assert msg.startswith("data/x.jsonl: cannot detect the format")
    assert "{answer, question}" in msg and "--format" in msg


def test_ambiguous_format_names_both_formats() -> None:
    with pytest.raises(InputError, match=r"ambiguous format.*alpaca \(keys \{instruction, output\}\).*sharegpt"):
        detect_format("x.jsonl", [{"instruction": "a", "output": "b"}, {"conversations": []}])


def test_validate_file_detects_and_says_so(examples: Path) -> None:
    vf = validate_file(str(examples / "dolly.csv"))
    assert (vf.format, vf.detected) == ("alpaca", True)
    forced = validate_file(str(examples / "dolly.csv"), "alpaca")
    assert (forced.format, forced.detected) == ("alpaca", False)


def test_empty_file_is_one_clear_error(tmp: Path) -> None:
    for name in ("empty.jsonl", "blank.jsonl", "empty.json"):
        (tmp / name).write_text("\n\n" if name == "blank.jsonl" else ("[]" if name.endswith(".json") else ""))
        with pytest.raises(InputError, match=f"{name}: empty file"):
            validate_file(str(tmp / name))


@pytest.mark.parametrize("name, fmt", [
    ("alpaca/alpaca_en_demo.json", "alpaca"), ("alpaca/gpteacher_codegen-instruct.json", "alpaca"),
    ("sharegpt/sharegpt_zh_1K_format.jsonl", "sharegpt"), ("sharegpt/glaive_toolcall_zh_demo.json", "sharegpt"),
    ("messages/kto_en_demo.json", "openai"), ("hh/harmless-base_test.jsonl.gz", "transcript"),
])
def test_real_files_are_detected(shared_data: Path, name: str, fmt: str) -> None:
    assert validate_file(str(shared_data / name)).format == fmt


# --- validation -------------------------------------------------------------------------------


def test_clean_batch_gives_models_in_order() -> None:
    vb = validate_batch(batch([{"instruction": "a", "output": "b"}, {"instruction": "c", "response": "d"}]), "alpaca")
    assert [r.output for r in vb.records] == ["b", "d"]
    assert all(isinstance(r, AlpacaRecord) for r in vb.records)


def test_one_bad_row_does_not_spoil_its_batch() -> None:
    rows = [b'{"instruction": "a", "output": "b"}', b'{"instruction": 1}', b'{"instruction": "c", "output": "d"}']
    assert reasons("alpaca", rows) == [None, "wrong_type", None]


@pytest.mark.parametrize("payload, reason", [
    (b'{"instruction": "a", "output": "b"', "invalid_json"),
    (b"nonsense", "invalid_json"),
    (b'{"instruction": "caf\xe9", "output": "b"}', "invalid_utf8"),
    (b'["instruction", "output"]', "not_an_object"),
    (b'"just a string"', "not_an_object"),
    (b'{"instruction": "a"}', "missing_field"),
    (b'{"instruction": ["a"], "output": "b"}', "wrong_type"),
    (b'{"instruction": "a", "output": null}', "wrong_type"),
    (b'{"instruction": "a", "output": "b", "history": [["only one"]]}', "missing_field"),
    (b'{"instruction": "a", "output": "b", "history": [["q", "a", "extra"]]}', "invalid_value"),
])
def test_alpaca_reject_reasons(payload: bytes, reason: str) -> None:
    assert reasons("alpaca", [payload]) == [reason]


def test_reject_carries_location_raw_and_every_error() -> None:
    [r] = validate_batch(batch([b'{"instruction": 5, "extra": true}\n'], "bad.jsonl"), "alpaca").records
    assert (r.path, r.line, r.stage, r.format, r.reason) == ("bad.jsonl", 1, "convert", "alpaca", "wrong_type")
    assert [(e.field, e.message) for e in r.errors] == [
        ("instruction", "Input should be a valid string"),
        ("output", "Field required (also accepted as 'response' or 'completion')"),
    ]
    assert r.raw == '{"instruction": 5, "extra": true}'


def test_unknown_role_names_the_role() -> None:
    row = {"conversations": [{"from": "human", "value": "hi"}, {"from": "narrator", "value": "..."}]}
    [r] = validate_batch(batch([row]), "sharegpt").records
    assert r.reason == "unknown_role"
    assert r.errors[0].field == "conversations[1].from"
    assert r.errors[0].message.startswith("unknown role 'narrator'; expected one of human, user, gpt, assistant")
    assert r.errors[0].message.endswith("system (in any case)")


def test_sharegpt_role_aliases_are_accepted() -> None:
    aliases = ["human", "user", "gpt", "assistant", "chatgpt", "bing", "bard", "model", "system",
               "function_call", "observation", "tool", "function"]
    row = {"conversations": [{"from": a, "value": "x"} for a in aliases]}
    [r] = validate_batch(batch([row]), "sharegpt").records
    assert isinstance(r, ShareGPTRecord)


@pytest.mark.parametrize("fmt, row, reason, field", [
    ("openai", {"messages": [{"role": "robot", "content": "x"}]}, "unknown_role", "messages[0].role"),
    ("openai", {"messages": "hello"}, "wrong_type", "messages"),
    ("transcript", {"prompt": "x"}, "missing_field", "$"),
    ("unified", {"id": "a", "messages": [], "meta": {}, "extra": 1}, "unexpected_field", "extra"),
    ("unified", {"id": "a", "messages": [{"role": "user", "content": "x", "weight": 1}]}, "unexpected_field",
     "messages[0].weight"),
])
def test_reject_reasons_of_other_formats(fmt: str, row: dict, reason: str, field: str) -> None:
    [r] = validate_batch(batch([row]), fmt).records
    assert (r.reason, r.errors[0].field) == (reason, field)


def test_field_path_and_raw_text() -> None:
    assert field_path(("messages", 0, "content")) == "messages[0].content"
    assert field_path(()) == "$"
    assert raw_text(b"caf\xe9\r\n") == "caf\\xe9"
    assert json.loads(raw_text({"a": [1, "é"]})) == {"a": [1, "é"]}
