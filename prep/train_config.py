"""`TrainConfig`: every `prep train` flag, declared once (name, default, help, flag names).

Both command lines are built from these fields: `python -m prep.train` (argparse, `argument_parser`) and the
typer command `prep train` (prep.cli, through `typer_parameters`). A help text states what a value means; the
default comes from the field (argparse and typer print it), so no help text restates it.
Standard library only: prep.cli imports it to build `prep train` without importing torch.

>>> parse_args(["shards/", "-o", "run", "--max-steps", "3", "--no-progress"]).max_steps
3
"""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass
from typing import Any

ATTENTION_CHOICES = "auto|sdpa|eager|flex_attention|flash_attention_2|flash_attention_3"


def _flag(default: Any, help: str, *names: str) -> Any:
    """A TrainConfig field: its default, its help text and, where they differ from `--name-with-dashes`, its flags."""
    return dataclasses.field(default=default, metadata={"help": help, "flags": names})


@dataclass
class TrainConfig:
    """Every field is a `prep train` flag of the same name (underscores become dashes); `shards` is positional."""

    shards: str = _flag("", "Folder (or URL) written by `prep pack`.")
    out_dir: str = _flag("out", "Checkpoints, metrics.jsonl and the final model + tokenizer.", "-o", "--out-dir")
    model: str = _flag("", "Local folder or hub id for AutoModelForCausalLM; empty = random init from --model-config.")
    model_config: str = _flag("tiny", "Built-in config for a random-init run (prep.models): tiny|small|0.5b|0.5b-qwen.")
    attn_implementation: str = _flag("auto", f"{ATTENTION_CHOICES} (auto: flash_attention_2 if installed on CUDA, "
                                             "else sdpa).")
    batch_size: int = _flag(8, "Packed rows per micro-batch on each process.")
    grad_accum: int = _flag(1, "Micro-batches per optimizer step.")
    max_steps: int = _flag(0, "Optimizer steps; 0 = as many as --epochs takes.")
    epochs: int = _flag(1, "Passes over the shards when --max-steps is 0.")
    lr: float = _flag(0.0, "Peak learning rate; 0 = 1e-3 for a random-init model, 2e-5 for a pretrained one.")
    min_lr_ratio: float = _flag(0.1, "The cosine schedule ends at lr * this.")
    warmup_ratio: float = _flag(0.05, "Share of the steps with a linear warmup.")
    weight_decay: float = _flag(0.0, "AdamW decay, on matrices only (never norms or biases); 0 is usual for SFT.")
    beta1: float = _flag(0.9, "AdamW beta1.")
    beta2: float = _flag(0.95, "AdamW beta2 (below 0.999: steadier with few, large batches).")
    grad_clip: float = _flag(1.0, "Clip the global gradient norm to this; 0 = no clipping.")
    precision: str = _flag("auto", "auto (bf16 autocast on CUDA, fp32 elsewhere) | bf16 | fp32; weights stay fp32.")
    gradient_checkpointing: bool = _flag(False, "Recompute activations in backward: much less memory, ~30% more "
                                                "compute.")
    compile: bool = _flag(False, "torch.compile the model (the first steps are slow).")
    fsdp: bool = _flag(False, "With torchrun: shard weights, grads and optimizer state with FSDP2 instead of DDP.")
    seed: int = _flag(0, "Model init and data order.")
    log_every: int = _flag(1, "Steps between metrics.jsonl lines.")
    eval_every: int = _flag(0, "Steps between validation passes (and one at the end); 0 = only at the end, when "
                               "the shards have a validation split.")
    eval_batches: int = _flag(0, "Micro-batches per rank in a validation pass; 0 = the whole validation split.")
    save_every: int = _flag(0, "Steps between checkpoints (and one at the last step); 0 = no checkpoints.")
    keep_checkpoints: int = _flag(2, "Newest checkpoints kept on disk.")
    resume: bool = _flag(False, "Continue from the newest checkpoint in --out-dir.")
    overwrite: bool = _flag(False, "Start afresh in an --out-dir that already holds a run (deletes its checkpoints "
                                   "and metrics).")
    device: str = _flag("auto", "auto = cuda:LOCAL_RANK when CUDA is available, else cpu.")
    progress: bool = _flag(True, "Live progress on rank 0 (plain periodic lines when not on a terminal).")
    peak_tflops: float = _flag(0.0, "The device's dense peak TFLOP/s for MFU; 0 = the bf16 peak of known GPUs, "
                                    "none on CPU.")
    trust_remote_code: bool = _flag(False, "Let a hub model/tokenizer run its own code (never needed for shards "
                                           "from prep).", "--trust-remote-code")


POSITIONAL = ("shards",)  # fields given as arguments rather than flags


def flag_names(f: dataclasses.Field) -> tuple[str, ...]:
    """The command-line names of a TrainConfig field: its declared flags, else `--name-with-dashes`.

    >>> [flag_names(f) for f in dataclasses.fields(TrainConfig)[1:3]]
    [('-o', '--out-dir'), ('--model',)]
    """
    return f.metadata["flags"] or ("--" + f.name.replace("_", "-"),)


def argument_parser() -> argparse.ArgumentParser:
    """The parser of `python -m prep.train`: one argument per TrainConfig field, help and default from the field."""
    parser = argparse.ArgumentParser(prog="prep train", description="Train a causal LM on packed prep shards.",
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    for f in dataclasses.fields(TrainConfig):
        help = f.metadata["help"].replace("%", "%%")  # argparse formats help with %
        if f.name in POSITIONAL:
            parser.add_argument(f.name, help=help)
        elif isinstance(f.default, bool):
            parser.add_argument(*flag_names(f), dest=f.name, action=argparse.BooleanOptionalAction,
                                default=f.default, help=help)
        else:
            parser.add_argument(*flag_names(f), dest=f.name, type=type(f.default), default=f.default, help=help)
    return parser


def parse_args(argv: list[str] | None = None) -> TrainConfig:
    """A TrainConfig from command-line flags (one per field), for `python -m prep.train`.

    >>> parse_args(["shards/", "--lr", "1e-4"]).lr
    0.0001
    """
    return TrainConfig(**vars(argument_parser().parse_args(argv)))


def typer_parameters() -> list[Any]:
    """The parameters of the typer command `prep train` (inspect.Parameter, typer annotations), one per field.

    Imports typer only when called (prep.cli calls it; `python -m prep.train` never does).
    """
    import inspect
    from typing import Annotated

    import typer

    params = []
    for f in dataclasses.fields(TrainConfig):
        kind = type(f.default)
        if f.name in POSITIONAL:
            info = typer.Argument(help=f.metadata["help"])
        elif kind is bool and not f.metadata["flags"]:
            flag = flag_names(f)[0]
            info = typer.Option(f"{flag}/--no-{flag[2:]}", help=f.metadata["help"])
        else:
            info = typer.Option(*flag_names(f), help=f.metadata["help"])
        params.append(inspect.Parameter(f.name, inspect.Parameter.POSITIONAL_OR_KEYWORD,
                                        default=inspect.Parameter.empty if f.name in POSITIONAL else f.default,
                                        annotation=Annotated[kind, info]))
    return params
