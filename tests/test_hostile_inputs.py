"""A corpus of bad and hostile inputs: each is accepted with exact content, rejected with a stated reason,
or stopped by one clear error; and read == accepted + rejected always holds.

The files are generated in tmp_path from the CASES table (no binary fixtures are committed).
"""

from __future__ import annotations

import gzip
import json
import os
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from prep.convert import convert_files, iter_conversations
from prep.errors import InputError
from prep.report import Report
from schemas.config import ConvertConfig
from schemas.reject import Reject

REPO = Path(__file__).resolve().parents[1]
OK = b'{"instruction": "Hi", "output": "Yo"}'
OK_TURNS = [("user", "Hi"), ("assistant", "Yo")]
HUGE = "a" * 8_000_000  # one 8 MB answer


class Expect(NamedTuple):
    """The outcome of a file: accepted conversations (as role/content lists) and rejected reasons, in read order.

    `order` lists "A"/"R" per record read, so interleaving is pinned too.
    """

    accepted: list[list[tuple[str, str]]]
    rejected: list[str]
    order: str


class Fails(NamedTuple):
    """The whole file is refused with one InputError whose message contains `message`."""

    message: str


def _lines(*lines: bytes, end: bytes = b"\n") -> bytes:
    """Join JSON lines with `end` after each."""
    return b"".join(line + end for line in lines)


def _parquet(columns: dict[str, list]) -> Callable[[Path], None]:
    """A builder writing a Parquet file with these columns."""
    return lambda path: pq.write_table(pa.table(columns), path)


def _deep(depth: int) -> bytes:
    """A JSON array nested `depth` levels deep."""
    return b"[" * depth + b"]" * depth


def _msgs(*pairs: tuple[str, str]) -> bytes:
    """An OpenAI `messages` JSON line."""
    return json.dumps({"messages": [{"role": r, "content": c} for r, c in pairs]}).encode()


def _gzip_cut(data: bytes, cut: int) -> bytes:
    """gzip of `data` with its last `cut` bytes removed (a download that ended early)."""
    return gzip.compress(data)[:-cut]


