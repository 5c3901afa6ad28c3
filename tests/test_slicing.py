"""prep.slicing: split pieces cut from the whole conversation's ids are exactly what tokenizing them gives.

The reference is `Encoder(slicing=False)`, which renders and tokenizes every piece on its own (the path prep
always took): on every tokenizer in ../shared/data/tokenizers and the embedded one, with each built-in
template and `--template tokenizer`, the two give identical tables (ids, labels, example ids), counts and
rejects, while most pieces are sliced.
"""

from __future__ import annotations

import json

import pytest
from tokenizers import AddedToken, Tokenizer

from _conv import OTHER_FAMILIES, TOKENIZERS, THINKING_TEMPLATE, family_tokenizer, kto, reasoning_conversations, sharegpt, tokenizer, with_system
from prep.encode import IGNORE_INDEX, Encoder
from prep.render import BUILTIN_TEMPLATES, load_template, render
from prep.slicing import Whole, find_cut, joints_of
from prep.tokenizer import default_tokenizer, load_tokenizer, register_markers
from schemas import Conversation, Message

SHARED_TOKENIZERS = sorted(p.name for p in TOKENIZERS.iterdir() if p.is_dir())
TEMPLATES = ("markers", "chatml", "tokenizer")
# Where pieces are mostly cut: the template writes added tokens at turn boundaries. (`markers` writes plain text,
# and one-pair pieces take its single-turn layout, which is no run of the whole text; ChatML's markers are plain
# text for GPT-2 and Mistral: only a piece that runs to the conversation's end can be cut there.)
MOSTLY_SLICED = {("default", "chatml"), ("default", "tokenizer"), ("gpt2-dialogpt-small", "tokenizer"),
                 ("mistral-7b-instruct-v0.3", "tokenizer"), *((name, template) for template in ("chatml", "tokenizer")
                 for name in ("qwen2-1.5b-instruct-boundless", "qwen2.5-0.5b-instruct", "smollm2-135m"))}


@pytest.fixture(scope="module")
def chats() -> list[Conversation]:
    """Real long chats (with and without a system prompt) and short ones, most longer than 512 tokens."""
    long = sharegpt(limit=10, min_messages=8)
    return [*[with_system(c, "You are a helpful assistant for this chat.") for c in long[:5]], *long[5:],
            *sharegpt(limit=3), *kto(limit=3)]


def _assert_same(sliced, reference) -> None:
    """Identical tables, rejects and counts (but for the slicing counters)."""
    assert sliced.table.equals(reference.table)
    assert [r.model_dump() for r in sliced.rejects] == [r.model_dump() for r in reference.rejects]
    strip = lambda c: {k: v for k, v in c.items() if not k.startswith("pieces_")}  # noqa: E731
    assert strip(sliced.counts) == strip(reference.counts)
    assert reference.counts["pieces_sliced"] == 0


@pytest.mark.parametrize("template_name", TEMPLATES)
@pytest.mark.parametrize("tok_name", ["default", *SHARED_TOKENIZERS])
def test_sliced_pieces_equal_tokenized_pieces(tok_name, template_name, chats):
    tok = tokenizer(tok_name)
    template = load_template(template_name, tok)
    sliced = Encoder(tok, template, max_len=512).encode(chats)
    reference = Encoder(tok, template, max_len=512, slicing=False).encode(chats)
    _assert_same(sliced, reference)
    assert sliced.counts["extra_pieces"] > 10
    if (tok_name, template_name) in MOSTLY_SLICED:
        assert sliced.counts["pieces_sliced"] > sliced.counts["pieces_tokenized"]


@pytest.mark.parametrize("train_on", ["last", "all"])
@pytest.mark.parametrize("tok_name, template_name", [("smollm2-135m", "tokenizer"),
                                                     ("mistral-7b-instruct-v0.3", "tokenizer"),
                                                     ("qwen2-1.5b-instruct-boundless", "chatml")])
def test_sliced_pieces_equal_under_every_policy(tok_name, template_name, train_on, chats):
    tok = tokenizer(tok_name)
    template = load_template(template_name, tok)
    sliced = Encoder(tok, template, train_on=train_on, max_len=400).encode(chats)
    _assert_same(sliced, Encoder(tok, template, train_on=train_on, max_len=400, slicing=False).encode(chats))
    assert sliced.counts["pieces_sliced"] > 0


