"""Data that lives elsewhere: object-store and web URLs as inputs and outputs, and shard folders fetched from them.

Any fsspec URL works where a path does: `s3://`, `gs://`, `az://` (and `abfs://`), `https://`. The store's own
package does the talking (s3fs, gcsfs, adlfs, aiohttp: the `prep-sft[s3]`, `[gcs]`, `[azure]`, `[http]` extras),
with the credentials and endpoint it finds in the environment and config files as usual. Hub datasets
(`hf://datasets/...`) are resolved in prep.hub and read from the Hugging Face cache.

Three promises hold on stores too:
- credentials never leave the process: a URL is shown (in reports, rejects, manifests, errors) only through
  `display`, which masks `user:password@` and every query-string value;
- an output appears complete or not at all: files are written locally, uploaded under a temporary prefix and
  copied into place with the manifest last (`upload_folder`); a single file is one upload, which object stores
  publish whole;
- a shard folder URL is read from a local copy (`local_shards`), each file checked against the manifest's sha256.

Only the standard library is imported here at module level: `prep.load` and `prep.train` import this module, and
fsspec is imported the first time a URL is actually used.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import posixpath
import re
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from prep.contract import MANIFEST, SPLITS_FILE, SPLITS_FORMAT
from prep.errors import ConfigError, InputError, PrepError, ShardError

STREAM_BLOCK = 8 << 20  # bytes fetched per request while streaming an input: bounded memory, few round trips
_SCHEME = re.compile(r"^([a-zA-Z][a-zA-Z0-9+.\-]*)://")
_USERINFO = re.compile(r"([a-zA-Z][a-zA-Z0-9+.\-]*://)[^/@\s]*@")
_QUERY_VALUE = re.compile(r"([?&][^=&#\s/]+=)(?:\*\*\*|[^&#\s'\"]*)")  # "***" first: masking twice is a no-op
# scheme -> (package that fsspec needs for it, the prep-sft extra that installs it)
PACKAGES = {
    "s3": ("s3fs", "s3"), "s3a": ("s3fs", "s3"),
    "gs": ("gcsfs", "gcs"), "gcs": ("gcsfs", "gcs"),
    "az": ("adlfs", "azure"), "abfs": ("adlfs", "azure"), "abfss": ("adlfs", "azure"),
    "http": ("aiohttp", "http"), "https": ("aiohttp", "http"),
}  # fmt: skip
CREDENTIALS_HINT = {
    "s3": "set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or AWS_PROFILE with ~/.aws/credentials",
    "gs": "set GOOGLE_APPLICATION_CREDENTIALS or run `gcloud auth application-default login`",
    "az": "set AZURE_STORAGE_CONNECTION_STRING, or AZURE_STORAGE_ACCOUNT_NAME with AZURE_STORAGE_ACCOUNT_KEY",
}
# What tokenizers' save_pretrained writes: fetched by name where a folder cannot be listed (https://).
TOKENIZER_FILES = ("tokenizer_config.json", "tokenizer.json", "special_tokens_map.json", "added_tokens.json",
                   "vocab.json", "merges.txt", "tokenizer.model", "spiece.model", "sentencepiece.bpe.model",
                   "vocab.txt", "chat_template.jinja", "chat_template.json")
_SCHEME_FAMILY = {"s3a": "s3", "gcs": "gs", "abfs": "az", "abfss": "az"}
# Exception class names, matched along the MRO so that no store package is imported to classify its errors.
_NO_CREDENTIALS = {"NoCredentialsError", "PartialCredentialsError", "CredentialRetrievalError",
                   "DefaultCredentialsError", "ClientAuthenticationError", "RefreshError"}
_CONNECTION = {"EndpointConnectionError", "ConnectionClosedError", "ConnectTimeoutError", "ReadTimeoutError",
               "ClientConnectorError", "ServerDisconnectedError", "ClientPayloadError", "ClientOSError",
               "ResponseStreamingError", "IncompleteReadError", "ConnectionError", "TimeoutError",
               "ServiceRequestError", "ServiceResponseError", "TransportError"}
_shown: dict[str, str] = {}  # display form -> the URL itself (with its credentials), for this process only


def is_url(path: Any) -> bool:
    """True for `scheme://...` (a store, web or hub URL); local paths, including Windows drive paths, are not.

    >>> is_url("s3://bucket/data.jsonl"), is_url("data/train.jsonl"), is_url("C:\\\\data")
    (True, False, False)
    """
    return isinstance(path, str) and _SCHEME.match(path) is not None


def scheme(url: str) -> str:
    """The URL's scheme, lower-case.

    >>> scheme("S3://bucket/key")
    's3'
    """
    match = _SCHEME.match(url)
    return match.group(1).lower() if match else ""


def redact(text: str) -> str:
    """Mask credentials in every URL of a text: `user:password@` and query-string values.

    >>> redact("https://me:secret@host/a.jsonl?sig=abc&se=2030 failed")
    'https://***@host/a.jsonl?sig=***&se=*** failed'
    >>> redact("https://***@host/a.jsonl?sig=***: not found")
    'https://***@host/a.jsonl?sig=***: not found'
    """
    return _QUERY_VALUE.sub(r"\1***", _USERINFO.sub(r"\1***@", text))


def display(url: str) -> str:
    """The form of `url` to show and record (`redact`), remembered so that `real` can open it again.

    >>> real(display("https://host/a.jsonl?token=abc")) == "https://host/a.jsonl?token=abc"
    True
    """
    shown = redact(url)
    if shown != url:
        _shown[shown] = url
    return shown


def real(url: str) -> str:
    """The URL behind a `display` form (itself for URLs without credentials)."""
    return _shown.get(url, url)


def join(base: str, *parts: str) -> str:
    """Join path parts: with `/` under a URL, as os.path.join does under a local path.

    >>> join("s3://bucket/shards", "train", "manifest.json"), join("shards", "train")
    ('s3://bucket/shards/train/manifest.json', 'shards/train')
    """
    if is_url(base):
        return posixpath.join(base.rstrip("/"), *parts)
    return os.path.join(base, *parts)


def missing_package(url: str) -> ConfigError:
    """The error for a URL whose store package is not installed: names the package and the extra."""
    package, extra = PACKAGES.get(scheme(url), ("fsspec", "remote"))
    return ConfigError(f"{display(url)}: {scheme(url)}:// URLs need the {package} package: "
                       f"pip install 'prep-sft[{extra}]'")


def filesystem(url: str) -> tuple[Any, str]:
    """The fsspec filesystem for `url` and the path inside it, with no stale listing cached.

    Raises:
        ConfigError: fsspec or the store's package is missing, or the scheme is unknown.
    """
    try:
        from fsspec.core import url_to_fs
    except ImportError:
        raise missing_package(url) from None
    try:
        fs, path = url_to_fs(real(url))
    except ImportError:
        raise missing_package(url) from None
    except ValueError as e:
        raise ConfigError(f"{display(url)}: unsupported URL ({redact(str(e))}); "
                          "use s3://, gs://, az://, https:// or hf://datasets/ORG/NAME") from None
    fs.invalidate_cache()  # fsspec instances are shared and cache listings: another writer may have changed the store
    return fs, path


def remote_error(url: str, error: BaseException, *, writing: bool = False, kind: type[PrepError] = InputError,
                 where: str = "") -> PrepError:
    """One line for a failed store operation: the URL (credentials masked), what happened and what to do.

    >>> str(remote_error("s3://bucket/a.jsonl", FileNotFoundError("a.jsonl")))
    's3://bucket/a.jsonl: not found: no such object, or its bucket does not exist; check the URL'
    """
    if isinstance(error, PrepError):
        return error
    if isinstance(error, ImportError):
        return missing_package(url)
    names = {c.__name__ for c in type(error).__mro__}
    family = _SCHEME_FAMILY.get(scheme(url), scheme(url))
    if names & _NO_CREDENTIALS:
        hint = CREDENTIALS_HINT.get(family, "set the store's credentials in the environment")
        message = f"no credentials found for {family}://: {hint}"
    elif isinstance(error, PermissionError) or (names & {"AccessDenied", "HttpResponseError"} and "403" in str(error)):
        action = "write to" if writing else "read"
        message = (f"access denied: the credentials in use may not {action} it; check them (and the bucket's "
                   "policy), or set others")
    elif isinstance(error, FileNotFoundError):
        message = "not found: no such object, or its bucket does not exist; check the URL"
    elif names & _CONNECTION:
        message = (f"connection to the store failed {where}({type(error).__name__}); check the network and the "
                   "endpoint (e.g. AWS_ENDPOINT_URL), then rerun")
    else:
        message = f"{'write' if writing else 'read'} failed {where}({type(error).__name__}: {redact(str(error))})"
    shown = display(url)
    if kind is InputError:
        return InputError(message, path=shown)
    return kind(f"{shown}: {message}")


@contextlib.contextmanager
def translated(url: str, *, writing: bool = False, kind: type[PrepError] = InputError) -> Iterator[None]:
    """Turn any store error raised inside the block into `remote_error`'s one line."""
    try:
        yield
    except PrepError:
        raise
    except Exception as e:  # store packages raise their own hierarchies; remote_error classifies them by name
        raise remote_error(url, e, writing=writing, kind=kind) from None


