"""`prep pack`: inputs → conversations → exact encoded examples → packed rows → Arrow shards.

The stages stream: conversations are converted and encoded batch by batch, encoded examples are spilled
to disk (prep.spill), only their lengths stay in memory, the whole data set is planned at once
(prep.pack) and the shards are written atomically (prep.write). Rejected records and examples go to
`shards/rejects.jsonl`, and every one of them is counted.

A recipe (prep.recipe) mixes several sources; the plain command line is the one-source mixture of weight
1.0 and takes the same path. Per source: contents an earlier source had are dropped (and counted), the
validation contents are held out, and the rest is weighted. A source that is weighted or split is held in
memory as conversations (not tokens) until its choices are made; a weight-1.0 unsplit source streams.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prep import __version__
from prep.contract import FORMAT_VERSION, REJECTS_FILE, SPLITS, SPLITS_FILE, SPLITS_FORMAT
from prep.convert import relaxed_gc
from prep.encode import EncodeResult, Encoder
from prep.errors import AccountingError, ConfigError, PrepError, flag_error
from prep.fieldmap import parse_fields
from prep.pack import padded_lengths, plan_bfd, plan_unpacked, shuffle_rows, with_padding
from prep.read import expand_inputs
from prep.remote import is_url, join
from prep.mixture import SourceTally, holds_out, mixture_sources, split_of
from prep.recipe import load_recipe
from prep.render import Template, load_template, template_sha256, template_to_dict
from prep.report import Report
from prep.spill import ExampleStore
from prep.tokenizer import (
    DEFAULT_TOKENIZER_NAME,
    DEFAULT_TOKENIZER_NOTICE,
    MarkerCheck,
    check_markers,
    load_tokenizer,
    register_markers,
    save_tokenizer,
    tokenizer_fingerprint,
)
from prep.write import check_output, parse_size, sha256_file, staging_dir, write_json, write_shards
from schemas.conversation import Conversation
from schemas.pack_config import PackConfig
from schemas.recipe import Source
from schemas.reject import Reject

# Options that change the shards' bytes; output/overwrite/strict do not.
# subset/split are left out as well: the data files they choose are among the inputs.
_FINGERPRINT_EXCLUDE = {"inputs", "output", "overwrite", "strict", "batch_size", "batch_bytes", "workers", "recipe",
                        "subset", "split"}


@dataclass
class PackReport:
    """What `pack_shards` did: input accounting, example counts (all splits and per split), per-source
    counts of a mixture, packing, the manifest and notices."""

    output: str
    up_to_date: bool
    inputs: Report
    manifest: dict[str, Any]
    counts: Counter[str] = field(default_factory=Counter)
    rejected: Counter[str] = field(default_factory=Counter)
    markers: list[MarkerCheck] = field(default_factory=list)
    notices: list[str] = field(default_factory=list)
    template_markers: dict[str, list[MarkerCheck]] = field(default_factory=dict)  # every template, when several
    sources: list[dict[str, Any]] = field(default_factory=list)
    split_counts: dict[str, Counter[str]] = field(default_factory=lambda: {s: Counter() for s in SPLITS})
    split_rejected: dict[str, Counter[str]] = field(default_factory=lambda: {s: Counter() for s in SPLITS})
    split_manifests: dict[str, dict[str, Any]] = field(default_factory=dict)


@dataclass
class _Run:
    """Everything one pack run shares between its steps."""

    config: PackConfig
    sources: list[Source]
    tokenizer: Any
    templates: dict[str, Template]
    added: list[str]
    inputs: list[dict[str, Any]]
    fingerprint: str
    split: bool

    @property
    def template(self) -> Template:
        """The run's template (a source may override it)."""
        return self.templates[self.config.template]

    def template_of(self, source: Source) -> str:
        """The template (as given: a name or a file) that renders a source's examples."""
        return source.template or self.config.template

    @property
    def several_templates(self) -> bool:
        """Sources use more than one template: the shards say which example used which."""
        return len(self.templates) > 1