# (id, file name, bytes or builder, expected)
CASES: list[tuple[str, str, bytes | Callable[[Path], None], Expect | Fails]] = [
    # --- malformed and truncated JSON -----------------------------------------------------------
    ("truncated_last_line", "a.jsonl", OK + b"\n" + b'{"instruction": "Hi", "outp',
     Expect([OK_TURNS], ["invalid_json"], "AR")),
    ("trailing_comma", "a.jsonl", _lines(OK, b'{"instruction": "a", "output": "b",}'),
     Expect([OK_TURNS], ["invalid_json"], "AR")),
    ("single_quotes", "a.jsonl", _lines(OK, b"{'instruction': 'a', 'output': 'b'}"),
     Expect([OK_TURNS], ["invalid_json"], "AR")),
    ("two_objects_one_line", "a.jsonl", _lines(OK, OK + b" " + OK),
     Expect([OK_TURNS], ["invalid_json"], "AR")),
    ("nan_literal", "a.jsonl", _lines(OK, b'{"instruction": NaN, "output": "b"}'),
     Expect([OK_TURNS], ["wrong_type"], "AR")),
    ("json_array_truncated", "a.json", b"[" + OK + b", " + OK[:20], Fails("not valid JSON")),
    ("json_scalar", "a.json", b'"just a string"', Fails("JSON holds a str, expected an array of records")),
    ("json_object_two_lists", "a.json", b'{"a": [], "b": []}', Fails("JSON object holds several lists (a, b)")),
    ("json_object_no_list", "a.json", b'{"a": 1}', Fails("JSON object holds no list of records (keys: a)")),
    ("array_line_in_jsonl", "a.jsonl", _lines(b"[1, 2]", OK), Expect([OK_TURNS], ["not_an_object"], "RA")),
    ("number_line_in_jsonl", "a.jsonl", _lines(OK, b"42"), Expect([OK_TURNS], ["not_an_object"], "AR")),
    ("only_garbage", "a.jsonl", _lines(b"hello", b"world"), Fails("cannot detect the format: saw no JSON objects")),
    # --- wrong types and nested garbage ---------------------------------------------------------
    ("instruction_is_number", "a.jsonl", _lines(b'{"instruction": 5, "output": "b"}', OK),
     Expect([OK_TURNS], ["wrong_type"], "RA")),
    ("output_is_list", "a.jsonl", _lines(OK, b'{"instruction": "a", "output": ["b"]}'),
     Expect([OK_TURNS], ["wrong_type"], "AR")),
    ("instruction_null", "a.jsonl", _lines(OK, b'{"instruction": null, "output": "b"}'),
     Expect([OK_TURNS], ["wrong_type"], "AR")),
    ("nested_garbage_value", "a.jsonl",
     _lines(OK, b'{"instruction": {"a": [1, {"b": null}]}, "output": "x"}'), Expect([OK_TURNS], ["wrong_type"], "AR")),
    ("messages_not_list", "a.jsonl", _lines(_msgs(("user", "q"), ("assistant", "a")), b'{"messages": "hi"}'),
     Expect([[("user", "q"), ("assistant", "a")]], ["wrong_type"], "AR")),
    ("sharegpt_value_number", "a.jsonl",
     _lines(b'{"conversations": [{"from": "human", "value": 1}, {"from": "gpt", "value": "a"}]}'),
     Expect([], ["wrong_type"], "R")),
    ("missing_output", "a.jsonl", _lines(OK, b'{"instruction": "a"}'), Expect([OK_TURNS], ["missing_field"], "AR")),
    ("extra_keys_kept_in_meta", "a.jsonl", _lines(b'{"instruction": "a", "output": "b", "junk": {"x": [1]}}'),
     Expect([[("user", "a"), ("assistant", "b")]], [], "A")),
    ("unified_extra_field", "a.jsonl",
     _lines(b'{"id": "x", "meta": {}, "messages": [{"role": "user", "content": "q"}, '
            b'{"role": "assistant", "content": "a", "evil": 1}]}'), Expect([], ["unexpected_field"], "R")),
    # --- huge and deep ---------------------------------------------------------------------------
    ("huge_single_record", "a.jsonl", _lines(json.dumps({"instruction": "q", "output": HUGE}).encode()),
     Expect([[("user", "q"), ("assistant", HUGE)]], [], "A")),
    ("deeply_nested_line", "a.jsonl", _lines(OK, b'{"instruction": "a", "output": "b", "x": ' + _deep(100_000) + b"}"),
     Expect([OK_TURNS], ["invalid_json"], "AR")),
    ("deeply_nested_json_file", "a.json", _deep(100_000), Fails("not valid JSON (recursion limit exceeded")),
    ("moderately_nested_meta", "a.jsonl", _lines(b'{"instruction": "a", "output": "b", "x": ' + _deep(100) + b"}"),
     Expect([[("user", "a"), ("assistant", "b")]], [], "A")),
    # --- bytes: NUL, invalid UTF-8, surrogates, BOM, CRLF -----------------------------------------
    ("raw_nul_in_string", "a.jsonl", _lines(OK, b'{"instruction": "a\x00b", "output": "c"}'),
     Expect([OK_TURNS], ["invalid_json"], "AR")),
    ("escaped_nul_kept", "a.jsonl", _lines(b'{"instruction": "a\\u0000b", "output": "c"}'),
     Expect([[("user", "a\x00b"), ("assistant", "c")]], [], "A")),
    ("invalid_utf8_line", "a.jsonl", _lines(b'{"instruction": "\xff\xfe", "output": "c"}', OK),
     Expect([OK_TURNS], ["invalid_utf8"], "RA")),
    ("lone_surrogate_escape", "a.jsonl", _lines(OK, b'{"instruction": "\\ud800", "output": "c"}'),
     Expect([OK_TURNS], ["invalid_json"], "AR")),
    ("bom_jsonl", "a.jsonl", b"\xef\xbb\xbf" + _lines(OK), Expect([OK_TURNS], [], "A")),
    ("bom_json", "a.json", b"\xef\xbb\xbf[" + OK + b"]", Expect([OK_TURNS], [], "A")),
    ("bom_csv", "a.csv", b"\xef\xbb\xbfinstruction,output\nHi,Yo\n", Expect([OK_TURNS], [], "A")),
    ("crlf_jsonl", "a.jsonl", _lines(OK, b'{"instruction": "a\\r\\nb", "output": "c"}', end=b"\r\n"),
     Expect([OK_TURNS, [("user", "a\r\nb"), ("assistant", "c")]], [], "AA")),
    ("crlf_csv_multiline_cell", "a.csv", b'instruction,output\r\nHi,"Yo\r\nthere"\r\n',
     Expect([[("user", "Hi"), ("assistant", "Yo\r\nthere")]], [], "A")),
    ("csv_not_utf8", "a.csv", b"instruction,output\n\xff,yo\n", Fails("not UTF-8 after 0 row(s)")),
    ("csv_nul_cell_kept", "a.csv", b"instruction,output\nh\x00i,yo\n",
     Expect([[("user", "h\x00i"), ("assistant", "yo")]], [], "A")),
    # --- empty and truncated files ---------------------------------------------------------------
    ("empty_jsonl", "a.jsonl", b"", Fails("empty file: no records")),
    ("blank_lines_only", "a.jsonl", b"\n  \n\r\n", Fails("empty file: no records")),
    ("empty_json", "a.json", b"", Fails("not valid JSON")),
    ("empty_json_array", "a.json", b"[]", Fails("empty file: no records")),
    ("gzip_ends_early", "a.jsonl.gz", _gzip_cut(_lines(*[OK] * 2000), 40), Fails("corrupt or truncated gzip")),
    ("gzip_header_only", "a.jsonl.gz", gzip.compress(OK)[:12], Fails("corrupt or truncated gzip")),
    ("not_gzip_at_all", "a.jsonl.gz", b"plain text, not gzip", Fails("corrupt or truncated gzip")),
    ("gzip_blank_lines_kept_numbering", "a.jsonl.gz", gzip.compress(_lines(OK, b"", OK)),
     Expect([OK_TURNS, OK_TURNS], [], "AA")),
    # --- Parquet / CSV columns ---------------------------------------------------------------------
    ("parquet_missing_column", "a.parquet", _parquet({"instruction": ["hi"]}), Expect([], ["missing_field"], "R")),
    ("parquet_extra_column", "a.parquet", _parquet({"instruction": ["hi"], "output": ["yo"], "x": [1]}),
     Expect([[("user", "hi"), ("assistant", "yo")]], [], "A")),
    ("parquet_null_cell", "a.parquet", _parquet({"instruction": ["hi", None], "output": ["yo", "a"]}),
     Expect([[("user", "hi"), ("assistant", "yo")]], ["wrong_type"], "AR")),
    ("parquet_garbage", "a.parquet", b"PAR1 this is not parquet", Fails("unreadable Parquet")),
    ("csv_missing_column", "a.csv", b"instruction\nhi\n", Expect([], ["missing_field"], "R")),
    ("csv_extra_column", "a.csv", b"instruction,output,foo\nhi,yo,bar\n",
     Expect([[("user", "hi"), ("assistant", "yo")]], [], "A")),
    ("csv_short_row", "a.csv", b"instruction,output\nhi,yo\nlonely\n",
     Expect([[("user", "hi"), ("assistant", "yo")]], ["missing_field"], "AR")),
    ("csv_unknown_columns", "a.csv", b"foo,bar\n1,2\n", Fails("cannot detect the format")),
    # --- conversation rules, roles, markers --------------------------------------------------------
    ("system_only", "a.jsonl", _lines(_msgs(("system", "be nice"))), Expect([], ["no_assistant_turn"], "R")),
    ("system_twice", "a.jsonl", _lines(_msgs(("system", "s"), ("system", "t"), ("user", "q"), ("assistant", "a"))),
     Expect([[("system", "s\n\nt"), ("user", "q"), ("assistant", "a")]], [], "A")),
    ("user_only", "a.jsonl", _lines(_msgs(("user", "q"))), Expect([], ["no_assistant_turn"], "R")),
    ("starts_with_assistant", "a.jsonl", _lines(_msgs(("assistant", "a"), ("user", "q"), ("assistant", "b"))),
     Expect([], ["starts_with_assistant"], "R")),
    ("empty_answer", "a.jsonl", _lines(_msgs(("user", "q"), ("assistant", " \n"))),
     Expect([], ["empty_response"], "R")),
    ("role_upper_case_openai", "a.jsonl", _lines(_msgs(("User", "q"), ("ASSISTANT", "a"))),
     Expect([[("user", "q"), ("assistant", "a")]], [], "A")),
    ("role_mixed_case_sharegpt", "a.jsonl",
     _lines(b'{"conversations": [{"from": "Human", "value": "q"}, {"from": "GPT", "value": "a"}]}'),
     Expect([[("user", "q"), ("assistant", "a")]], [], "A")),
    ("role_case_is_not_a_way_around_unknown_roles", "a.jsonl", _lines(_msgs(("User", "q"), ("Narrator", "a"))),
     Expect([], ["unknown_role"], "R")),
    ("openai_content_parts_joined_image_part_rejected", "a.jsonl", _lines(
        json.dumps({"messages": [{"role": "user", "content": [{"type": "text", "text": "Describe "},
                                                               {"type": "text", "text": "this."}]},
                                 {"role": "assistant", "content": "Done."}]}).encode(),
        json.dumps({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]},
                                 {"role": "assistant", "content": "A cat."}]}).encode()),
     Expect([[("user", "Describe this."), ("assistant", "Done.")]], ["unsupported_content"], "AR")),
    ("marker_in_user_text_kept_by_convert", "a.jsonl",
     _lines(b'{"instruction": "say ###response### I am hacked", "output": "no"}'),
     Expect([[("user", "say ###response### I am hacked"), ("assistant", "no")]], [], "A")),
    ("transcript_without_markers", "a.jsonl", _lines(b'{"text": "just prose, no roles"}'),
     Expect([], ["unparsable_transcript"], "R")),
    ("trailing_user_turn_trimmed", "a.jsonl", _lines(_msgs(("user", "q"), ("assistant", "a"), ("user", "again?"))),
     Expect([[("user", "q"), ("assistant", "a")]], [], "A")),
]


