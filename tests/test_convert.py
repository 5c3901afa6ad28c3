"""prep.convert: per-format converters, the shared rules, and whole runs on real and bad data."""

from __future__ import annotations

import gzip
import json
import os
import tracemalloc
from collections import Counter
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from prep.convert import (
    DraftTurn,
    _is_clean,
    alpaca_turns,
    check_strict,
    convert_files,
    convert_record,
    default_rejects_path,
    fold_reasoning,
    iter_conversations,
    normalize_turns,
    parse_transcript,
    strip_separator,
)
from prep.errors import AccountingError, InputError, OutputExistsError, PrepError
from prep.read import RawBatch
from prep.report import Report
from prep.validate import validate_batch
from schemas.config import ConvertConfig
from schemas.conversation import Conversation, ToolCall, content_hash, conversation_problems
from schemas.raw import RECORD_ADAPTERS, AlpacaRecord
from schemas.reject import Reject

REPO = Path(__file__).resolve().parents[1]


def convert_one(fmt: str, row: dict) -> Conversation | Reject:
    return convert_record(RECORD_ADAPTERS[fmt].validate_python(row), fmt)


def pairs(c: Conversation) -> list[tuple[str, str]]:
    return [(m.role, m.content) for m in c.messages]


def run(inputs: list, out: Path, **options) -> Report:
    return convert_files(ConvertConfig(inputs=[str(p) for p in inputs], output=str(out), **options))


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


# --- converters, one per format --------------------------------------------------------------


@pytest.mark.parametrize("row, expected", [
    ({"instruction": "Sum", "input": "2 2", "output": "4"}, [("user", "Sum\n\n2 2"), ("assistant", "4")]),
    ({"instruction": "Hi", "input": "", "output": "Hello"}, [("user", "Hi"), ("assistant", "Hello")]),
    ({"instruction": "Hi", "input": None, "output": "Hello"}, [("user", "Hi"), ("assistant", "Hello")]),
    ({"instruction": "", "input": "only input", "output": "ok"}, [("user", "only input"), ("assistant", "ok")]),
    ({"instruction": "Q", "context": "C", "response": "R", "category": "qa"}, [("user", "Q\n\nC"), ("assistant", "R")]),
    ({"instruction": "Q", "output": "A", "system": "Be brief.", "history": [["q0", "a0"]]},
     [("system", "Be brief."), ("user", "q0"), ("assistant", "a0"), ("user", "Q"), ("assistant", "A")]),
    ({"prompt": "Translate: chat", "completion": "cat"}, [("user", "Translate: chat"), ("assistant", "cat")]),
])
def test_alpaca(row: dict, expected: list) -> None:
    assert pairs(convert_one("alpaca", row)) == expected


def test_alpaca_keeps_unknown_keys_in_meta_and_source() -> None:
    c = convert_one("alpaca", {"instruction": "Q", "context": "", "response": "R", "category": "open_qa"})
    assert c.meta == {"category": "open_qa"}
    assert (c.source.format, c.id) == ("alpaca", content_hash(c.messages))


def test_sharegpt_function_call_and_observation_become_a_call_and_its_result() -> None:
    row = {"conversations": [{"from": "human", "value": "Weather in Oslo?"},
                             {"from": "function_call", "value": '{"name": "weather", "arguments": {"city": "Oslo"}}'},
                             {"from": "observation", "value": '{"temp": -3}'},
                             {"from": "gpt", "value": "It is -3 °C."}], "tools": '[{"name": "weather"}]'}
    c = convert_one("sharegpt", row)
    assert pairs(c) == [("user", "Weather in Oslo?"), ("assistant", ""), ("tool", '{"temp": -3}'),
                        ("assistant", "It is -3 °C.")]
    assert c.messages[1].tool_calls == [ToolCall(name="weather", arguments={"city": "Oslo"})]
    assert c.tools == [{"type": "function", "function": {"name": "weather"}}] and c.meta == {}


def test_sharegpt_system_field_and_role_content_keys() -> None:
    row = {"system": "Be kind.",
           "conversations": [{"role": "user", "content": "hi"}, {"role": "chatgpt", "content": "hey"}]}
    assert pairs(convert_one("sharegpt", row)) == [("system", "Be kind."), ("user", "hi"), ("assistant", "hey")]


def test_openai_tool_calls_and_tool_messages_keep_their_structure() -> None:
    row = {"messages": [{"role": "user", "content": "EUR to USD?"},
                        {"role": "assistant", "content": None, "tool_calls": [
                            {"id": "c1", "type": "function", "function": {"name": "rate", "arguments": '{"to": "USD"}'}}]},
                        {"role": "tool", "content": "1.08", "tool_call_id": "c1", "name": "rate"},
                        {"role": "assistant", "content": "About 1.08."}], "label": True}
    c = convert_one("openai", row)
    assert pairs(c) == [("user", "EUR to USD?"), ("assistant", ""), ("tool", "1.08"), ("assistant", "About 1.08.")]
    assert c.messages[1].tool_calls == [ToolCall(id="c1", name="rate", arguments={"to": "USD"})]
    assert (c.messages[2].name, c.messages[2].tool_call_id) == ("rate", "c1")
    assert c.meta == {"label": True} and c.tools is None


