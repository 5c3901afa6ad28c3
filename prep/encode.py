"""Conversations → exact token ids and label masks (`input_ids`, `labels`, `example_id` as a pa.Table).

How an example is built:
1. render once to `(text, spans)` (prep.render); content (or a tool call, or a tool definition) holding a
   special token or a role marker is rejected (`marker_in_content`); where a chat template renders a trained
   reply differently once later turns follow (Qwen3 dropping earlier reasoning), the conversation is expanded
   into one example per such reply (`expand_turns`);
2. tokenize the whole text once, in one batched call of the fast tokenizer (`add_special_tokens=False`:
   a BOS, where the tokenizer uses one, is already in the text), so the ids are exactly what the model
   sees at inference;
3. map the character spans of trained messages to token ranges (O(turns) lookups per example) and
   build all labels of the batch with numpy;
4. verify every example and reject (never write) one that fails.

Straddling rule: a token is trained iff its characters overlap a trained character, so every
character of a trained response (and its end-of-turn marker) is covered; a token that straddles the
prompt/response edge is trained. Labels are unshifted (HF convention), -100 where not trained, and
the first label of every example is -100.

>>> from schemas import Conversation, Message
>>> from prep.tokenizer import default_tokenizer
>>> from prep.render import BUILTIN_TEMPLATES
>>> tok = default_tokenizer()
>>> conv = Conversation(id="c1", messages=[Message(role="user", content="Hi"),
...                                        Message(role="assistant", content="Yo")])
>>> res = Encoder(tok, BUILTIN_TEMPLATES["chatml"]).encode([conv])
>>> row = res.table.to_pylist()[0]
>>> tok.decode([t for t, l in zip(row["input_ids"], row["labels"]) if l != -100])
'Yo<|im_end|>'
"""

from __future__ import annotations

import gc
import itertools
import re
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, get_args

import numpy as np
import pyarrow as pa
from pydantic_core import to_json as _to_json

from prep.contract import IGNORE_INDEX
from prep.errors import ConfigError
from prep.overflow import Piece, Splitter, TooLong, token_range
from prep.render import Rendered, RenderFailure, Template, render_batch, special_token_regex, special_token_strings
from prep.slicing import Joints, SlicedEncoding, Whole, find_cut, joints_of, tail_fits
from prep.token_bytes import ByteTable
from prep.tokenizer import adds_bos
from prep.turns import expansion
from schemas.conversation import Conversation, Message
from schemas.pack_config import MIN_MAX_LEN, ExpandTurns, Overflow, TrainOn
from schemas.reject import ErrorDetail, Reject

TRAIN_ON: tuple[str, ...] = get_args(TrainOn)
OVERFLOW: tuple[str, ...] = get_args(Overflow)
EXPAND_TURNS: tuple[str, ...] = get_args(ExpandTurns)
_UNSET = object()
ENCODED_SCHEMA = pa.schema(
    [("input_ids", pa.list_(pa.int32())), ("labels", pa.list_(pa.int32())), ("example_id", pa.string())]
)
COUNT_KEYS = (
    "conversations",
    "examples",
    "tokens",
    "trained_tokens",
    "extra_pieces",
    "pieced_conversations",
    "truncated",
    "dropped",
    "rejected",
    "template_dropped_message",
    "template_dropped_reasoning",
    "template_dropped_content",
    "tool_call_ids_generated",
    "expanded",
    "expanded_conversations",
    "pieces_sliced",
    "pieces_tokenized",
)


@dataclass
class EncodeResult:
    """What `Encoder.encode` returns.

    Attributes:
        table: one row per written example, columns `input_ids` and `labels` (list<int32>, same length)
            and `example_id` (the conversation id; `id#k` for the k-th piece of a split conversation).
        counts: conversations (in), examples (written), tokens, trained_tokens, extra_pieces (extra examples
            made by splitting over-long conversations into pieces), pieced_conversations, truncated, dropped (too long under the overflow
            policy), rejected (failed a check), template_dropped_message (messages a chat template did
            not render), template_dropped_reasoning (replies whose folded reasoning a chat template left
            out), template_dropped_content (tool-call messages whose content a chat template did not render,
            only their calls), tool_call_ids_generated (call ids prep made for a template that needs them),
            expanded (extra examples made by expanding conversations into one example per reply, see
            `expand_turns`), expanded_conversations, pieces_sliced / pieces_tokenized (split pieces, at every
            round of refinement, whose ids were cut from the whole conversation's by prep.slicing / tokenized
            on their own). Invariant: conversations + extra_pieces + expanded == examples + dropped + rejected.
        rejected: rejected examples by reason (drops are `counts["dropped"]`, reason `too_long`).
        rejects: one Reject (stage "pack") per dropped or rejected example.
    """

    table: pa.Table
    counts: dict[str, int]
    rejected: dict[str, int]
    rejects: list[Reject]


