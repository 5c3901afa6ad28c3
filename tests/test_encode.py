"""prep.encode: exact ids, exact label masks, verification, rejects and overflow, on real data and tokenizers.

The masks are checked against an oracle written independently of the implementation: it finds each
message's content in the rendered text with str.find and marks every token whose offsets overlap a
trained region, one token at a time.
"""

from __future__ import annotations

import pytest

from _conv import (
    OTHER_FAMILIES,
    THINKING_TEMPLATE,
    TOKENIZERS,
    TOKENIZER_NAMES,
    alpaca,
    family_tokenizer,
    kto,
    reasoning_conversations,
    sharegpt,
    tokenizer,
    with_system,
)
from prep.encode import ENCODED_SCHEMA, IGNORE_INDEX, Encoder, trained_flags
from prep.errors import ConfigError
from prep.render import BUILTIN_TEMPLATES, Template, load_template, render
from prep.tokenizer import DEFAULT_TOKENIZER_NOTICE, adds_bos, default_tokenizer
from schemas import Conversation, Message

ALL_TOKENIZERS = ("default", *TOKENIZER_NAMES)
TEMPLATES = ("markers", "chatml", "tokenizer")
CHAT_END = {  # the end-of-turn text each tokenizer's own chat template writes after a reply
    "default": "<|im_end|>",
    "gpt2-dialogpt-small": "<|endoftext|>",
    "mistral-7b-instruct-v0.3": "</s>",
    "smollm2-135m": "<|im_end|>",
    "qwen2-1.5b-instruct-boundless": "<|im_end|>",
}
BIG = 10**7


def _end_marker(tok_name: str, template: str) -> str:
    """The trained end-of-turn text after each reply, as the README states it."""
    if template == "markers":
        return "\n###" + tokenizer(tok_name).eos_token
    return "<|im_end|>" if template == "chatml" else CHAT_END[tok_name]


def _sample() -> list[Conversation]:
    """Real data, small: single turns, single turns with a system prompt, multi-turn chats."""
    return [*alpaca(limit=24), *[with_system(c) for c in alpaca(limit=6)], *sharegpt(limit=6), *kto(limit=12)]


def _text(conv_or_messages, tok, template: Template) -> str:
    """The rendered text, rendered independently of the Encoder."""
    bos = tok.bos_token if adds_bos(tok) and not template.uses_chat_template else ""
    return render(conv_or_messages, template, tok, bos=bos).text


def _regions(text: str, messages: list[Message], flags: list[bool], end: str) -> list[tuple[int, int]]:
    """Trained character regions: each trained reply's content (found with str.find) + its end marker."""
    regions, pos = [], 0
    for message, flag in zip(messages, flags):
        for content in (message.content, message.content.strip()):
            start = text.find(content, pos)
            if start >= 0:
                break
        if start < 0:
            continue  # a message the chat template dropped
        pos = start + len(content)
        if flag:
            tail = end if message.role == "assistant" else ""
            assert text.startswith(tail, pos)
            regions.append((start, pos + len(tail)))
    return regions


def _oracle_labels(tok, text: str, regions: list[tuple[int, int]]) -> list[int]:
    """Labels by the straddling rule, one token at a time: trained iff the token overlaps a region."""
    enc = tok.backend_tokenizer.encode(text, add_special_tokens=False)
    labels = []
    for i, (token, (a, b)) in enumerate(zip(enc.ids, enc.offsets)):
        trained = i > 0 and any(a < e and b > s for s, e in regions)
        labels.append(token if trained else IGNORE_INDEX)
    return labels


def _runs(row: dict) -> list[list[int]]:
    """The maximal runs of trained token ids of a row."""
    runs, current = [], []
    for token, label in zip(row["input_ids"], row["labels"]):
        if label != IGNORE_INDEX:
            current.append(token)
        elif current:
            runs.append(current)
            current = []
    return runs + ([current] if current else [])


def _decoded_runs(tok, row: dict) -> list[str]:
    return [tok.decode(run) for run in _runs(row)]


def _same_text(decoded: str, expected: str) -> bool:
    """Equal, allowing the one leading space a SentencePiece decoder drops from a run."""
    return decoded == expected or (expected.startswith(" ") and decoded == expected[1:])


# --------------------------------------------------------------------------------------------------
# Exact ids and exact masks, every tokenizer × template × mode