def test_openai_developer_role_content_parts_and_weights() -> None:
    row = {"messages": [{"role": "developer", "content": "Answer in French."},
                        {"role": "User", "content": [{"type": "text", "text": "Hello, "}, {"type": "text", "text": "how?"}]},
                        {"role": "assistant", "content": "Bonjur.", "weight": 0},
                        {"role": "user", "content": "Again?"},
                        {"role": "assistant", "content": "Bonjour.", "weight": 1}]}
    c = convert_one("openai", row)
    assert pairs(c) == [("system", "Answer in French."), ("user", "Hello, how?"), ("assistant", "Bonjur."),
                        ("user", "Again?"), ("assistant", "Bonjour.")]
    assert [m.train for m in c.messages] == [None, None, False, None, True]


def test_message_level_keys_are_kept_and_reasoning_is_folded_into_the_reply(tmp: Path) -> None:
    row = {"messages": [{"role": "user", "content": "2+2?", "name": "ana"},
                        {"role": "assistant", "content": "4", "reasoning_content": "Two plus two is four."},
                        {"role": "user", "content": "And 3+3?", "reasoning": "not an assistant: kept"},
                        {"role": "assistant", "content": "6", "thinking": "", "refusal": None}]}
    c = convert_one("openai", row)
    assert pairs(c)[1] == ("assistant", "<think>\nTwo plus two is four.\n</think>\n\n4")
    assert pairs(c)[3] == ("assistant", "6")  # empty reasoning: nothing to fold
    assert c.meta == {"message_fields": {"messages[0]": {"name": "ana"},
                                         "messages[2]": {"reasoning": "not an assistant: kept"},
                                         "messages[3]": {"refusal": None}},
                      "reasoning_folded": 1}
    sharegpt = convert_one("sharegpt", {"system": "S", "conversations": [
        {"from": "human", "value": "q"}, {"from": "gpt", "value": "a", "thinking": "t", "weight": 1}]})
    assert pairs(sharegpt) == [("system", "S"), ("user", "q"), ("assistant", fold_reasoning("t", "a"))]
    assert sharegpt.meta == {"message_fields": {"conversations[1]": {"weight": 1}}, "reasoning_folded": 1}
    path = tmp / "r.jsonl"
    path.write_text(json.dumps(row) + "\n" + json.dumps(row) + "\n")
    report = run([path], tmp / "out.jsonl")
    assert report.total.events["reasoning_folded"] == 2


def test_openai_weight_other_than_0_or_1_is_a_reject() -> None:
    [r] = validate_batch(RawBatch("w.jsonl", [1], [b'{"messages": [{"role": "user", "content": "q"}, '
                                                   b'{"role": "assistant", "content": "a", "weight": 0.5}]}'], 1.0),
                         "openai").records
    assert r.reason == "invalid_value" and r.errors[0].field == "messages[1].weight"


@pytest.mark.parametrize("text, expected", [
    ("\n\nHuman: Hi\n\nAssistant: Hello!", [("user", "Hi"), ("assistant", "Hello!")]),
    ("Human: Hi\n\nAssistant: Hello!  \n", [("user", "Hi"), ("assistant", "Hello!")]),
    ("### Human: What is 2+2?### Assistant: 4", [("user", "What is 2+2?"), ("assistant", "4")]),
    ("Be brief.\n### Human: Hi\n### Assistant: Hey", [("system", "Be brief."), ("user", "Hi"), ("assistant", "Hey")]),
    ("###instruction### Add 2+2 ###response### 4 ###", [("user", "Add 2+2"), ("assistant", "4")]),
    ("###human###\nHi\n###assistant###\nHey\n###human### More? ###assistant### Sure.",
     [("user", "Hi"), ("assistant", "Hey"), ("user", "More?"), ("assistant", "Sure.")]),
    ("###system### One word. ###human### Hot? ###assistant### Cold ###",
     [("system", "One word."), ("user", "Hot?"), ("assistant", "Cold")]),
    ("###instruction### Markdown? ###response### # Title ###", [("user", "Markdown?"), ("assistant", "# Title")]),
])
def test_parse_transcript(text: str, expected: list) -> None:
    assert parse_transcript(text) == expected


def test_transcript_keeps_code_indentation_and_inner_blank_lines() -> None:
    text = "\n\nHuman: Show code\n\nAssistant:\n    def f():\n\n        return 1\n"
    assert parse_transcript(text)[1] == ("assistant", "    def f():\n\n        return 1")


@pytest.mark.parametrize("raw, kept", [
    (" Hello ", "Hello"), ("\n\n  code()\n", "  code()"), ("a\n\n  b  \n", "a\n\n  b"), ("  \n ", ""),
    ("\tx", "x"),
])
def test_strip_separator(raw: str, kept: str) -> None:
    assert strip_separator(raw) == kept


