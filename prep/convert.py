"""Convert raw records of any supported format into unified conversations.

Each format has one small pure function (the `CONVERTERS` registry) that maps its raw model to a
`Draft`: the turns in unified roles, plus `meta` that keeps whatever the unified form has no field
for. One shared function, `finish`, then applies the rules, the same for every format:

1. Trailing user turns and tool results (nothing follows to train) are removed and kept in
   `meta["trailing_user"]` / `meta["trailing_tool"]`.
2. Consecutive turns of the same role are merged, joined with a blank line ("\\n\\n"); the number of
   merges is kept in `meta["merged_turns"]`. Tool results are never merged; consecutive assistant
   messages merge into one that keeps the content first and the tool calls after it (a reasoning-only
   step folds into the reply after it).
3. A conversation whose first non-system turn is an assistant turn is rejected (`starts_with_assistant`).
4. `schemas.conversation.conversation_problems` checks the rest: at least one assistant turn,
   non-empty responses, a system message only first, tool results after a call, calls to known tools.

Unified records are not repaired: they are accepted as they are (keeping their id, source and meta)
or rejected. The pipeline is `read -> validate -> convert -> sink`; `convert_files` runs it for the
CLI and `iter_conversations` streams the conversations to later stages.
"""

from __future__ import annotations

import gc
import json
import os
import re
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from itertools import pairwise
from typing import Any, NamedTuple

import pydantic_core
from pydantic import ValidationError

from prep.errors import AccountingError, ConfigError, PrepError, flag_error
from prep.fieldmap import parse_fields
from prep.read import BATCH_SIZE, expand_inputs
from prep.report import Counts, Report
from prep.sink import JsonlSink, ParquetSink, check_outputs
from prep.validate import STAGE, ValidatedBatch, raw_text, validate_file
from schemas.config import ConvertConfig
from prep.toolcalls import Unconvertible, parse_call_text, parse_calls, parse_tools
from schemas.conversation import (
    REASONING_CLOSE,
    REASONING_OPEN,
    Conversation,
    Message,
    SourceRef,
    ToolCall,
    content_hash,
    conversation_problems,
    split_reasoning,
)
from schemas.raw import (
    TOOL_CALL,
    AlpacaRecord,
    OpenAIMessage,
    OpenAIRecord,
    PromptCompletionRecord,
    RawRecord,
    ShareGPTRecord,
    TranscriptRecord,
    UnifiedRecord,
    unified_role,
)
from schemas.reject import ErrorDetail, Reject

TURN_SEPARATOR = "\n\n"
_to_json = pydantic_core.to_json


class DraftTurn(NamedTuple):
    """One message while converting: unified role, content, its path in the raw record, training override, and
    the tool fields of schemas.conversation.Message (calls of an assistant; function name and call id of a result)."""

    role: str
    content: str
    src: str = ""
    train: bool | None = None
    tool_calls: list[ToolCall] | None = None
    name: str | None = None
    tool_call_id: str | None = None


class Draft(NamedTuple):
    """A converter's output: turns, meta and tools; unified records also carry their id and source."""

    turns: list[DraftTurn]
    meta: dict[str, Any]
    id: str | None = None
    source: dict[str, Any] | None = None
    repair: bool = True
    tools: list[dict[str, Any]] | None = None


class Accepted(NamedTuple):
    """A conversation that passed the rules, in the light form the hot path serializes directly.

    `calls`/`results` count its tool calls and tool messages; `trimmed_tool` says trailing results were removed.
    """

    id: str
    hash: str
    source: dict[str, Any] | None
    turns: list[DraftTurn]
    meta: dict[str, Any]
    merged: int
    trimmed: bool
    tools: list[dict[str, Any]] | None = None
    calls: int = 0
    results: int = 0
    trimmed_tool: bool = False


# --- one converter per format ---------------------------------------------------------------


def _join(parts: Iterable[str]) -> str:
    """Join non-empty parts with a blank line (an empty part would leave a stray separator)."""
    return TURN_SEPARATOR.join(p for p in parts if p)


def _extras(record: Any) -> dict[str, Any]:
    """The record's keys its model does not name, as a fresh meta dict."""
    extra = record.__pydantic_extra__
    return dict(extra) if extra else {}


def alpaca_turns(r: AlpacaRecord) -> Draft:
    """Alpaca/Dolly/GPTeacher: [system], history pairs, user = instruction + blank line + input, assistant = output.

    >>> d = alpaca_turns(AlpacaRecord(instruction="Sum", input="2 2", output="4"))
    >>> [(t.role, t.content) for t in d.turns]
    [('user', 'Sum\\n\\n2 2'), ('assistant', '4')]
    """
    instruction, extra = r.instruction, r.input
    user = f"{instruction}{TURN_SEPARATOR}{extra}" if instruction and extra else instruction or extra or ""
    turns = [DraftTurn("user", user, "instruction"), DraftTurn("assistant", r.output, "output")]
    if r.history:
        turns[:0] = [DraftTurn(role, text, f"history[{i}][{j}]") for i, pair in enumerate(r.history)
                     for j, (role, text) in enumerate(zip(("user", "assistant"), pair, strict=True))]
    if r.system:
        turns.insert(0, DraftTurn("system", r.system, "system"))
    return Draft(turns, _extras(r))


REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")  # the names transformers' chat templates read


def fold_reasoning(reasoning: str, content: str) -> str:
    """An assistant reply with its reasoning in front, in the `<think>` form of DeepSeek-R1 and Qwen3.

    >>> fold_reasoning("2+2 is 4.", "4")
    '<think>\\n2+2 is 4.\\n</think>\\n\\n4'
    """
    return f"{REASONING_OPEN}{reasoning}{REASONING_CLOSE}{content}"


def _message_fields(turns: list[DraftTurn], messages: Sequence[Any], meta: dict[str, Any]) -> None:
    """Keep the messages' unknown keys in `meta["message_fields"]`, folding an assistant's reasoning into its turn.

    `turns[i]` is `messages[i]`'s turn (None: a turn given as plain text); its `src` path names the message.
    Folded replies are counted in `meta["reasoning_folded"]`; every other key is kept under the message's path.
    """
    kept: dict[str, dict[str, Any]] = {}
    folded = 0
    for i, m in enumerate(messages):
        extra = m.__pydantic_extra__ if m is not None else None
        if not extra:
            continue
        extra = dict(extra)
        reasoning = next((extra[k] for k in REASONING_FIELDS if isinstance(extra.get(k), str)), None)
        if reasoning is not None and turns[i].role == "assistant":
            for key in REASONING_FIELDS:
                if extra.get(key) == reasoning:
                    del extra[key]
            if reasoning:
                turns[i] = turns[i]._replace(content=fold_reasoning(reasoning, turns[i].content))
                folded += 1
        if turns[i].name is not None:
            extra.pop("name", None)  # a tool result's function name is a field of the unified message
        if extra:
            kept[turns[i].src] = extra
    if kept:
        meta["message_fields"] = kept
    if folded:
        meta["reasoning_folded"] = folded


def sharegpt_turns(r: ShareGPTRecord) -> Draft:
    """ShareGPT: role aliases mapped; a `function_call` turn's value (JSON) becomes the calls of an assistant
    message, an `observation` turn a `tool` message; `tools` (a list or its JSON text) becomes the tools.

    >>> d = sharegpt_turns(ShareGPTRecord.model_validate({"conversations": [
    ...     {"from": "human", "value": "Weather?"}, {"from": "function_call", "value": '{"name": "w"}'},
    ...     {"from": "observation", "value": "sun"}, {"from": "gpt", "value": "Sunny."}], "tools": '[{"name": "w"}]'}))
    >>> [t.role for t in d.turns], d.turns[1].tool_calls[0].name, d.tools[0]["function"]["name"]
    (['user', 'assistant', 'tool', 'assistant'], 'w', 'w')
    """
    turns = []
    for i, m in enumerate(r.conversations):
        role = unified_role(m.from_)
        if role == TOOL_CALL:
            path = f"conversations[{i}]"
            turns.append(DraftTurn("assistant", "", path, tool_calls=parse_call_text(m.value, f"{path}.value")))
        else:
            turns.append(DraftTurn(role, m.value, f"conversations[{i}]"))
    meta = _extras(r)
    _message_fields(turns, r.conversations, meta)
    if r.system:
        turns.insert(0, DraftTurn("system", r.system, "system"))
    return Draft(turns, meta, tools=parse_tools(r.tools, "tools"))


def openai_turns(r: OpenAIRecord) -> Draft:
    """OpenAI messages: `tool_calls` (or a legacy `function_call`) become the message's calls, `tool`/`function`
    messages tool results, `tools` (or the legacy `functions`) the tools.

    A list `content` is its text parts joined (as chat templates print them), with `reasoning` parts folded in
    front and `tool_call` parts as calls; an assistant message's `weight` becomes its training override (0: not
    trained, 1: trained).

    >>> d = openai_turns(OpenAIRecord.model_validate({"messages": [
    ...     {"role": "developer", "content": [{"type": "text", "text": "Be brief."}]},
    ...     {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!", "weight": 0}]}))
    >>> [(t.role, t.content, t.train) for t in d.turns]
    [('system', 'Be brief.', None), ('user', 'Hi', None), ('assistant', 'Hello!', False)]
    """
    turns = message_turns(r.messages, "messages")
    meta = _extras(r)
    _message_fields(turns, r.messages, meta)
    key = "tools" if r.tools is not None or r.functions is None else "functions"
    if key == "tools" and r.functions is not None:
        meta["functions"] = r.functions
    return Draft(turns, meta, tools=parse_tools(getattr(r, key), key))


