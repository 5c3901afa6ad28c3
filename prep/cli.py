"""The `prep` command line: flags -> config -> library call -> printed report.

Stage modules are imported inside the command functions, so `prep train` never imports pydantic.
Defaults here mirror schemas.config.ConvertConfig (tests/test_cli_convert.py checks they agree).
"""

from __future__ import annotations

import os
import sys
from inspect import Signature
from typing import Annotated, Optional

import typer

from prep.errors import PrepError
from prep.train_config import typer_parameters

FORMAT_HELP = "auto (detect per file), alpaca, sharegpt, openai, prompt_completion, transcript or unified."
SubsetOpt = Annotated[Optional[str], typer.Option(
    help="Subset (config) of hf://datasets/ inputs; default: the dataset's default.")]
HubSplitOpt = Annotated[Optional[str], typer.Option(
    "--split", help="Split of hf://datasets/ inputs (a+b joins); default: the only split, else train.")]
FieldOpt = Annotated[Optional[list[str]], typer.Option(
    "--field", help="Read a field from another key, TARGET=SOURCE (repeatable): messages=traj, tools=functions, "
                    "message.role=speaker; SOURCE may be a dotted path (data.turns).")]
app = typer.Typer(
    name="prep",
    help="Turn raw instruction-tuning data into training-ready shards.",
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)


@app.command()
def convert(
    inputs: Annotated[list[str], typer.Argument(help="Input files, globs, save_to_disk folders or URLs "
                                                     "(s3://, gs://, az://, https://, hf://datasets/ORG/NAME).")],
    output: Annotated[str, typer.Option("--output", "-o", help="Output path or URL: .parquet writes Parquet, "
                                                                "else JSON Lines.")],
    format: Annotated[str, typer.Option("--format", "-f", help=FORMAT_HELP)] = "auto",
    rejects: Annotated[str | None, typer.Option(help="Rejects JSONL (default: OUTPUT with .rejects.jsonl).")] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace existing outputs.")] = False,
    strict: Annotated[bool, typer.Option("--strict", help="Exit 1 if any record is rejected.")] = False,
    dedup: Annotated[bool, typer.Option("--dedup", help="Drop exact duplicate conversations.")] = False,
    subset: SubsetOpt = None,
    split: HubSplitOpt = None,
    fields: FieldOpt = None,
) -> None:
    """Convert raw SFT data (Alpaca, ShareGPT, OpenAI, transcripts) to unified conversations."""
    from rich.console import Console

    from prep.convert import build_config, check_strict, convert_files
    from prep.report import report_table

    config = build_config(inputs=inputs, output=output, format=format, rejects=rejects, overwrite=overwrite,
                          strict=strict, dedup=dedup, subset=subset, split=split, fields=fields)
    report = convert_files(config, progress=sys.stderr.isatty())
    console = Console()
    console.print(report_table(report))
    console.print(f"wrote {report.total.accepted:,} conversations to {report.outputs['conversations']}, "
                  f"{report.total.rejected_total:,} rejects to {report.outputs['rejects']}", highlight=False,
                  markup=False, soft_wrap=True)
    check_strict(config, report)


@app.command()
def schema() -> None:
    """Print the JSON Schema of the unified conversation form."""
    from prep.convert import unified_json_schema

    typer.echo(unified_json_schema())


# Shared option types of the commands that render and tokenize.
TokenizerOpt = Annotated[Optional[str], typer.Option(help="Local folder or hub id; default: the embedded demo tokenizer.")]
TemplateOpt = Annotated[str, typer.Option(help="markers | chatml | tokenizer | path to a TOML/YAML template.")]
TrainOnOpt = Annotated[str, typer.Option("--train-on", help="completion | last | all: which tokens carry a loss.")]
MaxLenOpt = Annotated[int, typer.Option("--max-len", help="Tokens per row (and the longest example).")]
OverflowOpt = Annotated[str, typer.Option(help="split | truncate | drop: what happens to a longer example.")]
FormatOpt = Annotated[str, typer.Option("--format", "-f", help="auto|alpaca|sharegpt|openai|prompt_completion|transcript|unified")]
SplitOpt = Annotated[str, typer.Option(help="Which split of a folder packed with a validation split.")]
RemoteCodeOpt = Annotated[bool, typer.Option("--trust-remote-code", help="Allow a hub tokenizer's own code to run.")]