# Chat templates of other families (tests/_conv.OTHER_FAMILIES): BOS printed by the template and trimmed contents
# (Llama 3), a raise on system messages (Gemma), an EOS after the last turn only (Phi-3: every piece has a tail of
# its own to tokenize).


@pytest.mark.parametrize("family", sorted(OTHER_FAMILIES))
def test_other_families_slice_exactly(family, chats):
    tok = family_tokenizer(family)
    template = load_template("tokenizer", tok)
    sliced = Encoder(tok, template, max_len=512).encode(chats)
    _assert_same(sliced, Encoder(tok, template, max_len=512, slicing=False).encode(chats))
    assert sliced.counts["pieces_sliced"] > 0 and sliced.counts["examples"] > len(chats)


def test_markers_registered_as_special_tokens_slice():
    tok = load_tokenizer(str(TOKENIZERS / "gpt2-dialogpt-small"))
    template = BUILTIN_TEMPLATES["markers"]
    convs = [with_system(c) for c in sharegpt(limit=10, min_messages=8)]
    plain = Encoder(tok, template, max_len=512).encode(convs)
    register_markers(tok, template)
    sliced = Encoder(tok, template, max_len=512).encode(convs)
    _assert_same(sliced, Encoder(tok, template, max_len=512, slicing=False).encode(convs))
    assert sliced.counts["pieces_sliced"] > 2 * plain.counts["pieces_sliced"]


def test_a_template_that_renders_a_reply_differently_in_a_piece_is_tokenized_again():
    """Qwen3-like: a reply's reasoning is rendered only when it is the last turn, so a piece ending with a
    middle reply is not a run of the whole text; such pieces fall back to tokenizing, with the same result
    (`expand_turns="off"`: under the default, such replies get examples of their own before any splitting)."""
    tok = tokenizer("qwen2-1.5b-instruct-boundless")
    _, two, _ = reasoning_conversations()
    long = [Message(role=m.role, content=m.content + " filler" * 60) for m in two]
    convs = [Conversation(id=f"r{i}", messages=long * 3) for i in range(3)]
    sliced = Encoder(tok, THINKING_TEMPLATE, max_len=300, expand_turns="off").encode(convs)
    _assert_same(sliced, Encoder(tok, THINKING_TEMPLATE, max_len=300, slicing=False, expand_turns="off").encode(convs))
    assert sliced.counts["pieces_tokenized"] > 0


def test_verification_still_checks_sliced_pieces():
    class EndMarkerForgotten(Encoder):
        def _trained_regions(self, item):
            return [(s.start, s.end) for s in item.rendered.spans if item.flags[s.message]]

    tok = tokenizer("qwen2-1.5b-instruct-boundless")
    convs = [with_system(c) for c in sharegpt(limit=4, min_messages=8)]
    res = EndMarkerForgotten(tok, BUILTIN_TEMPLATES["chatml"], max_len=512).encode(convs)
    assert res.counts["pieces_sliced"] > 0
    assert res.table.num_rows == 0 and set(res.rejected) == {"mask_mismatch"}


# --------------------------------------------------------------------------------------------------
# Which tokens are joints


def test_joints_of_real_tokenizers():
    joints = joints_of(load_tokenizer(str(TOKENIZERS / "mistral-7b-instruct-v0.3")))
    assert {"[INST]", "[/INST]", "<s>", "</s>"} <= set(joints.tokens) and not joints.reason
    assert joints.by_id[joints.tokens["[INST]"]] == "[INST]"
    assert {"<|im_start|>", "<|im_end|>"} <= set(joints_of(tokenizer("smollm2-135m")).tokens)
    assert set(joints_of(tokenizer("gpt2-dialogpt-small")).tokens) == {"<|endoftext|>"}


def test_tokens_matched_with_their_surroundings_are_not_joints():
    tok = load_tokenizer(str(TOKENIZERS / "smollm2-135m"))
    tok.add_special_tokens({"additional_special_tokens": [
        AddedToken("<|lstrip|>", lstrip=True, special=True), AddedToken("<|word|>", single_word=True, special=True),
        "<|tool|>", "<|tool|>_result"]})
    joints = joints_of(tok)
    assert "<|im_start|>" in joints.tokens
    assert not {"<|lstrip|>", "<|word|>"} & set(joints.tokens)  # they match whitespace or need word boundaries
    assert "<|tool|>" not in joints.tokens  # a longer added token contains it: a match could cross a cut
    assert "<|tool|>_result" in joints.tokens


