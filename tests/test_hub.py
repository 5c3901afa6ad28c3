"""Hub datasets as inputs (prep.hub): the real huggingface_hub client, offline against a cache laid out as it
writes one, and online against a local server that answers as the Hub does; real records in every file."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from _hub import FakeHub, commit_id, jsonl_repo, lay_out_cache, layout_repo, mixture_repo, parquet_bytes
from _s3 import BUCKET, MotoServer, one_error_line

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def prep(*args: str, cwd: Path, env: dict[str, str], online: bool = False) -> subprocess.CompletedProcess:
    """`python -m prep ARGS`; offline unless `online` (then HF_ENDPOINT must name the local server)."""
    full = dict(os.environ, COLUMNS="200", HF_HUB_DISABLE_PROGRESS_BARS="1", **env)
    for key in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE") if online else ():
        full.pop(key, None)
    if not online:
        full["HF_HUB_OFFLINE"] = "1"
    return subprocess.run([sys.executable, "-m", "prep", *args], cwd=cwd, env=full, capture_output=True, text=True,
                          timeout=600)


@pytest.fixture(scope="module")
def repos(shared_data) -> dict[str, dict[str, bytes]]:
    """The test repos' files by repo id."""
    alpaca = json.loads((shared_data / "alpaca" / "identity.json").read_text())
    return {
        "prep-test/mix": mixture_repo(shared_data),
        "prep-test/layout": layout_repo(shared_data),
        "prep-test/jsonl": jsonl_repo(shared_data),
        "prep-test/bad": {"data/train.jsonl": (EXAMPLES / "mixed_bad.jsonl").read_bytes()},
        "prep-test/two": {"README.md": b"---\nconfigs:\n- config_name: a\n  data_files: a.jsonl\n- config_name: b\n"
                                       b"  data_files: b.jsonl\n---\n",
                          "a.jsonl": jsonl_repo(shared_data)["train.jsonl"], "b.jsonl": b""},
        "prep-test/export": {"default/train/0000.parquet": parquet_bytes(alpaca[:60]),
                             "default/test/0000.parquet": parquet_bytes(alpaca[60:])},
    }


@pytest.fixture(scope="module")
def cache(tmp_path_factory, repos) -> Path:
    """A Hugging Face cache holding every test repo at main (the export one at refs/convert/parquet); the layout
    repo without a cached file listing (as older clients left caches)."""
    root = tmp_path_factory.mktemp("hf") / "hub"
    for repo, files in repos.items():
        revision = "refs/convert/parquet" if repo == "prep-test/export" else "main"
        lay_out_cache(root, repo, files, revision=revision, tree=repo != "prep-test/layout")
    return root


