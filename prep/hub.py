"""Hugging Face Hub datasets as inputs: `hf://datasets/ORG/NAME[@REVISION][/PATH]`.

Without a PATH the URL names a dataset: a subset (config) and a split are resolved to data files by the Hub's
own dataset layout rules, with the `datasets` library's public functions (`MetadataConfigs` for the README's
`configs:`, `sanitize_patterns` for their `data_files`, `get_data_patterns` for the default layouts such as
`data/train-*.parquet` or `train.jsonl`, and `DataFilesPatternsList.resolve`), applied to the repo's file
listing. With a PATH (a file or a glob) it names those files of the repo.

Everything that touches the Hub goes through huggingface_hub, online or offline alike: `snapshot_download`
resolves the revision to a commit and caches the file listing and README, `get_cached_repo_tree` reads that
listing back, `hf_hub_download` fetches each data file into the Hugging Face cache (HF_HOME / HF_HUB_CACHE),
with HF_TOKEN, HF_ENDPOINT and HF_HUB_OFFLINE honoured as usual. Every resolved file is named by a URL pinned
to the commit (`hf://datasets/ORG/NAME@<sha>/data/train-00000-of-00001.parquet`), which is what rejects, reports
and manifests record; prep's own readers then stream the cached file.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prep.errors import ConfigError, InputError, PrepError

SYNTAX = "hf://datasets/ORG/NAME[@REVISION][/PATH]"
PARQUET_EXPORT = "refs/convert/parquet"  # the Hub's automatic Parquet export: CONFIG/SPLIT/*.parquet
_URL = re.compile(r"^hf://datasets/(?P<repo>[^/@]+/[^/@]+)(?:@(?P<rev>refs/convert/parquet|refs/pr/\d+|[^/]+))?"
                  r"(?:/(?P<path>.*))?$")
_COMMIT = re.compile(r"^[0-9a-f]{40}$")
# File suffixes prep reads (each also compressed: datasets' extension check looks at every suffix of the name).
READABLE = [".jsonl", ".ndjson", ".json", ".csv", ".parquet", ".arrow"]
REPO_FILES = ["README.md", ".huggingface.yaml"]  # what datasets reads besides data files (the card and its yaml)


@dataclass(frozen=True)
class HubRef:
    """A parsed hub URL: the dataset repo, the revision (branch, tag or commit; None = main) and a path in it."""

    repo: str
    revision: str | None
    path: str

    def pinned(self, commit: str, file: str) -> str:
        """The URL of one file of the repo at a commit."""
        return f"hf://datasets/{self.repo}@{commit}/{file}"


def is_hub(path: Any) -> bool:
    """True for `hf://` URLs.

    >>> is_hub("hf://datasets/HuggingFaceH4/no_robots"), is_hub("s3://bucket/x")
    (True, False)
    """
    return isinstance(path, str) and path.lower().startswith("hf://")


def parse(url: str) -> HubRef:
    """Split a hub URL into repo, revision and path.

    Raises:
        ConfigError: not of the form hf://datasets/ORG/NAME[@REVISION][/PATH].

    >>> parse("hf://datasets/HuggingFaceH4/no_robots@v1.0/data/train.parquet")
    HubRef(repo='HuggingFaceH4/no_robots', revision='v1.0', path='data/train.parquet')
    >>> parse("hf://datasets/org/name@refs%2Fconvert%2Fparquet").revision
    'refs/convert/parquet'
    """
    match = _URL.match(url.replace("%2F", "/").replace("%2f", "/"))
    if not match:
        raise ConfigError(f"{url}: not a hub dataset URL; expected {SYNTAX} (models and spaces are not inputs)")
    return HubRef(match["repo"], match["rev"] or None, (match["path"] or "").strip("/"))


def resolve(url: str, subset: str | None = None, split: str | None = None) -> list[str]:
    """The data files a hub URL names, as URLs pinned to the resolved commit, in the order datasets reads them.

    Args:
        url: hf://datasets/ORG/NAME[@REVISION][/PATH].
        subset: the config (README `configs:` name); default: the dataset's default config.
        split: a split name, or several joined by "+"; default: the only split, else "train".

    Raises:
        InputError: unknown repo, revision, subset or split, a gated repo without access, offline with
            nothing cached, or no readable data files, each naming the URL and what to do.

    >>> resolve("hf://datasets/HuggingFaceH4/no_robots", split="train")  # doctest: +SKIP
    ['hf://datasets/HuggingFaceH4/no_robots@e6f9a4ac.../data/train-00000-of-00001.parquet']
    """
    ref = parse(url)
    if ref.path and (subset is not None or split is not None):
        raise ConfigError(f"{url}: names files of the repo; --subset/--split apply to a whole dataset "
                          f"(hf://datasets/{ref.repo}[@REVISION])")
    commit, files, snapshot = _listing(ref)
    with _mirror(files) as root:
        if ref.path:
            chosen = _matching(ref, root)
        else:
            chosen = _split_files(ref, root, _card_configs(ref, snapshot), subset, split)
    return [ref.pinned(commit, f) for f in chosen]


def local_file(url: str) -> str:
    """The cached local copy of one pinned file URL, downloaded through huggingface_hub when missing.

    Raises:
        InputError: as `resolve`, naming the URL.
    """
    ref = parse(url)
    from huggingface_hub import hf_hub_download

    with _hub_errors(url, ref):
        return hf_hub_download(ref.repo, ref.path, repo_type="dataset", revision=ref.revision)


def commit_of(url: str) -> str | None:
    """The commit a pinned hub URL names (None when its revision is not a commit sha).

    >>> commit_of("hf://datasets/o/n@" + "a" * 40 + "/train.jsonl") == "a" * 40
    True
    """
    revision = parse(url).revision
    return revision if revision and _COMMIT.match(revision) else None


# --------------------------------------------------------------------------------------------------
# The repo's listing, card and layout


def _listing(ref: HubRef) -> tuple[str, list[str], Path]:
    """(commit, every file path of the repo at that commit, the local snapshot folder holding the card)."""
    from huggingface_hub import snapshot_download

    url = f"hf://datasets/{ref.repo}" + (f"@{ref.revision}" if ref.revision else "")
    with _hub_errors(url, ref), _quiet_hub_logs():
        snapshot = Path(snapshot_download(ref.repo, repo_type="dataset", revision=ref.revision,
                                          allow_patterns=REPO_FILES))
        commit = snapshot.name
        files = _cached_listing(ref, commit)
    if files is None:  # a cache written without the listing: the files it holds are all we know
        files = [p.relative_to(snapshot).as_posix() for p in snapshot.rglob("*") if p.is_file()]
    return commit, sorted(files), snapshot


def _cached_listing(ref: HubRef, commit: str) -> list[str] | None:
    """The repo's file listing at `commit` as snapshot_download cached it (None when it is not cached). Before
    huggingface_hub cached listings, online runs ask the Hub for it."""
    from huggingface_hub import constants

    try:
        from huggingface_hub import get_cached_repo_tree
        from huggingface_hub.errors import CachedRepoTreeNotFoundError
    except ImportError:  # an older huggingface_hub
        if constants.HF_HUB_OFFLINE:
            return None
        from huggingface_hub import HfApi

        return HfApi().list_repo_files(ref.repo, repo_type="dataset", revision=commit)
    try:
        return [f.path for f in get_cached_repo_tree(ref.repo, repo_type="dataset", revision=commit)]
    except CachedRepoTreeNotFoundError:
        return None


def _card_configs(ref: HubRef, snapshot: Path) -> Any:
    """The README's `configs:` (merged with `.huggingface.yaml`) as datasets' MetadataConfigs; for the Parquet
    export revision, one config per top-level folder, as the Hub's export is laid out."""
    from datasets.utils.metadata import MetadataConfigs
    from huggingface_hub import DatasetCard, DatasetCardData

    if ref.revision == PARQUET_EXPORT:
        return None
    card = snapshot / "README.md"
    data = DatasetCard.load(card).data if card.is_file() else DatasetCardData()
    extra = snapshot / ".huggingface.yaml"
    if extra.is_file():
        import yaml

        merged = data.to_dict() | (yaml.safe_load(extra.read_text(encoding="utf-8")) or {})
        data = DatasetCardData(**merged)
    try:
        return MetadataConfigs.from_dataset_card_data(data)
    except ValueError as e:
        raise InputError(f"the README's `configs:` are invalid ({e})", path=f"hf://datasets/{ref.repo}") from None