@dataclass
class _Item:
    """One example being built: a whole conversation or one piece of it."""

    conv_index: int
    conv: Conversation
    messages: list[Message]
    flags: list[bool]  # trained per message, policy and overrides resolved
    piece: int = 0  # order among the examples of its conversation (first new exchange, or expansion end)
    truncated: bool = False
    rendered: Rendered | None = None
    enc: Any = None  # tokenizers.Encoding, or a SlicedEncoding for a split piece


@dataclass
class _Outcome:
    """The fate of one example: written (row into the built arrays) or not (reason, field, message)."""

    conv_index: int
    piece: int
    row: int = -1
    reason: str = ""
    field: str = ""
    message: str = ""
    truncated: bool = False


@dataclass
class _Job:
    """A batch between rendering and building: its conversations, the rendered items waiting for their
    encodings, and the outcomes so far (markers found, render failures)."""

    conversations: Sequence[Conversation]
    items: list[_Item]
    outcomes: list[_Outcome]
    counts: Counter


@dataclass
class _Overlong:
    """An over-long conversation being split: its item, its splitter, and (when slicing is on) the whole
    conversation that pieces are cut from."""

    item: _Item
    splitter: Splitter
    whole: Whole | None


@dataclass
class _Built:
    """Examples built in one round: flat ids/labels, lengths, and their outcomes."""

    ids: list[np.ndarray] = field(default_factory=list)
    labels: list[np.ndarray] = field(default_factory=list)
    lengths: list[np.ndarray] = field(default_factory=list)
    rows: int = 0


def trained_flags(messages: Sequence[Message], train_on: str) -> list[bool]:
    """Which messages carry a loss: `Message.train` when set, else the `train_on` policy.

    completion: every assistant turn; last: only the final assistant turn; all: every message.
    System prompts are trained only under `all` (or with `train=True`).

    >>> from schemas import Message
    >>> msgs = [Message(role="system", content="s"), Message(role="user", content="u"),
    ...         Message(role="assistant", content="a"), Message(role="user", content="u", train=True),
    ...         Message(role="assistant", content="b")]
    >>> trained_flags(msgs, "last")
    [False, False, False, True, True]
    """
    last = max((i for i, m in enumerate(messages) if m.role == "assistant"), default=-1)
    flags = []
    for i, m in enumerate(messages):
        if m.train is not None:
            flags.append(m.train)
        elif train_on == "all":
            flags.append(True)
        else:
            flags.append(m.role == "assistant" and (train_on == "completion" or i == last))
    return flags


