"""Load a fast tokenizer (or build the embedded demo one), fingerprint it, and check template markers.

>>> tok = default_tokenizer()
>>> tok.convert_ids_to_tokens(tok("Hi<|im_end|>", add_special_tokens=False).input_ids)
['H', 'i', '<|im_end|>']
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from prep.errors import ConfigError
from prep.render import BUILTIN_TEMPLATES, Template, special_token_strings
from prep.tokenizer_io import save_tokenizer, tokenizer_fingerprint  # noqa: F401 (re-exported: one definition)

DEFAULT_TOKENIZER_NAME = "prep-default-byte-level"
DEFAULT_TOKENIZER_NOTICE = (
    "no --tokenizer given: using prep's embedded byte-level demo tokenizer "
    "(267 tokens, one per byte; for demos and tests, not for training a real model)"
)
_EOS = "<|endoftext|>"
_CHATML_JINJA = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] "
    "+ '<|im_end|>' + '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
MARKER_CONTEXTS = ("a{}a", "\n{}\n", " {} ")


def load_tokenizer(name_or_path: str | None, trust_remote_code: bool = False) -> Any:
    """Load `--tokenizer`: a local folder or a hub id (fast tokenizers only); None → `default_tokenizer()`.

    Args:
        name_or_path: folder with tokenizer files, hub id, or None for the embedded demo tokenizer.
        trust_remote_code: let a hub tokenizer run its own code (only with an explicit flag).

    Returns:
        A `PreTrainedTokenizerFast`.

    Raises:
        ConfigError: it cannot be loaded, or only a slow (Python) tokenizer exists.

    >>> load_tokenizer(None).name_or_path
    'prep-default-byte-level'
    """
    if name_or_path is None:
        return default_tokenizer()
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(name_or_path, use_fast=True, trust_remote_code=trust_remote_code)
    except Exception as exc:  # OSError, ValueError, EnvironmentError: all "cannot load"
        hint = "" if trust_remote_code else " (if it needs its own code, add --trust-remote-code)"
        raise ConfigError(f"--tokenizer {name_or_path!r}: cannot load: {exc}{hint}") from exc
    if not getattr(tok, "is_fast", False) or not hasattr(tok, "backend_tokenizer"):
        raise ConfigError(
            f"--tokenizer {name_or_path!r}: only a slow tokenizer ({type(tok).__name__}) is available; "
            "prep needs a fast tokenizer (tokenizer.json, or files the tokenizers library can convert)"
        )
    return tok


def default_tokenizer() -> Any:
    """The embedded demo tokenizer: byte-level BPE over the 256 bytes, no merges, built in code.

    Deterministic and download-free. Special tokens: `<|endoftext|>` (eos and pad), `<|im_start|>`,
    `<|im_end|>` and the role markers of the built-in templates (`###instruction###`, ...). The bare
    end marker `###` is NOT special (markdown headings would turn into it). No BOS. Its chat template
    is ChatML.

    Returns:
        A `PreTrainedTokenizerFast` with 267 tokens.

    >>> tok = default_tokenizer()
    >>> len(tok), tok.eos_token, tok.pad_token_id
    (267, '<|endoftext|>', 256)
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {char: byte for byte, char in _bytes_to_unicode().items()}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    backend.decoder = decoders.ByteLevel()
    specials = [_EOS, "<|im_start|>", "<|im_end|>"]
    for template in BUILTIN_TEMPLATES.values():
        specials += [m for m in template.role_markers() if m not in specials]
    backend.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in specials])
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token=_EOS,
        pad_token=_EOS,
        model_max_length=1 << 30,
        chat_template=_CHATML_JINJA,
        name_or_path=DEFAULT_TOKENIZER_NAME,
        clean_up_tokenization_spaces=False,
    )


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte → printable character map (the ByteLevel pre-tokenizer's alphabet)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars = list(printable)
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, map(chr, chars)))


def adds_bos(tokenizer: Any) -> bool:
    """True when the tokenizer puts a BOS in front by default (`add_special_tokens=True`).

    >>> adds_bos(default_tokenizer())
    False
    """
    bos = tokenizer.bos_token_id
    if bos is None:
        return False
    with_special = tokenizer("a", add_special_tokens=True).input_ids
    without = tokenizer("a", add_special_tokens=False).input_ids
    return len(with_special) > len(without) and with_special[0] == bos


