"""Training mixtures: load a recipe file, and the seeded, order-independent choices it asks for.

Every choice is made by ranking content hashes with a seeded hash, so it depends only on which
conversations a source holds, never on their order, the batch size or the number of workers:

- the validation split holds the `k` unique contents of a source with the smallest `rank("validation")`,
  `k = round_half_up(val_fraction * n_unique)` or `min(val_size, n_unique)`; every copy of a content goes
  where that content goes, so no content is in both splits;
- a weight `w` gives each training conversation `floor(w)` copies, plus one more for the
  `round_half_up(frac(w) * n)` conversations with the smallest `rank("weight")` (a seeded subset).
"""

from __future__ import annotations

import hashlib
import math
import os
import tomllib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from prep.errors import ConfigError, InputError, location_path
from prep.read import expand_inputs
from prep.remote import is_url
from schemas.conversation import Conversation, Message
from schemas.recipe import Recipe


def load_recipe(path: str | os.PathLike[str]) -> Recipe:
    """Read and validate a recipe (.yaml/.yml or .toml); source paths are taken relative to the recipe's folder.

    Raises:
        ConfigError: unreadable file, unknown key, bad value or missing source file, naming the file and the
            key path (e.g. `recipe.yaml: sources[1].weight: must be > 0 ...`).

    >>> load_recipe("examples/recipe.yaml").sources[0].weight  # doctest: +SKIP
    1.0
    """
    from pydantic import ValidationError

    data = _read_file(Path(path))
    try:
        recipe = Recipe.model_validate(data)
    except ValidationError as e:
        first = e.errors(include_url=False)[0]
        raise ConfigError(f"{path}: {key_path(first['loc'])}: {_recipe_error_text(first)}") from None
    return _resolved(recipe, Path(path))


def key_path(loc: Sequence[str | int]) -> str:
    """A pydantic error location as a key path.

    >>> key_path(("sources", 1, "weight"))
    'sources[1].weight'
    """
    return location_path(loc) or "recipe"


def _recipe_error_text(error: dict[str, Any]) -> str:
    """A pydantic error message without the 'Value error, ' prefix; unknown keys say so."""
    if error["type"] == "extra_forbidden":
        return "unknown key (check its spelling against the recipe format in the README)"
    return str(error["msg"]).removeprefix("Value error, ")


def _read_file(path: Path) -> Any:
    """Parse a YAML or TOML file into plain data."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError(f"{path}: cannot read the recipe: {e.strerror or e}") from None
    try:
        if path.suffix == ".toml":
            return tomllib.loads(text)
        import yaml

        return yaml.safe_load(text)
    except Exception as e:  # tomllib.TOMLDecodeError or yaml.YAMLError, both with a position
        raise ConfigError(f"{path}: not valid {'TOML' if path.suffix == '.toml' else 'YAML'}: {e}") from None


def _resolved(recipe: Recipe, path: Path) -> Recipe:
    """The recipe with every source path made relative to the recipe file's folder, checked to exist (URLs are
    kept as they are and checked when the run resolves them)."""
    base = path.parent
    sources = []
    for i, source in enumerate(recipe.sources):
        paths = [p if os.path.isabs(p) or is_url(p) else os.path.normpath(base / p) for p in source.paths]
        try:
            expand_inputs([p for p in paths if not is_url(p)])
        except InputError as e:
            raise ConfigError(f"{path}: sources[{i}].path: {e}") from None
        sources.append(source.model_copy(update={"path": paths if isinstance(source.path, list) else paths[0]}))
    return recipe.model_copy(update={"sources": sources})


def round_half_up(x: float) -> int:
    """Round to the nearest integer, halves up (Python's round() would send 2.5 to 2).

    >>> round_half_up(2.5), round_half_up(0.3 * 10)
    (3, 3)
    """
    return math.floor(x + 0.5)


def rank_key(seed: int, purpose: str, digest: str) -> bytes:
    """The seeded sort key of one content hash for one purpose ("validation" or "weight")."""
    return hashlib.blake2b(f"{seed}\0{purpose}\0{digest}".encode(), digest_size=16).digest()


def held_out_count(n_unique: int, val_fraction: float | None, val_size: int | None) -> int:
    """How many unique contents go to validation.

    >>> held_out_count(10, 0.25, None), held_out_count(10, None, 50), held_out_count(10, None, None)
    (3, 10, 0)
    """
    if val_size is not None:
        return min(val_size, n_unique)
    return round_half_up((val_fraction or 0.0) * n_unique)


def validation_hashes(hashes: Sequence[str], val_fraction: float | None, val_size: int | None,
                      seed: int) -> set[str]:
    """The content hashes held out for validation (see the module docstring for the rule).

    >>> sorted(validation_hashes(["a", "b", "c", "d"], 0.5, None, seed=0)) == sorted(
    ...     validation_hashes(["d", "c", "b", "a", "a"], 0.5, None, seed=0))
    True
    """
    unique = sorted(set(hashes))
    k = held_out_count(len(unique), val_fraction, val_size)
    return set(sorted(unique, key=lambda h: rank_key(seed, "validation", h))[:k])


def copies(hashes: Sequence[str], weight: float, seed: int) -> list[int]:
    """Copies of each conversation a weight asks for: floor(weight), plus one for a seeded subset.

    Ties (the same content twice in one source) are broken by position.

    >>> copies(["a", "b", "c", "d"], 2.5, seed=0)
    [3, 3, 2, 2]
    >>> sum(copies(["a", "b", "c", "d"], 0.5, seed=0))
    2
    """
    whole = math.floor(weight)
    extra = round_half_up((weight - whole) * len(hashes))
    ranked = sorted(range(len(hashes)), key=lambda i: (rank_key(seed, "weight", hashes[i]), i))
    counts = [whole] * len(hashes)
    for i in ranked[:extra]:
        counts[i] += 1
    return counts


def repeat(conversation: Conversation, n: int) -> list[Conversation]:
    """`n` copies of a conversation, the k-th (k >= 2) with id `id@k` (how a source weight above 1 repeats one).

    >>> c = Conversation(id="x", messages=[Message(role="user", content="a"), Message(role="assistant", content="b")])
    >>> [x.id for x in repeat(c, 2)]
    ['x', 'x@2']
    """
    return [conversation if k == 1 else conversation.model_copy(update={"id": f"{conversation.id}@{k}"})
            for k in range(1, n + 1)]


def with_system(conversation: Conversation, system: str | None) -> Conversation:
    """The conversation with its system message replaced by `system` (or one added); unchanged for None."""
    if system is None:
        return conversation
    messages = list(conversation.messages)
    if messages and messages[0].role == "system":
        messages = messages[1:]
    messages.insert(0, Message.model_construct(role="system", content=system, train=None))
    return conversation.model_copy(update={"messages": messages})
