"""Tool calls, tool results and tools through `prep convert`: every shape the issue lists, on real records where
they exist (glaive ShareGPT function_call/observation, OpenAI drone_training), and every reject reason."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from _agent import FILES, conversations, line_of, raw
from prep.convert import convert_files, convert_record
from prep.toolcalls import Unconvertible, parse_call, parse_call_text, parse_tools
from schemas.config import ConvertConfig
from schemas.conversation import Conversation, ToolCall
from schemas.raw import RECORD_ADAPTERS
from schemas.reject import Reject


def convert_one(fmt: str, row: dict) -> Conversation | Reject:
    return convert_record(RECORD_ADAPTERS[fmt].validate_python(row), fmt)


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


WEATHER = {"name": "get_weather", "description": "Current weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}


# --- parsing the shapes of a call and of tools -------------------------------------------------------------


@pytest.mark.parametrize("value, expected", [
    ({"id": "c1", "type": "function", "function": {"name": "f", "arguments": '{"x": 1}'}}, ("c1", "f", {"x": 1})),
    ({"type": "function", "function": {"name": "f", "arguments": {"x": [1, 2]}}}, (None, "f", {"x": [1, 2]})),
    ({"name": "f", "arguments": {"x": 1}}, (None, "f", {"x": 1})),
    ({"name": "f", "arguments": "{}"}, (None, "f", {})),
    ({"name": "f"}, (None, "f", {})),
    ({"name": "f", "parameters": {"q": "a"}}, (None, "f", {"q": "a"})),  # Llama 3.1's spelling
])
def test_parse_call_shapes(value, expected):
    call = parse_call(value, "m")
    assert (call.id, call.name, call.arguments) == expected


@pytest.mark.parametrize("value, field", [
    ({"name": "f", "arguments": "{not json"}, "m.arguments"),
    ({"name": "f", "arguments": "[1, 2]"}, "m.arguments"),
    ({"function": {"name": "f", "arguments": '"text"'}}, "m.function.arguments"),
    ({"arguments": {}}, "m.name"),
    ({"name": ""}, "m.name"),
    ("f(x=1)", "m"),
    ({"name": "f", "id": 7}, "m.id"),
])
def test_bad_calls_are_invalid_tool_call_naming_the_field(value, field):
    with pytest.raises(Unconvertible) as e:
        parse_call(value, "m")
    assert (e.value.reason, e.value.field) == ("invalid_tool_call", field)


def test_call_text_holds_one_call_or_a_list():
    one = parse_call_text('{"name": "a", "arguments": {"x": 1}}', "v")
    two = parse_call_text('[{"name": "a", "arguments": {}}, {"name": "b", "arguments": {"y": 2}}]', "v")
    assert [c.name for c in one] == ["a"] and [(c.name, c.arguments) for c in two] == [("a", {}), ("b", {"y": 2})]
    with pytest.raises(Unconvertible, match="must be JSON"):
        parse_call_text("call a with x=1", "v")


def test_tools_are_wrapped_function_specs():
    wrapped = {"type": "function", "function": WEATHER}
    assert parse_tools([WEATHER], "tools") == [wrapped]
    assert parse_tools(json.dumps([wrapped]), "tools") == [wrapped]
    assert parse_tools({"type": "code_interpreter"} and [{"type": "code_interpreter"}], "tools") == [
        {"type": "code_interpreter"}]
    assert parse_tools("[]", "tools") is None and parse_tools("", "tools") is None and parse_tools([], "t") is None


@pytest.mark.parametrize("value, field", [
    ("[{broken", "tools"), ({"name": "f"}, "tools"), ([1], "tools[0]"), ([{"description": "no name"}], "tools[0]"),
    ([{"type": "function", "function": {"parameters": {}}}], "tools[0]"),
])
def test_bad_tools_are_invalid_tools(value, field):
    with pytest.raises(Unconvertible) as e:
        parse_tools(value, "tools")
    assert (e.value.reason, e.value.field) == ("invalid_tools", field)


# --- real records ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["glaive_en", "glaive_zh"])
def test_every_glaive_record_converts_with_its_calls_results_and_tools(name):
    convs = conversations(name)
    rejected = {k for k in range(len(raw(name))) if line_of(name, k) not in convs}
    assert rejected == ({197, 293} if name == "glaive_zh" else set())  # the two orphan observations, see below
    for line, conv in convs.items():
        record = raw(name)[line]
        turns = record["conversations"]
        assert len(conv.messages) == len(turns)
        for turn, m in zip(turns, conv.messages):
            if turn["from"] == "function_call":
                call = json.loads(turn["value"])
                assert (m.role, m.content, m.tool_calls) == ("assistant", "", [ToolCall(name=call["name"],
                                                                                        arguments=call["arguments"])])
            else:
                assert (m.role, m.content) == ({"human": "user", "gpt": "assistant", "observation": "tool"}[turn["from"]],
                                               turn["value"])
        tools = json.loads(record["tools"])
        assert conv.tools == ([{"type": "function", "function": t} for t in tools] or None)


def test_glaive_zh_observations_after_a_plain_reply_are_orphan_tool_results(tmp_path):
    report = convert_files(ConvertConfig(inputs=[str(FILES["glaive_zh"])], output=str(tmp_path / "o.jsonl")))
    rejects = read_jsonl(tmp_path / "o.rejects.jsonl")
    assert [(r["line"], r["reason"], r["errors"][0]["field"]) for r in rejects] == [
        (197, "orphan_tool_result", "conversations[2]"), (293, "orphan_tool_result", "conversations[2]")]
    assert "no tool call before it" in rejects[0]["errors"][0]["message"]
    assert report.total.events == {"tool_calls": 216, "tool_results": 216}


def test_drone_records_keep_their_calls_ids_and_tools():
    convs = conversations("drone")
    assert len(convs) == len(raw("drone")) == 103
    for line, conv in convs.items():
        record = raw("drone")[line - 1]
        (call,) = record["messages"][-1]["tool_calls"]
        assert conv.messages[-1].tool_calls == [ToolCall(id=call["id"], name=call["function"]["name"],
                                                         arguments=json.loads(call["function"]["arguments"]))]
        assert conv.messages[-1].content == "" and conv.tools == record["tools"]
        assert conv.meta == {"parallel_tool_calls": False}


def test_unified_output_round_trips_tool_data_through_jsonl_and_parquet(tmp_path):
    inputs = [str(FILES["glaive_en"]), str(FILES["drone"])]
    convert_files(ConvertConfig(inputs=inputs, output=str(tmp_path / "a.jsonl")))
    convert_files(ConvertConfig(inputs=inputs, output=str(tmp_path / "p.parquet")))
    for src in ("a.jsonl", "p.parquet"):
        convert_files(ConvertConfig(inputs=[str(tmp_path / src)], output=str(tmp_path / f"b-{src}.jsonl")))
        again = [json.dumps({k: v for k, v in r.items() if k != "source"}) for r in read_jsonl(tmp_path / f"b-{src}.jsonl")]
        first = [json.dumps({k: v for k, v in r.items() if k != "source"}) for r in read_jsonl(tmp_path / "a.jsonl")]
        assert again == first
    record = next(r for r in read_jsonl(tmp_path / "a.jsonl") if "glaive" in r["source"]["path"] and r["source"]["line"] == 3)
    assert record["messages"][1] == {"role": "assistant", "content": "", "train": None, "tool_calls": [
        {"name": "calculate_area", "arguments": {"shape": "rectangle", "dimensions": [5, 3]}}]}
    assert record["messages"][2] == {"role": "tool", "content": raw("glaive_en")[3]["conversations"][2]["value"],
                                     "train": None}
    assert list(record) == ["id", "source", "messages", "meta", "tools"]


def test_old_unified_files_convert_unchanged(tmp_path):
    """A unified file written before tool fields existed converts to the very same bytes."""
    from prep.convert import to_json_line

    old = tmp_path / "old.jsonl"
    lines = [b'{"id":"a","source":{"path":"x.jsonl","line":1,"format":"sharegpt"},"messages":[{"role":"user",'
             b'"content":"Hi","train":null},{"role":"assistant","content":"Hello","train":null}],"meta":{"k":1}}',
             b'{"id":"b","source":null,"messages":[{"role":"system","content":"S","train":null},{"role":"user",'
             b'"content":"Q","train":false},{"role":"assistant","content":"A","train":true}],"meta":{}}']
    old.write_bytes(b"\n".join(lines) + b"\n")
    convert_files(ConvertConfig(inputs=[str(old)], output=str(tmp_path / "new.jsonl")))
    assert (tmp_path / "new.jsonl").read_bytes() == old.read_bytes()
    assert to_json_line.__doc__  # the fast writer is the one that wrote it


# --- OpenAI shapes ---------------------------------------------------------------------------------------------


def test_openai_legacy_function_call_functions_and_function_role():
    row = {"messages": [{"role": "user", "content": "Weather in Oslo?"},
                        {"role": "assistant", "content": None,
                         "function_call": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}},
                        {"role": "function", "name": "get_weather", "content": '{"temp": -3}'},
                        {"role": "assistant", "content": "-3 °C."}], "functions": [WEATHER]}
    c = convert_one("openai", row)
    assert [m.role for m in c.messages] == ["user", "assistant", "tool", "assistant"]
    assert c.messages[1].tool_calls == [ToolCall(name="get_weather", arguments={"city": "Oslo"})]
    assert c.messages[2].name == "get_weather" and c.tools == [{"type": "function", "function": WEATHER}]


def test_openai_tools_win_over_functions_which_stay_in_meta():
    row = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
           "tools": [{"type": "function", "function": WEATHER}], "functions": [{"name": "old"}]}
    c = convert_one("openai", row)
    assert c.tools == [{"type": "function", "function": WEATHER}] and c.meta == {"functions": [{"name": "old"}]}


def test_a_users_name_stays_in_meta_a_tool_results_name_is_a_field():
    row = {"messages": [{"role": "user", "content": "q", "name": "ana"},
                        {"role": "assistant", "content": "", "tool_calls": [{"function": {"name": "f", "arguments": "{}"}}]},
                        {"role": "tool", "content": "r", "name": "f", "extra": 1},
                        {"role": "assistant", "content": "a"}]}
    c = convert_one("openai", row)
    assert c.messages[2].name == "f"
    assert c.meta == {"message_fields": {"messages[0]": {"name": "ana"}, "messages[2]": {"extra": 1}}}


def test_llama_factory_typed_parts_text_reasoning_and_several_tool_calls():
    row = {"messages": [
        {"role": "user", "content": [{"type": "text", "value": "Paris and Rome?"}]},
        {"role": "assistant", "content": [{"type": "reasoning", "value": "Two cities."},
                                          {"type": "tool_call", "value": '{"name": "get_weather", "arguments": {"city": "Paris"}}'},
                                          {"type": "tool_call", "value": '{"name": "get_weather", "arguments": {"city": "Rome"}}'}]},
        {"role": "tool", "content": [{"type": "text", "value": "12"}]},
        {"role": "tool", "content": [{"type": "text", "text": "18"}]},
        {"role": "assistant", "content": [{"type": "text", "value": "Paris 12, Rome 18."}]}],
        "tools": json.dumps([WEATHER])}
    c = convert_one("openai", row)
    assert c.messages[1].content == "<think>\nTwo cities.\n</think>\n\n"
    assert [t.arguments["city"] for t in c.messages[1].tool_calls] == ["Paris", "Rome"]
    assert [(m.role, m.content) for m in c.messages[2:]] == [("tool", "12"), ("tool", "18"),
                                                            ("assistant", "Paris 12, Rome 18.")]


def test_text_part_without_text_says_so_and_images_are_unsupported():
    for part, message in (({"type": "text"}, "without a text (or value) string"), ({"type": "image_url"}, "'image_url'")):
        r = convert_one("openai", {"messages": [{"role": "user", "content": [part]}, {"role": "assistant", "content": "a"}]})
        assert r.reason == "unsupported_content" and message in r.errors[0].message
        assert "of type 'text' is not text" not in r.errors[0].message


def test_runs_of_assistant_messages_merge_into_one_step():
    """A reasoning step, then a call, then (after the result) the answer: one assistant message with the reasoning
    folded in front of its calls."""
    row = {"messages": [{"role": "user", "content": "Weather in Oslo?"},
                        {"role": "assistant", "content": [{"type": "reasoning", "value": "Use the tool."}]},
                        {"role": "assistant", "content": [{"type": "tool_call",
                                                           "value": '{"name": "get_weather", "arguments": {"city": "Oslo"}}'}]},
                        {"role": "tool", "content": "-3"},
                        {"role": "assistant", "content": [{"type": "reasoning", "value": "Cold."}]},
                        {"role": "assistant", "content": "-3 °C."}]}
    c = convert_one("openai", row)
    assert [(m.role, m.content, bool(m.tool_calls)) for m in c.messages] == [
        ("user", "Weather in Oslo?", False), ("assistant", "<think>\nUse the tool.\n</think>\n\n", True),
        ("tool", "-3", False), ("assistant", "<think>\nCold.\n</think>\n\n-3 °C.", False)]
    assert c.meta == {"merged_turns": 2}


def test_text_then_a_call_merge_content_first():
    row = {"conversations": [{"from": "human", "value": "Oslo?"}, {"from": "gpt", "value": "Let me check."},
                             {"from": "function_call", "value": '{"name": "get_weather", "arguments": {"city": "Oslo"}}'},
                             {"from": "observation", "value": "-3"}, {"from": "gpt", "value": "-3 °C."}]}
    c = convert_one("sharegpt", row)
    assert (c.messages[1].content, c.messages[1].tool_calls[0].name) == ("Let me check.", "get_weather")


# --- rules and their reject reasons ------------------------------------------------------------------------------


def _sharegpt(*turns, tools=None):
    row = {"conversations": [{"from": f, "value": v} for f, v in turns]}
    if tools is not None:
        row["tools"] = tools
    return convert_one("sharegpt", row)


CALL = '{"name": "get_weather", "arguments": {"city": "Oslo"}}'


@pytest.mark.parametrize("turns, tools, reason, field", [
    ((("human", "q"), ("function_call", '{"name": "get_weather", "arguments": "{oops"}'), ("observation", "r"),
      ("gpt", "a")), None, "invalid_tool_call", "conversations[1].value.arguments"),
    ((("human", "q"), ("observation", "r"), ("gpt", "a")), None, "orphan_tool_result", "conversations[1]"),
    ((("human", "q"), ("function_call", CALL), ("human", "again"), ("gpt", "a")), None, "tool_call_without_result",
     "conversations[2]"),
    ((("human", "q"), ("function_call", CALL), ("observation", "r"), ("gpt", "a")), [{"name": "other"}],
     "unknown_tool", "conversations[1]"),
    ((("human", "q"), ("gpt", "a")), '{"name": "f"}', "invalid_tools", "tools"),
])
def test_bad_tool_data_is_a_reject_naming_the_message(turns, tools, reason, field):
    r = _sharegpt(*turns, tools=tools)
    assert isinstance(r, Reject) and (r.reason, r.errors[0].field) == (reason, field)


def test_unknown_tool_message_lists_the_tools():
    r = _sharegpt(("human", "q"), ("function_call", CALL), ("observation", "r"), ("gpt", "a"),
                  tools=[{"name": "search"}, {"name": "book"}])
    assert "calls 'get_weather', which is not in tools (book, search)" in r.errors[0].message
    assert "(unified messages[1].tool_calls[0].name)" in r.errors[0].message


def test_calls_are_not_checked_without_tools():
    c = _sharegpt(("human", "q"), ("function_call", CALL), ("observation", "r"), ("gpt", "a"), tools="[]")
    assert isinstance(c, Conversation) and c.tools is None


def test_trailing_tool_results_are_trimmed_and_counted(tmp_path):
    rows = [{"conversations": [{"from": "human", "value": "q"}, {"from": "function_call", "value": CALL},
                               {"from": "observation", "value": "-3"}]},
            {"conversations": [{"from": "human", "value": "q"}, {"from": "function_call", "value": CALL},
                               {"from": "observation", "value": "-3"}, {"from": "observation", "value": "-4"},
                               {"from": "human", "value": "thanks"}]}]
    path = tmp_path / "in.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    report = convert_files(ConvertConfig(inputs=[str(path)], output=str(tmp_path / "o.jsonl")))
    out = read_jsonl(tmp_path / "o.jsonl")
    assert [[m["role"] for m in r["messages"]] for r in out] == [["user", "assistant"]] * 2
    assert [r["meta"] for r in out] == [{"trailing_tool": ["-3"]}, {"trailing_user": ["thanks"], "trailing_tool": ["-3", "-4"]}]
    assert report.total.events == {"tool_calls": 2, "trimmed_trailing_tool": 3, "trimmed_trailing_user": 1}


def test_unified_records_are_checked_not_repaired():
    base = {"id": "u", "messages": [{"role": "user", "content": "q"},
                                    {"role": "assistant", "content": "", "tool_calls": [{"name": "f", "arguments": {}}]},
                                    {"role": "tool", "content": "r", "tool_call_id": "zz"}], "meta": {}}
    r = convert_one("unified", base)
    assert r.reason == "ends_with_tool"
    base["messages"][1]["tool_calls"][0]["id"] = "c1"
    base["messages"].append({"role": "assistant", "content": "a"})
    r = convert_one("unified", base)
    assert r.reason == "orphan_tool_result" and "tool_call_id 'zz'" in r.errors[0].message
    base["messages"][2]["tool_call_id"] = "c1"
    assert isinstance(convert_one("unified", base), Conversation)


def test_conversation_model_applies_the_tool_rules():
    with pytest.raises(ValueError, match="unknown_tool|not in tools"):
        Conversation(id="x", tools=[{"type": "function", "function": {"name": "g"}}], messages=[
            {"role": "user", "content": "q"}, {"role": "assistant", "content": "", "tool_calls": [{"name": "f"}]}])


def test_json_schema_describes_the_tool_fields():
    schema = Conversation.model_json_schema()
    assert set(schema["properties"]) == {"id", "source", "messages", "meta", "tools"}
    message = schema["$defs"]["Message"]["properties"]
    assert message["role"]["enum"] == ["system", "user", "assistant", "tool"]
    assert {"tool_calls", "name", "tool_call_id"} <= set(message)
    assert set(schema["$defs"]["ToolCall"]["properties"]) == {"id", "name", "arguments"}


@pytest.mark.parametrize("module", ["prep.toolcalls", "prep.fieldmap", "prep.splice", "prep.turns",
                                    "schemas.conversation", "prep.render"])
def test_docstring_examples(module: str) -> None:
    import doctest
    import importlib

    assert doctest.testmod(importlib.import_module(module)).failed == 0
