"""Object storage and the web, in and out (prep.remote): a real S3 server (moto's, on 127.0.0.1) reached through
fsspec/s3fs, a local HTTP server for https-style inputs, real data, and the real CLI."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from _s3 import BUCKET, MotoServer, one_error_line

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "examples"


def prep(*args: str, cwd: Path, env: dict[str, str], timeout: int = 600) -> subprocess.CompletedProcess:
    """`python -m prep ARGS` with the given extra environment, offline for the Hub."""
    full = dict(os.environ, HF_HUB_OFFLINE="1", COLUMNS="200", **env)
    return subprocess.run([sys.executable, "-m", "prep", *args], cwd=cwd, env=full, capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """A moto S3 server with the bucket and real raw inputs under s3://my-bucket/raw/; the client environment is
    set for this module's in-process calls too."""
    import s3fs

    with MotoServer() as server:
        saved = {k: os.environ.get(k) for k in server.env}
        os.environ.update(server.env)
        s3fs.S3FileSystem.clear_instance_cache()
        client = server.client()
        client.create_bucket(Bucket=BUCKET)
        data = Path(__file__).resolve().parents[2] / "shared" / "data"
        for local, key in (("alpaca/alpaca_en_demo.json", "raw/alpaca_en_demo.json"),
                           ("hh/harmless-base_test.jsonl.gz", "raw/harmless-base_test.jsonl.gz")):
            client.upload_file(str(data / local), BUCKET, key)
        yield server
        for key, value in saved.items():
            os.environ.pop(key, None) if value is None else os.environ.__setitem__(key, value)
        s3fs.S3FileSystem.clear_instance_cache()


def files_of(folder: Path) -> dict[str, bytes]:
    """Every file under a local folder by relative path."""
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def objects_of(server: MotoServer, prefix: str) -> dict[str, bytes]:
    """Every object under s3://my-bucket/PREFIX/ by relative key."""
    return {k[len(prefix) + 1:]: server.get(BUCKET, k) for k in server.keys(BUCKET, prefix + "/")}


# --------------------------------------------------------------------------------------------------
# End to end, as the README shows it


def test_convert_pack_verify_train_from_and_to_s3(s3, tmp_path):
    """The README's object-store walk-through: every command, against the S3 server."""
    env = s3.env | {"PREP_CACHE": str(tmp_path / "cache")}
    done = prep("convert", f"s3://{BUCKET}/raw/*.json*", "-o", f"s3://{BUCKET}/sft/unified.jsonl", cwd=tmp_path, env=env)
    assert done.returncode == 0, done.stderr
    assert ("wrote 3,307 conversations to s3://my-bucket/sft/unified.jsonl, 4 rejects to "
            "s3://my-bucket/sft/unified.rejects.jsonl") in done.stdout  # hh's 4 empty final answers
    rejects = [json.loads(x) for x in s3.get(BUCKET, "sft/unified.rejects.jsonl").splitlines()]
    assert {r["path"] for r in rejects} == {f"s3://{BUCKET}/raw/harmless-base_test.jsonl.gz"}
    lines = s3.get(BUCKET, "sft/unified.jsonl").splitlines()
    assert len(lines) == 3307 and json.loads(lines[0])["source"]["path"] == f"s3://{BUCKET}/raw/alpaca_en_demo.json"

    pack = ("pack", f"s3://{BUCKET}/sft/unified.jsonl", "-o", f"s3://{BUCKET}/sft/shards", "--max-len", "1024")
    done = prep(*pack, cwd=tmp_path, env=env)
    assert done.returncode == 0, done.stderr
    assert f"shard(s) in s3://{BUCKET}/sft/shards" in done.stdout
    keys = s3.keys(BUCKET, "sft/")
    assert "sft/shards/manifest.json" in keys and not any(".tmp-" in k for k in keys)  # the staging prefix is gone
    done = prep(*pack, cwd=tmp_path, env=env)
    assert done.returncode == 0 and "up to date" in done.stdout

    done = prep("verify", f"s3://{BUCKET}/sft/shards", cwd=tmp_path, env=env)
    assert done.returncode == 0 and f"ok: s3://{BUCKET}/sft/shards" in done.stdout, done.stdout + done.stderr
    done = prep("stats", f"s3://{BUCKET}/sft/shards", cwd=tmp_path, env=env)
    assert done.returncode == 0 and f"s3://{BUCKET}/sft/shards" in done.stdout
    done = prep("inspect", f"s3://{BUCKET}/sft/shards", "--row", "0", cwd=tmp_path, env=env)
    assert done.returncode == 0 and "row 0 of" in done.stdout

    done = prep("train", f"s3://{BUCKET}/sft/shards", "-o", "out", "--max-steps", "2", "--batch-size", "2",
                "--no-progress", cwd=tmp_path, env=env)
    assert done.returncode == 0, done.stderr
    metrics = json.loads(done.stdout.strip().splitlines()[-1])
    assert metrics["step"] == 2 and metrics["loss"] > 0
    # the shard files were fetched once into the cache, each under the manifest's key
    manifest = json.loads(s3.get(BUCKET, "sft/shards/manifest.json"))
    cached = [p for p in (tmp_path / "cache" / "shards").iterdir()]
    assert len(cached) == 1 and sorted(p.name for p in cached[0].glob("*.arrow")) == sorted(
        e["file"] for e in manifest["shards"])