@contextlib.contextmanager
def _mirror(files: list[str]) -> Iterator[Path]:
    """A temporary folder with an empty file for every repo path, so datasets' pattern functions can glob it."""
    with tempfile.TemporaryDirectory(prefix="prep-hub-") as tmp:
        root = Path(tmp)
        for name in files:
            target = root / name
            target.parent.mkdir(parents=True, exist_ok=True)
            target.touch()
        yield root


def _matching(ref: HubRef, root: Path) -> list[str]:
    """Repo files named by the URL's path: the file itself, or a glob's matches (datasets' glob rules)."""
    from datasets.data_files import resolve_pattern

    try:
        found = resolve_pattern(ref.path, base_path=str(root))
    except FileNotFoundError:
        raise InputError("no file of the repo matches this path", path=f"hf://datasets/{ref.repo}/{ref.path}") from None
    return [Path(f).relative_to(root).as_posix() for f in found]


def _split_files(ref: HubRef, root: Path, configs: Any, subset: str | None, split: str | None) -> list[str]:
    """The data files of one subset and split(s), as `datasets.load_dataset` would choose them."""
    from datasets.data_files import DataFilesPatternsList, EmptyDatasetError, get_data_patterns, sanitize_patterns

    where = f"hf://datasets/{ref.repo}" + (f"@{ref.revision}" if ref.revision else "")
    name, params = _subset(ref, root, configs, subset, where)
    base = root / params["data_dir"] if params.get("data_dir") else root
    try:
        found = (sanitize_patterns(params["data_files"]) if params.get("data_files") is not None
                 else get_data_patterns(str(base)))
    except (EmptyDatasetError, FileNotFoundError):
        raise InputError(f"subset {name!r} holds no data files", path=where) from None
    patterns = {str(split_name): value for split_name, value in found.items()}  # datasets' NamedSplit keys -> str
    files: list[str] = []
    for one in _splits(patterns, split, name, where):
        try:
            found = DataFilesPatternsList.from_patterns(patterns[one], allowed_extensions=READABLE).resolve(str(base))
        except FileNotFoundError as e:
            raise InputError(f"subset {name!r}, split {one!r}: {e}", path=where) from None
        if not found:
            raise InputError(f"subset {name!r}, split {one!r}: no data file prep can read ({', '.join(READABLE)}, "
                             "each optionally compressed)", path=where)
        files += [Path(f).relative_to(root).as_posix() for f in found]
    return files