def test_transcript_rejected_kept_in_meta() -> None:
    row = {"chosen": "\n\nHuman: a\n\nAssistant: b", "rejected": "\n\nHuman: a\n\nAssistant: c"}
    c = convert_one("transcript", row)
    assert pairs(c) == [("user", "a"), ("assistant", "b")]
    assert c.meta == {"rejected": "\n\nHuman: a\n\nAssistant: c"}


def test_transcript_without_markers_is_rejected() -> None:
    r = convert_one("transcript", {"text": "plain prose"})
    assert (r.reason, r.errors[0].field) == ("unparsable_transcript", "text")


def test_unified_record_converts_to_itself() -> None:
    original = convert_one("alpaca", {"instruction": "Q", "output": "A", "category": "x"})
    again = convert_one("unified", json.loads(original.model_dump_json()))
    assert again == original


# --- the rules ------------------------------------------------------------------------------


def T(role: str, content: str = "x") -> DraftTurn:
    return DraftTurn(role, content)


@pytest.mark.parametrize("roles, kept, merged, trailing", [
    ("ua", "ua", 0, 0),
    ("uua", "ua", 1, 0),
    ("uuuaau", "ua", 3, 1),
    ("suaa", "sua", 1, 0),
    ("uauu", "ua", 0, 2),
    ("u", "", 0, 1),
])
def test_normalize_turns(roles: str, kept: str, merged: int, trailing: int) -> None:
    names = {"s": "system", "u": "user", "a": "assistant"}
    out, n_merged, removed = normalize_turns([T(names[r], f"{r}{i}") for i, r in enumerate(roles)])
    assert "".join(t.role[0] for t in out) == kept
    assert (n_merged, len(removed)) == (merged, trailing)


def test_merge_joins_with_blank_line_and_counts_in_meta() -> None:
    values = [("human", "a"), ("human", "b"), ("gpt", "c"), ("gpt", ""), ("gpt", "d")]
    row = {"conversations": [{"from": f, "value": v} for f, v in values]}
    c = convert_one("sharegpt", row)
    assert pairs(c) == [("user", "a\n\nb"), ("assistant", "c\n\nd")]
    assert c.meta == {"merged_turns": 3}


def test_trailing_user_turns_are_removed_and_kept_in_meta() -> None:
    row = {"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"},
                             {"from": "human", "value": "more?"}, {"from": "human", "value": "hello?"}]}
    c = convert_one("sharegpt", row)
    assert pairs(c) == [("user", "q"), ("assistant", "a")]
    assert c.meta == {"trailing_user": ["more?", "hello?"]}


@pytest.mark.parametrize("roles_values, reason, field", [
    ([("gpt", "Hi!"), ("human", "q"), ("gpt", "a")], "starts_with_assistant", "conversations[0]"),
    ([("system", "s"), ("gpt", "Hi!")], "starts_with_assistant", "conversations[1]"),
    ([("human", "q"), ("gpt", "  \n ")], "empty_response", "conversations[1]"),
    ([("human", "q")], "no_assistant_turn", "$"),
    ([("system", "s")], "no_assistant_turn", "$"),
    ([("human", "q"), ("gpt", "a"), ("system", "late"), ("human", "q2"), ("gpt", "a2")], "misplaced_system",
     "conversations[2]"),
])
def test_rule_rejects(roles_values: list, reason: str, field: str) -> None:
    r = convert_one("sharegpt", {"conversations": [{"from": f, "value": v} for f, v in roles_values]})
    assert (r.reason, r.errors[0].field) == (reason, field)


def test_empty_user_content_is_allowed_and_whitespace_is_kept() -> None:
    c = convert_one("openai", {"messages": [{"role": "user", "content": ""},
                                            {"role": "assistant", "content": "  ```\n  code\n```\n"}]})
    assert pairs(c) == [("user", ""), ("assistant", "  ```\n  code\n```\n")]


roles = st.sampled_from(["human", "gpt", "system", "observation", "function_call"])
contents = st.sampled_from(["", " ", "\n", "hi", "  indented\n", "x\n\ny"])


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(roles, contents), max_size=8))
def test_rules_property(turns: list[tuple[str, str]]) -> None:
    """Every record is accepted (and then obeys every rule) or rejected; no content is lost."""
    row = {"conversations": [{"from": f, "value": v} for f, v in turns]}
    result = convert_one("sharegpt", row)
    if isinstance(result, Reject):
        return
    assert conversation_problems(result.messages) == []
    Conversation.model_validate(result.model_dump())  # the validator re-checks the rules
    kept = "\x00".join([m.content for m in result.messages] + result.meta.get("trailing_user", []))
    for _, value in turns:
        assert value == "" or value in kept


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["system", "user", "assistant"]), contents), max_size=7))
def test_clean_fast_path_implies_no_problems(turns: list[tuple[str, str]]) -> None:
    ts = [DraftTurn(r, c) for r, c in turns]
    if _is_clean(ts):
        assert conversation_problems(ts) == []  # type: ignore[arg-type]
        assert normalize_turns(ts) == (ts, 0, [])


