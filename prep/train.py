"""`prep train`: a minimal trainer on packed prep shards, correct to the token.

Imports only torch, transformers, pyarrow, numpy, rich and the stdlib (no pydantic, no datasets).

    python -m prep.train shards/ -o out/ --max-steps 100                # one process (CPU or one GPU)
    torchrun --nproc-per-node 8 -m prep train shards/ -o out/ [--fsdp]  # DDP, or FSDP2 with --fsdp

Packed examples never see each other: every forward pass gets the explicit example boundaries of its attention
path (a block-diagonal causal mask for sdpa/eager, a BlockMask for flex_attention, cu_seq_lens for flash
attention), and any other path is refused. The loss of one optimizer step is the sum of token losses over all its
micro-batches and ranks divided by the number of trained tokens in that whole window, so its gradient is that of
one batch holding those rows.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import shutil
import sys
import time
from collections.abc import Iterator
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F

from prep.errors import ConfigError, OutputExistsError, PrepError
from prep.load import (
    IGNORE_INDEX,
    FLEX_PATHS,
    ISOLATED_PATHS,
    VARLEN_PATHS,
    Collator,
    PackedAttention,
    PackedDataset,
    Shards,
    load_shards,
    split_names,
)


@dataclass
class TrainConfig:
    """Every field is a `prep train` flag of the same name (underscores become dashes)."""

    shards: str = ""  # folder written by `prep pack` (required)
    out_dir: str = "out"  # receives checkpoints/, metrics.jsonl and the final model + tokenizer
    model: str = ""  # local folder or hub id for AutoModelForCausalLM; "" = random init from model_config
    model_config: str = "tiny"  # built-in config (prep.models.MODEL_CONFIGS) for a random-init run when model is ""
    # sdpa|eager|flex_attention|flash_attention_2|_3; auto = flash_attention_2 if installed (CUDA), else sdpa
    attn_implementation: str = "auto"
    batch_size: int = 8  # packed rows per micro-batch on each process
    grad_accum: int = 1  # micro-batches per optimizer step
    max_steps: int = 0  # optimizer steps; 0 = as many as `epochs` takes
    epochs: int = 1  # passes over the shards when max_steps is 0
    lr: float = 0.0  # peak learning rate; 0 = 1e-3 for a random-init model_config, 2e-5 for a pretrained model
    min_lr_ratio: float = 0.1  # the cosine schedule ends at lr * min_lr_ratio
    warmup_ratio: float = 0.05  # share of the steps with a linear warmup
    weight_decay: float = 0.0  # AdamW decay, on matrices only (never norms or biases); 0 is usual for SFT
    beta1: float = 0.9  # AdamW beta1
    beta2: float = 0.95  # AdamW beta2 (0.95 rather than 0.999: steadier with few, large batches)
    grad_clip: float = 1.0  # clip the global gradient norm to this; 0 = no clipping
    precision: str = "auto"  # auto = bf16 autocast on CUDA, fp32 elsewhere; or bf16 | fp32 (weights stay fp32)
    gradient_checkpointing: bool = False  # recompute activations in backward: much less memory, ~30% more compute
    compile: bool = False  # torch.compile the model (the first steps are slow)
    fsdp: bool = False  # with torchrun: shard weights, grads and optimizer state with FSDP2 instead of DDP
    seed: int = 0  # model init and data order
    log_every: int = 1  # steps between metrics.jsonl lines
    eval_every: int = 0  # steps between validation passes (and one at the end); 0 = only at the end
    eval_batches: int = 0  # micro-batches per rank in a validation pass; 0 = the whole validation split
    save_every: int = 0  # steps between checkpoints (and one at the last step); 0 = no checkpoints
    keep_checkpoints: int = 2  # newest checkpoints kept on disk
    resume: bool = False  # continue from the newest checkpoint in out_dir
    overwrite: bool = False  # start afresh in an out_dir that already holds a run (deletes its checkpoints/metrics)
    device: str = "auto"  # auto = cuda:LOCAL_RANK when CUDA is available, else cpu
    progress: bool = True  # live rich progress on rank 0
    peak_tflops: float = 0.0  # the device's dense peak (TFLOP/s) for MFU; 0 = bf16 peak of known GPUs, none on CPU
    trust_remote_code: bool = False  # let a hub model/tokenizer run its own code (never needed for shards from prep)


@dataclass(frozen=True)
class Dist:
    """Where this process sits: rank, world size and device."""

    rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        """Rank 0 writes files and draws the progress bar."""
        return self.rank == 0


@dataclass(frozen=True)
class Position:
    """Where the data stream stands: `batch` micro-batches of `epoch` have been consumed."""

    epoch: int = 0
    batch: int = 0


@dataclass
class MicroBatch:
    """One collated micro-batch and what it holds (real tokens and examples, padding excluded)."""

    inputs: dict[str, torch.Tensor]
    position: Position
    tokens: int
    examples: int
    squared_lengths: int  # sum of the squared example lengths (the attention work of the batch)


def setup_distributed(device: str = "auto") -> Dist:
    """Read torchrun's environment, start the process group if there are several ranks, pick the device."""
    rank, world_size = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if device == "auto":
        device = f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo")
    return Dist(rank=rank, world_size=world_size, device=dev)


