"""`prep stats --plot`: the statistics drawn with matplotlib (the optional extra `prep-sft[plot]`).

Three labelled panels: examples per length bin (with max_len marked), trained and masked tokens per length
bin (stacked: where the loss is, by example length), and the fill of the rows (how full packing makes
them). `stats_figure` returns the matplotlib `Figure`; `write_plot` saves it as PNG, SVG or PDF, or as a
self-contained HTML page (the SVG inline plus the numbers as tables; no scripts, no external files).
matplotlib is imported only here, through its object API (no pyplot, no global backend switch), and
only when a plot is asked for; the same stats give byte-identical files.

>>> from prep.stats import shard_stats                              # doctest: +SKIP
>>> fig = stats_figure(shard_stats("shards/"))                      # doctest: +SKIP
>>> [ax.get_title() for ax in fig.axes]                             # doctest: +SKIP
['Examples by length', 'Trained and masked tokens by example length', 'Fill of packed rows']
"""

from __future__ import annotations

import html
import io
from pathlib import Path
from typing import Any

import numpy as np

from prep.errors import ConfigError
from prep.stats import HIST_BINS, Stats

PLOT_SUFFIXES = (".png", ".svg", ".pdf", ".html", ".htm")
PLOT_EXTRA = "pip install 'prep-sft[plot]'"
FILL_BINS = 20  # 5 % of max_len each
_TRAINED, _MASKED, _BARS, _MARK = "#2e8b57", "#a9a9a9", "#4682b4", "#c0392b"
# Fixed ids and no dates in the files: the same stats give the same bytes.
_RC = {"svg.hashsalt": "prep", "svg.fonttype": "none", "font.size": 9}  # "none": text stays text
_METADATA = {".png": {"Software": None}, ".svg": {"Date": None}, ".pdf": {"CreationDate": None}}


def check_plot_path(path: str | Path) -> Path:
    """The `--plot` path, after checking its suffix and that matplotlib is installed (before any work).

    Raises:
        ConfigError: an unknown suffix, or matplotlib missing (the message names the extra to install).

    >>> check_plot_path("lengths.jpg")
    Traceback (most recent call last):
    prep.errors.ConfigError: --plot lengths.jpg: expected a file ending in .png, .svg, .pdf, .html, .htm
    """
    path = Path(path)
    if path.suffix.lower() not in PLOT_SUFFIXES:
        raise ConfigError(f"--plot {path}: expected a file ending in {', '.join(PLOT_SUFFIXES)}")
    _matplotlib()
    return path


def write_plot(path: str | Path, stats: Stats, bins: int = HIST_BINS) -> Path:
    """Draw `stats` (see `stats_figure`) into `path`; the suffix picks PNG, SVG, PDF or HTML. Atomic.

    Returns:
        The path written.

    Raises:
        ConfigError: see `check_plot_path`.
    """
    from prep.sink import atomic_path

    path = check_plot_path(path)
    suffix = path.suffix.lower()
    figure = stats_figure(stats, bins)
    with atomic_path(path) as tmp:
        if suffix in (".html", ".htm"):
            tmp.write_text(stats_html(stats, figure, bins), encoding="utf-8")
        else:
            tmp.write_bytes(figure_bytes(figure, suffix.lstrip(".")))
    return path


def stats_figure(stats: Stats, bins: int = HIST_BINS) -> Any:
    """A matplotlib Figure of `stats`: examples by length, trained/masked tokens by length, row fill.

    Args:
        stats: from `shard_stats` or `input_stats`.
        bins: length bins (as the terminal histogram).

    Returns:
        A `matplotlib.figure.Figure` with three Axes, titled and labelled with units.

    Raises:
        ConfigError: matplotlib is not installed.
    """
    _matplotlib()
    from matplotlib.figure import Figure

    figure = Figure(figsize=(8.0, 9.0), dpi=100, layout="constrained")
    lengths_ax, tokens_ax, fill_ax = figure.subplots(3, 1)
    c, p = stats.counts, stats.packing
    figure.suptitle(f"prep stats · {stats.kind} · {_short(str(stats.source))}\n{c['examples']:,} examples · "
                    f"{c['tokens']:,} tokens · {stats.trained_fraction:.1%} trained · "
                    f"packing efficiency {p['efficiency']:.2%}", fontsize=10)
    _lengths_panel(lengths_ax, stats, bins)
    _tokens_panel(tokens_ax, stats, bins)
    _fill_panel(fill_ax, stats)
    from matplotlib.ticker import StrMethodFormatter

    for ax in figure.axes:
        ax.yaxis.set_major_formatter(StrMethodFormatter("{x:,.0f}"))
    return figure


def _short(text: str, width: int = 60) -> str:
    """`text`, or its last `width` - 1 characters after an ellipsis (paths keep their informative end)."""
    return text if len(text) <= width else "…" + text[-(width - 1) :]


def _lengths_panel(ax: Any, stats: Stats, bins: int) -> None:
    """Examples per length bin, max_len as a dashed line."""
    edges, counts = stats.histogram(bins)
    ax.bar(edges[:-1], counts, width=np.diff(edges), align="edge", color=_BARS, edgecolor="white", label="examples")
    ax.axvline(stats.max_len, color=_MARK, linestyle="--", label=f"max_len = {stats.max_len:,} tokens")
    ax.set(title="Examples by length", xlabel="example length (tokens)", ylabel="examples (count)")
    ax.legend(loc="best")


