"""Mixture selection: which conversations of which source go to which split, and how many times.

A run's sources are the recipe's (prep.recipe) or one source holding every input. Each source is streamed in
batches bounded by count and text bytes; a weighted or split source is read once for content hashes (which
decide the validation contents and each conversation's copies, prep.recipe) and again per split.

>>> [s.paths for s in mixture_sources(PackConfig(inputs=["a.json", "b.jsonl"], output="o"))]
[['a.json', 'b.jsonl']]
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Iterator
from typing import Any

from prep.convert import iter_conversations
from prep.fieldmap import parse_fields
from prep.recipe import copies, load_recipe, repeat, validation_hashes, with_system
from prep.report import Counts, Report
from prep.write import parse_size
from schemas.conversation import Conversation, content_hash
from schemas.pack_config import PackConfig
from schemas.recipe import Source
from schemas.reject import Reject


def mixture_sources(config: PackConfig) -> list[Source]:
    """The sources of a run: the recipe's, or one source of weight 1.0 holding every input.

    A `format` other than auto on the command line wins over every source's own format.

    >>> [s.paths for s in mixture_sources(PackConfig(inputs=["a.json", "b.jsonl"], output="o"))]
    [['a.json', 'b.jsonl']]
    """
    if config.recipe is None:
        return [Source(path=list(config.inputs), format=config.format)]
    sources = load_recipe(config.recipe).sources
    if config.format != "auto":
        sources = [s.model_copy(update={"format": config.format}) for s in sources]
    return sources


def split_of(source: Source, config: PackConfig) -> tuple[float | None, int | None]:
    """The validation split of a source: its own, else the global one.

    >>> split_of(Source(path=["a.jsonl"], val_size=5), PackConfig(inputs=["a.jsonl"], output="o", val_fraction=0.1))
    (None, 5)
    """
    if source.val_fraction is not None or source.val_size is not None:
        return source.val_fraction, source.val_size
    return config.val_fraction, config.val_size


def holds_out(val_fraction: float | None, val_size: int | None) -> bool:
    """Whether a split policy asks for any validation data at all.

    >>> holds_out(0.0, None), holds_out(None, 3)
    (False, True)
    """
    return bool(val_fraction) or bool(val_size)


class SourceTally:
    """One source of a mixture: its batches by split, and its counts before and after each step."""

    def __init__(self, source: Source, val_fraction: float | None, val_size: int | None,
                 earlier: set[str] | None, template: str):
        self.source, self.val_fraction, self.val_size, self.earlier = source, val_fraction, val_size, earlier
        self.template = template
        self.hashes: set[str] = set()
        self.counts: Counter[str] = Counter()
        self.inputs = Counts()

    def batches(self, config: PackConfig, inputs: Report) -> Iterator[tuple[str, list[Conversation], list[Reject]]]:
        """(split, conversations, rejects) batches, streamed.

        A weighted or split source is read first for its content hashes (which decide the validation contents
        and the copies of each conversation), then once more per split to emit the conversations in input
        order; only the hashes are held in memory.
        """
        first_row = len(inputs.rows)
        stream = self._stream(config, inputs)
        if self.source.weight == 1.0 and not holds_out(self.val_fraction, self.val_size):
            for conversations, rejects in stream:
                kept = self._unseen(conversations)
                self.counts["train_before_weighting"] += len(kept)
                self.counts["train"] += len(kept)
                yield "train", kept, rejects
        else:
            digests: list[str] = []
            for conversations, rejects in stream:
                digests += [content_hash(c.messages, c.tools) for c in self._unseen(conversations)]
                if rejects:
                    yield "train", [], rejects
            yield from self._split_and_weight(digests, config)
        for row in inputs.rows[first_row:]:
            self.inputs.add(row.counts)

    def _stream(self, config: PackConfig, report: Report) -> Iterator[tuple[list[Conversation], list[Reject]]]:
        """The source's conversations and rejects in batches, counted in `report`."""
        fields = {**(config.fields or {}), **parse_fields(self.source.fields, "fields")} or None
        conversations = iter_conversations(self.source.paths, self.source.format, dedup=config.dedup, report=report,
                                           fields=fields)
        return batched(conversations, config.batch_size, parse_size(config.batch_bytes, "--batch-bytes"))

    def _unseen(self, conversations: list[Conversation], count: bool = True) -> list[Conversation]:
        """Apply the source's system prompt, then drop (and count) contents an earlier source already had."""
        if self.source.system is not None:
            conversations = [with_system(c, self.source.system) for c in conversations]
        if self.earlier is None:
            return conversations
        kept = []
        for c in conversations:
            digest = content_hash(c.messages, c.tools)
            if digest in self.earlier:
                self.counts["cross_source_duplicates"] += count
                continue
            if count:
                self.hashes.add(digest)
            kept.append(c)
        return kept

    def _split_and_weight(
        self, digests: list[str], config: PackConfig
    ) -> Iterator[tuple[str, list[Conversation], list[Reject]]]:
        """Hold out the validation contents, then weight the rest (split first, so repeats stay in train).

        `digests` are the content hashes of the source's kept conversations in order; the source is read
        again (its rejects and counts already reported) and each conversation is sent where they decide.
        """
        validation_set = validation_hashes(digests, self.val_fraction, self.val_size, config.seed)
        train_digests = [h for h in digests if h not in validation_set]
        n_copies = copies(train_digests, self.source.weight, config.seed)
        self.counts.update(validation=len(digests) - len(train_digests), train_before_weighting=len(train_digests),
                           train=sum(n_copies))
        del digests, train_digests
        for split in ("validation", "train"):  # one reading per split: the same order for any batch size
            if self.counts[split]:
                yield from self._reread(split, validation_set, n_copies, config)

    def _reread(self, split: str, validation_set: set[str], n_copies: list[int],
                config: PackConfig) -> Iterator[tuple[str, list[Conversation], list[Reject]]]:
        """Read the source again and emit the conversations (and copies) that go to `split`."""

        def chosen() -> Iterator[Conversation]:
            position = 0  # among the conversations that stay in train
            for conversations, _ in self._stream(config, Report("re-read")):  # its counts were taken the first time
                for c in self._unseen(conversations, count=False):
                    held_out = content_hash(c.messages, c.tools) in validation_set
                    if held_out and split == "validation":
                        yield c
                    elif not held_out:
                        if split == "train":
                            yield from repeat(c, n_copies[position])
                        position += 1

        for batch, _ in batched(chosen(), config.batch_size, parse_size(config.batch_bytes, "--batch-bytes")):
            yield split, batch, []

    def to_dict(self) -> dict[str, Any]:
        """The source and its counts, for the manifest."""
        s, c = self.source, self.counts
        return {
            "name": s.label, "paths": s.paths, "format": s.format, "weight": s.weight, "template": self.template,
            "system": s.system, "val_fraction": self.val_fraction, "val_size": self.val_size,
            "counts": {"read": self.inputs.read, "rejected": self.inputs.rejected_total,
                       "deduplicated": self.inputs.deduplicated, "accepted": self.inputs.accepted,
                       "cross_source_duplicates": c["cross_source_duplicates"],
                       "validation": c["validation"], "train_before_weighting": c["train_before_weighting"],
                       "train": c["train"]},
        }