def test_the_same_input_read_locally_and_from_s3_gives_the_same_bytes(s3, tmp_path, shared_data):
    """convert and pack of one file: from disk and from the store, to disk and to the store."""
    from prep.convert import convert_files
    from prep.pipeline import pack_shards
    from schemas.config import ConvertConfig
    from schemas.pack_config import PackConfig

    local = str(shared_data / "alpaca" / "alpaca_en_demo.json")
    url = f"s3://{BUCKET}/raw/alpaca_en_demo.json"
    convert_files(ConvertConfig(inputs=[local], output=str(tmp_path / "local.jsonl")))
    convert_files(ConvertConfig(inputs=[url], output=f"s3://{BUCKET}/same/remote.jsonl"))
    ours = [json.loads(x) for x in (tmp_path / "local.jsonl").read_bytes().splitlines()]
    theirs = [json.loads(x) for x in s3.get(BUCKET, "same/remote.jsonl").splitlines()]
    assert [r["source"]["path"] for r in theirs] == [url] * len(ours)
    for r in ours + theirs:
        del r["source"]["path"]
    assert ours == theirs

    options = dict(max_len=1024, shard_size="200KB")
    pack_shards(PackConfig(inputs=[local], output=str(tmp_path / "local"), **options))
    pack_shards(PackConfig(inputs=[url], output=f"s3://{BUCKET}/same/from-s3", **options))
    pack_shards(PackConfig(inputs=[local], output=f"s3://{BUCKET}/same/to-s3", **options))
    expected = files_of(tmp_path / "local")
    assert len([k for k in expected if k.endswith(".arrow")]) > 1
    assert objects_of(s3, "same/to-s3") == expected  # the whole folder, manifest included, byte for byte
    from_s3 = objects_of(s3, "same/from-s3")
    manifest, local_manifest = json.loads(from_s3.pop("manifest.json")), json.loads(expected.pop("manifest.json"))
    assert from_s3.pop("rejects.jsonl") == expected.pop("rejects.jsonl").replace(local.encode(), url.encode())
    assert from_s3 == expected
    assert manifest["inputs"] == [dict(local_manifest["inputs"][0], path=url)]
    manifest["inputs"] = local_manifest["inputs"]
    assert manifest == local_manifest


def test_a_killed_upload_leaves_nothing_that_verifies_and_a_rerun_gives_the_local_bytes(s3, tmp_path, shared_data):
    """SIGKILL `prep pack` while it uploads: the output URL holds no manifest (verify and load_shards refuse it),
    and the rerun publishes exactly the bytes of a local run."""
    from prep.errors import ShardError
    from prep.load import load_shards

    env = s3.env | {"PREP_CACHE": str(tmp_path / "cache")}
    args = (str(shared_data / "alpaca" / "alpaca_en_demo.json"), "--max-len", "512", "--shard-size", "100KB")
    full = dict(os.environ, HF_HUB_OFFLINE="1", **env)
    process = subprocess.Popen([sys.executable, "-m", "prep", "pack", *args, "-o", f"s3://{BUCKET}/killed/shards"],
                               cwd=tmp_path, env=full, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while not any(".shards.tmp-" in k for k in s3.keys(BUCKET, "killed/")):
        assert process.poll() is None and time.monotonic() < deadline, "pack ended before it was killed"
        time.sleep(0.005)
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=60)
    keys = s3.keys(BUCKET, "killed/")
    assert keys and all(".shards.tmp-" in k for k in keys) and not any(k.endswith("manifest.json") for k in keys)

    done = prep("verify", f"s3://{BUCKET}/killed/shards", cwd=tmp_path, env=env)
    assert done.returncode == 1 and "writer did not finish" in done.stdout + done.stderr
    with pytest.raises(ShardError, match="writer did not finish"):
        load_shards(f"s3://{BUCKET}/killed/shards")

    done = prep("pack", *args, "-o", f"s3://{BUCKET}/killed/shards", cwd=tmp_path, env=env)
    assert done.returncode == 0, done.stderr
    done = prep("pack", *args, "-o", str(tmp_path / "local"), cwd=tmp_path, env=env)
    assert done.returncode == 0, done.stderr
    assert objects_of(s3, "killed/shards") == files_of(tmp_path / "local")
    assert prep("verify", f"s3://{BUCKET}/killed/shards", cwd=tmp_path, env=env).returncode == 0