# --------------------------------------------------------------------------------------------------
# Reading


def open_input(url: str, block_size: int | None = STREAM_BLOCK) -> IO[bytes]:
    """Open a URL for binary reading (errors as `remote_error`); `block_size` None keeps the store's default."""
    fs, path = filesystem(url)
    with translated(url):
        kwargs = {"block_size": block_size} if block_size else {}
        return fs.open(path, "rb", **kwargs)


def size(url: str) -> int:
    """Bytes of the object at `url` (0 when the store does not say)."""
    fs, path = filesystem(url)
    with translated(url):
        return int(fs.size(path) or 0)


def exists(url: str, kind: type[PrepError] = InputError) -> bool:
    """Whether an object (or a folder, i.e. a prefix holding objects) exists at `url`."""
    fs, path = filesystem(url)
    with translated(url, kind=kind):
        return bool(fs.exists(path))


def isdir(url: str) -> bool:
    """Whether `url` is a folder (a prefix holding objects)."""
    fs, path = filesystem(url)
    with translated(url):
        return bool(fs.isdir(path))


def read_bytes(url: str, kind: type[PrepError] = InputError) -> bytes:
    """The whole object at `url`."""
    fs, path = filesystem(url)
    with translated(url, kind=kind):
        return fs.cat_file(path)


