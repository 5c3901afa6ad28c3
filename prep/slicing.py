"""A split piece's ids cut out of the whole conversation's ids, where that is provably what tokenizing it gives.

`--overflow split` (prep.overflow) renders every piece of an over-long conversation as a text of its own. Its
context turns are turns the whole conversation already tokenized, so tokenizing each piece again costs the
conversation's tokens several times over. This module finds, per piece, whether its text P is made of stretches
of the whole text T that meet where the tokenizer cannot see across, and then assembles its ids from T's.

Why that is exact. A fast (Rust `tokenizers`) tokenizer, called with `add_special_tokens=False`, first cuts its
input at every added token (Aho-Corasick, leftmost-longest, on the raw text); each stretch between two added
tokens is then normalized, pre-tokenized and run through the model on its own: its ids depend on its text alone,
plus, for a Metaspace pre-tokenizer with `prepend_scheme: first`, on whether it starts at offset 0. Suppose

1. P = T[:h] + T[a:b] + Z: the whole text's head, one run of the whole text, and a tail of the piece's own;
2. the same *joint* token t starts at h and at a in T (or a == h: the piece starts like the conversation);
   at b a joint token of T ends or starts (or b is T's end); Z is empty or starts with a joint token, the one
   that starts at b when one starts there;
3. a joint token is an added token matched exactly as written (no lstrip, rstrip or single_word; not matched
   on normalized text where the tokenizer normalizes), and no added token contains it as a proper substring.

By 3, no added-token match can reach across a cut: it would contain the joint token (ruled out), or start
inside it (the joint token starts further left and wins), or end inside it (then it ends at the same place in
T, where the joint token was matched instead). So P's added tokens are T[:h]'s, T[a:b]'s and Z's; the
stretches between them are T's stretches, at the same offsets (the head) or at non-zero offsets in both (the
run, which starts with a joint token), so each gives the same ids, and

    ids(P) = ids(T)[:tok(h)] + ids(T)[tok(a):tok(b)] + ids(Z)

where tok(x) is T's token that starts at x. Conditions 1 and 2 are checked per piece on the texts (string
equality) and on T's token offsets; condition 3 and the pipeline (known stretch-local normalizers,
pre-tokenizers and models only; no BPE dropout, no truncation or padding) once per tokenizer, by `joints_of`.
Anything else is tokenized again. Templates need no analysis: the piece is rendered as always, and only its
text decides. Where the template puts added tokens at turn boundaries (ChatML, Llama 3, Mistral, Gemma,
Phi-3, Qwen, SmolLM...) pieces slice; `markers` (plain-text markers) re-tokenizes unless `--add-special-tokens`.

>>> from prep.tokenizer import default_tokenizer
>>> joints = joints_of(default_tokenizer())
>>> "<|im_start|>" in joints.tokens, joints.reason
(True, '')
"""

from __future__ import annotations

import bisect
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from prep.render import Rendered

# Components whose output for a stretch of text depends on that stretch alone (tokenizers 0.15-0.23 JSON names).
_LOCAL_NORMALIZERS = {"NFC", "NFD", "NFKC", "NFKD", "Lowercase", "Strip", "StripAccents", "Replace", "Prepend",
                      "Precompiled", "BertNormalizer", "Nmt", "ByteLevel", "Sequence"}
_LOCAL_PRE_TOKENIZERS = {"ByteLevel", "Split", "Whitespace", "WhitespaceSplit", "Punctuation", "Digits", "Metaspace",
                         "BertPreTokenizer", "CharDelimiterSplit", "UnicodeScripts", "Sequence", "FixedLength"}
_MODELS = {"BPE", "Unigram", "WordPiece", "WordLevel"}
_LITERAL_LIMIT = 4096  # how far back (and forward) the text between two turns is compared


@dataclass(frozen=True)
class Joints:
    """The added tokens at which a tokenizer's ids can be cut and joined (condition 3 of the module docstring).

    Attributes:
        tokens: joint token text → id (empty: slicing is off for this tokenizer).
        by_id: id → joint token text.
        reason: why slicing is off ('' when it is on).
    """

    tokens: dict[str, int] = field(default_factory=dict)
    by_id: dict[int, str] = field(default_factory=dict)
    reason: str = ""


