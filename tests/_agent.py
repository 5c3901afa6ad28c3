"""Test helpers for agent data: the real tool-calling files, read two ways, and chat templates of families
that have no tokenizer in ../shared.

- `conversations(name)`: the unified Conversations prep's converter makes of a file, by source line.
- `oracle(name, line)`: the same record as the chat messages and tools an independent reader would give
  `apply_chat_template` (straight from the raw JSON, arguments parsed to objects; prep's code is not used),
  so ids can be compared with what transformers makes of the data.
- LLAMA31_TEMPLATE / QWEN3_TEMPLATE: the chat templates as Meta's Llama-3.1-8B-Instruct and Qwen's Qwen3 ship them
  (copied from their tokenizer_config.json as quoted in public code), put on real tokenizers from ../shared with
  the family's special tokens added (`llama31_tokenizer()`, `qwen3_tokenizer()`).
"""

from __future__ import annotations

import hashlib
import json
from functools import lru_cache

from _conv import DATA, TOKENIZERS

FILES = {
    "glaive_en": DATA / "sharegpt" / "glaive_toolcall_en_demo.json",
    "glaive_zh": DATA / "sharegpt" / "glaive_toolcall_zh_demo.json",
    "drone": DATA / "messages" / "drone_training.jsonl",
}
_SHAREGPT = {"human": "user", "gpt": "assistant", "observation": "tool"}


@lru_cache(maxsize=None)
def raw(name: str) -> tuple[dict, ...]:
    """The records of a tool file, as parsed JSON (JSONL lines are 1-based, JSON arrays 0-based, as in prep)."""
    path = FILES[name]
    if path.suffix == ".jsonl":
        return tuple(json.loads(line) for line in path.read_text(encoding="utf-8").splitlines())
    return tuple(json.loads(path.read_text(encoding="utf-8")))


def line_of(name: str, index: int) -> int:
    """The source line prep gives record `index` of a file."""
    return index + 1 if FILES[name].suffix == ".jsonl" else index


@lru_cache(maxsize=None)
def conversations(name: str) -> dict:
    """{source line: Conversation} of the records of a tool file that prep's converter accepts."""
    from prep.convert import iter_conversations

    return {c.source.line: c for c in iter_conversations(str(FILES[name])) if hasattr(c, "messages")}


def oracle(name: str, line: int) -> tuple[list[dict], list[dict] | None]:
    """(messages, tools) for apply_chat_template, read from the raw record without prep's code."""
    record = raw(name)[line - 1 if FILES[name].suffix == ".jsonl" else line]
    if name == "drone":
        messages = []
        for m in record["messages"]:
            out = {"role": m["role"], "content": m.get("content") or ""}
            if m.get("tool_calls"):
                out["tool_calls"] = [{"type": "function", "function": {"name": c["function"]["name"], "arguments":
                                      json.loads(c["function"]["arguments"])}, "id": c["id"]} for c in m["tool_calls"]]
            messages.append(out)
        return messages, record["tools"]
    messages = []
    for turn in record["conversations"]:
        if turn["from"] == "function_call":
            call = json.loads(turn["value"])
            messages.append({"role": "assistant", "content": "", "tool_calls": [
                {"type": "function", "function": {"name": call["name"], "arguments": call["arguments"]}}]})
        else:
            messages.append({"role": _SHAREGPT[turn["from"]], "content": turn["value"]})
    tools = json.loads(record["tools"])
    return messages, [{"type": "function", "function": t} for t in tools] or None


def with_generated_ids(messages: list[dict], replace: bool = False) -> list[dict]:
    """The ids prep documents for templates that need them: the k-th call of a conversation without an id (every
    call with `replace`) gets the first 9 hex digits of BLAKE2b-40 of "k\\0name\\0arguments (sorted JSON)"; a
    result without an id answers the call at its position."""
    out, k, pending = [], 0, []
    for m in messages:
        m = dict(m)
        if m.get("tool_calls"):
            calls = []
            for c in m["tool_calls"]:
                c = dict(c)
                if "id" not in c or replace:
                    fn = c["function"]
                    payload = f"{k}\x00{fn['name']}\x00{json.dumps(fn['arguments'], sort_keys=True, ensure_ascii=False)}"
                    c["id"] = hashlib.blake2b(payload.encode(), digest_size=5).hexdigest()[:9]
                calls.append(c)
                k += 1
            m["tool_calls"] = calls
            pending = [c["id"] for c in calls]
        elif m["role"] == "tool" and "tool_call_id" not in m:
            m["tool_call_id"] = pending.pop(0)
        out.append(m)
    return out


