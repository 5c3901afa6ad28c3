"""See what the model will learn: decode a packed row (or one input record) into trained and masked pieces.

The library part returns data (`RowView` → `ExampleView` → `TextSpan(text, trained, marker)`); `row_display`
turns it into rich renderables. Trained tokens are green, masked ones grey; template markers and special
tokens are shown in reverse video in the colour of their mask, so `###response###` masked and `<|im_end|>`
trained are both visible at a glance. In agent data, a record's tool calls are underlined and its tool results
yellow; in shards, calls and results show through their markers (`<tool_call>`, `[TOOL_CALLS]`, ...: the
tokenizer's added tokens are highlighted too) and their mask.

>>> view = inspect_shards("shards/", row=0)                     # doctest: +SKIP
>>> [(p.text, p.trained) for p in view.examples[0].pieces][:2]  # doctest: +SKIP
[('###instruction###', False), ('\\nGive three tips...', False)]
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Any

import numpy as np

from prep.contract import IGNORE_INDEX
from prep.errors import ConfigError, InputError

STYLES = {
    (True, False): "green",  # trained
    (False, False): "grey58",  # masked
    (True, True): "bold reverse green",  # trained marker / special token
    (False, True): "bold reverse grey58",  # masked marker / special token
}
NEWLINE_GLYPH = "↵"
CALL, RESULT = "call", "result"  # the tool parts of a record's text


@dataclass(frozen=True)
class TextSpan:
    """A run of decoded text with one mask state; `marker` when it is a template marker or special token;
    `kind` "call" inside an assistant message that calls tools, "result" inside a tool result."""

    text: str
    trained: bool
    marker: bool = False
    kind: str = ""

    @property
    def style(self) -> str:
        """The rich style of this piece."""
        if self.kind == RESULT:
            return "bold reverse yellow" if self.marker else "yellow"
        return STYLES[(self.trained, self.marker)] + (" underline" if self.kind == CALL else "")


@dataclass(frozen=True)
class ExampleView:
    """One example of a row: where it starts, its tokens and labels, and its decoded pieces.

    Attributes:
        index: position of the example in its row (0-based).
        start: its first token's position in the row.
        input_ids, labels: its tokens and labels (int32).
        pieces: its text as runs of trained/masked text, markers split out.
        tokens: the text each token adds when decoded in order (`token_texts`), for the id table.
        example_id: the conversation id (`id#k` for a split piece) when known (records, not shards).
        template: the name of the template that rendered it, when the shards' sources use several.
    """

    index: int
    start: int
    input_ids: np.ndarray
    labels: np.ndarray
    pieces: tuple[TextSpan, ...]
    tokens: tuple[str, ...]
    example_id: str | None = None
    template: str | None = None

    @property
    def trained_tokens(self) -> int:
        """Tokens that carry a loss."""
        return int(np.count_nonzero(self.labels != IGNORE_INDEX))


@dataclass(frozen=True)
class RowView:
    """What `inspect_shards` / `inspect_record` return: a title, the shown examples, and the row's size."""

    title: str
    examples: tuple[ExampleView, ...]
    num_examples: int
    num_tokens: int
    max_len: int | None = None


def marker_pattern(tokenizer: Any, template: Any = None) -> re.Pattern[str] | None:
    """A regex for the strings to highlight: the tokenizer's special tokens and the template's markers.

    Template markers are the role markers plus every stripped end-of-turn text (e.g. `###`, `<|im_end|>`).

    >>> from prep.tokenizer import default_tokenizer
    >>> from prep.render import BUILTIN_TEMPLATES
    >>> marker_pattern(default_tokenizer(), BUILTIN_TEMPLATES["markers"]).findall("###response###\\nHi\\n###")
    ['###response###', '###']
    """
    from prep.render import special_token_strings

    found = list(special_token_strings(tokenizer))
    found += [t.content for t in tokenizer.added_tokens_decoder.values() if t.content.strip()]  # e.g. <tool_call>
    if template is not None and not template.uses_chat_template:
        found += template.role_markers()
        for roles in (template.roles, template.single_turn):
            for turn in (roles.system, roles.user, roles.assistant, roles.tool, template.call) if roles else ():
                found += [text for text in (turn.prefix.strip(), turn.end.strip()) if text] if turn else []
    found = sorted(set(found), key=len, reverse=True)  # longest first: `###response###` before `###`
    return re.compile("|".join(map(re.escape, found))) if found else None