def _tokens_panel(ax: Any, stats: Stats, bins: int) -> None:
    """Trained and masked tokens per length bin, stacked."""
    edges, trained, masked = stats.tokens_by_length(bins)
    width = np.diff(edges)
    ax.bar(edges[:-1], trained, width=width, align="edge", color=_TRAINED, edgecolor="white", label="trained tokens")
    ax.bar(edges[:-1], masked, width=width, bottom=trained, align="edge", color=_MASKED, edgecolor="white",
           label="masked tokens (label -100)")
    ax.axvline(stats.max_len, color=_MARK, linestyle="--")
    ax.set(title="Trained and masked tokens by example length", xlabel="example length (tokens)",
           ylabel="tokens (count)")
    ax.legend(loc="best")


def _fill_panel(ax: Any, stats: Stats) -> None:
    """Rows by fill (tokens / max_len), with the mean (the packing efficiency)."""
    edges, counts = fill_histogram(stats)
    ax.bar(edges[:-1], counts, width=np.diff(edges), align="edge", color=_BARS, edgecolor="white", label="rows")
    ax.axvline(100 * stats.packing["efficiency"], color=_MARK, linestyle="--",
               label=f"mean fill = packing efficiency {stats.packing['efficiency']:.2%}")
    what = "packed rows" if stats.packed else "rows (one example per row)"
    title = f"Fill of {what}" + (" (as BFD packing would make them)" if stats.kind == "inputs" and stats.packed else "")
    ax.set(title=title, xlabel=f"row fill (% of max_len = {stats.max_len:,} tokens)", ylabel="rows (count)",
           xlim=(0, 100))
    ax.legend(loc="best")


def fill_histogram(stats: Stats, bins: int = FILL_BINS) -> tuple[np.ndarray, np.ndarray]:
    """Rows per fill bin: edges in percent of max_len (0..100), bin k holds edges[k] < fill <= edges[k+1].

    >>> from prep.stats import Stats
    >>> s = Stats("x", "shards", 10, np.array([]), np.array([]), {}, {}, {}, (), row_tokens=np.array([10, 5, 1]))
    >>> [a.tolist() for a in fill_histogram(s, bins=4)]
    [[0.0, 25.0, 50.0, 75.0, 100.0], [1, 1, 0, 1]]
    """
    fill = np.asarray(stats.row_tokens, dtype=np.int64)
    index = np.clip((fill * bins - 1) // max(stats.max_len, 1), 0, bins - 1)
    return np.linspace(0.0, 100.0, bins + 1), np.bincount(index, minlength=bins).astype(np.int64)


def figure_bytes(figure: Any, fmt: str) -> bytes:
    """The figure saved as `fmt` (png, svg, pdf), without dates or random ids.

    >>> figure_bytes(stats_figure(stats), "svg")[:5]                  # doctest: +SKIP
    b'<?xml'
    """
    import matplotlib

    buffer = io.BytesIO()
    with matplotlib.rc_context(_RC):
        figure.savefig(buffer, format=fmt, metadata=_METADATA.get(f".{fmt}"))
    return buffer.getvalue()


def stats_html(stats: Stats, figure: Any, bins: int = HIST_BINS) -> str:
    """A self-contained HTML page: the figure as inline SVG, then the numbers behind it as tables."""
    svg = figure_bytes(figure, "svg").decode("utf-8")
    svg = svg[svg.index("<svg") :]  # drop the XML declaration and DOCTYPE: not allowed inside HTML
    edges, counts = stats.histogram(bins)
    _, trained, masked = stats.tokens_by_length(bins)
    fill_edges, fill_counts = fill_histogram(stats)
    title = html.escape(f"prep stats · {stats.kind} · {stats.source}")
    lengths = _table(("from (tokens, exclusive)", "to (tokens)", "examples", "trained tokens", "masked tokens"),
                     zip(edges[:-1].tolist(), edges[1:].tolist(), counts.tolist(), trained.tolist(), masked.tolist()))
    fill = _table(("fill from (%)", "to (%)", "rows"),
                  zip(fill_edges[:-1].tolist(), fill_edges[1:].tolist(), fill_counts.tolist()))
    return (
        f'<!DOCTYPE html>\n<html lang="en">\n<head><meta charset="utf-8"><title>{title}</title></head>\n<body>\n'
        f"<h1>{title}</h1>\n{svg}\n<h2>Examples and tokens by example length</h2>\n{lengths}\n"
        f"<h2>Fill of rows (max_len = {stats.max_len:,} tokens)</h2>\n{fill}\n</body>\n</html>\n"
    )


def _table(header: tuple[str, ...], rows: Any) -> str:
    """An HTML table of numbers."""
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "\n".join("<tr>" + "".join(f"<td>{v:g}</td>" if isinstance(v, float) else f"<td>{v}</td>" for v in row)
                     + "</tr>" for row in rows)
    return f"<table>\n<tr>{head}</tr>\n{body}\n</table>"


def _matplotlib() -> Any:
    """The matplotlib module, or a ConfigError naming the extra that installs it."""
    try:
        import matplotlib
    except ImportError:
        raise ConfigError(f"--plot needs matplotlib, which is not installed: {PLOT_EXTRA}") from None
    return matplotlib
