"""Facts stated once: the shard contract lives in prep/contract.py, the train flags in TrainConfig's fields, and
no two classes or helpers share a name for two meanings. Grep-based where that is the cheapest proof."""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import shutil
from pathlib import Path

import pytest

from _shards import REPO, build_shards
from prep.contract import FORMAT, REQUIRED_KEYS, check_manifest
from prep.errors import ShardError
from prep.load import load_shards
from prep.train_config import TrainConfig, argument_parser, flag_names
from prep.verify import verify_shards

SOURCES = sorted((REPO / "prep").rglob("*.py")) + sorted((REPO / "schemas").glob("*.py"))


def _modules_matching(pattern: str) -> list[str]:
    """The modules (relative paths) under prep/ and schemas/ with a line matching `pattern`."""
    regex = re.compile(pattern, re.MULTILINE)
    return sorted(str(p.relative_to(REPO)) for p in SOURCES if regex.search(p.read_text(encoding="utf-8")))


@pytest.mark.parametrize(
    "pattern",
    [
        r"^IGNORE_INDEX\s*=",  # was in eight modules
        r"^FORMAT\s*=\s*\"prep-shards\"",  # load, verify, write
        r"\"prep-shards-splits\"",  # pipeline, remote
        r"\"seq_lengths_unpadded\"",  # load, pack, verify
        r"\(\"input_ids\", \"labels\", \"position_ids\", \"seq_lengths\"\)",  # load, pack, verify
        r"round\(tokens / \(rows \* max_len\)",  # the packing efficiency: pack, stats
    ],
)
def test_each_contract_fact_is_written_in_prep_contract_alone(pattern):
    assert _modules_matching(pattern) in ([], ["prep/contract.py"]), pattern


@pytest.mark.parametrize("pattern", [r"\"completion\", \"last\", \"all\"", r"\"split\", \"truncate\", \"drop\"",
                                     r"\"auto\", \"off\", \"all\"", r"^MIN_MAX_LEN\s*="])
def test_option_vocabularies_and_the_max_len_bound_are_declared_in_the_pack_config_alone(pattern):
    """encode.py takes them from schemas/pack_config.py (typing.get_args), not from a tuple of its own."""
    assert _modules_matching(pattern) == ["schemas/pack_config.py"], pattern


def test_encoder_and_pack_config_bound_max_len_alike():
    from prep.encode import Encoder
    from prep.errors import ConfigError
    from prep.render import BUILTIN_TEMPLATES
    from prep.tokenizer import default_tokenizer
    from schemas.pack_config import MIN_MAX_LEN, PackConfig

    assert PackConfig(inputs=["a"], output="o", max_len=MIN_MAX_LEN).max_len == MIN_MAX_LEN
    Encoder(default_tokenizer(), BUILTIN_TEMPLATES["markers"], max_len=MIN_MAX_LEN)
    with pytest.raises(ValueError, match="greater than or equal to 8"):
        PackConfig(inputs=["a"], output="o", max_len=MIN_MAX_LEN - 1)
    with pytest.raises(ConfigError, match="expected an integer >= 8"):
        Encoder(default_tokenizer(), BUILTIN_TEMPLATES["markers"], max_len=MIN_MAX_LEN - 1)


def test_cli_help_lists_each_vocabulary_as_the_config_declares_it():
    """The CLI cannot import schemas (pydantic) when it starts, so its help texts spell the values out: checked."""
    from typing import get_args

    from typer.main import get_command

    from prep.cli import app
    from schemas.pack_config import ExpandTurns, Overflow, TrainOn

    vocabularies = {"train_on": TrainOn, "overflow": Overflow, "expand_turns": ExpandTurns}
    seen = 0
    for command in get_command(app).commands.values():  # type: ignore[attr-defined]
        for param in command.params:
            if param.name in vocabularies:
                assert param.help.startswith(" | ".join(get_args(vocabularies[param.name]))), (command.name, param.name)
                seen += 1
    assert seen >= 5  # pack, stats and inspect take --train-on; pack and stats --overflow; pack --expand-turns


def test_contract_facts_are_where_the_modules_read_them():
    """The tuples above are found in prep/contract.py (so the grep cannot pass by finding nothing)."""
    text = (REPO / "prep" / "contract.py").read_text()
    assert "IGNORE_INDEX = -100" in text and f'FORMAT = "{FORMAT}"' in text and '"seq_lengths_unpadded"' in text


def test_no_two_classes_and_no_private_message_helpers_share_a_name():
    classes = re.compile(r"^class (\w+)", re.MULTILINE)
    names = [n for p in SOURCES for n in classes.findall(p.read_text(encoding="utf-8"))]
    assert sorted({n for n in names if names.count(n) > 1}) == []
    assert _modules_matching(r"^def _message\(") == []


def test_contract_module_imports_only_the_standard_library():
    text = (REPO / "prep" / "contract.py").read_text()
    imported = re.findall(r"^(?:from|import) ([\w.]+)", text, re.MULTILINE)
    assert set(imported) <= {"__future__", "collections.abc", "typing"}, imported


# ---------- one manifest check for load, verify and write ----------


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    return build_shards(tmp_path_factory.mktemp("one") / "shards", n_examples=12, max_len=256, num_shards=1)


@pytest.mark.parametrize("key", REQUIRED_KEYS)
def test_load_and_verify_refuse_a_manifest_without_a_required_key_with_the_same_words(shards, tmp_path, key):
    broken = tmp_path / "s"
    shutil.copytree(shards, broken)
    manifest = json.loads((broken / "manifest.json").read_text())
    del manifest[key]
    (broken / "manifest.json").write_text(json.dumps(manifest))
    expected = check_manifest(manifest)
    assert expected == f"missing keys [{key!r}]"
    with pytest.raises(ShardError) as err:
        load_shards(broken)
    assert str(err.value) == f"{broken / 'manifest.json'}: {expected}"
    assert [(p.check, p.message) for p in verify_shards(broken).problems] == [("manifest", expected)]


def test_the_check_passes_on_a_freshly_built_manifest(shards):
    assert check_manifest(json.loads((shards / "manifest.json").read_text())) is None


# ---------- the train flags, declared once ----------


def test_python_m_prep_train_and_prep_train_take_the_same_flags_from_the_fields():
    from typer.core import TyperArgument, TyperOption
    from typer.main import get_command

    from prep.cli import app

    command = get_command(app).commands["train"]  # type: ignore[attr-defined]
    typer_flags = {p.name: tuple(o for o in p.opts if o.startswith("-")) for p in command.params
                   if isinstance(p, TyperOption)}
    parser = argument_parser()
    argparse_flags = {a.dest: tuple(o for o in a.option_strings if not o.startswith("--no-"))
                      for a in parser._actions if a.option_strings and a.dest != "help"}
    fields = dataclasses.fields(TrainConfig)
    assert typer_flags == argparse_flags == {f.name: flag_names(f) for f in fields if f.name != "shards"}
    assert [p.name for p in command.params if isinstance(p, TyperArgument)] == ["shards"]
    defaults = {a.dest: a.default for a in parser._actions if a.dest != argparse.SUPPRESS and a.dest != "help"}
    assert defaults == {f.name: f.default for f in fields} | {"shards": None}
    assert {p.name: p.default for p in command.params} == {f.name: f.default for f in fields} | {"shards": None}


def test_help_texts_state_no_default_the_field_does_not_give():
    for f in dataclasses.fields(TrainConfig):
        assert "default" not in f.metadata["help"].lower(), f.name
    text = argument_parser().format_help()
    assert "(default: 0.95)" in text and "(default: out)" in text