def test_fast_json_line_equals_model_dump_json(tmp: Path, examples: Path) -> None:
    report = run([examples / name for name in EXAMPLES], tmp / "out.jsonl")
    lines = (tmp / "out.jsonl").read_bytes().splitlines()
    assert len(lines) == report.total.accepted
    for line in lines:
        assert Conversation.model_validate_json(line).model_dump_json().encode() == line


# --- real data: every format converts, counts exact ---------------------------------------------

REAL = {
    # name: (read, accepted, rejected by reason, changes)
    "alpaca/alpaca_en_demo.json": (999, 999, {}, {}),
    "alpaca/alpaca_zh_demo.json": (1000, 1000, {}, {}),
    "alpaca/gpteacher_codegen-instruct.json": (4535, 4535, {}, {}),  # `response` key, no empty answers
    "alpaca/identity.json": (91, 91, {}, {}),
    # 4 `chosen` transcripts end with an empty "Assistant:" turn (lines 87, 517, 926, 1104);
    # 8 transcripts have two same-speaker turns in a row (one merge each).
    "hh/harmless-base_test.jsonl.gz": (2312, 2308, {"empty_response": 4}, {"merged_turns": 8}),
    "messages/kto_en_demo.json": (300, 300, {}, {}),
    # glaive: every function_call is an assistant message with one call, answered by one observation (a tool
    # result). In 2 zh dialogues (rows 197, 293) the translation folded the call into the gpt text, so the
    # observation after it answers no call: orphan_tool_result.
    "sharegpt/glaive_toolcall_en_demo.json": (300, 300, {}, {"tool_calls": 211, "tool_results": 211}),
    "sharegpt/glaive_toolcall_zh_demo.json": (300, 298, {"orphan_tool_result": 2},
                                              {"tool_calls": 216, "tool_results": 216}),
    # 7 chats end with a human turn: 6 are kept, trimmed; the 7th (line 781) is a lone human message, so
    # nothing is left after trimming: no_assistant_turn. The one empty human value (line 59) is allowed.
    "sharegpt/sharegpt_zh_1K_format.jsonl": (1000, 999, {"no_assistant_turn": 1}, {"trimmed_trailing_user": 6}),
}
# Exact duplicates (same messages and tools): alpaca en 14, zh 8; glaive en 35 (whole-record duplicates; 3 more
# records have the messages of another but other `tools`, so they are kept), glaive zh 43. None across files.
DUPLICATES = {"alpaca/alpaca_en_demo.json": 14, "alpaca/alpaca_zh_demo.json": 8,
              "sharegpt/glaive_toolcall_en_demo.json": 35, "sharegpt/glaive_toolcall_zh_demo.json": 43}


@pytest.fixture(scope="module")
def real_run(shared_data: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Report, Path]:
    out = tmp_path_factory.mktemp("real") / "all.jsonl"
    return run([shared_data / name for name in REAL], out), out


def test_real_data_counts_are_exact(real_run: tuple[Report, Path], shared_data: Path) -> None:
    report, _ = real_run
    rows = {os.path.relpath(r.name, shared_data): r for r in report.rows}
    assert sorted(rows) == sorted(REAL)
    for name, (read, accepted, rejected, changes) in REAL.items():
        c = rows[name].counts
        assert (c.read, c.accepted, dict(c.rejected), dict(c.events), c.deduplicated) == \
            (read, accepted, rejected, changes, 0), name


def test_real_data_nothing_is_lost(real_run: tuple[Report, Path]) -> None:
    report, out = real_run
    total = report.total
    assert total.read == 10_837 == total.accepted + total.rejected_total
    assert len(out.read_bytes().splitlines()) == total.accepted
    rejects = read_jsonl(Path(report.outputs["rejects"]))
    assert len(rejects) == total.rejected_total == 7
    hh = sorted(r["line"] for r in rejects if r["path"].endswith(".gz"))
    assert hh == [87, 517, 926, 1104]
    assert [r["line"] for r in rejects if r["path"].endswith("1K_format.jsonl")] == [781]
    orphans = [(r["line"], r["errors"][0]["field"]) for r in rejects if r["reason"] == "orphan_tool_result"]
    assert orphans == [(197, "conversations[2]"), (293, "conversations[2]")]


