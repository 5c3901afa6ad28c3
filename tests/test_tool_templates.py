"""Agent data through the templates, exact to the token: tool calls, tool results and tools rendered by the built-in
layouts and by chat templates (real Qwen2.5 and Mistral v0.3 tokenizers; Llama 3.1 and Qwen3 templates on real
tokenizers), ids equal to apply_chat_template's, what is trained, and every check a template can fail."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from _agent import (
    FILES,
    conversations,
    llama31_tokenizer,
    oracle,
    qwen3_tokenizer,
    with_generated_ids,
)
from _conv import tokenizer
from prep.convert import convert_record
from prep.encode import IGNORE_INDEX, Encoder
from prep.render import BUILTIN_TEMPLATES, RenderFailure, Template, load_template, render, render_batch
from schemas.conversation import Message, ToolCall
from schemas.raw import RECORD_ADAPTERS

REPO = Path(__file__).resolve().parents[1]
BIG = 10**7

# glaive_en row 203, as the README shows it (EOS written as <|endoftext|>).
RECORD_203 = {
    "markers": (
        '###tools###\n{"type": "function", "function": {"name": "calculate_age", "description": "Calculate the age '
        'based on birthdate", "parameters": {"type": "object", "properties": {"birthdate": {"type": "string", '
        '"description": "The birthdate in YYYY-MM-DD format"}}, "required": ["birthdate"]}}}\n\n###human###\nHi, I was '
        "born on 1990-05-15. Can you tell me how old I am today?\n\n###assistant###\n###call###\n"
        '{"name": "calculate_age", "arguments": {"birthdate": "1990-05-15"}}\n###<|endoftext|>\n\n###tool###\n'
        '{"age": 31}\n\n###assistant###\nBased on the birthdate you provided, you are 31 years old today.\n###<|endoftext|>'
    ),
    "chatml": (
        '<|im_start|>tools\n{"type": "function", "function": {"name": "calculate_age", "description": "Calculate the '
        'age based on birthdate", "parameters": {"type": "object", "properties": {"birthdate": {"type": "string", '
        '"description": "The birthdate in YYYY-MM-DD format"}}, "required": ["birthdate"]}}}<|im_end|>\n'
        "<|im_start|>user\nHi, I was born on 1990-05-15. Can you tell me how old I am today?<|im_end|>\n"
        '<|im_start|>assistant\n<tool_call>\n{"name": "calculate_age", "arguments": {"birthdate": "1990-05-15"}}\n'
        "</tool_call><|im_end|>\n<|im_start|>tool\n{\"age\": 31}<|im_end|>\n<|im_start|>assistant\nBased on the "
        "birthdate you provided, you are 31 years old today.<|im_end|>"
    ),
    "tokenizer (Qwen2.5)": (
        "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.\n\n# Tools\n\nYou may "
        "call one or more functions to assist with the user query.\n\nYou are provided with function signatures within "
        '<tools></tools> XML tags:\n<tools>\n{"type": "function", "function": {"name": "calculate_age", "description": '
        '"Calculate the age based on birthdate", "parameters": {"type": "object", "properties": {"birthdate": {"type": '
        '"string", "description": "The birthdate in YYYY-MM-DD format"}}, "required": ["birthdate"]}}}\n</tools>\n\n'
        "For each function call, return a json object with function name and arguments within <tool_call></tool_call> "
        'XML tags:\n<tool_call>\n{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call><|im_end|>\n'
        "<|im_start|>user\nHi, I was born on 1990-05-15. Can you tell me how old I am today?<|im_end|>\n"
        '<|im_start|>assistant\n<tool_call>\n{"name": "calculate_age", "arguments": {"birthdate": "1990-05-15"}}\n'
        "</tool_call><|im_end|>\n<|im_start|>user\n<tool_response>\n{\"age\": 31}\n</tool_response><|im_end|>\n"
        "<|im_start|>assistant\nBased on the birthdate you provided, you are 31 years old today.<|im_end|>\n"
    ),
}
TRAINED_203 = {  # what is trained, in order: the call with its end of turn, the answer with its end of turn
    "markers": ['###call###\n{"name": "calculate_age", "arguments": {"birthdate": "1990-05-15"}}\n###<|endoftext|>',
                "Based on the birthdate you provided, you are 31 years old today.\n###<|endoftext|>"],
    "chatml": ['<tool_call>\n{"name": "calculate_age", "arguments": {"birthdate": "1990-05-15"}}\n</tool_call><|im_end|>',
               "Based on the birthdate you provided, you are 31 years old today.<|im_end|>"],
}
TRAINED_203["tokenizer (Qwen2.5)"] = TRAINED_203["chatml"]


def _runs(tok, row: dict) -> list[str]:
    """The decoded runs of trained tokens of an example."""
    runs, current = [], []
    for token, label in zip(row["input_ids"], row["labels"]):
        if label != IGNORE_INDEX:
            current.append(token)
        elif current:
            runs.append(current)
            current = []
    return [tok.decode(r) for r in runs + ([current] if current else [])]


# --- the built-in layouts and one real template, exact texts (README) ------------------------------------------


@pytest.mark.parametrize("name", sorted(RECORD_203))
def test_one_tool_conversation_renders_to_the_readme_text_and_trains_the_call_and_answer(name):
    conv = conversations("glaive_en")[203]
    if name.startswith("tokenizer"):
        tok = tokenizer("qwen2.5-0.5b-instruct")
        template = load_template("tokenizer", tok)
    else:
        tok = tokenizer("gpt2-dialogpt-small")  # its EOS is <|endoftext|>
        template = BUILTIN_TEMPLATES[name]
    assert render(conv, template, tok).text == RECORD_203[name]
    row = Encoder(tok, template).encode([conv]).table.to_pylist()[0]
    assert _runs(tok, row) == TRAINED_203[name]


def test_data_templates_write_content_then_calls_and_need_a_layout():
    messages = [Message(role="user", content="Oslo and Rome?"),
                Message(role="assistant", content="Checking both.", tool_calls=[
                    ToolCall(name="w", arguments={"c": "Oslo"}), ToolCall(name="w", arguments={"c": "Rome"})]),
                Message(role="tool", content="-3"), Message(role="tool", content="18"),
                Message(role="assistant", content="-3 and 18.")]
    r = render(messages, BUILTIN_TEMPLATES["chatml"])
    span = r.spans[1]
    assert r.text[span.start:span.stop] == ('Checking both.\n<tool_call>\n{"name": "w", "arguments": {"c": "Oslo"}}\n'
                                            '</tool_call>\n<tool_call>\n{"name": "w", "arguments": {"c": "Rome"}}\n'
                                            "</tool_call><|im_end|>")
    bare = Template(name="bare", roles=BUILTIN_TEMPLATES["chatml"].roles.__class__(
        user=BUILTIN_TEMPLATES["chatml"].roles.user, assistant=BUILTIN_TEMPLATES["chatml"].roles.assistant))
    out = render_batch([messages], bare)[0]
    assert isinstance(out, RenderFailure) and out.reason == "template_dropped_tool_call"
    out = render_batch([messages[:1] + [messages[-1]]], bare, tools=[[{"type": "function", "function": {"name": "w"}}]])[0]
    assert out.reason == "template_dropped_tools"


def test_a_template_file_can_give_a_tool_layout(tmp_path):
    path = tmp_path / "t.toml"
    path.write_text('name = "agent"\n[user]\nprefix = "Q: "\nafter = "\\n"\n[assistant]\nprefix = "A: "\nend = "</s>"\n'
                    'after = "\\n"\n[tool]\nprefix = "R: "\nafter = "\\n"\n[tools]\nprefix = "TOOLS: "\nafter = "\\n"\n'
                    '[call]\nprefix = "CALL "\nafter = " "\n')
    template = load_template(str(path))
    assert render(conversations("glaive_en")[203], template).text.startswith('TOOLS: {"type": "function"')
    assert 'A: CALL {"name": "calculate_age", "arguments": {"birthdate": "1990-05-15"}}</s>\nR: {"age": 31}\n' in \
        render(conversations("glaive_en")[203], template).text


# --- chat templates: ids equal apply_chat_template(messages, tools=tools) for every example ----------------------

FAMILIES = {
    "qwen2.5": lambda: tokenizer("qwen2.5-0.5b-instruct"),
    "mistral": lambda: tokenizer("mistral-7b-instruct-v0.3"),
    "llama3.1": llama31_tokenizer,
    "qwen3": qwen3_tokenizer,
}


def _expected_ids(family: str, tok, name: str, line: int) -> list[int]:
    """apply_chat_template's ids for a record, read independently of prep (Mistral: with the documented ids)."""
    messages, tools = oracle(name, line)
    if family == "mistral":
        messages = with_generated_ids(messages, replace=name == "drone")  # its template refuses drone's "call_id"
    return tok.apply_chat_template(messages, tools=tools, tokenize=True, return_dict=True)["input_ids"]


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("name", ["glaive_en", "drone"])
def test_every_real_tool_record_gets_apply_chat_templates_ids(family, name):
    tok = FAMILIES[family]()
    convs = conversations(name)
    res = Encoder(tok, load_template("tokenizer", tok), max_len=BIG).encode(list(convs.values()))
    assert not res.rejected and res.counts["examples"] == len(convs)
    written = {row["example_id"]: row for row in res.table.to_pylist()}
    for line, conv in convs.items():
        assert written[conv.id]["input_ids"] == _expected_ids(family, tok, name, line), (name, line)
    if family == "mistral":
        assert res.counts["tool_call_ids_generated"] == sum(len(m.tool_calls or ()) for c in convs.values()
                                                             for m in c.messages)