@pytest.mark.parametrize("change, reason", [
    (lambda spec: spec["model"].update(dropout=0.1), "dropout"),
    (lambda spec: spec.update(truncation={"direction": "Right", "max_length": 8, "strategy": "LongestFirst",
                                          "stride": 0}), "truncates"),
])
def test_tokenizers_that_are_not_provably_local_are_never_sliced(change, reason):
    spec = json.loads(tokenizer("smollm2-135m").backend_tokenizer.to_str())
    change(spec)
    joints = joints_of(Tokenizer.from_str(json.dumps(spec)))
    assert not joints.tokens and reason in joints.reason


def test_slicing_off_is_the_reference_path():
    encoder = Encoder(default_tokenizer(), BUILTIN_TEMPLATES["chatml"], slicing=False)
    assert encoder._joints.reason == "slicing is off"


# --------------------------------------------------------------------------------------------------
# Where a piece is cut


def _chatml(messages: list[Message]):
    return render(messages, BUILTIN_TEMPLATES["chatml"])


def _turns(n: int) -> list[Message]:
    out = [Message(role="system", content="Sys.")]
    for i in range(n):
        out += [Message(role="user", content=f"question {i}"), Message(role="assistant", content=f"answer {i}")]
    return out


def test_a_piece_is_the_head_plus_one_run_of_the_whole_text():
    tok = default_tokenizer()
    whole_messages = _turns(3)
    whole = _chatml(whole_messages)
    enc = tok.backend_tokenizer.encode(whole.text, add_special_tokens=False)
    piece = _chatml([whole_messages[0], *whole_messages[3:5]])  # system + the second pair
    cut = find_cut(Whole(whole, enc, joints_of(tok)), piece, (1, 3), (2, 4))
    assert piece.text == whole.text[: cut.head] + whole.text[cut.start : cut.stop] + piece.text[cut.tail :]
    assert whole.text[cut.head :].startswith("<|im_start|>user") and whole.text[cut.start :].startswith("<|im_start|>")
    assert cut.tail == len(piece.text) and whole.text[: cut.stop].endswith("answer 1<|im_end|>")
    ids = enc.ids[: cut.head_tokens] + enc.ids[cut.start_token : cut.stop_token]
    assert ids == tok.backend_tokenizer.encode(piece.text, add_special_tokens=False).ids


def test_no_cut_without_a_joint_or_with_a_different_text():
    tok = default_tokenizer()
    whole_messages = _turns(3)
    markers = BUILTIN_TEMPLATES["markers"]
    whole = render(whole_messages, markers, eos=tok.eos_token)
    enc = tok.backend_tokenizer.encode(whole.text, add_special_tokens=False)
    piece = render([whole_messages[0], *whole_messages[3:7]], markers, eos=tok.eos_token)
    # The default tokenizer has the markers as special tokens: a cut at ###human### is exact ...
    assert find_cut(Whole(whole, enc, joints_of(tok)), piece, (1, 3), (4, 6)) is not None
    # ... but a piece whose reply differs from the whole text's is not a run of it.
    changed = render([whole_messages[0], *whole_messages[3:6], Message(role="assistant", content="other")],
                     markers, eos=tok.eos_token)
    assert find_cut(Whole(whole, enc, joints_of(tok)), changed, (1, 3), (4, 6)) is None
    gpt2 = tokenizer("gpt2-dialogpt-small")  # markers are plain text there: no joint before ###human###
    enc2 = gpt2.backend_tokenizer.encode(whole.text, add_special_tokens=False)
    assert find_cut(Whole(whole, enc2, joints_of(gpt2)), piece, (1, 3), (4, 6)) is None


@pytest.mark.parametrize("module", ["prep.slicing", "prep.overflow", "prep.token_bytes"])
def test_docstring_examples(module):
    import doctest
    import importlib

    assert doctest.testmod(importlib.import_module(module)).failed == 0


def test_every_label_of_a_sliced_piece_is_its_token_or_masked(chats):
    tok = tokenizer("smollm2-135m")
    res = Encoder(tok, load_template("tokenizer", tok), max_len=512).encode(chats)
    assert res.counts["pieces_sliced"] > 0
    for row in res.table.to_pylist():
        assert all(label in (IGNORE_INDEX, token) for token, label in zip(row["input_ids"], row["labels"]))
        assert len(row["input_ids"]) <= 512