def pack_shards(config: PackConfig, progress: bool = False) -> PackReport:
    """Convert, encode, pack and write shards for `config.inputs` (or the sources of `config.recipe`).

    The plain command line is a one-source mixture of weight 1.0. A mixture removes contents already seen
    in an earlier source, splits each source (validation held out by content hash), weights the training
    part (a seeded fraction, or repeats) and encodes everything once. Without a validation split the output
    is one shard folder; with one it is `train/` and `validation/` shard folders, `dataset_dict.json` and a
    top-level `manifest.json`, written atomically together.

    Args:
        config: every option of `prep pack`.
        progress: show a rich progress bar (tokens/s) on stderr.

    Returns:
        A PackReport. When the output already holds shards with the same fingerprint (same input bytes,
        tokenizer, template, prep version and options), nothing is rewritten and `up_to_date` is True.

    Raises:
        InputError: unusable input. OutputExistsError: output exists (without `--overwrite`).
        ConfigError: a bad option, recipe, template or tokenizer. AccountingError: counts do not add up (a bug).

    >>> report = pack_shards(PackConfig(inputs=["examples/alpaca.json"], output="/tmp/s"))  # doctest: +SKIP
    >>> report.manifest["counts"]["rows"]  # doctest: +SKIP
    3
    """
    run = _prepare(config)
    existing = _existing_manifest(config.output)
    if existing is not None and existing.get("fingerprint") == run.fingerprint and not config.overwrite:
        return PackReport(config.output, True, Report("prep pack"), existing, notices=["shards are up to date"])
    check_output(config.output, config.overwrite)
    report = PackReport(config.output, False, Report("prep pack"), {}, markers=check_markers(run.template, run.tokenizer))
    if run.several_templates:
        report.template_markers = {spec: report.markers if spec == config.template else check_markers(t, run.tokenizer)
                                   for spec, t in run.templates.items()}
    if config.tokenizer is None:
        report.notices.append(DEFAULT_TOKENIZER_NOTICE)
    parent = _spill_parent(config.output)
    parent.mkdir(parents=True, exist_ok=True)
    with ExampleStore(parent=parent) as train, ExampleStore(parent=parent) as validation:
        stores = {"train": train, "validation": validation}
        rejects_path = train.directory / REJECTS_FILE
        with relaxed_gc():
            _encode_sources(run, report, stores, rejects_path, progress)
        _check_accounting(report)
        if run.split:
            if not report.split_counts["validation"]["examples"]:
                report.notices.append("the validation split is empty: raise --val-fraction or --val-size")
            _write_splits(run, report, stores, rejects_path)
        else:
            _write_single(run, report, train, rejects_path)
    return report


def _prepare(config: PackConfig) -> _Run:
    """Load the sources, tokenizer and templates, describe the inputs and fingerprint the run."""
    parse_size(config.batch_bytes, "--batch-bytes")  # a bad size fails before anything is read
    sources = [_pinned(s, config) for s in mixture_sources(config)]
    paths = [p for source in sources for p in expand_inputs(source.paths)]
    tokenizer = load_tokenizer(config.tokenizer, trust_remote_code=config.trust_remote_code)
    names = [config.template] + [s.template for s in sources if s.template and s.template != config.template]
    templates = {name: load_template(name, tokenizer) for name in dict.fromkeys(names)}
    added = []
    if config.add_special_tokens:
        for template in templates.values():
            added += register_markers(tokenizer, template)
    inputs = [_describe_input(p) for p in paths]
    split = any(holds_out(*split_of(s, config)) for s in sources)
    run = _Run(config, sources, tokenizer, templates, added, inputs, "", split)
    run.fingerprint = _fingerprint(run)
    return run


def _pinned(source: Source, config: PackConfig) -> Source:
    """A source whose URLs are resolved once: a hub dataset to its data files at one commit, a store glob to its
    objects, so every later reading of the run reads the same files (a branch may move meanwhile)."""
    if not any(is_url(p) for p in source.paths):
        return source
    from prep.remote import redact

    paths = expand_inputs(source.paths, subset=source.subset or config.subset, split=source.split or config.split)
    return source.model_copy(update={"path": paths, "name": redact(source.label)})


def _spill_parent(output: str) -> Path:
    """Where the encoded examples are spilled: beside the output, or in the local staging folder for a URL."""
    if is_url(output):
        from prep.remote import local_staging_root

        return local_staging_root()
    return Path(output).absolute().parent


def _is_trivial(run: _Run) -> bool:
    """One source, weight 1, no override and no split: exactly the plain command line."""
    (source, *rest) = run.sources
    return (not rest and source.weight == 1.0 and source.template is None and source.system is None
            and source.fields is None and not run.split)


