"""The `prep` command line: flags -> config -> library call -> printed report.

Stage modules are imported inside the command functions, so `prep train` never imports pydantic.
Defaults here mirror schemas.config.ConvertConfig (tests/test_cli_convert.py checks they agree).
"""

from __future__ import annotations

import sys
from typing import Annotated, Optional

import typer

from prep.errors import PrepError

app = typer.Typer(
    name="prep",
    help="Turn raw instruction-tuning data into training-ready shards.",
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)


@app.command()
def convert(
    inputs: Annotated[list[str], typer.Argument(help="Input files, globs or save_to_disk folders (sorted).")],
    output: Annotated[str, typer.Option("--output", "-o", help="Output: .parquet writes Parquet, else JSON Lines.")],
    format: Annotated[str, typer.Option("--format", "-f", help="auto|alpaca|sharegpt|openai|transcript|unified")] = "auto",
    rejects: Annotated[Optional[str], typer.Option(help="Rejects JSONL [default: OUTPUT.rejects.jsonl].")] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace existing outputs.")] = False,
    strict: Annotated[bool, typer.Option("--strict", help="Exit 1 if any record is rejected.")] = False,
    dedup: Annotated[bool, typer.Option("--dedup", help="Drop exact duplicate conversations.")] = False,
) -> None:
    """Convert raw SFT data (Alpaca, ShareGPT, OpenAI, transcripts) to unified conversations."""
    from rich.console import Console

    from prep.convert import build_config, check_strict, convert_files
    from prep.report import render_report

    config = build_config(inputs=inputs, output=output, format=format, rejects=rejects, overwrite=overwrite,
                          strict=strict, dedup=dedup)
    report = convert_files(config, progress=sys.stderr.isatty())
    console = Console()
    console.print(render_report(report))
    console.print(f"wrote {report.total.accepted:,} conversations to {report.outputs['conversations']}, "
                  f"{report.total.rejected_total:,} rejects to {report.outputs['rejects']}", highlight=False)
    check_strict(config, report)


@app.command()
def schema() -> None:
    """Print the JSON Schema of the unified conversation form."""
    from prep.convert import unified_json_schema

    typer.echo(unified_json_schema())


def main() -> None:
    """Entry point: run the app; a PrepError becomes one red line on stderr and exit code 1."""
    try:
        app()
    except PrepError as e:
        from rich.console import Console
        from rich.text import Text

        Console(stderr=True).print(Text(f"error: {e}", style="red"), soft_wrap=True)
        sys.exit(1)