@pytest.mark.parametrize("mode", ["completion", "last", "all"])
@pytest.mark.parametrize("template_name", TEMPLATES)
@pytest.mark.parametrize("tok_name", ALL_TOKENIZERS)
def test_ids_and_labels_are_exact(tok_name, template_name, mode):
    tok = tokenizer(tok_name)
    template = load_template(template_name, tok)
    convs = _sample()
    res = Encoder(tok, template, train_on=mode, max_len=BIG).encode(convs)
    assert res.counts["examples"] == len(convs) and not res.rejects
    assert res.table.schema == ENCODED_SCHEMA
    end = _end_marker(tok_name, template_name)
    for conv, row in zip(convs, res.table.to_pylist()):
        assert row["example_id"] == conv.id
        text = _text(conv, tok, template)
        assert row["input_ids"] == tok(text, add_special_tokens=False).input_ids
        if mode == "all":
            regions = [(0, len(text))]
        else:
            regions = _regions(text, conv.messages, trained_flags(conv.messages, mode), end)
        assert row["labels"] == _oracle_labels(tok, text, regions)
        assert row["labels"][0] == IGNORE_INDEX
        if mode != "all":
            expected = [text[s:e] for s, e in regions]
            decoded = _decoded_runs(tok, row)
            assert len(decoded) == len(expected)
            assert all(_same_text(d, e) for d, e in zip(decoded, expected))


@pytest.mark.parametrize("tok_name", TOKENIZER_NAMES)
def test_tokenizer_template_ids_equal_apply_chat_template(tok_name):
    tok = tokenizer(tok_name)
    convs = [*alpaca(limit=40), *sharegpt(limit=8), *kto(limit=20)]
    if not tok_name.startswith("mistral"):
        convs += [with_system(c) for c in alpaca(limit=8)]
    res = Encoder(tok, load_template("tokenizer", tok), max_len=BIG).encode(convs)
    for conv, row in zip(convs, res.table.to_pylist()):
        chat = [{"role": m.role, "content": m.content} for m in conv.messages]
        assert row["input_ids"] == tok.apply_chat_template(chat, tokenize=True, return_dict=True)["input_ids"]


@pytest.mark.parametrize("family", sorted(OTHER_FAMILIES))
def test_other_families_chat_templates_give_apply_chat_template_ids(family):
    tok = family_tokenizer(family)
    convs = [*alpaca(limit=40), *sharegpt(limit=8), *kto(limit=20)]
    with_systems = [with_system(c).model_copy(update={"id": f"{c.id}-system"}) for c in alpaca(limit=4)]
    res = Encoder(tok, load_template("tokenizer", tok), max_len=BIG).encode(convs + with_systems)
    written = {row["example_id"]: row for row in res.table.to_pylist()}
    for conv in convs + (with_systems if family != "gemma" else []):
        chat = [{"role": m.role, "content": m.content} for m in conv.messages]
        assert written[conv.id]["input_ids"] == tok(tok.apply_chat_template(chat, tokenize=False),
                                                    add_special_tokens=False).input_ids
    if family == "gemma":  # its template refuses system messages: those conversations only are rejected
        assert res.rejected == {"template_error": 4} and len(written) == len(convs)
    assert res.counts["trained_tokens"] > 0


@pytest.mark.parametrize("template_name", TEMPLATES)
@pytest.mark.parametrize("tok_name", ALL_TOKENIZERS)
def test_every_reply_ends_with_its_trained_end_of_turn_token(tok_name, template_name):
    tok = tokenizer(tok_name)
    template = load_template(template_name, tok)
    res = Encoder(tok, template, max_len=BIG).encode(_sample())
    end = _end_marker(tok_name, template_name)
    end_id = tok.convert_tokens_to_ids(tok.eos_token if template_name == "markers" else end)
    special = end in {t.content for t in tok.added_tokens_decoder.values() if t.special}
    for row in res.table.to_pylist():
        for run in _runs(row):
            if special or template_name == "markers":
                assert run[-1] == end_id


@pytest.mark.parametrize("template_name", TEMPLATES)
def test_mistral_has_exactly_one_bos(template_name):
    tok = tokenizer("mistral-7b-instruct-v0.3")
    res = Encoder(tok, load_template(template_name, tok), max_len=BIG).encode(_sample())
    for row in res.table.to_pylist():
        assert row["input_ids"][0] == tok.bos_token_id
        assert row["input_ids"].count(tok.bos_token_id) == 1