def all_reduce_sum(values: list[float], d: Dist) -> list[float]:
    """Sum a few numbers over all ranks (float64 so token counts stay exact)."""
    t = torch.tensor(values, dtype=torch.float64, device=d.device)
    if d.world_size > 1:
        dist.all_reduce(t)
    return t.tolist()


def resolve_attention(requested: str, device: torch.device) -> str:
    """The attention path to load the model with; `auto` prefers flash_attention_2 on CUDA when installed."""
    if requested in FLEX_PATHS and device.type != "cuda":
        raise ConfigError(
            f"--attn-implementation {requested} trains only on CUDA (PyTorch has no CPU backward for it); "
            "use sdpa on the CPU"
        )
    if requested != "auto":
        return requested
    if device.type == "cuda":
        from transformers.utils import is_flash_attn_2_available

        if is_flash_attn_2_available():
            return "flash_attention_2"
    return "sdpa"


def build_model(config: TrainConfig, shards: Shards, device: torch.device):
    """Load or random-init the model (fp32 weights), resize embeddings to the tokenizer, move it to `device`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from prep.models import model_config

    tokenizer = AutoTokenizer.from_pretrained(shards.tokenizer_path, trust_remote_code=config.trust_remote_code)
    attn = resolve_attention(config.attn_implementation, device)
    torch.manual_seed(config.seed)
    kwargs = {"attn_implementation": attn, "dtype": torch.float32}
    if config.model:
        check_same_tokenizer(config.model, tokenizer, config.trust_remote_code)
        model = AutoModelForCausalLM.from_pretrained(config.model, trust_remote_code=config.trust_remote_code, **kwargs)
    else:
        tok = shards.manifest["tokenizer"]
        cfg = model_config(
            config.model_config,
            len(tokenizer),
            shards.max_len,
            tok.get("bos_token_id"),
            tok.get("eos_token_id"),
            shards.pad_token_id,
        )
        model = AutoModelForCausalLM.from_config(cfg, **kwargs)
    vocab = max(len(tokenizer), int(shards.manifest["tokenizer"].get("vocab_size", 0)))
    if vocab > model.get_input_embeddings().num_embeddings:
        model.resize_token_embeddings(vocab)  # the shards' tokenizer added marker tokens
    if config.gradient_checkpointing:  # renamed activation_checkpointing_enable in transformers 5.x
        getattr(model, "activation_checkpointing_enable", model.gradient_checkpointing_enable)()
    return model.to(device), tokenizer


def check_same_tokenizer(model_name: str, shards_tokenizer, trust_remote_code: bool = False) -> None:
    """Refuse shards packed with another tokenizer than the model's own: their ids would mean other tokens.

    Every token of the model's tokenizer must have the same id in the shards' tokenizer (which may add tokens,
    e.g. markers from `--add-special-tokens`). A model that ships no tokenizer is not checked.
    """
    from transformers import AutoTokenizer

    try:
        model_tokenizer = AutoTokenizer.from_pretrained(model_name, trust_remote_code=trust_remote_code)
    except Exception:  # OSError, ValueError...: the model has no (readable) tokenizer of its own
        return
    shard_vocab = shards_tokenizer.get_vocab()
    different = [t for t, i in model_tokenizer.get_vocab().items() if shard_vocab.get(t) != i]
    if different:
        raise ConfigError(
            f"--model {model_name}: the shards were packed with another tokenizer "
            f"({getattr(shards_tokenizer, 'name_or_path', '?')!r}; {len(different):,} of the model's "
            f"{len(model_tokenizer):,} tokens have other ids there, e.g. {different[0]!r}); pack again with "
            f"--tokenizer {model_name}"
        )


def warn_if_longer_than_context(model, shards: Shards) -> None:
    """Say so on stderr when an example is longer than the model's `max_position_embeddings`.

    Positions restart at every packed example, so the longest example, not the row length, is what counts.
    """
    import pyarrow.compute as pc

    context = getattr(model.config, "max_position_embeddings", None)
    if not context or shards.num_rows == 0:
        return
    longest = pc.max(pc.list_flatten(shards.table.column("seq_lengths"))).as_py() or 0
    if longest > context:
        print(
            f"warning: the longest example has {longest:,} tokens, more than the model's max_position_embeddings "
            f"({context:,}): positions past it were never trained (and are out of range for learned position "
            "embeddings); pack with a smaller --max-len or use a model with a longer context",
            file=sys.stderr,
        )


def check_packed_attention(model) -> PackedAttention:
    """How the model's packed examples are kept apart; ConfigError if its attention path or layers cannot be."""
    attn = model.config._attn_implementation
    if attn not in ISOLATED_PATHS:
        raise ConfigError(
            f"attn_implementation {attn!r} would let the examples of a packed row attend to each other (prep cannot "
            f"pass it explicit example boundaries); use --attn-implementation sdpa, eager, flex_attention or "
            "flash_attention_2"
        )
    return PackedAttention.of(model)


