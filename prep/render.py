"""Render a conversation to one text plus the character span of every message in it.

Templates are data: each role has a `prefix` (untrained), an `end` (the end-of-turn marker, trained
with an assistant reply) and an `after` (an untrained separator written only between turns). A turn
renders as `prefix + content + end [+ EOS] + after`. The `tokenizer` template is the one special path:
the tokenizer's own Jinja chat template, rendered by transformers, with message spans found through
placeholders (see `render_batch`).

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
from schemas.conversation import REASONING_CLOSE, REASONING_OPEN, Conversation, Message, split_reasoning

TEMPLATE_NAMES = ("markers", "chatml", "tokenizer")
TEMPLATE_DATE = datetime(2024, 7, 26)  # what `strftime_now` in a chat template reads (fixed: same output every day)
_PLACEHOLDER_BASE = 0xF0000  # Supplementary Private Use Area-A: one code point per message
_REASONING_BASE = 0x100000  # Supplementary Private Use Area-B: one per message's folded reasoning


@dataclass(frozen=True)
class Turn:
    """How one role's message is wrapped: `prefix + content + end + after`.

    `end` is the end-of-turn marker, trained together with an assistant reply; `prefix` and `after`
    are never trained (except under `train_on="all"`). `after` is written only between turns.
    """

    prefix: str = ""
    end: str = ""
    after: str = ""


@dataclass(frozen=True)
class Roles:
    """One `Turn` per role."""

    system: Turn = Turn()
    user: Turn = Turn()
    assistant: Turn = Turn()


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
    """

    name: str
    roles: Roles = Roles()
    single_turn: Roles | None = None
    append_eos: bool = False
    markers: tuple[str, ...] = ()
    chat_template: str | None = field(default=None, repr=False)

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
            for turn in (roles.system, roles.user, roles.assistant) if roles else ():
                for text in (turn.prefix.strip(), turn.end.strip()):
                    if text and text.strip("#") and text not in found:
                        found.append(text)
        return tuple(found)


MARKERS = Template(
    name="markers",
    roles=Roles(
        system=Turn("###system###\n", "", "\n\n"),
        user=Turn("###human###\n", "", "\n\n"),
        assistant=Turn("###assistant###\n", "\n###", "\n\n"),
    ),
    single_turn=Roles(
        system=Turn("###system###\n", "", "\n\n"),
        user=Turn("###instruction###\n", "", "\n\n"),
        assistant=Turn("###response###\n", "\n###", "\n\n"),
    ),
    append_eos=True,
    # The bare end marker `###` is plain text on purpose: markdown headings use it.
    markers=("###system###", "###instruction###", "###response###", "###human###", "###assistant###"),
)

