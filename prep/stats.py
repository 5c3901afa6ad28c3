"""Token statistics of packed shards or of raw inputs: lengths, trained fraction, tokens per role, packing.

`shard_stats` reads a shard folder (numbers computed from the data; truncated/dropped/extra pieces/rejected
from the manifest). `input_stats` renders and encodes inputs exactly as `prep pack` would, without writing
shards, and also counts the tokens of each role. Both return a `Stats`; `stats_summary` draws it with rich
and `prep.plot.write_plot` draws it with matplotlib (lengths, trained/masked tokens by length, row fill).

>>> stats = shard_stats("shards/")                                 # doctest: +SKIP
>>> stats.counts["tokens"] == stats.manifest["counts"]["tokens"]   # doctest: +SKIP
True
"""

from __future__ import annotations

import heapq
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from prep.contract import IGNORE_INDEX, packing_figures
from prep.errors import ShardError

# "tool": tool results; "template": markers, separators, BOS and tool definitions, outside any message
ROLES = ("system", "user", "assistant", "tool", "template")
HIST_BINS = 16


@dataclass(frozen=True)
class Longest:
    """One of the longest examples: its tokens, trained tokens, and where it is (row/example or example id)."""

    tokens: int
    trained: int
    where: str


@dataclass(frozen=True)
class Stats:
    """Statistics of shards or inputs.

    Attributes:
        source: what was measured (folder or input paths).
        kind: "shards" or "inputs".
        max_len: the row capacity.
        lengths: tokens per example (int64), in order.
        trained: trained tokens per example (int64).
        tokens_by_role: shards: {"trained", "masked"}; inputs: tokens per role in ROLES, counted on whole
            rendered conversations (before the overflow policy).
        counts: examples, rows, tokens, trained_tokens, truncated, dropped, extra_pieces (extra examples made by
            splitting over-long conversations; the manifest's `split`), rejected ({reason: n}) and
            for inputs records, conversations, over_max_len, longest_conversation.
        packing: efficiency (tokens / (rows * max_len)), lower_bound_rows (ceil(tokens / max_len)), rows.
        longest: the longest examples, longest first.
        manifest: the shard manifest (shards only).
        row_tokens: tokens per row (int64): the shards' rows, or the rows BFD packing (or --no-pack) would make.
        by_template: shards whose sources used several templates: {template name: examples, tokens,
            trained_tokens}; empty otherwise.
        packed: rows hold several examples (False: --no-pack, one example per row).
    """

    source: str
    kind: str
    max_len: int
    lengths: np.ndarray
    trained: np.ndarray
    tokens_by_role: dict[str, int]
    counts: dict[str, Any]
    packing: dict[str, Any]
    longest: tuple[Longest, ...]
    manifest: dict[str, Any] = field(default_factory=dict, repr=False)
    row_tokens: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64), repr=False)
    by_template: dict[str, dict[str, int]] = field(default_factory=dict)
    packed: bool = True

    @property
    def trained_fraction(self) -> float:
        """Trained tokens / tokens (0.0 when there are no tokens)."""
        tokens = int(self.counts["tokens"])
        return int(self.counts["trained_tokens"]) / tokens if tokens else 0.0

    def histogram(self, bins: int = HIST_BINS) -> tuple[np.ndarray, np.ndarray]:
        """`length_histogram` of the example lengths over 0..max_len."""
        return length_histogram(self.lengths, self.max_len, bins)

    def tokens_by_length(self, bins: int = HIST_BINS) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(edges, trained tokens, masked tokens) summed over the examples of each length bin (`length_bins`)."""
        edges, index = length_bins(self.lengths, self.max_len, bins)
        trained = np.bincount(index, weights=self.trained, minlength=bins).astype(np.int64)
        tokens = np.bincount(index, weights=self.lengths, minlength=bins).astype(np.int64)
        return edges, trained, tokens - trained


def length_bins(lengths: np.ndarray, max_len: int, bins: int = HIST_BINS) -> tuple[np.ndarray, np.ndarray]:
    """`bins` equal integer-width bins from 0 up to max(max_len, longest), and the bin of every length.

    Returns:
        (edges int64 of len bins + 1, bin index int64 per length); bin k holds edges[k] < length <= edges[k+1].

    >>> [a.tolist() for a in length_bins(np.array([1, 4, 4, 8]), max_len=8, bins=4)]
    [[0, 2, 4, 6, 8], [0, 1, 1, 3]]
    """
    lengths = np.asarray(lengths, dtype=np.int64)
    top = max(int(max_len), int(lengths.max()) if len(lengths) else 0, 1)
    width = -(-top // bins)
    edges = np.arange(bins + 1, dtype=np.int64) * width
    return edges, np.clip((lengths - 1) // width, 0, bins - 1)


def length_histogram(lengths: np.ndarray, max_len: int, bins: int = HIST_BINS) -> tuple[np.ndarray, np.ndarray]:
    """Counts of lengths in `bins` equal integer-width bins from 0 up to max(max_len, longest).

    Returns:
        (edges int64 of len bins + 1, counts int64 of len bins); bin k holds edges[k] < length <= edges[k+1].

    >>> [a.tolist() for a in length_histogram(np.array([1, 4, 4, 8]), max_len=8, bins=4)]
    [[0, 2, 4, 6, 8], [1, 2, 0, 1]]
    """
    edges, index = length_bins(lengths, max_len, bins)
    return edges, np.bincount(index, minlength=bins).astype(np.int64)


# --------------------------------------------------------------------------------------------------
# Shards


def shard_stats(path: str | Path, top: int = 5) -> Stats:
    """Statistics of a shard folder, computed from its columns in one vectorized pass per record batch.

    Args:
        path: the shard folder.
        top: how many of the longest examples to list.

    Returns:
        Stats(kind="shards"); truncated/dropped/extra_pieces/rejected/conversations come from the manifest.

    Raises:
        ShardError: the folder cannot be read, or seq_lengths disagree with the rows (run `prep verify`).
    """
    from prep.load import load_shards

    from prep.example_templates import read_example_templates

    shards = load_shards(path)
    lengths, trained, rows_of, row0 = [], [], [], 0
    for batch in shards.table.to_batches():
        n, t, r = _batch_examples(batch, row0, path)
        lengths.append(n), trained.append(t), rows_of.append(r)
        row0 += batch.num_rows
    lengths, trained, rows_of = (np.concatenate([np.zeros(0, np.int64), *x]) for x in (lengths, trained, rows_of))
    tokens, n_trained = int(lengths.sum()), int(trained.sum())
    manifest = shards.manifest
    row_tokens = np.bincount(rows_of, weights=lengths, minlength=shards.num_rows).astype(np.int64)
    of_row = read_example_templates(shards.path, manifest)  # the local copy of a URL
    counts = {"examples": len(lengths), "rows": shards.num_rows, "tokens": tokens, "trained_tokens": n_trained}
    for key in ("conversations", "truncated", "dropped", "rejected"):
        counts[key] = manifest.get("counts", {}).get(key, {} if key == "rejected" else 0)
    counts["extra_pieces"] = manifest.get("counts", {}).get("split", 0)  # the manifest's key: a contract users read
    return Stats(
        str(path),
        "shards",
        shards.max_len,
        lengths,
        trained,
        {"trained": n_trained, "masked": tokens - n_trained},
        counts,
        packing_figures(tokens, shards.num_rows, shards.max_len),
        _longest_in_rows(lengths, trained, rows_of, top),
        manifest,
        row_tokens,
        {} if of_row is None else _by_template(manifest, of_row, lengths, trained, path),
        bool(shards.manifest.get("packed", True)),
    )


def _by_template(manifest: dict[str, Any], of_row: pa.ChunkedArray, lengths: np.ndarray, trained: np.ndarray,
                 path: Any) -> dict[str, dict[str, int]]:
    """Examples, tokens and trained tokens per template (the template of each example's source)."""
    from prep.example_templates import template_names

    names = template_names(manifest)
    index = np.asarray(of_row.combine_chunks().flatten(), dtype=np.int64)
    if len(index) != len(lengths) or (len(index) and not 0 <= index.min() <= index.max() < len(names)):
        raise ShardError(f"{path}: example_templates.arrow does not match the shards; run `prep verify {path}`")
    examples = np.bincount(index, minlength=len(names))
    tokens = np.bincount(index, weights=lengths, minlength=len(names)).astype(np.int64)
    learned = np.bincount(index, weights=trained, minlength=len(names)).astype(np.int64)
    return {name: {"examples": int(examples[k]), "tokens": int(tokens[k]), "trained_tokens": int(learned[k])}
            for k, name in enumerate(names)}


def _batch_examples(batch: pa.RecordBatch, row0: int, path: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per example of one record batch: tokens, trained tokens, and its row number."""
    seq = batch.column("seq_lengths")
    lengths = np.asarray(seq.flatten(), dtype=np.int64)
    labels = np.asarray(batch.column("labels").flatten())
    if int(lengths.sum()) != len(labels):
        raise ShardError(f"{path}: seq_lengths do not add up to the rows near row {row0}; run `prep verify {path}`")
    cum = np.concatenate(([0], np.cumsum(labels != IGNORE_INDEX, dtype=np.int64)))
    ends = np.cumsum(lengths)
    per_row = np.diff(np.asarray(seq.offsets, dtype=np.int64))
    return lengths, cum[ends] - cum[ends - lengths], np.repeat(np.arange(row0, row0 + batch.num_rows), per_row)


def _longest_in_rows(lengths: np.ndarray, trained: np.ndarray, rows_of: np.ndarray, top: int) -> tuple[Longest, ...]:
    """The `top` longest examples of shards, named "row R, example K" (K: position in the row)."""
    first_of_row = np.flatnonzero(np.concatenate(([True], rows_of[1:] != rows_of[:-1]))) if len(rows_of) else rows_of
    index_in_row = np.arange(len(rows_of)) - np.repeat(first_of_row, np.diff(np.append(first_of_row, len(rows_of))))
    order = np.argsort(-lengths, kind="stable")[:top]
    return tuple(
        Longest(int(lengths[i]), int(trained[i]), f"row {int(rows_of[i])}, example {int(index_in_row[i])}")
        for i in order
    )


# --------------------------------------------------------------------------------------------------
# Inputs


def input_stats(
    paths: str | Path | Sequence[str | Path],
    *,
    tokenizer: str | None = None,
    template: str = "markers",
    train_on: str = "completion",
    max_len: int = 2048,
    overflow: str = "split",
    format: str = "auto",
    pack: bool = True,
    batch_size: int = 1024,
    top: int = 5,
    trust_remote_code: bool = False,
) -> Stats:
    """Statistics of raw inputs, rendered and encoded as `prep pack` would (nothing is written).

    Args:
        paths: input files, folders or globs.
        tokenizer, template, train_on, max_len, overflow, format, pack, trust_remote_code: as for `prep pack`.
        batch_size: conversations per encoder call.
        top: how many of the longest examples to list.

    Returns:
        Stats(kind="inputs"); packing is what best-fit-decreasing packing of these examples gives.

    Raises:
        InputError, ConfigError: unreadable inputs, bad tokenizer/template/policy.

    >>> s = input_stats("data.jsonl", template="chatml", max_len=1024)   # doctest: +SKIP
    >>> sorted(s.tokens_by_role)                                          # doctest: +SKIP
    ['assistant', 'system', 'template', 'tool', 'user']
    """
    from prep.convert import iter_conversations
    from prep.encode import Encoder
    from prep.render import load_template
    from prep.tokenizer import load_tokenizer

    tok = load_tokenizer(tokenizer, trust_remote_code=trust_remote_code)
    tmpl = load_template(template, tok)
    encoder = Encoder(tok, tmpl, train_on=train_on, max_len=max_len, overflow=overflow)
    acc = _InputAccumulator(top)
    for batch in _batches(iter_conversations(paths, format), batch_size):
        convs = [c for c in batch if type(c).__name__ == "Conversation"]
        acc.add_rejects(c.reason for c in batch if type(c).__name__ == "Reject")
        acc.add_encoded(encoder.encode(convs))
        acc.add_roles(*role_token_counts(convs, tok, tmpl), max_len)
    source = str(paths) if isinstance(paths, (str, Path)) else ", ".join(map(str, paths))
    return acc.stats(source, max_len, pack)


def _batches(items: Iterable[Any], size: int) -> Iterator[list[Any]]:
    """Lists of up to `size` consecutive items."""
    batch: list[Any] = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def role_token_counts(conversations: Sequence[Any], tokenizer: Any, template: Any) -> tuple[np.ndarray, np.ndarray]:
    """Tokens per role (in ROLES order) over the conversations, and each conversation's total tokens.

    Each conversation is rendered and tokenized whole (no truncation or split). A token belongs to the
    message whose span (content and end-of-turn marker) holds its first character; other tokens (role
    prefixes, separators, BOS) count as "template". Conversations the template cannot render are skipped.

    >>> from schemas import Message, Conversation
    >>> from prep.tokenizer import default_tokenizer
    >>> from prep.render import BUILTIN_TEMPLATES
    >>> msgs = [Message(role="user", content="Hi"), Message(role="assistant", content="Yo")]
    >>> conv = Conversation(id="a", messages=msgs)
    >>> [a.tolist() for a in role_token_counts([conv], default_tokenizer(), BUILTIN_TEMPLATES["chatml"])]
    [[0, 3, 3, 0, 18], [24]]
    """
    from prep.render import RenderFailure, render_batch
    from prep.tokenizer import adds_bos

    bos = tokenizer.bos_token if adds_bos(tokenizer) and not template.uses_chat_template else ""
    rendered = render_batch([c.messages for c in conversations], template, tokenizer, bos=bos, eos=tokenizer.eos_token,
                            tools=[c.tools for c in conversations])
    ok = [(c, r) for c, r in zip(conversations, rendered) if not isinstance(r, RenderFailure)]
    encodings = tokenizer.backend_tokenizer.encode_batch([r.text for _, r in ok], add_special_tokens=False)
    totals = np.zeros(len(ROLES), dtype=np.int64)
    for (conv, r), enc in zip(ok, encodings):
        starts = np.array(enc.offsets, dtype=np.int64).reshape(-1, 2)[:, 0]
        totals += np.bincount(_token_roles(starts, r.spans, conv.messages), minlength=len(ROLES))
    return totals, np.array([len(e) for e in encodings], dtype=np.int64)


def _token_roles(token_starts: np.ndarray, spans: Sequence[Any], messages: Sequence[Any]) -> np.ndarray:
    """Role code (index into ROLES) of each token, from its first character's offset and the message spans."""
    template_code = ROLES.index("template")
    if not spans:
        return np.full(len(token_starts), template_code)
    bounds = np.array([x for s in spans for x in (s.start, s.stop)], dtype=np.int64)
    region = np.searchsorted(bounds, token_starts, side="right")  # odd: inside span (region - 1) // 2
    span_roles = np.array([ROLES.index(messages[s.message].role) for s in spans])
    inside = region % 2 == 1
    return np.where(inside, span_roles[np.minimum((region - 1) // 2, len(spans) - 1)], template_code)


class _InputAccumulator:
    """Running totals of `input_stats` over batches (per-example arrays stay 16 bytes per example)."""

    def __init__(self, top: int):
        self.top, self.lengths, self.trained = top, [], []
        self.counts: Counter = Counter()
        self.rejected: Counter = Counter()
        self.roles = np.zeros(len(ROLES), dtype=np.int64)
        self.longest: list[tuple[int, int, str]] = []  # min-heap of (tokens, trained, example id)
        self.over, self.longest_conversation = 0, 0

    def add_rejects(self, reasons: Iterable[str]) -> None:
        """Count records that failed conversion."""
        for reason in reasons:
            self.rejected[reason] += 1
            self.counts["records"] += 1

    def add_encoded(self, result: Any) -> None:
        """Add one EncodeResult: example lengths, trained counts, overflow counts, longest examples."""
        table = result.table
        offsets = np.asarray(table.column("input_ids").combine_chunks().offsets, dtype=np.int64)
        labels = np.asarray(table.column("labels").combine_chunks().flatten())
        lengths = np.diff(offsets)
        cum = np.concatenate(([0], np.cumsum(labels != IGNORE_INDEX, dtype=np.int64)))
        trained = cum[offsets[1:]] - cum[offsets[:-1]]
        self.lengths.append(lengths), self.trained.append(trained)
        for key in ("conversations", "truncated", "dropped", "extra_pieces"):
            self.counts[key] += result.counts[key]
        self.counts["records"] += result.counts["conversations"]
        self.rejected.update(result.rejected)
        ids = table.column("example_id").to_pylist()
        for i in np.argsort(-lengths, kind="stable")[: self.top].tolist():
            item = (int(lengths[i]), int(trained[i]), ids[i])
            (heapq.heappushpop if len(self.longest) >= self.top else heapq.heappush)(self.longest, item)

    def add_roles(self, roles: np.ndarray, conversation_tokens: np.ndarray, max_len: int) -> None:
        """Add tokens per role and whole-conversation lengths."""
        self.roles += roles
        self.over += int(np.count_nonzero(conversation_tokens > max_len))
        self.longest_conversation = max(self.longest_conversation, int(conversation_tokens.max(initial=0)))

    def stats(self, source: str, max_len: int, pack: bool) -> Stats:
        """The final Stats (packing planned with best-fit-decreasing, or one row per example)."""
        from prep.pack import plan_bfd

        lengths = np.concatenate([np.zeros(0, np.int64), *self.lengths])
        trained = np.concatenate([np.zeros(0, np.int64), *self.trained])
        tokens = int(lengths.sum())
        row_tokens = plan_bfd(lengths, max_len).row_tokens(lengths) if pack else lengths
        rows = len(row_tokens)
        counts = {
            "records": self.counts["records"],
            "conversations": self.counts["conversations"],
            "examples": len(lengths),
            "rows": rows,
            "tokens": tokens,
            "trained_tokens": int(trained.sum()),
            **{k: self.counts[k] for k in ("truncated", "dropped", "extra_pieces")},
            "rejected": dict(sorted(self.rejected.items())),
            "over_max_len": self.over,
            "longest_conversation": self.longest_conversation,
        }
        longest = tuple(Longest(n, t, eid) for n, t, eid in sorted(self.longest, key=lambda x: (-x[0], x[2])))
        roles = dict(zip(ROLES, self.roles.tolist()))
        return Stats(
            source, "inputs", max_len, lengths, trained, roles, counts, packing_figures(tokens, rows, max_len), longest,
            row_tokens=row_tokens, packed=pack,
        )


# --------------------------------------------------------------------------------------------------
# Rendering (rich)


def stats_summary(stats: Stats, bins: int = HIST_BINS) -> Any:
    """A rich renderable: summary table, length histogram, tokens per role, longest examples."""
    from rich.console import Group
    from rich.text import Text

    edges, counts = stats.histogram(bins)
    roles = "tokens per role (whole conversations, before --overflow)" if stats.kind == "inputs" else "tokens by mask"
    by_template = [Text("\nby template (of each example's source)", style="bold"), template_table(stats)]
    return Group(
        Text(f"{stats.kind} · {stats.source}", style="bold"),
        summary_table(stats),
        Text("\ntokens per example", style="bold"),
        histogram_text(edges, counts),
        Text(roles, style="bold"),
        role_table(stats),
        *(by_template if stats.by_template else []),
        Text("\nlongest examples", style="bold"),
        longest_table(stats),
    )


def summary_table(stats: Stats) -> Any:
    """The headline numbers as a two-column rich Table."""
    from rich.table import Table

    c, p = stats.counts, stats.packing
    table = Table(show_header=False, box=None, pad_edge=False)
    table.add_column(style="bold")
    table.add_column(justify="right")
    lines = [
        ("examples", f"{c['examples']:,}"),
        ("tokens", f"{c['tokens']:,}"),
        ("trained tokens", f"{c['trained_tokens']:,} ({stats.trained_fraction:.1%})"),
        ("rows", f"{p['rows']:,} (lower bound {p['lower_bound_rows']:,} = ceil(tokens / {stats.max_len}))"),
        ("packing efficiency", f"{p['efficiency']:.2%}"),
    ]
    if stats.kind == "inputs":
        lines += [
            ("records", f"{c['records']:,}"),
            ("conversations", f"{c['conversations']:,}"),
            (
                f"conversations > {stats.max_len} tokens",
                f"{c['over_max_len']:,} (longest {c['longest_conversation']:,})",
            ),
        ]
    rejected = c["rejected"] if isinstance(c["rejected"], dict) else {"": c["rejected"]}
    lines += [(k.replace("_", " "), f"{c[k]:,}") for k in ("truncated", "dropped", "extra_pieces")]
    lines.append(
        ("rejected", f"{sum(rejected.values()):,}" + "".join(f" · {r}: {n:,}" for r, n in rejected.items() if r))
    )
    for name, value in lines:
        table.add_row(name, value)
    return table


def histogram_text(edges: np.ndarray, counts: np.ndarray, width: int = 40) -> Any:
    """A terminal histogram: one line per bin, `  lo–  hi │█████▌ count` (eighth-block resolution)."""
    from rich.text import Text

    peak = max(int(counts.max()) if len(counts) else 0, 1)
    digits = len(str(int(edges[-1])))
    text = Text()
    for lo, hi, count in zip(edges[:-1].tolist(), edges[1:].tolist(), counts.tolist()):
        eighths = round(count * width * 8 / peak)
        bar = "█" * (eighths // 8) + (" ▏▎▍▌▋▊▉"[eighths % 8] if eighths % 8 else "")
        text.append(f"{lo + 1:>{digits}}–{hi:>{digits}} │", style="dim")
        text.append(bar, style="green")
        text.append(f" {count:,}\n")
    return text


def role_table(stats: Stats) -> Any:
    """Tokens per role (inputs) or trained vs masked (shards), with shares."""
    from rich.table import Table

    total = sum(stats.tokens_by_role.values()) or 1
    table = Table(box=None, pad_edge=False)
    for name in ("", "tokens", "share"):
        table.add_column(name, justify="right" if name else "left")
    for role, n in stats.tokens_by_role.items():
        table.add_row(role, f"{n:,}", f"{n / total:.1%}")
    return table


def template_table(stats: Stats) -> Any:
    """Examples, tokens and trained share per template (shards whose sources used several templates)."""
    from rich.table import Table
    from rich.text import Text

    table = Table(box=None, pad_edge=False)
    for name in ("template", "examples", "tokens", "trained"):
        table.add_column(name, justify="left" if name == "template" else "right")
    for name, c in stats.by_template.items():
        share = c["trained_tokens"] / c["tokens"] if c["tokens"] else 0.0
        table.add_row(Text(name), f"{c['examples']:,}", f"{c['tokens']:,}", f"{c['trained_tokens']:,} ({share:.1%})")
    return table


def longest_table(stats: Stats) -> Any:
    """The longest examples: where, tokens, trained tokens."""
    from rich.table import Table
    from rich.text import Text

    table = Table(box=None, pad_edge=False)
    for name in ("example", "tokens", "trained"):
        table.add_column(name, justify="left" if name == "example" else "right")
    for item in stats.longest:
        table.add_row(Text(item.where), f"{item.tokens:,}", f"{item.trained:,}")
    return table
