"""The unified conversation form every input format converts to.

A `Conversation` is an optional system message followed by user/assistant turns that
alternate, start with a user turn and end with an assistant turn. Content is kept
byte-for-byte: nothing is stripped, so code blocks and indentation survive.
"""

from __future__ import annotations

import hashlib
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

Role = Literal["system", "user", "assistant"]
ROLES: tuple[str, ...] = ("system", "user", "assistant")


class Message(BaseModel):
    """One turn: who speaks, what they say, and an optional per-message training override.

    `train=None` lets the pack-time policy (`--train-on`) decide; `True`/`False` forces it.

    >>> Message(role="user", content="Hi").role
    'user'
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    role: Role
    content: str
    train: bool | None = None


class SourceRef(BaseModel):
    """Where a record came from: the input file and its 1-based line (JSONL) or 0-based row (others)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    path: str
    line: int
    format: str | None = None


class Conversation(BaseModel):
    """The unified form: `id`, `source`, `messages`, free-form `meta`.

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

    @model_validator(mode="after")
    def _check_turns(self) -> "Conversation":
        problems = conversation_problems(self.messages)
        if problems:
            raise ValueError("; ".join(f"{field}: {msg}" for field, msg, _ in problems))
        return self


def conversation_problems(messages: list[Message]) -> list[tuple[str, str, str]]:
    """Check the turn rules; return `(field, message, reason)` for each violation (empty when valid).

    Rules: an optional system message comes first and only first; then turns alternate
    user/assistant starting with user; the last turn is an assistant turn; every assistant
    turn has non-whitespace content.

    >>> conversation_problems([Message(role="user", content="hi")])
    [('messages', 'no assistant turn', 'no_assistant_turn')]
    """
    out: list[tuple[str, str, str]] = []
    start = 1 if messages and messages[0].role == "system" else 0
    turns = messages[start:]
    if not any(m.role == "assistant" for m in turns):
        return [("messages", "no assistant turn", "no_assistant_turn")]
    for i, m in enumerate(turns, start):
        expected = "user" if (i - start) % 2 == 0 else "assistant"
        if m.role != expected:
            reason = "misplaced_system" if m.role == "system" else "turns_not_alternating"
            out.append((f"messages[{i}].role", f"expected {expected!r}, got {m.role!r}", reason))
            break
    for i, m in enumerate(messages):
        if m.role == "assistant" and not m.content.strip():
            out.append((f"messages[{i}].content", "empty or whitespace-only response", "empty_response"))
    if turns and turns[-1].role != "assistant" and not out:
        out.append((f"messages[{len(messages) - 1}].role", "conversation ends with a user turn", "ends_with_user"))
    return out


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


def content_hash(messages: list[Message]) -> str:
    """A stable 16-hex-digit hash of the roles and contents (used for ids and `--dedup`).

    >>> content_hash([Message(role="user", content="a"), Message(role="assistant", content="b")])
    '46d0642b854dd922'
    """
    # One update over the joined bytes: the same digest as one update per part, at half the cost;
    # the parts are joined once (an f-string per message would copy every content twice).
    parts: list[str] = []
    for m in messages:
        parts += (m.role, "\x00", m.content, "\x01")
    return hashlib.blake2b("".join(parts).encode("utf-8", "surrogatepass"), digest_size=8).hexdigest()