# Meta's Llama-3.1-8B-Instruct chat template (tokenizer_config.json): tools in the first user message as JSON with
# indent 4, calls as {"name": ..., "parameters": ...}, results in an `ipython` turn (JSON-encoded), one call per
# message; <|python_tag|> for built-in tools (which need `builtin_tools=`, not passed by prep).
LLAMA31_TEMPLATE = r"""{{- bos_token }}
{%- if custom_tools is defined %}
    {%- set tools = custom_tools %}
{%- endif %}
{%- if not tools_in_user_message is defined %}
    {%- set tools_in_user_message = true %}
{%- endif %}
{%- if not date_string is defined %}
    {%- set date_string = "26 Jul 2024" %}
{%- endif %}
{%- if not tools is defined %}
    {%- set tools = none %}
{%- endif %}

{#- This block extracts the system message, so we can slot it into the right place. #}
{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content']|trim %}
    {%- set messages = messages[1:] %}
{%- else %}
    {%- set system_message = "" %}
{%- endif %}

{#- System message + builtin tools #}
{{- "<|start_header_id|>system<|end_header_id|>\n\n" }}
{%- if builtin_tools is defined or tools is not none %}
    {{- "Environment: ipython\n" }}
{%- endif %}
{%- if builtin_tools is defined %}
    {{- "Tools: " + builtin_tools | reject('equalto', 'code_interpreter') | join(", ") + "\n\n"}}
{%- endif %}
{{- "Cutting Knowledge Date: December 2023\n" }}
{{- "Today Date: " + date_string + "\n\n" }}
{%- if tools is not none and not tools_in_user_message %}
    {{- "You have access to the following functions. To call a function, please respond with JSON for a function call." }}
    {{- 'Respond in the format {"name": function name, "parameters": dictionary of argument name and its value}.' }}
    {{- "Do not use variables.\n\n" }}
    {%- for t in tools %}
        {{- t | tojson(indent=4) }}
        {{- "\n\n" }}
    {%- endfor %}
{%- endif %}
{{- system_message }}
{{- "<|eot_id|>" }}

{#- Custom tools are passed in a user message with some extra guidance #}
{%- if tools_in_user_message and not tools is none %}
    {#- Extract the first user message so we can plug it in here #}
    {%- if messages | length != 0 %}
        {%- set first_user_message = messages[0]['content']|trim %}
        {%- set messages = messages[1:] %}
    {%- else %}
        {{- raise_exception("Cannot put tools in the first user message when there's no first user message!") }}
{%- endif %}
    {{- '<|start_header_id|>user<|end_header_id|>\n\n' -}}
    {{- "Given the following functions, please respond with a JSON for a function call " }}
    {{- "with its proper arguments that best answers the given prompt.\n\n" }}
    {{- 'Respond in the format {"name": function name, "parameters": dictionary of argument name and its value}.' }}
    {{- "Do not use variables.\n\n" }}
    {%- for t in tools %}
        {{- t | tojson(indent=4) }}
        {{- "\n\n" }}
    {%- endfor %}
    {{- first_user_message + "<|eot_id|>"}}
{%- endif %}

{%- for message in messages %}
    {%- if not (message.role == 'ipython' or message.role == 'tool' or 'tool_calls' in message) %}
        {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' }}
    {%- elif 'tool_calls' in message %}
        {%- if not message.tool_calls|length == 1 %}
            {{- raise_exception("This model only supports single tool-calls at once!") }}
        {%- endif %}
        {%- set tool_call = message.tool_calls[0].function %}
        {%- if builtin_tools is defined and tool_call.name in builtin_tools %}
            {{- '<|start_header_id|>assistant<|end_header_id|>\n\n' -}}
            {{- "<|python_tag|>" + tool_call.name + ".call(" }}
            {%- for arg_name, arg_val in tool_call.arguments | items %}
                {{- arg_name + '="' + arg_val + '"' }}
                {%- if not loop.last %}
                    {{- ", " }}
                {%- endif %}
                {%- endfor %}
            {{- ")" }}
        {%- else  %}
            {{- '<|start_header_id|>assistant<|end_header_id|>\n\n' -}}
            {{- '{"name": "' + tool_call.name + '", ' }}
            {{- '"parameters": ' }}
            {{- tool_call.arguments | tojson }}
            {{- "}" }}
        {%- endif %}
        {%- if builtin_tools is defined %}
            {#- This means we're in ipython mode #}
            {{- "<|eom_id|>" }}
        {%- else %}
            {{- "<|eot_id|>" }}
        {%- endif %}
    {%- elif message.role == "tool" or message.role == "ipython" %}
        {{- "<|start_header_id|>ipython<|end_header_id|>\n\n" }}
        {%- if message.content is mapping or message.content is iterable %}
            {{- message.content | tojson }}
        {%- else %}
            {{- message.content }}
        {%- endif %}
        {{- "<|eot_id|>" }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\n\n' }}
{%- endif %}
"""
LLAMA31_SPECIALS = ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "<|eom_id|>",
                    "<|python_tag|>"]