@app.command()
def pack(
    inputs: Annotated[Optional[list[str]], typer.Argument(
        help="Unified JSONL/Parquet from `prep convert`, or raw files, or URLs (or use --recipe).")] = None,
    output: Annotated[Optional[str], typer.Option("--output", "-o", help="Output folder (or URL) for the shards.")] = None,
    recipe: Annotated[Optional[str], typer.Option(
        help="Recipe file (YAML/TOML): sources, weights, split, options. Flags given here override it.")] = None,
    val_fraction: Annotated[Optional[float], typer.Option(
        "--val-fraction", help="Share of every source held out as shards/validation/ (by content hash).")] = None,
    val_size: Annotated[Optional[int], typer.Option(
        "--val-size", help="Conversations of every source held out as shards/validation/.")] = None,
    tokenizer: TokenizerOpt = None,
    template: Annotated[Optional[str], typer.Option(help="markers | chatml | tokenizer | path; default markers.")] = None,
    max_len: Annotated[Optional[int], typer.Option("--max-len", help="Tokens per row; default 2048.")] = None,
    train_on: Annotated[Optional[str], typer.Option(
        "--train-on", help="completion | last | all; default completion.")] = None,
    overflow: Annotated[Optional[str], typer.Option(help="split | truncate | drop; default split.")] = None,
    pack: Annotated[Optional[bool], typer.Option("--pack/--no-pack", help="Pack several examples per row.",
                                                 show_default="pack")] = None,
    pad_to_multiple_of: Annotated[Optional[int], typer.Option(
        "--pad-to-multiple-of", help="Pad every example (masked, positions continuing) to a multiple of N tokens, "
        "for context parallelism (N = 2 x CP size); default 1 (no padding).")] = None,
    seed: Annotated[Optional[int], typer.Option(help="Seed of the row shuffle, split and weights; default 0.")] = None,
    shard_size: Annotated[Optional[str], typer.Option("--shard-size", help="Target shard size; default 256MB.")] = None,
    add_special_tokens: Annotated[Optional[bool], typer.Option(
        "--add-special-tokens/--no-add-special-tokens", help="Register the template markers as special tokens.",
        show_default="no")] = None,
    format: Annotated[Optional[str], typer.Option("--format", "-f", help=FORMAT_HELP + " Default: auto.")] = None,
    trust_remote_code: RemoteCodeOpt = False,
    dedup: Annotated[Optional[bool], typer.Option("--dedup/--no-dedup", help="Drop exact duplicate conversations.",
                                                  show_default="no")] = None,
    fields: FieldOpt = None,
    expand_turns: Annotated[Optional[str], typer.Option(
        "--expand-turns", help="auto | off | all: one example per trained reply, each with the turns before it as "
                               "masked context (auto: only where the chat template renders a reply differently once "
                               "later turns follow, e.g. Qwen3 dropping earlier reasoning); default auto.")] = None,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Conversations per tokenizer call, at most.")] = 2048,
    batch_bytes: Annotated[Optional[str], typer.Option(
        "--batch-bytes", help="Message text per tokenizer call, at most (bounds memory); default 1MiB.")] = None,
    workers: Annotated[int, typer.Option(help="Encoding processes; 0 = one per CPU (at most 8) for inputs >= 64 MiB, "
                                              "else 1. "
                                              "The output is the same for any number.")] = 0,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing output folder.")] = False,
    strict: Annotated[bool, typer.Option("--strict", help="Exit 1 if anything was rejected or dropped.")] = False,
    subset: SubsetOpt = None,
    split: HubSplitOpt = None,
) -> None:
    """Render, tokenize, mask and pack conversations into Arrow shards with a manifest.

    With --recipe the recipe's options apply, and any flag given here wins over the file.
    """
    flags = dict(locals())  # first statement: exactly the parameters; None = not given
    from rich.console import Console

    from prep.pipeline import build_config, check_strict, pack_shards
    from prep.report import pack_summary

    config = build_config(**flags)
    report = pack_shards(config, progress=sys.stderr.isatty())
    Console().print(pack_summary(report))
    check_strict(config, report)


