"""Counters for a stage run, per input and in total, and the run summaries printed in the terminal (rich).

Every stage that drops records counts them here by reason, and `check_accounting` proves that
nothing vanished: for every row, read == accepted + rejected + deduplicated.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from prep.contract import REJECTS_FILE, SPLITS
from prep.errors import AccountingError
from prep.remote import join

if TYPE_CHECKING:
    from prep.pipeline import PackReport
    from prep.tokenizer import MarkerCheck


@dataclass
class Counts:
    """What happened to the records of one input (or of all inputs).

    `events` counts changes to records that were kept (e.g. `merged_turns`); they are not drops.

    >>> c = Counts(read=3, accepted=1, rejected=Counter(empty_response=2))
    >>> c.balanced, c.rejected_total
    (True, 2)
    """

    read: int = 0
    accepted: int = 0
    deduplicated: int = 0
    rejected: Counter[str] = field(default_factory=Counter)
    events: Counter[str] = field(default_factory=Counter)

    @property
    def rejected_total(self) -> int:
        """All rejected records, whatever the reason."""
        return sum(self.rejected.values())

    @property
    def balanced(self) -> bool:
        """True when every record read was accepted, rejected or deduplicated."""
        return self.read == self.accepted + self.rejected_total + self.deduplicated

    def add(self, other: Counts) -> None:
        """Add another Counts into this one."""
        self.read += other.read
        self.accepted += other.accepted
        self.deduplicated += other.deduplicated
        self.rejected.update(other.rejected)
        self.events.update(other.events)


@dataclass
class ReportRow:
    """One input: its name (path), its kind (format, `alpaca (auto)` when detected) and counts."""

    name: str
    kind: str
    counts: Counts = field(default_factory=Counts)


@dataclass
class Report:
    """A stage's result: one row per input, the outputs written, and the totals.

    >>> r = Report("convert")
    >>> r.add_row("a.jsonl", "alpaca").read = 2
    >>> r.total.read
    2
    """

    title: str
    rows: list[ReportRow] = field(default_factory=list)
    outputs: dict[str, str] = field(default_factory=dict)

    def add_row(self, name: str, kind: str) -> Counts:
        """Start a row for one input and return its Counts to fill in."""
        row = ReportRow(name, kind)
        self.rows.append(row)
        return row.counts

    @property
    def total(self) -> Counts:
        """The sum over all rows."""
        total = Counts()
        for row in self.rows:
            total.add(row.counts)
        return total

    def check_accounting(self) -> None:
        """Raise AccountingError unless every row balances (read == accepted + rejected + deduplicated)."""
        for row in self.rows:
            c = row.counts
            if not c.balanced:
                raise AccountingError(
                    f"{row.name}: read {c.read} != accepted {c.accepted} + rejected {c.rejected_total}"
                    f" + deduplicated {c.deduplicated}; this is a bug in prep, please report it"
                )


def report_table(report: Report) -> Any:
    """A Report as rich tables: one line of counts per input (then the total), and beneath it every
    rejection reason and every kept-but-changed event per input, one per line (readable in 80 columns).

    Returns:
        a rich `Group` (print it with a rich Console).

    >>> from rich.console import Console
    >>> Console(width=120).print(report_table(Report("convert")))  # doctest: +SKIP
    """
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    names = [r.name for r in report.rows]
    base = _common_folder(names)
    title = f"{report.title} (inputs under {base}/)" if base else report.title
    table = Table(title=Text(title), title_justify="left")
    table.add_column("input", overflow="fold")
    table.add_column("format", overflow="fold")
    for name in ("read", "accepted", "rejected", "dedup"):
        table.add_column(name, justify="right", no_wrap=True)
    short = [row.name[len(base) + 1:] if base else row.name for row in report.rows]
    for name, row in zip(short, report.rows, strict=True):
        table.add_row(*_cells(name, row.kind, row.counts))
    if len(report.rows) != 1:
        table.add_section()
        table.add_row(*_cells("total", "", report.total), style="bold")
    details = Table(title="rejected by reason, and changes to kept records", title_justify="left")
    for name, justify in (("input", "left"), ("what", "left"), ("reason", "left"), ("count", "right")):
        details.add_column(name, justify=justify, overflow="fold")
    for name, row in zip(short, report.rows, strict=True):
        for what, counter in (("rejected", row.counts.rejected), ("changed", row.counts.events)):
            for reason, count in _by_count(counter):
                details.add_row(Text(name), what, reason, f"{count:,}")
    return Group(table, details) if details.row_count else table


def _common_folder(paths: list[str]) -> str:
    """The folder all paths share ("" when none), to shorten the input column."""
    import os

    if not paths:
        return ""
    if len(paths) == 1:
        return os.path.dirname(paths[0])
    try:
        base = os.path.commonpath(paths)
    except ValueError:
        return ""
    return base if base and all(p.startswith(base + os.sep) for p in paths) else ""


def _cells(name: str, kind: str, c: Counts) -> list[Any]:
    """One line of counts; the file name as plain text (a path may hold `[...]`, which rich reads as markup)."""
    from rich.text import Text

    return [Text(name), kind, f"{c.read:,}", f"{c.accepted:,}", f"{c.rejected_total:,}", f"{c.deduplicated:,}"]


def _by_count(counter: Counter[str]) -> list[tuple[str, int]]:
    """Counter items, most frequent first, ties by name."""
    return sorted(counter.items(), key=lambda kv: (-kv[1], kv[0]))


def pack_summary(report: PackReport) -> Any:
    """The summary of a pack run as rich renderables: inputs, examples, packing, markers, notices.

    Returns:
        a rich `Group` (print it with a Console).
    """
    from rich.console import Group
    from rich.text import Text

    notices = [Text(n, style="yellow") for n in report.notices]
    m = report.manifest
    if report.up_to_date:
        return Group(*notices, Text(f"{report.output}: up to date (fingerprint {m.get('fingerprint', '')[:12]})"))
    if "splits" in m:
        lines = [_split_line(split, report.split_manifests[split], report.output) for split in SPLITS]
        return Group(*notices, report_table(report.inputs), _sources_table(report.sources),
                     _examples_table(report.split_counts["train"], report.split_rejected["train"]),
                     *_marker_tables(report), *lines, *_left_out(report.split_counts["train"]),
                     *_not_written(report))
    lines = [_split_line(None, m, report.output)]
    if len(report.sources) > 1 or "mixture" in m:
        lines.insert(0, _sources_table(report.sources))
    return Group(*notices, report_table(report.inputs), _examples_table(report.counts, report.rejected),
                 *_marker_tables(report), *lines, *_left_out(report.counts), *_not_written(report))


def _left_out(c: Counter[str]) -> list[Any]:
    """Lines about the examples that were written: what the chat template left out (yellow), conversations
    expanded into one example per reply, tool call ids prep generated."""
    from rich.text import Text

    parts = [f"{c[key]:,} {what} ({key})" for key, what in (("template_dropped_message", "message(s)"),
                                                            ("template_dropped_reasoning", "reasoning block(s)"),
                                                            ("template_dropped_content", "tool-call message content(s)"))
             if c[key]]
    out = []
    if parts:
        out.append(Text("left out by the chat template, in examples that were written: " + ", ".join(parts),
                        style="yellow"))
    if c["expanded"]:
        out.append(Text(f"{c['expanded_conversations']:,} conversation(s) expanded into {c['expanded']:,} more "
                        "example(s): one per reply the chat template renders differently once later turns follow "
                        "(--expand-turns)"))
    if c["tool_call_ids_generated"]:
        out.append(Text(f"{c['tool_call_ids_generated']:,} tool call id(s) generated: the chat template needs ids "
                        "the data did not give (or gave in a form it refuses)"))
    return out


def _examples_table(c: Counter[str], rejected_by_reason: Counter[str]) -> Any:
    """Conversations, examples, extra pieces of over-long conversations, truncations, drops, rejects and tokens."""
    from rich.table import Table

    examples = Table(title="examples", title_justify="left")
    for name in ("conversations", "examples", "extra pieces", "truncated", "dropped", "rejected", "tokens", "trained"):
        examples.add_column(name, justify="right")
    rejected = sum(rejected_by_reason.values())
    examples.add_row(*(f"{v:,}" for v in (c["conversations"], c["examples"], c["extra_pieces"], c["truncated"], c["dropped"],
                                           rejected, c["tokens"], c["trained_tokens"])))
    return examples


def _sources_table(sources: list[dict[str, Any]]) -> Any:
    """One line per mixture source: counts before and after dedup, split and weighting."""
    from rich.table import Table
    from rich.text import Text

    table = Table(title="sources", title_justify="left")
    keys = ("accepted", "cross_source_duplicates", "validation", "train_before_weighting", "train")
    for name in ("source", "weight", "accepted", "cross-source dup", "validation", "train (before)", "train"):
        table.add_column(name, justify="left" if name == "source" else "right", overflow="fold")
    for s in sources:
        table.add_row(Text(s["name"]), f"{s['weight']:g}", *(f"{s['counts'][k]:,}" for k in keys))
    return table


def _split_line(split: str | None, m: dict[str, Any], output: str) -> Any:
    """Rows, packing efficiency and shard count of one shard folder."""
    from rich.text import Text

    p = m["packing"]
    where = join(output, split) if split else output
    prefix = f"{split}: " if split else ""
    return Text(f"{prefix}rows {p['rows']:,} (lower bound {p['lower_bound_rows']:,}), packing efficiency "
                f"{p['efficiency']:.2%}, {len(m['shards'])} shard(s) in {where}")


def _not_written(report: PackReport) -> list[Any]:
    """A yellow line naming what was rejected or dropped, if anything."""
    from rich.text import Text

    dropped = report.counts["dropped"]
    if not report.rejected and not dropped:
        return []
    reasons = dict(report.rejected) | ({"too_long": dropped} if dropped else {})
    return [Text("not written: " + ", ".join(f"{k} {v}" for k, v in sorted(reasons.items())) +
                 f" (see {join(report.output, REJECTS_FILE)})", style="yellow")]


def _marker_tables(report: PackReport) -> list[Any]:
    """One marker table for the run's template, or one per template when sources use several."""
    if not report.template_markers:
        return [_marker_table(report.markers)]
    return [_marker_table(checks, spec) for spec, checks in report.template_markers.items()]


def _marker_table(markers: list[MarkerCheck], template: str | None = None) -> Any:
    """How each template marker tokenizes with this tokenizer."""
    from rich.table import Table
    from rich.text import Text

    title = "template markers" + (f": {template}" if template else "")
    table = Table(title=Text(title), title_justify="left")
    for name in ("marker", "tokens", "special", "changes when text touches it"):
        table.add_column(name)
    for m in markers:
        # Text, not str: markers such as Mistral's `[/INST]` are not rich markup
        table.add_row(Text(m.marker), str(len(m.ids)), "yes" if m.special else "no",
                      Text(", ".join(m.changed_in) or "no"))
    return table