# Qwen's Qwen3 chat template (tokenizer_config.json): Hermes-style tools in the system turn, <tool_call> blocks,
# results in a user turn as <tool_response>; the <think> block of a reply is kept only after the last user query
# (and an empty one is written before the last reply), so earlier replies lose their reasoning.
QWEN3_TEMPLATE = r"""{%- if tools %}
    {{- '<|im_start|>system\n' }}
    {%- if messages[0].role == 'system' %}
        {{- messages[0].content + '\n\n' }}
    {%- endif %}
    {{- "# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are provided with function signatures within <tools></tools> XML tags:\n<tools>" }}
    {%- for tool in tools %}
        {{- "\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\n</tools>\n\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": <args-json-object>}\n</tool_call><|im_end|>\n" }}
{%- else %}
    {%- if messages[0].role == 'system' %}
        {{- '<|im_start|>system\n' + messages[0].content + '<|im_end|>\n' }}
    {%- endif %}
{%- endif %}
{%- set ns = namespace(multi_step_tool=true, last_query_index=messages|length - 1) %}
{%- for message in messages[::-1] %}
    {%- set index = (messages|length - 1) - loop.index0 %}
    {%- if ns.multi_step_tool and message.role == "user" and message.content is string and not(message.content.startswith('<tool_response>') and message.content.endswith('</tool_response>')) %}
        {%- set ns.multi_step_tool = false %}
        {%- set ns.last_query_index = index %}
    {%- endif %}
{%- endfor %}
{%- for message in messages %}
    {%- if message.content is string %}
        {%- set content = message.content %}
    {%- else %}
        {%- set content = '' %}
    {%- endif %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) %}
        {{- '<|im_start|>' + message.role + '\n' + content + '<|im_end|>' + '\n' }}
    {%- elif message.role == "assistant" %}
        {%- set reasoning_content = '' %}
        {%- if message.reasoning_content is string %}
            {%- set reasoning_content = message.reasoning_content %}
        {%- else %}
            {%- if '</think>' in content %}
                {%- set reasoning_content = content.split('</think>')[0].rstrip('\n').split('<think>')[-1].lstrip('\n') %}
                {%- set content = content.split('</think>')[-1].lstrip('\n') %}
            {%- endif %}
        {%- endif %}
        {%- if loop.index0 > ns.last_query_index %}
            {%- if loop.last or (not loop.last and reasoning_content) %}
                {{- '<|im_start|>' + message.role + '\n<think>\n' + reasoning_content.strip('\n') + '\n</think>\n\n' + content.lstrip('\n') }}
            {%- else %}
                {{- '<|im_start|>' + message.role + '\n' + content }}
            {%- endif %}
        {%- else %}
            {{- '<|im_start|>' + message.role + '\n' + content }}
        {%- endif %}
        {%- if message.tool_calls %}
            {%- for tool_call in message.tool_calls %}
                {%- if (loop.first and content) or (not loop.first) %}
                    {{- '\n' }}
                {%- endif %}
                {%- if tool_call.function %}
                    {%- set tool_call = tool_call.function %}
                {%- endif %}
                {{- '<tool_call>\n{"name": "' }}
                {{- tool_call.name }}
                {{- '", "arguments": ' }}
                {%- if tool_call.arguments is string %}
                    {{- tool_call.arguments }}
                {%- else %}
                    {{- tool_call.arguments | tojson }}
                {%- endif %}
                {{- '}\n</tool_call>' }}
            {%- endfor %}
        {%- endif %}
        {{- '<|im_end|>\n' }}
    {%- elif message.role == "tool" %}
        {%- if loop.first or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\n<tool_response>\n' }}
        {{- content }}
        {{- '\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
    {%- if enable_thinking is defined and enable_thinking is false %}
        {{- '<think>\n\n</think>\n\n' }}
    {%- endif %}
{%- endif %}"""


def llama31_tokenizer():
    """The real SmolLM2 tokenizer with Llama 3.1's special tokens and chat template."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(TOKENIZERS / "smollm2-135m")
    tok.add_special_tokens({"additional_special_tokens": LLAMA31_SPECIALS, "bos_token": "<|begin_of_text|>"})
    tok.chat_template = LLAMA31_TEMPLATE
    return tok


def qwen3_tokenizer():
    """The real Qwen2.5 tokenizer (Qwen3's vocabulary up to its <think> tokens) with Qwen3's chat template."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(TOKENIZERS / "qwen2.5-0.5b-instruct")
    tok.chat_template = QWEN3_TEMPLATE
    return tok
