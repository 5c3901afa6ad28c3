"""Tests for prep.inspect: decoded rows split into trained/masked pieces, on real shards and real records."""

from __future__ import annotations

import json

import numpy as np
import pytest
from rich.color import Color
from rich.console import Console

from _packed import ALPACA_EN, DATA, TOKENIZERS, packed_shards, tokenizer
from prep.errors import ConfigError, InputError
from prep.inspect import (
    NEWLINE_GLYPH,
    TextSpan,
    example_text,
    example_views,
    inspect_record,
    inspect_shards,
    iter_row_views,
    label_pieces,
    marker_pattern,
    row_display,
    token_texts,
)
from prep.render import BUILTIN_TEMPLATES
from prep.tokenizer import default_tokenizer

SHAREGPT = DATA / "sharegpt" / "sharegpt_zh_1K_format.jsonl"
RESPONSE = "###response###\n"


# ---------- hand-computed cases (the embedded byte tokenizer: one token per byte) ----------


def test_label_pieces_cut_at_mask_changes_and_markers():
    tok = default_tokenizer()
    text = "###instruction###\nQ?\n\n###response###\nA!\n###<|endoftext|>"
    ids = np.array(tok(text, add_special_tokens=False).input_ids)
    start = text.index("A!")  # every earlier character is one token with this tokenizer, except the 2 markers
    n_prompt = start - len("###instruction###") - len("###response###") + 2
    labels = np.where(np.arange(len(ids)) >= n_prompt, ids, -100)
    pieces = label_pieces(ids, labels, tok, marker_pattern(tok, BUILTIN_TEMPLATES["markers"]))
    assert pieces == [
        TextSpan("###instruction###", False, True),
        TextSpan("\nQ?\n\n", False),
        TextSpan("###response###", False, True),
        TextSpan("\n", False),
        TextSpan("A!\n", True),
        TextSpan("###", True, True),
        TextSpan("<|endoftext|>", True, True),
    ]


def test_example_views_split_rows_at_seq_lengths():
    tok = default_tokenizer()
    ids = np.array(tok("abcde", add_special_tokens=False).input_ids)
    views = example_views(ids, np.array([-100, 98, -100, -100, 101]), [2, 3], tok)
    assert [(v.index, v.start, v.trained_tokens) for v in views] == [(0, 0, 1), (1, 2, 1)]
    assert [[(p.text, p.trained) for p in v.pieces] for v in views] == [
        [("a", False), ("b", True)],
        [("cd", False), ("e", True)],
    ]
    only = example_views(ids, np.full(5, -100), [2, 3], tok, example=1)
    assert [v.index for v in only] == [1]
    with pytest.raises(ConfigError, match="--example 2"):
        example_views(ids, np.full(5, -100), [2, 3], tok, example=2)


@pytest.mark.parametrize("name", ["mistral-7b-instruct-v0.3", "gpt2-dialogpt-small"])
def test_token_texts_concatenate_to_the_decoded_text(name):
    tok = tokenizer(name)
    text = "  Hello wörld\n\n量子通量 😀 —\tend"
    ids = np.array(tok(text, add_special_tokens=False).input_ids)
    pieces = token_texts(tok, ids)
    assert len(pieces) == len(ids)
    assert "".join(pieces) == tok.backend_tokenizer.decode(ids.tolist(), skip_special_tokens=False)


# ---------- real shards ----------


def test_masked_pieces_are_exactly_the_prompt_in_every_real_example():
    path = packed_shards()
    manifest = json.loads((path / "manifest.json").read_text())
    tok = tokenizer()
    seen = 0
    for view in iter_row_views(path):
        assert view.num_tokens <= manifest["max_len"]
        for ex in view.examples:
            text = "".join(p.text for p in ex.pieces)
            assert text == tok.backend_tokenizer.decode(ex.input_ids.tolist(), skip_special_tokens=False)
            cut = text.index(RESPONSE) + len(RESPONSE)
            assert "".join(p.text for p in ex.pieces if not p.trained) == text[:cut]
            assert "".join(p.text for p in ex.pieces if p.trained) == text[cut:]
            markers = [p.text for p in ex.pieces if p.marker]
            assert markers[:2] == ["###instruction###", "###response###"]
            seen += 1
    assert seen == manifest["counts"]["examples"]


