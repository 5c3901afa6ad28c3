"""prep.sink: importing prep changes no process state (the umask), and outputs get the usual umask-based modes.

Each case runs in a fresh interpreter: the umask is per process, and the import must be the first one.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _python(code: str, cwd: Path) -> dict:
    """Run `code` in a fresh interpreter (offline) and return the JSON it prints last."""
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    done = subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_importing_prep_never_touches_the_umask(tmp_path):
    code = """
import json, os
calls = []
real = os.umask
os.umask = lambda mask: calls.append(mask) or real(mask)
import prep.sink, prep.convert, prep.pipeline, prep.cli, prep.write, prep.plot, prep.stats, prep.verify
os.umask = real
print(json.dumps(calls))
"""
    assert _python(code, tmp_path) == []


def test_outputs_follow_the_umask_in_force_when_written(tmp_path):
    code = """
import json, os, stat
from prep.sink import JsonlSink, ParquetSink, atomic_path
modes = {}
for mask in (0o022, 0o027, 0o002):
    os.umask(mask)  # set after the import: what counts is the umask when the file is written
    with JsonlSink(f"out-{mask:o}.jsonl") as sink:
        sink.write([b'{"a": 1}'])
    with ParquetSink(f"out-{mask:o}.parquet") as sink:
        sink.write([])
    with atomic_path(f"out-{mask:o}.txt") as tmp:
        tmp.write_text("x")
    modes[oct(mask)] = [oct(stat.S_IMODE(os.stat(f"out-{mask:o}.{ext}").st_mode)) for ext in ("jsonl", "parquet", "txt")]
print(json.dumps(modes))
"""
    modes = _python(code, tmp_path)
    assert modes == {"0o22": ["0o644"] * 3, "0o27": ["0o640"] * 3, "0o2": ["0o664"] * 3}
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]  # no temporary file left


def test_convert_and_pack_outputs_get_umask_modes(tmp_path):
    code = f"""
import json, os, stat, sys
os.umask(0o022)
from prep.cli import main
def mode(p):
    return oct(stat.S_IMODE(os.stat(p).st_mode))
for argv in (["convert", {str(REPO / "examples" / "alpaca.json")!r}, "-o", "u.jsonl"], ["pack", "u.jsonl", "-o", "shards"]):
    sys.argv = ["prep", *argv]
    try:
        main()
    except SystemExit as e:
        assert not e.code, e.code
print(json.dumps({{"u.jsonl": mode("u.jsonl"), "rejects": mode("u.rejects.jsonl"), "shards": mode("shards"),
                  "tokenizer": mode("shards/tokenizer"), "manifest": mode("shards/manifest.json"),
                  "shard": mode("shards/data-00000-of-00001.arrow")}}))
"""
    assert _python(code, tmp_path) == {"u.jsonl": "0o644", "rejects": "0o644", "shards": "0o755",
                                       "tokenizer": "0o755", "manifest": "0o644", "shard": "0o644"}