def test_overwrite_replaces_a_remote_output_and_refuses_a_folder_that_is_not_shards(s3, tmp_path, examples):
    from prep.errors import OutputExistsError
    from prep.pipeline import pack_shards
    from schemas.pack_config import PackConfig

    out = f"s3://{BUCKET}/over/shards"
    first = pack_shards(PackConfig(inputs=[str(examples / "alpaca.json")], output=out, max_len=512))
    with pytest.raises(OutputExistsError, match="--overwrite"):
        pack_shards(PackConfig(inputs=[str(examples / "sharegpt.jsonl")], output=out, max_len=512))
    second = pack_shards(PackConfig(inputs=[str(examples / "sharegpt.jsonl")], output=out, max_len=512, overwrite=True))
    assert second.manifest["fingerprint"] != first.manifest["fingerprint"]
    assert json.loads(s3.get(BUCKET, "over/shards/manifest.json")) == second.manifest
    names = {k.rsplit("/", 1)[1] for k in s3.keys(BUCKET, "over/shards/") if k.endswith(".arrow")}
    assert names == {e["file"] for e in second.manifest["shards"]}  # no file of the first run is left
    s3.client().put_object(Bucket=BUCKET, Key="over/notes/a.txt", Body=b"mine")
    with pytest.raises(OutputExistsError, match="not a prep shards folder"):
        pack_shards(PackConfig(inputs=[str(examples / "alpaca.json")], output=f"s3://{BUCKET}/over/notes",
                               overwrite=True))
    assert s3.get(BUCKET, "over/notes/a.txt") == b"mine"


def test_split_outputs_go_to_the_store_with_their_manifests_last(s3, tmp_path, shared_data):
    """--val-fraction writes train/ and validation/ (each with its manifest) and the top manifest; the store copy
    loads per split, and each split is fetched once (the folder links to the splits' own copies)."""
    from prep.load import load_shards, split_names
    from prep.pipeline import pack_shards
    from prep.remote import commit_order
    from schemas.pack_config import PackConfig

    os.environ["PREP_CACHE"] = str(tmp_path / "cache")
    try:
        url = f"s3://{BUCKET}/splits/shards"
        report = pack_shards(PackConfig(inputs=[str(shared_data / "alpaca" / "identity.json")], output=url,
                                        max_len=512, val_fraction=0.2))
        assert split_names(url) == ["train", "validation"]
        train, validation = load_shards(url), load_shards(url, split="validation")
        assert train.num_rows == report.split_manifests["train"]["counts"]["rows"]
        assert validation.num_rows == report.split_manifests["validation"]["counts"]["rows"]
        assert len(list((tmp_path / "cache" / "shards").iterdir())) == 3  # train, validation, and the top folder
    finally:
        del os.environ["PREP_CACHE"]
    order = commit_order(sorted(k[len("splits/shards/"):] for k in s3.keys(BUCKET, "splits/shards/")))
    assert order[-3:] == ["train/manifest.json", "validation/manifest.json", "manifest.json"]


def test_ctrl_c_during_the_upload_removes_the_temporary_prefix(s3, tmp_path, shared_data):
    args = (str(shared_data / "alpaca" / "alpaca_en_demo.json"), "--max-len", "512", "--shard-size", "100KB")
    full = dict(os.environ, HF_HUB_OFFLINE="1", **s3.env)
    process = subprocess.Popen([sys.executable, "-m", "prep", "pack", *args, "-o", f"s3://{BUCKET}/int/shards"],
                               cwd=tmp_path, env=full, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while not s3.keys(BUCKET, "int/"):
        assert process.poll() is None and time.monotonic() < deadline, "pack ended before it was interrupted"
        time.sleep(0.005)
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=300)
    assert process.returncode == 130 and err.strip() == "interrupted; no output written"
    assert s3.keys(BUCKET, "int/") == []