def _encode_sources(run: _Run, report: PackReport, stores: dict[str, ExampleStore], rejects_path: Path,
                    progress: bool) -> None:
    """Stream every source through dedup, split and weighting into the encoder and the split's store.

    The rejects file holds every convert-stage reject, then every pack-stage one (each in input order): written
    as two streams and joined at the end, so that it does not depend on how the conversations were batched.
    """
    config = run.config
    earlier: set[str] | None = set() if len(run.sources) > 1 else None
    pack_rejects_path = rejects_path.with_name(rejects_path.name + ".pack")
    with (open(rejects_path, "wb") as rejects, open(pack_rejects_path, "w+b") as pack_rejects,
          _progress(progress) as bar, _Encoders(run, _workers(run)) as encoders):
        for source in run.sources:
            template = run.template_of(source)
            group = list(run.templates).index(template)
            tally = SourceTally(source, *split_of(source, config), earlier, template)
            batches = tally.batches(config, report.inputs)
            for split, convert_rejects, result in encoders.encode(template, batches):
                _write_rejects(rejects, convert_rejects)
                stores[split].append(result.table, group=group)
                _write_rejects(pack_rejects, result.rejects)
                for counts, rejected in ((report.counts, report.rejected),
                                         (report.split_counts[split], report.split_rejected[split])):
                    counts.update(result.counts)
                    rejected.update(result.rejected)
                bar.advance(result.counts["tokens"])
            report.sources.append(tally.to_dict())
            if earlier is not None:
                earlier |= tally.hashes
        pack_rejects.seek(0)
        shutil.copyfileobj(pack_rejects, rejects)
    pack_rejects_path.unlink()


# Inputs smaller than this are encoded in-process: starting workers (each imports transformers) costs seconds.
_PARALLEL_MIN_BYTES = 64 * 2**20
# One main process reads, converts, pickles and spills for all workers, so it can keep only so many busy:
# benchmarks/workers.py measured 3.6 (GPT-2, markers) and 5.0 (Qwen2.5, its chat template) on the dev box. 8 leaves
# room for slower encodes; more auto workers would add memory (about 100-120 MiB each) and no speed.
MAX_AUTO_WORKERS = 8


def _workers(run: _Run) -> int:
    """Encoding processes: `--workers`, or with 0 (auto) `auto_workers` of the input size."""
    return run.config.workers or auto_workers(sum(i["bytes"] for i in run.inputs))


def auto_workers(input_bytes: int) -> int:
    """`--workers 0`: one encoding process per usable CPU, at most MAX_AUTO_WORKERS, for inputs of 64 MiB and more;
    in-process (1) below that.

    >>> auto_workers(1000)
    1
    """
    return min(usable_cpus(), MAX_AUTO_WORKERS) if input_bytes >= _PARALLEL_MIN_BYTES else 1


def usable_cpus() -> int:
    """The CPUs this process may run on (a container's or `taskset`'s CPU set), not all the machine has.

    >>> usable_cpus() >= 1
    True
    """
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # no sched_getaffinity (macOS, Windows)
        return os.cpu_count() or 1


class _Encoders:
    """One Encoder per template, run in this process or in worker processes; results come back in order.

    Workers change nothing in the output: each batch is encoded by the same deterministic function and the
    results are consumed in submission order (tested: 1 worker vs several give byte-identical shards).
    """

    def __init__(self, run: _Run, workers: int):
        self.workers = workers
        self.spec = (run.tokenizer, run.templates, run.config.train_on, run.config.max_len, run.config.overflow,
                     run.config.expand_turns)
        self.local = _build_encoders(*self.spec) if workers <= 1 else None
        self.pool = None

    def __enter__(self) -> "_Encoders":
        if self.workers > 1:
            import multiprocessing
            from concurrent.futures import ProcessPoolExecutor

            # fork where there is one: workers start in milliseconds with the tokenizer already loaded, and a
            # user's script without an `if __name__ == "__main__"` guard is not re-run (spawn would re-import it).
            method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
            self.pool = ProcessPoolExecutor(self.workers, mp_context=multiprocessing.get_context(method),
                                            initializer=_init_worker, initargs=self.spec)
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=exc[0] is None, cancel_futures=True)

    def encode(self, template: str, batches: Iterable[tuple[str, list[Conversation], list[Reject]]]
               ) -> Iterator[tuple[str, list[Reject], EncodeResult]]:
        """(split, convert rejects, EncodeResult) for each batch, in order."""
        from collections import deque

        pending: deque = deque()
        if self.pool is None:  # in-process: tokenizing overlaps the rest (Encoder.encode_stream)
            def conversations() -> Iterator[list[Conversation]]:
                for split, batch, rejects in batches:
                    pending.append((split, rejects))
                    yield batch

            for result in self.local[template].encode_stream(conversations()):
                yield *pending.popleft(), result
            return

        for split, conversations, rejects in batches:
            pending.append((split, rejects, self.pool.submit(_encode_in_worker, template, conversations)))
            if len(pending) >= 2 * self.workers:  # bounded memory: a few batches in flight
                split_, rejects_, future = pending.popleft()
                yield split_, rejects_, future.result()
        while pending:
            split_, rejects_, future = pending.popleft()
            yield split_, rejects_, future.result()