@pytest.mark.parametrize("tok_name", ["gpt2-dialogpt-small", "smollm2-135m", "qwen2-1.5b-instruct-boundless"])
def test_no_bos_where_the_tokenizer_adds_none(tok_name):
    tok = tokenizer(tok_name)
    assert not adds_bos(tok)
    row = Encoder(tok, BUILTIN_TEMPLATES["chatml"]).encode(list(alpaca(limit=1))).table.to_pylist()[0]
    assert row["input_ids"] == tok(_text(alpaca()[0], tok, BUILTIN_TEMPLATES["chatml"])).input_ids


def test_all_trains_every_token_but_the_first():
    tok = tokenizer("qwen2-1.5b-instruct-boundless")
    convs = [with_system(c) for c in kto(limit=5)]
    res = Encoder(tok, BUILTIN_TEMPLATES["chatml"], train_on="all", max_len=BIG).encode(convs)
    assert res.table.num_rows == 5
    for row in res.table.to_pylist():
        assert row["labels"] == [IGNORE_INDEX] + row["input_ids"][1:]


def test_nfc_normalizing_tokenizer_keeps_non_nfc_content():
    tok = tokenizer("qwen2-1.5b-instruct-boundless")  # NFC normalizer
    conv = Conversation(
        id="nfc",
        messages=[Message(role="user", content="Cafe\u0301?"), Message(role="assistant", content="Cafe\u0301 au lait")],
    )
    res = Encoder(tok, BUILTIN_TEMPLATES["chatml"]).encode([conv])
    assert res.counts["examples"] == 1
    assert _decoded_runs(tok, res.table.to_pylist()[0]) == ["Caf\u00e9 au lait<|im_end|>"]


# --------------------------------------------------------------------------------------------------
# Message.train overrides


def test_message_train_overrides_the_policy():
    tok = tokenizer("smollm2-135m")
    conv = Conversation(
        id="o",
        messages=[
            Message(role="system", content="Sys.", train=True),
            Message(role="user", content="Q1", train=True),
            Message(role="assistant", content="A1", train=False),
            Message(role="user", content="Q2"),
            Message(role="assistant", content="A2"),
        ],
    )
    row = Encoder(tok, BUILTIN_TEMPLATES["chatml"]).encode([conv]).table.to_pylist()[0]
    assert _decoded_runs(tok, row) == ["Sys.<|im_end|>", "Q1<|im_end|>", "A2<|im_end|>"]
    row = Encoder(tok, BUILTIN_TEMPLATES["chatml"], train_on="all").encode([conv]).table.to_pylist()[0]
    text = tok.decode([t for t, label in zip(row["input_ids"], row["labels"]) if label != IGNORE_INDEX])
    assert "A1" not in text and "Q2" in text and "A2" in text


def test_reasoning_is_trained_where_a_chat_template_keeps_it_and_counted_where_it_drops_it():
    tok = tokenizer("qwen2-1.5b-instruct-boundless")  # Qwen's chatml special tokens; the template is Qwen3-like
    one, two, _ = reasoning_conversations()
    res = Encoder(tok, THINKING_TEMPLATE, max_len=BIG, expand_turns="off").encode(
        [Conversation(id="a", messages=one), Conversation(id="b", messages=two)])
    first, second = res.table.to_pylist()
    assert _decoded_runs(tok, first) == ["<think>\n2 and 2.\n</think>\n\n4<|im_end|>"]
    assert _decoded_runs(tok, second) == ["4<|im_end|>", "<think>\n3+3.\n</think>\n\n6<|im_end|>"]
    assert res.counts["template_dropped_reasoning"] == 1 and not res.rejected