def wrap_model(model, config: TrainConfig, d: Dist):
    """torch.compile if asked, then DDP or FSDP2 (fully_shard per decoder layer) when there are several ranks."""
    if config.fsdp and d.world_size > 1:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh(d.device.type, (d.world_size,))
        block_names = set(getattr(model, "_no_split_modules", None) or [])
        for module in model.modules():
            if type(module).__name__ in block_names:
                fully_shard(module, mesh=mesh)
        fully_shard(model, mesh=mesh)
    if config.compile:
        model = torch.compile(model)
    if d.world_size > 1 and not config.fsdp:
        from torch.nn.parallel import DistributedDataParallel

        model = DistributedDataParallel(model, device_ids=[d.device.index] if d.device.type == "cuda" else None)
    return model


def configure_optimizer(model, config: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only; the fused kernel on CUDA."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": config.weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(
        groups, lr=peak_lr(config), betas=(config.beta1, config.beta2), fused=device.type == "cuda"
    )


def peak_lr(config: TrainConfig) -> float:
    """The configured peak learning rate, or the default for a random-init or a pretrained model."""
    if config.lr > 0:
        return config.lr
    return 2e-5 if config.model else 1e-3


def get_lr(step: int, total_steps: int, config: TrainConfig) -> float:
    """Linear warmup, then cosine decay from the peak to peak * min_lr_ratio at the last step.

    >>> round(get_lr(0, 100, TrainConfig(lr=1e-3, warmup_ratio=0.0)), 6)
    0.001
    """
    lr, warmup = peak_lr(config), int(config.warmup_ratio * total_steps)
    if step < warmup:
        return lr * (step + 1) / (warmup + 1)
    progress = (step - warmup) / max(1, total_steps - 1 - warmup)
    min_lr = lr * config.min_lr_ratio
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0))) * (lr - min_lr)


