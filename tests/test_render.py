"""prep.render: templates as data, exact rendered texts, spans, the tokenizer's chat template via placeholders."""

from __future__ import annotations

import pytest

from _conv import (
    THINKING_TEMPLATE,
    TOKENIZER_NAMES,
    alpaca,
    kto,
    reasoning_conversations,
    sharegpt,
    tokenizer,
    with_system,
)
from prep.errors import ConfigError
from prep.render import (
    BUILTIN_TEMPLATES,
    RenderError,
    RenderFailure,
    RoleWrap,
    Template,
    load_template,
    render,
    render_batch,
    template_sha256,
)
from prep.tokenizer import adds_bos
from schemas import Conversation, Message

ALPACA_554 = [  # alpaca_en_demo.json record 554: {"instruction": "Sum up the numbers.", "input": "3, 2, 5", ...}
    Message(role="user", content="Sum up the numbers.\n\n3, 2, 5"),
    Message(role="assistant", content="The sum of the numbers is 10."),
]
TWO_TURNS = [
    Message(role="system", content="Be brief."),
    Message(role="user", content="What is 2+2?"),
    Message(role="assistant", content="4."),
    Message(role="user", content="And times 3?"),
    Message(role="assistant", content="12."),
]

# The exact texts quoted in the README (eos = <|endoftext|>, a tokenizer without a default BOS).
EXPECTED = {
    ("markers", "alpaca"): (
        "###instruction###\nSum up the numbers.\n\n3, 2, 5\n\n###response###\nThe sum of the numbers is 10.\n###<|endoftext|>"
    ),
    ("markers", "two_turns"): (
        "###system###\nBe brief.\n\n###human###\nWhat is 2+2?\n\n###assistant###\n4.\n###<|endoftext|>\n\n"
        "###human###\nAnd times 3?\n\n###assistant###\n12.\n###<|endoftext|>"
    ),
    ("chatml", "alpaca"): (
        "<|im_start|>user\nSum up the numbers.\n\n3, 2, 5<|im_end|>\n<|im_start|>assistant\nThe sum of the numbers is 10.<|im_end|>"
    ),
    ("chatml", "two_turns"): (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nWhat is 2+2?<|im_end|>\n"
        "<|im_start|>assistant\n4.<|im_end|>\n<|im_start|>user\nAnd times 3?<|im_end|>\n<|im_start|>assistant\n12.<|im_end|>"
    ),
}
EXPECTED_TOKENIZER_TEMPLATE = {
    "smollm2-135m": (
        "<|im_start|>user\nSum up the numbers.\n\n3, 2, 5<|im_end|>\n<|im_start|>assistant\nThe sum of the numbers is 10.<|im_end|>\n",
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n4.<|im_end|>\n"
        "<|im_start|>user\nAnd times 3?<|im_end|>\n<|im_start|>assistant\n12.<|im_end|>\n",
    ),
    "qwen2-1.5b-instruct-boundless": (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\nSum up the numbers.\n\n3, 2, 5<|im_end|>\n"
        "<|im_start|>assistant\nThe sum of the numbers is 10.<|im_end|>\n",
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n4.<|im_end|>\n"
        "<|im_start|>user\nAnd times 3?<|im_end|>\n<|im_start|>assistant\n12.<|im_end|>\n",
    ),
    "mistral-7b-instruct-v0.3": (  # the system prompt is dropped: the conversation ends with an assistant turn
        "<s>[INST] Sum up the numbers.\n\n3, 2, 5[/INST] The sum of the numbers is 10.</s>",
        "<s>[INST] What is 2+2?[/INST] 4.</s>[INST] And times 3?[/INST] 12.</s>",
    ),
    "gpt2-dialogpt-small": (
        "Sum up the numbers.\n\n3, 2, 5<|endoftext|>The sum of the numbers is 10.<|endoftext|>",
        "Be brief.<|endoftext|>What is 2+2?<|endoftext|>4.<|endoftext|>And times 3?<|endoftext|>12.<|endoftext|>",
    ),
}


def _bos(tok, template: Template) -> str:
    return tok.bos_token if adds_bos(tok) and not template.uses_chat_template else ""


# --------------------------------------------------------------------------------------------------
# Built-in data templates: exact texts and spans


