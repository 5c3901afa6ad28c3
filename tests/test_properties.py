"""Property-based tests (hypothesis) of the converter, the label masks and the packer.

For random conversations and lengths: the accounting balances, accepted content is exact, the trained
tokens decode to exactly the assistant text(s) plus their end marker, every example lands in exactly one
row, and `prep verify` finds nothing wrong with shards built from them (embedded and real tokenizers).
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from prep.convert import iter_conversations
from prep.encode import Encoder
from prep.load import load_shards
from prep.pack import plan_bfd, shuffle_rows
from prep.pipeline import pack_shards
from prep.render import BUILTIN_TEMPLATES
from prep.report import Report
from prep.spill import ExampleStore
from prep.tokenizer import default_tokenizer, load_tokenizer
from prep.verify import verify_shards
from prep.write import write_shards
from schemas.conversation import Conversation, Message, conversation_problems
from schemas.pack_config import PackConfig
from schemas.reject import Reject

SETTINGS = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
# Text that no template treats as a marker: letters, digits, CJK, emoji, punctuation (no '<', '[', '#'),
# spaces and newlines inside. Starts and ends with a visible character, so no token merges across a turn edge.
_CHARS = st.sampled_from(list("abcdefghijklmnopqrstuvwxyzABCDEFGHIJ0123456789.,;:!?'\"()-_=+*/\\%&$@") +
                         ["é", "ü", "中", "文", "日本", "Ж", "ب", "🙂", " ", "  ", "\n", "\t"])
_VISIBLE = st.sampled_from(list("abcdefghijklmnopqrstuvwxyzABCDEFGHIJ0123456789.!?") + ["中", "Ж", "🙂"])
TEXT = st.builds(lambda a, mid, b: a + "".join(mid) + b, _VISIBLE, st.lists(_CHARS, max_size=40), _VISIBLE)
ANY_TEXT = st.text(max_size=30)  # any Unicode, surrogates and NUL included
ROLES = st.sampled_from(["system", "user", "assistant", "tool"])


@st.composite
def conversations(draw, max_turns: int = 4) -> list[tuple[str, str]]:
    """A valid conversation as (role, content) pairs: optional system, alternating user/assistant pairs."""
    turns = [("system", draw(TEXT))] if draw(st.booleans()) else []
    for _ in range(draw(st.integers(1, max_turns))):
        turns += [("user", draw(TEXT)), ("assistant", draw(TEXT))]
    return turns


def _write_jsonl(path: Path, records: list[dict]) -> Path:
    """Records as JSON lines (non-ASCII kept, lone surrogates escaped)."""
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def _openai(turns: list[tuple[str, str]]) -> dict:
    """An OpenAI-messages record."""
    return {"messages": [{"role": r, "content": c} for r, c in turns]}


@pytest.fixture(scope="module")
def work() -> Path:
    """A scratch folder shared by the hypothesis examples of this module (function-scoped tmp_path is not
    reset between examples)."""
    folder = Path(tempfile.mkdtemp(prefix="prep-properties-"))
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


# --- converter -------------------------------------------------------------------------------------


@SETTINGS
@given(records=st.lists(st.lists(st.tuples(ROLES, ANY_TEXT), max_size=6), min_size=1, max_size=12))
def test_converter_accounts_for_every_record(work: Path, records: list[list[tuple[str, str]]]):
    """Any role sequence and any text: read == accepted + rejected, each accepted conversation obeys the turn
    rules, and a record that already obeys them is accepted with exactly its messages."""
    path = _write_jsonl(work / "any.jsonl", [_openai(turns) for turns in records])
    report = Report("t")
    out = list(iter_conversations(path, report=report))
    assert len(out) == len(records) == report.total.read
    assert report.total.accepted + report.total.rejected_total == report.total.read
    for turns, item in zip(records, out, strict=True):
        if isinstance(item, Reject):
            assert item.reason and item.errors
            continue
        assert conversation_problems(item.messages) == []
        if "tool" not in {r for r, _ in turns} and not conversation_problems(_messages(turns)):
            assert [(m.role, m.content) for m in item.messages] == turns


def _messages(turns: list[tuple[str, str]]) -> list[Message]:
    """Messages from (role, content) pairs whose roles are unified roles."""
    return [Message(role=r, content=c) for r, c in turns]


@SETTINGS
@given(records=st.lists(conversations(), min_size=1, max_size=10))
def test_valid_conversations_round_trip_exactly(work: Path, records: list[list[tuple[str, str]]]):
    """Valid conversations (OpenAI and Alpaca forms) are all accepted, in order, with exact content."""
    path = _write_jsonl(work / "valid.jsonl", [_openai(t) for t in records])
    got = [[(m.role, m.content) for m in c.messages] for c in iter_conversations(path)]
    assert got == records
    pairs = [(t[-2][1], t[-1][1]) for t in records]
    alpaca = _write_jsonl(work / "alpaca.jsonl", [{"instruction": q, "output": a} for q, a in pairs])
    assert [[m.content for m in c.messages] for c in iter_conversations(alpaca)] == [[q, a] for q, a in pairs]


# --- label masks -----------------------------------------------------------------------------------

ENCODE_CASES = {
    "default-markers": ("default", "markers", "\n###<|endoftext|>"),
    "default-chatml": ("default", "chatml", "<|im_end|>"),
    "smollm2-chatml": ("smollm2-135m", "chatml", "<|im_end|>"),
    "gpt2-markers": ("gpt2-dialogpt-small", "markers", "\n###<|endoftext|>"),
}


def _tokenizer(name: str, shared_data: Path):
    """The embedded tokenizer ("default") or a real one from shared_data/tokenizers (cached)."""
    if name not in _TOKENIZER_CACHE:
        folder = shared_data / "tokenizers" / name
        _TOKENIZER_CACHE[name] = default_tokenizer() if name == "default" else load_tokenizer(str(folder))
    return _TOKENIZER_CACHE[name]


_TOKENIZER_CACHE: dict = {}


def _expected_trained(turns: list[tuple[str, str]], train_on: str, end: str) -> str:
    """The text the label mask must select: every answer (or only the last) followed by its end marker."""
    answers = [c for r, c in turns if r == "assistant"]
    return "".join(a + end for a in (answers[-1:] if train_on == "last" else answers))


@pytest.mark.parametrize("case", list(ENCODE_CASES))
@SETTINGS
@given(batch=st.lists(conversations(max_turns=3), min_size=1, max_size=6),
       train_on=st.sampled_from(["completion", "last"]))
def test_trained_tokens_decode_to_the_answers(shared_data: Path, case: str, batch: list[list[tuple[str, str]]],
                                              train_on: str):
    """Per example: labels are -100 or the token, the first is -100, and the trained tokens decode to exactly
    the assistant text(s) plus their end marker."""
    tok_name, template, end = ENCODE_CASES[case]
    tok = _tokenizer(tok_name, shared_data)
    convs = [Conversation(id=f"c{i}", messages=_messages(t)) for i, t in enumerate(batch)]
    result = Encoder(tok, BUILTIN_TEMPLATES[template], train_on=train_on, max_len=100_000).encode(convs)
    assert result.counts["examples"] == len(batch) and not result.rejects
    for turns, row in zip(batch, result.table.to_pylist(), strict=True):
        ids, labels = row["input_ids"], row["labels"]
        assert labels[0] == -100
        assert all(label in (-100, t) for t, label in zip(ids, labels, strict=True))
        trained = tok.decode([t for t, label in zip(ids, labels, strict=True) if label != -100])
        assert trained == _expected_trained(turns, train_on, end)


# --- packer ------------------------------------------------------------------------------------------


@SETTINGS
@given(lengths=st.lists(st.integers(1, 64), min_size=1, max_size=300), max_len=st.integers(64, 200),
       seed=st.integers(0, 2**31))
def test_bfd_places_every_example_exactly_once(lengths: list[int], max_len: int, seed: int):
    """Every example index appears in exactly one row, no row exceeds max_len, after shuffling too."""
    array = np.array(lengths, dtype=np.int32)
    plan = shuffle_rows(plan_bfd(array, max_len), seed)
    assert sorted(plan.order.tolist()) == list(range(len(lengths)))
    assert plan.row_tokens(array).max() <= max_len
    assert plan.row_offsets[0] == 0 and plan.row_offsets[-1] == len(lengths)
    assert plan.num_rows >= -(-int(array.sum()) // max_len)


@SETTINGS
@given(lengths=st.lists(st.integers(1, 40), min_size=1, max_size=120), max_len=st.integers(40, 128),
       seed=st.integers(0, 1000))
def test_written_shards_verify_and_hold_each_example_once(work: Path, lengths: list[int], max_len: int, seed: int):
    """Random examples spilled, packed and written: verify_shards is clean and the shards hold exactly the
    spilled examples (same tokens, same labels), each once."""
    rng = np.random.default_rng(seed)
    examples = [(rng.integers(0, 250, n).tolist(), None) for n in lengths]
    examples = [(ids, [-100] + [t if rng.random() < 0.5 else -100 for t in ids[1:]]) for ids, _ in examples]
    out = work / "written"
    shutil.rmtree(out, ignore_errors=True)
    with ExampleStore(parent=work) as store:
        store.append(pa.table({"input_ids": [e[0] for e in examples], "labels": [e[1] for e in examples]}))
        plan = shuffle_rows(plan_bfd(store.lengths, max_len), seed)

        def save_tokenizer(tmp: Path) -> None:
            default_tokenizer().save_pretrained(tmp / "tokenizer")

        write_shards(store, plan, out, max_len=max_len, seed=seed, shard_size=2_000,
                     manifest_extra={"tokenizer": _tokenizer_entry()}, before_commit=save_tokenizer)
    report = verify_shards(out)
    assert report.ok, [str(p) for p in report.problems]
    assert _example_counter(out) == Counter((tuple(i), tuple(la)) for i, la in examples)


def _tokenizer_entry() -> dict:
    """The manifest's tokenizer entry for the embedded tokenizer (what verify checks)."""
    from prep.tokenizer import tokenizer_fingerprint

    tok = default_tokenizer()
    return {"name": tok.name_or_path, "fingerprint": tokenizer_fingerprint(tok), "path": "tokenizer",
            "vocab_size": len(tok), "eos_token_id": tok.eos_token_id, "pad_token_id": tok.pad_token_id,
            "bos_token_id": None}


