"""`prep export` read back by each engine's own reader, every row compared with the source shards.

Megatron: megatron-core's IndexedDataset (tokens, loss mask, documents = rows). Megatron-Bridge: its packed
Parquet read with pyarrow row groups as Bridge reads them, then shifted as its collate_fn shifts. MDS:
`streaming.StreamingDataset` in a side venv (tests/_streaming_env.py). Parquet: `datasets.load_dataset`.
Real data (ShareGPT zh, Alpaca) and real tokenizers; Qwen2 ids above 65,535 must survive.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

import _streaming_env
from prep.errors import OutputExistsError, ShardError
from prep.export import export_shards
from prep.load import iter_rows, load_shards
from prep.pipeline import pack_shards
from schemas.export_config import ExportConfig
from schemas.pack_config import PackConfig

FORMATS = ("megatron", "mds", "parquet")


def pack(out: Path, data: Path, tokenizer: str, **options) -> Path:
    """Pack real data with prep itself; return the shard folder."""
    pack_shards(PackConfig(inputs=[str(data)], output=str(out), tokenizer=tokenizer, workers=1, **options))
    return out


@pytest.fixture(scope="module")
def qwen_padded(tmp_path_factory, shared_data) -> Path:
    """Real multi-turn Chinese chats, Qwen2 tokenizer (ids > 65,535), packed, padded to multiples of 8, 3+ shards."""
    return pack(tmp_path_factory.mktemp("src") / "qwen", shared_data / "sharegpt" / "sharegpt_zh_1K_format.jsonl",
                str(shared_data / "tokenizers" / "qwen2-1.5b-instruct-boundless"), template="tokenizer",
                max_len=1024, pad_to_multiple_of=8, shard_size="700KB")


@pytest.fixture(scope="module")
def gpt2_unpacked(tmp_path_factory, shared_data) -> Path:
    """Real Alpaca, GPT-2 tokenizer (uint16 ids in Megatron's files), one example per row."""
    return pack(tmp_path_factory.mktemp("src") / "gpt2", shared_data / "alpaca" / "alpaca_en_demo.json",
                str(shared_data / "tokenizers" / "gpt2-dialogpt-small"), max_len=512, pack=False)


@pytest.fixture(scope="module", params=["qwen_padded", "gpt2_unpacked"])
def shards(request) -> Path:
    return request.getfixturevalue(request.param)


@pytest.fixture(scope="module")
def exports(shards, tmp_path_factory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("exports")
    return {f: Path(export_shards(ExportConfig(shards=str(shards), to=f, output=str(out / f))).output) for f in FORMATS}


def examples(shards: Path):
    """(ids, labels, real length) of every example as laid out in the shards, in row order; and the row sizes."""
    out, rows = [], []
    for row in iter_rows(load_shards(shards)):
        seq = row["seq_lengths"]
        real = row.get("seq_lengths_unpadded", seq)
        starts = np.cumsum(seq) - seq
        out += [(row["input_ids"][s : s + n], row["labels"][s : s + n], int(r)) for s, n, r in zip(starts, seq, real)]
        rows.append(len(seq))
    return out, rows


def test_qwen_ids_need_more_than_16_bits(qwen_padded):
    manifest = json.loads((qwen_padded / "manifest.json").read_text())
    assert manifest["tokenizer"]["vocab_size"] > 65535
    assert max(int(r["input_ids"].max()) for r in iter_rows(load_shards(qwen_padded))) > 65535
    assert manifest["pad_to_multiple_of"] == 8 and manifest["counts"]["padding_tokens"] > 0 and len(manifest["shards"]) >= 3


def test_megatron_core_indexed_dataset_reads_every_example(shards, exports):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    out = exports["megatron"]
    tokens, mask = IndexedDataset(str(out / "tokens")), IndexedDataset(str(out / "loss_mask"))
    source, rows = examples(shards)
    vocab = json.loads((shards / "manifest.json").read_text())["tokenizer"]["vocab_size"]
    assert tokens.index.dtype == (np.uint16 if vocab < 65500 else np.int32) and mask.index.dtype == np.uint8
    assert len(tokens) == len(mask) == len(source)
    for k, (ids, labels, _) in enumerate(source):
        assert np.array_equal(tokens[k], ids) and np.array_equal(mask[k], (labels != -100).astype(np.uint8))
    # a document per shard row: its sequences are the row's examples
    assert tokens.document_indices.tolist() == np.concatenate(([0], np.cumsum(rows))).tolist()
    assert np.array_equal(tokens.document_indices, mask.document_indices)
    assert int(tokens.sequence_lengths.sum()) == sum(len(e[0]) for e in source)


def bridge_collate(row: dict, pad_mult: int, eos: int):
    """Megatron-Bridge GPTSFTPackedDataset.__getitem__ + collate_fn's per-example shift, on one Parquet row:
    per example (tokens, labels, loss mask, logical length)."""
    bounds = list(row["seq_start_id"]) + [len(row["input_ids"])]
    out = []
    for s, e in zip(bounds[:-1], bounds[1:]):
        ids = np.asarray(row["input_ids"][s:e])
        tokens, labels, mask = ids[:-1], ids[1:], np.asarray(row["loss_mask"][s : e - 1])
        non_eos = np.flatnonzero(tokens != eos)
        logical = non_eos[-1] + 1 if pad_mult > 1 and len(non_eos) else len(tokens)
        out.append((tokens, labels, mask, int(logical)))
    return out


def test_megatron_bridge_packed_parquet(shards, exports):
    manifest = json.loads((exports["megatron"] / "manifest.json").read_text())
    bridge = manifest["megatron"]["bridge"]
    files = sorted((exports["megatron"] / bridge["path"]).glob("*.parquet"))
    assert [f.name.endswith(".idx.parquet") for f in files] == [True] * len(files)
    source, _ = examples(shards)
    pad_mult, eos = bridge["pad_seq_to_mult"], manifest["tokenizer"]["eos_token_id"]
    got = []
    for f in files:
        pf = pq.ParquetFile(f)  # Bridge reads whole row groups of these three columns
        assert {"input_ids", "seq_start_id", "loss_mask"} <= set(pf.schema_arrow.names)
        assert str(pf.schema_arrow.field("loss_mask").type) == "list<element: int8>"
        for g in range(pf.num_row_groups):
            for row in pf.read_row_group(g, columns=["input_ids", "seq_start_id", "loss_mask"]).to_pylist():
                got += bridge_collate(row, pad_mult, eos)
    assert len(got) == len(source)
    for (tokens, labels, mask, logical), (ids, lab, real) in zip(got, source):
        # what Bridge trains: target ids[t] from context ids[:t] wherever prep's label at t is set
        assert np.array_equal(tokens[: real - 1], ids[: real - 1]) and np.array_equal(labels[: real - 1], ids[1:real])
        assert np.array_equal(mask[: real - 1], (lab[1:real] != -100).astype(np.int8))
        assert not mask[real - 1 :].any()
        if pad_mult > 1:
            assert len(tokens) % pad_mult == 0 and len(tokens) - (real - 1) < pad_mult
            assert not (tokens[real:] != eos).any()  # Bridge's padding is EOS, outside its logical length
            assert logical <= real


MDS_DUMP = r"""
import json, sys
import numpy as np
from streaming import StreamingDataset
from streaming.base.util import clean_stale_shared_memory
clean_stale_shared_memory()
kwargs = json.loads(sys.argv[1])
ds = StreamingDataset(shuffle=False, batch_size=1, **kwargs)
arrays, turns = {}, []
for i in range(len(ds)):
    sample = ds[i]
    for k, v in sample.items():
        if k == "turns":
            turns.append(v)
        else:
            arrays.setdefault(k, []).append(np.asarray(v))
np.savez(sys.argv[2], **{f"{k}|{i}": a for k, v in arrays.items() for i, a in enumerate(v)})
json.dump(turns, open(sys.argv[2] + ".turns.json", "w"))
"""


def read_mds(tmp_path: Path, **kwargs) -> tuple[dict[str, list[np.ndarray]], list]:
    """Every sample of an MDS export as StreamingDataset returns it (run in the streaming venv)."""
    dump = tmp_path / "dump.npz"
    subprocess.run([str(_streaming_env.python()), "-c", MDS_DUMP, json.dumps(kwargs), str(dump)], check=True,
                   timeout=600)
    columns: dict[str, list[np.ndarray]] = {}
    with np.load(dump) as z:
        for key in sorted(z.files, key=lambda k: (k.split("|")[0], int(k.split("|")[1]))):
            columns.setdefault(key.split("|")[0], []).append(z[key])
    return columns, json.loads(Path(f"{dump}.turns.json").read_text())


def all_columns(shards: Path, split: str = "train") -> list[dict[str, list[int]]]:
    """Every row of the shards with every column (attention_mask too), as Python lists."""
    return load_shards(shards, split).table.to_pylist()


def test_streaming_dataset_reads_every_row(shards, exports, tmp_path):
    columns, turns = read_mds(tmp_path, local=str(exports["mds"]))
    rows = all_columns(shards)
    manifest = json.loads((shards / "manifest.json").read_text())
    assert sorted(columns) == sorted(manifest["columns"])
    for name in manifest["columns"]:
        assert len(columns[name]) == len(rows)
        assert all(a.dtype == np.int32 and a.tolist() == r[name] for a, r in zip(columns[name], rows))
    if manifest["packed"]:
        assert turns == []
        return
    # --no-pack: llm-foundry's `turns`, stitched as its collator does with target_prompts=none,
    # target_responses=all, give the example's tokens and labels up to its last trained token
    assert len(turns) == len(rows)
    for example_turns, row in zip(turns, rows):
        ids = [t for turn in example_turns for t in turn["input_ids"] + turn["labels"]]
        labels = [x for turn in example_turns for x in [-100] * len(turn["input_ids"]) + turn["labels"]]
        last = int(np.flatnonzero(np.array(row["labels"]) != -100)[-1]) + 1
        assert ids == row["input_ids"][:last] and labels == row["labels"][:last]


def test_streaming_dataset_streams_from_a_remote(qwen_padded, tmp_path):
    """remote=export, local=empty cache: StreamingDataset downloads the shards itself (a local path as remote)."""
    out = Path(export_shards(ExportConfig(shards=str(qwen_padded), to="mds", output=str(tmp_path / "remote"),
                                          mds_shard_size="300KB")).output)
    assert len(list(out.glob("shard.*.mds"))) >= 3
    columns, _ = read_mds(tmp_path, remote=str(out), local=str(tmp_path / "cache"))
    rows = list(iter_rows(load_shards(qwen_padded)))
    assert all(np.array_equal(a, r["input_ids"]) for a, r in zip(columns["input_ids"], rows))
    assert len(columns["input_ids"]) == len(rows) and (tmp_path / "cache" / "shard.00001.mds").is_file()


def test_load_dataset_parquet_restores_the_features(shards, exports):
    import datasets

    files = sorted(str(p) for p in exports["parquet"].glob("*.parquet"))
    parquet = datasets.load_dataset("parquet", data_files=files, split="train",
                                    cache_dir=str(exports["parquet"].parent / "hf-cache"))
    saved = datasets.load_from_disk(str(shards))
    assert parquet.features == saved.features
    rows = all_columns(shards)
    assert len(parquet) == len(rows) and saved.column_names == parquet.column_names
    assert parquet.to_list() == rows


def tree_digest(path: Path) -> dict[str, str]:
    return {p.relative_to(path).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(path.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("fmt", FORMATS)
def test_exports_are_byte_identical_and_name_their_source(qwen_padded, tmp_path, fmt):
    a = export_shards(ExportConfig(shards=str(qwen_padded), to=fmt, output=str(tmp_path / "a")))
    b = export_shards(ExportConfig(shards=str(qwen_padded), to=fmt, output=str(tmp_path / "b")))
    assert tree_digest(tmp_path / "a") == tree_digest(tmp_path / "b")
    source = json.loads((qwen_padded / "manifest.json").read_text())
    m = a.manifest
    assert m["format"] == "prep-export" and m["to"] == fmt and m["source"]["fingerprint"] == source["fingerprint"]
    assert [s["sha256"] for s in m["source"]["shards"]] == [s["sha256"] for s in source["shards"]]
    assert m["tokenizer"]["fingerprint"] == source["tokenizer"]["fingerprint"]
    assert (tmp_path / "a" / "tokenizer" / "tokenizer_config.json").is_file()
    assert {f["file"]: f["sha256"] for f in m["files"]} == {
        k: v for k, v in tree_digest(tmp_path / "a").items() if k != "manifest.json" and not k.startswith("tokenizer/")}
    assert m == b.manifest


def test_a_changed_source_shard_is_refused(qwen_padded, tmp_path):
    import shutil

    copy = tmp_path / "shards"
    shutil.copytree(qwen_padded, copy)
    shard = copy / json.loads((copy / "manifest.json").read_text())["shards"][-1]["file"]
    data = bytearray(shard.read_bytes())
    data[-100] ^= 1  # a flipped bit inside token values: the Arrow stream still reads
    shard.write_bytes(bytes(data))
    with pytest.raises(ShardError, match="sha256"):
        export_shards(ExportConfig(shards=str(copy), to="parquet", output=str(tmp_path / "out")))
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.tmp-*"))


def test_existing_output_needs_overwrite(gpt2_unpacked, tmp_path):
    out = str(tmp_path / "out")
    export_shards(ExportConfig(shards=str(gpt2_unpacked), to="parquet", output=out))
    with pytest.raises(OutputExistsError):
        export_shards(ExportConfig(shards=str(gpt2_unpacked), to="mds", output=out))
    export_shards(ExportConfig(shards=str(gpt2_unpacked), to="mds", output=out, overwrite=True))
    assert (Path(out) / "index.json").is_file() and not list(Path(out).glob("*.parquet"))


def test_a_killed_export_leaves_nothing(tmp_path):
    """SIGKILL in the middle of an export: no output folder exists, only a temporary one beside it."""
    from _packed import build_synthetic

    big = tmp_path / "big"
    build_synthetic(big, n_tokens=20_000_000)
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-m", "prep", "export", str(big), "--to", "megatron", "-o", str(out)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        staged = [p for t in tmp_path.glob(".out.tmp-*") for p in t.rglob("*.bin")]
        if staged and any(p.stat().st_size for p in staged):
            break
        time.sleep(0.005)
    if proc.poll() is not None:
        pytest.fail("the export finished before it could be killed; the source is too small for this test")
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not out.exists()
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    assert not IndexedDataset.exists(str(out / "tokens"))
    assert all(not (t / "manifest.json").exists() for t in tmp_path.glob(".out.tmp-*"))


def test_split_folders_export_every_split(tmp_path, shared_data):
    shards = pack(tmp_path / "split", shared_data / "alpaca" / "alpaca_en_demo.json", None, max_len=512,
                  val_fraction=0.1)
    report = export_shards(ExportConfig(shards=str(shards), to="mds", output=str(tmp_path / "mds")))
    assert sorted(report.splits) == ["train", "validation"] and report.manifest["format"] == "prep-export-splits"
    for split in ("train", "validation"):
        assert (tmp_path / "mds" / split / "index.json").is_file()
        assert report.splits[split]["counts"]["rows"] == load_shards(shards, split).num_rows
    columns, _ = read_mds(tmp_path, local=str(tmp_path / "mds"), split="validation")
    rows = list(iter_rows(load_shards(shards, "validation")))
    assert all(np.array_equal(a, r["labels"]) for a, r in zip(columns["labels"], rows)) and len(rows) == len(
        columns["labels"])


def cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "prep", *args], cwd=cwd, capture_output=True, text=True, timeout=300,
                          env=os.environ | {"COLUMNS": "200"})


def test_cli_export_and_its_errors(gpt2_unpacked, tmp_path):
    ok = cli("export", str(gpt2_unpacked), "--to", "megatron", "-o", "m", cwd=tmp_path)
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.startswith("megatron: ") and (tmp_path / "m" / "manifest.json").is_file()
    bad = cli("export", str(gpt2_unpacked), "--to", "tfrecord", "-o", "x", cwd=tmp_path)
    assert bad.returncode == 1 and bad.stderr.startswith("error: --to:") and "Traceback" not in bad.stderr
    again = cli("export", str(gpt2_unpacked), "--to", "megatron", "-o", "m", cwd=tmp_path)
    assert again.returncode == 1 and "--overwrite" in again.stderr and "Traceback" not in again.stderr
    missing = cli("export", str(tmp_path / "nope"), "--to", "mds", "-o", "y", cwd=tmp_path)
    assert missing.returncode == 1 and "manifest.json" in missing.stderr and not (tmp_path / "y").exists()
    inside = cli("export", str(gpt2_unpacked), "--to", "mds", "-o", str(gpt2_unpacked / "mds"), cwd=tmp_path)
    assert inside.returncode == 1 and "inside the shard folder" in inside.stderr


def test_streaming_recipe_trains_from_a_remote(tmp_path, shared_data):
    """examples/trainers/streaming_mds.py, run as a user runs it (streaming's env), streaming the export."""
    records = json.loads((shared_data / "alpaca" / "alpaca_en_demo.json").read_text(encoding="utf-8"))[:200]
    (tmp_path / "alpaca.json").write_text(json.dumps(records))
    shards = pack(tmp_path / "shards", tmp_path / "alpaca.json", None, max_len=256, overflow="truncate")
    export_shards(ExportConfig(shards=str(shards), to="mds", output=str(tmp_path / "mds")))
    script = Path(__file__).resolve().parents[1] / "examples" / "trainers" / "streaming_mds.py"
    run = subprocess.run([str(_streaming_env.python()), str(script), str(tmp_path / "mds" / "manifest.json"),
                          "--remote", str(tmp_path / "mds"), "--local", str(tmp_path / "cache"), "--max-steps", "10",
                          "--batch-size", "2"], capture_output=True, text=True, timeout=600,
                         env=os.environ | {"OMP_NUM_THREADS": "1"})
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(run.stdout.strip().splitlines()[-1])
    losses = result["losses"]
    assert len(losses) == 10 and all(np.isfinite(losses)) and sum(losses[-3:]) / 3 < losses[0] - 0.3
    assert result["rows"] == load_shards(shards).num_rows and max(result["examples_per_row"]) >= 3


def readme_snippets() -> dict[str, str]:
    """The README's `<!-- snippet: NAME -->` python blocks."""
    import re

    text = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    return dict(re.findall(r"<!-- snippet: (\w+) -->\n```python\n(.*?)```", text, re.S))


def test_readme_snippets(qwen_padded, tmp_path, monkeypatch):
    """Every loading snippet of the README's export section, run as written in a folder with shards/ and exports."""
    snippets = readme_snippets()
    assert sorted(snippets) == ["cu_seqlens", "mds", "megatron", "parquet"]
    (tmp_path / "shards").symlink_to(qwen_padded)
    for fmt in FORMATS:
        export_shards(ExportConfig(shards=str(qwen_padded), to=fmt, output=str(tmp_path / fmt)))
    monkeypatch.chdir(tmp_path)
    source, rows = examples(qwen_padded)
    first_row = next(iter_rows(load_shards(qwen_padded)))

    ns: dict = {}
    exec(snippets["megatron"], ns)
    assert np.array_equal(ns["ids"], source[0][0]) and np.array_equal(ns["trained"], source[0][1] != -100)
    assert ns["rows"].tolist() == np.concatenate(([0], np.cumsum(rows))).tolist()

    ns = {}
    exec(snippets["parquet"], ns)
    assert len(ns["rows"]) == len(rows) and ns["rows"][0]["input_ids"] == first_row["input_ids"].tolist()

    ns = {}
    exec(snippets["cu_seqlens"], ns)
    real, padded = first_row["seq_lengths_unpadded"], first_row["seq_lengths"]
    assert ns["cu_seqlens"].tolist() == [0, *np.cumsum(real).tolist()]
    assert ns["cu_seqlens_padded"].tolist() == [0, *np.cumsum(padded).tolist()]

    code = snippets["mds"] + "\nimport json\nprint(json.dumps({k: v.tolist() for k, v in row.items()}))\n"
    run = subprocess.run([str(_streaming_env.python()), "-c", code], cwd=tmp_path, capture_output=True, text=True,
                         timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    row = json.loads(run.stdout.strip().splitlines()[-1])
    assert row == {k: v.tolist() for k, v in first_row.items()}


@pytest.fixture(scope="module")
def synthetic_pair(tmp_path_factory) -> list[Path]:
    """Valid packed shards of 3M and 30M tokens (prep's writer, random examples)."""
    from _packed import build_synthetic

    root = tmp_path_factory.mktemp("synthetic")
    for tokens in (3_000_000, 30_000_000):
        build_synthetic(root / str(tokens), n_tokens=tokens)
    return [root / "3000000", root / "30000000"]


@pytest.mark.parametrize("fmt", FORMATS)
def test_export_memory_is_flat(synthetic_pair, tmp_path, fmt):
    """Peak RSS of `prep export` subprocesses on 3M and 30M tokens: within 1.3x (the data is 10x)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("scale", Path(__file__).resolve().parents[1] / "benchmarks" / "scale.py")
    scale = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(scale)
    peaks = [scale.run_measured(["export", str(shards), "--to", fmt, "-o", str(tmp_path / shards.name),
                                 "--mds-shard-size", "8MiB"]).peak_mib for shards in synthetic_pair]
    assert peaks[1] <= 1.3 * peaks[0], peaks