@dataclass(frozen=True)
class MarkerCheck:
    """How one marker tokenizes with a tokenizer.

    Attributes:
        marker: the marker text.
        ids, tokens: its tokens when tokenized alone.
        special: registered as a special token (never merged with neighbouring text).
        changed_in: the contexts (see MARKER_CONTEXTS) where the tokens covering the marker differ
            from `ids`, or a token straddles the marker's edge.
    """

    marker: str
    ids: tuple[int, ...]
    tokens: tuple[str, ...]
    special: bool
    changed_in: tuple[str, ...]

    @property
    def single_token(self) -> bool:
        """The marker is one token."""
        return len(self.ids) == 1

    @property
    def stable(self) -> bool:
        """The marker tokenizes the same in every context tried."""
        return not self.changed_in


def check_markers(template: Template, tokenizer: Any) -> list[MarkerCheck]:
    """Report how each marker of `template` tokenizes, alone and touching text (e.g. "a"+marker+"a").

    Markers: the role markers, the end-of-turn markers and the EOS when the template appends it;
    for the `tokenizer` template, the special tokens and text pieces its chat template writes.

    Returns:
        One MarkerCheck per marker, in template order.

    >>> [(c.marker, c.single_token, c.stable) for c in check_markers(BUILTIN_TEMPLATES["chatml"],
    ...                                                               default_tokenizer())]
    [('<|im_start|>', True, True), ('<|im_end|>', True, True)]
    """
    specials = set(special_token_strings(tokenizer))
    return [_check_marker(m, tokenizer, m in specials) for m in _markers_to_check(template, tokenizer)]


def _markers_to_check(template: Template, tokenizer: Any) -> list[str]:
    """The distinct marker strings a template writes (see `check_markers`)."""
    if template.uses_chat_template:
        return _chat_template_markers(template, tokenizer)
    found = list(template.role_markers())
    for roles in (template.roles, template.single_turn):
        for turn in (roles.system, roles.user, roles.assistant) if roles else ():
            if turn.end.strip():
                found.append(turn.end.strip())
    if template.append_eos and tokenizer.eos_token:
        found.append(tokenizer.eos_token)
    return list(dict.fromkeys(found))


def _chat_template_markers(template: Template, tokenizer: Any) -> list[str]:
    """Special tokens and the text between them in a sample render of the chat template."""
    import re

    from schemas.conversation import Message

    from prep.render import RenderFailure, render_batch

    sample = [Message(role=r, content=f"{r} text") for r in ("system", "user", "assistant", "user", "assistant")]
    for messages in (sample, sample[1:]):
        out = render_batch([messages], template, tokenizer)[0]
        if not isinstance(out, RenderFailure):
            break
    else:
        return []
    text = out.text
    for span in reversed(out.spans):  # keep only the template's own text
        text = text[: span.start] + "\x00" + text[span.end :]
    specials = sorted(special_token_strings(tokenizer), key=len, reverse=True)
    pieces = re.split("(" + "|".join(map(re.escape, specials)) + ")", text) if specials else [text]
    return list(dict.fromkeys(p for piece in pieces for p in piece.split("\x00") if p.strip()))


def _check_marker(marker: str, tokenizer: Any, special: bool) -> MarkerCheck:
    """Tokenize `marker` alone and in each context; note the contexts where its tokens change."""
    backend = tokenizer.backend_tokenizer
    alone = backend.encode(marker, add_special_tokens=False)
    changed = []
    for context in MARKER_CONTEXTS:
        text = context.format(marker)
        start = context.index("{}")
        enc = backend.encode(text, add_special_tokens=False)
        covering = [(i, o) for i, o in zip(enc.ids, enc.offsets) if o[0] < start + len(marker) and o[1] > start]
        straddles = any(o[0] < start or o[1] > start + len(marker) for _, o in covering)
        if straddles or [i for i, _ in covering] != alone.ids:
            changed.append(repr(text))
    return MarkerCheck(marker, tuple(alone.ids), tuple(alone.tokens), special, tuple(changed))


def register_markers(tokenizer: Any, template: Template) -> list[str]:
    """Register the template's role markers as special tokens (`--add-special-tokens`).

    The bare end marker `###` is never registered (markdown headings use it). The tokenizer is
    changed in place; the model's embeddings must be resized when anything was added.

    Returns:
        The markers that were added (already-special ones are skipped), in template order.

    >>> from transformers import AutoTokenizer  # any fast tokenizer; the demo one has them already
    >>> register_markers(default_tokenizer(), BUILTIN_TEMPLATES["markers"])
    []
    """
    from tokenizers import AddedToken

    existing = set(special_token_strings(tokenizer))
    new = [m for m in dict.fromkeys(template.role_markers()) if m not in existing and m.strip("#")]
    if new:
        tokenizer.add_tokens([AddedToken(m, special=True, normalized=False) for m in new], special_tokens=True)
    return new
