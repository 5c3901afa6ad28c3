"""Recipes: validation of the file, exact proportions, a disjoint and stable validation split, cross-source dedup,
and the recipe giving byte-identical shards to the equivalent command line.

Proportions (stated rule): a source of n training conversations and weight w yields
floor(w) * n + round_half_up(frac(w) * n) conversations, exactly; the validation split holds
round_half_up(val_fraction * n_unique) unique contents (or min(val_size, n_unique)).
"""

from __future__ import annotations

import filecmp
import json
import math
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from prep.errors import ConfigError
from prep.load import iter_rows, load_shards, split_names
from prep.pipeline import build_config, pack_shards
from prep.recipe import copies, held_out_count, load_recipe, repeat, round_half_up, validation_hashes
from schemas.conversation import Conversation, Message

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "examples"


def write_recipe(folder: Path, data: dict, name: str = "recipe.yaml") -> Path:
    path = folder / name
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    return path


def conv(i: int | str) -> Conversation:
    return Conversation(id=str(i), messages=[Message(role="user", content=f"q{i}"),
                                             Message(role="assistant", content=f"a{i}")])


def same_tree(a: Path, b: Path) -> bool:
    """Every file under a and b exists in both with the same bytes."""
    files_a = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    files_b = sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
    if files_a != files_b:
        return False
    return all(filecmp.cmp(a / f, b / f, shallow=False) for f in files_a)


def example_texts(folder: Path, tokenizer) -> list[str]:
    """The decoded text of every example in a shard folder."""
    texts = []
    for row in iter_rows(load_shards(folder)):
        start = 0
        for n in row["seq_lengths"].tolist():
            texts.append(tokenizer.decode(row["input_ids"][start:start + n].tolist()))
            start += n
    return texts


# --- the rules ------------------------------------------------------------------------------


@pytest.mark.parametrize("weight", [0.1, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 2.5, 3.3])
@pytest.mark.parametrize("n", [1, 7, 101])
def test_copies_follow_the_weight_exactly(weight, n):
    hashes = [f"h{i}" for i in range(n)]
    counts = copies(hashes, weight, seed=3)
    whole = math.floor(weight)
    assert sum(counts) == whole * n + round_half_up((weight - whole) * n)
    assert set(counts) <= {whole, whole + 1}
    assert abs(sum(counts) - weight * n) <= 0.5


def test_weight_subset_depends_on_content_not_order():
    hashes = [f"h{i}" for i in range(50)]
    shuffled = hashes[:]
    random.Random(1).shuffle(shuffled)
    pick = {h for h, c in zip(hashes, copies(hashes, 0.3, seed=0), strict=True) if c}
    assert pick == {h for h, c in zip(shuffled, copies(shuffled, 0.3, seed=0), strict=True) if c}
    assert pick != {h for h, c in zip(hashes, copies(hashes, 0.3, seed=1), strict=True) if c}


def test_repeats_get_distinct_ids():
    assert [c.id for c in repeat(conv(1), 3)] == ["1", "1@2", "1@3"]
    assert repeat(conv(2), 1) == [conv(2)] and repeat(conv(2), 0) == []


def test_validation_split_is_exact_and_order_free():
    hashes = [f"h{i}" for i in range(200)]
    held = validation_hashes(hashes, 0.1, None, seed=0)
    assert len(held) == 20 == held_out_count(200, 0.1, None)
    assert validation_hashes(list(reversed(hashes)) + hashes[:30], 0.1, None, seed=0) == held
    assert len(validation_hashes(hashes, None, 7, seed=0)) == 7
    assert validation_hashes(hashes, 0.1, None, seed=1) != held


# --- the recipe file ------------------------------------------------------------------------


def test_example_recipe_loads_with_paths_beside_it():
    recipe = load_recipe(EXAMPLES / "recipe.yaml")
    assert recipe.tokenizer is None and len(recipe.sources) >= 3
    assert all(os.path.exists(p) for s in recipe.sources for p in s.paths)
    assert {s.weight for s in recipe.sources} >= {0.6, 2.5}


def test_toml_recipe(tmp_path):
    path = tmp_path / "r.toml"
    path.write_text(f'max_len = 256\n[[sources]]\npath = "{EXAMPLES / "alpaca.json"}"\nweight = 0.5\n')
    recipe = load_recipe(path)
    assert recipe.max_len == 256 and recipe.sources[0].weight == 0.5