def label_pieces(
    input_ids: np.ndarray,
    labels: np.ndarray,
    tokenizer: Any,
    markers: re.Pattern[str] | None = None,
    tokens: Sequence[str] | None = None,
    kinds: Sequence[str] | None = None,
) -> list[TextSpan]:
    """Decode one example into runs of trained / masked text, with markers split out as their own pieces.

    Runs are cut where the mask (or the kind) changes; a run's text is the incremental decode of its tokens
    (see `token_texts`), so the pieces concatenate to exactly the decoded example.

    Args:
        input_ids, labels: one example (labels unshifted, -100 where masked).
        tokenizer: the (fast) tokenizer that made the ids.
        markers: strings to split out (see `marker_pattern`).
        tokens: `token_texts(tokenizer, input_ids)` when already computed.
        kinds: each token's tool kind ("call", "result" or ""), when known.

    Returns:
        The pieces, in order.

    >>> from prep.tokenizer import default_tokenizer
    >>> tok = default_tokenizer(); ids = tok("Q? A!", add_special_tokens=False).input_ids
    >>> [(p.text, p.trained) for p in label_pieces(np.array(ids), np.array([-100] * 3 + ids[3:]), tok)]
    [('Q? ', False), ('A!', True)]
    """
    trained = np.asarray(labels) != IGNORE_INDEX
    tokens = token_texts(tokenizer, input_ids) if tokens is None else tokens
    state = trained.astype(np.int8) if kinds is None else trained * 4 + np.array([_KIND_CODES[k] for k in kinds])
    cuts = np.flatnonzero(np.diff(state)) + 1
    bounds = [0, *cuts.tolist(), len(trained)]
    pieces = []
    for a, b in zip(bounds[:-1], bounds[1:]):
        kind = kinds[a] if kinds is not None else ""
        pieces += _split_markers("".join(tokens[a:b]), bool(trained[a]), markers, kind)
    return pieces


_KIND_CODES = {"": 0, CALL: 1, RESULT: 2}


def token_texts(tokenizer: Any, input_ids: np.ndarray) -> tuple[str, ...]:
    """The text each token adds when the ids are decoded in order ("" while a multi-byte character is open).

    Decoding token by token alone would lose SentencePiece's leading spaces and split UTF-8 characters;
    the incremental decoder gives pieces that concatenate to `decode(input_ids)`.

    >>> from prep.tokenizer import default_tokenizer
    >>> token_texts(default_tokenizer(), np.array(list("é!".encode())))
    ('', 'é', '!')
    """
    backend, ids = tokenizer.backend_tokenizer, [int(i) for i in input_ids]
    try:
        from tokenizers.decoders import DecodeStream
    except ImportError:  # tokenizers < 0.21: differences of decoded prefixes (quadratic, fine for one row)
        prefixes = [""] + [backend.decode(ids[: k + 1], skip_special_tokens=False) for k in range(len(ids))]
        return tuple(b[len(a) :] if b.startswith(a) else b for a, b in zip(prefixes[:-1], prefixes[1:]))
    stream = DecodeStream(skip_special_tokens=False)
    return tuple(stream.step(backend, i) or "" for i in ids)


def _split_markers(text: str, trained: bool, markers: re.Pattern[str] | None, kind: str = "") -> list[TextSpan]:
    """Cut `text` into plain and marker pieces (empty pieces dropped)."""
    if markers is None:
        return [TextSpan(text, trained, kind=kind)] if text else []
    pieces, pos = [], 0
    for match in markers.finditer(text):
        if match.start() > pos:
            pieces.append(TextSpan(text[pos : match.start()], trained, kind=kind))
        pieces.append(TextSpan(match.group(), trained, True, kind))
        pos = match.end()
    if pos < len(text):
        pieces.append(TextSpan(text[pos:], trained, kind=kind))
    return pieces


