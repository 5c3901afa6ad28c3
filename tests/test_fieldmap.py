"""prep.fieldmap: a per-source field mapping (`--field messages=traj`, recipe `fields:`) instead of editing data."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from _agent import FILES, raw
from prep.convert import convert_files
from prep.errors import ConfigError
from prep.fieldmap import map_payload, map_record, parse_fields
from schemas.config import ConvertConfig

REPO = Path(__file__).resolve().parents[1]
MAPPING = ["messages=trajectory.steps", "tools=functions", "message.role=speaker", "message.content=text"]


def trajectory_dump(path: Path, n: int = 20) -> Path:
    """The first `n` real drone_training records as an agent-trajectory dump would keep them: the messages under
    `trajectory.steps` with `speaker`/`text` keys, the tools under `functions`, plus a run id."""
    with path.open("w", encoding="utf-8") as f:
        for k, record in enumerate(raw("drone")[:n]):
            steps = [{("speaker" if key == "role" else "text" if key == "content" else key): value
                      for key, value in m.items()} for m in record["messages"]]
            f.write(json.dumps({"run": k, "trajectory": {"steps": steps, "agent": "v1"},
                                "functions": record["tools"]}) + "\n")
    return path


def test_parse_fields():
    assert parse_fields(MAPPING) == {"messages": "trajectory.steps", "tools": "functions", "message.role": "speaker",
                                     "message.content": "text"}
    assert parse_fields({"messages": "traj"}) == {"messages": "traj"} and parse_fields(None) == {}
    for bad, match in (("messages", "TARGET=SOURCE"), ("=traj", "two non-empty"), ("message.=x", "name the message key")):
        with pytest.raises(ConfigError, match=match):
            parse_fields([bad])
    with pytest.raises(ConfigError, match="given twice"):
        parse_fields(["messages=a", "messages=b"])


def test_map_record_moves_nested_keys_and_message_keys():
    record = {"trajectory": {"steps": [{"speaker": "user", "text": "hi", "t": 1}], "agent": "v1"}, "functions": []}
    out = map_record(record, parse_fields(MAPPING))
    assert out == {"trajectory": {"agent": "v1"}, "messages": [{"t": 1, "role": "user", "content": "hi"}], "tools": []}
    assert record["trajectory"]["steps"][0]["speaker"] == "user"  # the input is not changed
    assert map_record({"a": 1}, {"messages": "traj"}) == {"a": 1}  # no source: left as it is
    assert map_payload(b"not json", {"messages": "traj"}) == b"not json"


def test_a_trajectory_dump_converts_like_the_original_records(tmp_path):
    dump = trajectory_dump(tmp_path / "dump.jsonl")
    original = tmp_path / "orig.jsonl"
    original.write_text("".join(json.dumps(r) + "\n" for r in raw("drone")[:20]))
    convert_files(ConvertConfig(inputs=[str(dump)], output=str(tmp_path / "a.jsonl"), fields=parse_fields(MAPPING)))
    convert_files(ConvertConfig(inputs=[str(original)], output=str(tmp_path / "b.jsonl")))
    mapped = [json.loads(line) for line in (tmp_path / "a.jsonl").read_text().splitlines()]
    plain = [json.loads(line) for line in (tmp_path / "b.jsonl").read_text().splitlines()]
    assert len(mapped) == 20
    for m, p in zip(mapped, plain):
        assert (m["id"], m["messages"], m["tools"]) == (p["id"], p["messages"], p["tools"])
        assert m["meta"] == {"run": m["meta"]["run"], "trajectory": {"agent": "v1"}}


def test_without_the_mapping_the_dump_is_an_error_naming_its_keys(tmp_path):
    from prep.errors import InputError

    dump = trajectory_dump(tmp_path / "dump.jsonl", n=2)
    with pytest.raises(InputError, match=r"cannot detect the format: saw \{functions, run, trajectory\}"):
        convert_files(ConvertConfig(inputs=[str(dump)], output=str(tmp_path / "a.jsonl")))


def test_cli_convert_and_a_recipe_source_take_the_mapping(tmp_path):
    dump = trajectory_dump(tmp_path / "dump.jsonl", n=6)
    flags = [a for spec in MAPPING for a in ("--field", spec)]
    run = subprocess.run([sys.executable, "-m", "prep", "convert", str(dump), "-o", str(tmp_path / "o.jsonl"), *flags],
                         cwd=REPO, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert len((tmp_path / "o.jsonl").read_text().splitlines()) == 6
    bad = subprocess.run([sys.executable, "-m", "prep", "convert", str(dump), "-o", str(tmp_path / "x.jsonl"),
                          "--field", "messages"], cwd=REPO, capture_output=True, text=True)
    assert bad.returncode == 1 and bad.stderr.strip().startswith("error: --field 'messages': expected TARGET=SOURCE")
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("template: chatml\nmax_len: 4096\nsources:\n  - path: dump.jsonl\n    fields:\n" +
                      "".join(f"      {spec.split('=')[0]}: {spec.split('=')[1]}\n" for spec in MAPPING))
    packed = subprocess.run([sys.executable, "-m", "prep", "pack", "--recipe", str(recipe), "-o", str(tmp_path / "s")],
                            cwd=REPO, capture_output=True, text=True)
    assert packed.returncode == 0, packed.stderr
    manifest = json.loads((tmp_path / "s" / "manifest.json").read_text())
    assert manifest["counts"]["conversations"] == 6 and manifest["counts"]["tool_calls"] == 6


def test_the_mapping_file_reads_the_real_drone_file_unchanged(tmp_path):
    """Mapping keys a file already uses to themselves changes nothing."""
    same = ["messages=messages", "tools=tools"]
    convert_files(ConvertConfig(inputs=[str(FILES["drone"])], output=str(tmp_path / "a.jsonl"), fields=parse_fields(same)))
    convert_files(ConvertConfig(inputs=[str(FILES["drone"])], output=str(tmp_path / "b.jsonl")))
    assert (tmp_path / "a.jsonl").read_bytes() == (tmp_path / "b.jsonl").read_bytes()
