"""Render a conversation to one text plus the character span of every message in it.

Templates are data: each role has a `prefix` (untrained), an `end` (the end-of-turn marker, trained
with an assistant reply) and an `after` (an untrained separator written only between turns). A turn
renders as `prefix + content + end [+ EOS] + after`. Tool data has a layout too: a `tool` role for tool
results, a `tools` block (the definitions, one JSON object per line, after the system turn) and a `call`
wrapper for each tool call an assistant message makes (written after its content, inside its turn). The
`tokenizer` template is the one special path: the tokenizer's own Jinja chat template, rendered by
transformers, with message spans found through placeholders (see `render_batch` and prep.splice).

>>> from schemas import Message
>>> r = render([Message(role="user", content="2+2?"), Message(role="assistant", content="4")],
...            BUILTIN_TEMPLATES["markers"], eos="</s>")
>>> r.text
'###instruction###\\n2+2?\\n\\n###response###\\n4\\n###</s>'
>>> r.text[r.spans[1].start:r.spans[1].stop]
'4\\n###</s>'
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import sys
import tomllib
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields, replace
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Any, NamedTuple

from prep.errors import ConfigError
from prep.splice import BASE, Match, SkeletonBuilder, TooManyValues, Walk
from schemas.conversation import (
    REASONING_CLOSE,
    REASONING_OPEN,
    Conversation,
    Message,
    split_reasoning,
    tool_names,
)

TEMPLATE_NAMES = ("markers", "chatml", "tokenizer")
TEMPLATE_DATE = datetime(2024, 7, 26)  # what `strftime_now` in a chat template reads (fixed: same output every day)


@dataclass(frozen=True)
class RoleWrap:
    """How one role's message is wrapped: `prefix + content + end + after`.

    `end` is the end-of-turn marker, trained together with an assistant reply; `prefix` and `after`
    are never trained (except under `train_on="all"`). `after` is written only between turns.
    """

    prefix: str = ""
    end: str = ""
    after: str = ""


@dataclass(frozen=True)
class Roles:
    """One `RoleWrap` per role; `tool` (tool results) and `tools` (the definitions block) are None in a template
    that has no layout for tool data."""

    system: RoleWrap = RoleWrap()
    user: RoleWrap = RoleWrap()
    assistant: RoleWrap = RoleWrap()
    tool: RoleWrap | None = None
    tools: RoleWrap | None = None


@dataclass(frozen=True)
class Template:
    """A prompt template as data (no code).

    Attributes:
        name: shown in reports and the manifest.
        roles: how each role is wrapped in a conversation.
        single_turn: the layout used instead of `roles` when a conversation has exactly one user and
            one assistant turn (plus an optional system prompt); None to always use `roles`.
        append_eos: append the tokenizer's EOS after every assistant turn's `end` (needed when `end`
            is plain text, so that generation can stop).
        markers: the role marker strings: rejected in content, reported by `check_markers`,
            registered by `register_markers`. Empty → derived from the prefixes and ends.
        chat_template: the Jinja source for the `tokenizer` template; None for data templates.
        call: how each tool call of an assistant message is written, `prefix + {"name": ..., "arguments":
            {...}} + end`, after the content; `after` separates a call from the text before it (content or
            the previous call). None: the template has no layout for tool calls.
        tool_chat_template: the tokenizer's `tool_use` chat template, used for conversations with tools
            (transformers picks it the same way); None to use `chat_template` for every conversation.
    """

    name: str
    roles: Roles = Roles()
    single_turn: Roles | None = None
    append_eos: bool = False
    markers: tuple[str, ...] = ()
    chat_template: str | None = field(default=None, repr=False)
    call: RoleWrap | None = None
    tool_chat_template: str | None = field(default=None, repr=False)

    @property
    def uses_chat_template(self) -> bool:
        """True for the `tokenizer` template (rendered by the tokenizer's own chat template)."""
        return self.chat_template is not None

    def role_markers(self) -> tuple[str, ...]:
        """The marker strings: `markers` if given, else every stripped prefix/end that is not only '#'.

        >>> BUILTIN_TEMPLATES["chatml"].role_markers()
        ('<|im_start|>', '<|im_end|>')
        """
        if self.markers or self.uses_chat_template:
            return self.markers
        found: list[str] = []
        for roles in (self.roles, self.single_turn):
            turns = (roles.system, roles.user, roles.assistant, roles.tool, roles.tools) if roles else ()
            for turn in (*turns, self.call if roles is self.roles else None):
                if turn is None:
                    continue
                for text in (turn.prefix.strip(), turn.end.strip()):
                    if text and text.strip("#") and text not in found:
                        found.append(text)
        return tuple(found)


MARKERS = Template(
    name="markers",
    roles=Roles(
        system=RoleWrap("###system###\n", "", "\n\n"),
        user=RoleWrap("###human###\n", "", "\n\n"),
        assistant=RoleWrap("###assistant###\n", "\n###", "\n\n"),
        tool=RoleWrap("###tool###\n", "", "\n\n"),
        tools=RoleWrap("###tools###\n", "", "\n\n"),
    ),
    single_turn=Roles(
        system=RoleWrap("###system###\n", "", "\n\n"),
        user=RoleWrap("###instruction###\n", "", "\n\n"),
        assistant=RoleWrap("###response###\n", "\n###", "\n\n"),
    ),
    append_eos=True,
    # The bare end marker `###` is plain text on purpose: markdown headings use it.
    markers=("###system###", "###instruction###", "###response###", "###human###", "###assistant###",
             "###tools###", "###tool###", "###call###"),
    call=RoleWrap("###call###\n", "", "\n"),
)

CHATML = Template(
    name="chatml",
    roles=Roles(
        system=RoleWrap("<|im_start|>system\n", "<|im_end|>", "\n"),
        user=RoleWrap("<|im_start|>user\n", "<|im_end|>", "\n"),
        assistant=RoleWrap("<|im_start|>assistant\n", "<|im_end|>", "\n"),
        tool=RoleWrap("<|im_start|>tool\n", "<|im_end|>", "\n"),
        tools=RoleWrap("<|im_start|>tools\n", "<|im_end|>", "\n"),
    ),
    append_eos=False,
    markers=("<|im_start|>", "<|im_end|>"),
    call=RoleWrap("<tool_call>\n", "\n</tool_call>", "\n"),  # Hermes / Qwen2.5 style
)

BUILTIN_TEMPLATES: dict[str, Template] = {"markers": MARKERS, "chatml": CHATML}


class Span(NamedTuple):
    """Where message `message` sits in the rendered text: content `[start, end)`, end of turn `[end, stop)`.

    `stop` is the end of the end-of-turn text (the `end` marker, the EOS when appended, or for chat
    templates up to and including the first special token after the content). A trained message
    trains `[start, stop)`.
    """

    message: int
    start: int
    end: int
    stop: int


class Rendered(NamedTuple):
    """A rendered conversation: the text, one `Span` per rendered message (in text order), the indices
    of messages the template did not render at all (`dropped`), of replies whose folded reasoning
    the template left out, rendering only the reply after it (`reasoning_dropped`), of tool-call messages
    whose content the template left out, rendering only the calls (`content_dropped`, Mistral's), the
    number of call ids prep generated for a template that needs them (`ids_generated`), and the tool-call
    messages the template renders differently once later messages follow (`rewritten`: no span; see
    Encoder's `expand_turns`)."""

    text: str
    spans: tuple[Span, ...]
    dropped: tuple[int, ...] = ()
    reasoning_dropped: tuple[int, ...] = ()
    content_dropped: tuple[int, ...] = ()
    ids_generated: int = 0
    rewritten: tuple[int, ...] = ()


class RenderFailure(NamedTuple):
    """Why a conversation could not be rendered: a reason code, the field, a message."""

    reason: str
    field: str
    message: str


class RenderError(ValueError):
    """Raised by `render` for a conversation the template cannot render exactly."""

    def __init__(self, failure: RenderFailure):
        self.failure = failure
        super().__init__(f"{failure.reason}: {failure.field}: {failure.message}")


# --------------------------------------------------------------------------------------------------
# Loading


def load_template(name_or_path: str, tokenizer: Any = None) -> Template:
    """Resolve `--template`: a built-in name (markers, chatml, tokenizer) or a TOML/YAML file.

    Args:
        name_or_path: "markers", "chatml", "tokenizer", or a path ending in .toml/.yaml/.yml.
        tokenizer: needed for "tokenizer" (its `chat_template` becomes the template).

    Returns:
        The Template.

    Raises:
        ConfigError: unknown name, unreadable or invalid file, or a tokenizer without a chat template.

    >>> load_template("chatml").roles.assistant.end
    '<|im_end|>'
    """
    if name_or_path in BUILTIN_TEMPLATES:
        return BUILTIN_TEMPLATES[name_or_path]
    if name_or_path == "tokenizer":
        return _tokenizer_template(tokenizer)
    path = Path(name_or_path)
    if path.suffix.lower() not in (".toml", ".yaml", ".yml"):
        raise ConfigError(
            f"--template {name_or_path!r}: expected one of {', '.join(TEMPLATE_NAMES)} "
            "or a path to a .toml/.yaml template file"
        )
    if not path.is_file():
        raise ConfigError(f"--template {name_or_path!r}: file not found")
    return template_from_dict(_read_template_file(path), default_name=path.stem, source=str(path))


def _tokenizer_template(tokenizer: Any) -> Template:
    """The `tokenizer` template: the tokenizer's own chat template, as a string."""
    if tokenizer is None:
        raise ConfigError("--template tokenizer needs a tokenizer (pass --tokenizer)")
    chat_template = getattr(tokenizer, "chat_template", None)
    tool_chat_template = None
    if isinstance(chat_template, dict):  # several named templates: "default", and "tool_use" with tools
        tool_chat_template = chat_template.get("tool_use")
        chat_template = chat_template.get("default")
    if not chat_template:
        raise ConfigError(
            f"tokenizer {getattr(tokenizer, 'name_or_path', '?')!r} has no chat_template; "
            f"use --template with one of {', '.join(n for n in TEMPLATE_NAMES if n != 'tokenizer')} or a file"
        )
    return Template(name="tokenizer", chat_template=chat_template, tool_chat_template=tool_chat_template)


def _read_template_file(path: Path) -> dict[str, Any]:
    """Parse a TOML or YAML template file into a dict."""
    text = path.read_text(encoding="utf-8")
    try:
        if path.suffix.lower() == ".toml":
            data = tomllib.loads(text)
        else:
            import yaml

            data = yaml.safe_load(text)
    except Exception as exc:  # tomllib.TOMLDecodeError, yaml.YAMLError
        raise ConfigError(f"template {path}: cannot parse: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"template {path}: expected a table of keys, got {type(data).__name__}")
    return data


def template_from_dict(data: dict[str, Any], default_name: str = "custom", source: str = "template") -> Template:
    """Build a Template from the dict of a TOML/YAML file (see README for the keys).

    Keys: `name`, `append_eos`, `markers` (list of strings), tables `system`, `user`, `assistant`
    (each with `prefix`, `end`, `after`), an optional `single_turn` table holding the same three
    role tables, and for tool data the optional tables `tool` (tool results), `tools` (the definitions
    block) and `call` (each tool call).

    Raises:
        ConfigError: an unknown key or a value of the wrong type (the message lists the valid keys).

    >>> t = template_from_dict({"user": {"prefix": "Q: "}, "assistant": {"prefix": "A: ", "end": "</s>"}})
    >>> t.roles.assistant
    RoleWrap(prefix='A: ', end='</s>', after='')
    """
    _check_keys(data, ("name", "append_eos", "markers", "system", "user", "assistant", "single_turn", "tool",
                       "tools", "call"), source)
    name = data.get("name", default_name)
    append_eos = data.get("append_eos", False)
    markers = data.get("markers", [])
    if not isinstance(name, str) or not isinstance(append_eos, bool):
        raise ConfigError(f"{source}: 'name' must be a string and 'append_eos' true/false")
    if not isinstance(markers, list) or not all(isinstance(m, str) and m.strip() for m in markers):
        raise ConfigError(f"{source}: 'markers' must be a list of non-empty strings")
    if not isinstance(data.get("assistant"), dict):
        raise ConfigError(f"{source}: an [assistant] table is required (keys: prefix, end, after)")
    roles = _roles_from_dict(data, source)
    single = data.get("single_turn")
    if single is not None:
        if not isinstance(single, dict):
            raise ConfigError(f"{source}: [single_turn] must be a table with system/user/assistant tables")
        _check_keys(single, ("system", "user", "assistant"), f"{source} [single_turn]")
        single = _roles_from_dict(single, f"{source} [single_turn]")
    call = _turn_from_dict(data, "call", source) if "call" in data else None
    return Template(name=name, roles=roles, single_turn=single, append_eos=append_eos, markers=tuple(markers),
                    call=call)


def template_to_dict(template: Template) -> dict[str, Any] | None:
    """The file form of a data template (what `template_from_dict` reads back); None for `tokenizer`.

    >>> template_from_dict(template_to_dict(BUILTIN_TEMPLATES["chatml"])) == BUILTIN_TEMPLATES["chatml"]
    True
    """
    if template.uses_chat_template:
        return None
    data: dict[str, Any] = {"name": template.name, "append_eos": template.append_eos, "markers": list(template.markers),
                            **_roles_to_dict(template.roles)}
    if template.single_turn is not None:
        data["single_turn"] = _roles_to_dict(template.single_turn)
    if template.call is not None:
        data["call"] = asdict(template.call)
    return data


def _roles_to_dict(roles: Roles) -> dict[str, Any]:
    """The role tables of a template dict; the tool tables only where the template has a tool layout."""
    return {role: asdict(turn) for role, turn in vars(roles).items() if turn is not None}


def _roles_from_dict(data: dict[str, Any], source: str) -> Roles:
    """Read the system/user/assistant (and optional tool/tools) tables of a template dict."""
    turns = {role: _turn_from_dict(data, role, source) for role in ("system", "user", "assistant")}
    turns.update({role: _turn_from_dict(data, role, source) for role in ("tool", "tools") if role in data})
    return Roles(**turns)


def _turn_from_dict(data: dict[str, Any], role: str, source: str) -> RoleWrap:
    """One prefix/end/after table of a template dict."""
    table = data.get(role, {})
    if not isinstance(table, dict):
        raise ConfigError(f"{source}: [{role}] must be a table with keys prefix, end, after")
    _check_keys(table, tuple(f.name for f in fields(RoleWrap)), f"{source} [{role}]")
    if not all(isinstance(v, str) for v in table.values()):
        raise ConfigError(f"{source} [{role}]: prefix, end and after must be strings")
    return RoleWrap(**table)


def _check_keys(data: dict[str, Any], valid: tuple[str, ...], source: str) -> None:
    """Raise ConfigError naming the first unknown key and listing the valid ones."""
    unknown = [k for k in data if k not in valid]
    if unknown:
        raise ConfigError(f"{source}: unknown key {unknown[0]!r}; valid keys: {', '.join(valid)}")


def template_sha256(template: Template) -> str:
    """A stable sha256 of what the template renders (every field except `name`).

    >>> len(template_sha256(BUILTIN_TEMPLATES["markers"]))
    64
    """
    data = asdict(replace(template, name=""))
    return hashlib.sha256(json.dumps(data, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


# --------------------------------------------------------------------------------------------------
# Rendering


def render(
    conversation: Conversation | Sequence[Message],
    template: Template,
    tokenizer: Any = None,
    *,
    bos: str = "",
    eos: str | None = None,
    tools: list[dict[str, Any]] | None = None,
) -> Rendered:
    """Render one conversation to `(text, spans)`.

    Args:
        conversation: a Conversation (its `tools` are rendered too) or its list of messages.
        template: the Template.
        tokenizer: required for the `tokenizer` template; for data templates it supplies `eos`.
        bos: text put before everything by data templates (the BOS string when the tokenizer adds
            one by default; chat templates write their own).
        eos: the EOS string appended after assistant turns when `template.append_eos`.
        tools: the tools of a conversation given as a list of messages.

    Returns:
        Rendered(text, spans, dropped, ...).

    Raises:
        RenderError: the chat template's output could not be matched to the messages.
        ConfigError: EOS or tokenizer needed but not given.

    >>> from schemas import Message
    >>> render([Message(role="user", content="Hi"), Message(role="assistant", content="Yo")],
    ...        BUILTIN_TEMPLATES["chatml"]).text
    '<|im_start|>user\\nHi<|im_end|>\\n<|im_start|>assistant\\nYo<|im_end|>'
    """
    if isinstance(conversation, Conversation):
        messages, tools = conversation.messages, conversation.tools
    else:
        messages = list(conversation)
    if eos is None and tokenizer is not None:
        eos = tokenizer.eos_token
    out = render_batch([messages], template, tokenizer, bos=bos, eos=eos, tools=[tools])[0]
    if isinstance(out, RenderFailure):
        raise RenderError(out)
    return out


def render_batch(
    batch: Sequence[Sequence[Message]],
    template: Template,
    tokenizer: Any = None,
    *,
    bos: str = "",
    eos: str | None = None,
    special_tokens: Sequence[str] | None = None,
    tools: Sequence[list[dict[str, Any]] | None] | None = None,
) -> list[Rendered | RenderFailure]:
    """Render many conversations (lists of messages); chat templates are rendered in few calls.

    Args:
        batch: conversations as message lists.
        template, tokenizer, bos, eos: as in `render`.
        special_tokens: the special token strings that end a turn in a chat template (default: the
            tokenizer's special tokens).
        tools: the tools of each conversation (None: no conversation has tools).

    Returns:
        One Rendered or RenderFailure per conversation, in order.
    """
    tools = list(tools) if tools is not None else [None] * len(batch)
    if template.uses_chat_template:
        if tokenizer is None:
            raise ConfigError("the tokenizer template needs a tokenizer")
        if special_tokens is None:
            special_tokens = special_token_strings(tokenizer)
        return _render_chat_batch(batch, tools, template, tokenizer, special_token_regex(tuple(special_tokens)))
    if template.append_eos and not eos:
        raise ConfigError(f"template {template.name!r} appends EOS, but the tokenizer has no eos_token")
    return [_render_turns(messages, template, bos, eos or "", t) for messages, t in zip(batch, tools)]


def _render_turns(messages: Sequence[Message], template: Template, bos: str, eos: str,
                  tools: list[dict[str, Any]] | None = None) -> Rendered | RenderFailure:
    """Render a data template: prefix + content (+ tool calls) + end (+ EOS for assistants) + after, in one pass;
    the tools block goes after the system turn (first when there is none)."""
    missing = _missing_layout(messages, template, tools)
    if missing is not None:
        return missing
    roles = template.roles
    if template.single_turn is not None and _is_single_turn(messages):
        roles = template.single_turn
    parts = [bos]
    pos = len(bos)
    spans = []
    last = len(messages) - 1
    block_at = (1 if messages and messages[0].role == "system" else 0) if tools else -1
    for i, message in enumerate(messages):
        if i == block_at:
            block = _tools_block(template.roles.tools, tools)  # type: ignore[arg-type]
            parts.append(block)
            pos += len(block)
        turn: RoleWrap = getattr(roles, message.role) or getattr(template.roles, message.role)
        body = message.content + _calls_text(template.call, message) if message.tool_calls else message.content
        end = turn.end + eos if (template.append_eos and message.role == "assistant") else turn.end
        start = pos + len(turn.prefix)
        content_end = start + len(body)
        spans.append(Span(i, start, content_end, content_end + len(end)))
        after = turn.after if i < last else ""
        parts += (turn.prefix, body, end, after)
        pos = content_end + len(end) + len(after)
    return Rendered("".join(parts), tuple(spans))


def _missing_layout(messages: Sequence[Message], template: Template,
                    tools: list[dict[str, Any]] | None) -> RenderFailure | None:
    """The failure for tool data a data template has no layout for (calls, results or the tools block)."""
    if tools and template.roles.tools is None:
        return RenderFailure("template_dropped_tools", "tools", f"template {template.name!r} has no layout for the "
                             "tool definitions (add a [tools] table)")
    for i, m in enumerate(messages):
        if m.tool_calls and template.call is None:
            return RenderFailure("template_dropped_tool_call", f"messages[{i}].tool_calls",
                                 f"template {template.name!r} has no layout for tool calls (add a [call] table)")
        if m.role == "tool" and template.roles.tool is None:
            return RenderFailure("template_dropped_tool_result", f"messages[{i}]", f"template {template.name!r} has "
                                 "no layout for tool results (add a [tool] table)")
    return None


def _tools_block(turn: RoleWrap, tools: list[dict[str, Any]]) -> str:
    """The tool definitions as one block: prefix, one JSON object per line, end, after."""
    return turn.prefix + "\n".join(json.dumps(t, ensure_ascii=False) for t in tools) + turn.end + turn.after


def _calls_text(call: RoleWrap | None, message: Message) -> str:
    """An assistant message's tool calls as written after its content: `after` before each one that follows text."""
    assert call is not None and message.tool_calls is not None  # checked by _missing_layout
    out = []
    for k, c in enumerate(message.tool_calls):
        if k or message.content:
            out.append(call.after)
        out += (call.prefix, json.dumps({"name": c.name, "arguments": c.arguments}, ensure_ascii=False), call.end)
    return "".join(out)


def _is_single_turn(messages: Sequence[Message]) -> bool:
    """One user and one assistant turn, after an optional system prompt."""
    roles = [m.role for m in messages if m.role != "system"]
    return roles == ["user", "assistant"]


def special_token_strings(tokenizer: Any) -> tuple[str, ...]:
    """Every special token string of a tokenizer (added special tokens and bos/eos/unk/pad/...).

    Whitespace-only special tokens are left out: they cannot mark a turn boundary.

    >>> from prep.tokenizer import default_tokenizer
    >>> "<|im_end|>" in special_token_strings(default_tokenizer())
    True
    """
    found = dict.fromkeys(t.content for t in tokenizer.added_tokens_decoder.values() if t.special)
    found.update(dict.fromkeys(tokenizer.all_special_tokens))
    return tuple(s for s in found if s and s.strip())


@lru_cache(maxsize=32)
def special_token_regex(tokens: tuple[str, ...]) -> re.Pattern[str] | None:
    """One compiled regex matching any of `tokens`, longest first (None for no tokens).

    >>> special_token_regex(("<s>", "<s>x")).findall("a<s>x<s>")
    ['<s>x', '<s>']
    """
    if not tokens:
        return None
    return re.compile("|".join(re.escape(t) for t in sorted(tokens, key=len, reverse=True)))


# --------------------------------------------------------------------------------------------------
# The tokenizer's own chat template, through placeholders (prep.splice)
#
# Every conversation is rendered once for real (batched, with its tools). Its skeleton (placeholders for
# every value) is rendered once per shape and cached, with the text of every tool-call message found by
# rendering the skeleton's prefixes: the message's text is what the conversation up to it adds to the
# conversation before it with the generation prompt (`apply_chat_template(messages[:i], add_generation_prompt=
# True)` vs `messages[:i + 1]`), which is exactly what the model writes at inference. That text must appear in
# the whole render; a template that renders the turn differently once later messages follow (Qwen3 dropping
# earlier reasoning) leaves it `rewritten`, for the encoder to expand.


class _TemplateInfo(NamedTuple):
    """What probes tell about a chat template: how it wants tool-call arguments ("object" or "string", found
    by rendering a probe call both ways), whether it refuses calls without ids, and the text it writes in front
    of a last reply's content after the generation prompt (`header`, not trained)."""

    arg_form: str
    needs_ids: bool
    header: str


class _Parsed(NamedTuple):
    """A skeleton render, parsed: the walk, each tool-call message's text `[start, stop)` (skeleton positions),
    the tool-call messages found only without their reasoning, and those not found at all (rewritten)."""

    walk: Walk
    regions: dict[int, tuple[int, int]]
    reasoning_dropped: frozenset[int]
    rewritten: frozenset[int]
    turn_ends: tuple[int, ...] = ()  # per occurrence: the end of the first special token in the text after it


class _Skeleton(NamedTuple):
    """A conversation with placeholders: the template's inputs, the slots' kinds and values, and where each
    message's values are (content, reasoning and call-name slots by message; tool-name slots)."""

    messages: list[dict[str, Any]]
    tools: list[dict[str, Any]] | None
    kinds: list[str]
    values: list[Any]
    folded: dict[int, int | None]
    content: list[int | None]
    reasoning: list[int | None]
    call_names: list[list[int | None]]
    tool_names: list[int]
    owner: list[int]
    key: str


_PARSED_CACHE: dict[tuple[str, str, str], _Parsed | RenderFailure] = {}
_INFO_CACHE: dict[tuple[str, str], _TemplateInfo] = {}
_CACHE_LIMIT = 4096


def _render_chat_batch(
    batch: Sequence[Sequence[Message]], tools: list[list[dict[str, Any]] | None], template: Template, tokenizer: Any,
    special: re.Pattern[str] | None
) -> list[Rendered | RenderFailure]:
    """Render with the chat template (real contents, grouped by tools) and locate every message via placeholders."""
    env_key = repr(sorted(tokenizer.special_tokens_map.items()))  # what the template sees besides messages
    info = _template_info(tokenizer, template, env_key)
    prepared = [_with_call_ids(list(m), fresh=False) if info.needs_ids and _has_calls(m) else (list(m), 0)
                for m in batch]
    real = _real_renders(tokenizer, template, [m for m, _ in prepared], tools, info)
    out: list[Rendered | RenderFailure] = []
    for (messages, generated), conv_tools, text in zip(prepared, tools, real):
        if isinstance(text, RenderFailure) and _has_call_ids(messages):
            messages, generated = _with_call_ids(messages, fresh=True)  # the template refuses the data's ids
            text = _real_renders(tokenizer, template, [messages], [conv_tools], info)[0]
        if isinstance(text, RenderFailure):
            out.append(text)
            continue
        located = _locate(messages, conv_tools, text, template, tokenizer, info, env_key, special)
        out.append(located._replace(ids_generated=generated) if isinstance(located, Rendered) else located)
    return out


def _has_calls(messages: Sequence[Message]) -> bool:
    """Any tool call or tool result in the conversation."""
    return any(m.tool_calls or m.role == "tool" for m in messages)


def _has_call_ids(messages: Sequence[Message]) -> bool:
    """Any call id or tool_call_id in the conversation."""
    return any(m.tool_call_id is not None or any(c.id is not None for c in m.tool_calls or ()) for m in messages)


def _real_renders(tokenizer: Any, template: Template, batch: list[list[Message]],
                  tools: list[list[dict[str, Any]] | None], info: _TemplateInfo) -> list[Any]:
    """`apply_chat_template(messages, tools=tools, tokenize=False)` for each conversation, one call per tools list."""
    direct = {name: _direct_renderer(tokenizer, t) for name, t in (("plain", template.chat_template or ""),
                                                                   ("tools", _chat_template_for(template, [{}])))}
    if direct["plain"] is not None and direct["tools"] is not None:  # no batching to gain: render one by one
        with _fixed_template_date():
            return [_guarded(direct["tools" if t else "plain"], chat_dicts(m, info.arg_form), t, False)
                    for m, t in zip(batch, tools)]
    groups: dict[str, list[int]] = {}
    for k, conv_tools in enumerate(tools):
        groups.setdefault(json.dumps(conv_tools, ensure_ascii=False, sort_keys=True) if conv_tools else "", []).append(k)
    out: list[Any] = [None] * len(batch)
    for key, members in groups.items():
        conv_tools = tools[members[0]] if key else None
        chat_template = (template.tool_chat_template or template.chat_template) if conv_tools else template.chat_template
        texts = _apply_chat_template(tokenizer, chat_template, [chat_dicts(batch[k], info.arg_form) for k in members],
                                     conv_tools)
        for k, text in zip(members, texts):
            out[k] = text
    return out


def chat_dicts(messages: Sequence[Message], arg_form: str = "object") -> list[dict[str, Any]]:
    """Messages as a chat template receives them: `role` and `content` (`""` for a call without text), an
    assistant's `tool_calls` in the OpenAI form `{"type": "function", "function": {"name", "arguments"}, "id"}`
    (arguments an object, or its JSON text where the template wants a string), a tool result's `name` and
    `tool_call_id`; keys that are not set are left out (templates test `'tool_calls' in message`).

    >>> from schemas.conversation import ToolCall
    >>> chat_dicts([Message(role="assistant", content="", tool_calls=[ToolCall(name="f", arguments={"x": 1})])])
    [{'role': 'assistant', 'content': '', 'tool_calls': [{'type': 'function', 'function': {'name': 'f', 'arguments': {'x': 1}}}]}]
    """
    out = []
    for m in messages:
        d: dict[str, Any] = {"role": m.role, "content": m.content}
        if m.tool_calls:
            d["tool_calls"] = [_call_dict(c.name, _arguments(c.arguments, arg_form), c.id) for c in m.tool_calls]
        if m.name is not None:
            d["name"] = m.name
        if m.tool_call_id is not None:
            d["tool_call_id"] = m.tool_call_id
        out.append(d)
    return out


def _arguments(arguments: dict[str, Any], arg_form: str) -> Any:
    """Arguments as the template wants them: the object, or its JSON text."""
    return arguments if arg_form == "object" else json.dumps(arguments, ensure_ascii=False)


def _call_dict(name: Any, arguments: Any, call_id: Any) -> dict[str, Any]:
    """One call in the OpenAI form (the id only when set)."""
    call: dict[str, Any] = {"type": "function", "function": {"name": name, "arguments": arguments}}
    if call_id is not None:
        call["id"] = call_id
    return call


def _with_call_ids(messages: list[Message], fresh: bool) -> tuple[list[Message], int]:
    """The messages with an id on every call and a `tool_call_id` on every result (Mistral's template refuses
    calls without 9-character alphanumeric ids). The k-th call of the conversation (0-based) without an id, or
    every call with `fresh`, gets `_generated_id(k, call)`; a result without an id answers the call at its
    position after the calling message, a result naming a replaced id gets the new one.

    Returns:
        (messages, number of ids generated).
    """
    out, generated, renamed, pending, k = [], 0, {}, [], 0
    for m in messages:
        if m.tool_calls:
            calls = []
            for c in m.tool_calls:
                if c.id is None or fresh:
                    new_id = _generated_id(k, c)
                    if c.id is not None:
                        renamed[c.id] = new_id
                    c = c.model_copy(update={"id": new_id})
                    generated += 1
                calls.append(c)
                k += 1
            m = m.model_copy(update={"tool_calls": calls})
            pending = [c.id for c in calls]
        elif m.role == "tool":
            answered = pending.pop(0) if pending else None
            call_id = renamed.get(m.tool_call_id, m.tool_call_id) if m.tool_call_id is not None else answered
            if call_id != m.tool_call_id:
                m = m.model_copy(update={"tool_call_id": call_id})
        out.append(m)
    return out, generated


def _generated_id(k: int, call: Any) -> str:
    """A deterministic 9-character alphanumeric call id: the first 9 hex digits of the 5-byte BLAKE2b of
    `f"{k}\\0{name}\\0{arguments as JSON with sorted keys}"` (k: the call's position in the conversation)."""
    payload = f"{k}\x00{call.name}\x00{json.dumps(call.arguments, sort_keys=True, ensure_ascii=False)}"
    return hashlib.blake2b(payload.encode("utf-8", "surrogatepass"), digest_size=5).hexdigest()[:9]


def _locate(messages: list[Message], tools: list[dict[str, Any]] | None, text: str, template: Template,
            tokenizer: Any, info: _TemplateInfo, env_key: str, special: re.Pattern[str] | None
            ) -> Rendered | RenderFailure:
    """Find every message in the real render `text`: with every value a placeholder (a cached skeleton), else
    (a template that branches on a value, or prints one some other way) with tools and calls kept real."""
    tiers = (True, False) if tools or _has_calls(messages) else (True,)
    failure = _mismatch(len(messages) - 1)
    for placeholders in tiers:
        try:
            skeleton = _skeleton(messages, tools, info.arg_form, placeholders)
        except TooManyValues:
            return RenderFailure("template_error", "messages", "too many messages and values for placeholders")
        parsed = _parsed(tokenizer, template, skeleton, info, env_key, special, cache=placeholders)
        if isinstance(parsed, RenderFailure):
            failure = parsed
            continue
        match = parsed.walk.match(text, skeleton.values)
        if match is None:
            continue
        return _spans(messages, tools, text, skeleton, parsed, match, special, placeholders)
    return failure


def _skeleton(messages: Sequence[Message], tools: list[dict[str, Any]] | None, arg_form: str,
              placeholders: bool) -> _Skeleton:
    """The conversation with placeholders: every content and reasoning, and (with `placeholders`) every tool
    call's name, arguments and id, every result's name and call id, and the tool definitions' values.

    A conversation without tool data has the skeleton of its roles and reasoning shape: built once per shape
    (cached), only its values are read per conversation.
    """
    if not tools and not _has_calls(messages):
        shape = tuple((m.role, _fold_shape(m)) for m in messages)
        cached = _PLAIN_SKELETONS.get(shape)
        if cached is None:
            cached = _build_skeleton(messages, tools, arg_form, placeholders)
            if len(_PLAIN_SKELETONS) > _CACHE_LIMIT:
                _PLAIN_SKELETONS.clear()
            _PLAIN_SKELETONS[shape] = cached
        return cached._replace(values=_plain_values(messages))
    return _build_skeleton(messages, tools, arg_form, placeholders)


_PLAIN_SKELETONS: dict[tuple[tuple[str, int], ...], _Skeleton] = {}


def _fold_shape(m: Message) -> int:
    """0: a content; 1: a folded reply; 2: a folded reasoning step without a reply."""
    if m.role != "assistant" or not m.content.startswith(REASONING_OPEN):
        return 0
    parts = split_reasoning(m.content)
    return 0 if parts is None else 1 if parts[1] else 2


def _plain_values(messages: Sequence[Message]) -> list[Any]:
    """The slot values of a conversation without tool data, in `_build_skeleton`'s order."""
    values: list[Any] = []
    for m in messages:
        shape = _fold_shape(m)
        values.append(m.content)
        if shape == 1:
            values.append(split_reasoning(m.content)[1])  # type: ignore[index]
    return values


def _build_skeleton(messages: Sequence[Message], tools: list[dict[str, Any]] | None, arg_form: str,
                    placeholders: bool) -> _Skeleton:
    """`_skeleton`, built."""
    b = SkeletonBuilder()
    n = len(messages)
    content: list[int | None] = [None] * n
    reasoning: list[int | None] = [None] * n
    call_names: list[list[int | None]] = [[] for _ in range(n)]
    owner: list[int] = []
    folded: dict[int, int | None] = {}
    dicts = []
    for i, m in enumerate(messages):
        d: dict[str, Any] = {"role": m.role}
        parts = split_reasoning(m.content) if m.role == "assistant" else None
        if parts is not None:
            reasoning[i] = len(b.kinds)
            r = b.reasoning(m.content)
            reply = b.text(parts[1]) if parts[1] else ""
            content[i] = len(b.kinds) - 1 if parts[1] else None
            folded[reasoning[i]] = content[i]
            d["content"] = f"{REASONING_OPEN}{r}{REASONING_CLOSE}{reply}"
        elif m.content or not m.tool_calls:
            content[i] = len(b.kinds)
            d["content"] = b.text(m.content)
        else:
            d["content"] = ""
        if m.tool_calls:
            d["tool_calls"] = []
            for c in m.tool_calls:
                call_names[i].append(len(b.kinds) if placeholders else None)
                d["tool_calls"].append(_call_skeleton(b, c, arg_form, placeholders))
        if m.name is not None:
            d["name"] = b.string(m.name) if placeholders and m.name else m.name
        if m.tool_call_id is not None:
            d["tool_call_id"] = b.ident(m.tool_call_id) if placeholders and m.tool_call_id else m.tool_call_id
        owner += [i] * (len(b.kinds) - len(owner))
        dicts.append(d)
    tool_names: list[int] = []
    skeleton_tools = [_tool_skeleton(b, t, tool_names) for t in tools] if tools and placeholders else tools
    owner += [-1] * (len(b.kinds) - len(owner))
    key = repr((dicts, skeleton_tools, arg_form))  # the skeleton itself: equal keys, equal renders
    return _Skeleton(dicts, skeleton_tools, b.kinds, b.values, folded, content, reasoning, call_names, tool_names,
                     owner, key)


def _call_skeleton(b: SkeletonBuilder, call: Any, arg_form: str, placeholders: bool) -> dict[str, Any]:
    """A tool call for the skeleton (placeholders for its name, arguments and id), in the form of `chat_dicts`."""
    arguments = _arguments(call.arguments, arg_form)
    if not placeholders:
        return _call_dict(call.name, arguments, call.id)
    name = b.string(call.name)
    if call.arguments:
        arguments = b.obj(arguments) if arg_form == "object" else b.string(arguments)
    return _call_dict(name, arguments, b.ident(call.id) if call.id else call.id)


def _tool_skeleton(b: SkeletonBuilder, tool: dict[str, Any], names: list[int]) -> dict[str, Any]:
    """A tool definition for the skeleton: its keys kept, the function spec's values replaced (strings and
    non-empty objects); `names` collects the slot of each function name."""
    out: dict[str, Any] = {}
    for key, value in tool.items():
        if key == "function" and isinstance(value, dict):
            spec = {}
            for k, v in value.items():
                if k == "name" and isinstance(v, str) and v:
                    names.append(len(b.kinds))
                spec[k] = _value_skeleton(b, v)
            out[key] = spec
        else:
            out[key] = value if key == "type" else _value_skeleton(b, value)
    return out


def _value_skeleton(b: SkeletonBuilder, value: Any) -> Any:
    """A placeholder for a non-empty string or object; other values as they are."""
    if isinstance(value, str) and value:
        return b.string(value)
    if isinstance(value, (dict, list)) and value:
        return b.obj(value)
    return value


def _parsed(tokenizer: Any, template: Template, skeleton: _Skeleton, info: _TemplateInfo, env_key: str,
            special: re.Pattern[str] | None, cache: bool) -> _Parsed | RenderFailure:
    """Render and parse a skeleton, and find its tool-call messages' texts (cached per skeleton when `cache`)."""
    chat_template = _chat_template_for(template, skeleton.tools)
    key = (chat_template, env_key if special is None else env_key + special.pattern, skeleton.key)
    found = _PARSED_CACHE.get(key) if cache else None
    if found is not None:
        return found
    result = _parse_skeleton(tokenizer, chat_template, skeleton, info, special)
    if cache:
        if len(_PARSED_CACHE) > _CACHE_LIMIT:
            _PARSED_CACHE.clear()
        _PARSED_CACHE[key] = result
    return result


def _chat_template_for(template: Template, tools: list[dict[str, Any]] | None) -> str:
    """The chat template source for a conversation: the tool-use one when it has tools and the tokenizer has one."""
    return (template.tool_chat_template or template.chat_template or "") if tools else template.chat_template or ""


def _parse_skeleton(tokenizer: Any, chat_template: str, skeleton: _Skeleton, info: _TemplateInfo,
                    special: re.Pattern[str] | None) -> _Parsed | RenderFailure:
    """Render the skeleton, parse it, and locate each tool-call message's text through prefix renders."""
    text = _apply_chat_template(tokenizer, chat_template, [skeleton.messages], skeleton.tools)[0]
    if isinstance(text, RenderFailure):
        return text
    try:
        walk = Walk.of(text, skeleton.kinds, skeleton.folded)
    except ValueError as e:
        return RenderFailure("template_mismatch", "messages", f"{e}; its tokens cannot be located exactly")
    regions, reasoning_dropped, rewritten = {}, set(), set()
    for i, m in enumerate(skeleton.messages):
        if not m.get("tool_calls"):
            continue
        found = _message_text(tokenizer, chat_template, skeleton, walk, i, info, special, m)
        if found is None and skeleton.reasoning[i] is not None:
            without = {**m, "content": m["content"].rsplit(REASONING_CLOSE, 1)[1]}
            found = _message_text(tokenizer, chat_template, skeleton, walk, i, info, special, without)
            reasoning_dropped.add(i)
        if isinstance(found, RenderFailure):
            return found
        if found is None:
            rewritten.add(i)
            reasoning_dropped.discard(i)
        else:
            regions[i] = found
    ends = []
    for following in walk.literals[1:]:
        end_of_turn = special.search(following) if special is not None else None
        ends.append(end_of_turn.end() if end_of_turn else 0)
    return _Parsed(walk, regions, frozenset(reasoning_dropped), frozenset(rewritten), tuple(ends))


def _message_text(tokenizer: Any, chat_template: str, skeleton: _Skeleton, walk: Walk, i: int, info: _TemplateInfo,
                  special: re.Pattern[str] | None, message: dict[str, Any]) -> tuple[int, int] | RenderFailure | None:
    """Where the text the template writes for message `i` (as the last message, after the generation prompt)
    is in the whole skeleton render: `[start, stop)` up to its last special token; None if it is not there."""
    before, after = _apply_chat_template(tokenizer, chat_template, [skeleton.messages[:i], skeleton.messages[:i] +
                                         [message]], skeleton.tools, add_generation_prompt=(True, False))
    for out in (before, after):
        if isinstance(out, RenderFailure):
            return RenderFailure(out.reason, f"messages[{i}]", "the chat template cannot render the conversation up to "
                                 f"this tool call: {out.message}")
    delta = _added_text(before, after, [slot for slot, owner in enumerate(skeleton.owner) if 0 <= owner < i])
    if info.header and delta.startswith(info.header):
        delta = delta[len(info.header):]
    ends = [m.end() for m in special.finditer(delta)] if special is not None else []
    delta = delta[: ends[-1]] if ends else delta
    if not delta:
        return None
    lower = max((o.end for o in walk.occurrences if 0 <= skeleton.owner[o.slot] < i), default=0)
    upper = min((o.start for o in walk.occurrences if skeleton.owner[o.slot] > i), default=len(walk.text))
    start = walk.text.find(delta, lower, upper)
    return None if start < 0 else (start, start + len(delta))


def _added_text(before: str, after: str, earlier: list[int]) -> str:
    """The text a last message adds: `after` past the point where `before` (the conversation up to it, with the
    generation prompt) ends. That point is found after the last placeholder of an earlier message (`earlier`:
    their slots) and the text following it, since a template may render earlier messages differently once another
    follows (Mistral moves the system prompt to the last user turn); failing that, after the common prefix."""
    chars = {chr(BASE + slot) for slot in earlier}
    last = max((m.start() for m in _ANY_PLACEHOLDER.finditer(before) if m.group() in chars), default=-1)
    if last >= 0:
        tail = before[last + 1:]
        found = after.rfind(before[last])
        if found >= 0 and after.startswith(tail, found + 1):
            return after[found + 1 + len(tail):]
    return after[len(os.path.commonprefix([before, after])):]


_ANY_PLACEHOLDER = re.compile("[\U000F0000-\U000FFFFD]")


def _spans(messages: list[Message], tools: list[dict[str, Any]] | None, text: str, skeleton: _Skeleton,
           parsed: _Parsed, match: Match, special: re.Pattern[str] | None, placeholders: bool
           ) -> Rendered | RenderFailure:
    """Each message's span in the real text, and the checks that the template rendered the tool data."""
    missing_tool = _missing_tool(tools, text, skeleton, match, placeholders)
    if missing_tool is not None:
        return missing_tool
    spans, dropped, reasoning_dropped, content_dropped = [], [], [], []
    for i, m in enumerate(messages):
        if m.tool_calls:
            if i in parsed.rewritten:
                continue
            span = _call_span(i, m, text, skeleton, parsed, match, special, placeholders)
            if isinstance(span, RenderFailure):
                return span
            spans.append(span)
            if skeleton.content[i] is not None and match.real(skeleton.content[i]) is None:
                content_dropped.append(i)
            if i in parsed.reasoning_dropped:
                reasoning_dropped.append(i)
            continue
        slot = skeleton.reasoning[i]
        found = match.real(slot) if slot is not None else None
        if found is None:
            slot = skeleton.content[i]
            found = match.real(slot) if slot is not None else None
            if found is not None and skeleton.reasoning[i] is not None:
                reasoning_dropped.append(i)
        if found is None:
            if m.role == "tool":
                return RenderFailure("template_dropped_tool_result", f"messages[{i}]", "the chat template did not "
                                     "render this tool result (it has no notion of tool messages)")
            dropped.append(i)
            continue
        spans.append(Span(i, found[0], found[1], found[1] + parsed.turn_ends[parsed.walk.first[slot]]))  # type: ignore[index]
    spans.sort(key=lambda s: s.start)
    return Rendered(text, tuple(spans), tuple(dropped), tuple(reasoning_dropped), tuple(content_dropped),
                    rewritten=tuple(sorted(parsed.rewritten)))


def _missing_tool(tools: list[dict[str, Any]] | None, text: str, skeleton: _Skeleton, match: Match,
                  placeholders: bool) -> RenderFailure | None:
    """The failure for tool definitions the template did not render (any function name missing)."""
    if not tools:
        return None
    if placeholders:
        missing = any(match.real(slot) is None for slot in skeleton.tool_names)
    else:
        missing = any(name not in text for name in tool_names(tools))
    if missing:
        return RenderFailure("template_dropped_tools", "tools", "the chat template did not render the tool "
                             "definitions (it has no notion of tools)")
    return None


def _call_span(i: int, message: Message, text: str, skeleton: _Skeleton, parsed: _Parsed, match: Match,
               special: re.Pattern[str] | None, placeholders: bool) -> Span | RenderFailure:
    """The span of a tool-call message: its whole text (content, calls, end of turn), every call inside it."""
    region = parsed.regions.get(i)
    start, stop = (match.position(region[0]), match.position(region[1])) if region else (None, None)
    if start is None or stop is None:
        return _mismatch(i)
    for j, call in enumerate(message.tool_calls or ()):
        slot = skeleton.call_names[i][j]
        if slot is not None:
            occurrence = parsed.walk.first.get(slot)
            inside = occurrence is not None and region[0] <= parsed.walk.occurrences[occurrence].start < region[1]
        else:
            inside = call.name in text[start:stop]
        if not inside:
            return RenderFailure("template_dropped_tool_call", f"messages[{i}].tool_calls[{j}]", "the chat template "
                                 "did not render this tool call in the assistant's turn (it has no notion of tool "
                                 "calls, or wants them in another form)")
    ends = [m.start() for m in special.finditer(text, start, stop)] if special is not None else []
    return Span(i, start, ends[-1] if ends else stop, stop)


def _template_info(tokenizer: Any, template: Template, env_key: str) -> _TemplateInfo:
    """Probe a chat template (cached): the argument form and id rule for tool calls, and the reply header."""
    key = (f"{template.chat_template}\x00{template.tool_chat_template}", env_key)
    info = _INFO_CACHE.get(key)
    if info is None:
        arg_form, needs_ids = _probe_tool_calls(tokenizer, template.tool_chat_template or template.chat_template or "")
        info = _TemplateInfo(arg_form, needs_ids, _probe_header(tokenizer, template.chat_template or ""))
        _INFO_CACHE[key] = info
    return info


_PROBE_TOOLS = [{"type": "function", "function": {"name": "probe_fn", "description": "A probe.", "parameters": {
    "type": "object", "properties": {"probe_arg": {"type": "string"}}, "required": ["probe_arg"]}}}]
_PROBE_ARGUMENTS = '"probe_arg": "probe_value"'


def _probe_tool_calls(tokenizer: Any, chat_template: str) -> tuple[str, bool]:
    """How a template wants `arguments` ("object" or JSON "string"): the form it prints as a JSON object, not as
    an escaped string; and whether it needs call ids (renders a call only with one). Never decided by model name."""
    for with_id in (False, True):
        rendered = False
        for arg_form in ("object", "string"):
            arguments = {"probe_arg": "probe_value"} if arg_form == "object" else "{" + _PROBE_ARGUMENTS + "}"
            call = _call_dict("probe_fn", arguments, "a1b2c3d4e" if with_id else None)
            result = {"role": "tool", "content": "probe result", "name": "probe_fn"}
            if with_id:
                result["tool_call_id"] = "a1b2c3d4e"
            messages = [{"role": "user", "content": "probe question"}, {"role": "assistant", "content": "",
                        "tool_calls": [call]}, result, {"role": "assistant", "content": "probe answer"}]
            text = _apply_chat_template(tokenizer, chat_template, [messages], _PROBE_TOOLS)[0]
            if isinstance(text, RenderFailure):
                continue
            rendered = True
            if _PROBE_ARGUMENTS in text.replace('\\"', "\x00"):
                return arg_form, with_id
        if rendered:
            return "object", with_id
    return "object", False


def _probe_header(tokenizer: Any, chat_template: str) -> str:
    """The text a template writes for a last reply before its content, after the generation prompt (e.g. an
    empty `<think>` block): the prompt's, never trained."""
    user, reply = {"role": "user", "content": chr(0x10FFFC)}, {"role": "assistant", "content": chr(0x10FFFD)}
    before, after = _apply_chat_template(tokenizer, chat_template, [[user], [user, reply]], None,
                                         add_generation_prompt=(True, False))
    if isinstance(before, RenderFailure) or isinstance(after, RenderFailure) or not after.startswith(before):
        return ""
    found = after.find(reply["content"], len(before))
    return after[len(before) : found] if found >= 0 else ""


class _TemplateClock(datetime):
    """The `datetime` that transformers' `strftime_now` sees while prep renders: always TEMPLATE_DATE."""

    @classmethod
    def now(cls, tz: Any = None) -> datetime:
        return TEMPLATE_DATE


@contextmanager
def _fixed_template_date() -> Iterator[None]:
    """Let chat templates that print today's date (`strftime_now`, e.g. Llama 3.2's) print TEMPLATE_DATE instead.

    transformers turns template kwargs into plain data, so a function cannot be passed in; its `strftime_now`
    reads the module-level `datetime`, which is swapped for the duration of the render.
    """
    module = sys.modules.get("transformers.utils.chat_template_utils")
    original = getattr(module, "datetime", None)
    if original is not datetime:  # not the transformers this was written against: leave it alone
        yield
        return
    module.datetime = _TemplateClock
    try:
        yield
    finally:
        module.datetime = original


def _apply_chat_template(tokenizer: Any, chat_template: str, batch: list[list[dict[str, Any]]],
                         tools: list[dict[str, Any]] | None = None,
                         add_generation_prompt: bool | tuple[bool, ...] = False) -> list[Any]:
    """Batched `apply_chat_template(tokenize=False)`; one conversation at a time if the batch raises.

    `add_generation_prompt` may be given per conversation (a tuple), for prefix renders.
    """
    with _fixed_template_date():
        if isinstance(add_generation_prompt, tuple):
            return [_apply_chat_template_batch(tokenizer, chat_template, [m], tools, g)[0]
                    for m, g in zip(batch, add_generation_prompt)]
        return _apply_chat_template_batch(tokenizer, chat_template, batch, tools, add_generation_prompt)


def _apply_chat_template_batch(tokenizer: Any, chat_template: str, batch: list[list[dict[str, Any]]],
                               tools: list[dict[str, Any]] | None, add_generation_prompt: bool) -> list[Any]:
    """`_apply_chat_template` without the fixed date."""
    direct = _direct_renderer(tokenizer, chat_template)
    if direct is not None:
        return [_guarded(direct, messages, tools, add_generation_prompt) for messages in batch]
    kwargs = {"tokenize": False, "chat_template": chat_template, "tools": tools,
              "add_generation_prompt": add_generation_prompt}
    try:
        return list(tokenizer.apply_chat_template(batch, **kwargs)) if batch else []
    except Exception:  # one bad conversation (the template raised): isolate it
        pass
    out: list[Any] = []
    for messages in batch:
        try:
            out.append(tokenizer.apply_chat_template(messages, **kwargs))
        except Exception as exc:  # jinja's TemplateError, or whatever the template raises
            out.append(RenderFailure("template_error", "messages", f"chat template raised: {exc}"))
    return out


def _guarded(direct: Any, messages: list[dict[str, Any]], tools: Any, add_generation_prompt: bool) -> Any:
    """One direct render, or the RenderFailure of a template that raised."""
    try:
        return direct(messages, tools, add_generation_prompt)
    except Exception as exc:  # jinja's TemplateError, or whatever the template raises
        return RenderFailure("template_error", "messages", f"chat template raised: {exc}")


_DIRECT_CACHE: dict[tuple[str, str], Any] = {}
_DIRECT_PROBES = (
    ([{"role": "system", "content": "S"}, {"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}], None),
    ([{"role": "user", "content": " Q "}, {"role": "assistant", "content": "A\n"}], None),
    ([{"role": "user", "content": "Q"}, {"role": "assistant", "content": "", "tool_calls": [
        {"type": "function", "function": {"name": "probe_fn", "arguments": {"probe_arg": "v"}}, "id": "a1b2c3d4e"}]},
      {"role": "tool", "content": "R", "name": "probe_fn", "tool_call_id": "a1b2c3d4e"},
      {"role": "assistant", "content": "A"}], [{"type": "function", "function": {"name": "probe_fn", "parameters": {}}}]),
)


def _direct_renderer(tokenizer: Any, chat_template: str) -> Any:
    """The chat template rendered the way `apply_chat_template` renders it, without its per-call overhead
    (transformers' compiled template, given the same inputs: messages, tools, documents=None, the generation
    prompt flag and the tokenizer's special tokens), which halves the cost of a render. Used only when it gives
    apply_chat_template's exact output on probe conversations (cached per template); else None."""
    key = (chat_template, repr(sorted(tokenizer.special_tokens_map.items())))
    if key in _DIRECT_CACHE:
        return _DIRECT_CACHE[key]
    try:
        from transformers.utils.chat_template_utils import _compile_jinja_template

        compiled = _compile_jinja_template(chat_template)
    except Exception:  # another transformers, or a template that does not compile: the public path decides
        _DIRECT_CACHE[key] = None
        return None
    special = dict(tokenizer.special_tokens_map)

    def direct(messages: list[dict[str, Any]], tools: Any, add_generation_prompt: bool) -> str:
        return compiled.render(messages=messages, tools=tools, documents=None,
                               add_generation_prompt=add_generation_prompt, **special)

    _DIRECT_CACHE[key] = direct if all(_same_render(tokenizer, chat_template, direct, messages, tools, gen)
                                       for messages, tools in _DIRECT_PROBES for gen in (False, True)) else None
    return _DIRECT_CACHE[key]


def _same_render(tokenizer: Any, chat_template: str, direct: Any, messages: list[dict[str, Any]], tools: Any,
                 gen: bool) -> bool:
    """Whether `direct` renders a probe exactly as apply_chat_template does (or both raise)."""
    outs = []
    for render in (lambda: direct(messages, tools, gen),
                   lambda: tokenizer.apply_chat_template(messages, tools=tools, tokenize=False, chat_template=chat_template,
                                                         add_generation_prompt=gen)):
        try:
            outs.append(render())
        except Exception:
            outs.append(None)
    return outs[0] == outs[1]


def _mismatch(index: int) -> RenderFailure:
    """The failure for a chat template whose output cannot be matched to the messages."""
    return RenderFailure(
        "template_mismatch",
        f"messages[{index}].content",
        "the chat template changes this message's content (beyond trimming whitespace); "
        "its tokens cannot be located exactly",
    )
