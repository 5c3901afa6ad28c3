"""prep.tokenizer: loading, the embedded default, fingerprints, the marker alignment report, registering markers."""

from __future__ import annotations

import subprocess
import sys

import pytest

from _conv import TOKENIZER_NAMES, TOKENIZERS, tokenizer
from prep.errors import ConfigError
from prep.render import BUILTIN_TEMPLATES, load_template
from prep.tokenizer import (
    DEFAULT_TOKENIZER_NAME,
    adds_bos,
    check_markers,
    default_tokenizer,
    load_tokenizer,
    register_markers,
    tokenizer_fingerprint,
)

MIXED = "Café naïve — 中文 日本語 Привет مرحبا 🙂\tdouble  spaces\nnew line ### heading"

# --------------------------------------------------------------------------------------------------
# The embedded default


def test_default_tokenizer_is_a_real_fast_tokenizer_with_registered_markers():
    from transformers import PreTrainedTokenizerFast

    tok = default_tokenizer()
    assert isinstance(tok, PreTrainedTokenizerFast) and tok.is_fast
    assert tok.name_or_path == DEFAULT_TOKENIZER_NAME
    assert len(tok) == 267
    assert (tok.eos_token, tok.pad_token, tok.bos_token) == ("<|endoftext|>", "<|endoftext|>", None)
    specials = {t.content for t in tok.added_tokens_decoder.values() if t.special}
    assert specials == {
        "<|endoftext|>",
        "<|im_start|>",
        "<|im_end|>",
        "###system###",
        "###instruction###",
        "###response###",
        "###human###",
        "###assistant###",
        "###tools###",
        "###tool###",
        "###call###",
    }
    assert "###" not in specials


def test_default_tokenizer_is_byte_level_and_round_trips():
    tok = default_tokenizer()
    ids = tok(MIXED, add_special_tokens=False).input_ids
    assert len(ids) == len(MIXED.encode()) and max(ids) < 256  # one token per byte, no merges
    assert tok.decode(ids) == MIXED
    assert tok("a", add_special_tokens=True).input_ids == tok("a", add_special_tokens=False).input_ids
    assert tok("###response###\n###", add_special_tokens=False).input_ids == [261, 10, 35, 35, 35]


def test_default_tokenizer_is_deterministic_across_processes():
    code = (
        "from prep.tokenizer import default_tokenizer, tokenizer_fingerprint;"
        "print(tokenizer_fingerprint(default_tokenizer()))"
    )
    out = {
        subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env).stdout
        for env in ({"PYTHONHASHSEED": "1", "HF_HUB_OFFLINE": "1"}, {"PYTHONHASHSEED": "2", "HF_HUB_OFFLINE": "1"})
    }
    assert out == {tokenizer_fingerprint(default_tokenizer()) + "\n"}


def test_load_tokenizer_none_is_the_default():
    assert load_tokenizer(None).name_or_path == DEFAULT_TOKENIZER_NAME


# --------------------------------------------------------------------------------------------------
# Real tokenizers


@pytest.mark.parametrize("name", TOKENIZER_NAMES)
def test_real_tokenizers_load_fast_and_round_trip(name):
    tok = tokenizer(name)
    assert tok.is_fast
    assert tok.decode(tok(MIXED, add_special_tokens=False).input_ids) == MIXED


def test_adds_bos_detects_the_tokenizers_that_add_one():
    assert {name: adds_bos(tokenizer(name)) for name in TOKENIZER_NAMES} == {
        "gpt2-dialogpt-small": False,  # bos = eos = <|endoftext|>, but never added
        "mistral-7b-instruct-v0.3": True,
        "smollm2-135m": False,
        "qwen2-1.5b-instruct-boundless": False,  # no bos at all
    }


def test_load_tokenizer_errors_are_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="cannot load"):
        load_tokenizer(str(tmp_path / "nothing-here"))