class Encoder:
    """Turns conversations into exact `input_ids` and `labels` for one tokenizer, template and policy.

    Args:
        tokenizer: a fast tokenizer (prep.tokenizer.load_tokenizer).
        template: a Template (prep.render.load_template).
        train_on: "completion" (every assistant turn with its end marker), "last" (the final one),
            "all" (every token).
        max_len: the longest example, in tokens.
        overflow: what to do with a longer one: "split" (at turn boundaries, see prep.overflow),
            "truncate" (keep the first max_len tokens) or "drop".
        verify: check every example (leave on; off only to measure its cost).
        slicing: take a split piece's ids from the whole conversation's where prep.slicing proves that
            exact (the same ids and labels as tokenizing the piece); False tokenizes every piece again.
        expand_turns: "auto" (a conversation whose chat template renders a trained reply differently once
            later turns follow, dropping its reasoning or rewriting its tool call, becomes one example per such
            reply, each with the turns before it as masked context, plus one for the rest), "off" (train what
            the whole render shows; a rewritten tool call is rejected), "all" (one example per trained reply).

    Raises:
        ConfigError: an unknown policy, a bad max_len, or a template that needs an EOS the tokenizer lacks.

    >>> from prep.tokenizer import default_tokenizer
    >>> from prep.render import BUILTIN_TEMPLATES
    >>> Encoder(default_tokenizer(), BUILTIN_TEMPLATES["markers"], train_on="some")
    Traceback (most recent call last):
    prep.errors.ConfigError: --train-on 'some': expected one of completion, last, all
    """

    def __init__(
        self,
        tokenizer: Any,
        template: Template,
        train_on: str = "completion",
        max_len: int = 2048,
        overflow: str = "split",
        verify: bool = True,
        slicing: bool = True,
        expand_turns: str = "auto",
    ):
        _check_choice("--train-on", train_on, TRAIN_ON)
        _check_choice("--overflow", overflow, OVERFLOW)
        _check_choice("--expand-turns", expand_turns, EXPAND_TURNS)
        if not isinstance(max_len, int) or max_len < MIN_MAX_LEN:
            raise ConfigError(f"--max-len {max_len!r}: expected an integer >= {MIN_MAX_LEN}")
        if template.append_eos and not tokenizer.eos_token:
            raise ConfigError(f"template {template.name!r} appends EOS, but the tokenizer has no eos_token")
        self.tokenizer, self.template = tokenizer, template
        self.train_on, self.max_len, self.overflow, self.verify = train_on, max_len, overflow, verify
        self.expand_turns = expand_turns if train_on != "all" else "off"  # under `all` every token is trained once
        self._backend = tokenizer.backend_tokenizer
        self._specials = special_token_strings(tokenizer)
        self._special_ids = {s: tokenizer.convert_tokens_to_ids(s) for s in self._specials}
        self._special_re = special_token_regex(self._specials)
        self._marker_re = special_token_regex(tuple(dict.fromkeys((*self._specials, *template.role_markers()))))
        self._bos_id = tokenizer.bos_token_id if adds_bos(tokenizer) else None
        self._bos_text = tokenizer.bos_token if (self._bos_id is not None and not template.uses_chat_template) else ""
        self._end_ids: dict[str, int] = {}
        self._normalizer = self._backend.normalizer
        self._joints = joints_of(tokenizer) if slicing else Joints(reason="slicing is off")
        self._byte_table: Any = _UNSET  # built at the first check (prep.token_bytes)

    # ----------------------------------------------------------------------------------------------
    # Public

    def encode(self, conversations: Sequence[Conversation]) -> EncodeResult:
        """Encode a batch of conversations (deterministic: the same input gives an identical table).

        Args:
            conversations: the batch (`prep pack` sends up to --batch-size conversations and --batch-bytes of text).

        Returns:
            EncodeResult(table, counts, rejected, rejects).
        """
        with _gc_paused():
            job = self._prepare(conversations)
            return self._finish(job, self._tokenize(job))

    def encode_stream(self, batches: Iterable[Sequence[Conversation]]) -> Iterator[EncodeResult]:
        """`encode` of every batch, in order, with tokenizing overlapped: each batch is tokenized in a
        background thread (the tokenizer releases the GIL) while the previous batch is finished (labels,
        checks, splitting), the caller takes its result, and the next batch is read and rendered. The
        results are the same as `encode`'s; at most three batches are in memory at once.

        >>> from prep.tokenizer import default_tokenizer
        >>> from prep.render import BUILTIN_TEMPLATES
        >>> from schemas import Conversation, Message
        >>> convs = [Conversation(id=str(i), messages=[Message(role="user", content="Hi"),
        ...                                            Message(role="assistant", content="Yo" * i)]) for i in (1, 2)]
        >>> encoder = Encoder(default_tokenizer(), BUILTIN_TEMPLATES["chatml"])
        >>> [r.counts["tokens"] for r in encoder.encode_stream([convs[:1], convs[1:]])]  # byte-level: 1 token a byte
        [24, 26]
        """
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(1, thread_name_prefix="prep-tokenize") as pool:
            waiting = None
            for conversations in batches:
                with _gc_paused():
                    job = self._prepare(conversations)
                tokenizing = pool.submit(self._tokenize, job)
                if waiting is not None:
                    yield self._finished(*waiting)
                waiting = (job, tokenizing)
            if waiting is not None:
                yield self._finished(*waiting)

    def _finished(self, job: _Job, tokenizing: Any) -> EncodeResult:
        """The result of a job once its tokenizing (a Future) is done."""
        encodings = tokenizing.result()
        with _gc_paused():
            return self._finish(job, encodings)

    def _prepare(self, conversations: Sequence[Conversation]) -> _Job:
        """Check for markers, expand where asked, and render: a job waiting for its encodings."""
        outcomes: list[_Outcome] = []
        counts = Counter(dict.fromkeys(COUNT_KEYS, 0))
        counts["conversations"] = len(conversations)
        items = self._accept_markers(conversations, outcomes)
        if self.expand_turns == "all":
            kept = [[f and m.role != "assistant" for f, m in zip(it.flags, it.messages)] for it in items]
            items = self._expand(items, kept, counts)
        return _Job(conversations, self._render(items, outcomes, counts), outcomes, counts)

    def _tokenize(self, job: _Job) -> list[Any]:
        """The encodings of a job's rendered texts: one batched call of the Rust tokenizer (thread-safe)."""
        return self._backend.encode_batch([it.rendered.text for it in job.items], add_special_tokens=False)

    def _finish(self, job: _Job, encodings: list[Any]) -> EncodeResult:
        """Build what fits, handle what overflows (truncate, drop or split), and assemble the result."""
        outcomes, built, counts = job.outcomes, _Built(), job.counts
        fitting, overflowing = [], []
        for item, enc in zip(job.items, encodings):
            item.enc = enc
            (fitting if len(enc) <= self.max_len else overflowing).append(item)
        overlong = []
        for item in overflowing:
            if self.overflow == "truncate":
                item.truncated = True
                fitting.append(item)
            elif self.overflow == "drop":
                outcomes.append(self._too_long(item, TooLong(len(item.enc))))
            else:
                overlong.append(self._overlong(item))
        self._build(fitting, built, outcomes, counts)
        self._split(overlong, built, outcomes, counts)
        return self._result(job.conversations, outcomes, built, counts)

    def _accept_markers(self, conversations: Sequence[Conversation], outcomes: list[_Outcome]) -> list[_Item]:
        """Items for the conversations whose content holds no marker; `marker_in_content` for the rest."""
        items = []
        for index, conv in enumerate(conversations):
            hit = self._find_marker(conv.messages, conv.tools)
            if hit is not None:
                outcomes.append(_Outcome(index, 0, reason="marker_in_content", field=hit[0], message=hit[1]))
            else:
                items.append(_Item(index, conv, list(conv.messages), trained_flags(conv.messages, self.train_on)))
        return items

    # ----------------------------------------------------------------------------------------------
    # Checks before tokenizing

    def _find_marker(self, messages: Sequence[Message], tools: list[dict[str, Any]] | None = None
                     ) -> tuple[str, str] | None:
        """(field, message) for the first content, tool call or tool definition holding a special token or role
        marker, else None."""
        if self._marker_re is None:
            return None
        texts = itertools.chain.from_iterable(_texts(i, m) for i, m in enumerate(messages))
        if tools:
            texts = itertools.chain(texts, [("tools", _to_json(tools).decode())])
        for where, text in texts:
            match = self._marker_re.search(text)
            if match is not None:
                excerpt = text[max(0, match.start() - 30) : match.end() + 30]
                return where, f"contains the marker {match.group()!r}: ...{excerpt!r}..."
        return None

    # ----------------------------------------------------------------------------------------------
    # Render + tokenize (one batched tokenizer call)

    def _render(self, items: list[_Item], outcomes: list[_Outcome], counts: Counter | None = None) -> list[_Item]:
        """Render `items` in one call; return those rendered (`item.rendered` set), in order; failures go to
        `outcomes`.

        With `counts` (the first rendering of whole conversations), a conversation that needs expanding
        (`expand_turns` auto) is replaced by its expansion (counted), rendered in a second call.
        """
        rendered = render_batch(
            [it.messages for it in items],
            self.template,
            self.tokenizer,
            bos=self._bos_text,
            eos=self.tokenizer.eos_token,
            special_tokens=self._specials,
            tools=[it.conv.tools for it in items],
        )
        ready, unstable, kept = [], [], []
        for item, out in zip(items, rendered):
            if isinstance(out, RenderFailure):
                outcomes.append(_Outcome(item.conv_index, item.piece, -1, out.reason, out.field, out.message))
                continue
            shifted = self._unstable(item, out) if counts is not None and self.expand_turns == "auto" else set()
            if shifted:
                unstable.append(item)
                kept.append([f and i not in shifted for i, f in enumerate(item.flags)])
                continue
            failure = self._check_dropped(item, out)
            if failure is not None:
                outcomes.append(failure)
                continue
            item.rendered = out
            ready.append(item)
        if unstable:
            ready += self._render(self._expand(unstable, kept, counts), outcomes)  # type: ignore[arg-type]
        return ready

    def _check_dropped(self, item: _Item, rendered: Rendered) -> _Outcome | None:
        """Reject an example whose chat template did not render one of its trained replies, or renders one of its
        trained tool calls differently once later turns follow (`--expand-turns auto` trains those).

        Other messages the template drops (mistral's system prompt) are counted when built."""
        for i in rendered.dropped:
            if item.flags[i] and item.messages[i].role == "assistant":
                msg = "the chat template did not render this trained assistant message"
                return _Outcome(item.conv_index, item.piece, -1, "template_dropped_message", f"messages[{i}]", msg)
        for i in rendered.rewritten:
            if item.flags[i]:
                msg = ("the chat template renders this tool call differently once later turns follow, so its text "
                       "in the conversation is not what the model writes at inference; --expand-turns auto trains "
                       "it in an example of its own")
                return _Outcome(item.conv_index, item.piece, -1, "template_rewrites_turn", f"messages[{i}]", msg)
        return None

    def _unstable(self, item: _Item, rendered: Rendered) -> set[int]:
        """Trained replies the chat template renders differently once later turns follow: their reasoning left
        out, or (tool calls) their text not found."""
        return {i for i in (*rendered.rewritten, *rendered.reasoning_dropped) if item.flags[i]}

    def _expand(self, items: list[_Item], kept: list[list[bool]], counts: Counter) -> list[_Item]:
        """Each item as its expansion (prep.turns.expansion): one example per reply that needs its own (the
        messages up to it, only it trained), plus the conversation with what stays trained (`kept`)."""
        out = []
        for item, kept_flags in zip(items, kept):
            pieces = expansion(item.flags, kept_flags)
            counts["expanded"] += len(pieces) - 1
            counts["expanded_conversations"] += len(pieces) > 1
            out += [_Item(item.conv_index, item.conv, item.messages[:end], flags, piece=end) for end, flags in pieces]
        return out

    # ----------------------------------------------------------------------------------------------
    # Labels: character spans → token ranges → numpy masks, then verification

    def _build(self, items: list[_Item], built: _Built, outcomes: list[_Outcome], counts: Counter) -> None:
        """Build labels for `items` (all tokenized), verify them, and append the good ones to `built`."""
        if not items:
            return
        counts["template_dropped_message"] += sum(len(it.rendered.dropped) for it in items)
        counts["template_dropped_reasoning"] += sum(len(it.rendered.reasoning_dropped) for it in items)
        counts["template_dropped_content"] += sum(len(it.rendered.content_dropped) for it in items)
        counts["tool_call_ids_generated"] += sum(it.rendered.ids_generated for it in items)
        id_lists = [it.enc.ids[: self.max_len] if it.truncated else it.enc.ids for it in items]
        lengths = np.fromiter(map(len, id_lists), dtype=np.int64, count=len(items))
        starts = np.concatenate(([0], np.cumsum(lengths)))
        flat_ids = np.fromiter(itertools.chain.from_iterable(id_lists), dtype=np.int32, count=int(starts[-1]))
        ranges, checks = [], []
        for k, item in enumerate(items):
            self._item_ranges(k, item, int(lengths[k]), ranges, checks)
        trained = _cover(ranges, starts)
        trained[starts[:-1]] = False  # the first label of every example
        failures = self._verify(id_lists, flat_ids, trained, starts, checks) if self.verify else {}
        keep = self._record(items, failures, np.add.reduceat(trained.astype(np.int64), starts[:-1]), built, outcomes)
        labels = np.where(trained, flat_ids, np.int32(IGNORE_INDEX)).astype(np.int32, copy=False)
        if not keep.all():
            token_keep = np.repeat(keep, lengths)
            flat_ids, labels = flat_ids[token_keep], labels[token_keep]
        built.ids.append(flat_ids)
        built.labels.append(labels)
        built.lengths.append(lengths[keep])

    def _record(
        self, items: list[_Item], failures: dict, trained_counts: np.ndarray, built: _Built, outcomes: list[_Outcome]
    ) -> np.ndarray:
        """One outcome per item (written, or rejected with its first failure); return the keep mask."""
        keep = np.ones(len(items), dtype=bool)
        for k, item in enumerate(items):
            failure = failures.get(k)
            if failure is None and trained_counts[k] == 0:
                failure = ("no_trained_tokens", "messages", "no token of this example carries a loss")
            if failure is not None:
                keep[k] = False
                outcomes.append(_Outcome(item.conv_index, item.piece, -1, *failure))
            else:
                outcomes.append(_Outcome(item.conv_index, item.piece, built.rows, truncated=item.truncated))
                built.rows += 1
        return keep

    def _item_ranges(self, k: int, item: _Item, length: int, ranges: list, checks: list) -> None:
        """Append the trained token ranges of example `k` and one check per trained message span.

        ranges: (example, t0, t1); checks: (example, t0, t1, message index, expected text, end id).
        """
        text, enc, spans = item.rendered.text, item.enc, item.rendered.spans
        for a, b in self._trained_regions(item):
            t0, t1 = token_range(enc, a, b, len(text))
            if t0 < min(t1, length):
                ranges.append((k, t0, min(t1, length)))
        for span in spans:
            if not item.flags[span.message] or span.stop <= span.start:
                continue
            t0, t1 = token_range(enc, span.start, span.stop, len(text))
            if t1 > length:
                continue  # cut off by truncation: nothing to check
            is_reply = item.messages[span.message].role == "assistant"
            end_id = self._end_token_id(text[span.end : span.stop]) if is_reply else -1
            checks.append((k, t0, t1, span.message, text[span.start : span.stop], end_id, is_reply))

    def _trained_regions(self, item: _Item) -> list[tuple[int, int]]:
        """Trained character ranges, sorted and disjoint.

        completion/last: `[content start, end of end-of-turn)` of each trained message; all: the whole
        text except the turns (from the previous message's end of turn) of untrained messages.
        """
        spans = item.rendered.spans
        if self.train_on != "all":
            return [(s.start, s.stop) for s in spans if item.flags[s.message] and s.stop > s.start]
        regions, pos, prev_stop = [], 0, 0
        for s in spans:
            if not item.flags[s.message]:
                if prev_stop > pos:
                    regions.append((pos, prev_stop))
                pos = s.stop
            prev_stop = s.stop
        if len(item.rendered.text) > pos:
            regions.append((pos, len(item.rendered.text)))
        return regions

    def _end_token_id(self, end_text: str) -> int:
        """Id of the special token that ends `end_text` (the end-of-turn marker or EOS), else -1."""
        if end_text not in self._end_ids:
            matches = list(self._special_re.finditer(end_text)) if self._special_re else []
            last = matches[-1] if matches else None
            self._end_ids[end_text] = self._special_ids[last.group()] if last and last.end() == len(end_text) else -1
        return self._end_ids[end_text]

    def _verify(
        self, id_lists: list[list[int]], flat_ids: np.ndarray, trained: np.ndarray, starts: np.ndarray, checks: list
    ) -> dict[int, tuple[str, str, str]]:
        """Check every example; return {example: (reason, field, message)} for those that fail.

        Checks: one BOS at the start where the tokenizer uses one; every token of a trained message's
        span is trained; an assistant turn ends with its end-of-turn special token (where the marker
        is one; a chat-template reply must have one); the trained tokens decode to text that contains
        the message content plus its end marker.
        """
        failures = self._check_bos(flat_ids, starts)
        if not checks:
            return failures
        example, t0, t1, message, expected, end_id, is_reply = (list(c) for c in zip(*checks))
        example, end_id = np.array(example, dtype=np.int64), np.array(end_id, dtype=np.int64)
        g0, g1 = starts[example] + np.array(t0), starts[example] + np.array(t1)
        g0 = np.maximum(g0, starts[example] + 1)  # the first token of an example is never trained
        csum = np.concatenate(([0], np.cumsum(trained, dtype=np.int64)))
        span_ok = (csum[g1] - csum[g0]) == (g1 - g0)
        end_ok = (end_id < 0) | (flat_ids[np.maximum(g1 - 1, 0)] == end_id)
        end_missing = np.array(is_reply) & (end_id < 0) & self.template.uses_chat_template
        decodes = self._decode_check(id_lists, flat_ids, starts, example, t0, t1, expected)
        for c, k in enumerate(example.tolist()):
            if k in failures:
                continue
            where = f"messages[{message[c]}]"
            if not span_ok[c]:
                failures[k] = ("mask_mismatch", where, "a token of this trained message is not trained")
            elif end_missing[c]:
                failures[k] = ("no_end_of_turn_token", where, "no special token ends this assistant turn")
            elif not end_ok[c]:
                failures[k] = ("end_token_mismatch", where, "the last trained token is not the end-of-turn token")
            elif not decodes[c]:
                failures[k] = ("decode_mismatch", where, "the trained tokens do not decode to the content + end marker")
        return failures

    def _check_bos(self, flat_ids: np.ndarray, starts: np.ndarray) -> dict[int, tuple[str, str, str]]:
        """Failures of examples that do not hold exactly one BOS, at the start (where the tokenizer uses one)."""
        if self._bos_id is None:
            return {}
        bos_counts = np.add.reduceat((flat_ids == self._bos_id).astype(np.int64), starts[:-1])
        first_ok = flat_ids[starts[:-1]] == self._bos_id
        return {
            int(k): ("bos_count", "messages", f"expected exactly one BOS at the start, found {int(bos_counts[k])}")
            for k in np.flatnonzero((bos_counts != 1) | ~first_ok)
        }

    def _decode_check(self, id_lists: list[list[int]], flat_ids: np.ndarray, starts: np.ndarray, example: np.ndarray,
                      t0: list[int], t1: list[int], expected: list[str]) -> list[bool]:
        """Per check: its tokens [t0, t1) decode to text that holds `expected`. By table lookup over the whole
        batch where the tokenizer is byte-level (prep.token_bytes), else with `decode_batch`."""
        if self._byte_table is _UNSET:
            self._byte_table = ByteTable.of(self.tokenizer)
        if self._byte_table is None:
            slices = [id_lists[e][a:b] for e, a, b in zip(example.tolist(), t0, t1)]
            decoded = self._backend.decode_batch(slices, skip_special_tokens=False)
            return [self._decodes_to(e, d) for e, d in zip(expected, decoded)]
        buffer, offsets = self._byte_table.decode_ranges(flat_ids, starts[example] + t0, starts[example] + t1)
        bounds = offsets.tolist()
        return [self._bytes_hold(buffer, text, bounds[c], bounds[c + 1]) for c, text in enumerate(expected)]

    def _bytes_hold(self, buffer: bytes, expected: str, start: int, end: int) -> bool:
        """`expected` is in buffer[start:end] (UTF-8), as is or as the tokenizer's normalizer sees it."""
        if buffer.find(expected.encode(), start, end) >= 0:
            return True
        return self._normalizer is not None and buffer.find(self._normalizer.normalize_str(expected).encode(),
                                                            start, end) >= 0

    def _decodes_to(self, expected: str, decoded: str) -> bool:
        """`expected` (content + end marker) is in `decoded`, as the tokenizer's normalizer (e.g. NFC) sees it.

        A space is put in front of `decoded`: SentencePiece-style decoders drop a leading one.
        """
        decoded = " " + decoded
        if expected in decoded:
            return True
        return self._normalizer is not None and self._normalizer.normalize_str(expected) in decoded

    # ----------------------------------------------------------------------------------------------
    # Overflow: split at turn boundaries

    def _overlong(self, item: _Item) -> _Overlong:
        """An over-long conversation, ready to be split."""
        splitter = Splitter(item.messages, item.flags, item.rendered, item.enc, self.max_len, self._marker_re)
        whole = Whole(item.rendered, item.enc, self._joints) if self._joints.tokens else None
        return _Overlong(item, splitter, whole)

    def _split(self, overlong: list[_Overlong], built: _Built, outcomes: list[_Outcome], counts: Counter) -> None:
        """Refine the pieces of every over-long conversation in rounds: one render and at most two tokenizer
        calls per round, for the pieces (and piece tails) that cannot be cut from their conversation's ids."""
        pending = [(o, p) for o in overlong for p in o.splitter.plan()]
        for o in overlong:
            if not o.splitter.has_trained_turn():
                outcomes.append(_Outcome(o.item.conv_index, 0, -1, "no_trained_tokens", "messages", "no trained turn"))
        while pending:
            items = [self._piece_item(o, p) for o, p in pending]
            rendered = {id(it) for it in self._render(items, outcomes)}
            ready = [(o, p, it) for (o, p), it in zip(pending, items) if id(it) in rendered]
            sliced = self._encode_pieces(ready)
            counts["pieces_sliced"] += sliced
            counts["pieces_tokenized"] += len(ready) - sliced
            fitting, pending = [], []
            for o, p, item in ready:
                if len(item.enc) <= self.max_len:
                    fitting.append(item)
                    continue
                refined = o.splitter.refine(p, item.rendered, item.enc)
                if isinstance(refined, TooLong):
                    outcomes.append(self._too_long(item, refined))
                else:
                    pending += [(o, q) for q in refined]
            self._build(fitting, built, outcomes, counts)

    def _piece_item(self, o: _Overlong, piece: Piece) -> _Item:
        """A piece as an item: its messages with explicit train flags (context False, new turns as trained)."""
        messages = o.splitter.piece_messages(piece)
        flags = [bool(m.train) for m in messages]
        return _Item(o.item.conv_index, o.item.conv, messages, flags, piece.new, piece.user_content is not None)

    def _encode_pieces(self, ready: list[tuple[_Overlong, Piece, _Item]]) -> int:
        """Set every rendered piece's encoding: cut from its conversation's where provably exact, else tokenized.
        Returns how many were cut."""
        cuts, tails, again = [], [], []
        for o, p, item in ready:
            cut = None
            if o.whole is not None and p.user_content is None:
                last = len(item.messages) - 1
                first = 0 if o.splitter.system is None else 1
                cut = find_cut(o.whole, item.rendered, (first, o.splitter.whole_index(p, first)),
                               (last, o.splitter.whole_index(p, last)))
            if cut is None:
                again.append(item)
            elif cut.tail < len(item.rendered.text):
                tails.append((o, cut, item))
            else:
                cuts.append((o, cut, item))
        tail_encodings = self._backend.encode_batch([it.rendered.text[c.tail :] for _, c, it in tails],
                                                    add_special_tokens=False) if tails else []
        for (o, cut, item), tail in zip(tails, tail_encodings):
            if tail_fits(tail, cut.tail_joint, self._joints):
                item.enc = SlicedEncoding(o.whole, cut, tail)
            else:
                again.append(item)
        for o, cut, item in cuts:
            item.enc = SlicedEncoding(o.whole, cut)
        for item, enc in zip(again, self._backend.encode_batch([it.rendered.text for it in again],
                                                               add_special_tokens=False)):
            item.enc = enc
        return len(ready) - len(again)

    def _too_long(self, item: _Item, too_long: TooLong) -> _Outcome:
        """The outcome of an example dropped for length."""
        return _Outcome(item.conv_index, item.piece, -1, "too_long", "messages", too_long.message(self.max_len))

    # ----------------------------------------------------------------------------------------------
    # Assembly

    def _result(
        self, conversations: Sequence[Conversation], outcomes: list[_Outcome], built: _Built, counts: Counter
    ) -> EncodeResult:
        """Order the outcomes (conversation, piece), name the examples, build the table and rejects."""
        outcomes.sort(key=lambda o: (o.conv_index, o.piece))
        pieces = Counter(o.conv_index for o in outcomes)
        ids_flat = np.concatenate(built.ids) if built.ids else np.zeros(0, np.int32)
        labels_flat = np.concatenate(built.labels) if built.labels else np.zeros(0, np.int32)
        lengths = np.concatenate(built.lengths) if built.lengths else np.zeros(0, np.int64)
        rows, names, rejects = [], [], []
        seen: Counter = Counter()
        rejected: Counter = Counter()
        for o in outcomes:
            conv = conversations[o.conv_index]
            name = f"{conv.id}#{seen[o.conv_index]}" if pieces[o.conv_index] > 1 else conv.id
            seen[o.conv_index] += 1
            if o.row >= 0:
                rows.append(o.row)
                names.append(name)
                counts["truncated"] += o.truncated
                continue
            rejects.append(_reject(conv, name, o))
            if o.reason == "too_long":
                counts["dropped"] += 1
            else:
                rejected[o.reason] += 1
        for n in pieces.values():
            counts["extra_pieces"] += n - 1
            counts["pieced_conversations"] += n > 1
        table = _table(ids_flat, labels_flat, lengths, np.array(rows, dtype=np.int64), names)
        counts["examples"] = table.num_rows
        counts["tokens"] = int(lengths.sum())
        counts["trained_tokens"] = int(np.count_nonzero(labels_flat != IGNORE_INDEX))
        counts["rejected"] = sum(rejected.values())
        return EncodeResult(table, dict(counts), dict(sorted(rejected.items())), rejects)