def glob(pattern: str) -> list[str]:
    """The URLs of the objects matching a glob pattern (`s3://bucket/data/*.jsonl`), sorted, in display form."""
    fs, path = filesystem(pattern)
    with translated(pattern):
        found = fs.glob(path)
    prefix = scheme(real(pattern)) + "://"
    return sorted(display(prefix + p.lstrip("/")) if not is_url(p) else display(p) for p in found)


def stored_input(url: str) -> list[str]:
    """An input URL as the list of object URLs it names: a glob's matches, or the URL itself once it is found.

    Raises:
        InputError: nothing matches or the object does not exist (or any store error), naming the URL.
    """
    if any(c in url.split("?")[0].split("://", 1)[1] for c in "*?["):
        found = glob(url)
        if not found:
            raise InputError("no object matches this pattern", path=display(url))
        return found
    if not exists(url):
        raise InputError("not found: no such object, or its bucket does not exist; check the URL", path=display(url))
    return [display(url)]


def describe(url: str) -> dict[str, Any]:
    """Name, size and sha256 of a stored input (streamed once), as prep.pipeline records local inputs.

    A folder (a save_to_disk folder on a store) is hashed as local folders are: relative name and sha256 of
    each file, in sorted order.
    """
    fs, path = filesystem(url)
    with translated(url):
        if fs.isdir(path):
            digest, total = hashlib.sha256(), 0
            for file in sorted(fs.find(path)):
                name = posixpath.relpath(file, path.rstrip("/"))
                sha, n = _stream_sha256(fs, file)
                digest.update(name.encode() + b"\0" + sha.encode())
                total += n
            return {"path": display(url), "sha256": digest.hexdigest(), "bytes": total}
        sha, n = _stream_sha256(fs, path)
    return {"path": display(url), "sha256": sha, "bytes": n}