def test_parquet_and_arrow_objects_are_read_like_local_files(s3, tmp_path, shared_data):
    """Parquet, Arrow IPC, a save_to_disk folder and an xz-compressed CSV on the store give the rows their local
    copies give."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from prep.read import read_rows

    rows = json.loads((shared_data / "alpaca" / "alpaca_zh_demo.json").read_text())
    table = pa.Table.from_pylist(rows)
    pq.write_table(table, tmp_path / "zh.parquet", row_group_size=100)
    with pa.OSFile(str(tmp_path / "zh.arrow"), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table, max_chunksize=128)
    import datasets

    datasets.Dataset.from_list(rows[:300]).save_to_disk(str(tmp_path / "saved"), max_shard_size="100KB")
    (tmp_path / "dolly.csv.xz").write_bytes(__import__("lzma").compress((EXAMPLES / "dolly.csv").read_bytes()))
    for name in ("zh.parquet", "zh.arrow", "saved", "dolly.csv.xz"):
        files = [tmp_path / name] if (tmp_path / name).is_file() else sorted((tmp_path / name).iterdir())
        for file in files:
            s3.client().upload_file(str(file), BUCKET, f"formats/{file.relative_to(tmp_path).as_posix()}")
        local = [(r.line, r.payload) for r in read_rows([str(tmp_path / name)])]
        remote = list(read_rows([f"s3://{BUCKET}/formats/{name}"]))
        assert [(r.line, r.payload) for r in remote] == local and local
        assert {r.path for r in remote} == {f"s3://{BUCKET}/formats/{name}"}


def test_the_fsspec_endpoint_variable_works_too(s3, tmp_path):
    env = {k: v for k, v in s3.env.items() if k != "AWS_ENDPOINT_URL"} | {"FSSPEC_S3_ENDPOINT_URL": s3.url}
    full = dict(os.environ, HF_HUB_OFFLINE="1", **env)
    full.pop("AWS_ENDPOINT_URL", None)
    done = subprocess.run([sys.executable, "-m", "prep", "convert", f"s3://{BUCKET}/raw/alpaca_en_demo.json", "-o",
                           "out.jsonl"], cwd=tmp_path, env=full, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0 and "wrote 999 conversations" in done.stdout, done.stderr


# --------------------------------------------------------------------------------------------------
# The local cache of shard URLs


def test_shard_urls_are_fetched_once_and_checked_against_the_manifest(s3, tmp_path, examples, monkeypatch):
    from prep.errors import ShardError
    from prep.load import load_shards
    from prep.pipeline import pack_shards
    from schemas.pack_config import PackConfig

    monkeypatch.setenv("PREP_CACHE", str(tmp_path / "cache"))
    url = f"s3://{BUCKET}/cache/shards"
    manifest = pack_shards(PackConfig(inputs=[str(examples / "alpaca.json")], output=url, max_len=512)).manifest
    first = load_shards(url)
    shard = manifest["shards"][0]["file"]
    s3.client().delete_object(Bucket=BUCKET, Key=f"cache/shards/{shard}")
    again = load_shards(url)  # the manifest is unchanged: the cached, checked copy serves
    assert again.path == first.path and again.table.equals(first.table)

    s3.client().put_object(Bucket=BUCKET, Key=f"cache/shards/{shard}", Body=(first.path / shard).read_bytes()[:-8])
    monkeypatch.setenv("PREP_CACHE", str(tmp_path / "fresh"))
    with pytest.raises(ShardError, match=f"s3://{BUCKET}/cache/shards/{shard}: sha256 .* differs from the manifest"):
        load_shards(url)
    assert not list((tmp_path / "fresh").rglob("*.arrow"))  # a file that fails its check never enters the cache


def test_verify_of_a_url_checks_the_copy_and_lists_stray_files_at_the_url(s3, tmp_path, examples, monkeypatch):
    from prep.pipeline import pack_shards
    from prep.verify import verify_shards
    from schemas.pack_config import PackConfig

    monkeypatch.setenv("PREP_CACHE", str(tmp_path / "cache"))
    url = f"s3://{BUCKET}/stray/shards"
    manifest = pack_shards(PackConfig(inputs=[str(examples / "alpaca.json")], output=url, max_len=512)).manifest
    assert verify_shards(url).ok
    shard = manifest["shards"][0]["file"]
    s3.client().copy_object(Bucket=BUCKET, Key="stray/shards/data-00009-of-00010.arrow",
                            CopySource={"Bucket": BUCKET, "Key": f"stray/shards/{shard}"})
    report = verify_shards(url)
    assert [(p.file, p.check) for p in report.problems] == [("data-00009-of-00010.arrow", "stray")]
    assert report.path == url


def test_example_templates_of_a_mixed_folder_are_fetched_and_not_stray(s3, tmp_path, examples, monkeypatch):
    """Sources with several templates write example_templates.arrow beside the shards: it goes to the store, comes
    back into the local copy (sha256 checked), and verify does not call it a stray file."""
    import yaml

    from prep.example_templates import EXAMPLE_TEMPLATES_FILE
    from prep.pipeline import build_config, pack_shards
    from prep.stats import shard_stats
    from prep.verify import verify_shards

    monkeypatch.setenv("PREP_CACHE", str(tmp_path / "cache"))
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({"max_len": 512, "sources": [
        {"path": str(examples / "alpaca.json")}, {"path": str(examples / "openai.jsonl"), "template": "chatml"}]}))
    url = f"s3://{BUCKET}/mixed/shards"
    pack_shards(build_config(recipe=str(recipe), output=url))
    assert EXAMPLE_TEMPLATES_FILE in objects_of(s3, "mixed/shards")
    report = verify_shards(url)
    assert report.ok, report.problems
    assert set(shard_stats(url).by_template) == {"markers", "chatml"}


class _NoListingHandler(SimpleHTTPRequestHandler):
    """A static web server: files only, no folder listings (as a CDN or a bucket website)."""

    def list_directory(self, path):
        self.send_error(404)

    def log_message(self, *args):
        pass


def test_a_shard_folder_on_a_web_server_trains_and_verifies(tmp_path, examples, monkeypatch):
    from prep.load import load_shards
    from prep.pipeline import pack_shards
    from prep.verify import verify_shards
    from schemas.pack_config import PackConfig

    monkeypatch.setenv("PREP_CACHE", str(tmp_path / "cache"))
    pack_shards(PackConfig(inputs=[str(examples / "sharegpt.jsonl")], output=str(tmp_path / "www" / "shards"),
                           max_len=512, tokenizer=str(Path(__file__).resolve().parents[2] / "shared" / "data" /
                                                          "tokenizers" / "smollm2-135m")))
    server = ThreadingHTTPServer(("127.0.0.1", 0), partial(_NoListingHandler, directory=str(tmp_path / "www")))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/shards"
        report = verify_shards(url)  # includes the tokenizer's fingerprint: its files came by name
        assert report.ok, report.problems
        assert load_shards(url).table.equals(load_shards(tmp_path / "www" / "shards").table)
    finally:
        server.shutdown()
        server.server_close()


def test_ranks_of_one_machine_share_one_fetch(s3, tmp_path, examples):
    """Four processes open the same shard URL at once (as torchrun ranks do): one complete copy, the same rows."""
    from prep.pipeline import pack_shards
    from schemas.pack_config import PackConfig

    url = f"s3://{BUCKET}/ranks/shards"
    pack_shards(PackConfig(inputs=[str(examples / "sharegpt.jsonl")], output=url, max_len=512, shard_size="2KB"))
    code = ("import sys; from prep.load import load_shards; s = load_shards(sys.argv[1]); "
            "print(s.path, s.num_rows, sum(map(sum, s.table.column('input_ids').to_pylist())))")
    env = dict(os.environ, PREP_CACHE=str(tmp_path / "cache"), HF_HUB_OFFLINE="1", **s3.env)
    ranks = [subprocess.Popen([sys.executable, "-c", code, url], env=env, stdout=subprocess.PIPE, text=True)
             for _ in range(4)]
    outputs = {rank.communicate(timeout=600)[0] for rank in ranks}
    assert all(rank.returncode == 0 for rank in ranks) and len(outputs) == 1
    copies = list((tmp_path / "cache" / "shards").iterdir())
    assert len(copies) == 1 and not [p for p in copies[0].rglob(".*part-*")]


# --------------------------------------------------------------------------------------------------
# Errors: one line naming the URL, exit 1, no output


@pytest.mark.parametrize("args, expected", [
    (("convert", f"s3://{BUCKET}/raw/missing.jsonl", "-o", "out.jsonl"),
     f"error: s3://{BUCKET}/raw/missing.jsonl: not found: no such object, or its bucket does not exist"),
    (("pack", "s3://no-such-bucket/data.jsonl", "-o", "shards"),
     "error: s3://no-such-bucket/data.jsonl: not found: no such object, or its bucket does not exist"),
    (("convert", f"s3://{BUCKET}/raw/*.parquet", "-o", "out.jsonl"),
     f"error: s3://{BUCKET}/raw/*.parquet: no object matches this pattern"),
    (("pack", f"s3://{BUCKET}/raw/alpaca_en_demo.json", "-o", "s3://no-such-bucket/shards"),
     "error: s3://no-such-bucket/shards: the bucket 'no-such-bucket' does not exist"),
    (("verify", f"s3://{BUCKET}/raw"),
     f"error: s3://{BUCKET}/raw/manifest.json: not found: not a shard folder, or its writer did not finish"),
    (("train", f"s3://{BUCKET}/raw", "-o", "out"),
     f"error: s3://{BUCKET}/raw/manifest.json: not found: not a shard folder, or its writer did not finish"),
], ids=["missing-key", "missing-bucket", "glob-matches-nothing", "missing-output-bucket", "verify-no-manifest",
        "train-no-manifest"])
def test_store_errors_are_one_line_naming_the_url(s3, tmp_path, args, expected):
    done = prep(*args, cwd=tmp_path, env=s3.env)
    assert one_error_line(done).startswith(expected)
    assert not [p for p in tmp_path.rglob("*") if p.is_file()]  # nothing written


def test_no_credentials_and_access_denied(s3, tmp_path):
    no_credentials = {k: v for k, v in s3.env.items() if not k.startswith("AWS_ACCESS") and "SECRET" not in k}
    env = dict(os.environ, HF_HUB_OFFLINE="1", **no_credentials)
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        env.pop(key, None)
    done = subprocess.run([sys.executable, "-m", "prep", "convert", f"s3://{BUCKET}/raw/alpaca_en_demo.json", "-o",
                           "out.jsonl"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert one_error_line(done) == (f"error: s3://{BUCKET}/raw/alpaca_en_demo.json: no credentials found for s3://: "
                                    "set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or AWS_PROFILE with "
                                    "~/.aws/credentials")
    with MotoServer(auth=True) as guarded:
        env = guarded.env | {"AWS_ACCESS_KEY_ID": "AKIAUNKNOWN", "AWS_SECRET_ACCESS_KEY": "not-a-secret-here"}
        done = prep("convert", f"s3://{BUCKET}/raw/alpaca_en_demo.json", "-o", "out.jsonl", cwd=tmp_path, env=env)
        line = one_error_line(done)
        assert line.startswith(f"error: s3://{BUCKET}/raw/alpaca_en_demo.json: access denied: the credentials in use "
                               "may not read it")
        assert "not-a-secret-here" not in done.stderr + done.stdout
    assert not list(tmp_path.iterdir())


def test_a_missing_store_package_names_the_extra(tmp_path):
    """gs:// without gcsfs (blocked in the child): one line naming the package and the extra to install."""
    code = ("import sys; sys.modules['gcsfs'] = None; sys.argv = ['prep', 'convert', 'gs://bucket/data.jsonl', '-o', "
            "'out.jsonl']; from prep.cli import main; main()")
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=600,
                          env=dict(os.environ, HF_HUB_OFFLINE="1"))
    assert one_error_line(done) == ("error: gs://bucket/data.jsonl: gs:// URLs need the gcsfs package: "
                                    "pip install 'prep-sft[gcs]'")