def batched(items: Iterable[Conversation | Reject], size: int,
            max_bytes: int) -> Iterator[tuple[list[Conversation], list[Reject]]]:
    """Group a stream into (conversations, rejects) batches of up to `size` conversations and `max_bytes` of
    message text (UTF-8); a conversation longer than `max_bytes` is a batch of its own. Encoding memory
    follows the text of a batch, so this bounds it whatever the conversations' lengths."""
    conversations: list[Conversation] = []
    rejects: list[Reject] = []
    held = 0
    for item in items:
        if item.__class__ is Reject:
            rejects.append(item)  # type: ignore[arg-type]
            continue
        nbytes = text_bytes(item)  # type: ignore[arg-type]
        if conversations and held + nbytes > max_bytes:
            yield conversations, rejects
            conversations, rejects, held = [], [], 0
        conversations.append(item)  # type: ignore[arg-type]
        held += nbytes
        if len(conversations) >= size:
            yield conversations, rejects
            conversations, rejects, held = [], [], 0
    if conversations or rejects:
        yield conversations, rejects


def text_bytes(conversation: Conversation) -> int:
    """UTF-8 bytes of a conversation's message contents (an upper bound on their tokens for byte-level BPE).

    >>> from schemas.conversation import Message
    >>> text_bytes(Conversation(id="c", messages=[Message(role="user", content="héllo"),
    ...                                          Message(role="assistant", content="a")]))
    7
    """
    return sum(len(m.content) if m.content.isascii() else len(m.content.encode()) for m in conversation.messages)