# --------------------------------------------------------------------------------------------------
# Helpers


def _check_choice(flag: str, value: str, valid: tuple[str, ...]) -> None:
    """ConfigError listing the valid values when `value` is not one of them."""
    if value not in valid:
        raise ConfigError(f"{flag} {value!r}: expected one of {', '.join(valid)}")


def _texts(i: int, m: Message) -> Iterator[tuple[str, str]]:
    """(field, text) of everything of message `i` a template prints: content, tool calls, name, call id."""
    yield f"messages[{i}].content", m.content
    for j, c in enumerate(m.tool_calls or ()):
        yield f"messages[{i}].tool_calls[{j}]", _to_json([c.id, c.name, c.arguments]).decode()
    for key in ("name", "tool_call_id"):
        value = getattr(m, key)
        if value is not None:
            yield f"messages[{i}].{key}", value


def _cover(ranges: list[tuple[int, int, int]], starts: np.ndarray) -> np.ndarray:
    """Boolean mask over all tokens of the batch: True inside any (example, t0, t1) range."""
    total = int(starts[-1])
    if not ranges:
        return np.zeros(total, dtype=bool)
    example, t0, t1 = (np.array(c, dtype=np.int64) for c in zip(*ranges))
    base = starts[example]
    depth = np.bincount(base + t0, minlength=total + 1) - np.bincount(base + t1, minlength=total + 1)
    return np.cumsum(depth[:total]) > 0