def _example_counter(path: Path) -> Counter:
    """Multiset of (input_ids, labels) of every example in a shard folder; each example's first label is
    compared as stored (-100)."""
    table = load_shards(path).table
    ids = table.column("input_ids").combine_chunks().flatten().to_numpy()
    labels = table.column("labels").combine_chunks().flatten().to_numpy()
    lengths = table.column("seq_lengths").combine_chunks().flatten().to_numpy()
    ends = np.cumsum(lengths)
    return Counter((tuple(ids[e - n:e].tolist()), tuple(labels[e - n:e].tolist()))
                   for e, n in zip(ends, lengths, strict=True))


PIPELINE_TOKENIZERS = {"default": None, "smollm2": "smollm2-135m"}


@pytest.mark.parametrize("tok_name", list(PIPELINE_TOKENIZERS))
@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(batch=st.lists(conversations(max_turns=3), min_size=1, max_size=12), max_len=st.integers(64, 512))
def test_pack_pipeline_shards_verify(work: Path, shared_data: Path, tok_name: str, batch: list[list[tuple[str, str]]],
                                     max_len: int):
    """Random conversations through pack_shards (split overflow): verify_shards is clean, and every input
    conversation is either packed (counted in examples) or a counted reject; nothing vanishes."""
    source = _write_jsonl(work / f"pipe-{tok_name}.jsonl", [_openai(t) for t in batch])
    out = work / f"pipe-{tok_name}"
    shutil.rmtree(out, ignore_errors=True)
    folder = PIPELINE_TOKENIZERS[tok_name]
    tok = None if folder is None else str(shared_data / "tokenizers" / folder)
    report = pack_shards(PackConfig(inputs=[str(source)], output=str(out), tokenizer=tok, template="chatml",
                                    max_len=max_len, shard_size="4KB"))
    result = verify_shards(out)
    assert result.ok, [str(p) for p in result.problems]
    counts = report.manifest["counts"]
    rejected = sum(counts["rejected"].values()) if isinstance(counts["rejected"], dict) else counts["rejected"]
    assert counts["examples"] + counts["dropped"] + rejected == len(batch) + counts["split"]
    assert sum(_example_counter(out).values()) == counts["examples"]
