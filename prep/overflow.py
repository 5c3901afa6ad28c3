"""`--overflow split`: cut an over-long conversation at turn boundaries into pieces that fit `max_len`.

The splitter works on one conversation: its messages, trained flags, rendering and the tokens of the whole
conversation (prep.encode tokenized it once). It plans pieces from token counts, turns a piece into the
messages to render, and refines a piece that still came out too long. It never renders or tokenizes: the
encoder does that for all pieces of a batch at once (and takes a piece's ids from the whole conversation's
where prep.slicing proves that exact).

>>> from schemas import Message
>>> from prep.render import BUILTIN_TEMPLATES, render
>>> from prep.tokenizer import default_tokenizer
>>> tok = default_tokenizer()
>>> msgs = [Message(role=r, content=c * 40) for r, c in
...         [("user", "a"), ("assistant", "b"), ("user", "c"), ("assistant", "d")]]
>>> rendered = render(msgs, BUILTIN_TEMPLATES["chatml"])
>>> enc = tok.backend_tokenizer.encode(rendered.text, add_special_tokens=False)
>>> splitter = Splitter(msgs, [False, True, False, True], rendered, enc, max_len=len(enc) - 1)
>>> [(p.ctx, p.new, p.end) for p in splitter.plan()]    # turn pairs: context [ctx, new), new [new, end)
[(0, 0, 1), (1, 1, 2)]
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any, NamedTuple

import numpy as np

from prep.render import Rendered
from prep.turns import exchanges
from schemas.conversation import Message


class Piece:
    """A piece of a split conversation, in turn pairs: context `[ctx, new)` (masked), new `[new, end)`.

    `user_content` replaces the first new user message when that one had to be cut.
    """

    __slots__ = ("ctx", "new", "end", "user_content", "slack")

    def __init__(self, ctx: int, new: int, end: int):
        self.ctx, self.new, self.end = ctx, new, end
        self.user_content: str | None = None
        self.slack = 0


class TooLong(NamedTuple):
    """A piece that cannot fit: its tokens, and (when the prompt was already cut away) what the reply alone needs."""

    tokens: int
    without_prompt: int | None = None

    def message(self, max_len: int) -> str:
        """The reject message.

        >>> TooLong(300, 280).message(256)
        '300 tokens > max_len 256; even with the prompt cut the reply needs 280 (raise --max-len)'
        """
        msg = f"{self.tokens} tokens > max_len {max_len}"
        if self.without_prompt is not None:
            msg += f"; even with the prompt cut the reply needs {self.without_prompt}"
        return msg + " (raise --max-len)"


class Splitter:
    """Cuts one over-long conversation at turn boundaries into pieces that each end with an assistant turn.

    Each piece starts with the system prompt and as much of the preceding conversation as fits (as
    masked context: train=False), then new turns, so every trained turn is trained in exactly one
    piece. Pieces are planned from the token counts of the whole conversation, then rendered and
    encoded (exact); a piece still too long drops one more context pair, then gives up new pairs
    (they move to a piece of their own). A single pair that cannot fit alone is cut on the prompt
    side: the middle of the user content is cut (its start, usually the instruction, and its end,
    closest to the reply, are kept; the system prompt and role markers stay), when the reply fits;
    otherwise the piece is too long.

    Args:
        messages: the conversation's messages.
        flags: trained per message (policy and overrides resolved).
        rendered: the rendering of the whole conversation.
        enc: its encoding (a `tokenizers.Encoding`, or anything with the same lookups).
        max_len: the longest piece, in tokens.
        marker_re: markers a prompt cut must not create (None: no check).
    """

    def __init__(self, messages: Sequence[Message], flags: Sequence[bool], rendered: Rendered, enc: Any,
                 max_len: int, marker_re: re.Pattern[str] | None = None):
        self.messages, self.flags, self.max_len, self.marker_re = messages, flags, max_len, marker_re
        self.system = messages[0] if messages[0].role == "system" else None
        first = 1 if self.system is not None else 0
        self.pairs = exchanges(messages, first)  # a user turn and its reply (tool calls and results included)
        self.needed = [any(flags[i] for i in pair) for pair in self.pairs]
        self._estimate_costs(rendered, enc)

    def has_trained_turn(self) -> bool:
        """Some pair holds a trained message."""
        return any(self.needed)

    def _estimate_costs(self, rendered: Rendered, enc: Any) -> None:
        """Tokens per turn pair, the head (BOS, system prompt) and the tail, from the whole encoding."""
        text_len = len(rendered.text)
        stops = {s.message: tokens_before(enc, s.stop, text_len) for s in rendered.spans}
        first_start = rendered.spans[0].start if rendered.spans else 0
        head = tokens_before(enc, first_start, text_len)
        if self.system is not None:
            head = stops.get(0, head)
        bound = head
        self.costs = []
        for pair in self.pairs:
            end = next((stops[i] for i in reversed(pair) if i in stops), bound)
            self.costs.append(max(end - bound, 0))
            bound = max(bound, end)
        self.head, self.tail = head, max(len(enc) - bound, 0)
        self.cum = np.concatenate(([0], np.cumsum(self.costs)))

    def _estimate(self, ctx: int, end: int) -> int:
        """Estimated tokens of a piece holding pairs [ctx, end)."""
        return int(self.head + self.cum[end] - self.cum[ctx] + self.tail)

    def plan(self) -> list[Piece]:
        """Greedy pieces: new pairs while they fit alone, then as much context as fits before them."""
        pieces = []
        j = self._next_needed(0)
        while j is not None:
            k = j + 1
            while k < len(self.pairs) and self._estimate(j, k + 1) <= self.max_len:
                k += 1
            k = self._last_needed(j, k)
            pieces.append(Piece(self._context_start(j, k), j, k))
            j = self._next_needed(k)
        return pieces

    def _next_needed(self, start: int) -> int | None:
        """First pair at or after `start` holding a trained message."""
        return next((p for p in range(start, len(self.pairs)) if self.needed[p]), None)

    def _last_needed(self, start: int, end: int) -> int:
        """End (exclusive) of the new pairs [start, end) trimmed back to the last trained pair."""
        while end - 1 > start and not self.needed[end - 1]:
            end -= 1
        return end

    def _context_start(self, new: int, end: int) -> int:
        """The first context pair: as many pairs before `new` as fit with [new, end)."""
        ctx = new
        while ctx > 0 and self._estimate(ctx - 1, end) <= self.max_len:
            ctx -= 1
        return ctx

    def piece_messages(self, piece: Piece) -> list[Message]:
        """The piece's messages, each with an explicit train flag (context False, new turns as in the conversation)."""
        messages, flags = self.messages, self.flags
        out = []
        if self.system is not None:
            out.append(_with_content(self.system, self.system.content, flags[0] and piece.new == 0))
        for p in range(piece.ctx, piece.end):
            for i in self.pairs[p]:
                content = messages[i].content
                if piece.user_content is not None and p == piece.new and messages[i].role == "user":
                    content = piece.user_content
                out.append(_with_content(messages[i], content, flags[i] and p >= piece.new))
        return out

    def whole_index(self, piece: Piece, k: int) -> int:
        """The conversation's index of the piece's k-th message (as `piece_messages` orders them)."""
        if self.system is not None:
            if k == 0:
                return 0
            k -= 1
        for pair in self.pairs[piece.ctx : piece.end]:
            if k < len(pair):
                return pair[k]
            k -= len(pair)
        raise IndexError(k)

    def refine(self, piece: Piece, rendered: Rendered, enc: Any) -> list[Piece] | TooLong:
        """Next candidates for a piece that came out too long (given its rendering and encoding), or TooLong."""
        if piece.ctx < piece.new:
            piece.ctx += 1
            return [piece]
        if piece.end - piece.new > 1:
            last = piece.end - 1
            head = Piece(piece.new, piece.new, self._last_needed(piece.new, last))
            tail = Piece(self._context_start(last, piece.end), last, piece.end)
            return [head, tail] if any(self.needed[piece.new : last]) else [tail]
        return self._cut_prompt(piece, rendered, enc)

    def _cut_prompt(self, piece: Piece, rendered: Rendered, enc: Any) -> list[Piece] | TooLong:
        """Cut the middle of the piece's user content so the piece fits, or give up (TooLong)."""
        n = len(enc)
        messages = self.piece_messages(piece)
        user = next((i for i, m in enumerate(messages) if m.role == "user"), None)
        span = next((s for s in rendered.spans if s.message == user), None)
        if user is None or span is None or span.end == span.start:
            return TooLong(n)
        u0, u1 = token_range(enc, span.start, span.end, len(rendered.text))
        if n - (u1 - u0) > self.max_len:
            return TooLong(n, without_prompt=n - (u1 - u0))
        keep = (u1 - u0) - (n - self.max_len) - piece.slack
        piece.slack = piece.slack * 2 + 2  # grows, so that every retry cuts more
        piece.user_content = ""
        if keep > 0:
            head_tokens = keep // 2
            head_end = enc.token_to_chars(u0 + head_tokens)[0] - span.start
            tail_start = enc.token_to_chars(u1 - (keep - head_tokens))[0] - span.start
            piece.user_content = cut_middle(messages[user].content, head_end, tail_start, self.marker_re)
        return [piece]


