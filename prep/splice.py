"""Placeholders: find where a chat template printed each value of a conversation.

A chat template is code, so prep does not parse it: it renders the conversation twice. The *skeleton*
is the conversation with every value the template might print replaced by a placeholder, a character of
Unicode's private-use plane 15 (one per value): message contents, folded reasoning, tool-call names and
arguments, call ids, tool names and the strings of the tool definitions. Ids become a run of one
placeholder character as long as the id (templates check ids' lengths); objects (arguments, parameters)
become `{"<placeholder>": null}`, which a template prints with `tojson`. Rendering the skeleton shows where
each value goes and what the template writes around it; the real render is then walked along the skeleton:
the literal text must match exactly, and each value must match one of the forms a template prints a value
in (as is, trimmed, escaped inside a JSON string; an object as any JSON text that parses to it, so `tojson`
with any indentation or key order). The walk maps every skeleton position to its position in the real text.

The skeleton depends only on the conversation's shape (roles, which fields are set, the tools' keys), so
its render is cached: most conversations cost one real render and a walk of string comparisons.
A template that branches on a value (or prints it some other way) makes the walk fail; the caller then
falls back to a skeleton that keeps tool calls and tools real.

>>> b = SkeletonBuilder()
>>> skeleton = [{"role": "user", "content": b.text("Weather in Oslo?")}]
>>> render = lambda msgs: "".join(f"<{m['role']}>{m['content']}</s>" for m in msgs)
>>> walk = Walk.of(render(skeleton), b.kinds, {})
>>> walk.match("<user>Weather in Oslo?</s>", b.values).real(0)
(6, 22)
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

BASE = 0xF0000  # Supplementary Private Use Area-A
LIMIT = 0xFFFFD
_ANY_SLOT = re.compile("[\U000F0000-\U000FFFFD]")
_OBJECT = re.compile(r'\{\s*"(.)"\s*:\s*null\s*\}', re.DOTALL)
_DECODER = json.JSONDecoder()

TEXT, STRING, ID, OBJECT, REASONING = "text", "string", "id", "object", "reasoning"
FOLDED = "folded"


class TooManyValues(ValueError):
    """A conversation with more values than there are placeholder characters."""


class SkeletonBuilder:
    """Hands out placeholders and remembers the real value behind each (slot n is character BASE + n).

    >>> b = SkeletonBuilder()
    >>> b.text("hi") == chr(BASE), b.ident("call_12") == chr(BASE + 1) * 7, b.obj({"a": 1})
    (True, True, {'\U000f0002': None})
    """

    def __init__(self) -> None:
        self.kinds: list[str] = []
        self.values: list[Any] = []

    def _slot(self, kind: str, value: Any) -> str:
        code = BASE + len(self.kinds)
        if code > LIMIT:
            raise TooManyValues(f"more than {LIMIT - BASE + 1} values in one conversation")
        self.kinds.append(kind)
        self.values.append(value)
        return chr(code)

    def text(self, value: str) -> str:
        """A message content (matched as is, trimmed, or JSON-escaped)."""
        return self._slot(TEXT, value)

    def reasoning(self, content: str) -> str:
        """The reasoning of a folded reply; its value is the whole folded content, which a template that keeps
        the reasoning prints as it is (`<think>` block and reply, see `Walk.of`)."""
        return self._slot(REASONING, content)

    def string(self, value: str) -> str:
        """A short string: a name, a description (as is, or JSON-escaped)."""
        return self._slot(STRING, value)

    def ident(self, value: str) -> str:
        """An id: a run of one placeholder as long as the id, so that length checks see the real length."""
        return self._slot(ID, value) * len(value)

    def obj(self, value: Any) -> dict[str, None]:
        """An object or list (arguments, parameters), printed with `tojson`."""
        return {self._slot(OBJECT, value): None}


class Occurrence(NamedTuple):
    """Where slot `slot` sits in the skeleton text: `[start, end)`; `form` says how its value is printed there
    (OBJECT for JSON text, FOLDED for a reasoning slot printed with its reply)."""

    start: int
    end: int
    slot: int
    form: Any = None


class Match(NamedTuple):
    """A real render walked along a skeleton: the real `[start, end)` of every occurrence, in order."""

    walk: Walk
    spans: tuple[tuple[int, int], ...]

    def real(self, slot: int) -> tuple[int, int] | None:
        """The real span of the first occurrence of `slot`, or None when the template did not print it."""
        k = self.walk.first.get(slot)
        return None if k is None else self.spans[k]

    def position(self, skeleton_pos: int) -> int | None:
        """The real position of a skeleton position that is in literal text or at an occurrence's edge."""
        occurrences = self.walk.occurrences
        before_end, real_end = 0, 0
        for k, occ in enumerate(occurrences):
            if skeleton_pos < occ.start:
                break
            if skeleton_pos == occ.start:
                return self.spans[k][0]
            if skeleton_pos < occ.end:
                return None
            before_end, real_end = occ.end, self.spans[k][1]
        return real_end + (skeleton_pos - before_end)


