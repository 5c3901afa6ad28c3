"""The turn structure of a conversation, as the encoder cuts and expands it.

An *exchange* is a user turn and the reply to it: every message up to the next user turn (with tool data,
the assistant's calls, their results and the answer). Over-long conversations are split between exchanges,
so a piece never starts with a tool result whose call is in another piece.

An *expansion* turns one conversation into several examples, for chat templates that render a reply
differently once later turns follow (Qwen3 drops the reasoning of replies before the last user turn): each
such reply gets an example of its own, the conversation up to it with only it trained, which is exactly
what the model sees and writes at inference; the rest of the conversation stays one example.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


def exchanges(messages: Sequence[Any], first: int = 0) -> list[tuple[int, ...]]:
    """The message indices of each exchange from `first` on (a user message and everything up to the next one).

    >>> from schemas import Message
    >>> roles = ["system", "user", "assistant", "tool", "assistant", "user", "assistant"]
    >>> exchanges([Message(role=r, content="x") for r in roles], first=1)
    [(1, 2, 3, 4), (5, 6)]
    """
    groups: list[tuple[int, ...]] = []
    current: list[int] = []
    for i in range(first, len(messages)):
        if messages[i].role == "user" and current:
            groups.append(tuple(current))
            current = []
        current.append(i)
    if current:
        groups.append(tuple(current))
    return groups


def expansion(flags: Sequence[bool], kept: Sequence[bool]) -> list[tuple[int, list[bool]]]:
    """The examples one conversation becomes: `(number of messages, train flags)` for each.

    Every message trained in `flags` but not in `kept` gets an example of its own (the messages up to it, only
    it trained); the whole conversation stays one example for the messages trained in `kept`, if any.

    >>> expansion([False, True, False, True], [False, False, False, True])
    [(2, [False, True]), (4, [False, False, False, True])]
    """
    own = [i for i, (f, k) in enumerate(zip(flags, kept)) if f and not k]
    out = [(i + 1, [j == i for j in range(i + 1)]) for i in own]
    if any(kept):
        out.append((len(flags), list(kept)))
    return out