def message_turns(messages: list[OpenAIMessage], prefix: str) -> list[DraftTurn]:
    """OpenAI-style messages as turns (each turn's path `prefix[i]`)."""
    turns = []
    for i, m in enumerate(messages):
        role = unified_role(m.role)
        path = f"{prefix}[{i}]"
        content, calls = m.content, None
        if content.__class__ is not str:
            content, calls = ("", None) if content is None else _parts(content, path, role)
        if m.tool_calls is not None or m.function_call is not None:
            key = "tool_calls" if m.tool_calls is not None else "function_call"
            calls = (calls or []) + parse_calls(getattr(m, key), f"{path}.{key}")
        train = bool(m.weight) if m.weight is not None and role == "assistant" else None
        if role == "tool":
            extra = m.__pydantic_extra__
            name = extra.get("name") if extra and isinstance(extra.get("name"), str) else None
            turns.append(DraftTurn(role, content, path, train, None, name, m.tool_call_id))
        else:
            turns.append(DraftTurn(role, content, path, train, calls) if calls else DraftTurn(role, content, path, train))
    return turns


REASONING_PARTS = ("reasoning", "thinking")


def _parts(parts: list[Any], path: str, role: str) -> tuple[str, list[ToolCall] | None]:
    """The text and calls of a list `content`: `text` parts joined, `reasoning` parts folded in front (an assistant's),
    `tool_call` parts as calls; any other kind of part (image, audio, file) cannot become SFT text."""
    texts, reasoning, calls = [], [], []
    for j, part in enumerate(parts):
        kind, body = part.type, part.body
        where = f"{path}.content[{j}]"
        if kind == "text" and isinstance(body, str):
            texts.append(body)
        elif kind in REASONING_PARTS and isinstance(body, str) and role == "assistant":
            reasoning.append(body)
        elif kind == "tool_call" and role == "assistant" and body is not None:
            calls += parse_call_text(body, f"{where}.{'text' if part.text is not None else 'value'}")
        else:
            got = "without a text (or value) string" if kind == "text" else f"of type {kind!r}"
            raise Unconvertible(where, f"content part {got} is not text (prep prepares text-only data); accepted: "
                                "{'type': 'text', 'text' or 'value': ...}, and in assistant messages 'reasoning' "
                                "and 'tool_call' parts", "unsupported_content")
    text = "".join(texts)
    if reasoning:
        text = fold_reasoning("".join(reasoning), text)
    return text, calls or None


def prompt_completion_turns(r: PromptCompletionRecord) -> Draft:
    """TRL prompt-completion and preference records: the prompt, then the completion (or the chosen answer).

    A text prompt is one user turn, a text answer one assistant turn; message lists map as OpenAI messages.
    As in TRL, only the answer is trained: an assistant turn inside the prompt is context (`train: false`). When
    the answer repeats the prompt (a `chosen` holding the whole conversation) the prompt is not added twice.
    `rejected` and any other key go to meta.

    >>> d = prompt_completion_turns(PromptCompletionRecord(prompt="Sky?", chosen=" Blue.", rejected=" Green."))
    >>> [(t.role, t.content) for t in d.turns], d.meta
    ([('user', 'Sky?'), ('assistant', ' Blue.')], {'rejected': ' Green.'})
    """
    key = "completion" if r.completion is not None else "chosen"
    prompt, prompt_messages = _side(r.prompt, "user", "prompt")
    answer, answer_messages = _side(getattr(r, key), "assistant", key)
    if prompt and [t[:2] for t in answer[: len(prompt)]] == [t[:2] for t in prompt]:
        prompt, prompt_messages = [], []
    turns = [t._replace(train=False) if t.role == "assistant" and t.train is None else t for t in prompt] + answer
    messages = prompt_messages + answer_messages
    meta = _extras(r)
    _message_fields(turns, messages, meta)
    return Draft(turns, meta, tools=parse_tools(r.tools, "tools"))


def _side(value: str | list[Any] | None, role: str, key: str) -> tuple[list[DraftTurn], list[Any]]:
    """One side of a prompt-completion record as (turns, the message of each turn or None)."""
    if value is None:
        return [], []
    if isinstance(value, str):
        return [DraftTurn(role, value, key)], [None]
    return message_turns(value, key), value


# Transcript markers, one style per record (the style whose marker comes first is used).
_MARKERS = (
    # hh-rlhf: "\n\nHuman: ...\n\nAssistant: ..." (no System marker: "\n\nSystem:" inside an answer is prose)
    re.compile(r"(?:^|\n\n)(Human|Assistant):"),
    re.compile(r"###[ \t]*(Human|Assistant|System):"),  # "### Human: ... ### Assistant: ..."
    re.compile(r"###(instruction|response|human|assistant|system)###"),  # seed markup
)
_SEED = _MARKERS[2]
_MARKER_ROLES = {"human": "user", "instruction": "user", "assistant": "assistant", "response": "assistant",
                 "system": "system"}


