"""prep.read: paths -> batches of raw rows, for every supported kind of input."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest

from prep.errors import InputError
from prep.read import expand_inputs, input_kind, read_batches, read_rows


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


# --- paths ----------------------------------------------------------------------------------


def test_expand_inputs_sorts_globs_and_drops_repeats(tmp: Path) -> None:
    for name in ("b.jsonl", "a.jsonl", "c.csv"):
        (tmp / name).write_text("")
    got = expand_inputs([str(tmp / "*.jsonl"), str(tmp / "c.csv"), str(tmp / "a.jsonl")])
    assert got == [str(tmp / "a.jsonl"), str(tmp / "b.jsonl"), str(tmp / "c.csv")]


def test_expand_inputs_missing_file_and_empty_glob_name_the_path(tmp: Path) -> None:
    with pytest.raises(InputError, match="missing.jsonl: no such file"):
        expand_inputs([str(tmp / "missing.jsonl")])
    with pytest.raises(InputError, match=r"\*.parquet: no file matches"):
        expand_inputs([str(tmp / "*.parquet")])


@pytest.mark.parametrize("name, kind", [
    ("a.jsonl", "jsonl"), ("a.ndjson", "jsonl"), ("a.jsonl.gz", "jsonl"), ("a.json", "json"),
    ("a.JSON.GZ", "json"), ("a.csv", "csv"), ("a.csv.gz", "csv"), ("a.parquet", "parquet"),
])
def test_input_kind_by_extension(name: str, kind: str) -> None:
    assert input_kind(name) == kind


def test_input_kind_rejects_unknown_files_and_plain_folders(tmp: Path) -> None:
    with pytest.raises(InputError, match="unsupported file type"):
        input_kind("data.txt")
    with pytest.raises(InputError, match="not a datasets.save_to_disk folder"):
        input_kind(str(tmp))
    (tmp / "dataset_dict.json").write_text("{}")
    with pytest.raises(InputError, match="DatasetDict folder"):
        input_kind(str(tmp))


# --- JSON Lines -----------------------------------------------------------------------------


def test_jsonl_rows_are_bytes_with_1_based_lines_and_blank_lines_skipped(tmp: Path) -> None:
    path = tmp / "a.jsonl"
    path.write_bytes(b'\xef\xbb\xbf{"a": 1}\n\n   \n{"a": 2}\r\n{"a": 3}')
    rows = list(read_rows([path]))
    assert [(r.line, r.payload) for r in rows] == [(1, b'{"a": 1}\n'), (4, b'{"a": 2}\r\n'), (5, b'{"a": 3}')]


def test_jsonl_batches_stream(tmp: Path) -> None:
    path = write_jsonl(tmp / "a.jsonl", [{"i": i, "pad": "x" * 100} for i in range(5000)])
    batches = read_batches(str(path), batch_size=1000)
    first = next(batches)
    assert first.lines == list(range(1, 1001))
    assert 0 < first.done < 0.5  # the rest of the file has not been read yet
    assert [len(b.lines) for b in batches] == [1000] * 4


def test_gzip_jsonl(tmp: Path) -> None:
    path = tmp / "a.jsonl.gz"
    path.write_bytes(gzip.compress(b'{"a": 1}\n{"a": 2}\n'))
    assert [r.payload for r in read_rows([path])] == [b'{"a": 1}\n', b'{"a": 2}\n']


def test_truncated_gzip_is_one_clear_error(tmp: Path) -> None:
    data = gzip.compress(b"".join(b'{"instruction": "q%d", "output": "a"}\n' % i for i in range(2000)))
    path = tmp / "cut.jsonl.gz"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(InputError, match=r"cut.jsonl.gz: corrupt or truncated gzip after line \d+"):
        list(read_rows([path]))


def _compress(codec: str, data: bytes) -> bytes:
    import bz2
    import lzma

    if codec == "zst":
        return _zstd(data)
    return {"gz": gzip.compress, "bz2": bz2.compress, "xz": lzma.compress}[codec](data)


def _zstd(data: bytes) -> bytes:
    import pyarrow as pa

    buffer = pa.BufferOutputStream()
    with pa.CompressedOutputStream(buffer, "zstd") as out:
        out.write(data)
    return buffer.getvalue().to_pybytes()


@pytest.mark.parametrize("codec", ["gz", "zst", "bz2", "xz"])
def test_compressed_jsonl_json_and_csv_read_like_the_plain_files(tmp: Path, codec: str) -> None:
    lines = b"".join(b'{"instruction": "q%d", "output": "a"}\n' % i for i in range(3000))
    array = json.dumps([{"instruction": "q", "output": "a"}] * 3).encode()
    table = b"instruction,output\nq,a\nr,b\n"
    for name, data in (("a.jsonl", lines), ("b.json", array), ("c.csv", table)):
        (tmp / name).write_bytes(data)
        (tmp / f"{name}.{codec}").write_bytes(_compress(codec, data))
        plain = [(r.line, r.payload) for r in read_rows([tmp / name])]
        assert [(r.line, r.payload) for r in read_rows([tmp / f"{name}.{codec}"])] == plain


@pytest.mark.parametrize("codec, name", [("zst", "zstd"), ("bz2", "bz2"), ("xz", "xz")])
def test_truncated_compressed_files_are_one_clear_error(tmp: Path, codec: str, name: str) -> None:
    data = _compress(codec, b"".join(b'{"instruction": "q%d", "output": "a"}\n' % i for i in range(20000)))
    path = tmp / f"cut.jsonl.{codec}"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(InputError, match=rf"cut.jsonl.{codec}: corrupt or truncated {name} after line \d+"):
        list(read_rows([path]))


# --- JSON -------------------------------------------------------------------------------------


def test_json_array_rows_are_dicts_with_0_based_rows(tmp: Path) -> None:
    path = tmp / "a.json"
    path.write_text(json.dumps([{"a": 1}, {"a": 2}, 3]))
    assert [(r.line, r.payload) for r in read_rows([path])] == [(0, {"a": 1}), (1, {"a": 2}), (2, 3)]


def test_json_object_holding_one_list(tmp: Path) -> None:
    path = tmp / "a.json"
    path.write_text(json.dumps({"version": 2, "data": [{"a": 1}]}))
    assert [r.payload for r in read_rows([path])] == [{"a": 1}]


@pytest.mark.parametrize("content, message", [
    ({"train": [], "test": []}, "several lists"),
    ({"a": 1}, "no list of records"),
    ("text", "holds a str"),
])
def test_json_without_one_list_is_an_error(tmp: Path, content: object, message: str) -> None:
    path = tmp / "a.json"
    path.write_text(json.dumps(content))
    with pytest.raises(InputError, match=message):
        list(read_rows([path]))


def test_json_file_holding_json_lines_is_read_as_json_lines(tmp: Path) -> None:
    path = write_jsonl(tmp / "a.json", [{"a": 1}, {"a": 2}])
    assert [r.line for r in read_rows([path])] == [1, 2]


def test_broken_json_file_is_one_clear_error(tmp: Path) -> None:
    path = tmp / "a.json"
    path.write_text('[{"a": 1}, {"a": ')
    with pytest.raises(InputError, match="a.json: not valid JSON"):
        list(read_rows([path]))


# --- CSV, Parquet, save_to_disk ----------------------------------------------------------------


def test_csv_rows_leave_out_missing_cells(tmp: Path) -> None:
    path = tmp / "a.csv"
    path.write_text('instruction,context,response\n"Say ""hi""","","hi"\nshort row\n"multi\nline",c,r\n')
    rows = [(r.line, r.payload) for r in read_rows([path])]
    assert rows == [(0, {"instruction": 'Say "hi"', "context": "", "response": "hi"}),
                    (1, {"instruction": "short row"}),
                    (2, {"instruction": "multi\nline", "context": "c", "response": "r"})]


