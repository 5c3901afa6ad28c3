"""The unified conversation form every input format converts to.

A `Conversation` is an optional system message followed by turns: a user message, then the assistant's
reply. A reply is one assistant message, or an agent step: assistant messages that call tools
(`tool_calls`), each followed by the `tool` messages holding the results, and finally an assistant message.
A conversation ends with an assistant message (which may itself be a tool call). The tools the assistant
may call are the conversation's `tools`. Content is kept byte-for-byte: nothing is stripped, so code blocks
and indentation survive.
"""

from __future__ import annotations

import hashlib
from typing import Any, Literal

import pydantic_core
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

Role = Literal["system", "user", "assistant", "tool"]
ROLES: tuple[str, ...] = ("system", "user", "assistant", "tool")


def _unset(value: Any) -> bool:
    """A field left out of the JSON form (the tool fields are written only when set, so old files stay the same)."""
    return value is None


class ToolCall(BaseModel):
    """One function call made by an assistant message: optional `id`, the function `name`, its `arguments`.

    >>> ToolCall(name="get_weather", arguments={"city": "Oslo"}).model_dump_json()
    '{"name":"get_weather","arguments":{"city":"Oslo"}}'
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    id: str | None = Field(None, exclude_if=_unset, description="the call id that a tool result may refer to")
    name: str = Field(min_length=1, description="the function called")
    arguments: dict[str, Any] = Field(default_factory=dict, description="the arguments, a JSON object")

    @field_validator("arguments", mode="before")
    @classmethod
    def _decode_json_text(cls, value: Any) -> Any:
        """Arguments stored as JSON text (unified Parquet keeps them so) are read as the object they hold."""
        return pydantic_core.from_json(value) if isinstance(value, str) else value


class Message(BaseModel):
    """One message: who speaks, what they say, an optional training override, and tool traffic.

    `train=None` lets the pack-time policy (`--train-on`) decide; `True`/`False` forces it. An assistant
    message may carry `tool_calls`; a `tool` message holds a call's result, with the function `name` and
    the `tool_call_id` it answers when the data gives them.

    >>> Message(role="user", content="Hi").role
    'user'
    >>> Message(role="tool", content="21 °C", name="get_weather").model_dump_json()
    '{"role":"tool","content":"21 °C","train":null,"name":"get_weather"}'
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    role: Role
    content: str
    train: bool | None = None
    tool_calls: list[ToolCall] | None = Field(None, exclude_if=_unset)
    name: str | None = Field(None, exclude_if=_unset)
    tool_call_id: str | None = Field(None, exclude_if=_unset)


class SourceRef(BaseModel):
    """Where a record came from: the input file and its 1-based line (JSONL) or 0-based row (others)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    path: str
    line: int
    format: str | None = None


class Conversation(BaseModel):
    """The unified form: `id`, `source`, `messages`, free-form `meta`, and the `tools` of an agent conversation.

    >>> c = Conversation(id="x", messages=[Message(role="user", content="2+2?"),
    ...                                    Message(role="assistant", content="4")])
    >>> [m.role for m in c.messages]
    ['user', 'assistant']
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    id: str
    source: SourceRef | None = None
    messages: list[Message]
    meta: dict[str, Any] = Field(default_factory=dict)
    tools: list[dict[str, Any]] | None = Field(None, exclude_if=_unset, description="the tools available (function "
                                               "specs: {\"type\": \"function\", \"function\": {name, description, "
                                               "parameters}})")

    @model_validator(mode="after")
    def _check_turns(self) -> "Conversation":
        problems = conversation_problems(self.messages, self.tools)
        if problems:
            raise ValueError("; ".join(f"{field}: {msg}" for field, msg, _ in problems))
        return self


def conversation_problems(messages: list[Message], tools: list[dict[str, Any]] | None = None
                          ) -> list[tuple[str, str, str]]:
    """Check the turn rules; return `(field, message, reason)` for each violation (empty when valid).

    Rules: an optional system message comes first and only first; then user turns and replies alternate,
    starting with a user turn; a reply is an assistant message, or an agent step: an assistant message with
    `tool_calls` followed by its results (one or more `tool` messages), then the next assistant message; the
    conversation ends with an assistant message (which may be a tool call). Every assistant message has
    non-whitespace content or tool calls. A tool result follows a call (and names one of that call's ids when
    both give ids); a call names one of `tools` when tools are given.

    >>> conversation_problems([Message(role="user", content="hi")])
    [('messages', 'no assistant turn', 'no_assistant_turn')]
    >>> conversation_problems([Message(role="user", content="hi"), Message(role="tool", content="42"),
    ...                        Message(role="assistant", content="42.")])[0][2]
    'orphan_tool_result'
    """
    out: list[tuple[str, str, str]] = []
    start = 1 if messages and messages[0].role == "system" else 0
    turns = messages[start:]
    if not any(m.role == "assistant" for m in turns):
        return [("messages", "no assistant turn", "no_assistant_turn")]
    state, call = "start", None
    for i, m in enumerate(turns, start):
        problem = _turn_problem(state, call, m)
        if problem is not None:
            out.append((f"messages[{i}].role", *problem))
            break
        state = _NEXT_STATE[m.role] if m.role != "assistant" or not m.tool_calls else "call"
        call = m if state == "call" else call
    for i, m in enumerate(messages):
        if m.role == "assistant" and not m.content.strip() and not m.tool_calls:
            out.append((f"messages[{i}].content", "empty or whitespace-only response", "empty_response"))
    if tools:
        out += _unknown_tools(messages, tools)
    last = turns[-1].role
    if last in ("user", "tool") and not out:
        what, reason = ("a user turn", "ends_with_user") if last == "user" else \
            ("a tool result (no reply follows to train)", "ends_with_tool")
        out.append((f"messages[{len(messages) - 1}].role", f"conversation ends with {what}", reason))
    return out