def strip_separator(text: str) -> str:
    """Remove a transcript turn's separator whitespace, keeping the first line's indentation.

    Removed: whitespace at the end, blank lines at the start, and spaces between the marker and
    content on the marker's own line. Kept: everything else, including a code block's indentation.

    >>> strip_separator(" Hello \\n\\n")
    'Hello'
    >>> strip_separator("\\n\\n    indented()\\n")
    '    indented()'
    """
    text = text.rstrip()
    body = text.lstrip()
    if not body:
        return ""
    newline = text.rfind("\n", 0, len(text) - len(body))
    return text[newline + 1:] if newline >= 0 else body


def parse_transcript(text: str) -> list[tuple[str, str]]:
    """Split a transcript into (role, content) turns; text before the first marker becomes a system turn.

    Raises:
        Unconvertible: no role marker found.

    >>> parse_transcript("\\n\\nHuman: Hi there\\n\\nAssistant: Hello!")
    [('user', 'Hi there'), ('assistant', 'Hello!')]
    >>> parse_transcript("###instruction### Add 2+2 ###response### 4 ###")
    [('user', 'Add 2+2'), ('assistant', '4')]
    """
    firsts = [(m.start(), i, rx) for i, rx in enumerate(_MARKERS) if (m := rx.search(text))]
    if not firsts:
        raise Unconvertible("text", "no role markers found; expected '\\n\\nHuman:'/'\\n\\nAssistant:', "
                            "'### Human:'/'### Assistant:' or '###human###'/'###assistant###'", "unparsable_transcript")
    marker = min(firsts)[2]
    matches = list(marker.finditer(text))
    preamble = strip_separator(text[:matches[0].start()])
    turns = [("system", preamble)] if preamble else []
    for m, end in zip(matches, [n.start() for n in matches[1:]] + [len(text)], strict=True):
        content = strip_separator(text[m.end():end])
        if marker is _SEED and end == len(text) and content.endswith("###"):
            content = _drop_end_marker(content)
        turns.append((_MARKER_ROLES[m.group(1).lower()], content))
    return turns


def _drop_end_marker(content: str) -> str:
    """Drop the seed markup's closing `###` (only when it stands apart from the text)."""
    head = content[:-3]
    return head.rstrip() if not head or head[-1].isspace() else content


def transcript_turns(r: TranscriptRecord) -> Draft:
    """A transcript in `text` (or hh-rlhf `chosen`); `rejected` and any other key go to meta.

    >>> d = transcript_turns(TranscriptRecord(chosen="\\n\\nHuman: Hi\\n\\nAssistant: Hey", rejected="..."))
    >>> [t.content for t in d.turns], d.meta
    (['Hi', 'Hey'], {'rejected': '...'})
    """
    key = r.key
    try:
        pairs = parse_transcript(r.text if key == "text" else r.chosen)
    except Unconvertible as e:
        raise Unconvertible(key, e.message, e.reason) from None
    turns = [DraftTurn(role, content, f"{key} (turn {i})") for i, (role, content) in enumerate(pairs)]
    meta = _extras(r)
    if key == "text" and r.chosen is not None:
        meta["chosen"] = r.chosen
    if r.rejected is not None:
        meta["rejected"] = r.rejected
    return Draft(turns, meta)


def unified_turns(r: UnifiedRecord) -> Draft:
    """A unified record converts to itself: same id, source, messages and meta (no repairs).

    >>> d = unified_turns(UnifiedRecord(id="x", messages=[{"role": "user", "content": "a"}]))
    >>> d.id, d.repair
    ('x', False)
    """
    turns = [DraftTurn(m.role, m.content, f"messages[{i}]", m.train, m.tool_calls, m.name, m.tool_call_id)
             for i, m in enumerate(r.messages)]
    source = r.source.model_dump() if r.source is not None else None
    return Draft(turns, dict(r.meta), r.id, source, repair=False, tools=parse_tools(r.tools, "tools"))


CONVERTERS: dict[str, Callable[[Any], Draft]] = {
    "alpaca": alpaca_turns,
    "sharegpt": sharegpt_turns,
    "openai": openai_turns,
    "prompt_completion": prompt_completion_turns,
    "transcript": transcript_turns,
    "unified": unified_turns,
}


# --- the rules, shared by every format ---------------------------------------------------


