"""Save a tokenizer so that it reloads as the very tokenizer that was used, and fingerprint what it does.

Why saving needs care (transformers 5.x): a tokenizer class with its own `__init__` (`LlamaTokenizer`,
`Qwen2Tokenizer`, `GPT2Tokenizer`, T5, ...) does not load `tokenizer.json` as it is. It takes the
vocabulary and merges from it and rebuilds the normalizer, pre-tokenizer and decoder from its constructor
arguments. `save_pretrained` writes only the arguments that reached the base class, so an argument the
class keeps for itself is lost: `LlamaTokenizer` keeps `legacy`, which picks the Metaspace
`prepend_scheme` (`legacy: true` gives "always", false "first"). A `legacy: true` tokenizer therefore
saves as a `legacy: false` one, and `"<s>\\n"` then encodes to other ids. `save_tokenizer` writes those
arguments too, reloads the folder through `AutoTokenizer` and compares fingerprints; if the class still
rebuilds something differently, the folder is saved for the generic `PreTrainedTokenizerFast` class,
which loads `tokenizer.json` exactly, and it is checked once more.

This module imports only the standard library (and transformers when called): `prep.train` uses it.

>>> import tempfile; from transformers import AutoTokenizer; from prep.tokenizer import default_tokenizer
>>> folder = save_tokenizer(default_tokenizer(), tempfile.mkdtemp())
>>> tokenizer_fingerprint(AutoTokenizer.from_pretrained(folder)) == tokenizer_fingerprint(default_tokenizer())
True
"""

from __future__ import annotations

import hashlib
import inspect
import json
from pathlib import Path
from typing import Any

from prep.errors import PrepError

CONFIG_FILE = "tokenizer_config.json"
GENERIC_CLASS = "PreTrainedTokenizerFast"  # loads tokenizer.json as it is (TokenizersBackend in transformers 5)
# Texts whose ids and decoded text enter the fingerprint: scripts, whitespace runs, and special-token
# lookalikes next to text and newlines (where SentencePiece prepend schemes differ).
PROBE_TEXTS = (
    "Café naïve — 中文 日本語 Привет مرحبا 🙂",
    "\ttab, double  spaces,   three, trailing \n",
    "<s>\n",
    "</s>\n",
    "\n<s>[INST] hi [/INST] ok</s>\n",
    "<|im_start|>user\nHi<|im_end|>\n<|endoftext|>",
    "###instruction###\nx\n\n###response###\ny\n###",
    " leading space\nline\n\n",
)
# Constructor arguments that are not tokenizer settings, or that save_pretrained stores in other files on purpose
# (the BOS/EOS flags live in tokenizer.json's post-processor; special tokens in the special tokens map).
_NOT_SETTINGS = {"self", "vocab", "merges", "vocab_file", "merges_file", "tokenizer_file", "tokenizer_object",
                 "add_bos_token", "add_eos_token"}


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """A sha256 of what a tokenizer does: its backend (model, added tokens, pipeline), special tokens, chat
    template, and the ids and decoded text it gives for `PROBE_TEXTS` (with and without special tokens).

    The probe covers behaviour that lives in Python rather than in the backend JSON (a class's own
    encode or decode, BOS/EOS flags), so two tokenizers that encode differently do not share a fingerprint.

    >>> from prep.tokenizer import default_tokenizer
    >>> tokenizer_fingerprint(default_tokenizer()) == tokenizer_fingerprint(default_tokenizer())
    True
    """
    h = hashlib.sha256()
    h.update(tokenizer.backend_tokenizer.to_str().encode())
    specials = {k: str(v) for k, v in tokenizer.special_tokens_map.items()}
    h.update(json.dumps(specials, sort_keys=True).encode())
    h.update(json.dumps(tokenizer.chat_template, sort_keys=True).encode())
    h.update(json.dumps(probe(tokenizer)).encode())
    return h.hexdigest()


def probe(tokenizer: Any) -> dict[str, list]:
    """The ids of `PROBE_TEXTS` with and without special tokens, and the decoded text of the former.

    >>> from prep.tokenizer import default_tokenizer
    >>> probe(default_tokenizer())["without_special"][2]
    [60, 115, 62, 10]
    """
    texts = list(PROBE_TEXTS)
    with_special = tokenizer(texts, add_special_tokens=True)["input_ids"]
    return {
        "with_special": [list(ids) for ids in with_special],
        "without_special": [list(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]],
        "decoded": [tokenizer.decode(ids, skip_special_tokens=False) for ids in with_special],
    }