@app.command()
def export(
    shards: Annotated[str, typer.Argument(help="Shard folder written by `prep pack` (every split is exported).")],
    to: Annotated[str, typer.Option("--to", help="megatron | mds | parquet.")],
    output: Annotated[str, typer.Option("--output", "-o", help="Output folder of the export.")],
    mds_shard_size: Annotated[str, typer.Option("--mds-shard-size", help="Size limit of each MDS shard file.")] = "64MiB",
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing export folder.")] = False,
) -> None:
    """Export shards for Megatron (indexed dataset + Megatron-Bridge packed Parquet), MosaicML Streaming, Parquet."""
    flags = dict(locals())
    from rich.console import Console

    from prep.errors import flag_error
    from prep.export import export_shards, export_summary
    from pydantic import ValidationError
    from schemas.export_config import ExportConfig

    try:
        config = ExportConfig(**flags)
    except ValidationError as e:
        raise flag_error(e) from None
    Console().print(export_summary(export_shards(config)))


@app.command()
def inspect(
    path: Annotated[str, typer.Argument(help="A shard folder (or URL), or an input file with --record.")],
    row: Annotated[int, typer.Option(help="Row to show (0-based, over all shards).")] = 0,
    example: Annotated[Optional[int], typer.Option(help="Only this example of the row (0-based).")] = None,
    ids: Annotated[bool, typer.Option("--ids", help="Show token ids and labels side by side.")] = False,
    record: Annotated[Optional[int], typer.Option(help="Encode this input record (0-based) instead.")] = None,
    tokenizer: TokenizerOpt = None,
    template: TemplateOpt = "markers",
    train_on: TrainOnOpt = "completion",
    max_len: MaxLenOpt = 2048,
    overflow: OverflowOpt = "split",
    format: FormatOpt = "auto",
    trust_remote_code: RemoteCodeOpt = False,
    split: SplitOpt = "train",
) -> None:
    """Show a packed row (or one input record) token by token: trained tokens green, masked grey."""
    from rich.console import Console

    from prep.errors import ConfigError
    from prep.inspect import inspect_record, inspect_shards, row_display
    from prep.load import split_path
    from prep.remote import is_url

    if record is None:
        if not (os.path.isdir(path) or is_url(path)):
            raise ConfigError(f"{path}: not a shard folder; to inspect an input record pass --record N")
        view = inspect_shards(split_path(path, split), row=row, example=example)
    else:
        view = inspect_record(path, record, tokenizer=tokenizer, template=template, train_on=train_on,
                              max_len=max_len, overflow=overflow, format=format,
                              trust_remote_code=trust_remote_code, example=example)
    Console().print(row_display(view, ids=ids))


