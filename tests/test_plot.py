"""prep.plot: the `prep stats --plot` figure, read back from the matplotlib Figure and from the files, on real shards."""

from __future__ import annotations

import os
import subprocess
import sys
import xml.etree.ElementTree as ET
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest

from _packed import ALPACA_EN, TOKENIZERS, packed_shards
from prep.errors import ConfigError
from prep.plot import PLOT_EXTRA, check_plot_path, fill_histogram, stats_figure, write_plot
from prep.stats import input_stats, shard_stats

REPO = Path(__file__).resolve().parents[1]
SVG = "{http://www.w3.org/2000/svg}"


@pytest.fixture(scope="module")
def stats():
    """Statistics of real shards: 200 Alpaca records, SmolLM2 tokenizer, max-len 256 (some rows not full)."""
    return shard_stats(packed_shards())


def _bar_heights(ax) -> list[float]:
    return [patch.get_height() for patch in ax.patches]


def test_figure_has_three_labelled_panels_with_units(stats):
    figure = stats_figure(stats)
    titles = [ax.get_title() for ax in figure.axes]
    assert titles == ["Examples by length", "Trained and masked tokens by example length", "Fill of packed rows"]
    assert [(ax.get_xlabel(), ax.get_ylabel()) for ax in figure.axes] == [
        ("example length (tokens)", "examples (count)"),
        ("example length (tokens)", "tokens (count)"),
        ("row fill (% of max_len = 256 tokens)", "rows (count)"),
    ]
    suptitle = figure.get_suptitle()
    assert str(stats.source)[-40:] in suptitle and f"{stats.counts['examples']:,} examples" in suptitle
    assert f"{stats.trained_fraction:.1%} trained" in suptitle
    legends = [[t.get_text() for t in ax.get_legend().get_texts()] for ax in figure.axes]
    assert legends[0] == ["max_len = 256 tokens", "examples"]
    assert legends[1] == ["trained tokens", "masked tokens (label -100)"]