@pytest.mark.parametrize("name", ["markers", "chatml"])
@pytest.mark.parametrize("case", ["alpaca", "two_turns"])
def test_builtin_templates_render_exact_text(name, case):
    messages = ALPACA_554 if case == "alpaca" else TWO_TURNS
    rendered = render(messages, BUILTIN_TEMPLATES[name], eos="<|endoftext|>")
    assert rendered.text == EXPECTED[(name, case)]


def test_markers_spans_cover_content_and_trained_end():
    r = render(TWO_TURNS, BUILTIN_TEMPLATES["markers"], eos="</s>")
    assert [r.text[s.start : s.end] for s in r.spans] == [m.content for m in TWO_TURNS]
    assert [r.text[s.end : s.stop] for s in r.spans] == ["", "", "\n###</s>", "", "\n###</s>"]


def test_markers_single_turn_keeps_system_prompt_first():
    r = render([Message(role="system", content="S"), *ALPACA_554], BUILTIN_TEMPLATES["markers"], eos="</s>")
    assert r.text.startswith("###system###\nS\n\n###instruction###\n")


def test_bos_goes_in_front():
    r = render(ALPACA_554, BUILTIN_TEMPLATES["chatml"], bos="<s>")
    assert r.text.startswith("<s><|im_start|>user\n") and r.spans[0].start == len("<s><|im_start|>user\n")


def test_markers_needs_an_eos():
    with pytest.raises(ConfigError, match="EOS"):
        render(ALPACA_554, BUILTIN_TEMPLATES["markers"])


@pytest.mark.parametrize("name", ["markers", "chatml"])
def test_spans_locate_every_content_on_real_data(name):
    convs = [*alpaca(limit=100), *[with_system(c) for c in alpaca(limit=20)], *sharegpt(limit=30), *kto(limit=30)]
    for conv, r in zip(convs, render_batch([c.messages for c in convs], BUILTIN_TEMPLATES[name], eos="</s>")):
        assert [r.text[s.start : s.end] for s in r.spans] == [m.content for m in conv.messages]
        assert all(a.stop <= b.start for a, b in zip(r.spans, r.spans[1:]))


# --------------------------------------------------------------------------------------------------
# The tokenizer's own chat template


@pytest.mark.parametrize("name", TOKENIZER_NAMES)
def test_tokenizer_template_exact_texts(name):
    tok = tokenizer(name)
    template = load_template("tokenizer", tok)
    alpaca_text, two_turns_text = EXPECTED_TOKENIZER_TEMPLATE[name]
    assert render(ALPACA_554, template, tok).text == alpaca_text
    assert render(TWO_TURNS, template, tok).text == two_turns_text


@pytest.mark.parametrize("name", TOKENIZER_NAMES)
def test_tokenizer_template_equals_apply_chat_template_on_real_data(name):
    tok = tokenizer(name)
    template = load_template("tokenizer", tok)
    convs = [*alpaca(limit=60), *sharegpt(limit=20), *kto(limit=20)]
    if not name.startswith("mistral"):
        convs += [with_system(c) for c in alpaca(limit=10)]
    for conv, r in zip(convs, render_batch([c.messages for c in convs], template, tok)):
        expected = tok.apply_chat_template([m.model_dump(exclude={"train"}) for m in conv.messages], tokenize=False)
        assert r.text == expected
        assert r.dropped == ()
        for s in r.spans:
            content = conv.messages[s.message].content
            assert r.text[s.start : s.end] in (content, content.strip())


def test_tokenizer_template_end_of_turn_runs_to_first_special_token():
    cases = {
        "qwen2-1.5b-instruct-boundless": ["<|im_end|>", "<|im_end|>", "<|im_end|>", "<|im_end|>", "<|im_end|>"],
        "mistral-7b-instruct-v0.3": ["[/INST]", "</s>", "[/INST]", "</s>"],
        "gpt2-dialogpt-small": ["<|endoftext|>"] * 5,
    }
    for name, ends in cases.items():
        tok = tokenizer(name)
        r = render(TWO_TURNS, load_template("tokenizer", tok), tok)
        assert [r.text[s.end : s.stop] for s in r.spans] == ends


def test_mistral_drops_system_prompt_and_says_so():
    tok = tokenizer("mistral-7b-instruct-v0.3")
    r = render(TWO_TURNS, load_template("tokenizer", tok), tok)
    assert r.dropped == (0,)
    assert [s.message for s in r.spans] == [1, 2, 3, 4]