@pytest.fixture
def offline_hub(cache, monkeypatch):
    """huggingface_hub pointed at the test cache, offline (as the test session already is)."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return cache


def files(urls: list[str]) -> list[str]:
    """Repo paths of pinned URLs (after `@COMMIT/`)."""
    return [u.split("@", 1)[1].split("/", 1)[1] for u in urls]


@pytest.mark.parametrize("url, subset, split, expected", [
    ("hf://datasets/prep-test/mix", None, None, ["sharegpt/train.jsonl"]),
    ("hf://datasets/prep-test/mix", "alpaca", None,
     ["alpaca/train-00000-of-00002.parquet", "alpaca/train-00001-of-00002.parquet"]),
    ("hf://datasets/prep-test/mix", "alpaca", "test", ["alpaca/test-00000-of-00001.parquet"]),
    ("hf://datasets/prep-test/mix", "alpaca", "train+test",
     ["alpaca/train-00000-of-00002.parquet", "alpaca/train-00001-of-00002.parquet",
      "alpaca/test-00000-of-00001.parquet"]),
    ("hf://datasets/prep-test/layout", None, None, ["data/train-00000-of-00001.parquet"]),
    ("hf://datasets/prep-test/layout", None, "test", ["data/test-00000-of-00001.parquet"]),
    ("hf://datasets/prep-test/jsonl", None, None, ["train.jsonl"]),
    ("hf://datasets/prep-test/jsonl", None, "validation", ["validation.jsonl"]),
    ("hf://datasets/prep-test/two", "a", None, ["a.jsonl"]),
    ("hf://datasets/prep-test/export@refs/convert/parquet", None, "test", ["default/test/0000.parquet"]),
    ("hf://datasets/prep-test/mix/alpaca/train-*.parquet", None, None,
     ["alpaca/train-00000-of-00002.parquet", "alpaca/train-00001-of-00002.parquet"]),
], ids=["default-subset", "subset-train", "subset-test", "two-splits", "sharded-layout", "sharded-layout-test",
        "split-files", "split-files-validation", "one-of-two-subsets", "parquet-export", "path-glob"])
def test_subsets_and_splits_resolve_by_the_hub_layout_rules(offline_hub, repos, url, subset, split, expected):
    from prep.hub import parse, resolve

    urls = resolve(url, subset, split)
    repo = parse(url).repo
    revision = "refs/convert/parquet" if "export" in url else "main"
    commit = (offline_hub / f"datasets--{repo.replace('/', '--')}" / "refs" / revision).read_text()
    assert files(urls) == expected and all(u.startswith(f"hf://datasets/{repo}@{commit}/") for u in urls)


@pytest.mark.parametrize("url, subset, split, message", [
    ("hf://datasets/prep-test/mix", "nope", None, "no subset 'nope'; it has: alpaca, sharegpt"),
    ("hf://datasets/prep-test/mix", "alpaca", "dev", "subset 'alpaca' has no split 'dev'; it has: train, test"),
    ("hf://datasets/prep-test/two", None, None, "has several subsets (a, b) and none is the default: choose one "
                                                "with --subset"),
    ("hf://datasets/prep-test/missing", None, None, "offline (HF_HUB_OFFLINE=1) and not in the Hugging Face cache"),
    ("hf://datasets/prep-test/mix@v2", None, None, "offline (HF_HUB_OFFLINE=1) and not in the Hugging Face cache"),
    ("hf://datasets/prep-test/mix/nothing/*.csv", None, None, "no file of the repo matches this path"),
], ids=["unknown-subset", "unknown-split", "no-default-subset", "nothing-cached", "revision-not-cached",
        "path-matches-nothing"])
def test_resolution_errors_name_the_url_and_the_fix(offline_hub, url, subset, split, message):
    from prep.errors import InputError
    from prep.hub import resolve

    with pytest.raises(InputError, match="^hf://datasets/prep-test/") as error:
        resolve(url, subset, split)
    assert message in str(error.value)


def test_a_file_listed_but_not_downloaded_is_an_offline_error_naming_it(tmp_path, repos, monkeypatch):
    """A partial cache (the listing and README, one data file missing): offline, reading it is one clear error."""
    from huggingface_hub import constants

    from prep.errors import InputError
    from prep.read import read_rows

    files = repos["prep-test/mix"]
    lay_out_cache(tmp_path, "prep-test/mix", files, only=["README.md", "alpaca/train-00000-of-00002.parquet"])
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    url = f"hf://datasets/prep-test/mix@{commit_id(files)}/alpaca/train-00001-of-00002.parquet"
    with pytest.raises(InputError, match=f"^{url}: offline \\(HF_HUB_OFFLINE=1\\) and not in the Hugging Face cache"):
        list(read_rows([f"hf://datasets/prep-test/mix@{commit_id(files)}/alpaca/train-0000*-of-00002.parquet"]))


def test_pack_from_the_hub_records_the_commit_and_matches_a_local_pack(offline_hub, repos, tmp_path):
    """Hub files give the same shard bytes as the same files on disk; the manifest names each file at its commit."""
    from prep.pipeline import pack_shards
    from schemas.pack_config import PackConfig

    local = tmp_path / "local"
    for name in ("alpaca/train-00000-of-00002.parquet", "alpaca/train-00001-of-00002.parquet"):
        (local / name).parent.mkdir(parents=True, exist_ok=True)
        (local / name).write_bytes(repos["prep-test/mix"][name])
    hub = pack_shards(PackConfig(inputs=["hf://datasets/prep-test/mix"], subset="alpaca", split="train",
                                 output=str(tmp_path / "hub"), max_len=1024))
    ours = pack_shards(PackConfig(inputs=[str(local / "alpaca" / "*.parquet")], output=str(tmp_path / "disk"),
                                  max_len=1024))
    commit = commit_id(repos["prep-test/mix"])
    assert [(i["path"], i["commit"]) for i in hub.manifest["inputs"]] == [
        (f"hf://datasets/prep-test/mix@{commit}/alpaca/train-0000{k}-of-00002.parquet", commit) for k in (0, 1)]
    assert [i["sha256"] for i in hub.manifest["inputs"]] == [i["sha256"] for i in ours.manifest["inputs"]]
    for shard in ours.manifest["shards"]:
        assert (tmp_path / "hub" / shard["file"]).read_bytes() == (tmp_path / "disk" / shard["file"]).read_bytes()
    again = pack_shards(PackConfig(inputs=["hf://datasets/prep-test/mix"], subset="alpaca", split="train",
                                   output=str(tmp_path / "hub"), max_len=1024))
    assert again.up_to_date


def test_rejects_keep_the_hub_file_and_line(cache, tmp_path, repos):
    done = prep("convert", "hf://datasets/prep-test/bad", "-o", "out.jsonl", cwd=tmp_path,
                env={"HF_HUB_CACHE": str(cache)})
    assert done.returncode == 0, done.stderr
    ours = prep("convert", str(EXAMPLES / "mixed_bad.jsonl"), "-o", "local.jsonl", cwd=tmp_path, env={})
    assert ours.returncode == 0, ours.stderr
    url = f"hf://datasets/prep-test/bad@{commit_id(repos['prep-test/bad'])}/data/train.jsonl"
    rejects = [json.loads(x) for x in (tmp_path / "out.rejects.jsonl").read_text().splitlines()]
    expected = [json.loads(x) for x in (tmp_path / "local.rejects.jsonl").read_text().splitlines()]
    assert rejects and [(r["path"], r["line"], r["reason"]) for r in rejects] == [
        (url, r["line"], r["reason"]) for r in expected]


def test_a_recipe_mixes_hub_subsets_with_local_files(offline_hub, tmp_path, shared_data):
    from prep.pipeline import build_config, pack_shards

    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"""\
