"""`prep pack`: inputs → conversations → exact encoded examples → packed rows → Arrow shards.

The stages stream: conversations are converted and encoded batch by batch, encoded examples are spilled
to disk (prep.spill), only their lengths stay in memory, the whole data set is planned at once
(prep.pack) and the shards are written atomically (prep.write). Rejected records and examples go to
`shards/rejects.jsonl`, and every one of them is counted.
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
from prep.convert import iter_conversations
from prep.encode import Encoder
from prep.errors import AccountingError, ConfigError, PrepError
from prep.pack import plan_bfd, plan_unpacked, shuffle_rows
from prep.read import expand_inputs
from prep.render import Template, load_template, template_sha256
from prep.report import Report
from prep.spill import ExampleStore
from prep.tokenizer import MarkerCheck, check_markers, load_tokenizer, register_markers, tokenizer_fingerprint
from prep.write import check_output, sha256_file, write_shards
from schemas.conversation import Conversation
from schemas.pack_config import PackConfig
from schemas.reject import Reject

REJECTS_FILE = "rejects.jsonl"
# Options that change the shards' bytes; output/overwrite/strict do not.
_FINGERPRINT_EXCLUDE = {"inputs", "output", "overwrite", "strict", "batch_size"}


@dataclass
class PackReport:
    """What `pack_shards` did: input accounting, example counts, packing, the manifest and notices."""

    output: str
    up_to_date: bool
    inputs: Report
    manifest: dict[str, Any]
    counts: Counter[str] = field(default_factory=Counter)
    rejected: Counter[str] = field(default_factory=Counter)
    markers: list[MarkerCheck] = field(default_factory=list)
    notices: list[str] = field(default_factory=list)


def pack_shards(config: PackConfig, progress: bool = False) -> PackReport:
    """Convert, encode, pack and write shards for `config.inputs` into `config.output`.

    Args:
        config: every option of `prep pack`.
        progress: show a rich progress bar (tokens/s) on stderr.

    Returns:
        A PackReport. When the output already holds shards with the same fingerprint (same input bytes,
        tokenizer, template, prep version and options), nothing is rewritten and `up_to_date` is True.

    Raises:
        InputError: unusable input. OutputExistsError: output exists (without `--overwrite`).
        ConfigError: a bad option, template or tokenizer. AccountingError: counts do not add up (a bug).

    >>> report = pack_shards(PackConfig(inputs=["examples/alpaca.json"], output="/tmp/s"))  # doctest: +SKIP
    >>> report.manifest["counts"]["rows"]  # doctest: +SKIP
    3
    """
    paths = expand_inputs(config.inputs)
    tokenizer = load_tokenizer(config.tokenizer, trust_remote_code=config.trust_remote_code)
    template = load_template(config.template, tokenizer)
    added = register_markers(tokenizer, template) if config.add_special_tokens else []
    inputs = [_describe_input(p) for p in paths]
    fingerprint = _fingerprint(config, inputs, tokenizer, template)
    existing = _existing_manifest(config.output)
    if existing is not None and existing.get("fingerprint") == fingerprint and not config.overwrite:
        return PackReport(config.output, True, Report("prep pack"), existing, notices=["shards are up to date"])
    check_output(config.output, config.overwrite)
    report = PackReport(config.output, False, Report("prep pack"), {}, markers=check_markers(template, tokenizer))
    if config.tokenizer is None:
        report.notices.append("no --tokenizer given: using the embedded byte-level demo tokenizer")
    encoder = Encoder(tokenizer, template, train_on=config.train_on, max_len=config.max_len, overflow=config.overflow)
    parent = Path(config.output).absolute().parent
    parent.mkdir(parents=True, exist_ok=True)
    with ExampleStore(parent=parent) as store:
        rejects_path = store.directory / REJECTS_FILE
        with open(rejects_path, "wb") as rejects, _progress(progress) as bar:
            batches = _batched(iter_conversations(paths, config.format, dedup=config.dedup, report=report.inputs),
                               config.batch_size)
            for conversations, convert_rejects in batches:
                _write_rejects(rejects, convert_rejects)
                result = encoder.encode(conversations)
                store.append(result.table)
                _write_rejects(rejects, result.rejects)
                report.counts.update(result.counts)
                report.rejected.update(result.rejected)
                bar.advance(result.counts["tokens"])
        _check_accounting(report)
        plan = _plan(store, config)
        extra = _manifest_extra(config, report, fingerprint, inputs, tokenizer, template, added, store, plan)

        def before_commit(tmp: Path) -> None:
            tokenizer.save_pretrained(tmp / "tokenizer")
            shutil.move(str(rejects_path), tmp / REJECTS_FILE)

        report.manifest = write_shards(store, plan, config.output, max_len=config.max_len, seed=config.seed,
                                       shard_size=config.shard_size, manifest_extra=extra,
                                       overwrite=config.overwrite, before_commit=before_commit)
    return report


def build_config(**flags: Any) -> PackConfig:
    """Build a PackConfig from CLI flags, turning a validation error into one ConfigError naming the flag.

    >>> build_config(inputs=["a.jsonl"], output="shards", max_len=4).max_len
    Traceback (most recent call last):
    prep.errors.ConfigError: --max-len: Input should be greater than or equal to 8
    """
    from pydantic import ValidationError

    try:
        return PackConfig(**flags)
    except ValidationError as e:
        d = e.errors(include_url=False)[0]
        flag = "--" + "-".join(str(p) for p in d["loc"]).replace("_", "-") if d["loc"] else "options"
        raise ConfigError(f"{flag}: {d['msg']}") from None


def render_pack_report(report: PackReport) -> Any:
    """The summary of a pack run as rich renderables: inputs, examples, packing, markers, notices.

    Returns:
        a rich `Group` (print it with a Console).
    """
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    from prep.report import render_report

    notices = [Text(n, style="yellow") for n in report.notices]
    m = report.manifest
    if report.up_to_date:
        return Group(*notices, Text(f"{report.output}: up to date (fingerprint {m.get('fingerprint', '')[:12]})"))
    c = m["counts"]
    examples = Table(title="examples", title_justify="left")
    for name in ("conversations", "examples", "split", "truncated", "dropped", "rejected", "tokens", "trained"):
        examples.add_column(name, justify="right")
    rejected = sum(report.rejected.values())
    examples.add_row(*(f"{v:,}" for v in (c["conversations"], c["examples"], c["split"], c["truncated"], c["dropped"],
                                           rejected, c["tokens"], c["trained_tokens"])))
    p = m["packing"]
    lines = [Text(f"rows {p['rows']:,} (lower bound {p['lower_bound_rows']:,}), packing efficiency "
                  f"{p['efficiency']:.2%}, {len(m['shards'])} shard(s) in {report.output}")]
    if report.rejected or c["dropped"]:
        reasons = dict(report.rejected) | ({"too_long": c["dropped"]} if c["dropped"] else {})
        lines.append(Text("not written: " + ", ".join(f"{k} {v}" for k, v in sorted(reasons.items())) +
                          f" (see {Path(report.output) / REJECTS_FILE})", style="yellow"))
    return Group(*notices, render_report(report.inputs), examples, _marker_table(report.markers), *lines)


def _marker_table(markers: list[MarkerCheck]) -> Any:
    """How each template marker tokenizes with this tokenizer."""
    from rich.table import Table

    table = Table(title="template markers", title_justify="left")
    for name in ("marker", "tokens", "special", "changes when text touches it"):
        table.add_column(name)
    for m in markers:
        table.add_row(m.marker, str(len(m.ids)), "yes" if m.special else "no", ", ".join(m.changed_in) or "no")
    return table


def check_strict(config: PackConfig, report: PackReport) -> None:
    """Under `--strict`, fail when any record or example was rejected or dropped.

    Raises:
        PrepError: strict is on and something was not written.
    """
    lost = report.inputs.total.rejected_total + sum(report.rejected.values()) + report.counts["dropped"]
    if config.strict and lost:
        raise PrepError(f"{lost} record(s)/example(s) rejected or dropped and --strict is set; "
                        f"see {Path(report.output) / REJECTS_FILE}")


def _batched(items: Iterable[Conversation | Reject], size: int) -> Iterator[tuple[list[Conversation], list[Reject]]]:
    """Group a stream into (conversations, rejects) batches of up to `size` conversations."""
    conversations: list[Conversation] = []
    rejects: list[Reject] = []
    for item in items:
        if item.__class__ is Reject:
            rejects.append(item)  # type: ignore[arg-type]
            continue
        conversations.append(item)  # type: ignore[arg-type]
        if len(conversations) >= size:
            yield conversations, rejects
            conversations, rejects = [], []
    if conversations or rejects:
        yield conversations, rejects


def _write_rejects(file: Any, rejects: list[Reject]) -> None:
    """Append rejects as JSON lines."""
    for r in rejects:
        file.write(r.model_dump_json().encode() + b"\n")


def _check_accounting(report: PackReport) -> None:
    """Every record read is accepted/rejected/deduplicated, and every accepted conversation is accounted for.

    Raises:
        AccountingError: the counts do not add up (a bug in prep).
    """
    report.inputs.check_accounting()
    c = report.counts
    accepted = report.inputs.total.accepted
    if c["conversations"] != accepted:
        raise AccountingError(f"encoded {c['conversations']} conversations but {accepted} were accepted; a bug in prep")
    if c["conversations"] + c["split"] != c["examples"] + c["dropped"] + c["rejected"]:
        raise AccountingError(
            f"conversations {c['conversations']} + split pieces {c['split']} != examples {c['examples']} + dropped "
            f"{c['dropped']} + rejected {c['rejected']}; a bug in prep"
        )


def _plan(store: ExampleStore, config: PackConfig) -> Any:
    """The row plan: best-fit-decreasing then a seeded row shuffle, or one example per row."""
    if not config.pack:
        return plan_unpacked(len(store), config.seed)
    return shuffle_rows(plan_bfd(store.lengths, config.max_len), config.seed)


def _describe_input(path: str) -> dict[str, Any]:
    """Name, size and sha256 of one input (a folder: of each file in it, in sorted order)."""
    p = Path(path)
    if p.is_dir():
        digest = hashlib.sha256()
        size = 0
        for f in sorted(x for x in p.rglob("*") if x.is_file()):
            digest.update(str(f.relative_to(p)).encode() + b"\0" + sha256_file(f).encode())
            size += f.stat().st_size
        return {"path": path, "sha256": digest.hexdigest(), "bytes": size}
    return {"path": path, "sha256": sha256_file(p), "bytes": p.stat().st_size}


def _fingerprint(config: PackConfig, inputs: list[dict], tokenizer: Any, template: Template) -> str:
    """sha256 of the input bytes, tokenizer, template, prep version and every option that changes the output."""
    options = config.model_dump(exclude=_FINGERPRINT_EXCLUDE)
    payload = {
        "prep_version": __version__,
        "inputs": [(os.path.basename(i["path"]), i["sha256"]) for i in inputs],
        "tokenizer": tokenizer_fingerprint(tokenizer),
        "template": template_sha256(template),
        "options": options,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def _existing_manifest(output: str) -> dict[str, Any] | None:
    """The manifest of an existing output, or None (no output, or not readable as JSON)."""
    try:
        return json.loads((Path(output) / "manifest.json").read_text())
    except (OSError, ValueError):
        return None


def _manifest_extra(config: PackConfig, report: PackReport, fingerprint: str, inputs: list[dict], tokenizer: Any,
                    template: Template, added: list[str], store: ExampleStore, plan: Any) -> dict[str, Any]:
    """The manifest parts prep.write does not know: options, tokenizer, template, inputs, counts."""
    c = report.counts
    name = config.tokenizer or "prep-embedded-byte-level"
    return {
        "fingerprint": fingerprint,
        "train_on": config.train_on,
        "overflow": config.overflow,
        "template": {"name": template.name, "sha256": template_sha256(template)},
        "tokenizer": {
            "name": name,
            "fingerprint": tokenizer_fingerprint(tokenizer),
            "path": "tokenizer",
            "vocab_size": len(tokenizer),
            "added_tokens": added,
            "resize_embeddings": bool(added),
            "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
        },
        "markers": [_marker_dict(m) for m in report.markers],
        "inputs": inputs,
        "counts": {
            "records_read": report.inputs.total.read,
            "records_rejected": report.inputs.total.rejected_total,
            "records_deduplicated": report.inputs.total.deduplicated,
            "conversations": c["conversations"],
            "split": c["split"],
            "split_conversations": c["split_conversations"],
            "truncated": c["truncated"],
            "dropped": c["dropped"],
            "template_dropped_message": c["template_dropped_message"],
            "rejected": dict(sorted((report.inputs.total.rejected + report.rejected).items())),
        },
    }


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