def test_mistral_trimmed_reply_is_located_stripped():
    tok = tokenizer("mistral-7b-instruct-v0.3")
    messages = [Message(role="user", content="Hi"), Message(role="assistant", content="  Hello there!\n")]
    r = render(messages, load_template("tokenizer", tok), tok)
    assert r.text == tok.apply_chat_template([m.model_dump(exclude={"train"}) for m in messages], tokenize=False)
    assert r.text[r.spans[1].start : r.spans[1].stop] == "Hello there!</s>"


def test_chat_template_that_rewrites_content_is_a_failure():
    from prep.tokenizer import default_tokenizer

    tok = default_tokenizer()
    upper = Template(
        name="tokenizer", chat_template="{% for m in messages %}{{ m.content | upper }}<|im_end|>{% endfor %}"
    )
    out = render_batch([ALPACA_554], upper, tok)[0]
    assert isinstance(out, RenderFailure) and out.reason == "template_mismatch"
    with pytest.raises(RenderError):
        render(ALPACA_554, upper, tok)


def test_templates_that_split_off_reasoning_render_it_where_they_keep_it_and_drop_it_where_they_do_not():
    from prep.tokenizer import default_tokenizer

    tok = default_tokenizer()
    conversations = reasoning_conversations()
    out = render_batch(list(conversations), THINKING_TEMPLATE, tok)
    for messages, r in zip(conversations, out):
        assert not isinstance(r, RenderFailure)
        assert r.text == tok.apply_chat_template(
            [m.model_dump(exclude={"train"}) for m in messages], tokenize=False, chat_template=THINKING_TEMPLATE.chat_template
        )
    one, two, plain_last = out
    spans = {r: [(s.message, r.text[s.start : s.stop]) for s in r.spans if s.message % 2] for r in out}
    assert spans[one] == [(1, "<think>\n2 and 2.\n</think>\n\n4<|im_end|>")] and one.reasoning_dropped == ()
    assert spans[two] == [(1, "4<|im_end|>"), (3, "<think>\n3+3.\n</think>\n\n6<|im_end|>")]
    assert two.reasoning_dropped == (1,)  # the template keeps only the last reply's reasoning
    assert spans[plain_last][1] == (3, "You're welcome.<|im_end|>")  # its empty <think> block is the prompt's
    assert plain_last.reasoning_dropped == (1,)


def test_a_template_that_rewrites_the_think_block_is_a_mismatch():
    from prep.convert import fold_reasoning
    from prep.tokenizer import default_tokenizer

    rewrites = Template(name="tokenizer", chat_template="{%- for m in messages %}{{ m.content | replace('<think>', "
                        "'<reasoning>') }}<|im_end|>{%- endfor %}")
    messages = [Message(role="user", content="q"), Message(role="assistant", content=fold_reasoning("r", "a"))]
    out = render_batch([messages], rewrites, default_tokenizer())[0]
    assert isinstance(out, RenderFailure) and out.reason == "template_mismatch"


def test_chat_template_that_raises_is_a_failure_for_that_conversation_only():
    from prep.tokenizer import default_tokenizer

    tok = default_tokenizer()
    picky = Template(
        name="tokenizer",
        chat_template="{% for m in messages %}{% if m.content == 'boom' %}{{ raise_exception('no') }}{% endif %}"
        "{{ m.content }}<|im_end|>{% endfor %}",
    )
    bad = [Message(role="user", content="boom"), Message(role="assistant", content="x")]
    out = render_batch([ALPACA_554, bad], picky, tok)
    assert not isinstance(out[0], RenderFailure)
    assert isinstance(out[1], RenderFailure) and out[1].reason == "template_error"


def test_chat_template_that_prints_todays_date_prints_a_fixed_one():
    import datetime

    from prep.tokenizer import default_tokenizer

    tok = default_tokenizer()
    dated = Template(
        name="tokenizer",
        chat_template="Today Date: {{ strftime_now('%d %b %Y') }}\n{% for m in messages %}{{ m.content }}<|im_end|>"
        "{% endfor %}",
    )
    out = render_batch([ALPACA_554, ALPACA_554], dated, tok)
    assert [r.text.splitlines()[0] for r in out] == ["Today Date: 26 Jul 2024"] * 2
    assert out[0].text[out[0].spans[1].start : out[0].spans[1].stop] == ALPACA_554[1].content + "<|im_end|>"
    today = datetime.datetime.now().strftime("%d %b %Y")  # outside prep's render the real clock is back
    assert today in tok.apply_chat_template(
        [{"role": "user", "content": "x"}], tokenize=False, chat_template=dated.chat_template
    )