def _with_content(message: Message, content: str, train: bool) -> Message:
    """A copy of `message` with new content and an explicit train flag (no re-validation)."""
    return Message.model_construct(role=message.role, content=content, train=train, tool_calls=message.tool_calls,
                                   name=message.name, tool_call_id=message.tool_call_id)


def cut_middle(content: str, head_end: int, tail_start: int, marker_re: re.Pattern[str] | None) -> str:
    """content[:head_end] + content[tail_start:], cutting more of the head if the join would form a marker.

    >>> cut_middle("abcdefgh", 3, 6, None)
    'abcgh'
    """
    head_end = min(max(head_end, 0), len(content))
    tail_start = min(max(tail_start, head_end), len(content))
    while head_end > 0 and marker_re is not None and marker_re.search(content[:head_end] + content[tail_start:]):
        head_end -= 1
    return content[:head_end] + content[tail_start:]


def token_range(enc: Any, a: int, b: int, text_len: int) -> tuple[int, int]:
    """Tokens overlapping characters [a, b): (first, end), by O(1) lookups (offsets only if needed).

    A token overlaps [a, b) iff start < b and end > a (the straddling rule). The first such token is
    the first one holding character a; the end is just past the last token starting before b.

    >>> from prep.tokenizer import default_tokenizer
    >>> enc = default_tokenizer().backend_tokenizer.encode("ab<|im_end|>cd", add_special_tokens=False)
    >>> token_range(enc, 1, 4, 14)   # "b", then the special token holding characters 2-3
    (1, 3)
    """
    t0 = enc.char_to_token(a) if a < text_len else len(enc)
    if b >= text_len:
        t1 = len(enc)
    else:
        k = enc.char_to_token(b)
        t1 = None if k is None else (k + 1 if enc.token_to_chars(k)[0] < b else k)
    if t0 is None or t1 is None:
        return _token_range_from_offsets(enc, a, b)
    return t0, t1


def _token_range_from_offsets(enc: Any, a: int, b: int) -> tuple[int, int]:
    """`token_range` for characters that no token holds (e.g. removed by a normalizer)."""
    offsets = np.array(enc.offsets, dtype=np.int64).reshape(-1, 2)
    t0 = int(np.searchsorted(offsets[:, 1], a, side="right"))
    t1 = int(np.searchsorted(offsets[:, 0], b, side="left"))
    return t0, max(t0, t1)


def tokens_before(enc: Any, pos: int, text_len: int) -> int:
    """Number of tokens that start before character `pos`."""
    return token_range(enc, 0, pos, text_len)[1] if pos > 0 else 0