def _subset(ref: HubRef, root: Path, configs: Any, subset: str | None, where: str) -> tuple[str, dict[str, Any]]:
    """The chosen config's name and parameters (data_files, data_dir)."""
    if configs is None:  # the Parquet export: CONFIG/SPLIT/NNNN.parquet
        names = sorted(p.name for p in root.iterdir() if p.is_dir())
        configs = {n: {"data_dir": n} for n in names}
        default = "default" if "default" in configs else (names[0] if len(names) == 1 else None)
    elif configs:
        try:
            default = configs.get_default_config_name()
        except ValueError as e:
            raise InputError(f"the README's `configs:` are invalid ({e})", path=where) from None
    else:
        configs, default = {"default": {}}, "default"
    name = subset or default
    if name is None:
        raise InputError(f"has several subsets ({', '.join(configs)}) and none is the default: choose one with "
                         "--subset (recipe: `subset:`)", path=where)
    if name not in configs:
        raise InputError(f"no subset {name!r}; it has: {', '.join(configs)}", path=where)
    return name, dict(configs[name])


def _splits(patterns: dict[str, Any], split: str | None, subset: str, where: str) -> list[str]:
    """The split names asked for: `split` ("a+b" for several), else the only split, else "train"."""
    available = list(patterns)
    if split is None:
        if len(available) == 1 or "train" in available:
            return [available[0] if len(available) == 1 else "train"]
        raise InputError(f"subset {subset!r} has splits {', '.join(available)}: choose one with --split "
                         "(recipe: `split:`)", path=where)
    wanted = [s.strip() for s in split.split("+")]
    for one in wanted:
        if "[" in one:
            raise ConfigError(f"--split {split}: slices are not supported; give whole splits (a+b joins them)")
        if one not in available:
            raise InputError(f"subset {subset!r} has no split {one!r}; it has: {', '.join(available)}", path=where)
    return wanted