CHATML = Template(
    name="chatml",
    roles=Roles(
        system=Turn("<|im_start|>system\n", "<|im_end|>", "\n"),
        user=Turn("<|im_start|>user\n", "<|im_end|>", "\n"),
        assistant=Turn("<|im_start|>assistant\n", "<|im_end|>", "\n"),
    ),
    append_eos=False,
    markers=("<|im_start|>", "<|im_end|>"),
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
    """A rendered conversation: the text, one `Span` per rendered message (in order), the indices
    of messages the template did not render at all (`dropped`), and of replies whose folded reasoning
    the template left out, rendering only the reply after it (`reasoning_dropped`)."""

    text: str
    spans: tuple[Span, ...]
    dropped: tuple[int, ...] = ()
    reasoning_dropped: tuple[int, ...] = ()


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
    if isinstance(chat_template, dict):  # several named templates: the default one is used
        chat_template = chat_template.get("default")
    if not chat_template:
        raise ConfigError(
            f"tokenizer {getattr(tokenizer, 'name_or_path', '?')!r} has no chat_template; "
            f"use --template with one of {', '.join(n for n in TEMPLATE_NAMES if n != 'tokenizer')} or a file"
        )
    return Template(name="tokenizer", chat_template=chat_template)


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
    (each with `prefix`, `end`, `after`) and an optional `single_turn` table holding the same three
    role tables.

    Raises:
        ConfigError: an unknown key or a value of the wrong type (the message lists the valid keys).

    >>> t = template_from_dict({"user": {"prefix": "Q: "}, "assistant": {"prefix": "A: ", "end": "</s>"}})
    >>> t.roles.assistant
    Turn(prefix='A: ', end='</s>', after='')
    """
    _check_keys(data, ("name", "append_eos", "markers", "system", "user", "assistant", "single_turn"), source)
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
    return Template(name=name, roles=roles, single_turn=single, append_eos=append_eos, markers=tuple(markers))


def template_to_dict(template: Template) -> dict[str, Any] | None:
    """The file form of a data template (what `template_from_dict` reads back); None for `tokenizer`.

    >>> template_from_dict(template_to_dict(BUILTIN_TEMPLATES["chatml"])) == BUILTIN_TEMPLATES["chatml"]
    True
    """
    if template.uses_chat_template:
        return None
    data: dict[str, Any] = {"name": template.name, "append_eos": template.append_eos, "markers": list(template.markers),
                            **asdict(template.roles)}
    if template.single_turn is not None:
        data["single_turn"] = asdict(template.single_turn)
    return data


def _roles_from_dict(data: dict[str, Any], source: str) -> Roles:
    """Read the system/user/assistant tables of a template dict."""
    turns = {}
    for role in ("system", "user", "assistant"):
        table = data.get(role, {})
        if not isinstance(table, dict):
            raise ConfigError(f"{source}: [{role}] must be a table with keys prefix, end, after")
        _check_keys(table, tuple(f.name for f in fields(Turn)), f"{source} [{role}]")
        if not all(isinstance(v, str) for v in table.values()):
            raise ConfigError(f"{source} [{role}]: prefix, end and after must be strings")
        turns[role] = Turn(**table)
    return Roles(**turns)


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
) -> Rendered:
    """Render one conversation to `(text, spans)`.

    Args:
        conversation: a Conversation or its list of messages.
        template: the Template.
        tokenizer: required for the `tokenizer` template; for data templates it supplies `eos`.
        bos: text put before everything by data templates (the BOS string when the tokenizer adds
            one by default; chat templates write their own).
        eos: the EOS string appended after assistant turns when `template.append_eos`.

    Returns:
        Rendered(text, spans, dropped).

    Raises:
        RenderError: the chat template's output could not be matched to the messages.
        ConfigError: EOS or tokenizer needed but not given.

    >>> from schemas import Message
    >>> render([Message(role="user", content="Hi"), Message(role="assistant", content="Yo")],
    ...        BUILTIN_TEMPLATES["chatml"]).text
    '<|im_start|>user\\nHi<|im_end|>\\n<|im_start|>assistant\\nYo<|im_end|>'
    """
    messages = conversation.messages if isinstance(conversation, Conversation) else list(conversation)
    if eos is None and tokenizer is not None:
        eos = tokenizer.eos_token
    out = render_batch([messages], template, tokenizer, bos=bos, eos=eos)[0]
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
) -> list[Rendered | RenderFailure]:
    """Render many conversations (lists of messages); chat templates are rendered in one call.

    Args:
        batch: conversations as message lists.
        template, tokenizer, bos, eos: as in `render`.
        special_tokens: the special token strings that end a turn in a chat template (default: the
            tokenizer's special tokens).

    Returns:
        One Rendered or RenderFailure per conversation, in order.
    """
    if template.uses_chat_template:
        if tokenizer is None:
            raise ConfigError("the tokenizer template needs a tokenizer")
        if special_tokens is None:
            special_tokens = special_token_strings(tokenizer)
        return _render_chat_batch(batch, template, tokenizer, special_token_regex(tuple(special_tokens)))
    if template.append_eos and not eos:
        raise ConfigError(f"template {template.name!r} appends EOS, but the tokenizer has no eos_token")
    return [_render_turns(messages, template, bos, eos or "") for messages in batch]


def _render_turns(messages: Sequence[Message], template: Template, bos: str, eos: str) -> Rendered:
    """Render a data template: prefix + content + end (+ EOS for assistants) + after, in one pass."""
    roles = template.roles
    if template.single_turn is not None and _is_single_turn(messages):
        roles = template.single_turn
    parts = [bos]
    pos = len(bos)
    spans = []
    last = len(messages) - 1
    for i, message in enumerate(messages):
        turn: Turn = getattr(roles, message.role)
        end = turn.end + eos if (template.append_eos and message.role == "assistant") else turn.end
        start = pos + len(turn.prefix)
        content_end = start + len(message.content)
        spans.append(Span(i, start, content_end, content_end + len(end)))
        after = turn.after if i < last else ""
        parts += (turn.prefix, message.content, end, after)
        pos = content_end + len(end) + len(after)
    return Rendered("".join(parts), tuple(spans))


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
# The tokenizer's own chat template, through placeholders


def _render_chat_batch(
    batch: Sequence[Sequence[Message]], template: Template, tokenizer: Any, special: re.Pattern[str] | None
) -> list[Rendered | RenderFailure]:
    """Render with the chat template twice (placeholders, real contents) and splice the two.

    Each message content is replaced by one private-use character; the placeholders are found in
    order, the literal text between them is kept, and the real contents are substituted back, so
    the spans are known. The result must equal a normal render of the real messages; a template
    that trims content is matched by trying the stripped content (see `_splice`). A reply with folded
    reasoning (`<think>` form) gets a second placeholder for its reasoning, in the same form, so that
    templates which split it off (Qwen3's) render their own layout, or drop it from earlier turns.
    """
    real = _apply_chat_template(tokenizer, template, [_as_dicts(m) for m in batch])
    env_key = repr(sorted(tokenizer.special_tokens_map.items()))  # what the template sees besides messages
    out: list[Rendered | RenderFailure] = []
    for messages, text in zip(batch, real):
        if isinstance(text, RenderFailure):
            out.append(text)
            continue
        shapes = tuple((m.role, m.role == "assistant" and split_reasoning(m.content) is not None) for m in messages)
        literals = _placeholder_literals(tokenizer, template, shapes, env_key)
        if isinstance(literals, RenderFailure):
            out.append(literals)
            continue
        out.append(_splice(messages, text, literals, special))
    return out


def _as_dicts(messages: Sequence[Message]) -> list[dict[str, str]]:
    """Messages as the role/content dicts chat templates read."""
    return [{"role": m.role, "content": m.content} for m in messages]


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


def _apply_chat_template(tokenizer: Any, template: Template, batch: list[list[dict[str, str]]]) -> list[Any]:
    """Batched `apply_chat_template(tokenize=False)`; one conversation at a time if the batch raises."""
    with _fixed_template_date():
        return _apply_chat_template_batch(tokenizer, template, batch)


def _apply_chat_template_batch(tokenizer: Any, template: Template, batch: list[list[dict[str, str]]]) -> list[Any]:
    """`_apply_chat_template` without the fixed date."""
    kwargs = {"tokenize": False, "chat_template": template.chat_template}
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


_LITERALS_CACHE: dict[tuple[str, str, tuple[tuple[str, bool], ...]], Any] = {}
PlaceholderRender = tuple[tuple[str, ...], tuple[int, ...], tuple[int, ...]]


def _placeholder_literals(
    tokenizer: Any, template: Template, shapes: tuple[tuple[str, bool], ...], env_key: str
) -> PlaceholderRender | RenderFailure:
    """Render placeholders for these (role, has folded reasoning) messages; return the literal texts around
    them, the rendered message indices, and the replies rendered without their reasoning.

    `literals[k]` is the text before the k-th rendered message, `literals[-1]` the text after the last.
    Cached per (template, special tokens, shapes): the placeholders do not depend on the contents.
    """
    key = (template.chat_template or "", env_key, shapes)
    cached = _LITERALS_CACHE.get(key)
    if cached is not None:
        return cached
    if len(shapes) > 0xFFFD:
        return RenderFailure("template_error", "messages", "too many messages for placeholders")
    placeholders = [chr(_PLACEHOLDER_BASE + i) for i in range(len(shapes))]
    messages = [
        {"role": role, "content": f"{REASONING_OPEN}{chr(_REASONING_BASE + i)}{REASONING_CLOSE}{p}" if folded else p}
        for i, ((role, folded), p) in enumerate(zip(shapes, placeholders))
    ]
    text = _apply_chat_template(tokenizer, template, [messages])[0]
    if isinstance(text, RenderFailure):
        return text
    literals, rendered, reply_only, pos = [], [], [], 0
    for i, placeholder in enumerate(placeholders):
        found = text.find(placeholder, pos)
        if found < 0:
            continue  # the template dropped this message (e.g. mistral's system prompt)
        start = found
        if shapes[i][1]:
            start = _reasoning_start(text, pos, found, i)
            if start is None:
                return RenderFailure("template_mismatch", f"messages[{i}].content", "the chat template rewrites "
                                     "this reply's <think> block; its tokens cannot be located exactly")
            if start == found:
                reply_only.append(i)
        literals.append(text[pos:start])
        rendered.append(i)
        pos = found + 1
    literals.append(text[pos:])
    result = (tuple(literals), tuple(rendered), tuple(reply_only))
    if len(_LITERALS_CACHE) > 4096:
        _LITERALS_CACHE.clear()
    _LITERALS_CACHE[key] = result
    return result


def _reasoning_start(text: str, pos: int, found: int, index: int) -> int | None:
    """Where message `index`'s folded content starts in a placeholder render: at its `<think>` when the
    reasoning placeholder is rendered in the folded form, at the reply placeholder `found` when the template
    left the reasoning out; None when it rendered the reasoning some other way."""
    r = text.find(chr(_REASONING_BASE + index), pos, found)
    if r < 0:
        return found
    start = r - len(REASONING_OPEN)
    if start < pos or text[start:r] != REASONING_OPEN or text[r + 1 : found] != REASONING_CLOSE:
        return None
    return start


def _splice(
    messages: Sequence[Message],
    text: str,
    placeholder_render: PlaceholderRender,
    special: re.Pattern[str] | None,
) -> Rendered | RenderFailure:
    """Walk the real render `text` along the placeholder literals, locating each message's content.

    A content is matched as is, or stripped (both sides, left, right) for templates that `| trim` it;
    a reply whose reasoning the template left out is matched as the reply alone.
    The end of turn runs from the content to the end of the first special token in the literal text
    that follows it (before the next message).
    """
    literals, rendered, reply_only = placeholder_render
    if not text.startswith(literals[0]):
        return _mismatch(0, messages)
    pos = len(literals[0])
    spans = []
    for k, i in enumerate(rendered):
        following = literals[k + 1]
        content = messages[i].content
        expected = split_reasoning(content)[1] if i in reply_only else content  # type: ignore[index]
        matched = _match_content(text, pos, expected, following)
        if matched is None:
            return _mismatch(i, messages)
        end = pos + len(matched)
        match = special.search(following) if special is not None else None
        spans.append(Span(i, pos, end, end + match.end() if match else end))
        pos = end + len(following)
    if pos != len(text):
        return _mismatch(len(messages) - 1, messages)
    dropped = tuple(sorted(set(range(len(messages))) - set(rendered)))
    return Rendered(text, tuple(spans), dropped, reply_only)


def _match_content(text: str, pos: int, content: str, following: str) -> str | None:
    """The form of `content` (as is, or stripped) that the template wrote at `pos`, or None."""
    for candidate in (content, content.strip(), content.lstrip(), content.rstrip()):
        if text.startswith(candidate, pos) and text.startswith(following, pos + len(candidate)):
            return candidate
    return None


def _mismatch(index: int, messages: Sequence[Message]) -> RenderFailure:
    """The failure for a chat template whose output cannot be matched to the messages."""
    return RenderFailure(
        "template_mismatch",
        f"messages[{index}].content",
        "the chat template changes this message's content (beyond trimming whitespace); "
        "its tokens cannot be located exactly",
    )