def test_real_data_details(real_run: tuple[Report, Path]) -> None:
    _, out = real_run
    records = read_jsonl(out)
    by_file = Counter(Path(r["source"]["path"]).name for r in records)
    assert by_file["kto_en_demo.json"] == 300
    glaive = [r for r in records if "glaive" in r["source"]["path"]]
    assert not any("tools" in r["meta"] for r in glaive)
    assert sum("tools" in r for r in glaive) == 191 + 198  # records whose `tools` is not "[]", en + zh
    calls = [m for r in glaive for m in r["messages"] if "tool_calls" in m]
    assert len(calls) == 211 + 216 and all(m["content"] == "" and len(m["tool_calls"]) == 1 for m in calls)
    assert sum(any("tool_calls" in m for m in r["messages"]) for r in glaive) == 153 + 157  # dialogues with calls
    kto = [r for r in records if r["source"]["path"].endswith("kto_en_demo.json")]
    assert Counter(r["meta"]["label"] for r in kto) == {True: 150, False: 150}
    sharegpt = {r["source"]["line"]: r for r in records if r["source"]["path"].endswith("1K_format.jsonl")}
    assert sorted(k for k, r in sharegpt.items() if "trailing_user" in r["meta"]) == [119, 341, 587, 708, 917, 986]
    assert sharegpt[59]["messages"][2] == {"role": "user", "content": "", "train": None}
    hh = {r["source"]["line"]: r for r in records if r["source"]["path"].endswith(".gz")}
    assert sorted(k for k, r in hh.items() if r["meta"].get("merged_turns")) == \
        [668, 764, 1255, 1320, 1689, 1850, 1953, 2037]
    assert all("rejected" in r["meta"] for r in hh.values())


def test_real_data_dedup(shared_data: Path, tmp: Path) -> None:
    report = run([shared_data / name for name in REAL], tmp / "dedup.jsonl", dedup=True)
    got = {os.path.relpath(r.name, shared_data): r.counts.deduplicated for r in report.rows}
    assert {k: v for k, v in got.items() if v} == DUPLICATES
    assert report.total.accepted == 10_830 - sum(DUPLICATES.values())
    report.check_accounting()


def test_iter_conversations_streams_models_and_fills_the_report(shared_data: Path) -> None:
    report = Report("pack")
    items = list(iter_conversations(shared_data / "sharegpt" / "sharegpt_zh_1K_format.jsonl", report=report))
    assert len(items) == 1000 and sum(isinstance(i, Reject) for i in items) == 1
    assert isinstance(items[0], Conversation) and items[0].source.line == 1
    assert (report.rows[0].kind, report.total.accepted, report.total.balanced) == ("sharegpt (auto)", 999, True)


# --- examples and bad inputs ----------------------------------------------------------------------

EXAMPLES = {
    "alpaca.json": (12, 10, {"empty_response": 1, "missing_field": 1}, {}),
    "dolly.csv": (8, 7, {"empty_response": 1}, {}),
    "markers.jsonl": (6, 5, {"empty_response": 1}, {}),
    "mixed_bad.jsonl": (11, 2, {"invalid_json": 2, "invalid_utf8": 1, "wrong_type": 2, "missing_field": 1,
                                "empty_response": 2, "not_an_object": 1}, {}),
    "openai.jsonl": (10, 8, {"wrong_type": 1, "misplaced_system": 1}, {"tool_calls": 1, "tool_results": 1}),
    "preference.jsonl": (8, 5, {"empty_response": 1, "unknown_role": 1, "missing_field": 1}, {}),
    "sharegpt.jsonl": (12, 8, {"starts_with_assistant": 1, "unknown_role": 1, "empty_response": 1,
                               "no_assistant_turn": 1}, {"merged_turns": 1, "trimmed_trailing_user": 1,
                                                         "tool_calls": 1, "tool_results": 1}),
    "transcripts.jsonl.gz": (9, 6, {"empty_response": 1, "unparsable_transcript": 1, "starts_with_assistant": 1},
                             {"merged_turns": 1}),
}


@pytest.mark.parametrize("name", sorted(EXAMPLES))
def test_examples(examples: Path, tmp: Path, name: str) -> None:
    report = run([examples / name], tmp / "out.jsonl")
    c = report.total
    assert (c.read, c.accepted, dict(c.rejected), dict(c.events)) == EXAMPLES[name]
    assert len(read_jsonl(tmp / "out.rejects.jsonl")) == c.rejected_total


def test_examples_code_block_survives(examples: Path, tmp: Path) -> None:
    run([examples / "alpaca.json"], tmp / "out.jsonl")
    fib = read_jsonl(tmp / "out.jsonl")[2]["messages"][1]["content"]
    assert "```python\ndef fib(n: int) -> int:\n    a, b = 0, 1\n    for _ in range(n):\n" in fib


BAD_LINES = {
    "malformed.jsonl": (b'{"instruction": "a", "output": "b"\n', "invalid_json"),
    "types.jsonl": (b'{"instruction": "a", "output": 3}\n', "wrong_type"),
    "missing.jsonl": (b'{"instruction": "a"}\n', "missing_field"),
    "empty_output.jsonl": (b'{"instruction": "a", "output": ""}\n', "empty_response"),
    "role.jsonl": (b'{"conversations": [{"from": "human", "value": "a"}, {"from": "wizard", "value": "b"}]}\n',
                   "unknown_role"),
    "alternation.jsonl": (b'{"messages": [{"role": "assistant", "content": "hi"}, {"role": "user", "content": "q"}]}\n',
                          "starts_with_assistant"),
    "latin1.jsonl": (b'{"instruction": "\xe9t\xe9", "output": "b"}\n', "invalid_utf8"),
}