def test_expand_turns_auto_trains_every_reply_with_the_reasoning_inference_writes():
    tok = tokenizer("qwen2-1.5b-instruct-boundless")
    one, two, _ = reasoning_conversations()
    res = Encoder(tok, THINKING_TEMPLATE, max_len=BIG).encode([Conversation(id="a", messages=one),
                                                                Conversation(id="b", messages=two)])
    rows = res.table.to_pylist()
    assert [r["example_id"] for r in rows] == ["a", "b#0", "b#1"]
    assert [_decoded_runs(tok, r) for r in rows] == [["<think>\n2 and 2.\n</think>\n\n4<|im_end|>"]] * 2 + [
        ["<think>\n3+3.\n</think>\n\n6<|im_end|>"]]
    # b#0 is the conversation up to its first reply: exactly apply_chat_template of that prefix
    prefix = [m.model_dump(exclude={"train"}) for m in two[:2]]
    assert rows[1]["input_ids"] == tok(tok.apply_chat_template(prefix, tokenize=False,
                                       chat_template=THINKING_TEMPLATE.chat_template), add_special_tokens=False).input_ids
    assert (res.counts["expanded"], res.counts["expanded_conversations"]) == (1, 1) and not res.rejected
    assert res.counts["template_dropped_reasoning"] == 1  # b#1 shows the first reply, as context, without it


def test_system_prompt_is_not_trained_except_under_all():
    tok = tokenizer("qwen2-1.5b-instruct-boundless")
    conv = with_system(alpaca()[0], "SYSTEM PROMPT")
    for mode, trained in (("completion", False), ("last", False), ("all", True)):
        row = Encoder(tok, BUILTIN_TEMPLATES["markers"], train_on=mode).encode([conv]).table.to_pylist()[0]
        assert ("SYSTEM PROMPT" in "".join(_decoded_runs(tok, row))) is trained


def test_last_trains_only_the_final_reply():
    tok = tokenizer("smollm2-135m")
    conv = kto()[0] if len(kto()[0].messages) > 2 else next(c for c in kto() if len(c.messages) > 2)
    row = Encoder(tok, BUILTIN_TEMPLATES["chatml"], train_on="last").encode([conv]).table.to_pylist()[0]
    assert _decoded_runs(tok, row) == [conv.messages[-1].content + "<|im_end|>"]


def test_example_without_trained_tokens_is_never_written():
    tok = default_tokenizer()
    conv = Conversation(
        id="none",
        messages=[Message(role="user", content="Q"), Message(role="assistant", content="A", train=False)],
    )
    res = Encoder(tok, BUILTIN_TEMPLATES["chatml"]).encode([conv])
    assert res.table.num_rows == 0 and res.rejected == {"no_trained_tokens": 1}
    assert res.rejects[0].stage == "pack" and res.rejects[0].id == "none"


# --------------------------------------------------------------------------------------------------
# Marker injection


@pytest.mark.parametrize(
    "tok_name, template_name, role, content, marker",
    [
        ("qwen2-1.5b-instruct-boundless", "chatml", "user", "say <|im_end|> now", "<|im_end|>"),
        ("gpt2-dialogpt-small", "markers", "assistant", "text\n###response###\nfake", "###response###"),
        ("gpt2-dialogpt-small", "markers", "user", "a ###human### b", "###human###"),
        ("gpt2-dialogpt-small", "chatml", "assistant", "x <|im_start|>user y", "<|im_start|>"),
        ("mistral-7b-instruct-v0.3", "tokenizer", "user", "[INST] hi", "[INST]"),
        ("mistral-7b-instruct-v0.3", "markers", "assistant", "<s> again", "<s>"),
        ("default", "markers", "system", "<|endoftext|>", "<|endoftext|>"),
    ],
)
def test_marker_in_content_is_rejected(tok_name, template_name, role, content, marker):
    tok = tokenizer(tok_name)
    messages = [
        Message(role="system", content="S"),
        Message(role="user", content="Q"),
        Message(role="assistant", content="A"),
    ]
    index = {"system": 0, "user": 1, "assistant": 2}[role]
    messages[index] = Message(role=role, content=content)
    conv = Conversation(id="inj", messages=messages)
    res = Encoder(tok, load_template(template_name, tok)).encode([conv, alpaca()[0]])
    assert res.table["example_id"].to_pylist() == [alpaca()[0].id]
    assert res.rejected == {"marker_in_content": 1}
    (reject,) = res.rejects
    assert (reject.reason, reject.stage, reject.id) == ("marker_in_content", "pack", "inj")
    assert reject.errors[0].field == f"messages[{index}].content" and repr(marker) in reject.errors[0].message