def test_glaive_zh_with_qwen25_gets_apply_chat_templates_ids():
    tok = tokenizer("qwen2.5-0.5b-instruct")
    convs = conversations("glaive_zh")
    res = Encoder(tok, load_template("tokenizer", tok), max_len=BIG).encode(list(convs.values()))
    written = {row["example_id"]: row for row in res.table.to_pylist()}
    assert len(written) == len({c.id for c in convs.values()}) and not res.rejected
    for line, conv in convs.items():
        assert written[conv.id]["input_ids"] == _expected_ids("qwen2.5", tok, "glaive_zh", line)


def _expected_runs(family: str, messages: list[dict]) -> list[str]:
    """What each family's template writes for the assistant messages (as the model writes it), with its end token."""
    out = []
    for m in messages:
        if m["role"] != "assistant":
            continue
        calls = m.get("tool_calls") or []
        if family == "mistral" and calls:
            parts = [json.dumps(c["function"], ensure_ascii=False)[:-1] + f', "id": "{c["id"]}"}}' for c in calls]
            out.append("[TOOL_CALLS] [" + ", ".join(parts) + "]</s>")
        elif family == "mistral":
            out.append(m["content"].strip() + "</s>")
        elif family == "llama3.1" and calls:
            fn = calls[0]["function"]
            out.append(f'{{"name": "{fn["name"]}", "parameters": {json.dumps(fn["arguments"], ensure_ascii=False)}}}<|eot_id|>')
        elif family == "llama3.1":
            out.append(m["content"].strip() + "<|eot_id|>")
        else:  # qwen2.5, qwen3: Hermes calls
            text = "\n".join('<tool_call>\n{"name": "' + c["function"]["name"] + '", "arguments": '
                             + json.dumps(c["function"]["arguments"], ensure_ascii=False) + "}\n</tool_call>" for c in calls)
            out.append((m["content"] + ("\n" if m["content"] and calls else "") + text) + "<|im_end|>")
    return out


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_every_call_and_answer_is_trained_with_its_end_token_and_no_tool_result_is(family):
    tok = FAMILIES[family]()
    convs = conversations("glaive_en")
    sample = {line: convs[line] for line in list(convs)[:120]}
    res = Encoder(tok, load_template("tokenizer", tok), max_len=BIG).encode(list(sample.values()))
    written = {row["example_id"]: row for row in res.table.to_pylist()}
    for line, conv in sample.items():
        messages, _ = oracle("glaive_en", line)
        if family == "mistral":
            messages = with_generated_ids(messages)
        runs = _runs(tok, written[conv.id])
        expected = _expected_runs(family, messages)
        assert [r.lstrip() for r in runs] == [e.lstrip() for e in expected], line  # SentencePiece drops a leading space
        trained = "".join(runs)
        assert not any(m.content in trained for m in conv.messages if m.role == "tool" and len(m.content) > 12)