def _stream_sha256(fs: Any, path: str) -> tuple[str, int]:
    """sha256 and length of one object, read in blocks."""
    digest, n = hashlib.sha256(), 0
    with fs.open(path, "rb", block_size=STREAM_BLOCK) as f:
        while block := f.read(STREAM_BLOCK):
            digest.update(block)
            n += len(block)
    return digest.hexdigest(), n


# --------------------------------------------------------------------------------------------------
# Writing


def local_staging_root() -> Path:
    """Where outputs bound for a store are written before the upload: $PREP_TMPDIR, else the system temp folder."""
    root = Path(os.environ.get("PREP_TMPDIR") or tempfile.gettempdir())
    root.mkdir(parents=True, exist_ok=True)
    return root


def check_output_url(url: str, *, overwrite: bool, folder: bool) -> None:
    """Fail early, before any work: the store is reachable with write-worthy credentials, the bucket exists, and
    the output does not exist (or, with `overwrite`, is a file / a prep shard folder).

    Raises:
        OutputExistsError: it exists and may not (or must not) be replaced. PrepError: any store error.
    """
    from prep.errors import OutputExistsError

    if scheme(url) in ("http", "https"):
        raise ConfigError(f"{display(url)}: https:// URLs can be read, not written; write to s3://, gs:// or az://")
    fs, path = filesystem(url)
    bucket = path.split("/", 1)[0]
    with translated(url, writing=True, kind=PrepError):
        if not fs.exists(bucket):
            raise PrepError(f"{display(url)}: the bucket {bucket!r} does not exist (or these credentials cannot see "
                            "it): create it first")
        found = fs.exists(path)
        if found and folder and overwrite and not fs.exists(posixpath.join(path, MANIFEST)):
            raise OutputExistsError(f"{display(url)} exists and is not a prep shards folder (no manifest.json); "
                                    "refusing to replace it even with --overwrite: choose another output")
    if found and not overwrite:
        raise OutputExistsError(f"{display(url)} already exists; pass --overwrite to replace it")


@contextlib.contextmanager
def staged_file(url: str) -> Iterator[Path]:
    """Yield a local temporary file; on success upload it to `url` in one put (stores publish an object whole)."""
    fd, name = tempfile.mkstemp(prefix=".prep-upload-", suffix=".tmp", dir=local_staging_root())
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        fs, path = filesystem(url)
        with translated(url, writing=True, kind=PrepError):
            fs.put_file(str(tmp), path)
    finally:
        tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def staged_folder(url: str, *, overwrite: bool) -> Iterator[Path]:
    """Yield a local temporary folder; on success `upload_folder` it to `url`; always delete it after."""
    check_output_url(url, overwrite=overwrite, folder=True)
    tmp = Path(tempfile.mkdtemp(prefix=".prep-upload-", dir=local_staging_root()))
    try:
        yield tmp
        upload_folder(tmp, url, overwrite=overwrite)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def commit_order(names: list[str]) -> list[str]:
    """Relative file names in upload order: data first, then manifests from the deepest up (the top one last).

    >>> commit_order(["manifest.json", "train/manifest.json", "train/data-0.arrow", "dataset_dict.json"])
    ['train/data-0.arrow', 'dataset_dict.json', 'train/manifest.json', 'manifest.json']
    """
    return sorted(names, key=lambda n: (posixpath.basename(n) == MANIFEST, -n.count("/"), n))