def normalize_turns(turns: list[DraftTurn]) -> tuple[list[DraftTurn], int, list[DraftTurn]]:
    """Remove trailing user turns and tool results, then merge consecutive same-role turns (tool results excepted).

    Returns:
        (turns, number of merges, removed trailing turns).

    >>> kept, merged, trailing = normalize_turns([DraftTurn("user", "a"), DraftTurn("user", "b"),
    ...                                           DraftTurn("assistant", "c"), DraftTurn("user", "d")])
    >>> [t.content for t in kept], merged, [t.content for t in trailing]
    (['a\\n\\nb', 'c'], 1, ['d'])
    """
    end = len(turns)
    while end and turns[end - 1].role in ("user", "tool"):
        end -= 1
    trailing = turns[end:]
    if trailing:
        turns = turns[:end]
    if all(a.role != b.role or a.role == "tool" for a, b in pairwise(turns)):
        return turns, 0, trailing
    merged: list[list[DraftTurn]] = []
    for turn in turns:
        if merged and merged[-1][0].role == turn.role and turn.role != "tool" and _mergeable(merged[-1][-1], turn):
            merged[-1].append(turn)
        else:
            merged.append([turn])
    out = [g[0] if len(g) == 1 else _merge(g) for g in merged]
    return out, len(turns) - len(out), trailing


def _mergeable(a: DraftTurn, b: DraftTurn) -> bool:
    """Whether turn `b` may join the turn `a` it follows: not content after a tool call (its result is missing)."""
    return not a.tool_calls or not b.content


def _merge(group: list[DraftTurn]) -> DraftTurn:
    """Consecutive turns of one role as one: contents joined with a blank line (a reasoning-only step is folded
    in front of the reply after it), tool calls in order."""
    content = ""
    for t in group:
        content = content + t.content if _is_reasoning_only(content) else _join((content, t.content))
    calls = [c for t in group for c in (t.tool_calls or ())]
    return group[0]._replace(content=content, tool_calls=calls or None)


def _is_reasoning_only(content: str) -> bool:
    """A folded reply whose reply part is empty (a reasoning step)."""
    parts = split_reasoning(content)
    return parts is not None and not parts[1]


def finish(draft: Draft, path: str, line: int, format: str, raw: Any = None) -> Accepted | Reject:
    """Apply the rules to a Draft: repair what the rules allow (merge, trim), reject the rest.

    Args:
        draft: a converter's output.
        path, line, format: where the record came from (becomes `source`).
        raw: the payload as read, for the Reject.
    Returns:
        Accepted, or a Reject naming every rule broken.
    """
    turns, meta, merged, trimmed, trimmed_tool = draft.turns, draft.meta, 0, False, False
    if _is_clean(turns):
        # Fast path: a clean conversation satisfies every rule (conversation_problems would return []).
        digest = content_hash(turns, draft.tools)  # type: ignore[arg-type]  # DraftTurn has the fields hashed
        source = {"path": path, "line": line, "format": format} if draft.repair else draft.source
        return Accepted(draft.id or digest, digest, source, turns, meta, 0, False, draft.tools)
    if draft.repair:
        turns, merged, trailing = normalize_turns(turns)
        if merged:
            meta["merged_turns"] = merged
        if any(t.role == "user" for t in trailing):
            meta["trailing_user"] = [t.content for t in trailing if t.role == "user"]
            trimmed = True
        if any(t.role == "tool" for t in trailing):
            meta["trailing_tool"] = [t.content for t in trailing if t.role == "tool"]
            trimmed_tool = True
        first = 1 if turns and turns[0].role == "system" else 0
        if len(turns) > first and turns[first].role == "assistant":
            problem = (f"messages[{first}].role", "the first turn after the system prompt is an assistant turn",
                       "starts_with_assistant")
            return _rules_reject([problem], turns, path, line, format, raw)
    problems = conversation_problems(turns, draft.tools)  # type: ignore[arg-type]  # DraftTurn has the fields checked
    if problems:
        if trailing_count := len(meta.get("trailing_user", ())) + len(meta.get("trailing_tool", ())):
            if problems[0][2] == "no_assistant_turn":
                problems = [("$", f"no assistant turn (after removing {trailing_count} trailing user turn(s) and "
                             "tool result(s))" if trimmed_tool else f"no assistant turn (after removing "
                             f"{trailing_count} trailing user turn(s))", "no_assistant_turn")]
        return _rules_reject(problems, turns, path, line, format, raw)
    digest = content_hash(turns, draft.tools)  # type: ignore[arg-type]
    source = {"path": path, "line": line, "format": format} if draft.repair else draft.source
    calls = sum(len(t.tool_calls) for t in turns if t.tool_calls)
    results = sum(t.role == "tool" for t in turns)
    return Accepted(draft.id or digest, digest, source, turns, meta, merged, trimmed, draft.tools, calls, results,
                    trimmed_tool)


