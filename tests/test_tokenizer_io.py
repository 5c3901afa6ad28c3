"""prep.tokenizer_io: the tokenizer saved with the shards encodes every text exactly as the one used.

Every tokenizer in ../shared/data/tokenizers, and Llama/Mistral-family SentencePiece variants built from the
Mistral v0.3 files (tokenizer_config `legacy` true / false / absent; tokenizer.json, tokenizer.model alone, or
both; with and without two extra added tokens), is saved, reloaded through AutoTokenizer as users and trainers
load it, and compared id for id on a mixed-script corpus; each is packed and `prep verify` must pass.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from _conv import TOKENIZERS
from prep.errors import PrepError
from prep.pipeline import build_config, pack_shards
from prep.render import BUILTIN_TEMPLATES
from prep.tokenizer import default_tokenizer, load_tokenizer
from prep.tokenizer_io import GENERIC_CLASS, save_tokenizer, tokenizer_fingerprint, unsaved_settings
from prep.verify import verify_shards

REPO = Path(__file__).resolve().parents[1]
MISTRAL = TOKENIZERS / "mistral-7b-instruct-v0.3"
SHARED = sorted(p.name for p in TOKENIZERS.iterdir() if p.is_dir())
TEXTS = [
    "Café naïve résumé — Ångström, Œuvre, straße",
    "中文分词测试，日本語のテキスト、한국어",
    "Привет, как дела? Ёжик в тумане.",
    "مرحبا بالعالم، كيف حالك؟",
    "emoji 🙂👍🏽 and 🇫🇷 flags",
    "\ttab\t\tand  double  spaces   triple\n\nnew lines\n",
    " leading space", "trailing space ", "\n", " ", "",
    "### heading\n###\n",
]
FILES = {"json": ("tokenizer.json",), "model": ("tokenizer.model",), "both": ("tokenizer.json", "tokenizer.model")}
EXTRA_TOKENS = {"<|user|>": True, "<|assistant|>": False}  # Zephyr-style: one special, one plain added token
VARIANTS = [f"legacy-{legacy}-{files}-extra" for legacy in ("true", "false", "absent") for files in FILES]
PLAIN = [f"legacy-{legacy}-json-plain" for legacy in ("true", "false", "absent")]  # no extra tokens


def corpus(tokenizer) -> list[str]:
    """TEXTS, plus every special/added token and template marker alone, touching text, between newlines and
    spaces, and the chat template's rendering of a short chat when the tokenizer has one."""
    tokens = {str(t) for t in tokenizer.added_tokens_decoder.values()} | {str(t) for t in tokenizer.all_special_tokens}
    tokens = sorted(tokens)[:40] + [m for t in BUILTIN_TEMPLATES.values() for m in t.role_markers()] + ["[INST]", "###"]
    texts = list(TEXTS)
    for t in tokens:
        texts += [t, f"{t}\n", f"\n{t}", f"{t}\nHi", f"x{t}y", f" {t} ", f"{t}{t}", f"Hello{t}\n\n{t} world"]
    if tokenizer.chat_template:
        chat = [{"role": "user", "content": "Wie geht's? 你好"}, {"role": "assistant", "content": "Gut.\n\nDanke!"}]
        texts.append(tokenizer.apply_chat_template(chat, tokenize=False))
    return texts


def encodings(tokenizer, texts: list[str]) -> list:
    """Ids with and without special tokens (batched and one by one), and the decoded text."""
    with_special = tokenizer(texts, add_special_tokens=True)["input_ids"]
    return [with_special, tokenizer(texts, add_special_tokens=False)["input_ids"],
            [tokenizer.encode(t) for t in texts], [tokenizer.decode(ids) for ids in with_special]]