def test_markdown_headings_are_not_markers():
    tok = tokenizer("gpt2-dialogpt-small")
    conv = Conversation(
        id="md",
        messages=[
            Message(role="user", content="Write docs"),
            Message(role="assistant", content="### Usage\n\n## Notes\n###"),
        ],
    )
    res = Encoder(tok, BUILTIN_TEMPLATES["markers"]).encode([conv])
    assert res.counts["examples"] == 1
    assert _decoded_runs(tok, res.table.to_pylist()[0]) == ["### Usage\n\n## Notes\n###\n###<|endoftext|>"]


def test_real_record_with_a_literal_eos_is_rejected():
    tok = tokenizer("mistral-7b-instruct-v0.3")
    conv = kto()[139]
    assert "</s>" in conv.messages[1].content
    res = Encoder(tok, load_template("tokenizer", tok)).encode([conv])
    assert res.rejects[0].reason == "marker_in_content" and res.rejects[0].errors[0].field == "messages[1].content"
    assert res.rejects[0].path.endswith("kto_en_demo.json") and res.rejects[0].line == 139


# --------------------------------------------------------------------------------------------------
# Template-dropped messages and verification


def test_mistral_dropped_system_prompt_is_counted():
    tok = tokenizer("mistral-7b-instruct-v0.3")
    convs = [with_system(c) for c in alpaca(limit=3)]
    res = Encoder(tok, load_template("tokenizer", tok)).encode(convs)
    assert res.counts["examples"] == 3 and res.counts["template_dropped_message"] == 3


def test_chat_template_dropping_a_trained_reply_is_rejected():
    tok = default_tokenizer()
    drops_last = Template(
        name="tokenizer",
        chat_template="{% for m in messages %}{% if not loop.last %}{{ m.content }}<|im_end|>{% endif %}{% endfor %}",
    )
    res = Encoder(tok, drops_last).encode(list(alpaca(limit=2)))
    assert res.rejected == {"template_dropped_message": 2} and res.table.num_rows == 0


def test_verification_catches_a_broken_mask():
    class EndMarkerForgotten(Encoder):
        def _trained_regions(self, item):
            return [(s.start, s.end) for s in item.rendered.spans if item.flags[s.message]]

    tok = tokenizer("qwen2-1.5b-instruct-boundless")
    res = EndMarkerForgotten(tok, BUILTIN_TEMPLATES["chatml"]).encode(list(alpaca(limit=5)))
    assert res.table.num_rows == 0 and res.rejected == {"mask_mismatch": 5}


def test_chat_template_reply_without_an_end_token_is_rejected():
    tok = default_tokenizer()
    no_end = Template(
        name="tokenizer", chat_template="{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}"
    )
    res = Encoder(tok, no_end).encode(list(alpaca(limit=1)))
    assert res.rejected == {"no_end_of_turn_token": 1}


# --------------------------------------------------------------------------------------------------
# Over-long examples


def _long_chats(n: int = 40) -> list[Conversation]:
    return [with_system(c, "You are a helpful assistant for this chat.") for c in sharegpt(limit=n, min_messages=8)]


@pytest.mark.parametrize(
    "tok_name, template_name, max_len",
    [
        ("qwen2-1.5b-instruct-boundless", "markers", 512),
        ("smollm2-135m", "tokenizer", 1024),
        ("mistral-7b-instruct-v0.3", "chatml", 1024),
        ("gpt2-dialogpt-small", "tokenizer", 1024),
    ],
)
def test_split_trains_every_reply_exactly_once(tok_name, template_name, max_len):
    tok = tokenizer(tok_name)
    template = load_template(template_name, tok)
    convs = _long_chats()
    res = Encoder(tok, template, max_len=max_len, overflow="split").encode(convs)
    c = res.counts
    assert c["extra_pieces"] > 0 and c["conversations"] + c["extra_pieces"] == c["examples"] + c["dropped"] + c["rejected"]
    assert c["rejected"] == 0 and c["dropped"] < c["examples"] // 4
    rows = res.table.to_pylist()
    assert all(len(r["input_ids"]) <= max_len for r in rows)
    end = _end_marker(tok_name, template_name)
    for conv in convs:
        pieces = [r for r in rows if r["example_id"].split("#")[0] == conv.id]
        if len(pieces) > 1:
            assert [r["example_id"].split("#")[1] for r in pieces] == sorted(
                (r["example_id"].split("#")[1] for r in pieces), key=int
            )
        for row in pieces:  # each piece is the exact tokenization of its own (re-rendered) text
            text = tok.decode(row["input_ids"])
            assert tok(text, add_special_tokens=False).input_ids == row["input_ids"]
            if template_name != "tokenizer":
                assert text.removeprefix("<s>").startswith(template.roles.system.prefix + "You are a helpful assistant")
        # A dropped piece is one reply that cannot fit alone; every other reply is trained once, in order.
        dropped = sum(r.id.split("#")[0] == conv.id for r in res.rejects)
        trained = [d for row in pieces for d in _decoded_runs(tok, row)]
        replies = iter(m.content + end for m in conv.messages if m.role == "assistant")
        assert len(trained) + dropped == sum(m.role == "assistant" for m in conv.messages)
        assert all(any(_same_text(t, r) or _same_text(t, r.lstrip()) for r in replies) for t in trained)


