"""Histogram plots without matplotlib: a PNG drawn with numpy and written with zlib + struct, or an HTML page
with an inline SVG (self-contained: no scripts, no external files).

>>> import tempfile, os; out = os.path.join(tempfile.mkdtemp(), "lengths.png")
>>> write_histogram(out, np.array([0, 128, 256]), np.array([5, 2])).read_bytes()[:8]
b'\\x89PNG\\r\\n\\x1a\\n'
"""

from __future__ import annotations

import html
import struct
import zlib
from pathlib import Path

import numpy as np

from prep.errors import ConfigError

PLOT_SUFFIXES = (".png", ".html", ".htm", ".svg")
_BAR = (46, 139, 87)
_AXIS = (60, 60, 60)
# 3x5 bitmap glyphs (rows top to bottom, 3 bits each) for axis numbers.
_GLYPHS = {
    "0": (7, 5, 5, 5, 7), "1": (2, 6, 2, 2, 7), "2": (7, 1, 7, 4, 7), "3": (7, 1, 7, 1, 7), "4": (5, 5, 7, 1, 1),
    "5": (7, 4, 7, 1, 7), "6": (7, 4, 7, 5, 7), "7": (7, 1, 1, 1, 1), "8": (7, 5, 7, 5, 7), "9": (7, 5, 7, 1, 7),
    "k": (4, 5, 6, 5, 5), "M": (5, 7, 7, 5, 5), ".": (0, 0, 0, 0, 2), "-": (0, 0, 7, 0, 0), " ": (0, 0, 0, 0, 0),
}  # fmt: skip