def upload_folder(local: Path, url: str, *, overwrite: bool) -> None:
    """Publish a finished local folder at `url` so that readers never take a partial one for complete.

    Every file goes first under a temporary prefix beside the output (`.NAME.tmp-<id>/`); a failed or killed
    upload leaves only that prefix, and the output untouched. Then the output's old manifest is deleted (an old
    output stops counting as complete), its other old files are deleted, the new files are copied into place on
    the store (no bytes travel again) in `commit_order`, manifest.json last, and the temporary prefix is removed.

    Raises:
        PrepError: any store error, naming the URL.
    """
    fs, root = filesystem(url)
    root = root.rstrip("/")
    parent, name = posixpath.split(root)
    staging = posixpath.join(parent, f".{name}.tmp-{uuid.uuid4().hex[:12]}")
    names = commit_order([p.relative_to(local).as_posix() for p in local.rglob("*") if p.is_file()])
    with translated(url, writing=True, kind=PrepError):
        try:
            for rel in names:
                fs.put_file(str(local / rel), f"{staging}/{rel}")
            check_output_url(url, overwrite=overwrite, folder=True)  # another writer may have finished meanwhile
            _clear(fs, root)
            for rel in names:
                fs.copy(f"{staging}/{rel}", f"{root}/{rel}")
        except BaseException:
            _settle(fs)
            raise
        finally:
            with contextlib.suppress(Exception):  # best effort: a leftover prefix holds no manifest at the output
                fs.rm(staging, recursive=True)


def _settle(fs: Any, timeout: float = 30.0) -> None:
    """Wait (at most `timeout` s) for the requests still running on an async filesystem's event loop.

    An interrupted `put_file` (Ctrl-C) stops waiting, but its upload goes on in fsspec's loop thread; removing
    the temporary prefix before it lands would leave that object behind.
    """
    loop = getattr(fs, "loop", None)
    if loop is None or not getattr(loop, "is_running", lambda: False)():
        return

    async def pending() -> None:
        tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        if tasks:
            await asyncio.wait(tasks, timeout=timeout)

    with contextlib.suppress(Exception):
        asyncio.run_coroutine_threadsafe(pending(), loop).result(timeout + 5)


def _clear(fs: Any, root: str) -> None:
    """Delete an old output: its manifests first (top one first), then everything else."""
    if not fs.exists(root):
        return
    files = sorted(fs.find(root))
    manifests = sorted((f for f in files if posixpath.basename(f) == MANIFEST), key=lambda f: f.count("/"))
    for f in manifests:
        fs.rm_file(f)
    rest = [f for f in files if f not in set(manifests)]
    if rest:
        fs.rm(rest)
    fs.invalidate_cache(root)


# --------------------------------------------------------------------------------------------------
# Shard folders fetched into a local cache