@app.command()
def stats(
    inputs: Annotated[list[str], typer.Argument(help="A shard folder (or URL), or input files.")],
    plot: Annotated[Optional[str], typer.Option(help="Also draw the statistics into FILE (.png/.svg/.pdf/.html) "
                                                "with matplotlib: pip install 'prep-sft[plot]'.")] = None,
    top: Annotated[int, typer.Option(help="How many of the longest examples to list.")] = 5,
    bins: Annotated[int, typer.Option(help="Histogram bins.")] = 16,
    tokenizer: TokenizerOpt = None,
    template: TemplateOpt = "markers",
    train_on: TrainOnOpt = "completion",
    max_len: MaxLenOpt = 2048,
    overflow: OverflowOpt = "split",
    pack: Annotated[bool, typer.Option("--pack/--no-pack", help="Packing to estimate for inputs.")] = True,
    format: FormatOpt = "auto",
    trust_remote_code: RemoteCodeOpt = False,
    split: SplitOpt = "train",
) -> None:
    """Token-length distribution, tokens per role, trained fraction and packing efficiency."""
    from rich.console import Console

    from prep.load import split_path
    from prep.remote import is_shard_folder
    from prep.stats import input_stats, stats_summary, shard_stats

    if plot:  # before any work: a wrong suffix or a missing matplotlib is one line, not a wasted run
        from prep.plot import check_plot_path

        check_plot_path(plot)
    if len(inputs) == 1 and is_shard_folder(inputs[0]):
        result = shard_stats(split_path(inputs[0], split), top=top)
    else:
        result = input_stats(inputs, tokenizer=tokenizer, template=template, train_on=train_on, max_len=max_len,
                             overflow=overflow, format=format, pack=pack, top=top,
                             trust_remote_code=trust_remote_code)
    Console().print(stats_summary(result, bins=bins))
    if plot:
        from prep.plot import write_plot

        write_plot(plot, result, bins=bins)
        Console().print(f"wrote {plot}", highlight=False, markup=False)


@app.command()
def verify(
    path: Annotated[str, typer.Argument(help="The shard folder (or its s3://, gs://, az://, https:// URL).")],
    limit: Annotated[int, typer.Option(help="Problems listed per file and check.")] = 10,
) -> None:
    """Check shard hashes, schema and every row's invariants; exit 1 on any problem."""
    from rich.console import Console

    from prep.remote import join
    from prep.verify import verify_summary, verify_shards

    from prep.load import split_names

    folders = [join(path, name) for name in split_names(path)] or [path]
    ok = True
    for folder in folders:
        report = verify_shards(folder, limit=limit)
        Console(soft_wrap=True).print(verify_summary(report))
        ok = ok and report.ok
    if not ok:
        raise typer.Exit(1)


def train(**flags: object) -> None:
    """Train a causal LM on packed shards (torchrun -m prep train ... for several GPUs)."""
    import json

    from prep.train import TrainConfig, finish_distributed, train_model

    metrics = train_model(TrainConfig(**flags))
    if int(os.environ.get("RANK", 0)) == 0:
        typer.echo(json.dumps(metrics))
    finish_distributed()


# The flags of `prep train` are TrainConfig's fields (prep.train_config), the same that `python -m prep.train` parses.
train.__signature__ = Signature(typer_parameters())  # type: ignore[attr-defined]
train.__annotations__ = {p.name: p.annotation for p in train.__signature__.parameters.values()}
app.command()(train)


class _Interrupted(BaseException):
    """Ctrl-C in the CLI: a BaseException that typer does not turn into a silent exit, so main() can report it."""


def _on_sigint(signum: int, frame: object) -> None:
    """Raise _Interrupted once and ignore further Ctrl-C, so the temp-file cleanup it triggers runs to the end."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    raise _Interrupted


def main() -> None:
    """Entry point: run the app; a PrepError becomes one red line on stderr and exit code 1.

    Ctrl-C (SIGINT) unwinds every stage's `with` block (temporary files and folders are deleted), then prints
    one line and exits with 130.
    """
    import signal

    from rich.console import Console
    from rich.text import Text

    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:  # not when SIGINT is ignored (nohup, &)
        signal.signal(signal.SIGINT, _on_sigint)
    try:
        app()
    except PrepError as e:
        from prep.remote import redact  # no credential of a URL reaches the terminal, whatever raised

        Console(stderr=True).print(Text(f"error: {redact(str(e))}", style="red"), soft_wrap=True)
        sys.exit(1)
    except (_Interrupted, KeyboardInterrupt):
        Console(stderr=True).print(Text("interrupted; no output written", style="red"), soft_wrap=True)
        sys.exit(130)
