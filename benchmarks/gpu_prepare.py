"""Prepare the inputs of `bash benchmarks/gpu_check.sh` on a machine with the dev install and ../shared/data.

    python benchmarks/gpu_prepare.py                 # -> .device/gpu-inputs.tar.gz (git-ignored; carry .device)
    python benchmarks/gpu_prepare.py --smoke --out DIR   # tiny inputs for `gpu_check.py --cpu-smoke` (the CPU test)

A GPU machine has torch, transformers and pyarrow but no pydantic, no datasets and no ../shared, so everything it
needs is made here and packed into one compressed archive that gpu_check.sh unpacks in a second:
- shards/packed and shards/padded: the real Alpaca data of ../shared/data (en, zh, identity) through `prep pack`
  and `prep pack --no-pack`, max-len 2048, with the Qwen2.5 tokenizer (151,665 tokens: the vocabulary of the
  0.5B model the benchmark trains); each folder carries its tokenizer;
- data/: what the GPU tests read through PREP_SHARED_DATA: PROVENANCE.md, alpaca_en_demo.json and the SmolLM2
  tokenizer (the tests' default).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tarfile
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from train import ALPACA, SHARED_DATA, build  # noqa: E402  (benchmarks/train.py: `prep pack` of the Alpaca data)

ARCHIVE = "gpu-inputs.tar.gz"
FULL = dict(max_len=2048, tokenizer="qwen2.5-0.5b-instruct")
SMOKE = dict(max_len=256, tokenizer="smollm2-135m")
TEST_DATA = ["PROVENANCE.md", "alpaca/alpaca_en_demo.json", "tokenizers/smollm2-135m"]
MAX_ARCHIVE_BYTES = 50 * 2**20  # what travels to the GPU machine (its limit is 64 MiB with the repo)


def stage(root: Path, setup: dict) -> dict:
    """Build shards/ and data/ under `root`; return what was built (rows and tokens per folder)."""
    packed, padded = build(root / "shards", setup["max_len"], setup["tokenizer"])
    for name in TEST_DATA:
        source, target = SHARED_DATA / name, root / "data" / name
        target.parent.mkdir(parents=True, exist_ok=True)
        if source.is_dir():
            shutil.copytree(source, target)
        else:
            shutil.copy2(source, target)
    built = {"max_len": setup["max_len"], "tokenizer": setup["tokenizer"], "inputs": [p.name for p in ALPACA]}
    for folder in (packed, padded):
        counts = json.loads((folder / "manifest.json").read_text())["counts"]
        built[folder.name] = {"rows": counts["rows"], "tokens": counts["tokens"], "examples": counts["examples"]}
    (root / "prepared.json").write_text(json.dumps(built, indent=2))
    return built


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO / ".device", help="folder of the archive (default .device)")
    parser.add_argument("--smoke", action="store_true", help="tiny shards (max-len 256, SmolLM2 tokenizer)")
    args = parser.parse_args()
    setup = SMOKE if args.smoke else FULL
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        built = stage(Path(tmp), setup)
        partial = args.out / (ARCHIVE + ".tmp")
        with tarfile.open(partial, "w:gz", compresslevel=6) as tar:
            for name in ("prepared.json", "shards", "data"):
                tar.add(Path(tmp) / name, arcname=name)
        size = partial.stat().st_size
        if size > MAX_ARCHIVE_BYTES:
            partial.unlink()
            sys.exit(f"error: {ARCHIVE} would be {size / 2**20:.1f} MiB, over {MAX_ARCHIVE_BYTES / 2**20:.0f} MiB")
        os.replace(partial, args.out / ARCHIVE)
    print(json.dumps(built))
    print(f"wrote {args.out / ARCHIVE} ({size / 2**20:.1f} MiB)")


if __name__ == "__main__":
    main()