# The state after a message (an assistant message with tool calls leaves "call"), and what may follow each state.
_NEXT_STATE = {"user": "user", "assistant": "reply", "tool": "results", "system": "start"}
_EXPECTED = {"start": "user", "user": "assistant", "reply": "user", "call": "tool", "results": "assistant"}


def _turn_problem(state: str, call: Any, m: Any) -> tuple[str, str] | None:
    """(message, reason) when message `m` may not come in `state`; `call` is the last message with tool calls."""
    role = m.role
    if role == "system":
        return f"expected {_EXPECTED[state]!r}, got 'system'", "misplaced_system"
    if role == "tool":
        if state not in ("call", "results"):
            return "a tool result with no tool call before it", "orphan_tool_result"
        ids = [c.id for c in call.tool_calls if c.id is not None]
        if m.tool_call_id is not None and ids and m.tool_call_id not in ids:
            return (f"tool_call_id {m.tool_call_id!r} answers none of the calls before it ({', '.join(ids)})",
                    "orphan_tool_result")
        return None
    if state == "call":
        return f"a tool call followed by {role!r} instead of its result (a 'tool' message)", "tool_call_without_result"
    if role == "user" and state in ("start", "reply", "results"):
        return None
    if role == "assistant" and state in ("user", "results"):
        return None
    return f"expected {_EXPECTED[state]!r}, got {role!r}", "turns_not_alternating"


def tool_names(tools: list[dict[str, Any]]) -> set[str]:
    """The function names of a tools list (`{"type": "function", "function": {"name": ...}}` or bare specs).

    >>> sorted(tool_names([{"type": "function", "function": {"name": "a"}}, {"name": "b"}]))
    ['a', 'b']
    """
    names = set()
    for tool in tools:
        spec = tool.get("function") if isinstance(tool.get("function"), dict) else tool
        if isinstance(spec.get("name"), str):
            names.add(spec["name"])
    return names


def _unknown_tools(messages: list[Message], tools: list[dict[str, Any]]) -> list[tuple[str, str, str]]:
    """A problem for each call to a function that `tools` does not define (when it names any)."""
    names = tool_names(tools)
    if not names:
        return []
    return [(f"messages[{i}].tool_calls[{j}].name", f"calls {c.name!r}, which is not in tools "
             f"({', '.join(sorted(names))})", "unknown_tool")
            for i, m in enumerate(messages) if m.tool_calls for j, c in enumerate(m.tool_calls) if c.name not in names]


# An assistant reply with its reasoning folded in front (DeepSeek-R1 / Qwen3 form): OPEN + reasoning + CLOSE + reply.
REASONING_OPEN = "<think>\n"
REASONING_CLOSE = "\n</think>\n\n"


def split_reasoning(content: str) -> tuple[str, str] | None:
    """(reasoning, reply) of a content in the folded `<think>` form, or None for any other content.

    >>> split_reasoning("<think>\\n2 and 2.\\n</think>\\n\\n4"), split_reasoning("4")
    (('2 and 2.', '4'), None)
    """
    if not content.startswith(REASONING_OPEN):
        return None
    end = content.find(REASONING_CLOSE, len(REASONING_OPEN))
    if end < 0:
        return None
    return content[len(REASONING_OPEN) : end], content[end + len(REASONING_CLOSE) :]


def content_hash(messages: list[Message], tools: list[dict[str, Any]] | None = None) -> str:
    """A stable 16-hex-digit hash of the roles, contents, tool calls and tools (used for ids and `--dedup`).

    A conversation without tool traffic hashes its roles and contents only, as it always has.

    >>> content_hash([Message(role="user", content="a"), Message(role="assistant", content="b")])
    '46d0642b854dd922'
    """
    # One update over the joined bytes: the same digest as one update per part, at half the cost;
    # the parts are joined once (an f-string per message would copy every content twice).
    parts: list[str] = []
    for m in messages:
        parts += (m.role, "\x00", m.content, "\x01")
        if m.tool_calls is not None or m.name is not None or m.tool_call_id is not None:
            parts += ("\x02", _tool_fields_json(m), "\x01")
    if tools:
        parts += ("\x03", pydantic_core.to_json(tools).decode())
    return hashlib.blake2b("".join(parts).encode("utf-8", "surrogatepass"), digest_size=8).hexdigest()


def _tool_fields_json(m: Any) -> str:
    """The tool fields of a message as JSON text (for hashing)."""
    calls = [(c.id, c.name, c.arguments) for c in m.tool_calls] if m.tool_calls is not None else None
    return pydantic_core.to_json([calls, m.name, m.tool_call_id]).decode()