def make_variant(folder: Path, name: str) -> Path:
    """A Mistral-family SentencePiece tokenizer folder: legacy true/false/absent, which files, extra tokens or not."""
    _, legacy, files, extra = name.split("-")
    out = folder / name
    out.mkdir()
    for file in FILES[files] + ("special_tokens_map.json",):
        shutil.copy(MISTRAL / file, out / file)
    config = json.loads((MISTRAL / "tokenizer_config.json").read_text(encoding="utf-8"))
    config.pop("legacy")
    if legacy != "absent":
        config["legacy"] = legacy == "true"
    if extra == "extra":
        first = max(map(int, config["added_tokens_decoder"])) + 1
        for k, (content, special) in enumerate(EXTRA_TOKENS.items()):
            config["added_tokens_decoder"][str(first + k)] = {
                "content": content, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False,
                "special": special}
    (out / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    return out


@pytest.fixture(scope="module")
def variants(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("variants")
    return {name: make_variant(folder, name) for name in VARIANTS + PLAIN}


def _path(name: str, variants: dict[str, Path]) -> Path:
    return variants[name] if name in variants else TOKENIZERS / name


@pytest.mark.parametrize("name", SHARED + VARIANTS + PLAIN)
def test_saved_tokenizer_encodes_every_text_as_the_one_used(name, variants, tmp_path):
    tok = load_tokenizer(str(_path(name, variants)))
    saved = AutoTokenizer.from_pretrained(save_tokenizer(tok, tmp_path / "tokenizer"))
    texts = corpus(tok)
    assert encodings(saved, texts) == encodings(tok, texts)
    assert type(saved) is type(tok)  # the model's own class, not the generic fallback
    assert tokenizer_fingerprint(saved) == tokenizer_fingerprint(tok)
    assert len(saved) == len(tok) and saved.special_tokens_map == tok.special_tokens_map
    assert saved.chat_template == tok.chat_template
    if name.endswith("-extra"):
        assert {t: saved.convert_tokens_to_ids(t) for t in EXTRA_TOKENS} == {t: len(tok) - 2 + k for k, t in
                                                                              enumerate(EXTRA_TOKENS)}


@pytest.mark.parametrize("name", SHARED + [v for v in VARIANTS if "-both-" not in v])  # both: as json
def test_fresh_shards_pass_verify_for_every_tokenizer(name, variants, tmp_path):
    out = tmp_path / "shards"
    config = build_config(inputs=[str(REPO / "examples" / "sharegpt.jsonl")], output=str(out),
                          tokenizer=str(_path(name, variants)), max_len=512)
    pack_shards(config)
    report = verify_shards(out)
    assert report.ok, [str(p) for p in report.problems]
    used, saved = load_tokenizer(str(_path(name, variants))), AutoTokenizer.from_pretrained(out / "tokenizer")
    assert encodings(saved, corpus(used)) == encodings(used, corpus(used))


def test_legacy_is_what_save_pretrained_loses(variants, tmp_path):
    """The cause, in transformers 5.x: LlamaTokenizer takes `legacy` for itself (it picks the Metaspace prepend
    scheme) and never hands it to the base class, so save_pretrained does not write it; the reloaded copy falls
    back to legacy=False. If transformers starts saving it, this test fails and the workaround can be dropped."""
    tok = load_tokenizer(str(variants["legacy-true-json-extra"]))
    assert json.loads(tok.backend_tokenizer.to_str())["pre_tokenizer"]["prepend_scheme"] == "always"
    tok.save_pretrained(tmp_path / "plain")
    assert "legacy" not in json.loads((tmp_path / "plain" / "tokenizer_config.json").read_text())
    plain = AutoTokenizer.from_pretrained(tmp_path / "plain")
    assert json.loads(plain.backend_tokenizer.to_str())["pre_tokenizer"]["prepend_scheme"] == "first"
    assert plain("<s>\n").input_ids != tok("<s>\n").input_ids and plain("</s>\n").input_ids != tok("</s>\n").input_ids
    assert unsaved_settings(tok, json.loads((tmp_path / "plain" / "tokenizer_config.json").read_text())) == {
        "legacy": True}
    ours = save_tokenizer(tok, tmp_path / "ours")
    assert json.loads((ours / "tokenizer_config.json").read_text())["legacy"] is True
    again = AutoTokenizer.from_pretrained(ours)
    assert again("<s>\n").input_ids == tok("<s>\n").input_ids and again("</s>\n").input_ids == tok("</s>\n").input_ids


def test_a_pipeline_the_class_cannot_rebuild_is_saved_for_the_generic_class(tmp_path):
    from tokenizers import normalizers

    tok = load_tokenizer(str(MISTRAL))
    tok.backend_tokenizer.normalizer = normalizers.Lowercase()  # LlamaTokenizer rebuilds without a normalizer
    folder = save_tokenizer(tok, tmp_path / "tokenizer")
    assert json.loads((folder / "tokenizer_config.json").read_text())["tokenizer_class"] == GENERIC_CLASS
    saved = AutoTokenizer.from_pretrained(folder)
    assert saved("Hello World").input_ids == tok("Hello World").input_ids == tok("hello world").input_ids
    assert tokenizer_fingerprint(saved) == tokenizer_fingerprint(tok)


def test_a_tokenizer_no_saved_form_reproduces_is_an_error(tmp_path):
    from transformers import PreTrainedTokenizerFast

    class Shouting(PreTrainedTokenizerFast):  # behaviour in Python code that no saved file carries
        def __call__(self, text, *args, **kwargs):
            return super().__call__([t.upper() for t in text] if isinstance(text, list) else text.upper(),
                                    *args, **kwargs)

    base = default_tokenizer()
    tok = Shouting(tokenizer_object=base.backend_tokenizer, eos_token=base.eos_token)
    with pytest.raises(PrepError, match=r"reloads as a different tokenizer, even as a plain PreTrainedTokenizerFast"):
        save_tokenizer(tok, tmp_path / "tokenizer")


def test_a_model_folder_whose_type_forces_another_class_is_named_in_the_error(tmp_path):
    """transformers 5.x loads any tokenizer beside a Qwen2 config.json as Qwen2Tokenizer (model types it lists as
    having wrong Hub tokenizer classes), which rebuilds another pipeline: `prep train` warns with this message."""
    from transformers import PreTrainedTokenizerFast, Qwen2Config

    (tmp_path / "model").mkdir()
    Qwen2Config(vocab_size=264, hidden_size=8, num_hidden_layers=1, num_attention_heads=1).save_pretrained(
        tmp_path / "model")
    tok = default_tokenizer()
    with pytest.raises(PrepError, match=r"as Qwen2Tokenizer, the class transformers uses for model type 'qwen2'"):
        save_tokenizer(tok, tmp_path / "model")
    texts = corpus(tok)
    assert encodings(PreTrainedTokenizerFast.from_pretrained(tmp_path / "model"), texts) == encodings(tok, texts)


def test_fingerprint_follows_behaviour_not_only_the_backend_json():
    plain = load_tokenizer(str(TOKENIZERS / "smollm2-135m"))
    split = AutoTokenizer.from_pretrained(TOKENIZERS / "smollm2-135m", split_special_tokens=True)
    assert split.backend_tokenizer.to_str() == plain.backend_tokenizer.to_str()  # the same JSON ...
    assert split("<|im_start|>").input_ids != plain("<|im_start|>").input_ids  # ... encoding differently
    assert tokenizer_fingerprint(split) != tokenizer_fingerprint(plain)


def test_legacy_variants_do_not_share_a_fingerprint(variants):
    legacy, modern = (load_tokenizer(str(variants[f"legacy-{v}-json-plain"])) for v in ("true", "false"))
    assert legacy("<s>\n").input_ids != modern("<s>\n").input_ids
    assert tokenizer_fingerprint(legacy) != tokenizer_fingerprint(modern)
    absent = load_tokenizer(str(variants["legacy-absent-json-plain"]))
    assert tokenizer_fingerprint(absent) == tokenizer_fingerprint(modern)  # absent means false: same tokenizer


def test_the_trained_models_tokenizer_is_the_shards_tokenizer(variants, tmp_path):
    shards, run = tmp_path / "shards", tmp_path / "run"
    used = load_tokenizer(str(variants["legacy-true-json-extra"]))
    pack_shards(build_config(inputs=[str(REPO / "examples" / "alpaca.json")], output=str(shards),
                             tokenizer=str(variants["legacy-true-json-extra"]), max_len=256))
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    done = subprocess.run([sys.executable, "-m", "prep", "train", str(shards), "-o", str(run), "--max-steps", "1",
                           "--batch-size", "2", "--no-progress"], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    final = AutoTokenizer.from_pretrained(run)
    assert encodings(final, corpus(used)) == encodings(used, corpus(used))


def test_docstring_examples():
    import doctest
    import importlib

    result = doctest.testmod(importlib.import_module("prep.tokenizer_io"))
    assert result.failed == 0 and result.attempted > 0