def test_a_connection_dropped_mid_read_is_one_line_and_leaves_no_output(tmp_path, shared_data):
    """Kill the S3 server while `prep convert` streams a 49 MB input: exit 1, one line naming the URL, no output."""
    body = (shared_data / "sharegpt" / "sharegpt_zh_1K_format.jsonl").read_bytes() * 12
    with MotoServer() as server:
        server.client().create_bucket(Bucket=BUCKET)
        server.client().put_object(Bucket=BUCKET, Key="big.jsonl", Body=body)
        full = dict(os.environ, HF_HUB_OFFLINE="1", **server.env)
        process = subprocess.Popen([sys.executable, "-m", "prep", "convert", f"s3://{BUCKET}/big.jsonl", "-o",
                                    "out.jsonl"], cwd=tmp_path, env=full, stdout=subprocess.PIPE,
                                   stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 300
        while not [p for p in tmp_path.glob(".out.jsonl.*.tmp") if p.stat().st_size > 0]:
            assert process.poll() is None and time.monotonic() < deadline, process.communicate()
            time.sleep(0.01)
        server.kill()  # the first 8 MiB block is being converted; the next one cannot be fetched
        out, err = process.communicate(timeout=300)
    done = subprocess.CompletedProcess(process.args, process.returncode, out, err)
    assert one_error_line(done).startswith(f"error: s3://{BUCKET}/big.jsonl: connection to the store failed")
    assert "check the network and the endpoint" in done.stderr
    assert not list(tmp_path.iterdir())


# --------------------------------------------------------------------------------------------------
# Web inputs and credentials in URLs


@pytest.fixture
def web(examples):
    """A local HTTP server on 127.0.0.1 serving examples/."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), partial(_QuietHandler, directory=str(examples)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


class _QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


def test_credentials_in_urls_never_reach_outputs_rejects_manifests_or_errors(web, tmp_path, examples):
    """A URL with user:password@ and a query-string token: read with them, shown and recorded without them."""
    secret_url = f"http://reader:pa55word@{web}/mixed_bad.jsonl?token=s3cr3t&X-Amz-Signature=abcdef"
    shown = f"http://***@{web}/mixed_bad.jsonl?token=***&X-Amz-Signature=***"
    done = prep("convert", secret_url, "-o", "out.jsonl", cwd=tmp_path, env={})
    assert done.returncode == 0, done.stderr
    done_pack = prep("pack", secret_url, "-o", "shards", "--max-len", "512", cwd=tmp_path, env={})
    assert done_pack.returncode == 0, done_pack.stderr
    missing = prep("convert", secret_url.replace("mixed_bad", "missing"), "-o", "x.jsonl", cwd=tmp_path, env={})
    one_error_line(missing)
    written = b"".join(p.read_bytes() for p in tmp_path.rglob("*") if p.is_file() and p.suffix in (".jsonl", ".json"))
    everything = written.decode() + "".join(d.stdout + d.stderr for d in (done, done_pack, missing))
    for secret in ("pa55word", "s3cr3t", "abcdef", "reader"):
        assert secret not in everything
    rejects = [json.loads(x) for x in (tmp_path / "out.rejects.jsonl").read_text().splitlines()]
    local = subprocess.run([sys.executable, "-m", "prep", "convert", str(examples / "mixed_bad.jsonl"), "-o",
                            "local.jsonl"], cwd=tmp_path, capture_output=True, text=True, env=dict(os.environ))
    assert local.returncode == 0
    expected = [json.loads(x) for x in (tmp_path / "local.rejects.jsonl").read_text().splitlines()]
    assert rejects and [(r["path"], r["line"], r["reason"]) for r in rejects] == [
        (shown, r["line"], r["reason"]) for r in expected]
    manifest = json.loads((tmp_path / "shards" / "manifest.json").read_text())
    assert [i["path"] for i in manifest["inputs"]] == [shown]
    assert one_error_line(missing).startswith(f"error: {shown.replace('mixed_bad', 'missing')}: ")


def test_redact():
    from prep.remote import display, real, redact

    assert redact("s3://bucket/key.jsonl") == "s3://bucket/key.jsonl"
    assert redact("hf://datasets/org/name@main/data.jsonl") == "hf://datasets/org/name@main/data.jsonl"
    assert redact("see https://u:p@h.example/x?sv=1&sig=2 and az://c/p?sas=3") == (
        "see https://***@h.example/x?sv=***&sig=*** and az://c/p?sas=***")
    url = "https://h.example/f.jsonl?sig=zzz"
    assert real(display(url)) == url and "zzz" not in display(url)


def test_a_bare_hub_id_is_answered_with_the_url_to_use(tmp_path):
    done = prep("convert", "HuggingFaceH4/no_robots", "-o", "x.jsonl", cwd=tmp_path, env={})
    assert one_error_line(done) == ("error: HuggingFaceH4/no_robots: no such file or folder; for the Hugging Face "
                                    "dataset HuggingFaceH4/no_robots write hf://datasets/HuggingFaceH4/no_robots")