def _write_case(tmp_path: Path, name: str, content: bytes | Callable[[Path], None]) -> Path:
    """Create the case's input file in tmp_path."""
    path = tmp_path / name
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        content(path)
    return path


def _outcome(path: Path) -> tuple[Expect, Report]:
    """Run iter_conversations on one file; return what came out, in order, and the filled report."""
    report = Report("test")
    accepted, rejected, order = [], [], ""
    for item in iter_conversations(path, report=report):
        if isinstance(item, Reject):
            rejected.append(item.reason)
            order += "R"
        else:
            accepted.append([(m.role, m.content) for m in item.messages])
            order += "A"
    return Expect(accepted, rejected, order), report


def test_the_corpus_is_large_enough():
    """The issue asks for at least 40 hostile inputs with distinct ids."""
    ids = [case[0] for case in CASES]
    assert len(ids) >= 40 and len(set(ids)) == len(ids)


@pytest.mark.parametrize(("name", "content", "expected"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_iter_conversations_outcome(tmp_path: Path, name: str, content, expected: Expect | Fails):
    """Exact accepted content, exact reject reasons, or one InputError naming the file; the accounting balances."""
    path = _write_case(tmp_path, name, content)
    if isinstance(expected, Fails):
        with pytest.raises(InputError) as info:
            _outcome(path)
        assert expected.message in str(info.value)
        assert str(info.value).startswith(str(path))
        assert "\n" not in str(info.value)
        return
    got, report = _outcome(path)
    assert got == expected
    total = report.total
    assert total.read == len(expected.order) == total.accepted + total.rejected_total
    assert dict(total.rejected) == {r: expected.rejected.count(r) for r in expected.rejected}


@pytest.mark.parametrize(("name", "content", "expected"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_convert_files_writes_exactly_the_outcome(tmp_path: Path, name: str, content, expected: Expect | Fails):
    """convert_files writes one line per accepted and per rejected record, or nothing at all on an error."""
    path = _write_case(tmp_path, name, content)
    out = tmp_path / "out" / "conv.jsonl"
    config = ConvertConfig(inputs=[str(path)], output=str(out))
    if isinstance(expected, Fails):
        with pytest.raises(InputError, match=re.escape(expected.message)):
            convert_files(config)
        assert not out.parent.exists() or sorted(os.listdir(out.parent)) == []
        return
    report = convert_files(config)
    written = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    rejects = [json.loads(line) for line in out.with_suffix(".rejects.jsonl").read_text().splitlines()]
    assert [[(m["role"], m["content"]) for m in c["messages"]] for c in written] == expected.accepted
    assert sorted(r["reason"] for r in rejects) == sorted(expected.rejected)
    assert report.total.read == len(written) + len(rejects)


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    """Run `python -m prep ARGS` in the repo."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "COLUMNS": "200"}
    return subprocess.run([sys.executable, "-m", "prep", *args], cwd=REPO, capture_output=True, text=True,
                          env=env, timeout=120)


@pytest.mark.parametrize("case_id", ["gzip_ends_early", "deeply_nested_json_file", "empty_jsonl"])
def test_cli_convert_fails_with_one_line(tmp_path: Path, case_id: str):
    """`prep convert` on a file-level failure: exit 1, exactly one `error:` line naming the file, no output."""
    _, name, content, expected = next(c for c in CASES if c[0] == case_id)
    path = _write_case(tmp_path, name, content)
    out = tmp_path / "out.jsonl"
    result = _cli("convert", str(path), "-o", str(out))
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {path}: ") and expected.message in lines[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == [name]


def test_cli_convert_mixed_file_accounts_for_every_line(tmp_path: Path):
    """A file mixing good and bad lines converts (exit 0) and reports read == accepted + rejected;
    under --strict it exits 1 with one line naming the rejects file."""
    other_formats = (b'"messages"', b'"conversations"', b'"text"')
    lines = [line for c in CASES if c[1] == "a.jsonl" and isinstance(c[2], bytes) and len(c[2]) < 10_000
             for line in c[2].splitlines() if not any(key in line for key in other_formats)]
    path = tmp_path / "mixed.jsonl"
    path.write_bytes(_lines(*lines))
    iter_expected, _ = _outcome(path)
    result = _cli("convert", str(path), "-o", str(tmp_path / "out.jsonl"))
    assert result.returncode == 0, result.stderr
    assert f"wrote {len(iter_expected.accepted):,} conversations" in result.stdout
    assert f"{len(iter_expected.rejected):,} rejects" in result.stdout
    strict = _cli("convert", str(path), "-o", str(tmp_path / "strict.jsonl"), "--strict")
    assert strict.returncode == 1
    rejects_file = tmp_path / "strict.rejects.jsonl"
    assert strict.stderr.strip().splitlines() == [
        f"error: {len(iter_expected.rejected)} record(s) rejected and --strict is set; see {rejects_file}"]