def test_csv_not_utf8_is_one_clear_error(tmp: Path) -> None:
    path = tmp / "a.csv"
    path.write_bytes(b"instruction,response\ncaf\xe9,ok\n")
    with pytest.raises(InputError, match="a.csv: not UTF-8"):
        list(read_rows([path]))


def test_parquet_rows(tmp: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp / "a.parquet"
    pq.write_table(pa.Table.from_pylist([{"instruction": f"q{i}", "output": "a"} for i in range(5)]), path)
    batches = list(read_batches(str(path), batch_size=2))
    assert [b.lines for b in batches] == [[0, 1], [2, 3], [4]]
    assert batches[0].payloads[1] == {"instruction": "q1", "output": "a"}


def test_corrupt_parquet_is_one_clear_error(tmp: Path) -> None:
    path = tmp / "a.parquet"
    path.write_bytes(b"PAR1 not really")
    with pytest.raises(InputError, match="a.parquet: unreadable Parquet"):
        list(read_rows([path]))


def test_save_to_disk_folder(tmp: Path) -> None:
    import datasets

    rows = [{"conversations": [{"from": "human", "value": f"q{i}"}, {"from": "gpt", "value": "a"}]} for i in range(3)]
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp / "saved"))
    got = list(read_rows([tmp / "saved"]))
    assert [r.line for r in got] == [0, 1, 2]
    assert got[2].payload == rows[2]