def write_histogram(
    path: str | Path,
    edges: np.ndarray,
    counts: np.ndarray,
    *,
    title: str = "",
    xlabel: str = "tokens per example",
    ylabel: str = "examples",
) -> Path:
    """Write a bar chart of a histogram; the suffix picks the format: .png, .html/.htm (SVG inside) or .svg.

    Args:
        path: output file.
        edges: bin edges (len(counts) + 1), ascending.
        counts: examples per bin.
        title, xlabel, ylabel: labels (HTML/SVG only; the PNG shows numbers on its axes).

    Returns:
        The path written.

    Raises:
        ConfigError: an unknown suffix.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in PLOT_SUFFIXES:
        raise ConfigError(f"--plot {path}: expected a file ending in {', '.join(PLOT_SUFFIXES)}")
    if suffix == ".png":
        path.write_bytes(histogram_png(edges, counts))
    elif suffix == ".svg":
        path.write_text(histogram_svg(edges, counts, title, xlabel, ylabel), encoding="utf-8")
    else:
        path.write_text(histogram_html(edges, counts, title, xlabel, ylabel), encoding="utf-8")
    return path


# --------------------------------------------------------------------------------------------------
# PNG


def histogram_png(edges: np.ndarray, counts: np.ndarray, width: int = 640, height: int = 360) -> bytes:
    """A PNG (RGB, 8-bit) of the histogram: green bars, axes, the x range and the largest count as numbers.

    >>> histogram_png(np.array([0, 1, 2]), np.array([1, 3]))[12:16]
    b'IHDR'
    """
    img = np.full((height, width, 3), 255, dtype=np.uint8)
    left, right, top, bottom = 56, 16, 16, 40
    plot_w, plot_h = width - left - right, height - top - bottom
    counts = np.asarray(counts, dtype=np.int64)
    peak = max(int(counts.max()) if len(counts) else 0, 1)
    xs = left + (np.arange(len(counts) + 1) * plot_w) // max(len(counts), 1)
    for k, count in enumerate(counts.tolist()):
        bar_h = (count * plot_h) // peak
        img[top + plot_h - bar_h : top + plot_h, xs[k] + 1 : max(xs[k] + 2, xs[k + 1] - 1)] = _BAR
    img[top : top + plot_h + 1, left - 1] = _AXIS
    img[top + plot_h, left - 1 : left + plot_w] = _AXIS
    _draw_text(img, _short(edges[0]), left, top + plot_h + 8)
    last = _short(edges[-1])
    _draw_text(img, last, left + plot_w - 8 * len(last), top + plot_h + 8)
    middle = _short(edges[len(counts) // 2])
    _draw_text(img, middle, xs[len(counts) // 2] - 4 * len(middle), top + plot_h + 8)
    _draw_text(img, _short(peak), 4, top)
    _draw_text(img, "0", left - 12, top + plot_h - 10)
    return encode_png(img)


def encode_png(img: np.ndarray) -> bytes:
    """PNG bytes of an (height, width, 3) uint8 image: signature, IHDR, one zlib IDAT, IEND.

    >>> encode_png(np.zeros((1, 1, 3), np.uint8))[:8]
    b'\\x89PNG\\r\\n\\x1a\\n'
    """
    height, width, _ = img.shape
    raw = np.concatenate([np.zeros((height, 1), np.uint8), img.reshape(height, width * 3)], axis=1)  # filter 0
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _chunk(b"IHDR", header)
        + _chunk(b"IDAT", zlib.compress(raw.tobytes(), 9))
        + _chunk(b"IEND", b"")
    )


def _chunk(kind: bytes, data: bytes) -> bytes:
    """One PNG chunk: length, type, data, CRC of type + data."""
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _draw_text(img: np.ndarray, text: str, x: int, y: int, scale: int = 2) -> None:
    """Draw `text` with the 3x5 glyphs at (x, y), each glyph pixel `scale` pixels wide."""
    for char in text:
        for row, bits in enumerate(_GLYPHS.get(char, _GLYPHS[" "])):
            for col in range(3):
                if bits >> (2 - col) & 1:
                    y0, x0 = y + row * scale, x + col * scale
                    img[y0 : y0 + scale, x0 : x0 + scale] = _AXIS
        x += 4 * scale


def _short(value: float) -> str:
    """A number in at most a few glyphs: 950, 12k, 3.4M."""
    value = float(value)
    if abs(value) >= 1e6:
        return f"{value / 1e6:.1f}M"
    if abs(value) >= 1e4:
        return f"{value / 1e3:.0f}k"
    return f"{value:.0f}"


# --------------------------------------------------------------------------------------------------
# SVG / HTML


def histogram_svg(
    edges: np.ndarray,
    counts: np.ndarray,
    title: str = "",
    xlabel: str = "",
    ylabel: str = "",
    width: int = 720,
    height: int = 400,
) -> str:
    """A standalone SVG document of the histogram, with a tooltip (`<title>`) on every bar.

    >>> histogram_svg(np.array([0, 1]), np.array([2])).startswith("<svg")
    True
    """
    left, right, top, bottom = 64, 16, 32, 48
    plot_w, plot_h = width - left - right, height - top - bottom
    counts = np.asarray(counts, dtype=np.int64)
    peak = max(int(counts.max()) if len(counts) else 0, 1)
    step = plot_w / max(len(counts), 1)
    esc = html.escape
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" font-family="sans-serif" font-size="12">',
        f'<text x="{width / 2:.0f}" y="20" text-anchor="middle" font-size="14">{esc(title)}</text>',
    ]
    for k, count in enumerate(counts.tolist()):
        h = count * plot_h / peak
        tip = f"{_short(edges[k])}–{_short(edges[k + 1])}: {count}"
        parts.append(
            f'<rect x="{left + k * step + 1:.1f}" y="{top + plot_h - h:.1f}" width="{max(step - 2, 1):.1f}" '
            f'height="{h:.1f}" fill="rgb{_BAR}"><title>{esc(tip)}</title></rect>'
        )
    parts += [
        f'<line x1="{left}" y1="{top + plot_h}" x2="{left + plot_w}" y2="{top + plot_h}" stroke="black"/>',
        f'<line x1="{left}" y1="{top}" x2="{left}" y2="{top + plot_h}" stroke="black"/>',
        f'<text x="{left}" y="{top + plot_h + 16}" text-anchor="middle">{_short(edges[0])}</text>',
        f'<text x="{left + plot_w}" y="{top + plot_h + 16}" text-anchor="middle">{_short(edges[-1])}</text>',
        f'<text x="{left - 6}" y="{top + 4}" text-anchor="end">{peak}</text>',
        f'<text x="{left + plot_w / 2:.0f}" y="{height - 10}" text-anchor="middle">{esc(xlabel)}</text>',
        f'<text x="14" y="{top + plot_h / 2:.0f}" text-anchor="middle" '
        f'transform="rotate(-90 14 {top + plot_h / 2:.0f})">{esc(ylabel)}</text>',
        "</svg>",
    ]
    return "\n".join(parts) + "\n"


def histogram_html(edges: np.ndarray, counts: np.ndarray, title: str = "", xlabel: str = "", ylabel: str = "") -> str:
    """A self-contained HTML page: the SVG histogram and a table of the bins.

    >>> "<svg" in histogram_html(np.array([0, 1]), np.array([2]), "lengths")
    True
    """
    rows = "\n".join(
        f"<tr><td>{int(a)}</td><td>{int(b)}</td><td>{int(c)}</td></tr>"
        for a, b, c in zip(edges[:-1], edges[1:], counts)
    )
    return (
        f'<!DOCTYPE html>\n<html lang="en">\n<head><meta charset="utf-8"><title>{html.escape(title)}</title></head>\n'
        f"<body>\n{histogram_svg(edges, counts, title, xlabel, ylabel)}"
        f"<table>\n<tr><th>from</th><th>to</th><th>{html.escape(ylabel)}</th></tr>\n{rows}\n</table>\n"
        "</body>\n</html>\n"
    )