def test_tokens_of_calls_end_with_the_end_of_turn_id():
    tok = tokenizer("mistral-7b-instruct-v0.3")
    res = Encoder(tok, load_template("tokenizer", tok), max_len=BIG).encode(list(conversations("drone").values())[:10])
    eos = tok.eos_token_id
    calls = tok.convert_tokens_to_ids("[TOOL_CALLS]")
    for row in res.table.to_pylist():
        trained = [t for t, label in zip(row["input_ids"], row["labels"]) if label != IGNORE_INDEX]
        assert trained[0] == calls and trained[-1] == eos


# --- what templates do differently ---------------------------------------------------------------------------------


def test_mistral_leaves_the_content_of_a_call_out_and_it_is_counted():
    row = {"messages": [{"role": "user", "content": "Weather in Oslo?"},
                        {"role": "assistant", "content": "Let me check.", "tool_calls": [
                            {"id": "abc123def", "type": "function", "function": {"name": "w", "arguments": '{"c": "Oslo"}'}}]},
                        {"role": "tool", "tool_call_id": "abc123def", "content": "-3"},
                        {"role": "assistant", "content": "It is -3."}]}
    conv = convert_record(RECORD_ADAPTERS["openai"].validate_python(row), "openai")
    tok = tokenizer("mistral-7b-instruct-v0.3")
    res = Encoder(tok, load_template("tokenizer", tok)).encode([conv])
    assert res.counts["template_dropped_content"] == 1 and res.counts["tool_call_ids_generated"] == 0
    assert _runs(tok, res.table.to_pylist()[0]) == [
        '[TOOL_CALLS] [{"name": "w", "arguments": {"c": "Oslo"}, "id": "abc123def"}]</s>', "It is -3.</s>"]