def _is_clean(turns: list[DraftTurn]) -> bool:
    """True when the turns already follow every rule: [system], then user/assistant alternating,
    ending with an assistant turn, every response non-blank, no tool calls. A sufficient check, cheaper than
    normalize_turns + conversation_problems; anything else takes the full path.

    >>> _is_clean([DraftTurn("user", ""), DraftTurn("assistant", "ok")]), _is_clean([DraftTurn("user", "q")])
    (True, False)
    >>> _is_clean([DraftTurn("user", "q"), DraftTurn("assistant", " \\n")]), _is_clean([DraftTurn("assistant", "a"), DraftTurn("user", "")])
    (False, False)
    """
    if len(turns) == 2:  # the usual instruction/response pair, checked without a loop
        user, assistant = turns
        content = assistant.content
        return (user.role == "user" and assistant.role == "assistant" and bool(content) and not content.isspace()
                and assistant.tool_calls is None)
    start = 1 if turns and turns[0].role == "system" else 0
    if len(turns) - start < 2 or (len(turns) - start) % 2:
        return False
    for i in range(start, len(turns), 2):
        user, assistant = turns[i], turns[i + 1]
        content = assistant.content
        if (user.role != "user" or assistant.role != "assistant" or not content or content.isspace()
                or assistant.tool_calls is not None):
            return False
    return True


_INDEX = re.compile(r"messages\[(\d+)\]")


def _rules_reject(problems: list[tuple[str, str, str]], turns: list[DraftTurn], path: str, line: int,
                  format: str, raw: Any) -> Reject:
    """A Reject for broken turn rules; fields point into the raw record where the turn came from."""
    errors = []
    for field, message, _ in problems:
        match = _INDEX.match(field)
        if match and int(match.group(1)) < len(turns) and turns[int(match.group(1))].src:
            errors.append(ErrorDetail(field=turns[int(match.group(1))].src, message=f"{message} (unified {field})"))
        else:
            errors.append(ErrorDetail(field="$" if field == "messages" else field, message=message))
    return Reject(path=path, line=line, stage=STAGE, reason=problems[0][2], errors=errors,
                  raw=None if raw is None else raw_text(raw), format=format)


def convert_record(record: RawRecord, format: str, path: str = "<memory>", line: int = 0) -> Conversation | Reject:
    """Convert one validated raw record to a Conversation, or a Reject saying why not.

    >>> c = convert_record(AlpacaRecord(instruction="Hi", output="Hello"), "alpaca")
    >>> [m.role for m in c.messages], c.source.format
    (['user', 'assistant'], 'alpaca')
    """
    result = _convert_one(record, format, path, line, None)
    return result if isinstance(result, Reject) else to_conversation(result)


def _convert_one(record: Any, format: str, path: str, line: int, raw: Any) -> Accepted | Reject:
    """Converter + rules for one record."""
    try:
        draft = CONVERTERS[format](record)
    except Unconvertible as e:
        return Reject(path=path, line=line, stage=STAGE, reason=e.reason,
                      errors=[ErrorDetail(field=e.field, message=e.message)],
                      raw=None if raw is None else raw_text(raw), format=format)
    return finish(draft, path, line, format, raw)


def _convert_batch(batch: ValidatedBatch) -> list[Accepted | Reject]:
    """Convert a validated batch; rows that failed validation pass through as Rejects."""
    out: list[Accepted | Reject] = []
    path, fmt, convert = batch.path, batch.format, CONVERTERS[batch.format]
    for record, line, payload in zip(batch.records, batch.lines, batch.payloads, strict=True):
        if record.__class__ is Reject:
            out.append(record)
            continue
        try:
            out.append(finish(convert(record), path, line, fmt, payload))
        except Unconvertible:
            out.append(_convert_one(record, fmt, path, line, payload))
    return out


def to_conversation(a: Accepted) -> Conversation:
    """Build the frozen Conversation of an Accepted record (the rules were already checked)."""
    if a.calls or a.results:
        messages = [Message.model_construct(role=t.role, content=t.content, train=t.train, tool_calls=t.tool_calls,
                                            name=t.name, tool_call_id=t.tool_call_id) for t in a.turns]
    else:
        messages = [Message.model_construct(role=t.role, content=t.content, train=t.train) for t in a.turns]
    source = SourceRef.model_construct(**a.source) if a.source is not None else None
    return Conversation.model_construct(id=a.id, source=source, messages=messages, meta=a.meta, tools=a.tools)


def to_json_line(a: Accepted) -> bytes:
    """Serialize an Accepted record exactly as `to_conversation(a).model_dump_json()` would, only faster."""
    if a.calls or a.results:
        messages = [_message_dict(t) for t in a.turns]
    else:
        messages = [{"role": t.role, "content": t.content, "train": t.train} for t in a.turns]
    record = {"id": a.id, "source": a.source, "messages": messages, "meta": a.meta}
    if a.tools is not None:
        record["tools"] = a.tools
    return _to_json(record)


def _message_dict(t: DraftTurn) -> dict[str, Any]:
    """A turn as the JSON object of a Message: the tool fields only when set."""
    out: dict[str, Any] = {"role": t.role, "content": t.content, "train": t.train}
    if t.tool_calls is not None:
        out["tool_calls"] = [c.model_dump() for c in t.tool_calls]
    if t.name is not None:
        out["name"] = t.name
    if t.tool_call_id is not None:
        out["tool_call_id"] = t.tool_call_id
    return out