@pytest.mark.parametrize("change, key", [
    ({"sources": [{"path": "ALPACA", "wieght": 2}]}, "sources[0].wieght: unknown key"),
    ({"max_lenn": 10}, "max_lenn: unknown key"),
    ({"sources": [{"path": "ALPACA"}, {"path": "missing.jsonl"}]}, "sources[1].path"),
    ({"sources": [{"path": "ALPACA", "weight": 0}]}, "sources[0].weight: must be > 0"),
    ({"sources": [{"path": "ALPACA", "weight": -1.5}]}, "sources[0].weight: must be > 0"),
    ({"sources": [{"path": "ALPACA", "val_fraction": 0.1, "val_size": 3}]}, "sources[0]: give val_fraction or"),
    ({"sources": []}, "sources:"),
    ({"train_on": "everything"}, "train_on:"),
])
def test_bad_recipe_names_the_file_and_key(tmp_path, change, key):
    data = {"sources": [{"path": "ALPACA"}]} | change
    for source in data["sources"]:
        source["path"] = source["path"].replace("ALPACA", str(EXAMPLES / "alpaca.json"))
    path = write_recipe(tmp_path, data)
    with pytest.raises(ConfigError) as e:
        load_recipe(path)
    message = str(e.value)
    assert message.startswith(f"{path}: {key}"), message
    assert len(message.splitlines()) == 1


