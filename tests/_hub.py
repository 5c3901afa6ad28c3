"""Hugging Face Hub test doubles built from real data: a cache laid out as huggingface_hub writes it, and a
local HTTP server that answers the Hub's API the way huggingface_hub expects (repo info, tree listing, resolve),
so the real client code runs offline against the cache and online against 127.0.0.1."""

from __future__ import annotations

import hashlib
import io
import json
import os
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlparse

import pyarrow as pa
import pyarrow.parquet as pq

LFS_SUFFIXES = (".parquet", ".arrow", ".gz")  # stored through LFS on the Hub: etag = sha256 of the content


def git_blob_id(data: bytes) -> str:
    """The git blob sha1 the Hub gives a regular (non-LFS) file as its etag."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def etag(path: str, data: bytes) -> str:
    """The etag huggingface_hub names a blob by: sha256 for LFS files, the git blob id otherwise."""
    return hashlib.sha256(data).hexdigest() if path.endswith(LFS_SUFFIXES) else git_blob_id(data)


def commit_id(files: dict[str, bytes], salt: str = "") -> str:
    """A stable 40-hex commit id for a set of files."""
    digest = hashlib.sha1(salt.encode())
    for name in sorted(files):
        digest.update(name.encode() + b"\0" + files[name])
    return digest.hexdigest()


def tree_entry(path: str, data: bytes) -> dict:
    """One file of the Hub's tree API answer (and of huggingface_hub's trees/<commit>.json cache)."""
    entry = {"type": "file", "path": path, "size": len(data), "oid": git_blob_id(data)}
    if path.endswith(LFS_SUFFIXES):
        entry["lfs"] = {"oid": hashlib.sha256(data).hexdigest(), "size": len(data), "pointerSize": 134}
    return entry


def lay_out_cache(cache: Path, repo: str, files: dict[str, bytes], *, revision: str = "main",
                  commit: str | None = None, tree: bool = True, only: list[str] | None = None) -> str:
    """Write `files` of a dataset repo into a Hugging Face cache exactly as huggingface_hub does: refs/REVISION
    holds the commit, snapshots/COMMIT/PATH are relative symlinks to blobs/ETAG, and (with `tree`) the listing
    in trees/COMMIT.json. `only` limits which files are present (a partial download)."""
    commit = commit or commit_id(files)
    storage = cache / ("datasets--" + repo.replace("/", "--"))
    ref = storage / "refs" / revision
    ref.parent.mkdir(parents=True, exist_ok=True)
    ref.write_text(commit)
    for name, data in files.items():
        if only is not None and name not in only:
            continue
        blob = storage / "blobs" / etag(name, data)
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = storage / "snapshots" / commit / name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    if tree:
        entries = {}
        for name, data in sorted(files.items()):
            entry = {"size": len(data), "blob_id": git_blob_id(data)}
            if name.endswith(LFS_SUFFIXES):
                entry.update(lfs_sha256=hashlib.sha256(data).hexdigest(), lfs_size=len(data))
            entries[name] = entry
        listing = storage / "trees" / f"{commit}.json"
        listing.parent.mkdir(parents=True, exist_ok=True)
        listing.write_text(json.dumps({"format_version": 1, "files": entries}, indent=1))
    return commit


def parquet_bytes(rows: list[dict]) -> bytes:
    """Rows as a Parquet file's bytes."""
    buffer = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows), buffer)
    return buffer.getvalue()


def jsonl_bytes(rows: list[dict]) -> bytes:
    """Rows as JSON Lines bytes."""
    return b"".join(json.dumps(r, ensure_ascii=False).encode() + b"\n" for r in rows)


CARD = """---
license: apache-2.0
configs:
- config_name: alpaca
  data_files:
  - split: train
    path: alpaca/train-*.parquet
  - split: test
    path: alpaca/test-*.parquet
- config_name: sharegpt
  default: true
  data_files:
  - split: train
    path: sharegpt/train.jsonl
---
# A test mixture
Real records from ../shared/data in two subsets.
"""


def mixture_repo(shared_data: Path) -> dict[str, bytes]:
    """A repo with README `configs:`: subset alpaca (Parquet, train in two shards + test) and subset sharegpt
    (JSON Lines, the default), all real records."""
    alpaca = json.loads((shared_data / "alpaca" / "alpaca_en_demo.json").read_text())
    sharegpt = (shared_data / "sharegpt" / "sharegpt_zh_1K_format.jsonl").read_bytes().splitlines(keepends=True)
    return {
        "README.md": CARD.encode(),
        ".gitattributes": b"*.parquet filter=lfs diff=lfs merge=lfs -text\n",
        "alpaca/train-00000-of-00002.parquet": parquet_bytes(alpaca[:400]),
        "alpaca/train-00001-of-00002.parquet": parquet_bytes(alpaca[400:800]),
        "alpaca/test-00000-of-00001.parquet": parquet_bytes(alpaca[800:]),
        "sharegpt/train.jsonl": b"".join(sharegpt[:300]),
    }