def test_tokenizer_template_needs_a_chat_template():
    class NoTemplate:
        chat_template = None
        name_or_path = "x"

    with pytest.raises(ConfigError, match="no chat_template"):
        load_template("tokenizer", NoTemplate())


def test_chatml_matches_a_real_chatml_chat_template_between_turns():
    tok = tokenizer("smollm2-135m")
    hf = tok.apply_chat_template([m.model_dump(exclude={"train"}) for m in TWO_TURNS], tokenize=False)
    assert render(TWO_TURNS, BUILTIN_TEMPLATES["chatml"]).text + "\n" == hf  # `after` only between turns


# --------------------------------------------------------------------------------------------------
# User templates (TOML / YAML) and hashing

TOML = """
name = "qa"
append_eos = true
markers = ["Q:", "A:"]

[system]
prefix = "Context: "
after = "\\n"

[user]
prefix = "Q: "
after = "\\n"

[assistant]
prefix = "A: "
end = " <END>"
after = "\\n\\n"
"""


def test_user_toml_template(tmp_path):
    path = tmp_path / "qa.toml"
    path.write_text(TOML)
    template = load_template(str(path))
    assert template.name == "qa" and template.markers == ("Q:", "A:")
    r = render(ALPACA_554, template, eos="</s>")
    assert r.text == "Q: Sum up the numbers.\n\n3, 2, 5\nA: The sum of the numbers is 10. <END></s>"
    assert r.text[r.spans[1].start : r.spans[1].stop] == "The sum of the numbers is 10. <END></s>"


def test_user_yaml_template_with_single_turn_variant(tmp_path):
    path = tmp_path / "t.yaml"
    path.write_text(
        'user: {prefix: "U: ", after: "\\n"}\n'
        'assistant: {prefix: "B: ", end: "\\n--", after: "\\n"}\n'
        "single_turn:\n"
        '  user: {prefix: "Instruction: ", after: "\\n"}\n'
        '  assistant: {prefix: "Answer: ", end: "\\n--"}\n'
    )
    template = load_template(str(path))
    assert template.name == "t"
    assert render(ALPACA_554, template).text.startswith("Instruction: Sum up")
    assert render(TWO_TURNS[1:], template).text == "U: What is 2+2?\nB: 4.\n--\nU: And times 3?\nB: 12.\n--"
    assert template.role_markers() == ("U:", "B:", "--", "Instruction:", "Answer:")


@pytest.mark.parametrize(
    "text, match",
    [
        ("[assistant]\nprefx = 'A'\n", "unknown key 'prefx'; valid keys: prefix, end, after"),
        ("colour = 1\n[assistant]\n", "unknown key 'colour'"),
        ("[user]\nprefix = 'U'\n", r"\[assistant\] table is required"),
        ("[assistant]\nprefix = 3\n", "must be strings"),
        ("[assistant\n", "cannot parse"),
    ],
)
def test_bad_user_template_is_a_config_error(tmp_path, text, match):
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=match):
        load_template(str(path))


def test_unknown_template_name_lists_the_valid_ones():
    with pytest.raises(ConfigError, match="markers, chatml, tokenizer"):
        load_template("alpaca")
    with pytest.raises(ConfigError, match="not found"):
        load_template("missing.toml")


def test_template_sha256_is_stable_and_ignores_the_name():
    markers = BUILTIN_TEMPLATES["markers"]
    assert template_sha256(markers) == template_sha256(Template(**{**markers.__dict__, "name": "other"}))
    assert template_sha256(markers) != template_sha256(BUILTIN_TEMPLATES["chatml"])
    changed = Template(**{**markers.__dict__, "roles": markers.roles.__class__(assistant=RoleWrap("A", "B", "C"))})
    assert template_sha256(changed) != template_sha256(markers)


def test_role_markers():
    assert BUILTIN_TEMPLATES["markers"].role_markers() == (
        "###system###",
        "###instruction###",
        "###response###",
        "###human###",
        "###assistant###",
        "###tools###",
        "###tool###",
        "###call###",
    )
    derived = Template(name="x", roles=BUILTIN_TEMPLATES["markers"].roles)
    assert "###" not in derived.role_markers()  # plain-text end marker: markdown uses it


def test_render_accepts_a_conversation():
    conv = Conversation(id="c", messages=ALPACA_554)
    assert render(conv, BUILTIN_TEMPLATES["chatml"]).text == EXPECTED[("chatml", "alpaca")]
