"""prep: instruction-tuning data → exact, packed, training-ready Arrow shards, and a trainer.

The public API is loaded lazily (PEP 562), so `import prep.load` or `import prep.train`
pulls in neither pydantic nor datasets (the GPU machines may have neither).
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# Function names differ from submodule names on purpose: `import prep.convert` binds the
# attribute `prep.convert` to the module, which would shadow a function of that name.
_LAZY = {
    "convert_files": ("prep.convert", "convert_files"),
    "pack_shards": ("prep.pipeline", "pack_shards"),
    "load_shards": ("prep.load", "load_shards"),
    "train_model": ("prep.train", "train_model"),
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        module, attr = _LAZY[name]
        return getattr(importlib.import_module(module), attr)
    raise AttributeError(f"module 'prep' has no attribute {name!r}")