sources:
  - path: hf://datasets/prep-test/mix
    subset: alpaca
    split: test
    weight: 2.0
  - path: hf://datasets/prep-test/jsonl
  - path: {shared_data / "alpaca" / "identity.json"}
max_len: 1024
""")
    report = pack_shards(build_config(recipe=str(recipe), output=str(tmp_path / "shards")))
    sources = report.manifest["mixture"]["sources"]
    assert [s["name"] for s in sources] == ["hf://datasets/prep-test/mix", "hf://datasets/prep-test/jsonl",
                                            str(shared_data / "alpaca" / "identity.json")]
    assert files(sources[0]["paths"]) == ["alpaca/test-00000-of-00001.parquet"]
    assert sources[0]["counts"]["train"] == 2 * sources[0]["counts"]["accepted"] == 2 * 199


# --------------------------------------------------------------------------------------------------
# Online: the same code path against a server that answers as the Hub does


def test_online_pack_from_the_hub_to_s3_then_train_and_a_moved_branch_is_not_up_to_date(repos, tmp_path):
    """`prep pack hf://datasets/ORG/NAME --split train -o s3://bucket/shards`, `prep train s3://bucket/shards`;
    then main moves to a new commit and the rerun packs again, recording the new commit."""
    mix = repos["prep-test/mix"]
    moved = dict(mix, **{"README.md": mix["README.md"] + b"\nA later edit of the card.\n"})
    first, second = commit_id(mix), commit_id(moved)
    hub_repos = {"prep-test/mix": {"refs": {"main": first}, "commits": {first: mix, second: moved}}}
    with FakeHub(hub_repos) as hub, MotoServer() as s3:
        s3.client().create_bucket(Bucket=BUCKET)
        env = s3.env | {"HF_ENDPOINT": hub.url, "HF_HUB_CACHE": str(tmp_path / "hf"), "PREP_CACHE": str(tmp_path / "c")}
        pack = ("pack", "hf://datasets/prep-test/mix", "--subset", "alpaca", "--split", "train", "-o",
                f"s3://{BUCKET}/shards", "--max-len", "1024")
        done = prep(*pack, cwd=tmp_path, env=env, online=True)
        assert done.returncode == 0, done.stderr
        manifest = json.loads(s3.get(BUCKET, "shards/manifest.json"))
        assert {i["commit"] for i in manifest["inputs"]} == {first}
        done = prep("train", f"s3://{BUCKET}/shards", "-o", "out", "--max-steps", "2", "--batch-size", "2",
                    "--no-progress", cwd=tmp_path, env=env, online=True)
        assert done.returncode == 0, done.stderr
        assert json.loads(done.stdout.strip().splitlines()[-1])["step"] == 2

        done = prep(*pack, cwd=tmp_path, env=env, online=True)
        assert done.returncode == 0 and "up to date" in done.stdout, done.stderr
        hub_repos["prep-test/mix"]["refs"]["main"] = second
        done = prep(*pack, cwd=tmp_path, env=env, online=True)
        assert done.returncode == 1 and "--overwrite" in done.stderr  # not up to date: the data are at a new commit
        done = prep(*pack, "--overwrite", cwd=tmp_path, env=env, online=True)
        assert done.returncode == 0, done.stderr
        again = json.loads(s3.get(BUCKET, "shards/manifest.json"))
        assert {i["commit"] for i in again["inputs"]} == {second} and again["fingerprint"] != manifest["fingerprint"]
        assert again["shards"] == manifest["shards"]  # the same data files: the same shard bytes


def test_online_errors_gated_missing_repo_and_split(repos, tmp_path):
    files = repos["prep-test/jsonl"]
    commit = commit_id(files)
    hub_repos = {"prep-test/gated": {"refs": {"main": commit}, "commits": {commit: files}, "gated": True}}
    with FakeHub(hub_repos, token="hf_granted") as hub:
        env = {"HF_ENDPOINT": hub.url, "HF_HUB_CACHE": str(tmp_path / "hf")}
        work = tmp_path / "work"
        work.mkdir()
        done = prep("convert", "hf://datasets/prep-test/gated", "-o", "out.jsonl", cwd=work, env=env, online=True)
        assert one_error_line(done) == (
            f"error: hf://datasets/prep-test/gated@{commit}/train.jsonl: the dataset is gated: request access at "
            f"{hub.url}/datasets/prep-test/gated, then set HF_TOKEN (or run `hf auth login`)")
        done = prep("convert", "hf://datasets/prep-test/nope", "-o", "out.jsonl", cwd=work, env=env, online=True)
        assert one_error_line(done) == ("error: hf://datasets/prep-test/nope: no such dataset on the Hub (or it is "
                                        "private): check the id; if it is private, set HF_TOKEN")
        done = prep("convert", "hf://datasets/prep-test/gated", "--split", "test", "-o", "out.jsonl", cwd=work, env=env,
                    online=True)
        assert one_error_line(done) == ("error: hf://datasets/prep-test/gated: subset 'default' has no split 'test'; "
                                        "it has: train, validation")
        assert not list(work.iterdir())
        done = prep("convert", "hf://datasets/prep-test/gated", "-o", "out.jsonl", cwd=work,
                    env=env | {"HF_TOKEN": "hf_granted"}, online=True)
        assert done.returncode == 0 and "wrote 200 conversations" in done.stdout, done.stderr
        assert "hf_granted" not in done.stdout + done.stderr


def test_docstring_examples(monkeypatch):
    import doctest
    import importlib

    for module in ("prep.remote", "prep.hub"):
        assert doctest.testmod(importlib.import_module(module)).failed == 0