def _build_encoders(tokenizer: Any, templates: dict[str, Template], train_on: str, max_len: int,
                    overflow: str, expand_turns: str = "auto") -> dict[str, Encoder]:
    """One Encoder per template name."""
    return {name: Encoder(tokenizer, t, train_on=train_on, max_len=max_len, overflow=overflow,
                          expand_turns=expand_turns)
            for name, t in templates.items()}


_WORKER_ENCODERS: dict[str, Encoder] = {}


def _init_worker(*spec: Any) -> None:
    """Build the encoders once per worker process (the tokenizer arrives pickled)."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the main process's to handle: it stops the pool
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # the workers are the parallelism
    _WORKER_ENCODERS.update(_build_encoders(*spec))


def _encode_in_worker(template: str, conversations: list[Conversation]) -> EncodeResult:
    """Encode one batch in a worker process."""
    return _WORKER_ENCODERS[template].encode(conversations)


def _write_single(run: _Run, report: PackReport, store: ExampleStore, rejects_path: Path) -> None:
    """Write one shard folder (no validation split), exactly as `prep pack` always has."""
    config = run.config
    extra = _manifest_extra(run, report, "train", run.fingerprint)
    if not _is_trivial(run):
        extra["mixture"] = {"sources": report.sources}

    def before_commit(tmp: Path) -> None:
        _save_tokenizer(run, tmp)
        shutil.move(str(rejects_path), tmp / REJECTS_FILE)

    report.manifest = write_shards(store, _plan(store, config, _pad_id(run)), config.output, max_len=config.max_len,
                                   seed=config.seed, shard_size=config.shard_size, manifest_extra=extra,
                                   overwrite=config.overwrite, before_commit=before_commit,
                                   example_templates=run.several_templates)
    report.split_manifests["train"] = report.manifest


def _write_splits(run: _Run, report: PackReport, stores: dict[str, ExampleStore], rejects_path: Path) -> None:
    """Write train/ and validation/ shard folders, dataset_dict.json and the top manifest, in one rename."""
    config = run.config
    with staging_dir(config.output, overwrite=config.overwrite) as tmp:
        for split, store in stores.items():
            fingerprint = hashlib.sha256(f"{run.fingerprint}:{split}".encode()).hexdigest()
            report.split_manifests[split] = write_shards(
                store, _plan(store, config, _pad_id(run)), tmp / split, max_len=config.max_len, seed=config.seed,
                shard_size=config.shard_size, manifest_extra=_manifest_extra(run, report, split, fingerprint),
                before_commit=lambda t: _save_tokenizer(run, t, tmp / SPLITS[0] / "tokenizer"),
                example_templates=run.several_templates)
        shutil.move(str(rejects_path), tmp / REJECTS_FILE)
        write_json(tmp / SPLITS_FILE, {"splits": list(SPLITS)})
        report.manifest = _split_manifest(run, report)
        write_json(tmp / "manifest.json", report.manifest)  # last: its presence marks a complete output


def _save_tokenizer(run: _Run, folder: Path, saved: Path | None = None) -> None:
    """The tokenizer used, saved into folder/tokenizer so that it reloads as the same tokenizer (checked);
    a copy of `saved` when an earlier split already saved (and checked) it."""
    if saved is not None and saved.is_dir():
        shutil.copytree(saved, folder / "tokenizer")
        return
    save_tokenizer(run.tokenizer, folder / "tokenizer", trust_remote_code=run.config.trust_remote_code)


def _split_manifest(run: _Run, report: PackReport) -> dict[str, Any]:
    """The top-level manifest of a split output: options, sources with their counts, and each split's summary."""
    total = report.inputs.total
    return {
        "format": SPLITS_FORMAT,
        "format_version": FORMAT_VERSION,
        "prep_version": __version__,
        "fingerprint": run.fingerprint,
        "options": _options(run),
        "inputs": run.inputs,
        "sources": report.sources,
        "counts": {
            "records_read": total.read,
            "records_rejected": total.rejected_total,
            "records_deduplicated": total.deduplicated,
            "cross_source_duplicates": sum(s["counts"]["cross_source_duplicates"] for s in report.sources),
        },
        "splits": {split: {"path": split, "fingerprint": m["fingerprint"], "counts": m["counts"]}
                   for split, m in report.split_manifests.items()},
    }