def total_steps(config: TrainConfig, batches_per_epoch: int) -> int:
    """Optimizer steps of the run: max_steps, or every whole accumulation window of `epochs` epochs."""
    if config.max_steps > 0:
        return config.max_steps
    return max(1, config.epochs * batches_per_epoch // config.grad_accum)


def micro_batches(dataset: PackedDataset, collate: Collator, batch_size: int, start: Position) -> Iterator[MicroBatch]:
    """Endless stream of micro-batches, epoch after epoch, starting at `start` (nothing before it is read)."""
    epoch, b = start.epoch, start.batch
    while True:
        dataset.set_epoch(epoch)
        n_batches = math.ceil(len(dataset) / batch_size)
        while b < n_batches:
            rows = [dataset[i] for i in range(b * batch_size, min((b + 1) * batch_size, len(dataset)))]
            b += 1
            lengths = torch.cat([r["seq_lengths"] for r in rows])
            yield MicroBatch(
                collate(rows), Position(epoch, b), int(lengths.sum()), len(lengths), int((lengths * lengths).sum())
            )
        epoch, b = epoch + 1, 0


def trained_tokens(labels: torch.Tensor) -> int:
    """Tokens the loss counts: labels that are not -100 after the causal shift."""
    return int((labels[:, 1:] != IGNORE_INDEX).sum())


def packed_logits(model, inputs: dict[str, torch.Tensor], attn: PackedAttention | str) -> torch.Tensor:
    """Logits of a micro-batch of packed rows, each example attending only to its own earlier tokens."""
    spec = attn if isinstance(attn, PackedAttention) else PackedAttention(attn)
    boundaries = spec.kwargs(inputs["position_ids"], dtype=torch.float32)
    # use_cache=False: with a KV cache transformers also drops its own packed-sequence detection (measured on 5.24).
    return model(
        input_ids=inputs["input_ids"], position_ids=inputs["position_ids"], use_cache=False, **boundaries
    ).logits


def token_losses(logits: torch.Tensor, labels: torch.Tensor, reduction: str = "sum") -> torch.Tensor:
    """Cross-entropy of next-token predictions against unshifted HF labels (-100 ignored), in fp32."""
    flat = F.cross_entropy(
        logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=IGNORE_INDEX, reduction=reduction
    )
    return flat if reduction == "sum" else flat.view(labels.shape[0], -1)


def token_loss_sum(model, inputs: dict[str, torch.Tensor], attn: PackedAttention | str) -> torch.Tensor:
    """Sum (not mean) of the token losses of a micro-batch, packed examples kept apart."""
    return token_losses(packed_logits(model, inputs, attn), inputs["labels"])


def grad_sync(model, enabled: bool):
    """Let DDP/FSDP2 all-reduce gradients only on the last micro-batch of an accumulation window."""
    if hasattr(model, "no_sync"):
        return nullcontext() if enabled else model.no_sync()
    if hasattr(model, "set_requires_gradient_sync"):
        model.set_requires_gradient_sync(enabled)
    return nullcontext()


def forward_backward(
    model, window: list[dict[str, torch.Tensor]], attn: PackedAttention | str, d: Dist, autocast=nullcontext
) -> tuple[float, float]:
    """Accumulate the gradient of sum(token losses) / (trained tokens over all micro-batches and ranks).

    DDP and FSDP average gradients over ranks, hence the factor world_size. Returns the summed loss of this
    rank and the global trained-token count.
    """
    (n_trained,) = all_reduce_sum([sum(trained_tokens(mb["labels"]) for mb in window)], d)  # counted on the host
    loss_sum = torch.zeros((), device=d.device)
    for i, mb in enumerate(window):
        inputs = {k: v.to(d.device, non_blocking=True) for k, v in mb.items() if torch.is_tensor(v)}
        with grad_sync(model, enabled=i == len(window) - 1):
            with autocast():
                s = token_loss_sum(model, inputs, attn)
            (s * d.world_size / max(n_trained, 1.0)).backward()
        loss_sum += s.detach()
    return loss_sum.item(), n_trained


def validation_set(config: TrainConfig, d: Dist) -> PackedDataset | None:
    """The validation rows of this rank (fixed order), or None when the shards have no validation split.

    Every rank gets the same number of rows (the last `rows % world_size` are left out), so every rank runs
    the same number of forward passes, as DDP and FSDP need.
    """
    if "validation" not in split_names(config.shards):
        if config.eval_every:
            raise ConfigError(f"--eval-every: {config.shards} has no validation split; pack it with --val-fraction")
        return None
    shards = load_shards(config.shards, split="validation")
    if shards.num_rows < d.world_size:
        return None
    return PackedDataset(shards, d.rank, d.world_size, seed=0, shuffle=False)


def evaluate(
    model,
    dataset: PackedDataset,
    collate: Collator,
    config: TrainConfig,
    attn: PackedAttention | str,
    d: Dist,
    autocast=nullcontext,
) -> dict[str, float]:
    """Validation loss (summed token loss / trained tokens, over all ranks) and perplexity, packed rows kept apart.

    >>> evaluate(model, val_rows, collate, TrainConfig(), "sdpa", Dist())  # doctest: +SKIP
    {'val_loss': 2.31, 'val_ppl': 10.07, 'val_tokens': 5120}
    """
    batches = micro_batches(dataset, collate, config.batch_size, Position())
    n_batches = math.ceil(len(dataset) / config.batch_size)
    if config.eval_batches:
        n_batches = min(n_batches, config.eval_batches)
    loss_sum, n_trained, was_training = 0.0, 0, model.training
    model.eval()
    with torch.no_grad():
        for _ in range(n_batches):
            inputs = {k: v.to(d.device) for k, v in next(batches).inputs.items() if torch.is_tensor(v)}
            with autocast():
                loss_sum += token_loss_sum(model, inputs, attn).item()
            n_trained += trained_tokens(inputs["labels"])
    model.train(was_training)
    loss_sum, n_trained = all_reduce_sum([loss_sum, n_trained], d)
    loss = loss_sum / max(n_trained, 1.0)
    return {"val_loss": loss, "val_ppl": math.exp(min(loss, 100.0)), "val_tokens": int(n_trained)}


def clip_gradients(model, max_norm: float) -> float:
    """Clip the global gradient norm (0 = only measure it); return the norm before clipping."""
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm if max_norm > 0 else float("inf"))
    return float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)