# --- streaming over files ------------------------------------------------------------------


def _outcomes(paths: list[str], format: str, dedup: bool, report: Report, batch_size: int,
              fields: dict[str, str] | None = None) -> Iterator[tuple[str, list[Accepted | Reject], float]]:
    """Validate and convert every input, batch by batch, counting everything in `report`."""
    seen: set[str] | None = set() if dedup else None
    for path in paths:
        validated = validate_file(path, format, batch_size, fields)
        counts = report.add_row(path, f"{validated.format} (auto)" if validated.detected else validated.format)
        for batch in validated.batches:
            results = _convert_batch(batch)
            counts.read += len(batch.lines)
            yield path, _tally(results, counts, seen), batch.done


def _tally(results: list[Accepted | Reject], counts: Counts, seen: set[str] | None) -> list[Accepted | Reject]:
    """Count a batch's outcomes; drop (and count) duplicates when `seen` is a set."""
    kept: list[Accepted | Reject] = []
    for r in results:
        if r.__class__ is Accepted:
            if seen is not None:
                if r.hash in seen:  # type: ignore[union-attr]
                    counts.deduplicated += 1
                    continue
                seen.add(r.hash)  # type: ignore[union-attr]
            counts.accepted += 1
            if r.merged:  # type: ignore[union-attr]
                counts.events["merged_turns"] += r.merged  # type: ignore[union-attr]
            if r.trimmed:  # type: ignore[union-attr]
                counts.events["trimmed_trailing_user"] += 1
            if r.calls or r.results or r.trimmed_tool:  # type: ignore[union-attr]
                _count_tools(r, counts)  # type: ignore[arg-type]
            if "reasoning_folded" in r.meta:  # type: ignore[union-attr]
                counts.events["reasoning_folded"] += r.meta["reasoning_folded"]  # type: ignore[union-attr]
        else:
            counts.rejected[r.reason] += 1  # type: ignore[union-attr]
        kept.append(r)
    return kept


def _count_tools(r: Accepted, counts: Counts) -> None:
    """Count an accepted record's tool calls, tool results and trimmed trailing results."""
    if r.calls:
        counts.events["tool_calls"] += r.calls
    if r.results:
        counts.events["tool_results"] += r.results
    if r.trimmed_tool:
        counts.events["trimmed_trailing_tool"] += len(r.meta["trailing_tool"])


def iter_conversations(paths: str | os.PathLike[str] | Iterable[str | os.PathLike[str]], format: str = "auto", *,
                       dedup: bool = False, report: Report | None = None, batch_size: int = BATCH_SIZE,
                       fields: dict[str, str] | None = None) -> Iterator[Conversation | Reject]:
    """Stream the unified conversations (and Rejects) of some inputs, in sorted input order.

    Args:
        paths: one path, or paths and globs (files of any supported kind, save_to_disk folders).
        format: "auto" (detect per file) or a name in schemas.raw.FORMAT_NAMES.
        dedup: skip exact duplicates (same content_hash of the messages).
        report: filled in as the stream is consumed: one row per input (read, accepted, rejected by reason...).
        batch_size: rows read and validated at a time.
        fields: a field mapping {target: source} (prep.fieldmap) applied to every row.
    Returns:
        an iterator of Conversation and Reject, in input order.
    Raises:
        InputError: an input is missing, unreadable or of undetectable format (raised when reached).

    >>> report = Report("pack")
    >>> items = list(iter_conversations("examples/openai.jsonl", report=report))
    >>> report.rows[0].kind, report.total.balanced
    ('openai (auto)', True)
    """
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    report = report if report is not None else Report("convert")
    for _, results, _ in _outcomes(expand_inputs(paths), format, dedup, report, batch_size, fields):
        for r in results:
            yield r if r.__class__ is Reject else to_conversation(r)  # type: ignore[misc,arg-type]


def default_rejects_path(output: str) -> str:
    """The rejects file beside an output: `out.jsonl` -> `out.rejects.jsonl`.

    >>> default_rejects_path("data/out.parquet")
    'data/out.rejects.jsonl'
    """
    root, ext = os.path.splitext(output)
    return (root if ext.lower() in (".jsonl", ".json", ".parquet", ".pq") else output) + ".rejects.jsonl"


def is_parquet(output: str) -> bool:
    """True when the output path asks for Parquet (`.parquet` or `.pq`), else JSON Lines is written."""
    return output.lower().endswith((".parquet", ".pq"))