def test_fingerprint_is_stable_and_tells_tokenizers_apart():
    prints = {name: tokenizer_fingerprint(tokenizer(name)) for name in TOKENIZER_NAMES}
    assert len(set(prints.values())) == len(TOKENIZER_NAMES)
    fresh = load_tokenizer(str(TOKENIZERS / "smollm2-135m"))
    assert tokenizer_fingerprint(fresh) == prints["smollm2-135m"]
    fresh.chat_template = "{{ messages[0].content }}"
    assert tokenizer_fingerprint(fresh) != prints["smollm2-135m"]


# --------------------------------------------------------------------------------------------------
# Marker alignment report


def test_check_markers_default_tokenizer_markers_template():
    report = {c.marker: c for c in check_markers(BUILTIN_TEMPLATES["markers"], default_tokenizer())}
    assert list(report) == [
        "###system###",
        "###instruction###",
        "###response###",
        "###human###",
        "###assistant###",
        "###tools###",
        "###tool###",
        "###call###",
        "###",
        "<|endoftext|>",
    ]
    assert all(c.single_token and c.special and c.stable for m, c in report.items() if m != "###")
    assert report["###"].ids == (35, 35, 35) and not report["###"].special


def test_check_markers_gpt2_markers_are_several_tokens_and_merge_with_a_space():
    report = {c.marker: c for c in check_markers(BUILTIN_TEMPLATES["markers"], tokenizer("gpt2-dialogpt-small"))}
    response = report["###response###"]
    assert response.tokens == ("###", "response", "###") and not response.single_token
    assert response.changed_in == ("' ###response### '",)  # " ###" is one token: "Ġ###"
    assert report["<|endoftext|>"].single_token and report["<|endoftext|>"].stable


def test_check_markers_chatml_on_qwen_is_single_stable_special_tokens():
    report = check_markers(BUILTIN_TEMPLATES["chatml"], tokenizer("qwen2-1.5b-instruct-boundless"))
    assert [(c.marker, c.ids, c.special, c.stable) for c in report] == [
        ("<|im_start|>", (151644,), True, True),
        ("<|im_end|>", (151645,), True, True),
    ]


def test_check_markers_mistral_prefixes_a_word_boundary():
    report = {c.marker: c for c in check_markers(BUILTIN_TEMPLATES["markers"], tokenizer("mistral-7b-instruct-v0.3"))}
    assert report["###"].tokens == ("▁###",)  # SentencePiece prepends ▁ at the start of a text
    assert not report["###"].stable


def test_check_markers_for_the_tokenizer_template_reports_what_the_chat_template_writes():
    tok = tokenizer("mistral-7b-instruct-v0.3")
    report = check_markers(load_template("tokenizer", tok), tok)
    assert [(c.marker, c.single_token, c.special) for c in report] == [
        ("<s>", True, True),
        ("[INST]", True, True),
        ("[/INST]", True, True),
        ("</s>", True, True),
    ]


# --------------------------------------------------------------------------------------------------
# Registering markers (--add-special-tokens)


def test_register_markers_adds_the_role_markers_but_not_the_bare_end_marker():
    tok = load_tokenizer(str(TOKENIZERS / "gpt2-dialogpt-small"))  # a fresh one: this mutates it
    before = len(tok)
    added = register_markers(tok, BUILTIN_TEMPLATES["markers"])
    assert added == ["###system###", "###instruction###", "###response###", "###human###", "###assistant###",
                     "###tools###", "###tool###", "###call###"]
    assert len(tok) == before + 8
    report = {c.marker: c for c in check_markers(BUILTIN_TEMPLATES["markers"], tok)}
    assert report["###response###"].single_token and report["###response###"].stable
    assert not report["###"].special
    assert register_markers(tok, BUILTIN_TEMPLATES["markers"]) == []


def test_register_markers_skips_tokens_that_are_already_special():
    tok = load_tokenizer(str(TOKENIZERS / "qwen2-1.5b-instruct-boundless"))
    fingerprint = tokenizer_fingerprint(tok)
    assert register_markers(tok, BUILTIN_TEMPLATES["chatml"]) == []
    assert tokenizer_fingerprint(tok) == fingerprint
    assert register_markers(tok, BUILTIN_TEMPLATES["markers"]) != []
    assert tokenizer_fingerprint(tok) != fingerprint
