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
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
from pydantic_core import to_json as _to_json

from prep.errors import ConfigError
from prep.render import Rendered, RenderFailure, Template, render_batch, special_token_regex, special_token_strings
from prep.turns import exchanges, expansion
from prep.tokenizer import adds_bos
from schemas.conversation import Conversation, Message
from schemas.reject import ErrorDetail, Reject

TRAIN_ON = ("completion", "last", "all")
OVERFLOW = ("split", "truncate", "drop")
EXPAND_TURNS = ("auto", "off", "all")
IGNORE_INDEX = -100
ENCODED_SCHEMA = pa.schema(
    [("input_ids", pa.list_(pa.int32())), ("labels", pa.list_(pa.int32())), ("example_id", pa.string())]
)
COUNT_KEYS = (
    "conversations",
    "examples",
    "tokens",
    "trained_tokens",
    "split",
    "split_conversations",
    "truncated",
    "dropped",
    "rejected",
    "template_dropped_message",
    "template_dropped_reasoning",
    "template_dropped_content",
    "tool_call_ids_generated",
    "expanded",
    "expanded_conversations",
)


@dataclass
class EncodeResult:
    """What `Encoder.encode` returns.

    Attributes:
        table: one row per written example, columns `input_ids` and `labels` (list<int32>, same length)
            and `example_id` (the conversation id; `id#k` for the k-th piece of a split conversation).
        counts: conversations (in), examples (written), tokens, trained_tokens, split (extra examples
            made by splitting), split_conversations, truncated, dropped (too long under the overflow
            policy), rejected (failed a check), template_dropped_message (messages a chat template did
            not render), template_dropped_reasoning (replies whose folded reasoning a chat template left
            out), template_dropped_content (tool-call messages whose content a chat template did not render,
            only their calls), tool_call_ids_generated (call ids prep made for a template that needs them),
            expanded (extra examples made by expanding conversations into one example per reply, see
            `expand_turns`), expanded_conversations. Invariant: conversations + split + expanded == examples +
            dropped + rejected.
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
    piece: int = 0  # order among the pieces of its conversation (index of its first new turn pair)
    truncated: bool = False
    rendered: Rendered | None = None
    enc: Any = None  # tokenizers.Encoding


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
        overflow: what to do with a longer one: "split" (at turn boundaries, see `_Splitter`),
            "truncate" (keep the first max_len tokens) or "drop".
        verify: check every example (leave on; off only to measure its cost).
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
        expand_turns: str = "auto",
    ):
        _check_choice("--train-on", train_on, TRAIN_ON)
        _check_choice("--overflow", overflow, OVERFLOW)
        _check_choice("--expand-turns", expand_turns, EXPAND_TURNS)
        if not isinstance(max_len, int) or max_len < 2:
            raise ConfigError(f"--max-len {max_len!r}: expected an integer >= 2")
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

    # ----------------------------------------------------------------------------------------------
    # Public

    def encode(self, conversations: Sequence[Conversation]) -> EncodeResult:
        """Encode a batch of conversations (deterministic: the same input gives an identical table).

        Args:
            conversations: the batch (about 1k–8k conversations makes good use of the tokenizer).

        Returns:
            EncodeResult(table, counts, rejected, rejects).
        """
        with _gc_paused():
            return self._encode(conversations)

    def _encode(self, conversations: Sequence[Conversation]) -> EncodeResult:
        """`encode` without the GC pause: check, render + tokenize, build, then handle overflow."""
        outcomes: list[_Outcome] = []
        built = _Built()
        counts = Counter(dict.fromkeys(COUNT_KEYS, 0))
        counts["conversations"] = len(conversations)
        items = self._accept_markers(conversations, outcomes)
        if self.expand_turns == "all":
            kept = [[f and m.role != "assistant" for f, m in zip(it.flags, it.messages)] for it in items]
            items = self._expand(items, kept, counts)
        fitting, overflowing = self._render_and_tokenize(items, outcomes, counts)
        splitters = []
        for item in overflowing:
            if self.overflow == "truncate":
                item.truncated = True
                fitting.append(item)
            elif self.overflow == "drop":
                outcomes.append(_too_long(item, len(item.enc), self.max_len))
            else:
                splitters.append(_Splitter(item, self))
        self._build(fitting, built, outcomes, counts)
        self._split(splitters, built, outcomes, counts)
        return self._result(conversations, outcomes, built, counts)

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

    def _render_and_tokenize(self, items: list[_Item], outcomes: list[_Outcome],
                             counts: Counter | None = None) -> tuple[list[_Item], list[_Item]]:
        """Render and tokenize `items`; return (fitting, over max_len); failures go to `outcomes`.

        With `counts` (the first rendering of whole conversations), a conversation that needs expanding
        (`expand_turns` auto) is replaced by its expansion (counted), rendered in a second call.
        """
        ready = self._rendered(items, outcomes, counts)
        encodings = self._backend.encode_batch([it.rendered.text for it in ready], add_special_tokens=False)
        fitting, overflowing = [], []
        for item, enc in zip(ready, encodings):
            item.enc = enc
            (fitting if len(enc) <= self.max_len else overflowing).append(item)
        return fitting, overflowing

    def _rendered(self, items: list[_Item], outcomes: list[_Outcome], counts: Counter | None) -> list[_Item]:
        """Render `items` (one batched call); the ones that rendered and passed the checks, in order."""
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
            ready += self._rendered(self._expand(unstable, kept, counts), outcomes, None)  # type: ignore[arg-type]
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
        token_keep = np.repeat(keep, lengths)
        built.ids.append(flat_ids[token_keep])
        built.labels.append(np.where(trained, flat_ids, np.int32(IGNORE_INDEX)).astype(np.int32)[token_keep])
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
            t0, t1 = _token_range(enc, a, b, len(text))
            if t0 < min(t1, length):
                ranges.append((k, t0, min(t1, length)))
        for span in spans:
            if not item.flags[span.message] or span.stop <= span.start:
                continue
            t0, t1 = _token_range(enc, span.start, span.stop, len(text))
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
        slices = [id_lists[e][a:b] for e, a, b in zip(example.tolist(), t0, t1)]
        decoded = self._backend.decode_batch(slices, skip_special_tokens=False)
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
            elif not self._decodes_to(expected[c], decoded[c]):
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

    def _split(self, splitters: list[_Splitter], built: _Built, outcomes: list[_Outcome], counts: Counter) -> None:
        """Refine the pieces of every over-long conversation in rounds, one tokenizer call per round."""
        pending = [(s, p) for s in splitters for p in s.plan()]
        for s in splitters:
            if not s.has_trained_turn():
                outcomes.append(_Outcome(s.item.conv_index, 0, -1, "no_trained_tokens", "messages", "no trained turn"))
        while pending:
            items = [s.piece_item(p) for s, p in pending]
            fitting, overflowing = self._render_and_tokenize(items, outcomes)
            over = {id(it) for it in overflowing}
            next_pending = []
            for (s, p), item in zip(pending, items):
                if id(item) in over:
                    refined = s.refine(p, item)
                    if isinstance(refined, _Outcome):
                        outcomes.append(refined)
                    else:
                        next_pending += [(s, q) for q in refined]
            self._build(fitting, built, outcomes, counts)
            pending = next_pending

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
            counts["split"] += n - 1
            counts["split_conversations"] += n > 1
        table = _table(ids_flat, labels_flat, lengths, np.array(rows, dtype=np.int64), names)
        counts["examples"] = table.num_rows
        counts["tokens"] = int(lengths.sum())
        counts["trained_tokens"] = int(np.count_nonzero(labels_flat != IGNORE_INDEX))
        counts["rejected"] = sum(rejected.values())
        return EncodeResult(table, dict(counts), dict(sorted(rejected.items())), rejects)


class _Piece:
    """A piece of a split conversation, in turn pairs: context `[ctx, new)` (masked), new `[new, end)`.

    `user_content` replaces the first new user message when that one had to be truncated.
    """

    __slots__ = ("ctx", "new", "end", "user_content", "slack")

    def __init__(self, ctx: int, new: int, end: int):
        self.ctx, self.new, self.end = ctx, new, end
        self.user_content: str | None = None
        self.slack = 0


class _Splitter:
    """Cuts one over-long conversation at turn boundaries into pieces that each end with an assistant turn.

    Each piece starts with the system prompt and as much of the preceding conversation as fits (as
    masked context: train=False), then new turns, so every trained turn is trained in exactly one
    piece. Pieces are planned from the token counts of the whole conversation, then re-rendered and
    re-tokenized (exact); a piece still too long drops one more context pair, then gives up new pairs
    (they move to a piece of their own). A single pair that cannot fit alone is truncated on the prompt
    side: the middle of the user content is cut (its start, usually the instruction, and its end,
    closest to the reply, are kept; the system prompt and role markers stay), when the reply fits;
    otherwise the piece is dropped (too_long).
    """

    def __init__(self, item: _Item, encoder: Encoder):
        self.item, self.encoder, self.max_len = item, encoder, encoder.max_len
        messages, flags = item.messages, item.flags
        self.system = messages[0] if messages[0].role == "system" else None
        first = 1 if self.system is not None else 0
        self.pairs = exchanges(messages, first)  # a user turn and its reply (tool calls and results included)
        self.needed = [any(flags[i] for i in pair) for pair in self.pairs]
        self._estimate_costs()

    def has_trained_turn(self) -> bool:
        """Some pair holds a trained message."""
        return any(self.needed)

    def _estimate_costs(self) -> None:
        """Tokens per turn pair, the head (BOS, system prompt) and the tail, from the whole encoding."""
        enc, rendered = self.item.enc, self.item.rendered
        text_len = len(rendered.text)
        stops = {s.message: _tokens_before(enc, s.stop, text_len) for s in rendered.spans}
        first_start = rendered.spans[0].start if rendered.spans else 0
        head = _tokens_before(enc, first_start, text_len)
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

    def plan(self) -> list[_Piece]:
        """Greedy pieces: new pairs while they fit alone, then as much context as fits before them."""
        pieces = []
        j = self._next_needed(0)
        while j is not None:
            k = j + 1
            while k < len(self.pairs) and self._estimate(j, k + 1) <= self.max_len:
                k += 1
            k = self._last_needed(j, k)
            pieces.append(_Piece(self._context_start(j, k), j, k))
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

    def piece_item(self, piece: _Piece) -> _Item:
        """The piece as an item: explicit train flags (context False, new turns as in the conversation)."""
        item, messages, flags = self.item, self.item.messages, self.item.flags
        out = []
        if self.system is not None:
            out.append(_message(self.system, self.system.content, flags[0] and piece.new == 0))
        for p in range(piece.ctx, piece.end):
            for i in self.pairs[p]:
                content = messages[i].content
                if piece.user_content is not None and p == piece.new and messages[i].role == "user":
                    content = piece.user_content
                out.append(_message(messages[i], content, flags[i] and p >= piece.new))
        piece_flags = [bool(m.train) for m in out]
        return _Item(item.conv_index, item.conv, out, piece_flags, piece.new, piece.user_content is not None)

    def refine(self, piece: _Piece, item: _Item) -> list[_Piece] | _Outcome:
        """Next candidates for a piece that came out too long, or its final outcome (too_long)."""
        if piece.ctx < piece.new:
            piece.ctx += 1
            return [piece]
        if piece.end - piece.new > 1:
            last = piece.end - 1
            head = _Piece(piece.new, piece.new, self._last_needed(piece.new, last))
            tail = _Piece(self._context_start(last, piece.end), last, piece.end)
            return [head, tail] if any(self.needed[piece.new : last]) else [tail]
        return self._truncate_prompt(piece, item)

    def _truncate_prompt(self, piece: _Piece, item: _Item) -> list[_Piece] | _Outcome:
        """Cut the middle of the piece's user content so the piece fits, or give up (too_long)."""
        n = len(item.enc)
        user = next((i for i, m in enumerate(item.messages) if m.role == "user"), None)
        span = next((s for s in item.rendered.spans if s.message == user), None)
        if user is None or span is None or span.end == span.start:
            return _too_long(item, n, self.max_len)
        u0, u1 = _token_range(item.enc, span.start, span.end, len(item.rendered.text))
        if n - (u1 - u0) > self.max_len:
            return _too_long(item, n, self.max_len, without_prompt=n - (u1 - u0))
        keep = (u1 - u0) - (n - self.max_len) - piece.slack
        piece.slack = piece.slack * 2 + 2  # grows, so that every retry cuts more
        piece.user_content = ""
        if keep > 0:
            head_tokens = keep // 2
            head_end = item.enc.token_to_chars(u0 + head_tokens)[0] - span.start
            tail_start = item.enc.token_to_chars(u1 - (keep - head_tokens))[0] - span.start
            piece.user_content = _cut_middle(item.messages[user].content, head_end, tail_start, self.encoder._marker_re)
        return [piece]


