"""Counters for a stage run, per input and in total, and their rendering as a rich Table.

Every stage that drops records counts them here by reason, and `check_accounting` proves that
nothing vanished: for every row, read == accepted + rejected + deduplicated.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from prep.errors import AccountingError


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


def render_report(report: Report) -> Any:
    """Render a Report with rich: one line of counts per input (then the total), and beneath it every
    rejection reason and every kept-but-changed event per input, one per line (readable in 80 columns).

    Returns:
        a rich `Group` (print it with a rich Console).

    >>> from rich.console import Console
    >>> Console(width=120).print(render_report(Report("convert")))  # doctest: +SKIP
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