def autocast_for(precision: str, device: torch.device):
    """A context factory: bf16 autocast (weights stay fp32) or nothing."""
    if precision == "auto":
        precision = "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"
    if precision == "bf16":
        return lambda: torch.autocast(device.type, dtype=torch.bfloat16)
    if precision == "fp32":
        return nullcontext
    raise ConfigError(f"--precision {precision!r}: valid values are auto, bf16, fp32")


# Dense bf16 tensor-core peaks (FLOP/s) by device-name substring; the first match wins.
PEAK_BF16_FLOPS = [
    ("H100 PCIe", 756e12),
    ("H100 NVL", 835e12),
    ("GH200", 989e12),
    ("H100", 989e12),
    ("H200", 989e12),
    ("H800", 989e12),
    ("B200", 2250e12),
    ("A100", 312e12),
    ("A800", 312e12),
    ("L40S", 362e12),
]


def peak_flops(device: torch.device, precision: str, peak_tflops: float = 0.0) -> float | None:
    """`peak_tflops` if given, else the device's dense bf16 peak, or None (CPU, fp32 runs, unknown GPU: no MFU)."""
    if peak_tflops > 0:
        return peak_tflops * 1e12
    if device.type != "cuda" or precision == "fp32":
        return None
    name = torch.cuda.get_device_name(device)
    return next((flops for key, flops in PEAK_BF16_FLOPS if key in name), None)


@dataclass(frozen=True)
class FlopCount:
    """Training FLOPs of a decoder-only model, the usual way: 6·N per token for the matmuls (N without the input
    embedding lookup) plus 12·L·H·d_head per pair of a token and a token of its own example (attention scores and
    values, forward and backward). Attention is counted per example, so a packed row is not credited with
    attention between its examples, which the block-diagonal mask never computes."""

    per_token: float
    per_pair: float

    def step(self, tokens: int, squared_lengths: int) -> float:
        """FLOPs of a step over `tokens` real tokens whose examples' squared lengths sum to `squared_lengths`."""
        return self.per_token * tokens + self.per_pair * squared_lengths


def count_flops(model) -> FlopCount:
    """The FlopCount of `model` (before any wrapping)."""
    cfg = model.config
    n = sum(p.numel() for p in model.parameters())
    embed, head = model.get_input_embeddings(), model.get_output_embeddings()
    if head is None or head.weight is not embed.weight:
        n -= embed.weight.numel()
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    return FlopCount(6.0 * n, 12.0 * cfg.num_hidden_layers * cfg.num_attention_heads * head_dim)


def checkpoint_dir(out_dir: Path, step: int) -> Path:
    """out_dir/checkpoints/step-0000100."""
    return out_dir / "checkpoints" / f"step-{step:07d}"