# --------------------------------------------------------------------------------------------------
# Helpers


def _check_choice(flag: str, value: str, valid: tuple[str, ...]) -> None:
    """ConfigError listing the valid values when `value` is not one of them."""
    if value not in valid:
        raise ConfigError(f"{flag} {value!r}: expected one of {', '.join(valid)}")


def _message(message: Message, content: str, train: bool) -> Message:
    """A copy of `message` with new content and an explicit train flag (no re-validation)."""
    return Message.model_construct(role=message.role, content=content, train=train, tool_calls=message.tool_calls,
                                   name=message.name, tool_call_id=message.tool_call_id)


def _texts(i: int, m: Message) -> Iterator[tuple[str, str]]:
    """(field, text) of everything of message `i` a template prints: content, tool calls, name, call id."""
    yield f"messages[{i}].content", m.content
    for j, c in enumerate(m.tool_calls or ()):
        yield f"messages[{i}].tool_calls[{j}]", _to_json([c.id, c.name, c.arguments]).decode()
    for key in ("name", "tool_call_id"):
        value = getattr(m, key)
        if value is not None:
            yield f"messages[{i}].{key}", value


def _cut_middle(content: str, head_end: int, tail_start: int, marker_re: re.Pattern[str] | None) -> str:
    """content[:head_end] + content[tail_start:], cutting more of the head if the join would form a marker.

    >>> _cut_middle("abcdefgh", 3, 6, None)
    'abcgh'
    """
    head_end = min(max(head_end, 0), len(content))
    tail_start = min(max(tail_start, head_end), len(content))
    while head_end > 0 and marker_re is not None and marker_re.search(content[:head_end] + content[tail_start:]):
        head_end -= 1
    return content[:head_end] + content[tail_start:]