# --------------------------------------------------------------------------------------------------
# Errors


@contextlib.contextmanager
def _hub_errors(url: str, ref: HubRef) -> Iterator[None]:
    """Turn huggingface_hub's errors into one InputError naming the URL and what to do."""
    try:
        yield
    except PrepError:
        raise
    except Exception as e:  # huggingface_hub and httpx raise many classes; hub_message sorts them by name
        raise InputError(hub_message(e, ref), path=url) from None


def hub_message(error: BaseException, ref: HubRef) -> str:
    """What a huggingface_hub error means for the user, in one line, without any token."""
    from huggingface_hub import constants

    names = {c.__name__ for c in type(error).__mro__}
    page = f"{constants.ENDPOINT}/datasets/{ref.repo}"
    token = bool(os.environ.get("HF_TOKEN") or _stored_token())
    offline = constants.HF_HUB_OFFLINE
    if "GatedRepoError" in names:
        if token:
            return f"the dataset is gated and the token in use has no access: request access at {page}"
        return f"the dataset is gated: request access at {page}, then set HF_TOKEN (or run `hf auth login`)"
    if "RepositoryNotFoundError" in names:
        hint = "check the id, and the token's access" if token else "check the id; if it is private, set HF_TOKEN"
        return f"no such dataset on the Hub (or it is private): {hint}"
    if "RevisionNotFoundError" in names:
        return f"no revision {ref.revision!r} (branch, tag or commit) in this dataset"
    if "RemoteEntryNotFoundError" in names:
        return f"no file {ref.path!r} at this revision"
    if names & {"LocalEntryNotFoundError", "OfflineModeIsEnabled"}:
        if offline:
            return (f"offline (HF_HUB_OFFLINE=1) and not in the Hugging Face cache ({constants.HF_HUB_CACHE}): "
                    "run once online to download it, or point HF_HUB_CACHE at a cache that holds it")
        return "the Hub cannot be reached and nothing is cached: check the network (and HF_ENDPOINT), then rerun"
    if "HfHubHTTPError" in names:
        status = getattr(getattr(error, "response", None), "status_code", None)
        if status == 401:
            return "the Hub refused the token: check HF_TOKEN (or `hf auth login`)"
        return f"the Hub answered HTTP {status}: retry later"
    if names & {"ConnectError", "TimeoutException", "NetworkError", "ConnectionError", "TimeoutError"}:
        return f"the Hub cannot be reached ({type(error).__name__}): check the network (and HF_ENDPOINT), then rerun"
    from prep.remote import redact

    return f"hub request failed ({type(error).__name__}: {redact(str(error))})"


def _stored_token() -> str | None:
    """The token `hf auth login` stored, if any (never shown; only tells whether one is in use)."""
    with contextlib.suppress(Exception):
        from huggingface_hub import get_token

        return get_token()
    return None


@contextlib.contextmanager
def _quiet_hub_logs() -> Iterator[None]:
    """Hide huggingface_hub's warnings during resolution (e.g. a repo without README: "No files matched")."""
    logger = logging.getLogger("huggingface_hub")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)