def test_split_context_turns_are_masked_and_system_prompt_leads_every_piece():
    tok = tokenizer("qwen2-1.5b-instruct-boundless")
    conv = _long_chats(5)[0]
    res = Encoder(tok, BUILTIN_TEMPLATES["chatml"], max_len=400).encode([conv])
    rows = res.table.to_pylist()
    assert len(rows) > 1 and [r["example_id"] for r in rows] == [f"{conv.id}#{k}" for k in range(len(rows))]
    for row in rows:
        text = tok.decode(row["input_ids"])
        assert text.startswith("<|im_start|>system\nYou are a helpful assistant for this chat.<|im_end|>\n")
        assert text.endswith("<|im_end|>") and row["labels"][-1] == tok.convert_tokens_to_ids("<|im_end|>")


def test_split_under_last_keeps_only_the_final_reply_with_context():
    tok = tokenizer("qwen2-1.5b-instruct-boundless")
    convs = _long_chats(10)
    res = Encoder(tok, BUILTIN_TEMPLATES["chatml"], train_on="last", max_len=512).encode(convs)
    assert res.counts["extra_pieces"] == 0
    for conv, row in zip(convs, res.table.to_pylist()):
        assert len(row["input_ids"]) <= 512
        runs = _decoded_runs(tok, row)
        if len(row["input_ids"]) < 512:
            assert runs == [conv.messages[-1].content + "<|im_end|>"]


def test_split_under_all_trains_the_system_prompt_once():
    tok = tokenizer("qwen2-1.5b-instruct-boundless")
    conv = _long_chats(3)[0]
    res = Encoder(tok, BUILTIN_TEMPLATES["chatml"], train_on="all", max_len=512).encode([conv])
    rows = res.table.to_pylist()
    assert len(rows) > 1 and rows[0]["example_id"] == f"{conv.id}#0" and not res.rejects
    with_prompt = ["You are a helpful assistant" in "".join(_decoded_runs(tok, r)) for r in rows]
    assert with_prompt == [True] + [False] * (len(rows) - 1)


def test_truncate_keeps_the_first_max_len_tokens():
    tok = tokenizer("gpt2-dialogpt-small")
    convs = list(alpaca("gpteacher_codegen-instruct.json", limit=200))
    full = Encoder(tok, BUILTIN_TEMPLATES["markers"], max_len=BIG).encode(convs).table.to_pylist()
    res = Encoder(tok, BUILTIN_TEMPLATES["markers"], max_len=128, overflow="truncate").encode(convs)
    long = sum(len(r["input_ids"]) > 128 for r in full)
    assert long > 0 and res.counts["truncated"] == long - res.rejected.get("no_trained_tokens", 0)
    kept = {r["example_id"]: r for r in res.table.to_pylist()}
    for r in full:
        if r["example_id"] in kept:
            assert kept[r["example_id"]]["input_ids"] == r["input_ids"][:128]
            assert kept[r["example_id"]]["labels"] == r["labels"][:128]


def test_drop_drops_and_counts():
    tok = tokenizer("gpt2-dialogpt-small")
    convs = list(alpaca("gpteacher_codegen-instruct.json", limit=200))
    res = Encoder(tok, BUILTIN_TEMPLATES["markers"], max_len=128, overflow="drop").encode(convs)
    assert res.counts["dropped"] > 0 and res.counts["examples"] + res.counts["dropped"] == len(convs)
    assert {r.reason for r in res.rejects} == {"too_long"} and all(r.stage == "pack" for r in res.rejects)
    assert all(len(r) <= 128 for r in res.table["input_ids"].to_pylist())