def _too_long(item: _Item, n: int, max_len: int, without_prompt: int | None = None) -> _Outcome:
    """The outcome of an example dropped for length."""
    msg = f"{n} tokens > max_len {max_len}"
    if without_prompt is not None:
        msg += f"; even with the prompt cut the reply needs {without_prompt}"
    return _Outcome(item.conv_index, item.piece, -1, "too_long", "messages", msg + " (raise --max-len)")


def _token_range(enc: Any, a: int, b: int, text_len: int) -> tuple[int, int]:
    """Tokens overlapping characters [a, b): (first, end), by O(1) lookups (offsets only if needed).

    A token overlaps [a, b) iff start < b and end > a (the straddling rule). The first such token is
    the first one holding character a; the end is just past the last token starting before b.
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
    """`_token_range` for characters that no token holds (e.g. removed by a normalizer)."""
    offsets = np.array(enc.offsets, dtype=np.int64).reshape(-1, 2)
    t0 = int(np.searchsorted(offsets[:, 1], a, side="right"))
    t1 = int(np.searchsorted(offsets[:, 0], b, side="left"))
    return t0, max(t0, t1)


def _tokens_before(enc: Any, pos: int, text_len: int) -> int:
    """Number of tokens that start before character `pos`."""
    return _token_range(enc, 0, pos, text_len)[1] if pos > 0 else 0


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