@pytest.mark.parametrize("ipc", ["stream", "file"])
def test_arrow_files_read_like_the_json_they_hold(shared_data: Path, tmp: Path, ipc: str) -> None:
    """A `.arrow` file in either IPC format (datasets' cache/save_to_disk files are streams, Feather v2 is the file
    format), several record batches, gives the rows of the real Glaive file, in order, batch_size at a time."""
    import pyarrow as pa

    rows = json.loads((shared_data / "sharegpt" / "glaive_toolcall_en_demo.json").read_text(encoding="utf-8"))
    table = pa.Table.from_pylist(rows)
    path = tmp / "glaive.arrow"
    with pa.OSFile(str(path), "wb") as sink:
        new = pa.ipc.new_stream if ipc == "stream" else pa.ipc.new_file
        with new(sink, table.schema) as writer:
            for batch in table.to_batches(max_chunksize=70):  # 5 record batches of up to 70 rows
                writer.write_batch(batch)
    batches = list(read_batches(str(path), batch_size=64))
    assert [len(b.lines) for b in batches] == [64, 6] * 4 + [20]  # sliced within each record batch
    assert [r.line for r in read_rows([path])] == list(range(len(rows)))
    assert [r.payload for r in read_rows([path])] == rows
    assert input_kind(str(path)) == "arrow"


def test_unreadable_arrow_file_is_one_clear_error(tmp: Path) -> None:
    path = tmp / "a.arrow"
    path.write_bytes(b"not arrow at all")
    with pytest.raises(InputError, match="a.arrow: unreadable Arrow file a.arrow"):
        list(read_rows([path]))


# --- real data --------------------------------------------------------------------------------


@pytest.mark.parametrize("name, count", [
    ("alpaca/alpaca_en_demo.json", 999), ("alpaca/alpaca_zh_demo.json", 1000), ("alpaca/identity.json", 91),
    ("alpaca/gpteacher_codegen-instruct.json", 4535), ("sharegpt/sharegpt_zh_1K_format.jsonl", 1000),
    ("sharegpt/glaive_toolcall_en_demo.json", 300), ("sharegpt/glaive_toolcall_zh_demo.json", 300),
    ("messages/kto_en_demo.json", 300), ("hh/harmless-base_test.jsonl.gz", 2312),
])
def test_real_files_row_counts(shared_data: Path, name: str, count: int) -> None:
    assert sum(1 for _ in read_rows([shared_data / name])) == count