def convert_files(config: ConvertConfig, progress: bool = False) -> Report:
    """Read, validate and convert every input, writing conversations and rejects atomically.

    Args:
        config: inputs, output, format, rejects path, overwrite, strict, dedup.
        progress: show a rich progress bar (on stderr) once the run takes more than half a second.
    Returns:
        the Report (per-file counts; `outputs` names the files written).
    Raises:
        InputError: unusable input (missing, unreadable, undetectable format).
        OutputExistsError: an output exists and `overwrite` is off, or an output is an input.
        AccountingError: read != accepted + rejected + deduplicated (a bug).

    >>> report = convert_files(ConvertConfig(inputs=["examples/alpaca.json"], output="/tmp/a.jsonl"))  # doctest: +SKIP
    >>> report.total.accepted  # doctest: +SKIP
    10
    """
    inputs = expand_inputs(config.inputs, subset=config.subset, split=config.split)
    rejects = config.rejects or default_rejects_path(config.output)
    if os.path.abspath(rejects) == os.path.abspath(config.output):
        raise ConfigError(f"--rejects {rejects}: must differ from the output")
    check_outputs([config.output, rejects], inputs, config.overwrite)
    report = Report("prep convert", outputs={"conversations": config.output, "rejects": rejects})
    parquet = is_parquet(config.output)
    sink_type = ParquetSink if parquet else JsonlSink
    encode = to_conversation if parquet else to_json_line
    with (_ProgressBar(progress, inputs) as bar, sink_type(config.output) as sink,
          JsonlSink(rejects) as reject_sink, relaxed_gc()):
        for path, results, done in _outcomes(inputs, config.format, config.dedup, report, BATCH_SIZE,
                                             parse_fields(config.fields)):
            sink.write([encode(r) for r in results if r.__class__ is Accepted])  # type: ignore[arg-type]
            reject_sink.write([r.model_dump_json().encode() for r in results if r.__class__ is Reject])
            bar.update(path, done)
        report.check_accounting()
        _check_written(report, sink.written, reject_sink.written)
    return report


def _check_written(report: Report, conversations: int, rejects: int) -> None:
    """Cross-check the counters against what the sinks actually wrote."""
    total = report.total
    if conversations != total.accepted or rejects != total.rejected_total:
        raise AccountingError(f"wrote {conversations} conversations and {rejects} rejects, but counted "
                              f"{total.accepted} accepted and {total.rejected_total} rejected; this is a bug in prep")


def check_strict(config: ConvertConfig, report: Report) -> None:
    """Under `--strict`, fail when anything was rejected.

    Raises:
        PrepError: strict is on and at least one record was rejected.
    """
    rejected = report.total.rejected_total
    if config.strict and rejected:
        raise PrepError(f"{rejected} record(s) rejected and --strict is set; see {report.outputs['rejects']}")


def build_config(**flags: Any) -> ConvertConfig:
    """Build a ConvertConfig from CLI flags, turning validation errors into one ConfigError.

    >>> build_config(inputs=["a.jsonl"], output="o.jsonl", format="auto").dedup
    False
    """
    if flags.get("fields") is not None and not isinstance(flags["fields"], dict):
        flags["fields"] = parse_fields(flags["fields"]) or None
    try:
        return ConvertConfig(**flags)
    except ValidationError as e:
        raise flag_error(e) from None


def unified_json_schema() -> str:
    """The JSON Schema of the unified form (what `prep schema` prints)."""
    return json.dumps(Conversation.model_json_schema(), indent=2, ensure_ascii=False)


@contextmanager
def relaxed_gc() -> Iterator[None]:
    """Collect young objects rarely while converting.

    The hot loop allocates millions of short-lived, acyclic objects; with the default threshold the
    collector would run every 700 allocations and repeatedly walk the large live heap (a parsed
    JSON array), which costs about a third of the run time.
    """
    old = gc.get_threshold()
    gc.set_threshold(200_000, old[1], old[2])
    try:
        yield
    finally:
        gc.set_threshold(*old)


class _ProgressBar:
    """A rich progress bar per input on stderr, shown only when the run lasts more than DELAY seconds."""

    DELAY = 0.5

    def __init__(self, enabled: bool, paths: list[str]):
        self.enabled, self.paths = enabled, paths
        self.start = time.monotonic()
        self.progress: Any = None
        self.tasks: dict[str, Any] = {}

    def __enter__(self) -> _ProgressBar:
        return self

    def update(self, path: str, done: float) -> None:
        """Record that `done` (0..1) of `path` has been converted."""
        if not self.enabled:
            return
        if self.progress is None:
            if time.monotonic() - self.start < self.DELAY:
                return
            self._start()
        self.progress.update(self.tasks[path], completed=done)

    def _start(self) -> None:
        """Create and start the rich Progress display."""
        from rich.console import Console
        from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeRemainingColumn

        self.progress = Progress(TextColumn("{task.description}", markup=False), BarColumn(), TaskProgressColumn(),
                                 TimeRemainingColumn(), console=Console(stderr=True), transient=True)
        self.tasks = {p: self.progress.add_task(os.path.basename(p), total=1.0) for p in self.paths}
        self.progress.start()

    def __exit__(self, *exc: Any) -> None:
        if self.progress is not None:
            self.progress.stop()