def cache_root() -> Path:
    """Where shard folders read from URLs are kept: $PREP_CACHE, else $XDG_CACHE_HOME/prep, else ~/.cache/prep."""
    base = os.environ.get("PREP_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "prep")
    return Path(base) / "shards"


def local_shards(url: str) -> Path:
    """A local, checked copy of the shard folder at `url` (fetched on first use), to memory-map like any folder.

    Copies are content-addressed: one folder per manifest, `cache_root()/<sha256 of manifest.json>/`, so a
    rewritten output (new manifest) is a new copy and the same output read again costs one manifest request.
    Every shard file is downloaded under a temporary name, checked against the manifest's sha256 and only then
    renamed into place; the copy's manifest is written last. A folder with splits is a manifest,
    dataset_dict.json and links to each split's own copy. Processes of one machine (torchrun ranks) share the
    copies: a lock file per shard file makes one of them download it while the others wait.

    Raises:
        ShardError: no manifest at the URL (not a shard folder, or its writer did not finish), a file whose
            sha256 differs from the manifest's, or any store error, naming the URL.
    """
    if scheme(url) == "hf":
        raise ShardError(f"{display(url)}: shard folders are read from s3://, gs://, az:// or https:// URLs or "
                         "local folders; download a hub copy first (`hf download --repo-type dataset ...`)")
    manifest = _fetch_manifest(url)
    if _json(manifest, join(url, MANIFEST)).get("format") == SPLITS_FORMAT:
        return _local_splits(url, manifest)
    folder = cache_root() / hashlib.sha256(manifest).hexdigest()[:32]
    if not (folder / MANIFEST).is_file():
        _fetch_folder(url, folder, manifest)
    return folder


def _fetch_manifest(url: str) -> bytes:
    """The bytes of a shard folder URL's manifest.json."""
    file = join(url, MANIFEST)
    fs, path = filesystem(file)
    with translated(url, kind=ShardError):
        if not fs.exists(path):
            raise ShardError(f"{display(file)}: not found: not a shard folder, or its writer did not finish "
                             "(manifest.json is written last); rerun `prep pack`")
        return fs.cat_file(path)


def _local_splits(url: str, manifest: bytes) -> Path:
    """The local copy of a folder with splits: its manifest, dataset_dict.json and a link to each split's copy."""
    splits_file = join(url, SPLITS_FILE)
    splits = _json(read_bytes(splits_file, kind=ShardError), splits_file).get("splits", [])
    children = {}
    for split in splits:
        if not isinstance(split, str) or "/" in split or split in ("", ".", ".."):
            raise ShardError(f"{display(splits_file)}: {split!r} is not a plain split name; refusing it")
        children[split] = local_shards(join(url, split))
    key = hashlib.sha256(manifest + "".join(f"{s}={c.name};" for s, c in children.items()).encode())
    folder = cache_root() / key.hexdigest()[:32]
    if (folder / MANIFEST).is_file():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    _fetch_file(splits_file, folder / SPLITS_FILE, None)
    for split, child in children.items():
        with contextlib.suppress(FileExistsError):  # another rank linked it first
            os.symlink(os.path.join("..", child.name), folder / split, target_is_directory=True)
    _place(folder / MANIFEST, manifest)
    return folder


def _json(data: bytes, url: str) -> dict[str, Any]:
    """Parsed JSON of a fetched file, or a ShardError naming it."""
    try:
        value = json.loads(data)
    except ValueError as e:
        raise ShardError(f"{display(url)}: unreadable JSON: {e}") from None
    if not isinstance(value, dict):
        raise ShardError(f"{display(url)}: expected a JSON object")
    return value


def _fetch_folder(url: str, folder: Path, manifest_bytes: bytes) -> None:
    """Fetch one shard folder's files into the cache (shards checked by sha256), then its manifest (last)."""
    folder.mkdir(parents=True, exist_ok=True)
    manifest = _json(manifest_bytes, join(url, MANIFEST))
    for entry in manifest.get("shards", []):
        name = entry.get("file") if isinstance(entry, dict) else None
        if not isinstance(name, str) or "/" in name or "\\" in name or name in ("", ".", ".."):
            raise ShardError(f"{display(join(url, MANIFEST))}: {name!r} is not a plain file name; refusing it")
        _fetch_file(join(url, name), folder / name, entry.get("sha256"))
    sidecar = manifest.get("example_templates")  # sources with several templates (prep.example_templates)
    if isinstance(sidecar, dict):
        name = sidecar.get("file")
        if not isinstance(name, str) or "/" in name or "\\" in name or name in ("", ".", ".."):
            raise ShardError(f"{display(join(url, MANIFEST))}: {name!r} is not a plain file name; refusing it")
        _fetch_file(join(url, name), folder / name, sidecar.get("sha256"))
    for name in ("state.json", "dataset_info.json"):
        _fetch_file(join(url, name), folder / name, None, optional=True)
    tokenizer = manifest.get("tokenizer") if isinstance(manifest.get("tokenizer"), dict) else {}
    _fetch_tokenizer(url, folder, str(tokenizer.get("path", "tokenizer")))
    _place(folder / MANIFEST, manifest_bytes)


def _fetch_tokenizer(base: str, local: Path, name: str) -> None:
    """The saved tokenizer folder (its files are checked by `prep verify` through the manifest's fingerprint).
    A web server lists no folders: there the files `save_pretrained` writes are asked for by name."""
    if "/" in name or name in ("", ".", ".."):
        raise ShardError(f"{display(join(base, MANIFEST))}: tokenizer path {name!r} is not a plain folder name")
    if scheme(base) in ("http", "https"):
        for file in TOKENIZER_FILES:
            _fetch_file(join(base, name, file), local / name / file, None, optional=True)
        return
    fs, path = filesystem(join(base, name))
    with translated(base, kind=ShardError):
        files = sorted(fs.find(path)) if fs.exists(path) else []
    for file in files:
        rel = posixpath.relpath(file, path.rstrip("/"))
        if rel.startswith(".."):
            continue
        _fetch_file(join(base, name, rel), local / name / rel, None)


def _fetch_file(url: str, target: Path, sha256: str | None, optional: bool = False) -> None:
    """Download one file to `target` through a temporary name, checking its sha256; skip it when already there."""
    if target.is_file():
        return
    target.parent.mkdir(parents=True, exist_ok=True)
    with _lock(target.parent / f".{target.name}.lock"):
        if target.is_file():  # another process fetched it while we waited
            return
        fs, path = filesystem(url)
        tmp = target.parent / f".{target.name}.part-{os.getpid()}"
        try:
            with translated(url, kind=ShardError):
                if optional and not fs.exists(path):
                    return
                fs.get_file(path, str(tmp))
            if sha256 is not None:
                from prep.write import sha256_file

                found = sha256_file(tmp)
                if found != sha256:
                    raise ShardError(f"{display(url)}: sha256 {found[:16]}… differs from the manifest's "
                                     f"{str(sha256)[:16]}…: the object changed after the manifest was written "
                                     "(a concurrent writer?) or is damaged; rerun once the writer has finished")
            os.replace(tmp, target)
        finally:
            tmp.unlink(missing_ok=True)


def _place(target: Path, data: bytes) -> None:
    """Write a small file through a temporary name and rename it into place."""
    tmp = target.parent / f".{target.name}.part-{os.getpid()}"
    tmp.write_bytes(data)
    os.replace(tmp, target)


@contextlib.contextmanager
def _lock(path: Path) -> Iterator[None]:
    """An exclusive lock on `path` between processes of this machine (no-op where fcntl is missing)."""
    try:
        import fcntl
    except ImportError:  # Windows: concurrent fetches both download; the renames keep the copy whole
        yield
        return
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def is_shard_folder(path: str) -> bool:
    """Whether a local folder or a store URL holds a manifest.json (a shard folder, possibly with splits)."""
    if not is_url(path):
        return os.path.isfile(os.path.join(path, MANIFEST))
    return scheme(path) != "hf" and exists(join(path, MANIFEST), kind=ShardError)


def remote_strays(url: str, listed: list[str]) -> list[str] | None:
    """Names of `.arrow` files at a shard folder URL that its manifest does not list (for `prep verify`); None
    for https:// URLs, whose folders cannot be listed."""
    if scheme(url) in ("http", "https"):
        return None
    fs, path = filesystem(url)
    with translated(url, kind=ShardError):
        names = {posixpath.basename(p) for p in fs.glob(posixpath.join(path.rstrip("/"), "*.arrow"))}
    return sorted(names - set(listed))
