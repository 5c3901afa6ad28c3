"""The `prep convert` and `prep schema` commands, run as subprocesses, and the CLI/config contract."""

from __future__ import annotations

import inspect
import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def prep(*args: str) -> subprocess.CompletedProcess[str]:
    """Run `python -m prep ARGS` from the repo root."""
    return subprocess.run([sys.executable, "-m", "prep", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=120, env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin", "COLUMNS": "200"})


def test_paths_and_markers_with_square_brackets_print_as_they_are(tmp: Path) -> None:
    """rich reads `[...]` as markup: file names like `[2024]` and markers like Mistral's `[/INST]` must not be."""
    folder = tmp / "[2024] chats [bold]"
    folder.mkdir()
    (folder / "a[1].jsonl").write_bytes(Path(REPO / "examples" / "sharegpt.jsonl").read_bytes())
    out = folder / "out[x].jsonl"
    result = prep("convert", str(folder / "a[1].jsonl"), "-o", str(out))
    assert result.returncode == 0, result.stderr
    assert "a[1].jsonl" in result.stdout and f"conversations to {out}," in result.stdout
    tokenizer = REPO.parent / "shared" / "data" / "tokenizers" / "mistral-7b-instruct-v0.3"
    packed = prep("pack", str(out), "-o", str(folder / "shards"), "--tokenizer", str(tokenizer), "--template", "tokenizer")
    assert packed.returncode == 0, packed.stderr
    assert "[/INST]" in packed.stdout and "[INST]" in packed.stdout


def test_convert_writes_outputs_and_prints_the_summary(tmp: Path) -> None:
    out = tmp / "chat.jsonl"
    result = prep("convert", "examples/sharegpt.jsonl", "examples/alpaca.json", "-o", str(out))
    assert result.returncode == 0, result.stderr
    assert "sharegpt (auto)" in result.stdout and "alpaca (auto)" in result.stdout
    lines = [" ".join(line.replace("│", " ").split()) for line in result.stdout.splitlines()]
    assert "sharegpt.jsonl rejected unknown_role 1" in lines and "sharegpt.jsonl changed merged_turns 1" in lines
    assert f"wrote 18 conversations to {out}, 6 rejects to {tmp / 'chat.rejects.jsonl'}" in result.stdout
    assert len(out.read_text().splitlines()) == 18

    again = prep("convert", "examples/sharegpt.jsonl", "-o", str(out))
    assert again.returncode == 1
    assert again.stderr.strip() == f"error: {out}: already exists; pass --overwrite to replace it"

    strict = prep("convert", "examples/sharegpt.jsonl", "-o", str(out), "--overwrite", "--strict", "--dedup")
    assert strict.returncode == 1
    assert "4 record(s) rejected and --strict is set" in strict.stderr


def test_unusable_input_exits_1_with_one_line(tmp: Path) -> None:
    result = prep("convert", "examples/nope.jsonl", "-o", str(tmp / "o.jsonl"))
    assert result.returncode == 1
    assert result.stderr.strip() == "error: examples/nope.jsonl: no such file or folder"
    assert not (tmp / "o.jsonl").exists()


def test_schema_prints_the_unified_json_schema() -> None:
    result = prep("schema")
    assert result.returncode == 0, result.stderr
    schema = json.loads(result.stdout)
    assert schema["title"] == "Conversation"
    assert set(schema["properties"]) == {"id", "source", "messages", "meta", "tools"}
    assert schema["$defs"]["Message"]["properties"]["role"]["enum"] == ["system", "user", "assistant", "tool"]
    assert set(schema["$defs"]["ToolCall"]["properties"]) == {"id", "name", "arguments"}


def test_cli_flags_match_config_fields_and_defaults() -> None:
    from prep.cli import convert
    from schemas.config import ConvertConfig

    params = inspect.signature(convert).parameters
    assert set(params) == set(ConvertConfig.model_fields)
    for name, field in ConvertConfig.model_fields.items():
        if field.is_required():
            continue
        assert params[name].default == field.default, name


@pytest.mark.parametrize("module", ["prep.cli"])
def test_cli_module_imports_no_pydantic(module: str) -> None:
    code = f"import sys, {module}; sys.exit('pydantic' in sys.modules or 'datasets' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], cwd=REPO).returncode == 0