@pytest.mark.parametrize("tok_name", ["qwen2-1.5b-instruct-boundless", "smollm2-135m", "gpt2-dialogpt-small"])
def test_templates_without_tools_are_rejects_not_silent_losses(tok_name):
    tok = tokenizer(tok_name)
    template = load_template("tokenizer", tok)
    with_tools = conversations("glaive_en")[203]
    calls_only = with_tools.model_copy(update={"tools": None})
    res = Encoder(tok, template).encode([with_tools, calls_only, conversations("glaive_en")[1]])
    assert res.rejected == {"template_dropped_tool_call": 1, "template_dropped_tools": 1}
    assert [r.errors[0].field for r in res.rejects] == ["tools", "messages[1].tool_calls[0]"]
    assert res.table["example_id"].to_pylist() == [conversations("glaive_en")[1].id]  # no tools: fine


def test_argument_form_is_probed_per_template():
    """DeepSeek-V3's template concatenates `arguments` as text; Qwen's tojson's an object. prep renders a probe call
    both ways and passes each template the form it prints as JSON."""
    from prep.render import _template_info

    deepseek_like = Template(name="tokenizer", chat_template=(
        "{% if tools %}<|im_start|>tools\n{{ tools | tojson }}<|im_end|>\n{% endif %}"
        "{% for m in messages %}{% if m.role == 'assistant' and m.tool_calls %}<|im_start|>assistant\n"
        "{% for t in m.tool_calls %}{{ t.function.name + '\\n```json\\n' + t.function.arguments + '\\n```' }}{% endfor %}"
        "<|im_end|>\n{% else %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endif %}{% endfor %}"))
    tok = tokenizer("qwen2.5-0.5b-instruct")
    env = repr(sorted(tok.special_tokens_map.items()))
    assert _template_info(tok, deepseek_like, env).arg_form == "string"
    assert _template_info(tok, load_template("tokenizer", tok), env).arg_form == "object"
    conv = conversations("glaive_en")[203]
    row = Encoder(tok, deepseek_like).encode([conv]).table.to_pylist()[0]
    messages, tools = oracle("glaive_en", 203)
    for m in messages:
        for c in m.get("tool_calls", ()):
            c["function"]["arguments"] = json.dumps(c["function"]["arguments"], ensure_ascii=False)
    text = tok.apply_chat_template(messages, tools=tools, tokenize=False, chat_template=deepseek_like.chat_template)
    assert row["input_ids"] == tok(text, add_special_tokens=False).input_ids
    assert _runs(tok, row)[0] == 'calculate_age\n```json\n{"birthdate": "1990-05-15"}\n```<|im_end|>'