def joints_of(tokenizer: Any) -> Joints:
    """Which added tokens of a fast tokenizer are safe joints; none (with the reason) if its pipeline is not
    known to tokenize each stretch between added tokens on its own.

    Args:
        tokenizer: a transformers fast tokenizer (or a `tokenizers.Tokenizer`).

    Returns:
        Joints.

    >>> from prep.tokenizer import default_tokenizer
    >>> sorted(joints_of(default_tokenizer()).tokens)[:2]
    ['###assistant###', '###call###']
    """
    backend = getattr(tokenizer, "backend_tokenizer", tokenizer)
    try:
        specs = {kind: component_spec(getattr(backend, kind)) for kind in ("normalizer", "pre_tokenizer")}
        added = list(backend.get_added_tokens_decoder().items())
    except (AttributeError, TypeError, ValueError) as exc:  # not a tokenizers backend: nothing is proven or sliced
        return Joints(reason=f"the tokenizer cannot be inspected ({exc})")
    reason = _pipeline_problem(backend, specs)
    if reason:
        return Joints(reason=reason)
    normalizes = backend.normalizer is not None
    exact = {t.content: i for i, t in added
             if t.content and not (t.lstrip or t.rstrip or t.single_word or (t.normalized and normalizes))}
    contents = [t.content for _, t in added if t.content]
    tokens = {t: i for t, i in exact.items() if not any(t != other and t in other for other in contents)}
    return Joints(tokens, {i: t for t, i in tokens.items()}, "" if tokens else "no added token can serve as a joint")


def component_spec(component: Any) -> dict | None:
    """The JSON spec of one tokenizer component (normalizer, pre-tokenizer, decoder), or None.

    >>> from prep.tokenizer import default_tokenizer
    >>> component_spec(default_tokenizer().backend_tokenizer.decoder)["type"]
    'ByteLevel'
    """
    return None if component is None else json.loads(component.__getstate__())


def _pipeline_problem(backend: Any, specs: dict[str, dict | None]) -> str:
    """Why this tokenizer pipeline is not provably stretch-local ('' when it is)."""
    if backend.truncation or backend.padding:
        return "the tokenizer truncates or pads"
    model = type(backend.model).__name__
    if model not in _MODELS:
        return f"unknown model type {model!r}"
    if getattr(backend.model, "dropout", None):
        return "BPE dropout makes tokenization random"
    for kind, known in (("normalizer", _LOCAL_NORMALIZERS), ("pre_tokenizer", _LOCAL_PRE_TOKENIZERS)):
        unknown = [t for t in _component_types(specs[kind]) if t not in known]
        if unknown:
            return f"unknown {kind} {unknown[0]!r}"
    return ""


def _component_types(component: dict | None) -> list[str]:
    """Every `type` in a (possibly nested Sequence) normalizer or pre-tokenizer spec."""
    if not component:
        return []
    types = [component.get("type", "?")]
    for child in (component.get("normalizers") or []) + (component.get("pretokenizers") or []):
        types += _component_types(child)
    return types


class Whole:
    """The whole conversation a piece is cut from: its text, encoding and ids (read once), and the joints.

    Args:
        rendered: the whole conversation's rendering.
        enc: its `tokenizers.Encoding`.
        joints: the tokenizer's joints (`joints_of`).
    """

    def __init__(self, rendered: Rendered, enc: Any, joints: Joints):
        self.text, self.enc, self.joints = rendered.text, enc, joints
        self.spans = {s.message: s for s in rendered.spans}
        self._ids: list[int] | None = None

    @property
    def ids(self) -> list[int]:
        """The whole conversation's ids (converted from the encoding once)."""
        if self._ids is None:
            self._ids = self.enc.ids
        return self._ids

    def joint_starting(self, x: int) -> str | None:
        """The joint token the tokenizer matched starting at character x of the whole text, or None."""
        if x >= len(self.text):
            return None
        k = self.enc.char_to_token(x)
        token = None if k is None else self.joints.by_id.get(self.ids[k])
        if token is None or self.enc.token_to_chars(k) != (x, x + len(token)):
            return None
        return token

    def joint_ending(self, x: int) -> str | None:
        """The joint token the tokenizer matched ending at character x of the whole text, or None."""
        if x <= 0:
            return None
        k = self.enc.char_to_token(x - 1)
        token = None if k is None else self.joints.by_id.get(self.ids[k])
        if token is None or self.enc.token_to_chars(k) != (x - len(token), x):
            return None
        return token

    def token_at(self, x: int) -> int:
        """The index of the token that starts at character x, a joint boundary (the token count at the end)."""
        if x >= len(self.text):
            return len(self.enc)
        if x == 0:
            return 0
        return self.enc.char_to_token(x) if self.joint_starting(x) is not None else self.enc.char_to_token(x - 1) + 1


