"""Shared fixtures: the real data in ../shared/data, the examples, and fresh output folders."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("PREP_SHARED_DATA", REPO.parent / "shared" / "data"))  # env: GPU machines
EXAMPLES = REPO / "examples"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The real third-party data (read-only) at ../shared/data relative to the repo root; never skipped."""
    if not (SHARED_DATA / "PROVENANCE.md").is_file():
        pytest.fail(f"real test data not found at {SHARED_DATA}: the repo must sit beside shared/ "
                    "(see ../shared/data/PROVENANCE.md); these tests are not optional")
    return SHARED_DATA


@pytest.fixture(scope="session")
def examples() -> Path:
    """The example inputs shipped in examples/."""
    return EXAMPLES


@pytest.fixture
def tmp(tmp_path: Path) -> Path:
    """A fresh, empty output folder."""
    out = tmp_path / "out"
    out.mkdir()
    return out
