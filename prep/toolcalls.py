"""Tool calls, tool results' links and tool definitions, read from the many shapes raw data gives them.

Every shape becomes the unified one (schemas.conversation): a call is `ToolCall(id, name, arguments)` with
`arguments` a JSON object; `tools` is a list of `{"type": "function", "function": {name, description,
parameters}}` objects (bare function specs are wrapped, an empty list is no tools). What cannot be read is an
`Unconvertible` naming the field: `invalid_tool_call` (not a call, no name, arguments that are not a JSON
object) or `invalid_tools` (not a list of function specs).

Shapes read as calls:
- OpenAI: `{"id": ..., "type": "function", "function": {"name": ..., "arguments": "<JSON text>" | {...}}}`,
  and the legacy `function_call: {"name": ..., "arguments": ...}`;
- flat `{"name": ..., "arguments": ...}` (glaive / LLaMA-Factory `function_call` turns and `tool_call` parts,
  given as JSON text; a JSON list holds several calls); `parameters` is read as `arguments` (Llama 3.1's form).
"""

from __future__ import annotations

from typing import Any

import pydantic_core

from schemas.conversation import ToolCall


class Unconvertible(Exception):
    """A converter cannot map a record (e.g. a transcript without role markers, a call that is not JSON)."""

    def __init__(self, field: str, message: str, reason: str):
        super().__init__(message)
        self.field, self.message, self.reason = field, message, reason


def parse_call(value: Any, path: str) -> ToolCall:
    """One call in any supported shape (a dict), as a ToolCall.

    Raises:
        Unconvertible: `invalid_tool_call`, naming `path`.

    >>> parse_call({"id": "c1", "type": "function", "function": {"name": "f", "arguments": '{"x": 1}'}}, "m")
    ToolCall(id='c1', name='f', arguments={'x': 1})
    >>> parse_call({"name": "f", "arguments": {"x": 1}}, "m").arguments
    {'x': 1}
    """
    if not isinstance(value, dict):
        raise _bad_call(path, f"a tool call must be an object, got {_kind(value)}")
    spec = value.get("function") if isinstance(value.get("function"), dict) else value
    name = spec.get("name")
    if not isinstance(name, str) or not name:
        raise _bad_call(f"{path}.name" if spec is value else f"{path}.function.name",
                        f"a tool call needs a function name (a non-empty string), got {_kind(name)}")
    key = "arguments" if "arguments" in spec or "parameters" not in spec else "parameters"
    arguments = _arguments(spec.get(key, {}), f"{path}{'' if spec is value else '.function'}.{key}")
    call_id = value.get("id")
    if call_id is not None and not isinstance(call_id, str):
        raise _bad_call(f"{path}.id", f"a tool call id must be a string, got {_kind(call_id)}")
    return ToolCall.model_construct(id=call_id, name=name, arguments=arguments)


def parse_calls(value: Any, path: str) -> list[ToolCall]:
    """A list of calls (OpenAI `tool_calls`), or one call (a legacy `function_call`).

    Raises:
        Unconvertible: `invalid_tool_call`.

    >>> [c.name for c in parse_calls([{"function": {"name": "a", "arguments": "{}"}}, {"name": "b"}], "m")]
    ['a', 'b']
    """
    if isinstance(value, dict):
        return [parse_call(value, path)]
    if not isinstance(value, list) or not value:
        raise _bad_call(path, f"expected a list of tool calls, got {_kind(value)}")
    return [parse_call(v, f"{path}[{j}]") for j, v in enumerate(value)]


def parse_call_text(text: Any, path: str) -> list[ToolCall]:
    """The calls held as JSON text (a ShareGPT `function_call` value, a `tool_call` content part): one call
    object or a list of them. An object is accepted as well as its text.

    Raises:
        Unconvertible: `invalid_tool_call` (not JSON, or not a call).

    >>> parse_call_text('{"name": "search", "arguments": {"q": "rain"}}', "conversations[1].value")
    [ToolCall(id=None, name='search', arguments={'q': 'rain'})]
    """
    value = text
    if isinstance(text, str):
        try:
            value = pydantic_core.from_json(text)
        except ValueError as e:
            raise _bad_call(path, f"a tool call must be JSON ({{\"name\": ..., \"arguments\": {{...}}}}): {e}") from None
    return parse_calls(value, path)


def _arguments(value: Any, path: str) -> dict[str, Any]:
    """Arguments as a JSON object: an object, or JSON text holding one."""
    if isinstance(value, str):
        try:
            value = pydantic_core.from_json(value)
        except ValueError as e:
            raise _bad_call(path, f"arguments are not valid JSON: {e}") from None
    if not isinstance(value, dict):
        raise _bad_call(path, f"arguments must be a JSON object, got {_kind(value)}")
    return value


def parse_tools(value: Any, path: str) -> list[dict[str, Any]] | None:
    """The tools available to a conversation, in the unified form; None when there are none.

    Accepted: a list (or its JSON text) of `{"type": "function", "function": {"name": ...}}` objects or bare
    function specs `{"name": ..., "parameters": ...}` (wrapped). Tools of another `type` are kept as they are.

    Raises:
        Unconvertible: `invalid_tools` (not a list of objects, or a function spec without a name).

    >>> parse_tools('[{"name": "f", "parameters": {}}]', "tools")
    [{'type': 'function', 'function': {'name': 'f', 'parameters': {}}}]
    >>> parse_tools("[]", "tools") is None
    True
    """
    if value is None:
        return None
    if isinstance(value, str):
        try:
            value = pydantic_core.from_json(value) if value.strip() else []
        except ValueError as e:
            raise Unconvertible(path, f"tools are not valid JSON: {e}", "invalid_tools") from None
    if not isinstance(value, list):
        raise Unconvertible(path, f"tools must be a list of function specs, got {_kind(value)}", "invalid_tools")
    return [_tool(t, f"{path}[{k}]") for k, t in enumerate(value)] or None


def _tool(tool: Any, path: str) -> dict[str, Any]:
    """One tool in the unified form."""
    if not isinstance(tool, dict):
        raise Unconvertible(path, f"a tool must be an object (a function spec), got {_kind(tool)}", "invalid_tools")
    if "type" not in tool or tool.get("type") == "function":
        spec = tool.get("function", tool) if "type" in tool else tool
        if not isinstance(spec, dict) or not isinstance(spec.get("name"), str) or not spec["name"]:
            raise Unconvertible(path, "a function tool needs a name: {\"name\": ..., \"parameters\": {...}} or "
                                "{\"type\": \"function\", \"function\": {\"name\": ...}}", "invalid_tools")
        return tool if "type" in tool else {"type": "function", "function": tool}
    return tool


def _bad_call(path: str, message: str) -> Unconvertible:
    """An `invalid_tool_call` error at `path`."""
    return Unconvertible(path, message, "invalid_tool_call")


def _kind(value: Any) -> str:
    """A short description of a JSON value's type, for messages."""
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean", type(None): "nothing"}.get(
        type(value), f"a {type(value).__name__}")