def latest_checkpoint(out_dir: Path) -> Path:
    """The newest complete checkpoint in out_dir; ConfigError if there is none."""
    found = sorted((out_dir / "checkpoints").glob("step-???????")) if (out_dir / "checkpoints").is_dir() else []
    if not found:
        raise ConfigError(
            f"--resume: no checkpoint in {out_dir / 'checkpoints'}; run without --resume (and with --save-every N)"
        )
    return found[-1]


def save_checkpoint(
    out_dir: Path, step: int, position: Position, model, optimizer, config: TrainConfig, d: Dist
) -> None:
    """Write model, optimizer, step, data position and every rank's RNG state; atomically (tmp + rename)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    # Collective under FSDP2: every rank must call it; with cpu_offload only rank 0 gets the full tensors.
    model_sd, optim_sd = get_state_dict(
        model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
    )
    final = checkpoint_dir(out_dir, step)
    tmp = final.with_name(final.name + ".tmp")
    if d.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        meta = {"step": step, "position": asdict(position), "world_size": d.world_size, "config": asdict(config)}
        torch.save({"model": model_sd, "optimizer": optim_sd, **meta}, tmp / "state.pt")
    barrier(d)
    rng = {
        "cpu": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state(d.device) if d.device.type == "cuda" else None,
    }
    torch.save(rng, tmp / f"rng-{d.rank}.pt")
    barrier(d)
    if d.is_main:
        os.replace(tmp, final)
        for old in sorted((out_dir / "checkpoints").glob("step-???????"))[: -max(1, config.keep_checkpoints)]:
            shutil.rmtree(old)
    barrier(d)


def load_checkpoint(path: Path, model, optimizer, config: TrainConfig, d: Dist) -> tuple[int, Position]:
    """Restore model, optimizer and RNG from `path`; return (step, data position). Every rank reads the file."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

    state = torch.load(path / "state.pt", map_location="cpu", weights_only=True)
    saved = state["config"]
    for key in ("batch_size", "grad_accum", "seed", "shards"):
        if saved[key] != getattr(config, key):
            raise ConfigError(
                f"--resume: {path} was written with {key}={saved[key]!r}, this run has {getattr(config, key)!r}"
            )
    if state["world_size"] != d.world_size:
        raise ConfigError(
            f"--resume: {path} was written by {state['world_size']} processes, this run has {d.world_size}"
        )
    set_state_dict(
        model,
        optimizer,
        model_state_dict=state["model"],
        optim_state_dict=state["optimizer"],
        options=StateDictOptions(full_state_dict=True),
    )
    rng = torch.load(path / f"rng-{d.rank}.pt", weights_only=True)
    torch.set_rng_state(rng["cpu"])
    if rng["cuda"] is not None and d.device.type == "cuda":
        torch.cuda.set_rng_state(rng["cuda"], d.device)
    return state["step"], Position(**state["position"])