def build_config(**flags: Any) -> PackConfig:
    """Build a PackConfig from CLI flags, turning a validation error into one ConfigError naming the flag.

    A flag left at None was not given. With `recipe`, the recipe's options fill in every flag not given,
    and its sources become the inputs; a flag given explicitly wins over the file.

    >>> build_config(inputs=["a.jsonl"], output="shards", max_len=4).max_len
    Traceback (most recent call last):
    prep.errors.ConfigError: --max-len: Input should be greater than or equal to 8
    """
    from pydantic import ValidationError

    given = {k: v for k, v in flags.items() if v is not None}
    if "fields" in given and not isinstance(given["fields"], dict):
        given["fields"] = parse_fields(given["fields"]) or None
    if given.get("recipe") is not None:
        given = _with_recipe(given)
    elif not given.get("inputs"):
        raise ConfigError("no inputs: give input files, or a recipe with --recipe")
    elif "output" not in given:
        raise ConfigError("--output: missing: name the output folder with -o")
    try:
        return PackConfig(**given)
    except ValidationError as e:
        raise flag_error(e) from None


def _with_recipe(given: dict[str, Any]) -> dict[str, Any]:
    """Flags given on the command line over the recipe's options; the recipe's sources as inputs."""
    if given.get("inputs"):
        raise ConfigError("give input files or --recipe, not both (list the inputs as sources in the recipe)")
    recipe = load_recipe(given["recipe"])
    options = recipe.model_dump(exclude={"sources"}, exclude_none=True)
    if "val_fraction" in given or "val_size" in given:  # one split flag replaces the recipe's split entirely
        options = {k: v for k, v in options.items() if k not in ("val_fraction", "val_size")}
    merged = options | given
    merged["inputs"] = [p for source in recipe.sources for p in source.paths]
    if "output" not in merged:
        raise ConfigError(f"{given['recipe']}: no output: pass --output or set `output` in the recipe")
    return merged


def check_strict(config: PackConfig, report: PackReport) -> None:
    """Under `--strict`, fail when any record or example was rejected or dropped.

    Raises:
        PrepError: strict is on and something was not written.
    """
    lost = report.inputs.total.rejected_total + sum(report.rejected.values()) + report.counts["dropped"]
    if config.strict and lost:
        raise PrepError(f"{lost} record(s)/example(s) rejected or dropped and --strict is set; "
                        f"see {join(report.output, REJECTS_FILE)}")


def _write_rejects(file: Any, rejects: list[Reject]) -> None:
    """Append rejects as JSON lines."""
    for r in rejects:
        file.write(r.model_dump_json().encode() + b"\n")


def _check_accounting(report: PackReport) -> None:
    """Every record read is accepted/rejected/deduplicated, every accepted conversation reaches a split (or is a
    cross-source duplicate), and every encoded conversation is accounted for.

    Raises:
        AccountingError: the counts do not add up (a bug in prep).
    """
    report.inputs.check_accounting()
    for s in report.sources:
        c = s["counts"]
        if c["accepted"] != c["cross_source_duplicates"] + c["validation"] + c["train_before_weighting"]:
            raise AccountingError(f"{s['name']}: accepted {c['accepted']} != cross-source duplicates + validation + "
                                  f"train {c}; a bug in prep")
    for split, c in report.split_counts.items():
        expected = sum(s["counts"][split] for s in report.sources)
        if c["conversations"] != expected:
            raise AccountingError(f"{split}: encoded {c['conversations']} conversations but {expected} were "
                                  "selected; a bug in prep")
        if c["conversations"] + c["extra_pieces"] + c["expanded"] != c["examples"] + c["dropped"] + c["rejected"]:
            raise AccountingError(
                f"{split}: conversations {c['conversations']} + extra pieces {c['extra_pieces']} + expanded "
                f"{c['expanded']} != examples {c['examples']} + dropped {c['dropped']} + rejected {c['rejected']}; "
                "a bug in prep"
            )