@dataclass(frozen=True)
class Cut:
    """How a piece text P is made from the whole text T: P = T[:head] + T[start:stop] + P[tail:].

    The head is T's tokens [0, head_tokens), the run T's tokens [start_token, stop_token); a non-empty tail
    (tokenized on its own) starts with the joint token `tail_joint`.
    """

    head: int
    start: int
    stop: int
    tail: int
    head_tokens: int
    start_token: int
    stop_token: int
    tail_joint: str | None


def find_cut(whole: Whole, piece: Rendered, first: tuple[int, int], last: tuple[int, int]) -> Cut | None:
    """How the piece's text is cut out of the whole text, if conditions 1 and 2 of the module docstring hold.

    Args:
        whole: the whole conversation.
        piece: the piece's rendering.
        first: (index in the piece, index in the conversation) of the piece's first message after the system prompt.
        last: the same for the piece's last message.

    Returns:
        The Cut, or None when the piece must be tokenized on its own.

    >>> from schemas import Message
    >>> from prep.render import BUILTIN_TEMPLATES, render
    >>> from prep.tokenizer import default_tokenizer
    >>> tok = default_tokenizer()
    >>> msgs = [Message(role=r, content=c) for r, c in [("system", "S"), ("user", "q1"), ("assistant", "a1"),
    ...                                                   ("user", "q2"), ("assistant", "a2")]]
    >>> whole = render(msgs, BUILTIN_TEMPLATES["chatml"])
    >>> enc = tok.backend_tokenizer.encode(whole.text, add_special_tokens=False)
    >>> piece = render([msgs[0], *msgs[3:]], BUILTIN_TEMPLATES["chatml"])   # the system prompt and the 2nd pair
    >>> cut = find_cut(Whole(whole, enc, joints_of(tok)), piece, (1, 3), (2, 4))
    >>> whole.text[: cut.head] + whole.text[cut.start : cut.stop] == piece.text
    True
    """
    p_first, p_last = _span(piece, first[0]), _span(piece, last[0])
    t_first, t_last = whole.spans.get(first[1]), whole.spans.get(last[1])
    if p_first is None or p_last is None or t_first is None or t_last is None:
        return None
    joint = _head_joint(whole, piece.text, p_first.start, t_first.start)
    if joint is None:
        return None
    head, start = joint
    if p_last.stop - head != t_last.stop - start or piece.text[head : p_last.stop] != whole.text[start : t_last.stop]:
        return None
    ending = _run_end(whole, piece.text, p_last.stop, t_last.stop)
    if ending is None:
        return None
    tail, stop, tail_joint = ending
    return Cut(head, start, stop, tail, whole.token_at(head), whole.token_at(start), whole.token_at(stop), tail_joint)


def _span(rendered: Rendered, message: int) -> Any:
    """The span of message `message` in a rendering, or None if the template did not render it."""
    return next((s for s in rendered.spans if s.message == message), None)


def _head_joint(whole: Whole, text: str, p: int, t: int) -> tuple[int, int] | None:
    """(head, start): where the piece's head ends and where its run starts in the whole text.

    The piece's first turn content sits at p in the piece and at t in the whole text. A piece that starts
    as the conversation does needs no cut: (0, 0). Otherwise the texts before p and t are compared
    backwards, and the cut goes where the same joint token starts in both, after a head equal in both.
    """
    if p == t and text[:p] == whole.text[:t]:
        return 0, 0
    j, limit = 0, min(p, t, _LITERAL_LIMIT)
    while j < limit and text[p - 1 - j] == whole.text[t - 1 - j]:
        j += 1
        token = whole.joint_starting(t - j)
        if token is not None and whole.joint_starting(p - j) == token and text[: p - j] == whole.text[: p - j]:
            return p - j, t - j
    return None