def _table(ids: np.ndarray, labels: np.ndarray, lengths: np.ndarray, rows: np.ndarray, names: list[str]) -> pa.Table:
    """The output table, examples in `rows` order (a vectorized ragged gather)."""
    starts = np.concatenate(([0], np.cumsum(lengths)))
    if len(rows) != len(lengths) or np.any(rows != np.arange(len(rows))):
        picked = lengths[rows]
        new_starts = np.concatenate(([0], np.cumsum(picked)))
        index = np.arange(new_starts[-1]) - np.repeat(new_starts[:-1] - starts[rows], picked)
        ids, labels, starts = ids[index], labels[index], new_starts
    offsets = pa.array(starts.astype(np.int32), type=pa.int32())
    return pa.Table.from_arrays(
        [
            pa.ListArray.from_arrays(offsets, pa.array(ids, type=pa.int32())),
            pa.ListArray.from_arrays(offsets, pa.array(labels, type=pa.int32())),
            pa.array(names, type=pa.string()),
        ],
        schema=ENCODED_SCHEMA,
    )


def _reject(conv: Conversation, name: str, outcome: _Outcome) -> Reject:
    """The Reject record of an example that was not written."""
    source = conv.source
    return Reject(
        path=source.path if source else "",
        line=source.line if source else 0,
        stage="pack",
        reason=outcome.reason,
        errors=[ErrorDetail(field=outcome.field, message=outcome.message)],
        format=source.format if source else None,
        id=name,
    )


@contextmanager
def _gc_paused() -> Iterator[None]:
    """Pause the cyclic GC: millions of short-lived int lists would trigger useless full collections."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()