def _plan(store: ExampleStore, config: PackConfig, pad_id: int) -> Any:
    """The row plan: best-fit-decreasing then a seeded row shuffle, or one example per row; with
    `--pad-to-multiple-of N` the rows are planned on the padded lengths and the examples laid out padded."""
    n = config.pad_to_multiple_of
    if not config.pack:
        plan = plan_unpacked(len(store), config.seed)
    else:
        plan = shuffle_rows(plan_bfd(padded_lengths(store.lengths, n), config.max_len), config.seed)
    return with_padding(plan, n, pad_id) if n > 1 else plan


def _pad_id(run: _Run) -> int:
    """The token that pads examples: the tokenizer's pad token, else eos, else 0 (the manifest's pad_token_id)."""
    tokenizer = run.tokenizer
    for token_id in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if token_id is not None:
            return int(token_id)
    return 0


def _describe_input(path: str) -> dict[str, Any]:
    """Name, size and sha256 of one input (a folder: of each file in it, in sorted order); a hub file also
    records its commit."""
    if is_url(path):
        return _describe_url(path)
    p = Path(path)
    if p.is_dir():
        digest = hashlib.sha256()
        size = 0
        for f in sorted(x for x in p.rglob("*") if x.is_file()):
            digest.update(str(f.relative_to(p)).encode() + b"\0" + sha256_file(f).encode())
            size += f.stat().st_size
        return {"path": path, "sha256": digest.hexdigest(), "bytes": size}
    return {"path": path, "sha256": sha256_file(p), "bytes": p.stat().st_size}


def _describe_url(url: str) -> dict[str, Any]:
    """_describe_input of a URL: a hub file from its cached copy (and its commit), a store object streamed."""
    from prep import hub, remote

    if hub.is_hub(url):
        entry = _describe_input(hub.local_file(url))
        return {"path": url, "sha256": entry["sha256"], "bytes": entry["bytes"], "commit": hub.commit_of(url)}
    return remote.describe(url)


def _fingerprint(run: _Run) -> str:
    """sha256 of the input bytes, tokenizer, template, prep version and every option that changes the output.

    The plain command line's payload is unchanged by mixtures; any other mixture adds its sources.
    """
    payload = {
        "prep_version": __version__,
        "inputs": [(os.path.basename(i["path"]), i["sha256"], *([i["commit"]] if "commit" in i else []))
                   for i in run.inputs],
        "tokenizer": tokenizer_fingerprint(run.tokenizer),
        "template": template_sha256(run.template),
        "options": _options(run),
    }
    if not _is_trivial(run):
        payload["sources"] = [_source_key(run, s) for s in run.sources]
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def _options(run: _Run) -> dict[str, Any]:
    """The options that change the output (a split flag only when set; one source's own format)."""
    options = run.config.model_dump(exclude=_FINGERPRINT_EXCLUDE)
    for key in ("val_fraction", "val_size", "fields"):
        if options[key] is None:
            del options[key]
    if options["pad_to_multiple_of"] == 1:  # fingerprints of unpadded runs stay what they were
        del options["pad_to_multiple_of"]
    if len(run.sources) == 1:
        options["format"] = run.sources[0].format
    return options


def _source_key(run: _Run, source: Source) -> dict[str, Any]:
    """What of a source changes the output: its input hashes, format, weight, template, system prompt, split."""
    template = run.templates[source.template or run.config.template]
    sha256 = {i["path"]: i["sha256"] for i in run.inputs}
    return {"inputs": [sha256[p] for p in expand_inputs(source.paths)], "format": source.format,
            "weight": source.weight, "template": template_sha256(template), "system": source.system,
            "split": split_of(source, run.config), "fields": source.fields}