def _coloured(segments, colour: str) -> str:
    """The text of the rendered segments drawn in `colour`, without line breaks."""
    return "".join(s.text for s in segments if s.style and s.style.color == Color.parse(colour)).replace("\n", "")


def test_rendered_colours_follow_the_mask():
    path = packed_shards()
    view = next(v for v in iter_row_views(path) if v.num_examples >= 2)  # a row packing several examples
    console = Console(width=100_000, color_system="truecolor")
    for ex in view.examples:
        segments = list(console.render(example_text(ex)))
        text = "".join(p.text for p in ex.pieces)
        cut = text.index(RESPONSE) + len(RESPONSE)
        assert _coloured(segments, "grey58") == text[:cut].replace("\n", NEWLINE_GLYPH)  # the prompt, masked
        assert _coloured(segments, "green") == text[cut:].replace("\n", NEWLINE_GLYPH)  # the response, trained
        reversed_ = [s.text for s in segments if s.style and s.style.reverse]
        assert reversed_[:2] == ["###instruction###", "###response###"]


def test_row_and_example_selection_and_ids_table():
    path = packed_shards()
    view = inspect_shards(path, row=3)
    assert view.title.endswith("row 3 of 120") and view.num_examples == len(view.examples)
    last = inspect_shards(path, row=3, example=view.num_examples - 1)
    assert [e.index for e in last.examples] == [view.num_examples - 1]
    assert last.examples[0].start == view.examples[-1].start
    console = Console(record=True, width=200)
    console.print(row_display(last, ids=True))
    out = console.export_text()
    ex = last.examples[0]
    assert f"{ex.start}  " in out and str(int(ex.input_ids[0])) in out and "-100" in out
    with pytest.raises(ConfigError, match="--row 120"):
        inspect_shards(path, row=120)


# ---------- single records, without shards ----------


def test_record_with_markers_template_masks_the_prompt():
    record = json.loads(ALPACA_EN.read_text(encoding="utf-8"))[4]
    view = inspect_record(ALPACA_EN, 4, tokenizer=str(TOKENIZERS / "smollm2-135m"), template="markers", max_len=1024)
    (ex,) = view.examples
    user = record["instruction"] + (f"\n\n{record['input']}" if record["input"] else "")
    assert "".join(p.text for p in ex.pieces if not p.trained) == f"###instruction###\n{user}\n\n{RESPONSE}"
    assert "".join(p.text for p in ex.pieces if p.trained) == f"{record['output']}\n###<|endoftext|>"


def test_record_with_a_chat_template_trains_only_the_replies():
    line = json.loads(SHAREGPT.read_text(encoding="utf-8").splitlines()[2])
    replies = [m["value"] for m in line["conversations"] if m["from"] == "gpt"]
    view = inspect_record(
        SHAREGPT, 2, tokenizer=str(TOKENIZERS / "qwen2-1.5b-instruct-boundless"), template="tokenizer", max_len=8192
    )
    (ex,) = view.examples
    trained = [p for p in ex.pieces if p.trained]
    assert "".join(p.text for p in trained) == "".join(f"{r}<|im_end|>" for r in replies)
    assert [p.text for p in trained if p.marker] == ["<|im_end|>"] * len(replies)
    assert ex.example_id and view.num_examples == 1


def test_record_errors_name_the_record():
    with pytest.raises(InputError, match="no_assistant_turn"):
        inspect_record(SHAREGPT, 780)  # a real record that ends with a user turn
    with pytest.raises(InputError, match="fewer records"):
        inspect_record(ALPACA_EN, 5000)