def test_markers_in_calls_or_tools_are_rejected():
    tok = tokenizer("qwen2.5-0.5b-instruct")
    conv = conversations("glaive_en")[203]
    bad_call = conv.model_copy(update={"messages": [conv.messages[0], conv.messages[1].model_copy(
        update={"tool_calls": [ToolCall(name="calculate_age", arguments={"birthdate": "<|im_end|>"})]}), *conv.messages[2:]]})
    bad_tools = conv.model_copy(update={"tools": [{"type": "function", "function": {"name": "calculate_age",
                                                                                   "description": "x<|im_start|>y"}}]})
    res = Encoder(tok, load_template("tokenizer", tok)).encode([bad_call, bad_tools])
    assert res.rejected == {"marker_in_content": 2}
    assert [r.errors[0].field for r in res.rejects] == ["messages[1].tool_calls[0]", "tools"]


def test_verification_catches_a_call_trained_without_its_end_token():
    class CallEndForgotten(Encoder):
        def _trained_regions(self, item):
            return [(s.start, s.end if item.messages[s.message].tool_calls else s.stop)
                    for s in item.rendered.spans if item.flags[s.message]]

    tok = tokenizer("qwen2.5-0.5b-instruct")
    res = CallEndForgotten(tok, load_template("tokenizer", tok)).encode([conversations("glaive_en")[203]])
    assert res.table.num_rows == 0 and res.rejected == {"mask_mismatch": 1}