def example_views(
    input_ids: np.ndarray,
    labels: np.ndarray,
    seq_lengths: Sequence[int],
    tokenizer: Any,
    markers: re.Pattern[str] | None | Sequence[re.Pattern[str] | None] = None,
    example: int | None = None,
    example_ids: Sequence[str] | None = None,
    templates: Sequence[str] | None = None,
    kinds: Sequence[Sequence[str] | None] | None = None,
) -> tuple[ExampleView, ...]:
    """Split a row at its example boundaries and decode each example (or only example `example`).

    `markers` is one pattern for every example, or one per example (rows mixing templates); `templates`
    names each example's template.

    Raises:
        ConfigError: `example` is outside the row.

    >>> from prep.tokenizer import default_tokenizer
    >>> views = example_views(np.array([72, 105, 33]), np.array([-100, 105, -100]), [2, 1], default_tokenizer())
    >>> [(v.start, [p.text for p in v.pieces]) for v in views]
    [(0, ['H', 'i']), (2, ['!'])]
    """
    lengths = np.asarray(seq_lengths, dtype=np.int64)
    starts = np.concatenate(([0], np.cumsum(lengths)[:-1])).astype(np.int64)
    chosen = range(len(lengths))
    if example is not None:
        if not 0 <= example < len(lengths):
            raise ConfigError(f"--example {example}: the row holds examples 0..{len(lengths) - 1}")
        chosen = range(example, example + 1)
    per_example = markers if isinstance(markers, Sequence) else [markers] * len(lengths)
    views = []
    for k in chosen:
        ids, labs = input_ids[starts[k] : starts[k] + lengths[k]], labels[starts[k] : starts[k] + lengths[k]]
        tokens = token_texts(tokenizer, ids)
        eid = example_ids[k] if example_ids is not None else None
        pieces = tuple(label_pieces(ids, labs, tokenizer, per_example[k], tokens,
                                    kinds[k] if kinds is not None else None))
        views.append(ExampleView(k, int(starts[k]), ids, labs, pieces, tokens, eid,
                                 templates[k] if templates is not None else None))
    return tuple(views)


def inspect_shards(path: str | Path, row: int = 0, example: int | None = None) -> RowView:
    """Decode row `row` of a shard folder, with the tokenizer saved in it (`shards/tokenizer/`).

    Args:
        path: the shard folder.
        row: the row number over all shards, in file order (0-based).
        example: show only this example of the row (0-based); None for all.

    Returns:
        The RowView.

    Raises:
        ShardError: the folder is not a readable shard folder.
        ConfigError: `row` or `example` out of range, or the tokenizer folder cannot be loaded.

    >>> view = inspect_shards("shards/", row=3)     # doctest: +SKIP
    >>> view.num_examples, view.examples[0].trained_tokens   # doctest: +SKIP
    (2, 118)
    """
    return next(iter_row_views(path, [row], example))


def iter_row_views(
    path: str | Path, rows: Iterable[int] | None = None, example: int | None = None
) -> Iterator[RowView]:
    """Decode several rows (all when `rows` is None), loading the shards and the tokenizer once.

    Raises:
        As `inspect_shards`, when a row is reached.
    """
    from prep.example_templates import manifest_templates, read_example_templates, template_names
    from prep.load import load_shards
    from prep.tokenizer import load_tokenizer

    shards = load_shards(path)
    tokenizer = load_tokenizer(str(shards.tokenizer_path))
    patterns = [marker_pattern(tokenizer, t) for t in manifest_templates(shards.manifest)]
    names = template_names(shards.manifest)
    of_row = read_example_templates(shards.path, shards.manifest)  # None: every example used template 0
    columns = {name: shards.table.column(name) for name in ("input_ids", "labels", "seq_lengths")}
    for row in range(shards.num_rows) if rows is None else rows:
        if not 0 <= row < shards.num_rows:
            raise ConfigError(f"--row {row}: {path} has rows 0..{shards.num_rows - 1}")
        cells = {name: np.asarray(col[row].values, dtype=np.int64) for name, col in columns.items()}
        used = [0] * len(cells["seq_lengths"]) if of_row is None else of_row[row].values.to_pylist()
        markers = [patterns[t] for t in used]
        views = example_views(cells["input_ids"], cells["labels"], cells["seq_lengths"], tokenizer, markers, example,
                              templates=[names[t] for t in used] if of_row is not None else None)
        title = f"{path} row {row} of {shards.num_rows}"
        yield RowView(title, views, len(cells["seq_lengths"]), len(cells["input_ids"]), shards.max_len)