def test_bars_are_the_statistics(stats):
    lengths_ax, tokens_ax, fill_ax = stats_figure(stats, bins=8).axes
    edges, counts = stats.histogram(8)
    assert _bar_heights(lengths_ax) == counts.tolist()
    assert [p.get_x() for p in lengths_ax.patches] == edges[:-1].tolist()
    # stacked: 8 trained bars, then 8 masked bars sitting on them; they add up to the shards' token counts
    heights = _bar_heights(tokens_ax)
    trained, masked = heights[:8], heights[8:]
    assert sum(trained) == stats.counts["trained_tokens"]
    assert sum(trained) + sum(masked) == stats.counts["tokens"]
    assert [p.get_y() for p in tokens_ax.patches[8:]] == trained
    per_bin = np.bincount(np.clip((stats.lengths - 1) // (edges[1] - edges[0]), 0, 7), weights=stats.trained)
    assert trained == per_bin.tolist()
    assert sum(_bar_heights(fill_ax)) == stats.counts["rows"] == len(stats.row_tokens)
    assert stats.row_tokens.sum() == stats.counts["tokens"]
    assert lengths_ax.lines[0].get_xdata()[0] == 256  # the max_len line
    mean_fill = fill_ax.lines[0].get_xdata()[0]
    assert mean_fill == pytest.approx(100 * stats.counts["tokens"] / (stats.counts["rows"] * 256), abs=1e-3)


def test_fill_of_rows_counts_rows_by_percent_of_max_len(stats):
    edges, counts = fill_histogram(stats)
    assert edges[0] == 0 and edges[-1] == 100 and len(counts) == 20
    fill = 100 * stats.row_tokens / stats.max_len
    assert counts[-1] == np.count_nonzero(fill > 95)
    assert counts.sum() == stats.counts["rows"]


def test_svg_is_readable_text_and_byte_stable(stats, tmp_path):
    path = write_plot(tmp_path / "stats.svg", stats)
    root = ET.fromstring(path.read_bytes())
    texts = ["".join(t.itertext()) for t in root.iter(f"{SVG}text")]
    for label in ("Examples by length", "Fill of packed rows", "example length (tokens)", "tokens (count)",
                  "trained tokens", "masked tokens (label -100)", "row fill (% of max_len = 256 tokens)"):
        assert label in texts, label
    again = write_plot(tmp_path / "again.svg", stats)
    assert again.read_bytes() == path.read_bytes()  # no dates, fixed ids
    assert write_plot(tmp_path / "a.png", stats).read_bytes() == write_plot(tmp_path / "b.png", stats).read_bytes()


def test_png_is_an_image_with_the_trained_colour(stats, tmp_path):
    from matplotlib.image import imread

    image = imread(write_plot(tmp_path / "stats.png", stats))
    assert image.shape[:2] == (900, 800)
    green = np.all(np.abs(image[..., :3] - np.array([0x2E, 0x8B, 0x57]) / 255) < 0.02, axis=-1)
    assert green.sum() > 500  # the trained-token bars are drawn


class _Tags(HTMLParser):
    """Start/end tags, checking they nest (SVG's self-closed elements aside)."""

    def __init__(self):
        super().__init__()
        self.stack, self.tags = [], []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        if tag != "meta":
            self.stack.append(tag)

    def handle_startendtag(self, tag, attrs):
        self.tags.append(tag)

    def handle_endtag(self, tag):
        assert self.stack.pop() == tag


def test_html_page_is_self_contained_with_the_numbers(stats, tmp_path):
    text = write_plot(tmp_path / "stats.html", stats).read_text(encoding="utf-8")
    parser = _Tags()
    parser.feed(text)
    assert parser.stack == [] and "script" not in parser.tags and "img" not in parser.tags and "link" not in parser.tags
    svg = ET.fromstring(text[text.index("<svg") : text.index("</svg>") + len("</svg>")])
    assert "Examples by length" in ["".join(t.itertext()) for t in svg.iter(f"{SVG}text")]
    edges, counts = stats.histogram()
    _, trained, masked = stats.tokens_by_length()
    rows = [f"<tr><td>{a}</td><td>{b}</td><td>{c}</td><td>{t}</td><td>{m}</td></tr>"
            for a, b, c, t, m in zip(edges[:-1], edges[1:], counts, trained, masked)]
    assert all(row in text for row in rows)


def test_inputs_and_unpacked_shards_are_drawn_too(tmp_path):
    path = tmp_path / "alpaca.json"
    path.write_text(ALPACA_EN.read_text(encoding="utf-8"), encoding="utf-8")
    stats = input_stats(path, tokenizer=str(TOKENIZERS / "smollm2-135m"), template="markers", max_len=512)
    figure = stats_figure(stats)
    assert figure.axes[2].get_title() == "Fill of packed rows (as BFD packing would make them)"
    assert sum(_bar_heights(figure.axes[2])) == stats.counts["rows"]
    unpacked = shard_stats(packed_shards(packed=False))
    assert stats_figure(unpacked).axes[2].get_title() == "Fill of rows (one example per row)"
    assert len(unpacked.row_tokens) == unpacked.counts["examples"]


def test_bad_suffix_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match=r"--plot .*lengths\.jpg: expected a file ending in \.png"):
        check_plot_path(tmp_path / "lengths.jpg")


_BLOCK_MATPLOTLIB = "import sys; sys.modules['matplotlib'] = None; from prep.cli import main; sys.argv[0] = 'prep'; main()"


def _prep_without_matplotlib(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    """`prep ARGS` in a Python where `import matplotlib` fails, as where the [plot] extra is not installed."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", COLUMNS="200")
    return subprocess.run([sys.executable, "-c", _BLOCK_MATPLOTLIB, *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=600)


def test_without_matplotlib_plot_is_one_line_naming_the_extra(tmp_path):
    shards = str(packed_shards())
    done = _prep_without_matplotlib("stats", shards, "--plot", "lengths.png", cwd=tmp_path)
    assert done.returncode == 1
    assert done.stderr.strip().splitlines() == [f"error: --plot needs matplotlib, which is not installed: {PLOT_EXTRA}"]
    assert "Traceback" not in done.stderr and not (tmp_path / "lengths.png").exists()
    done = _prep_without_matplotlib("stats", shards, cwd=tmp_path)  # the terminal histogram needs no matplotlib
    assert done.returncode == 0 and "█" in done.stdout, done.stderr


def test_matplotlib_is_imported_only_for_a_plot():
    code = ("import sys; from prep.cli import app; from prep.stats import shard_stats, stats_summary; "
            f"stats_summary(shard_stats({str(packed_shards())!r})); print('matplotlib' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=600,
                          env=dict(os.environ, HF_HUB_OFFLINE="1"))
    assert done.stdout.strip() == "False", done.stderr


def test_docstring_examples():
    import doctest
    import importlib

    result = doctest.testmod(importlib.import_module("prep.plot"))
    assert result.failed == 0 and result.attempted > 0