def test_over_long_tool_conversations_split_between_exchanges():
    """Pieces start with a user turn, never with a tool result whose call is in another piece; every reply is
    trained exactly once; each piece is exactly what the template renders for its messages."""
    tok = tokenizer("qwen2.5-0.5b-instruct")
    conv = conversations("glaive_en")[3]  # 3 exchanges, each a call, its result and an answer
    full = Encoder(tok, load_template("tokenizer", tok), max_len=BIG).encode([conv]).table.to_pylist()[0]
    res = Encoder(tok, load_template("tokenizer", tok), max_len=len(full["input_ids"]) * 2 // 3).encode([conv])
    rows = res.table.to_pylist()
    assert res.counts["extra_pieces"] >= 1 and not res.rejected and len(rows) == 1 + res.counts["extra_pieces"]
    assert [run for row in rows for run in _runs(tok, row)] == _runs(tok, full)
    for row in rows:
        text = tok.decode(row["input_ids"])
        after_system = text.split("</tool_call><|im_end|>\n", 1)[1]  # the system prompt ends with the format example
        assert after_system.startswith("<|im_start|>user\n") and not after_system.startswith("<|im_start|>user\n<tool_")


# --- reasoning + tools: templates that rewrite earlier turns (Qwen3) -----------------------------------------------

AGENT_RECORD = {"messages": [
    {"role": "system", "content": [{"type": "text", "value": "You are a travel agent."}]},
    {"role": "user", "content": [{"type": "text", "value": "Weather in Oslo?"}]},
    {"role": "assistant", "content": [{"type": "reasoning", "value": "I should call the weather tool."},
                                      {"type": "tool_call", "value": '{"name": "get_weather", "arguments": {"city": "Oslo"}}'}]},
    {"role": "tool", "content": [{"type": "text", "value": '{"temp": -3}'}]},
    {"role": "assistant", "content": [{"type": "reasoning", "value": "It is cold."}, {"type": "text", "value": "-3 °C in Oslo."}]},
    {"role": "user", "content": [{"type": "text", "value": "And Paris, and Rome?"}]},
    {"role": "assistant", "content": [{"type": "reasoning", "value": "Two calls at once."},
                                      {"type": "tool_call", "value": '{"name": "get_weather", "arguments": {"city": "Paris"}}'},
                                      {"type": "tool_call", "value": '{"name": "get_weather", "arguments": {"city": "Rome"}}'}]},
    {"role": "tool", "content": [{"type": "text", "value": '{"temp": 12}'}]},
    {"role": "tool", "content": [{"type": "text", "value": '{"temp": 18}'}]},
    {"role": "assistant", "content": [{"type": "text", "value": "Paris 12 °C, Rome 18 °C."}]}],
    "tools": '[{"name": "get_weather", "description": "Current weather", "parameters": {"type": "object", '
             '"properties": {"city": {"type": "string"}}}}]'}


def _agent_chat(upto: int) -> tuple[list[dict], list[dict]]:
    """The agent record's first `upto` messages as chat messages, written out by hand (reasoning folded)."""
    call = lambda city: {"type": "function", "function": {"name": "get_weather", "arguments": {"city": city}}}  # noqa: E731
    messages = [{"role": "system", "content": "You are a travel agent."}, {"role": "user", "content": "Weather in Oslo?"},
                {"role": "assistant", "content": "<think>\nI should call the weather tool.\n</think>\n\n",
                 "tool_calls": [call("Oslo")]},
                {"role": "tool", "content": '{"temp": -3}'},
                {"role": "assistant", "content": "<think>\nIt is cold.\n</think>\n\n-3 °C in Oslo."},
                {"role": "user", "content": "And Paris, and Rome?"},
                {"role": "assistant", "content": "<think>\nTwo calls at once.\n</think>\n\n",
                 "tool_calls": [call("Paris"), call("Rome")]},
                {"role": "tool", "content": '{"temp": 12}'}, {"role": "tool", "content": '{"temp": 18}'},
                {"role": "assistant", "content": "Paris 12 °C, Rome 18 °C."}]
    tools = [{"type": "function", "function": {"name": "get_weather", "description": "Current weather",
                                               "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]
    return messages[:upto], tools


def test_qwen3_expands_replies_whose_reasoning_it_drops_into_examples_of_their_own():
    tok = qwen3_tokenizer()
    conv = convert_record(RECORD_ADAPTERS["openai"].validate_python(AGENT_RECORD), "openai")
    res = Encoder(tok, load_template("tokenizer", tok)).encode([conv])
    rows = res.table.to_pylist()
    assert (len(rows), res.counts["expanded"], res.counts["expanded_conversations"]) == (3, 2, 1)
    for row, upto in zip(rows, (3, 5, 10)):  # the call step, the first answer, then the rest of the conversation
        messages, tools = _agent_chat(upto)
        assert row["input_ids"] == tok.apply_chat_template(messages, tools=tools, tokenize=True, return_dict=True)["input_ids"]
    assert _runs(tok, rows[0]) == ['<think>\nI should call the weather tool.\n</think>\n\n<tool_call>\n{"name": '
                                   '"get_weather", "arguments": {"city": "Oslo"}}\n</tool_call><|im_end|>']
    assert _runs(tok, rows[1]) == ["<think>\nIt is cold.\n</think>\n\n-3 °C in Oslo.<|im_end|>"]
    assert _runs(tok, rows[2]) == [
        '<think>\nTwo calls at once.\n</think>\n\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}'
        '\n</tool_call>\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Rome"}}\n</tool_call><|im_end|>',
        "Paris 12 °C, Rome 18 °C.<|im_end|>"]


def test_expand_turns_off_and_all():
    tok = qwen3_tokenizer()
    conv = convert_record(RECORD_ADAPTERS["openai"].validate_python(AGENT_RECORD), "openai")
    off = Encoder(tok, load_template("tokenizer", tok), expand_turns="off").encode([conv])
    assert off.counts["examples"] == 1 and off.counts["template_dropped_reasoning"] == 2
    assert _runs(tok, off.table.to_pylist()[0])[:2] == [
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call><|im_end|>',
        "-3 °C in Oslo.<|im_end|>"]  # the whole render, as it shows the first two replies
    every = Encoder(tok, load_template("tokenizer", tok), expand_turns="all").encode([conv])
    assert every.counts["examples"] == 4 and every.counts["expanded"] == 3
    assert [len(_runs(tok, r)) for r in every.table.to_pylist()] == [1, 1, 1, 1]


def test_a_template_that_rewrites_earlier_calls_is_expanded_or_rejected():
    """A template that prints calls of earlier turns in short form: the trained text of a call must be what the
    model writes (the full form), so `auto` gives each such call an example of its own; `off` rejects it."""
    short_history = Template(name="tokenizer", chat_template=(
        "{% for m in messages %}{% if m.role == 'assistant' and m.tool_calls %}<|im_start|>assistant\n"
        "{% if loop.last %}{% for t in m.tool_calls %}{{ t.function | tojson }}{% endfor %}"
        "{% else %}[called {{ m.tool_calls | length }}]{% endif %}<|im_end|>\n"
        "{% else %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"))
    tok = tokenizer("qwen2.5-0.5b-instruct")
    conv = conversations("glaive_en")[203].model_copy(update={"tools": None})
    auto = Encoder(tok, short_history).encode([conv])
    assert auto.counts["examples"] == 2 and auto.counts["expanded"] == 1
    assert _runs(tok, auto.table.to_pylist()[0]) == ['{"name": "calculate_age", "arguments": {"birthdate": "1990-05-15"}}'
                                                     '<|im_end|>']
    off = Encoder(tok, short_history, expand_turns="off").encode([conv])
    assert off.rejected == {"template_rewrites_turn": 1} and "--expand-turns auto" in off.rejects[0].errors[0].message


# --- the pipeline: convert, pack, verify, inspect, stats on real tool data ---------------------------------------


def test_convert_and_pack_real_tool_data_with_the_models_own_template(tmp_path):
    def prep(*args):
        return subprocess.run([sys.executable, "-m", "prep", *args], cwd=REPO, capture_output=True, text=True)

    tok = str(REPO.parent / "shared" / "data" / "tokenizers" / "qwen2.5-0.5b-instruct")
    converted = prep("convert", str(FILES["glaive_en"]), str(FILES["drone"]), "-o", str(tmp_path / "agent.jsonl"))
    assert converted.returncode == 0, converted.stderr
    assert "tool_calls 211" in " ".join(converted.stdout.replace("│", " ").split())
    packed = prep("pack", str(tmp_path / "agent.jsonl"), "-o", str(tmp_path / "shards"), "--tokenizer", tok,
                  "--template", "tokenizer", "--max-len", "4096")
    assert packed.returncode == 0, packed.stderr
    counts = json.loads((tmp_path / "shards" / "manifest.json").read_text())["counts"]
    assert (counts["conversations"], counts["tool_calls"], counts["tool_results"]) == (403, 314, 211)
    assert counts["rejected"] == {} and counts["expanded"] == 0
    assert prep("verify", str(tmp_path / "shards")).returncode == 0
    from prep.inspect import inspect_record
    from prep.stats import input_stats

    stats = input_stats(str(tmp_path / "agent.jsonl"), tokenizer=tok, template="tokenizer", max_len=4096)
    assert stats.tokens_by_role["tool"] > 0 and set(stats.tokens_by_role) == {"system", "user", "assistant", "tool",
                                                                               "template"}

    view = inspect_record(FILES["glaive_en"], 203, tokenizer=tok, template="tokenizer")
    kinds = {(p.kind, p.trained) for p in view.examples[0].pieces if p.kind}
    assert kinds == {("call", True), ("result", False)}