def inspect_record(
    path: str | Path,
    record: int,
    *,
    tokenizer: str | None = None,
    template: str = "markers",
    train_on: str = "completion",
    max_len: int = 2048,
    overflow: str = "split",
    format: str = "auto",
    trust_remote_code: bool = False,
    example: int | None = None,
) -> RowView:
    """Render and encode one input record exactly as `prep pack` would, without writing anything.

    Args:
        path: an input file (any format `prep convert` reads).
        record: the record's position in the file (0-based, counting records that fail conversion).
        tokenizer, template, train_on, max_len, overflow, format, trust_remote_code: as for `prep pack`.
        example: show only this piece of a split conversation (0-based); None for all.

    Returns:
        A RowView with one example (several when `overflow="split"` cut the conversation).

    Raises:
        InputError: no such record, or the record was rejected (the reason is in the message).
        ConfigError: bad tokenizer, template or policy.

    >>> view = inspect_record("data.jsonl", 3, template="chatml")   # doctest: +SKIP
    >>> "".join(p.text for p in view.examples[0].pieces if p.trained)  # doctest: +SKIP
    'Paris.<|im_end|>'
    """
    from prep.encode import Encoder
    from prep.render import load_template
    from prep.tokenizer import load_tokenizer

    conv = _nth_conversation(path, record, format)
    tok = load_tokenizer(tokenizer, trust_remote_code=trust_remote_code)
    tmpl = load_template(template, tok)
    result = Encoder(tok, tmpl, train_on=train_on, max_len=max_len, overflow=overflow).encode([conv])
    if result.table.num_rows == 0:
        reject = result.rejects[0] if result.rejects else None
        reason = reject.reason if reject else "no example"
        why = "; ".join(f"{e.field}: {e.message}" for e in reject.errors) if reject else ""
        raise InputError(
            f"record {record} is not encoded ({reason}): {why or 'see prep pack --strict'}", path=str(path)
        )
    ids = result.table.column("input_ids").combine_chunks()
    flat_ids = np.asarray(ids.flatten(), dtype=np.int64)
    flat_labels = np.asarray(result.table.column("labels").combine_chunks().flatten(), dtype=np.int64)
    lengths = np.diff(np.asarray(ids.offsets))
    example_ids = result.table.column("example_id").to_pylist()
    markers = marker_pattern(tok, tmpl)
    rows = np.split(flat_ids, np.cumsum(lengths)[:-1])
    kinds = [tool_kinds(conv, tok, tmpl, row) for row in rows]
    views = example_views(flat_ids, flat_labels, lengths, tok, markers, example, example_ids, kinds=kinds)
    where = f"{conv.source.path}:{conv.source.line}" if conv.source else str(path)
    title = f"record {record} ({where}) · template {tmpl.name} · train_on {train_on}"
    return RowView(title, views, len(lengths), len(flat_ids), max_len)