@dataclass(frozen=True)
class Walk:
    """A parsed skeleton render: its text, the occurrences of its slots in order and the literal text around them.

    Attributes:
        text: the skeleton render.
        occurrences: every slot printed, in text order (a folded reply printed whole is one occurrence of
            its reasoning slot, covering the `<think>` block and the reply).
        literals: `literals[k]` is the text before occurrence k; `literals[-1]` the text after the last.
        first: the index of each slot's first occurrence.
    """

    text: str
    occurrences: tuple[Occurrence, ...]
    literals: tuple[str, ...]
    first: dict[int, int]

    @classmethod
    def of(cls, text: str, kinds: Sequence[str], folded: dict[int, int | None]) -> Walk:
        """Parse a skeleton render.

        Args:
            text: the skeleton render.
            kinds: the kind of each slot (SkeletonBuilder.kinds).
            folded: for each reasoning slot, the slot of the reply after it (None when the reply is empty).

        Raises:
            ValueError: the template printed a placeholder in a form prep cannot read back (an object not
                printed as JSON, a reasoning outside its `<think>` block, a cut id).
        """
        occurrences: list[Occurrence] = []
        pos = 0
        for found in _ANY_SLOT.finditer(text):
            start = found.start()
            if start < pos:
                continue  # inside an occurrence already read (an id's run, an object)
            slot = ord(found.group()) - BASE
            if slot >= len(kinds):
                raise ValueError(f"the chat template printed an unknown private-use character U+{ord(found.group()):X}")
            occ = _occurrence(text, start, slot, kinds, folded)
            occurrences.append(occ)
            pos = occ.end
        literals, prev = [], 0
        for occ in occurrences:
            literals.append(text[prev : occ.start])
            prev = occ.end
        literals.append(text[prev:])
        first: dict[int, int] = {}
        for k, occ in enumerate(occurrences):
            first.setdefault(occ.slot, k)
        return cls(text, tuple(occurrences), tuple(literals), first)

    def match(self, real: str, values: Sequence[Any]) -> Match | None:
        """Walk `real` along the skeleton; None when it does not follow it (the template printed a value in
        a way the skeleton does not show, or printed different text around it).

        `values` are the real values of the slots (SkeletonBuilder.values of the real conversation).
        """
        if not real.startswith(self.literals[0]):
            return None
        pos = len(self.literals[0])
        spans = []
        for k, occ in enumerate(self.occurrences):
            following = self.literals[k + 1]
            value = values[occ.slot]
            if occ.form is None and real.startswith(value, pos) and real.startswith(following, pos + len(value)):
                printed = value  # the common case, without building the other candidates
            elif occ.form == OBJECT:
                end = _json_end(real, pos, value)
                if end is None or not real.startswith(following, end):
                    return None
                printed = real[pos:end]
            else:
                printed = next((c for c in _candidates(occ, values) if real.startswith(c, pos)
                                and real.startswith(following, pos + len(c))), None)
                if printed is None:
                    return None
            spans.append((pos, pos + len(printed)))
            pos += len(printed) + len(following)
        return Match(self, tuple(spans)) if pos == len(real) else None


def _occurrence(text: str, start: int, slot: int, kinds: Sequence[str], folded: dict[int, int | None]) -> Occurrence:
    """The occurrence of `slot` whose placeholder character is at `start`."""
    kind = kinds[slot]
    ch = chr(BASE + slot)
    if kind == ID:
        end = start
        while end < len(text) and text[end] == ch:
            end += 1
        return Occurrence(start, end, slot)
    if kind == OBJECT:
        opening = text.rfind("{", 0, start)
        found = _OBJECT.match(text, opening) if opening >= 0 else None
        if found is None or found.group(1) != ch:
            raise ValueError("the chat template prints an object other than with tojson")
        return Occurrence(opening, found.end(), slot, OBJECT)
    if kind == REASONING:
        return _folded(text, start, slot, folded[slot])
    return Occurrence(start, start + 1, slot)


def _folded(text: str, start: int, slot: int, reply: int | None) -> Occurrence:
    """A folded reply printed whole, `<think>\\n{reasoning}\\n</think>\\n\\n{reply}`: one occurrence of the
    reasoning slot `slot`, covering the reply slot after it."""
    from schemas.conversation import REASONING_CLOSE, REASONING_OPEN

    opening = start - len(REASONING_OPEN)
    close = start + 1
    if opening < 0 or text[opening:start] != REASONING_OPEN or text[close : close + len(REASONING_CLOSE)] != REASONING_CLOSE:
        raise ValueError("the chat template rewrites a reply's <think> block")
    end = close + len(REASONING_CLOSE)
    if reply is not None:
        if text[end : end + 1] != chr(BASE + reply):
            raise ValueError("the chat template rewrites a reply's <think> block")
        end += 1
    return Occurrence(opening, end, slot, FOLDED)


def _json_end(real: str, pos: int, value: Any) -> int | None:
    """The end of the JSON text at `pos` of `real` when it parses to `value` (else None)."""
    try:
        parsed, end = _DECODER.raw_decode(real, pos)
    except ValueError:
        return None
    return end if parsed == value else None


def _candidates(occ: Occurrence, values: Sequence[Any]):
    """The forms a template may have printed a string value in, most likely first."""
    value = values[occ.slot]
    yield value
    if isinstance(value, str):
        stripped = value.strip()
        if stripped != value:
            yield stripped
            yield value.lstrip()
            yield value.rstrip()
        escaped = json.dumps(value, ensure_ascii=False)[1:-1]
        if escaped != value:
            yield escaped
