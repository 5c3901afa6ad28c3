"""What a byte-level BPE tokenizer decodes token ids to, by table lookup over whole arrays.

prep checks every trained reply by decoding its tokens (prep.encode `_verify`). `decode_batch` does that one
token at a time (a string per token, a map lookup per character) and costs about a tenth of encoding a long
chat. For a tokenizer whose decoder is `ByteLevel` (GPT-2, Llama 3, Qwen, SmolLM and most BPE models since),
decoding is a concatenation: each vocabulary token stands for fixed bytes (its characters through GPT-2's
byte-to-character map), each added token for its own text. `ByteTable` holds those bytes in one array and
gathers the bytes of many token ranges with numpy. It is used only where it reproduces the tokenizer's own
`decode` of every single token (checked when the table is built); otherwise `ByteTable.of` returns None and
prep keeps `decode_batch`.

>>> from prep.tokenizer import default_tokenizer
>>> tok = default_tokenizer()
>>> table = ByteTable.of(tok)
>>> ids = np.array(tok("Hi<|im_end|> é", add_special_tokens=False)["input_ids"], dtype=np.int64)
>>> buf, offsets = table.decode_ranges(ids, np.array([0, 2]), np.array([2, len(ids)]))
>>> [buf[a:b].decode() for a, b in zip(offsets[:-1], offsets[1:])]
['Hi', '<|im_end|> é']
"""

from __future__ import annotations

from typing import Any

import numpy as np

from prep.slicing import component_spec
from prep.spill import concat_ranges  # a pure array helper (the spill store uses it too)


def _byte_of_char() -> dict[str, int]:
    """GPT-2's byte-level alphabet: the character that stands for each byte (printable ones stand for themselves)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    chars = [*map(chr, printable), *(chr(256 + n) for n in range(len(others)))]
    return dict(zip(chars, [*printable, *others]))


# Text whose UTF-8 holds every byte valid UTF-8 can hold: ASCII, every 2-byte character's lead and continuation
# bytes, and a character for every 3- and 4-byte lead byte.
_ALL_BYTES = "".join(map(chr, [*range(0x80), *range(0x80, 0x800), 0x800, *range(0x1000, 0x10000, 0x1000),
                               0x10000, 0x40000, 0x80000, 0xC0000, 0x100000]))


def _library_agrees(byte_of: dict[str, int]) -> bool:
    """The tokenizers library's ByteLevel pre-tokenizer maps every byte of valid UTF-8 to the character `byte_of`
    says, and its ByteLevel decoder maps them back."""
    from tokenizers import decoders, pre_tokenizers

    char_of = {b: c for c, b in byte_of.items()}
    ours = "".join(char_of[b] for b in _ALL_BYTES.encode())
    pieces = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False).pre_tokenize_str(_ALL_BYTES)
    return "".join(p for p, _ in pieces) == ours and decoders.ByteLevel().decode([ours]) == _ALL_BYTES


class ByteTable:
    """The bytes each token id decodes to, as one flat uint8 array and offsets (see the module docstring).

    Args:
        data: the bytes of every id, concatenated in id order.
        offsets: id i's bytes are data[offsets[i]:offsets[i + 1]].
    """

    def __init__(self, data: np.ndarray, offsets: np.ndarray):
        self.data, self.offsets = data, offsets
        self.lengths = np.diff(offsets)

    @classmethod
    def of(cls, tokenizer: Any) -> ByteTable | None:
        """The table of a tokenizer whose decoder is ByteLevel, if it decodes as the table does.

        That holds when the library's byte-level map is GPT-2's (checked on every byte valid UTF-8 can hold),
        every vocabulary token is written in that alphabet, and every added token decodes to its own text.

        Args:
            tokenizer: a transformers fast tokenizer (or a `tokenizers.Tokenizer`).

        Returns:
            A ByteTable, or None (another decoder, or a token the table would decode differently).
        """
        backend = getattr(tokenizer, "backend_tokenizer", tokenizer)
        byte_of = _byte_of_char()
        if (component_spec(backend.decoder) or {}).get("type") != "ByteLevel" or not _library_agrees(byte_of):
            return None
        added = {i: t.content for i, t in backend.get_added_tokens_decoder().items()}
        ids = sorted(added)
        if backend.decode_batch([[i] for i in ids], skip_special_tokens=False) != [added[i] for i in ids]:
            return None
        tokens = {i: t for t, i in backend.get_vocab(with_added_tokens=False).items() if i not in added}
        if not set("".join(tokens.values())) <= byte_of.keys():
            return None
        to_byte = {ord(c): b for c, b in byte_of.items()}  # str.translate to code points 0-255, then latin-1
        size = max([*tokens, *added], default=-1) + 1
        pieces = [added[i].encode() if i in added else tokens.get(i, "").translate(to_byte).encode("latin-1")
                  for i in range(size)]
        offsets = np.zeros(size + 1, dtype=np.int64)
        np.cumsum(np.fromiter(map(len, pieces), dtype=np.int64, count=size), out=offsets[1:])
        return cls(np.frombuffer(b"".join(pieces), dtype=np.uint8), offsets)

    def decode_ranges(self, ids: np.ndarray, starts: np.ndarray, ends: np.ndarray) -> tuple[bytes, np.ndarray]:
        """The decoded bytes of ids[starts[k]:ends[k]] for every k, concatenated, and where each one starts.

        Returns:
            (buffer, offsets): range k decodes to buffer[offsets[k]:offsets[k + 1]].
        """
        sizes = (ends - starts).astype(np.int64)
        picked = ids[concat_ranges(starts, sizes)]
        byte_sizes = self.lengths[picked]
        buffer = self.data[concat_ranges(self.offsets[picked], byte_sizes)].tobytes()
        per_token = np.concatenate(([0], np.cumsum(byte_sizes)))
        token_offsets = np.concatenate(([0], np.cumsum(sizes)))
        return buffer, per_token[token_offsets]