def _run_end(whole: Whole, text: str, p: int, t: int) -> tuple[int, int, str | None] | None:
    """(tail start in the piece, run end in the whole text, the joint the tail starts with).

    After the piece's last message (at p in the piece, t in the whole text) the texts go on alike for a
    while (the end of the turn); the run ends at the furthest place there where the whole text has a joint
    token ending or starting. What is left of the piece is its tail: nothing, or text starting with a joint
    token (the one starting there in the whole text, unless one ends there).
    """
    n, limit = 0, min(len(text) - p, len(whole.text) - t, _LITERAL_LIMIT)
    while n < limit and text[p + n] == whole.text[t + n]:
        n += 1
    for k in range(n, -1, -1):
        e, b = p + k, t + k
        starting, ending = whole.joint_starting(b), whole.joint_ending(b)
        if e == len(text):
            if b == len(whole.text) or starting is not None or ending is not None:
                return e, b, None
            continue
        tail_joint = next((j for j in whole.joints.tokens if text.startswith(j, e)), None)
        if tail_joint is not None and (ending is not None or starting == tail_joint):
            return e, b, tail_joint
    return None


def tail_fits(tail: Any, joint: str, joints: Joints) -> bool:
    """A tail's own tokenization starts with its joint token, matched over exactly that token's characters."""
    return len(tail) > 0 and tail.ids[0] == joints.tokens[joint] and tail.token_to_chars(0) == (0, len(joint))


class SlicedEncoding:
    """A piece's encoding assembled from the whole conversation's (and its tail's): the `tokenizers.Encoding`
    lookups prep uses (`ids`, `len`, `char_to_token`, `token_to_chars`, `offsets`), mapped through the cut.

    Args:
        whole: the whole conversation.
        cut: how the piece is made from it.
        tail: the tail's own encoding (None when the piece has no tail).
    """

    def __init__(self, whole: Whole, cut: Cut, tail: Any = None):
        # Parts: (first char in the piece, first char in the source, first token in the piece,
        #         first and end token in the source, the source encoding)
        parts = [(0, 0, 0, 0, cut.head_tokens, whole.enc)] if cut.head > 0 else []
        parts.append((cut.head, cut.start, cut.head_tokens, cut.start_token, cut.stop_token, whole.enc))
        self.ids = whole.ids[: cut.head_tokens] + whole.ids[cut.start_token : cut.stop_token]
        if tail is not None:
            parts.append((cut.tail, 0, len(self.ids), 0, len(tail), tail))
            self.ids += tail.ids
        self._parts = parts
        self._char_starts = [part[0] for part in parts]
        self._token_starts = [part[2] for part in parts]

    def __len__(self) -> int:
        return len(self.ids)

    def char_to_token(self, pos: int) -> int | None:
        """The token holding character `pos` of the piece, or None."""
        p0, s0, k0, t0, _, enc = self._parts[bisect.bisect_right(self._char_starts, pos) - 1]
        k = enc.char_to_token(pos - p0 + s0)
        return None if k is None else k - t0 + k0

    def token_to_chars(self, k: int) -> tuple[int, int]:
        """The characters (start, end) of token k of the piece."""
        p0, s0, k0, t0, _, enc = self._parts[bisect.bisect_right(self._token_starts, k) - 1]
        a, b = enc.token_to_chars(k - k0 + t0)
        return a - s0 + p0, b - s0 + p0

    @property
    def offsets(self) -> list[tuple[int, int]]:
        """(start, end) characters of every token of the piece."""
        out: list[tuple[int, int]] = []
        for p0, s0, _, t0, t1, enc in self._parts:
            out += [(a - s0 + p0, b - s0 + p0) for a, b in enc.offsets[t0:t1]]
        return out