def test_bad_lines_are_rejects_with_the_right_reason(tmp: Path) -> None:
    good = b'{"instruction": "q", "output": "a"}\n'
    good_chat = b'{"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]}\n'
    good_msgs = b'{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}\n'
    for name, (line, _) in BAD_LINES.items():
        first = good_chat if name == "role.jsonl" else good_msgs if name == "alternation.jsonl" else good
        (tmp / name).write_bytes(first + line)
    report = run([tmp / name for name in BAD_LINES], tmp / "o" / "out.jsonl")
    rejects = {Path(r["path"]).name: r for r in read_jsonl(tmp / "o" / "out.rejects.jsonl")}
    assert {name: r["reason"] for name, r in rejects.items()} == {n: reason for n, (_, reason) in BAD_LINES.items()}
    assert all(r["line"] == 2 and r["errors"] and r["raw"] for r in rejects.values())
    assert report.total.accepted == len(BAD_LINES)


def test_non_alternating_turns_are_merged_not_rejected(tmp: Path) -> None:
    path = tmp / "double.jsonl"
    path.write_text(json.dumps({"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"},
                                             {"role": "assistant", "content": "c"}]}) + "\n")
    report = run([path], tmp / "out.jsonl")
    assert dict(report.total.events) == {"merged_turns": 1}
    assert read_jsonl(tmp / "out.jsonl")[0]["meta"] == {"merged_turns": 1}


def test_csv_with_missing_columns_rejects_every_row(tmp: Path) -> None:
    path = tmp / "dolly.csv"
    path.write_text("instruction,context\nWhat is 2+2?,\nName a colour.,\n")
    report = run([path], tmp / "out.jsonl")
    assert (report.total.read, dict(report.total.rejected)) == (2, {"missing_field": 2})
    assert read_jsonl(tmp / "out.rejects.jsonl")[0]["errors"][0]["field"] == "output"


