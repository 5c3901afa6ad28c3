"""Tests for prep.stats and prep.plot: numbers that agree with the manifest, and valid plot files."""

from __future__ import annotations

import json

import numpy as np
import pytest
from rich.console import Console

from _packed import ALPACA_EN, TOKENIZERS, packed_shards
from prep.load import load_shards
from prep.render import BUILTIN_TEMPLATES
from prep.stats import ROLES, input_stats, length_histogram, stats_summary, role_token_counts, shard_stats
from prep.tokenizer import default_tokenizer
from schemas.conversation import Conversation, Message

SMOLLM = str(TOKENIZERS / "smollm2-135m")


@pytest.fixture(scope="module")
def alpaca_200(tmp_path_factory):
    """The 200 Alpaca records the test shards are made of, as an input file."""
    path = tmp_path_factory.mktemp("inputs") / "alpaca200.json"
    path.write_text(json.dumps(json.loads(ALPACA_EN.read_text(encoding="utf-8"))[:200]), encoding="utf-8")
    return path


# ---------- hand-computed cases ----------


def test_length_histogram_bins_are_right_closed():
    edges, counts = length_histogram(np.array([1, 2, 3, 4, 5, 8]), max_len=8, bins=4)
    assert edges.tolist() == [0, 2, 4, 6, 8]
    assert counts.tolist() == [2, 2, 1, 1]
    edges, counts = length_histogram(np.array([10]), max_len=8, bins=4)  # longer than max_len widens the range
    assert edges[-1] >= 10 and counts.sum() == 1


def test_role_token_counts_by_span():
    conv = Conversation(
        id="a",
        messages=[
            Message(role="system", content="S"),
            Message(role="user", content="Hi"),
            Message(role="assistant", content="Yo!"),
        ],
    )
    roles, totals = role_token_counts([conv], default_tokenizer(), BUILTIN_TEMPLATES["chatml"])
    # "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nYo!<|im_end|>"
    # a span is the content plus its end marker; prefixes ("<|im_start|>role\n") and "\n" separators are template
    assert dict(zip(ROLES, roles.tolist())) == {"system": 2, "user": 3, "assistant": 4, "tool": 0,
                                                "template": 8 + 6 + 11 + 2}
    assert totals.tolist() == [roles.sum()]


# ---------- shards ----------


def test_shard_stats_agree_with_the_manifest():
    path = packed_shards()
    manifest = json.loads((path / "manifest.json").read_text())
    stats = shard_stats(path)
    for key in ("examples", "rows", "tokens", "trained_tokens", "truncated", "dropped", "conversations"):
        assert stats.counts[key] == manifest["counts"][key], key
    assert stats.counts["extra_pieces"] == manifest["counts"]["split"]  # the manifest keeps its key
    assert stats.packing == manifest["packing"]
    assert stats.packing["lower_bound_rows"] == -(-manifest["counts"]["tokens"] // manifest["max_len"])
    assert stats.counts["truncated"] > 0  # the 256-token limit truncates real records
    assert stats.tokens_by_role == {
        "trained": manifest["counts"]["trained_tokens"],
        "masked": manifest["counts"]["tokens"] - manifest["counts"]["trained_tokens"],
    }
    assert stats.trained_fraction == pytest.approx(manifest["counts"]["trained_tokens"] / manifest["counts"]["tokens"])
    assert stats.histogram()[1].sum() == manifest["counts"]["examples"]


def test_longest_examples_point_at_real_examples():
    path = packed_shards()
    stats = shard_stats(path, top=3)
    table = load_shards(path).table
    assert [x.tokens for x in stats.longest] == sorted(stats.lengths.tolist(), reverse=True)[:3]
    for item in stats.longest:
        row, example = (int(part.split()[-1]) for part in item.where.split(","))
        seq = table.column("seq_lengths")[row].as_py()
        assert seq[example] == item.tokens
        start = sum(seq[:example])
        labels = np.array(table.column("labels")[row].as_py()[start : start + item.tokens])
        assert np.count_nonzero(labels != -100) == item.trained


def test_input_stats_match_the_shards_made_from_the_same_records(alpaca_200):
    stats = input_stats(alpaca_200, tokenizer=SMOLLM, template="markers", max_len=256, overflow="truncate")
    manifest = json.loads((packed_shards() / "manifest.json").read_text())
    for key in ("conversations", "examples", "rows", "tokens", "trained_tokens", "truncated", "dropped"):
        assert stats.counts[key] == manifest["counts"][key], key
    assert stats.counts["extra_pieces"] == manifest["counts"]["split"]  # the manifest keeps its key
    assert stats.packing == manifest["packing"]  # the same best-fit-decreasing plan
    assert stats.counts["over_max_len"] == stats.counts["truncated"]
    roles = stats.tokens_by_role
    assert roles["system"] == 0 and roles["user"] > 0 and roles["template"] > 0
    assert sum(roles.values()) > stats.counts["tokens"]  # roles count whole conversations, before truncation


def test_input_stats_without_overflow_count_assistant_tokens_as_trained(alpaca_200):
    stats = input_stats(alpaca_200, tokenizer=SMOLLM, template="markers", max_len=4096)
    assert stats.counts["truncated"] == stats.counts["over_max_len"] == 0
    assert stats.tokens_by_role["assistant"] == stats.counts["trained_tokens"]
    assert sum(stats.tokens_by_role.values()) == stats.counts["tokens"]
    assert stats.longest[0].tokens == stats.counts["longest_conversation"] == stats.lengths.max()
    assert stats.longest[0].where  # the example id


def test_stats_summary_shows_the_numbers():
    stats = shard_stats(packed_shards())
    console = Console(record=True, width=120)
    console.print(stats_summary(stats))
    out = console.export_text()
    assert f"{stats.counts['tokens']:,}" in out and "packing efficiency" in out and "█" in out
    assert f"lower bound {stats.packing['lower_bound_rows']}" in out