def tool_kinds(conversation: Any, tokenizer: Any, template: Any, input_ids: np.ndarray) -> list[str] | None:
    """Each token's tool kind ("call", "result" or "") in an example that is the whole conversation rendered (None
    for one without tool data, or a piece of a split or expanded one): the spans of its tool-call messages and
    tool results, mapped to tokens by their first character."""
    from prep.render import RenderFailure, render_batch
    from prep.tokenizer import adds_bos

    messages = conversation.messages
    if not any(m.tool_calls or m.role == "tool" for m in messages):
        return None
    bos = tokenizer.bos_token if adds_bos(tokenizer) and not template.uses_chat_template else ""
    rendered = render_batch([messages], template, tokenizer, bos=bos, eos=tokenizer.eos_token,
                            tools=[conversation.tools])[0]
    if isinstance(rendered, RenderFailure):
        return None
    enc = tokenizer.backend_tokenizer.encode(rendered.text, add_special_tokens=False)
    if enc.ids != [int(i) for i in input_ids]:
        return None
    kinds = [""] * len(enc.ids)
    for span in rendered.spans:
        m = messages[span.message]
        kind = CALL if m.tool_calls else RESULT if m.role == "tool" else ""
        if kind:
            for t, (a, _) in enumerate(enc.offsets):
                if span.start <= a < span.stop:
                    kinds[t] = kind
    return kinds


def _nth_conversation(path: str | Path, record: int, format: str) -> Any:
    """The `record`-th item of the input's conversation stream; InputError if missing or rejected."""
    from prep.convert import iter_conversations

    if record < 0:
        raise InputError(f"--record {record}: expected a record number >= 0", path=str(path))
    item = next(islice(iter_conversations(path, format), record, None), None)
    if item is None:
        raise InputError(f"--record {record}: the input has fewer records", path=str(path))
    if type(item).__name__ == "Reject":
        why = "; ".join(f"{e.field}: {e.message}" for e in item.errors)
        raise InputError(f"record {record} was rejected ({item.reason}): {why}", path=item.path, line=item.line)
    return item


# --------------------------------------------------------------------------------------------------
# Rendering (rich)


def row_display(view: RowView, ids: bool = False) -> Any:
    """A rich renderable of a RowView: a legend, then each example under a rule with its counts.

    With `ids`, each example is followed by a table of its tokens: position, id, label and token text.
    """
    from rich.console import Group
    from rich.rule import Rule
    from rich.text import Text

    size = f"{view.num_tokens} tokens" + (f" / max_len {view.max_len}" if view.max_len else "")
    parts: list[Any] = [Text(f"{view.title} · {view.num_examples} example(s) · {size}", style="bold"), legend()]
    for ex in view.examples:
        name = f" · {ex.example_id}" if ex.example_id else ""
        name += f" · template {ex.template}" if ex.template else ""
        n = len(ex.input_ids)
        head = f"example {ex.index} · tokens {ex.start}..{ex.start + n - 1} · {ex.trained_tokens}/{n} trained{name}"
        parts += [Rule(Text(head), align="left", style="cyan"), example_text(ex)]
        if ids:
            parts.append(token_table(ex))
    return Group(*parts)


def legend() -> Any:
    """The colour legend line."""
    from rich.text import Text

    return Text.assemble(
        ("trained", STYLES[True, False]),
        "  ",
        ("masked", STYLES[False, False]),
        "  ",
        ("marker", STYLES[True, True]),
        " ",
        ("marker", STYLES[False, True]),
        "  ",
        ("tool call", STYLES[True, False] + " underline"),
        "  ",
        ("tool result", "yellow"),
        "  ",
        (f"{NEWLINE_GLYPH} newline", "dim"),
    )


def example_text(example: ExampleView) -> Any:
    """The example's pieces as one styled rich Text (newlines shown as ↵ before the line break)."""
    from rich.text import Text

    text = Text()
    for piece in example.pieces:
        text.append(piece.text.replace("\n", NEWLINE_GLYPH + "\n"), style=piece.style)
    return text


def token_table(example: ExampleView) -> Any:
    """A rich Table with one line per token: position in the row, id, label, text (styled by its mask)."""
    from rich.table import Table
    from rich.text import Text

    table = Table(box=None, pad_edge=False, show_edge=False)
    for name in ("pos", "id", "label", "token"):
        table.add_column(name, justify="right" if name != "token" else "left")
    for k, (tid, lab, tok) in enumerate(zip(example.input_ids.tolist(), example.labels.tolist(), example.tokens)):
        style = STYLES[(lab != IGNORE_INDEX, False)]
        table.add_row(str(example.start + k), str(tid), str(lab), Text(repr(tok)), style=style)
    return table