def save_tokenizer(tokenizer: Any, folder: str | Path, *, trust_remote_code: bool = False) -> Path:
    """`save_pretrained` into `folder`, then make sure `AutoTokenizer` reloads it as the same tokenizer.

    Steps: write the constructor settings the class keeps to itself (see the module docstring) into
    `tokenizer_config.json`; reload with `AutoTokenizer.from_pretrained(folder)` and compare
    `tokenizer_fingerprint`s; if they differ, save for the generic `PreTrainedTokenizerFast` class (which
    loads `tokenizer.json` exactly) and compare again.

    Args:
        tokenizer: a fast tokenizer.
        folder: where to save (created if missing).
        trust_remote_code: reload with the tokenizer's own code (as it was loaded).

    Returns:
        The folder.

    Raises:
        PrepError: even the generic class reloads a different tokenizer (nothing prep can fix), e.g. a folder
            that also holds a model's config.json whose model type makes AutoTokenizer use its own class (Qwen2,
            Phi-3, ... in transformers 5.x). The files stay written; the message says how to load them.
    """
    folder = Path(folder)
    tokenizer.save_pretrained(folder)
    expected = "sha256:" + tokenizer_fingerprint(tokenizer)
    config = json.loads((folder / CONFIG_FILE).read_text(encoding="utf-8"))
    unsaved = unsaved_settings(tokenizer, config)
    if unsaved:
        config |= unsaved
        _write_config(folder, config)
    if _reload(folder, trust_remote_code)[0] == expected:
        return folder
    config["tokenizer_class"] = GENERIC_CLASS
    config.pop("auto_map", None)
    _write_config(folder, config)
    got, loaded_as = _reload(folder, trust_remote_code)
    if got != expected:
        raise PrepError(_mismatch(folder, tokenizer, got, loaded_as))
    return folder


def _mismatch(folder: Path, tokenizer: Any, got: str, loaded_as: str | None) -> str:
    """Why the saved folder does not reload as `tokenizer`, and what to do."""
    name = type(tokenizer).__name__
    if not got.startswith("sha256:"):
        return f"{folder}: the saved tokenizer ({name}) reloads as {got}, even as a plain {GENERIC_CLASS}"
    model_type = None
    if (folder / "config.json").is_file():
        model_type = json.loads((folder / "config.json").read_text(encoding="utf-8")).get("model_type")
    if model_type and loaded_as != GENERIC_CLASS and loaded_as != "TokenizersBackend":
        return (f"{folder}: AutoTokenizer loads the saved tokenizer ({name}) as {loaded_as}, the class transformers "
                f"uses for model type {model_type!r} (config.json) whatever tokenizer_config.json says, and it encodes "
                f"differently; load it with {GENERIC_CLASS}.from_pretrained({str(folder)!r})")
    return (f"{folder}: the saved tokenizer ({name}) reloads as a different tokenizer, even as a plain "
            f"{GENERIC_CLASS}; shards made with it could not be decoded or checked")


def unsaved_settings(tokenizer: Any, config: dict[str, Any]) -> dict[str, Any]:
    """Constructor arguments of the tokenizer's own class(es) that `config` lacks, with the tokenizer's values.

    Only plain values (bool, int, float, str) that the tokenizer holds as attributes of the same name are
    taken; special tokens, vocabulary files and the BOS/EOS flags are left to save_pretrained.

    >>> from prep.tokenizer import default_tokenizer  # the generic class: nothing of its own
    >>> unsaved_settings(default_tokenizer(), {})
    {}
    """
    found: dict[str, Any] = {}
    for cls in type(tokenizer).__mro__:
        if cls.__module__.startswith("transformers.tokenization_utils") or cls is object:
            break  # the generic base classes store what they take
        init = cls.__dict__.get("__init__")
        if init is None:
            continue
        for name, param in inspect.signature(init).parameters.items():
            if (param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD) or name in _NOT_SETTINGS
                    or name.endswith(("_token", "_tokens")) or name in config or name in found):
                continue
            value = getattr(tokenizer, name, None)
            if isinstance(value, (bool, int, float, str)):
                found[name] = value
    return found


def _reload(folder: Path, trust_remote_code: bool) -> tuple[str, str | None]:
    """("sha256:" + the fingerprint of the folder as AutoTokenizer loads it, its class name), or (why it does not
    load, None)."""
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(folder, trust_remote_code=trust_remote_code)
    except Exception as exc:  # OSError, ValueError, ...: reported by the caller if the fallback fails too
        return f"a tokenizer that does not load ({type(exc).__name__}: {exc})", None
    return "sha256:" + tokenizer_fingerprint(tok), type(tok).__name__


def _write_config(folder: Path, config: dict[str, Any]) -> None:
    """tokenizer_config.json as transformers writes it (sorted keys, 2-space indent, UTF-8, newline)."""
    text = json.dumps(config, indent=2, sort_keys=True, ensure_ascii=False) + "\n"
    (folder / CONFIG_FILE).write_text(text, encoding="utf-8")