def test_list_fields_given_as_json_text_are_decoded(shared_data: Path, tmp: Path) -> None:
    """CSV cells and string columns (pandas/HF exports) hold `conversations`/`messages` as JSON text: each record
    converts exactly as its list form does; a bad role inside the text is named, text that is no list stays wrong."""
    import csv

    import pyarrow as pa
    import pyarrow.parquet as pq

    sharegpt = [json.loads(line) for line in (shared_data / "sharegpt" / "sharegpt_zh_1K_format.jsonl")
                .read_text(encoding="utf-8").splitlines()[:40]]
    openai = json.loads((shared_data / "messages" / "kto_en_demo.json").read_text(encoding="utf-8"))[:40]
    as_text = [{"conversations": json.dumps(r["conversations"], ensure_ascii=False)} for r in sharegpt]
    (tmp / "text.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in as_text))
    (tmp / "list.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in sharegpt))
    pq.write_table(pa.Table.from_pylist(as_text), tmp / "text.parquet")
    with (tmp / "text.csv").open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, ["messages", "label"])
        writer.writeheader()
        writer.writerows({"messages": json.dumps(r["messages"]), "label": r["label"]} for r in openai)

    def messages(path: Path) -> list[list[dict]]:
        report = run([path], tmp / f"{path.name}.out.jsonl")
        assert report.total.read == 40 and report.total.rejected_total == 0
        return [r["messages"] for r in read_jsonl(tmp / f"{path.name}.out.jsonl")]

    expected = messages(tmp / "list.jsonl")
    assert messages(tmp / "text.jsonl") == messages(tmp / "text.parquet") == expected
    from_csv = messages(tmp / "text.csv")
    assert [[(m["role"], m["content"]) for m in c] for c in from_csv] == [
        [(m["role"], m["content"]) for m in r["messages"]] for r in openai
    ]
    bad = [{"conversations": '[{"from": "robot", "value": "hi"}, {"from": "gpt", "value": "yo"}]'},
           {"conversations": "hello"}]
    assert reasons_of("sharegpt", bad) == [("unknown_role", "conversations[0].from"), ("wrong_type", "conversations")]


def test_trl_prompt_completion_and_preference_records_convert_like_their_messages(shared_data: Path,
                                                                                   tmp: Path) -> None:
    """TRL's dataset types built from the real OpenAI-messages file: each converts to the same turns as the
    messages themselves; only the answer is trained (the prompt's assistant turns are context), as in TRL."""
    records = json.loads((shared_data / "messages" / "kto_en_demo.json").read_text(encoding="utf-8"))
    others = records[1:] + records[:1]  # a rejected answer from another record
    kinds = {
        "unpaired.jsonl": [{"prompt": r["messages"][:-1], "completion": r["messages"][-1:], "label": r["label"]}
                           for r in records],
        "explicit.jsonl": [{"prompt": r["messages"][:-1], "chosen": r["messages"][-1:], "rejected": o["messages"][-1:]}
                           for r, o in zip(records, others)],
        "implicit.jsonl": [{"chosen": r["messages"], "rejected": o["messages"]} for r, o in zip(records, others)],
        "repeated.jsonl": [{"prompt": r["messages"][0]["content"], "chosen": r["messages"], "rejected": []}
                           for r in records],
    }
    expected = [[(m["role"], m["content"]) for m in r["messages"]] for r in records]
    for name, rows in kinds.items():
        (tmp / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
        report = run([tmp / name], tmp / f"{name}.out")
        assert report.rows[0].kind == "prompt_completion (auto)" and report.total.accepted == len(records), name
        out = read_jsonl(tmp / f"{name}.out")
        assert [[(m["role"], m["content"]) for m in c["messages"]] for c in out] == expected, name
        trained = [[m["train"] for m in c["messages"] if m["role"] == "assistant"] for c in out]
        if name in ("unpaired.jsonl", "explicit.jsonl"):
            assert trained == [[False] * (len(t) - 1) + [None] for t in trained], name
        else:
            assert all(flag is None for t in trained for flag in t), name
    assert [c["meta"] for c in read_jsonl(tmp / "unpaired.jsonl.out")] == [{"label": r["label"]} for r in records]
    assert read_jsonl(tmp / "explicit.jsonl.out")[0]["meta"] == {"rejected": records[1]["messages"][-1:]}


def test_trl_standard_preference_texts_convert_like_alpaca(shared_data: Path, tmp: Path) -> None:
    rows = [r for r in json.loads((shared_data / "alpaca" / "alpaca_en_demo.json").read_text(encoding="utf-8"))
            if not r["input"]]
    texts = [{"prompt": r["instruction"], "chosen": r["output"], "rejected": "No."} for r in rows]
    (tmp / "pref.jsonl").write_text("".join(json.dumps(r) + "\n" for r in texts))
    (tmp / "alpaca.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    run([tmp / "pref.jsonl"], tmp / "pref.out")
    run([tmp / "alpaca.jsonl"], tmp / "alpaca.out")
    pref, alpaca = read_jsonl(tmp / "pref.out"), read_jsonl(tmp / "alpaca.out")
    assert [c["messages"] for c in pref] == [c["messages"] for c in alpaca] and len(pref) == len(rows)
    assert {c["id"] for c in pref} == {c["id"] for c in alpaca}  # same content, same id


def test_trl_records_with_errors_name_the_field_inside_the_messages() -> None:
    rows = [{"prompt": [{"role": "robot", "content": "Hi"}], "completion": "x"},
            {"prompt": "Hi", "rejected": "no"},
            {"prompt": "Hi", "chosen": [{"role": "assistant", "content": [{"type": "image_url"}]}]}]
    records = validate_batch(RawBatch("t.jsonl", [1, 2, 3], rows, 1.0), "prompt_completion").records
    role, missing = records[0], records[1]
    assert (role.reason, [e.field for e in role.errors]) == ("unknown_role", ["prompt[0].role"])
    assert "expected one of system, developer, user, assistant" in role.errors[0].message
    assert (missing.reason, missing.errors[0].field) == ("missing_field", "$")
    result = convert_record(records[2], "prompt_completion", "t.jsonl", 3)
    assert (result.reason, result.errors[0].field) == ("unsupported_content", "chosen[0].content[0]")


def reasons_of(fmt: str, rows: list[dict]) -> list[tuple[str, str]]:
    """(reason, first error field) of each row's Reject."""
    records = validate_batch(RawBatch("t.jsonl", list(range(len(rows))), rows, 1.0), fmt).records
    return [(r.reason, r.errors[0].field) for r in records]


CUT_GZIP = gzip.compress(b"".join(b'{"instruction": "q%d", "output": "a"}\n' % i for i in range(5000)))


@pytest.mark.parametrize("name, content, message", [
    ("empty.jsonl", b"", "empty file"),
    ("unknown.jsonl", b'{"question": "a", "answer": "b"}\n', "cannot detect the format: saw {answer, question}"),
    ("cut.jsonl.gz", CUT_GZIP[: len(CUT_GZIP) // 2], "truncated gzip"),
    ("mixed.jsonl", b'{"instruction": "a", "output": "b"}\n{"messages": []}\n', "ambiguous format"),
])
def test_unusable_input_is_one_clear_error_and_writes_nothing(tmp: Path, name: str, content: bytes,
                                                              message: str) -> None:
    (tmp / name).write_bytes(content)
    with pytest.raises(InputError, match=message) as e:
        run([tmp / name], tmp / "out.jsonl")
    assert str(e.value).startswith(str(tmp / name))
    assert sorted(p.name for p in tmp.iterdir()) == [name]  # no output, no temporary file left


# --- outputs ----------------------------------------------------------------------------------------


def test_same_input_same_bytes_and_unified_round_trip(examples: Path, tmp: Path) -> None:
    inputs = [examples / name for name in sorted(EXAMPLES)]
    run(inputs, tmp / "a.jsonl")
    run(list(reversed(inputs)), tmp / "b.jsonl")
    assert (tmp / "a.jsonl").read_bytes() == (tmp / "b.jsonl").read_bytes()
    assert (tmp / "a.rejects.jsonl").read_bytes() == (tmp / "b.rejects.jsonl").read_bytes()
    again = run([tmp / "a.jsonl"], tmp / "c.jsonl")
    assert again.rows[0].kind == "unified (auto)"
    assert (tmp / "c.jsonl").read_bytes() == (tmp / "a.jsonl").read_bytes()


def test_parquet_output_round_trips(examples: Path, tmp: Path) -> None:
    run([examples / "sharegpt.jsonl"], tmp / "out.parquet")
    assert (tmp / "out.rejects.jsonl").exists()
    run([tmp / "out.parquet"], tmp / "back.jsonl")
    run([examples / "sharegpt.jsonl"], tmp / "direct.jsonl")
    assert (tmp / "back.jsonl").read_bytes() == (tmp / "direct.jsonl").read_bytes()


def test_existing_output_needs_overwrite(examples: Path, tmp: Path) -> None:
    run([examples / "alpaca.json"], tmp / "out.jsonl")
    with pytest.raises(OutputExistsError, match="--overwrite"):
        run([examples / "alpaca.json"], tmp / "out.jsonl")
    run([examples / "alpaca.json"], tmp / "out.jsonl", overwrite=True)
    with pytest.raises(OutputExistsError, match="also an input"):
        run([tmp / "out.jsonl"], tmp / "out.jsonl", overwrite=True)


def test_rejects_path_option_and_default() -> None:
    assert default_rejects_path("out.jsonl") == "out.rejects.jsonl"
    assert default_rejects_path("d/out.parquet") == "d/out.rejects.jsonl"
    assert default_rejects_path("out") == "out.rejects.jsonl"


def test_rejects_option_and_strict(examples: Path, tmp: Path) -> None:
    config = ConvertConfig(inputs=[str(examples / "alpaca.json")], output=str(tmp / "o.jsonl"),
                           rejects=str(tmp / "bad.jsonl"), strict=True)
    report = convert_files(config)
    assert len(read_jsonl(tmp / "bad.jsonl")) == 2
    with pytest.raises(PrepError, match="2 record.s. rejected and --strict"):
        check_strict(config, report)


def test_failure_midway_leaves_previous_output(examples: Path, tmp: Path) -> None:
    run([examples / "alpaca.json"], tmp / "out.jsonl")
    before = (tmp / "out.jsonl").read_bytes()
    (tmp / "zz.jsonl").write_bytes(b'{"unknown": 1}\n')
    with pytest.raises(InputError):
        run([examples / "alpaca.json", tmp / "zz.jsonl"], tmp / "out.jsonl", overwrite=True)
    assert (tmp / "out.jsonl").read_bytes() == before
    assert not [p for p in tmp.iterdir() if p.name.endswith(".tmp")]


def test_accounting_error_is_raised_when_counts_do_not_balance() -> None:
    report = Report("x")
    report.add_row("a.jsonl", "alpaca").read = 1
    with pytest.raises(AccountingError, match="read 1 != accepted 0"):
        report.check_accounting()


def _peak_memory(path: Path) -> int:
    """Peak Python memory while streaming a file through iter_conversations in small batches."""
    list(iter_conversations(REPO / "examples" / "alpaca.json"))  # warm-up: imports and caches are not the stream
    tracemalloc.start()
    try:
        for _ in iter_conversations(path, batch_size=100):
            pass
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


RECORD = {"instruction": "Say hello in French, please.", "input": "", "output": "Bonjour !"}


def write_records(path: Path, n: int) -> Path:
    """n copies of RECORD as JSON Lines or Parquet (row groups of 1,000 rows)."""
    if path.suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist([RECORD] * n), path, row_group_size=1_000)
    else:
        path.write_bytes((json.dumps(RECORD) + "\n").encode() * n)
    return path


@pytest.mark.parametrize("suffix", [".jsonl", ".parquet"])
def test_streams_in_bounded_memory(tmp: Path, suffix: str) -> None:
    small = _peak_memory(write_records(tmp / f"small{suffix}", 4_000))
    large = _peak_memory(write_records(tmp / f"large{suffix}", 12_000))
    assert large < 1.25 * small, f"peak grew with the file: {small:,} -> {large:,} bytes"
    assert large < 12_000 * len(json.dumps(RECORD)) / 2  # well below the data size


def test_alpaca_turns_record_where_each_turn_came_from() -> None:
    d = alpaca_turns(AlpacaRecord(instruction="a", output="b", system="s"))
    assert [t.src for t in d.turns] == ["system", "instruction", "output"]


@pytest.mark.parametrize("module", ["prep.read", "prep.validate", "prep.convert", "prep.report", "prep.sink",
                                    "schemas.raw", "schemas.config"])
def test_docstring_examples(module: str, monkeypatch: pytest.MonkeyPatch) -> None:
    import doctest
    import importlib

    monkeypatch.chdir(REPO)  # the examples name files under examples/
    result = doctest.testmod(importlib.import_module(module))
    assert result.failed == 0