def test_single_turn_too_long_is_cut_in_the_middle_of_the_prompt():
    tok = tokenizer("qwen2-1.5b-instruct-boundless")
    long_text = "".join(m.content for m in _long_chats(1)[0].messages[1:])
    conv = Conversation(
        id="long",
        messages=[
            Message(role="system", content="Sys."),
            Message(role="user", content="START " + long_text + " END"),
            Message(role="assistant", content="Short answer."),
        ],
    )
    res = Encoder(tok, BUILTIN_TEMPLATES["markers"], max_len=256).encode([conv])
    assert (res.counts["examples"], res.counts["truncated"], res.counts["extra_pieces"]) == (1, 1, 0)
    row = res.table.to_pylist()[0]
    assert 200 < len(row["input_ids"]) <= 256
    text = tok.decode(row["input_ids"])
    assert text.startswith("###system###\nSys.\n\n###instruction###\nSTART ") and " END\n\n###response###\n" in text
    assert _decoded_runs(tok, row) == ["Short answer.\n###<|im_end|>"]


def test_single_turn_whose_reply_cannot_fit_is_dropped():
    tok = tokenizer("qwen2-1.5b-instruct-boundless")
    long_text = "".join(m.content for m in _long_chats(1)[0].messages[1:])
    messages = [Message(role="user", content="Q"), Message(role="assistant", content=long_text)]
    conv = Conversation(id="huge", messages=messages)
    res = Encoder(tok, BUILTIN_TEMPLATES["markers"], max_len=256).encode([conv])
    assert res.counts["dropped"] == 1 and res.table.num_rows == 0
    assert res.rejects[0].reason == "too_long" and "256" in res.rejects[0].errors[0].message


# --------------------------------------------------------------------------------------------------
# Options, determinism, accounting, the default tokenizer


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"train_on": "assistant"}, "completion, last, all"),
        ({"overflow": "error"}, "split, truncate, drop"),
        ({"max_len": 0}, "max-len"),
    ],
)
def test_bad_options_are_config_errors(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        Encoder(default_tokenizer(), BUILTIN_TEMPLATES["markers"], **kwargs)


def test_deterministic():
    tok = tokenizer("smollm2-135m")
    convs = [*_sample(), *_long_chats(5)]
    a = Encoder(tok, BUILTIN_TEMPLATES["markers"], max_len=512).encode(convs)
    b = Encoder(tok, BUILTIN_TEMPLATES["markers"], max_len=512).encode(convs)
    assert a.table.equals(b.table) and a.counts == b.counts


def test_accounting_on_real_data():
    tok = tokenizer("mistral-7b-instruct-v0.3")
    convs = [*alpaca(limit=100), *_long_chats(20), *kto()[130:150]]
    res = Encoder(tok, load_template("tokenizer", tok), max_len=1024).encode(convs)
    c = res.counts
    assert c["conversations"] == len(convs)
    assert c["conversations"] + c["extra_pieces"] == c["examples"] + c["dropped"] + c["rejected"]
    assert c["rejected"] == sum(res.rejected.values()) and len(res.rejects) == c["dropped"] + c["rejected"]
    assert c["tokens"] == sum(len(x) for x in res.table["input_ids"].to_pylist())
    assert c["trained_tokens"] == sum(label != IGNORE_INDEX for x in res.table["labels"].to_pylist() for label in x)


def test_default_tokenizer_encodes_without_any_file():
    tok = default_tokenizer()
    res = Encoder(tok, BUILTIN_TEMPLATES["markers"]).encode(list(alpaca(limit=3)))
    row = res.table.to_pylist()[0]
    assert tok.convert_ids_to_tokens(row["input_ids"][:2]) == ["###instruction###", "Ċ"]
    assert "demo" in DEFAULT_TOKENIZER_NOTICE


def test_prompt_cut_never_joins_a_marker():
    import re

    from prep.overflow import cut_middle

    markers = re.compile(re.escape("<|im_end|>"))
    assert cut_middle("ab<|im_XXXXend|>cd", 7, 11, markers) == "ab<|imend|>cd"
    assert cut_middle("abcdefgh", 2, 6, markers) == "abgh"