def test_unreadable_recipe(tmp_path):
    with pytest.raises(ConfigError, match="cannot read the recipe"):
        load_recipe(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("sources: [\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_recipe(bad)


# --- packing a mixture ----------------------------------------------------------------------


def test_flags_override_the_recipe(tmp_path):
    path = write_recipe(tmp_path, {"max_len": 512, "seed": 3, "val_size": 2, "output": str(tmp_path / "o"),
                                   "sources": [{"path": str(EXAMPLES / "alpaca.json")}]})
    config = build_config(recipe=str(path), max_len=256, val_fraction=0.5, output=None, tokenizer=None)
    assert (config.max_len, config.seed, config.val_fraction, config.val_size) == (256, 3, 0.5, None)
    assert config.output == str(tmp_path / "o")
    with pytest.raises(ConfigError, match="not both"):
        build_config(recipe=str(path), inputs=["x.jsonl"])


@pytest.fixture(scope="module")
def mixture(tmp_path_factory, shared_data):
    """Real Alpaca (en) twice-ish, identity and real ShareGPT, with weights and a 10% validation split."""
    folder = tmp_path_factory.mktemp("mixture")
    sources = [
        {"path": str(shared_data / "alpaca" / "alpaca_en_demo.json"), "weight": 0.3},
        {"path": str(shared_data / "alpaca" / "identity.json"), "weight": 2.5, "val_size": 5},
        {"path": str(shared_data / "alpaca" / "alpaca_en_demo.json"), "weight": 1.0, "name": "again"},
        {"path": str(EXAMPLES / "sharegpt.jsonl"), "weight": 2.0, "system": "Be brief."},
    ]
    recipe = write_recipe(folder, {"max_len": 1024, "val_fraction": 0.1, "seed": 7, "sources": sources})
    out = folder / "shards"
    report = pack_shards(build_config(recipe=str(recipe), output=str(out)))
    return recipe, out, report


def test_mixture_layout_and_counts(mixture):
    _, out, report = mixture
    assert split_names(out) == ["train", "validation"]
    assert json.loads((out / "dataset_dict.json").read_text()) == {"splits": ["train", "validation"]}
    top = json.loads((out / "manifest.json").read_text())
    alpaca, identity, again, chats = top["sources"]
    for s in top["sources"]:
        c = s["counts"]
        assert c["read"] == c["accepted"] + c["rejected"] + c["deduplicated"]
        assert c["accepted"] == c["cross_source_duplicates"] + c["validation"] + c["train_before_weighting"]
        n, w = c["train_before_weighting"], s["weight"]
        assert c["train"] == math.floor(w) * n + round_half_up((w - math.floor(w)) * n)
    assert again["counts"]["cross_source_duplicates"] == again["counts"]["accepted"] > 0
    assert again["counts"]["train"] == again["counts"]["validation"] == 0
    assert identity["counts"]["validation"] == 5
    available = alpaca["counts"]["accepted"]
    assert alpaca["counts"]["validation"] <= round_half_up(0.1 * available)  # unique contents, rounded half up
    for split in ("train", "validation"):
        manifest = load_shards(out, split=split).manifest
        assert manifest["counts"]["conversations"] == sum(s["counts"][split] for s in top["sources"])
        assert top["splits"][split]["counts"] == manifest["counts"]
    assert load_shards(out).path == out / "train"


def test_split_is_disjoint_by_content(mixture):
    from transformers import AutoTokenizer

    _, out, _ = mixture
    tokenizer = AutoTokenizer.from_pretrained(out / "train" / "tokenizer")
    train, validation = example_texts(out / "train", tokenizer), example_texts(out / "validation", tokenizer)
    assert validation and train
    assert not set(train) & set(validation)
    assert len(train) > len(set(train))  # repeats stay in train
    assert any("Be brief." in t for t in train)  # the per-source system prompt


def test_per_source_template_and_format_override(tmp_path):
    from transformers import AutoTokenizer

    sources = [{"path": str(EXAMPLES / "alpaca.json")},
               {"path": str(EXAMPLES / "openai.jsonl"), "template": "chatml"}]
    recipe = write_recipe(tmp_path, {"max_len": 512, "sources": sources})
    report = pack_shards(build_config(recipe=str(recipe), output=str(tmp_path / "mixed")))
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "mixed" / "tokenizer")
    texts = example_texts(tmp_path / "mixed", tokenizer)
    assert any("<|im_start|>" in t for t in texts) and any("###instruction###" in t for t in texts)
    # each source's template as used (the run's own for the first), not only the recipe's override
    assert [s["template"] for s in report.manifest["mixture"]["sources"]] == ["markers", "chatml"]
    forced = pack_shards(build_config(recipe=str(recipe), output=str(tmp_path / "forced"), format="alpaca"))
    assert [row.kind for row in forced.inputs.rows] == ["alpaca", "alpaca"]  # --format wins over every source


def test_mixture_is_stable_across_runs_and_batch_sizes(mixture, tmp_path):
    recipe, out, _ = mixture
    again = tmp_path / "again"
    pack_shards(build_config(recipe=str(recipe), output=str(again), batch_size=37))
    assert same_tree(out, again)


def test_datasets_opens_the_split_folder(mixture):
    import datasets

    _, out, _ = mixture
    ds = datasets.load_from_disk(str(out))
    assert sorted(ds) == ["train", "validation"]
    assert ds["validation"].num_rows == load_shards(out, split="validation").num_rows


def test_up_to_date_and_overwrite(mixture):
    recipe, out, _ = mixture
    assert pack_shards(build_config(recipe=str(recipe), output=str(out))).up_to_date
    report = pack_shards(build_config(recipe=str(recipe), output=str(out), overwrite=True))
    assert not report.up_to_date and split_names(out) == ["train", "validation"]


# --- the recipe is the command line --------------------------------------------------------


PLAIN = ["alpaca.json", "sharegpt.jsonl", "openai.jsonl"]


@pytest.mark.parametrize("split", [{}, {"val_fraction": 0.25}])
def test_recipe_equals_command_line(tmp_path, split):
    paths = [str(EXAMPLES / p) for p in PLAIN]
    recipe = write_recipe(tmp_path, {"max_len": 256, "seed": 5, "train_on": "all", "sources": [{"path": paths}],
                                     **split})
    pack_shards(build_config(recipe=str(recipe), output=str(tmp_path / "recipe")))
    pack_shards(build_config(inputs=paths, output=str(tmp_path / "cli"), max_len=256, seed=5, train_on="all",
                             **split))
    assert same_tree(tmp_path / "recipe", tmp_path / "cli")
    assert (tmp_path / "cli" / "train").is_dir() == bool(split)


def test_cli_recipe_subprocess(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    run = [sys.executable, "-m", "prep", "pack"]
    proc = subprocess.run(run + ["--recipe", str(EXAMPLES / "recipe.yaml"), "-o", str(tmp_path / "a"),
                                 "--max-len", "256"], capture_output=True, text=True, env=env, cwd=REPO, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert load_shards(tmp_path / "a").max_len == 256
    assert load_shards(tmp_path / "a", split="validation").num_rows > 0
    bad = write_recipe(tmp_path, {"sources": [{"path": str(EXAMPLES / "alpaca.json"), "weight": 0}]})
    proc = subprocess.run(run + ["--recipe", str(bad), "-o", str(tmp_path / "b")], capture_output=True, text=True,
                          env=env, cwd=REPO, timeout=300)
    assert proc.returncode == 1
    assert "sources[0].weight: must be > 0" in proc.stderr and str(bad) in proc.stderr.replace("\n", "")