def _existing_manifest(output: str) -> dict[str, Any] | None:
    """The manifest of an existing output, or None (no output, or not readable as JSON)."""
    if is_url(output):
        from prep import remote

        file = remote.join(output, "manifest.json")
        try:
            return json.loads(remote.read_bytes(file)) if remote.exists(file) else None
        except ValueError:
            return None
    try:
        return json.loads((Path(output) / "manifest.json").read_text())
    except (OSError, ValueError):
        return None


def _manifest_extra(run: _Run, report: PackReport, split: str, fingerprint: str) -> dict[str, Any]:
    """The manifest parts prep.write does not know: options, tokenizer, template, inputs, counts (of one split)."""
    config, tokenizer, template = run.config, run.tokenizer, run.template
    c, rejected = report.split_counts[split], report.split_rejected[split]
    name = config.tokenizer or DEFAULT_TOKENIZER_NAME
    inputs = report.inputs.total
    return {
        "fingerprint": fingerprint,
        "train_on": config.train_on,
        "overflow": config.overflow,
        "expand_turns": config.expand_turns,
        "template": _template_dict(template),
        "tokenizer": {
            "name": name,
            "fingerprint": tokenizer_fingerprint(tokenizer),
            "path": "tokenizer",
            "vocab_size": len(tokenizer),
            "added_tokens": run.added,
            "resize_embeddings": bool(run.added),
            "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
        },
        "markers": [_marker_dict(m) for m in report.markers],
        **({"templates": [_template_dict(run.templates[spec], spec, checks)
                          for spec, checks in report.template_markers.items()]} if run.several_templates else {}),
        "inputs": run.inputs,
        "counts": {
            "records_read": inputs.read,
            "records_rejected": inputs.rejected_total,
            "records_deduplicated": inputs.deduplicated,
            "conversations": c["conversations"],
            # manifest keys stay "split"/"split_conversations": the manifest is a contract users read
            "split": c["extra_pieces"],
            "split_conversations": c["pieced_conversations"],
            "truncated": c["truncated"],
            "dropped": c["dropped"],
            "template_dropped_message": c["template_dropped_message"],
            "template_dropped_reasoning": c["template_dropped_reasoning"],
            "template_dropped_content": c["template_dropped_content"],
            "expanded": c["expanded"],
            "expanded_conversations": c["expanded_conversations"],
            "tool_call_ids_generated": c["tool_call_ids_generated"],
            "tool_calls": inputs.events["tool_calls"],
            "tool_results": inputs.events["tool_results"],
            "rejected": dict(sorted((inputs.rejected + rejected).items())),
        },
    }


def _template_dict(template: Template, spec: str | None = None, checks: list[MarkerCheck] | None = None
                   ) -> dict[str, Any]:
    """A template for the manifest: name, sha256 and definition (+ the value given and its markers, in `templates`)."""
    entry = {"name": template.name, "sha256": template_sha256(template), "definition": template_to_dict(template)}
    if spec is not None:
        entry |= {"template": spec, "markers": [_marker_dict(m) for m in checks or []]}
    return entry


def _marker_dict(check: MarkerCheck) -> dict[str, Any]:
    """A MarkerCheck as plain JSON for the manifest."""
    return {"marker": check.marker, "ids": list(check.ids), "tokens": list(check.tokens), "special": check.special,
            "changed_in": list(check.changed_in)}


class _progress:
    """A rich progress line with tokens encoded and tokens/s (on stderr), or nothing."""

    def __init__(self, enabled: bool):
        self.enabled = enabled

    def __enter__(self) -> "_progress":
        if self.enabled:
            from rich.console import Console
            from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

            self._bar = Progress(SpinnerColumn(), TextColumn("encoding: {task.completed:,.0f} tokens"),
                                 TextColumn("{task.fields[rate]}"), TimeElapsedColumn(),
                                 console=Console(stderr=True), transient=True)
            self._bar.start()
            self._task = self._bar.add_task("encode", total=None, rate="")
        return self

    def advance(self, tokens: int) -> None:
        """Add `tokens` encoded tokens."""
        if self.enabled:
            self._bar.advance(self._task, tokens)
            task = self._bar.tasks[0]
            if task.elapsed:
                self._bar.update(self._task, rate=f"{task.completed / task.elapsed:,.0f} tok/s")

    def __exit__(self, *exc: Any) -> None:
        if self.enabled:
            self._bar.stop()