def save_final(out_dir: Path, model, tokenizer, d: Dist) -> None:
    """save_pretrained of the model (full weights, gathered under FSDP2) and the shards' tokenizer into out_dir."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
    )

    from prep.tokenizer_io import save_tokenizer

    state_dict = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    for name in tied_duplicates(model):  # gathered separately, tied weights no longer share storage
        state_dict.pop(name, None)
    if d.is_main:
        model.save_pretrained(out_dir, state_dict=state_dict)
        try:  # not save_pretrained alone: it can drop settings (prep.tokenizer_io)
            save_tokenizer(tokenizer, out_dir)
        except PrepError as e:  # the model is saved; the tokenizer files too, but AutoTokenizer reads them otherwise
            print(f"warning: {e}", file=sys.stderr)
    barrier(d)


def tied_duplicates(model) -> list[str]:
    """Names of parameters that are the same object as an earlier one (e.g. lm_head tied to the embeddings)."""
    seen: set[int] = set()
    duplicates = []
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in seen:
            duplicates.append(name)
        seen.add(id(p))
    return duplicates


def barrier(d: Dist) -> None:
    """Wait for every rank (no-op on one process)."""
    if d.world_size > 1:
        dist.barrier()


def prepare_out_dir(config: TrainConfig, d: Dist) -> Path:
    """Create out_dir; refuse to mix with an earlier run unless --resume or --overwrite."""
    out_dir = Path(config.out_dir)
    earlier = [p for p in (out_dir / "metrics.jsonl", out_dir / "checkpoints") if p.exists()]
    if earlier and not config.resume and not config.overwrite:
        raise OutputExistsError(
            f"{out_dir} already holds a run ({earlier[0].name}); pass --resume to continue or --overwrite"
        )
    if d.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        if config.overwrite and not config.resume:
            shutil.rmtree(out_dir / "checkpoints", ignore_errors=True)
            (out_dir / "metrics.jsonl").unlink(missing_ok=True)
    barrier(d)
    return out_dir


class MetricsLog:
    """metrics.jsonl: one JSON object per logged step, rank 0 only; resuming drops lines after the resumed step."""

    def __init__(self, path: Path, enabled: bool, resume_step: int):
        self.path, self.enabled = path, enabled
        if enabled and resume_step and path.exists():
            kept = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= resume_step]
            path.write_text("".join(line + "\n" for line in kept))

    def write(self, metrics: dict[str, Any]) -> None:
        """Append one line."""
        if self.enabled:
            with self.path.open("a") as f:
                f.write(json.dumps(metrics) + "\n")


def progress_bar(enabled: bool):
    """A rich progress bar with a free-text field for the live metrics."""
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    return Progress(
        TextColumn("[bold]train"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        TextColumn("{task.fields[metrics]}"),
        disable=not enabled,
    )


def describe(m: dict[str, Any]) -> str:
    """One line of live metrics for the progress bar."""
    text = (
        f"loss {m['loss']:.4f}  lr {m['lr']:.2e}  tok/s {m['tokens_per_s']:,.0f}"
        f" (trained {m['trained_tokens_per_s']:,.0f})  ex/step {m['examples']:.0f}"
    )
    return text + (f"  mfu {m['mfu']:.1%}" if "mfu" in m else "")


def train_model(config: TrainConfig) -> dict[str, Any]:
    """Train on packed shards; write checkpoints, metrics.jsonl and the final model + tokenizer to out_dir.

    Args:
        config: a TrainConfig (every field is a `prep train` flag).
    Returns:
        The metrics of the last step (step, loss, lr, tokens_per_s, ...) plus out_dir.
    Raises:
        ShardError: unreadable shards. ConfigError: bad options, or an attention path that would mix packed
        examples. OutputExistsError: out_dir holds a run and neither --resume nor --overwrite is given.

    >>> train_model(TrainConfig(shards="shards/", out_dir="out", max_steps=20))["step"]  # doctest: +SKIP
    20
    """
    check_config(config)
    d = setup_distributed(config.device)
    out_dir = prepare_out_dir(config, d)
    shards = load_shards(config.shards)
    raw_model, tokenizer = build_model(config, shards, d.device)
    attn = check_packed_attention(raw_model)
    if d.is_main:
        warn_if_longer_than_context(raw_model, shards)
    flops, peak = count_flops(raw_model), peak_flops(d.device, config.precision, config.peak_tflops)
    model = wrap_model(raw_model, config, d)
    optimizer = configure_optimizer(raw_model, config, d.device)
    dataset = PackedDataset(shards, d.rank, d.world_size, config.seed)
    validation = validation_set(config, d)
    collate = Collator(shards.max_len, shards.pad_token_id, padding_free=attn.implementation in VARLEN_PATHS)
    step, position = 0, Position()
    if config.resume:
        step, position = load_checkpoint(latest_checkpoint(out_dir), raw_model, optimizer, config, d)
    steps = total_steps(config, math.ceil(len(dataset) / config.batch_size))
    batches = micro_batches(dataset, collate, config.batch_size, position)
    autocast = autocast_for(config.precision, d.device)
    log = MetricsLog(out_dir / "metrics.jsonl", d.is_main, step)
    model.train()
    metrics: dict[str, Any] = {}
    with progress_bar(config.progress and d.is_main) as bar:
        task = bar.add_task("train", total=steps, completed=step, metrics="")
        while step < steps:
            t0 = time.perf_counter()
            lr = get_lr(step, steps, config)
            for group in optimizer.param_groups:
                group["lr"] = lr
            window = [next(batches) for _ in range(config.grad_accum)]
            loss_sum, n_trained = forward_backward(model, [mb.inputs for mb in window], attn, d, autocast)
            grad_norm = clip_gradients(model, config.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step, position = step + 1, window[-1].position
            loss_sum, tokens, examples, squared_lengths = all_reduce_sum(
                [
                    loss_sum,
                    sum(mb.tokens for mb in window),
                    sum(mb.examples for mb in window),
                    sum(mb.squared_lengths for mb in window),
                ],
                d,
            )
            dt = time.perf_counter() - t0
            metrics = {
                "step": step,
                "epoch": position.epoch,
                "loss": loss_sum / max(n_trained, 1.0),
                "lr": lr,
                "grad_norm": grad_norm,
                "tokens": int(tokens),
                "trained_tokens": int(n_trained),
                "examples": int(examples),
                "tokens_per_s": tokens / dt,
                "trained_tokens_per_s": n_trained / dt,
                "step_time_s": dt,
            }
            if peak:
                metrics["mfu"] = flops.step(tokens, squared_lengths) / dt / (peak * d.world_size)
            if step % config.log_every == 0 or step == steps:
                log.write(metrics)
            bar.update(task, completed=step, metrics=describe(metrics))
            if validation is not None and (step == steps or config.eval_every and step % config.eval_every == 0):
                scores = evaluate(model, validation, collate, config, attn, d, autocast)
                log.write({"step": step, "split": "validation", **scores})
                metrics.update(scores)
            if config.save_every and (step % config.save_every == 0 or step == steps):
                save_checkpoint(out_dir, step, position, raw_model, optimizer, config, d)
    save_final(out_dir, raw_model, tokenizer, d)
    return {**metrics, "out_dir": str(out_dir)}


def check_config(config: TrainConfig) -> None:
    """Reject options no run can use, naming the flag."""
    if not config.shards:
        raise ConfigError("no shards folder given: `prep train SHARDS -o OUT`")
    for name in ("batch_size", "grad_accum", "epochs", "log_every", "keep_checkpoints"):
        if getattr(config, name) < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(config, name)}")
    non_negative = ("max_steps", "save_every", "lr", "weight_decay", "grad_clip", "eval_every", "eval_batches",
                    "peak_tflops")
    for name in non_negative:
        if getattr(config, name) < 0:
            raise ConfigError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(config, name)}")
    if not 0 <= config.warmup_ratio < 1 or not 0 <= config.min_lr_ratio <= 1:
        raise ConfigError("--warmup-ratio must be in [0, 1) and --min-lr-ratio in [0, 1]")
    if config.resume and config.overwrite:
        raise ConfigError("--resume and --overwrite exclude each other")


def parse_args(argv: list[str] | None = None) -> TrainConfig:
    """A TrainConfig from command-line flags (one per field), for `python -m prep.train` before the typer CLI."""
    parser = argparse.ArgumentParser(prog="prep train", description="Train a causal LM on packed prep shards.")
    parser.add_argument("shards")
    parser.add_argument("-o", "--out-dir", default=TrainConfig.out_dir)
    for f in dataclasses.fields(TrainConfig):
        if f.name in ("shards", "out_dir"):
            continue
        flag = "--" + f.name.replace("_", "-")
        if isinstance(f.default, bool):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default)
        else:
            parser.add_argument(flag, type=type(f.default), default=f.default)
    return TrainConfig(**vars(parser.parse_args(argv)))


def finish_distributed() -> None:
    """End a torchrun rank after a finished run: wait for every rank, tear down the group, leave at once.

    Once DDP or FSDP has used a gloo group, PyTorch keeps its worker threads alive past destroy_process_group,
    and they can abort the process while the interpreter shuts down (SIGABRT, "terminate called without an
    active exception"), turning a finished run into a failed one. Every output is closed by now, so the rank
    flushes stdout/stderr and leaves with os._exit(0), skipping that shutdown. No-op on a single process.
    """
    if not dist.is_initialized():
        return
    dist.barrier()  # no rank tears down the store while another still uses it
    dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def main(argv: list[str] | None = None) -> None:
    """Entry point of `python -m prep.train` / `torchrun -m prep.train`: errors become one line and exit code 1."""
    try:
        metrics = train_model(parse_args(argv))
    except PrepError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    if int(os.environ.get("RANK", 0)) == 0:
        print(json.dumps(metrics))
    finish_distributed()


if __name__ == "__main__":
    main()