def layout_repo(shared_data: Path) -> dict[str, bytes]:
    """A repo without configs in the Hub's default layout: data/train-*.parquet and data/test-*.parquet."""
    alpaca = json.loads((shared_data / "alpaca" / "alpaca_zh_demo.json").read_text())
    return {
        "README.md": b"---\nlicense: apache-2.0\n---\n# default layout\n",
        "data/train-00000-of-00001.parquet": parquet_bytes(alpaca[:900]),
        "data/test-00000-of-00001.parquet": parquet_bytes(alpaca[900:]),
    }


def jsonl_repo(shared_data: Path) -> dict[str, bytes]:
    """A repo of split files at its root (train.jsonl, validation.jsonl.gz-free JSON Lines), no README."""
    lines = (shared_data / "sharegpt" / "sharegpt_zh_1K_format.jsonl").read_bytes().splitlines(keepends=True)
    return {"train.jsonl": b"".join(lines[:200]), "validation.jsonl": b"".join(lines[200:250])}


class FakeHub:
    """A local HTTP server answering the Hub endpoints huggingface_hub calls for dataset repos.

    repos: {repo_id: {"refs": {revision: commit}, "commits": {commit: {path: bytes}}, "gated": bool}}.
    A gated repo serves data files only with `Authorization: Bearer <token>`; README.md stays public.
    """

    def __init__(self, repos: dict, token: str = "hf_test_token"):
        self.repos, self.token, self.requests = repos, token, []
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # quiet
                pass

            def do_HEAD(self):
                hub.answer(self, head=True)

            def do_GET(self):
                hub.answer(self, head=False)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> FakeHub:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()

    def _commit(self, repo: dict, revision: str) -> str | None:
        if revision in repo["commits"]:
            return revision
        return repo["refs"].get(revision)

    def answer(self, h: BaseHTTPRequestHandler, head: bool) -> None:
        path = urlparse(h.path).path
        self.requests.append(path)
        parts = [unquote(p) for p in path.strip("/").split("/")]
        if parts[:2] == ["api", "datasets"] and len(parts) >= 6:
            repo_id, kind, revision = f"{parts[2]}/{parts[3]}", parts[4], parts[5]
            return self._api(h, repo_id, kind, revision)
        if parts[:1] == ["datasets"] and len(parts) >= 6 and parts[3] == "resolve":
            repo_id, revision, file = f"{parts[1]}/{parts[2]}", parts[4], "/".join(parts[5:])
            return self._resolve(h, repo_id, revision, file, head)
        self._error(h, 404, "RepoNotFound")

    def _repo_commit(self, h, repo_id: str, revision: str) -> tuple[dict, str] | None:
        """The repo and the commit `revision` names, or None once the Hub's error is sent."""
        repo = self.repos.get(repo_id)
        if repo is None:
            self._error(h, 401, "RepoNotFound")
            return None
        commit = self._commit(repo, revision)
        if commit is None:
            self._error(h, 404, "RevisionNotFound")
            return None
        return repo, commit

    def _api(self, h, repo_id: str, kind: str, revision: str) -> None:
        found = self._repo_commit(h, repo_id, revision)
        if found is None:
            return None
        repo, commit = found
        files = repo["commits"][commit]
        if kind == "revision":
            body = {"id": repo_id, "sha": commit, "private": False, "gated": "auto" if repo.get("gated") else False,
                    "siblings": [{"rfilename": p} for p in sorted(files)]}
        elif kind == "tree":
            body = [tree_entry(p, files[p]) for p in sorted(files)]
        else:
            return self._error(h, 404, "EntryNotFound")
        self._send(h, 200, json.dumps(body).encode(), {"Content-Type": "application/json"})

    def _resolve(self, h, repo_id: str, revision: str, file: str, head: bool) -> None:
        found = self._repo_commit(h, repo_id, revision)
        if found is None:
            return None
        repo, commit = found
        if repo.get("gated") and file != "README.md" and h.headers.get("Authorization") != f"Bearer {self.token}":
            return self._error(h, 401, "GatedRepo")
        data = repo["commits"][commit].get(file)
        if data is None:
            return self._error(h, 404, "EntryNotFound")
        headers = {"X-Repo-Commit": commit, "ETag": f'"{etag(file, data)}"', "Content-Length": str(len(data))}
        self._send(h, 200, b"" if head else data, headers, length=len(data))

    def _error(self, h, status: int, code: str) -> None:
        body = json.dumps({"error": code}).encode()
        self._send(h, status, body, {"X-Error-Code": code, "X-Error-Message": code,
                                     "Content-Type": "application/json"})

    @staticmethod
    def _send(h, status: int, body: bytes, headers: dict, length: int | None = None) -> None:
        h.send_response(status)
        for key, value in headers.items():
            h.send_header(key, value)
        if "Content-Length" not in headers:
            h.send_header("Content-Length", str(length if length is not None else len(body)))
        h.end_headers()
        if body:
            h.wfile.write(body)
