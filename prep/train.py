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

import json
import math
import os
import shutil
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F

from prep.errors import ConfigError, OutputExistsError, PrepError
from prep.load import (
    FLEX_ON_CPU,
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
from prep.train_config import TrainConfig, parse_args  # noqa: F401 (the flags, declared once; re-exported)


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

    inputs: dict[str, Any]
    position: Position
    tokens: int
    examples: int
    causal_pairs: int  # sum of n(n+1)/2 over its examples of n tokens: the (query, key) pairs causal attention computes


def setup_distributed(device: str = "auto") -> Dist:
    """Read torchrun's environment, start the process group if there are several ranks, pick the device."""
    rank, world_size = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    dev = resolve_device(device, int(os.environ.get("LOCAL_RANK", 0)), world_size)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo")
    return Dist(rank=rank, world_size=world_size, device=dev)


def resolve_device(
    device: str, local_rank: int = 0, world_size: int = 1, cuda_available: bool | None = None
) -> torch.device:
    """This process's device: `auto` is cuda when CUDA is available, else cpu; `cuda` without an index becomes
    cuda:LOCAL_RANK (under torchrun each rank takes its own GPU); an explicit index is kept on one process.

    Raises:
        ConfigError: an unknown device, or an explicit cuda index under torchrun (every rank on one GPU).

    >>> resolve_device("cuda", local_rank=3, world_size=8)
    device(type='cuda', index=3)
    >>> resolve_device("auto", cuda_available=False)
    device(type='cpu')
    """
    if device == "auto":
        device = "cuda" if (torch.cuda.is_available() if cuda_available is None else cuda_available) else "cpu"
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError) as e:
        raise ConfigError(f"--device {device!r}: {e}; use auto, cpu, cuda or cuda:N") from e
    if dev.type != "cuda":
        return dev
    if dev.index is None:
        return torch.device("cuda", local_rank)
    if world_size > 1:
        raise ConfigError(
            f"--device {device} under torchrun would put all {world_size} ranks on one GPU; pass --device cuda "
            "(or auto): each rank then takes cuda:LOCAL_RANK"
        )
    return dev


def all_reduce_sum(values: list[float], d: Dist) -> list[float]:
    """Sum a few numbers over all ranks (float64 so token counts stay exact)."""
    t = torch.tensor(values, dtype=torch.float64, device=d.device)
    if d.world_size > 1:
        dist.all_reduce(t)
    return t.tolist()


def resolve_attention(requested: str, device: torch.device) -> str:
    """The attention path to load the model with; `auto` prefers flash_attention_2 on CUDA when installed."""
    if requested in FLEX_PATHS and device.type != "cuda":
        raise ConfigError(f"--attn-implementation {requested} trains only on CUDA: {FLEX_ON_CPU}")
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

    from prep.models import VOCAB_MULTIPLE, model_config, padded_vocab

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
            padded_vocab(len(tokenizer)),
            shards.max_len,
            tok.get("bos_token_id"),
            tok.get("eos_token_id"),
            shards.pad_token_id,
        )
        with device:  # initialised where it trains: a 0.5B model takes seconds on the CPU, a fraction on a GPU
            model = AutoModelForCausalLM.from_config(cfg, **kwargs)
    vocab = max(len(tokenizer), int(shards.manifest["tokenizer"].get("vocab_size", 0)))
    if vocab > model.get_input_embeddings().num_embeddings:
        model.resize_token_embeddings(vocab, pad_to_multiple_of=VOCAB_MULTIPLE)  # the tokenizer added markers
    if config.gradient_checkpointing:  # renamed activation_checkpointing_enable in transformers 5.x
        getattr(model, "activation_checkpointing_enable", model.gradient_checkpointing_enable)()
    if attn in FLEX_PATHS:
        cast_flex_attention_inputs()
    return model.to(device), tokenizer


def cast_flex_attention_inputs() -> None:
    """Make transformers' flex_attention path hand the kernel q, k and v in the autocast dtype when autocast is on.

    Under bf16 autocast with fp32 weights, the rotary embedding leaves q and k in fp32 while v is bf16. sdpa is cast
    by autocast itself, but flex_attention is on none of autocast's lists: older torch rejects the mix, newer torch
    upcasts k and v and runs the whole attention in fp32 (several times slower). prep casts the three as autocast
    would. Idempotent; without autocast the inputs pass unchanged.
    """
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    current = ALL_ATTENTION_FUNCTIONS["flex_attention"]
    if not getattr(current, "casts_to_autocast_dtype", False):
        ALL_ATTENTION_FUNCTIONS["flex_attention"] = autocast_dtype_inputs(current)


def autocast_dtype_inputs(attention: Callable) -> Callable:
    """`attention(module, q, k, v, ...)` with q, k, v cast to the autocast dtype of their device when autocast is on.

    >>> f = autocast_dtype_inputs(lambda m, q, k, v, *a, **kw: (q.dtype, k.dtype, v.dtype))
    >>> with torch.autocast("cpu", dtype=torch.bfloat16):
    ...     f(None, torch.ones(1), torch.ones(1), torch.ones(1, dtype=torch.bfloat16))
    (torch.bfloat16, torch.bfloat16, torch.bfloat16)
    """

    def cast(module, query, key, value, *args, **kwargs):
        kind = query.device.type
        if torch.is_autocast_enabled(kind):
            dtype = torch.get_autocast_dtype(kind)
            query, key, value = (t.to(dtype) if t.is_floating_point() else t for t in (query, key, value))
        return attention(module, query, key, value, *args, **kwargs)

    cast.casts_to_autocast_dtype = True
    return cast


# Files of which at least one is in every tokenizer that AutoTokenizer loads from a folder.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "vocab.txt",
                   "spiece.model", "sentencepiece.bpe.model", "tokenizer.tiktoken")


def check_same_tokenizer(model_name: str, shards_tokenizer, trust_remote_code: bool = False) -> None:
    """Refuse shards packed with another tokenizer than the model's own: their ids would mean other tokens.

    Every token of the model's tokenizer must have the same id in the shards' tokenizer (which may add tokens,
    e.g. markers from `--add-special-tokens`). A model folder without any tokenizer file is not checked, and
    stderr says so; a tokenizer that is there but cannot be loaded is an error, never a skipped check.

    Raises:
        ConfigError: different ids, or the model's tokenizer fails to load.
    """
    from transformers import AutoTokenizer

    folder = Path(model_name)
    if folder.is_dir() and not any((folder / name).exists() for name in TOKENIZER_FILES):
        print(
            f"warning: --model {model_name} ships no tokenizer, so the shards' token ids are not checked against "
            "the model's; make sure the shards were packed with the tokenizer this model was trained with",
            file=sys.stderr,
        )
        return
    try:
        model_tokenizer = AutoTokenizer.from_pretrained(model_name, trust_remote_code=trust_remote_code)
    except Exception as e:  # OSError, ValueError, a tokenizer library error...: whatever it is, say it
        reason = (str(e).strip().splitlines() or [""])[0][:300]
        raise ConfigError(
            f"--model {model_name}: its tokenizer cannot be loaded ({type(e).__name__}: {reason}), so the shards' "
            "token ids cannot be checked against it; fix the model's tokenizer files (a model folder without "
            "any tokenizer file trains unchecked, with a warning)"
        ) from e
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
    """Compile the decoder layers in place if asked, then DDP or FSDP2 (fully_shard per layer) on several ranks.

    Compiling layer by layer (see compile_layers) keeps DDP's and FSDP2's hooks outside the compiled graphs: DDP
    all-reduces each layer's gradients as soon as its compiled backward is done, overlapping the rest of the
    backward pass, as in eager mode (a whole-model compile applied before DDP would disable that overlap).
    The model keeps its own module tree and state-dict keys.
    """
    if config.compile:
        compile_layers(model)
    if config.fsdp and d.world_size > 1:
        shard_model(model, d, resolve_precision(config.precision, d.device))
    elif d.world_size > 1:
        from torch.nn.parallel import DistributedDataParallel

        model = DistributedDataParallel(model, device_ids=[d.device.index] if d.device.type == "cuda" else None)
    return model


def compile_layers(model) -> list[torch.nn.Module]:
    """torch.compile every decoder layer in place (regional compilation); the whole model if it names no layer type.

    The layers run the same code on same-shaped inputs, so they share one compiled graph: compiling costs about
    one layer's time rather than the whole model's, for most of the speed-up (fused norms, activations and
    residuals inside each layer; the embeddings, the head and the loss stay eager). Returns what was compiled.
    """
    names = set(getattr(model, "_no_split_modules", None) or [])
    layers = [m for m in model.modules() if type(m).__name__ in names] or [model]
    for layer in layers:
        layer.compile()
    return layers


def shard_model(model, d: Dist, precision: str) -> None:
    """FSDP2 in place: fully_shard every decoder layer, then the whole model, over all ranks of `d`."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(d.device.type, (d.world_size,))
    policy = fsdp_mixed_precision(precision)
    kwargs = {"mesh": mesh} if policy is None else {"mesh": mesh, "mp_policy": policy}
    block_names = set(getattr(model, "_no_split_modules", None) or [])
    for module in model.modules():
        if type(module).__name__ in block_names:
            fully_shard(module, **kwargs)
    fully_shard(model, **kwargs)


def fsdp_mixed_precision(precision: str):
    """FSDP2's policy for a bf16 run: weights gathered in bf16, gradients reduced in fp32; None for fp32.

    FSDP2 without a policy gathers fp32 weights and reduces fp32 gradients, and autocast then re-casts every weight
    in every micro-batch. The fp32 master weights and optimizer state stay sharded either way.

    >>> fsdp_mixed_precision("bf16").param_dtype
    torch.bfloat16
    """
    if precision != "bf16":
        return None
    try:
        from torch.distributed.fsdp import MixedPrecisionPolicy
    except ImportError:  # torch < 2.6 kept FSDP2 under _composable
        from torch.distributed._composable.fsdp import MixedPrecisionPolicy
    return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)


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
                collate(rows), Position(epoch, b), int(lengths.sum()), len(lengths), int((lengths * (lengths + 1)).sum()) // 2
            )
        epoch, b = epoch + 1, 0


def take_window(batches: Iterator[MicroBatch], n: int, pin: bool) -> list[MicroBatch]:
    """The next `n` micro-batches; their tensors in pinned memory when `pin` (CUDA), so copies to the GPU are async."""
    window = [next(batches) for _ in range(n)]
    if pin:
        for mb in window:
            mb.inputs = {k: v.pin_memory() if torch.is_tensor(v) else v for k, v in mb.inputs.items()}
    return window


def to_device(inputs: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """The batch's tensors on `device` (asynchronous from pinned memory); ints such as max_length_q stay as they are."""
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in inputs.items()}


def trained_tokens(labels: torch.Tensor) -> int:
    """Tokens the loss counts: labels that are not -100 after the causal shift."""
    return int((labels[:, 1:] != IGNORE_INDEX).sum())


VARLEN_KEYS = ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k")


def packed_logits(model, inputs: dict[str, Any], attn: PackedAttention | str) -> torch.Tensor:
    """Logits of a micro-batch of packed rows, each example attending only to its own earlier tokens."""
    boundaries = example_boundaries(inputs, attn)
    # use_cache=False: with a KV cache transformers also drops its own packed-sequence detection (measured on 5.24).
    return model(
        input_ids=inputs["input_ids"], position_ids=inputs["position_ids"], use_cache=False, **boundaries
    ).logits


def example_boundaries(inputs: dict[str, Any], attn: PackedAttention | str) -> dict[str, Any]:
    """The packed-example boundaries of a batch in the form its attention path takes.

    On the flash paths the collator's cu_seq_lens and max lengths (computed on the host) are used as they are:
    rebuilding them from position_ids on the GPU would cost two host syncs per micro-batch.

    >>> rows = [{"input_ids": [1, 2, 3], "labels": [1, 2, 3], "position_ids": [0, 1, 0]}]
    >>> batch = Collator(8, 0, padding_free=True)(rows)
    >>> example_boundaries(batch, "flash_attention_2")["cu_seq_lens_q"] is batch["cu_seq_lens_q"]
    True
    """
    spec = attn if isinstance(attn, PackedAttention) else PackedAttention(attn)
    if spec.implementation in VARLEN_PATHS and all(k in inputs for k in VARLEN_KEYS):
        return {k: inputs[k] for k in VARLEN_KEYS}
    return spec.kwargs(inputs["position_ids"], dtype=torch.float32)


LOSS_CHUNK_ELEMENTS = 2**27  # logits per cross-entropy chunk: 512 MiB in fp32


def token_losses(logits: torch.Tensor, labels: torch.Tensor, reduction: str = "sum") -> torch.Tensor:
    """Cross-entropy of next-token predictions against unshifted HF labels (-100 ignored), in fp32.

    reduction="sum" (training and evaluation) works through chunks of about LOSS_CHUNK_ELEMENTS logits, each cast
    to fp32 on its own, and computes the gradient with respect to the logits in the same pass (softmax minus the
    one-hot target, in the logits' dtype). Autograd then keeps that gradient instead of the logits, and no fp32
    copy of all batch x length x vocab logits ever exists: such a copy takes about 17 GB for a 128k vocabulary at
    8 x 4096, and the plain loss keeps two (the cast and the log-softmax). Its backward pass runs once.
    "none" gives the (batch, length - 1) per-token losses.

    >>> logits, labels = torch.zeros(1, 3, 5), torch.tensor([[-100, 1, 2]])
    >>> round(token_losses(logits, labels).item(), 4)  # two tokens at log(5) each
    3.2189
    """
    if reduction != "sum":
        flat = F.cross_entropy(
            logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=IGNORE_INDEX, reduction="none"
        )
        return flat.view(labels.shape[0], -1)
    ignore = labels.new_full((labels.shape[0], 1), IGNORE_INDEX)
    targets = torch.cat([labels[:, 1:], ignore], dim=1).flatten()  # each position's next token; -100 at row ends
    return _ChunkedCrossEntropy.apply(logits.flatten(0, 1), targets)  # a view: the logits are not copied


class _ChunkedCrossEntropy(torch.autograd.Function):
    """Summed cross-entropy of (tokens, vocab) logits, chunk by chunk, its gradient computed in the forward pass."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        chunk = max(1, LOSS_CHUNK_ELEMENTS // logits.shape[-1])
        grad = torch.empty_like(logits) if ctx.needs_input_grad[0] else None
        total = torch.zeros((), dtype=torch.float32, device=logits.device)
        for start in range(0, logits.shape[0], chunk):
            t = targets[start : start + chunk]
            valid, index = (t != IGNORE_INDEX)[:, None], t.clamp(min=0)[:, None]
            logp = torch.log_softmax(logits[start : start + chunk].float(), dim=-1)
            total -= (logp.gather(1, index) * valid).sum()
            if grad is not None:  # d(loss)/d(logits) = softmax - one_hot(target), zero where the target is ignored
                probs = logp.exp_().scatter_add_(1, index, torch.full_like(index, -1, dtype=logp.dtype))
                grad[start : start + chunk] = probs.mul_(valid)
        ctx.save_for_backward(grad)
        ctx.used = False
        return total

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        if ctx.used:
            raise RuntimeError("token_losses: the backward pass of the summed loss runs once (retain_graph is not "
                               "supported: its gradient is scaled in place)")
        ctx.used = True
        (grad,) = ctx.saved_tensors
        chunk = max(1, LOSS_CHUNK_ELEMENTS // grad.shape[-1])
        for part in grad.split(chunk):  # scaled in fp32, chunk by chunk: a bf16 scale would be off by up to 0.4 %
            part.copy_(part.float().mul_(grad_output))
        return grad, None


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
    model, window: list[dict[str, Any]], attn: PackedAttention | str, d: Dist, autocast=nullcontext
) -> tuple[torch.Tensor, float]:
    """Accumulate the gradient of sum(token losses) / (trained tokens over all micro-batches and ranks).

    DDP and FSDP average gradients over ranks, hence the factor world_size. Returns the summed loss of this
    rank (a device scalar: reading it would wait for the GPU) and the global trained-token count. The tokens are
    counted on the host from the CPU batches, so one process never waits for the GPU here.
    """
    n_trained = float(sum(trained_tokens(mb["labels"]) for mb in window))
    if d.world_size > 1:
        (n_trained,) = all_reduce_sum([n_trained], d)
    loss_sum = torch.zeros((), device=d.device)
    for i, mb in enumerate(window):
        inputs = to_device(mb, d.device)
        with grad_sync(model, enabled=i == len(window) - 1):
            with autocast():
                s = token_loss_sum(model, inputs, attn)
            (s * d.world_size / max(n_trained, 1.0)).backward()
        loss_sum += s.detach()
    return loss_sum, n_trained


def validation_set(config: TrainConfig, d: Dist) -> ValidationRows | None:
    """The validation rows of this rank (see ValidationRows), or None when the shards have no validation split.

    Raises:
        ConfigError: --eval-every on shards without a validation split, or with an empty one (without
            --eval-every an empty split is said on stderr and skipped).
    """
    if "validation" not in split_names(config.shards):
        if config.eval_every:
            raise ConfigError(f"--eval-every: {config.shards} has no validation split; pack it with --val-fraction")
        return None
    shards = load_shards(config.shards, split="validation")
    if shards.num_rows == 0:
        message = f"{shards.path}: the validation split has no rows; pack with a larger --val-fraction"
        if config.eval_every:
            raise ConfigError(f"--eval-every: {message}")
        if d.is_main:
            print(f"warning: {message} (no validation loss is reported)", file=sys.stderr)
        return None
    return ValidationRows(shards, d.rank, d.world_size)


class ValidationRows(torch.utils.data.Dataset):
    """Every validation row exactly once over all ranks, in file order: rank r takes rows r, r + world_size, ...

    Each rank gets ceil(rows / world_size) items, so every rank runs the same number of forward passes, as DDP and
    FSDP need, even with fewer rows than ranks. The items past the last row repeat row 0 with every label -100:
    they add nothing to the loss or to the trained-token count.

    >>> [len(ValidationRows(shards_of_5_rows, rank, 2)) for rank in (0, 1)]  # doctest: +SKIP
    [3, 3]
    """

    def __init__(self, shards: Shards, rank: int = 0, world_size: int = 1):
        self.rows = PackedDataset(shards, shuffle=False)
        per_rank = math.ceil(len(self.rows) / world_size)
        self.indices = [rank + i * world_size for i in range(per_rank)]

    def set_epoch(self, epoch: int) -> None:
        """The order is fixed (PackedDataset's interface)."""

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        row = self.indices[index]
        if row < len(self.rows):
            return self.rows[row]
        filler = self.rows[0]
        return {**filler, "labels": torch.full_like(filler["labels"], IGNORE_INDEX)}


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
            inputs = to_device(next(batches).inputs, d.device)
            with autocast():
                loss_sum += token_loss_sum(model, inputs, attn).item()
            n_trained += trained_tokens(inputs["labels"])
    model.train(was_training)
    loss_sum, n_trained = all_reduce_sum([loss_sum, n_trained], d)
    loss = loss_sum / max(n_trained, 1.0)
    return {"val_loss": loss, "val_ppl": math.exp(min(loss, 100.0)), "val_tokens": int(n_trained)}


def clip_gradients(model, max_norm: float) -> torch.Tensor:
    """Clip the global gradient norm (0 = only measure it); return the norm before clipping, as a device scalar."""
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm if max_norm > 0 else float("inf"))
    return norm.full_tensor() if hasattr(norm, "full_tensor") else norm


def resolve_precision(precision: str, device: torch.device) -> str:
    """bf16 or fp32: `auto` is bf16 on a CUDA device that supports it, else fp32.

    >>> resolve_precision("auto", torch.device("cpu"))
    'fp32'
    """
    if precision == "auto":
        return "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"
    if precision not in ("bf16", "fp32"):
        raise ConfigError(f"--precision {precision!r}: valid values are auto, bf16, fp32")
    return precision


def autocast_for(precision: str, device: torch.device):
    """A context factory: bf16 autocast (weights stay fp32) or nothing."""
    if resolve_precision(precision, device) == "bf16":
        return lambda: torch.autocast(device.type, dtype=torch.bfloat16)
    return nullcontext


# Dense bf16 tensor-core peaks (FLOP/s, NVIDIA datasheets) by device-name substring; the first match wins, so
# the variants (PCIe, NVL: lower clocks and power) come before their family.
PEAK_BF16_FLOPS = [
    ("H100 PCIe", 756e12),
    ("H100 NVL", 835e12),
    ("H200 NVL", 835e12),
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
    if device.type != "cuda" or resolve_precision(precision, device) == "fp32":
        return None
    return peak_bf16_flops(torch.cuda.get_device_name(device))


def peak_bf16_flops(device_name: str) -> float | None:
    """The dense bf16 peak (FLOP/s) of a GPU by its name, or None for a GPU outside PEAK_BF16_FLOPS.

    >>> peak_bf16_flops("NVIDIA H200 NVL") / 1e12, peak_bf16_flops("NVIDIA H200") / 1e12
    (835.0, 989.0)
    """
    return next((flops for key, flops in PEAK_BF16_FLOPS if key in device_name), None)


@dataclass(frozen=True)
class FlopCount:
    """Training FLOPs of a decoder-only model: 6·N per token for the matmuls (N without the input embedding
    lookup), plus 12·L·H·d_head per (query, key) pair that causal attention computes: 2·d_head for the score and
    2·d_head for the weighted value, per head and layer, times 3 for forward and backward. An example of n tokens
    has n(n+1)/2 causal pairs, so only pairs inside one example count: a packed row is not credited with
    attention between its examples, which its mask never computes, nor with the masked upper triangle (the
    PaLM-paper convention counts all n² pairs, which reads a few percent higher at long lengths)."""

    per_token: float
    per_pair: float

    def step(self, tokens: int, causal_pairs: int) -> float:
        """FLOPs of a step over `tokens` real tokens whose examples hold `causal_pairs` = Σ n(n+1)/2 pairs."""
        return self.per_token * tokens + self.per_pair * causal_pairs


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


class Progress:
    """Training progress on rank 0: a live rich bar on a terminal; elsewhere (a log file, CI) plain lines on stderr.

    A plain line is printed at the first and the last step, every `total / lines` steps and whenever `seconds` have
    passed since the last one, with the validation loss when the step has one:
    `step 40/200  loss 1.2345  lr 3.00e-03  tok/s 12,345 (trained 6,789)  ex/step 8  elapsed 0:01:02`.
    """

    def __init__(self, enabled: bool, total: int, done: int, lines: int = 20, seconds: float = 60.0, plain=None):
        from rich.console import Console

        console = Console()
        self.enabled, self.total, self.every, self.seconds = enabled, total, max(1, total // lines), seconds
        self.plain = not (console.is_terminal or console.is_jupyter) if plain is None else plain
        self.bar = progress_bar(enabled and not self.plain)
        self.task = self.bar.add_task("train", total=total, completed=done, metrics="")
        self.start = self.last = time.monotonic()

    def __enter__(self) -> Progress:
        self.bar.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self.bar.__exit__(*exc)

    def update(self, step: int, metrics: dict[str, Any]) -> None:
        """Show the metrics of `step` (bar) or print them when a line is due (plain)."""
        self.bar.update(self.task, completed=step, metrics=describe(metrics))
        now = time.monotonic()
        due = step in (1, self.total) or step % self.every == 0 or now - self.last >= self.seconds
        if self.enabled and self.plain and due:
            self.last = now
            val = f"  val_loss {metrics['val_loss']:.4f}" if "val_loss" in metrics else ""
            elapsed = time.strftime("%H:%M:%S", time.gmtime(now - self.start))
            print(f"step {step}/{self.total}  {describe(metrics)}{val}  elapsed {elapsed}", file=sys.stderr, flush=True)


def step_totals(loss_sum: torch.Tensor, counts: list[float], d: Dist) -> list[float]:
    """The step's loss sum and host-side counts, summed over ranks and read back from the device at once."""
    values = torch.cat(
        [loss_sum.detach().double().reshape(1), torch.tensor(counts, dtype=torch.float64).to(loss_sum.device)]
    )
    if d.world_size > 1:
        dist.all_reduce(values)
    return values.tolist()


def train_model(config: TrainConfig) -> dict[str, Any]:
    """Train on packed shards; write checkpoints, metrics.jsonl and the final model + tokenizer to out_dir.

    Args:
        config: a TrainConfig (every field is a `prep train` flag).
    Returns:
        The metrics of the last step (step, loss, lr, tokens_per_s, ...) plus the attention path used
        (attn_implementation: what `auto` chose) and out_dir.
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
    collate = Collator(
        shards.max_len,
        shards.pad_token_id,
        padding_free=attn.implementation in VARLEN_PATHS,
        pad_to_multiple_of=None if shards.manifest["packed"] else UNPACKED_PAD_MULTIPLE,
    )
    step, position = 0, Position()
    if config.resume:
        step, position = load_checkpoint(latest_checkpoint(out_dir), raw_model, optimizer, config, d)
    steps = total_steps(config, math.ceil(len(dataset) / config.batch_size))
    batches = micro_batches(dataset, collate, config.batch_size, position)
    autocast = autocast_for(config.precision, d.device)
    log = MetricsLog(out_dir / "metrics.jsonl", d.is_main, step)
    model.train()
    metrics: dict[str, Any] = {}
    pin = d.device.type == "cuda"
    window = take_window(batches, config.grad_accum, pin) if step < steps else []
    with Progress(config.progress and d.is_main, steps, step) as progress:
        while step < steps:
            t0 = time.perf_counter()
            lr = get_lr(step, steps, config)
            for group in optimizer.param_groups:
                group["lr"] = lr
            loss_sum, n_trained = forward_backward(model, [mb.inputs for mb in window], attn, d, autocast)
            grad_norm = clip_gradients(model, config.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step, position, done = step + 1, window[-1].position, window
            # The GPU works through the step queued above while the host collates the next window; the read of
            # the loss below is the step's only wait for the GPU.
            window = take_window(batches, config.grad_accum, pin) if step < steps else []
            loss_sum, tokens, examples, causal_pairs = step_totals(
                loss_sum,
                [sum(mb.tokens for mb in done), sum(mb.examples for mb in done), sum(mb.causal_pairs for mb in done)],
                d,
            )
            dt = time.perf_counter() - t0
            metrics = {
                "step": step,
                "epoch": position.epoch,
                "loss": loss_sum / max(n_trained, 1.0),
                "lr": lr,
                "grad_norm": float(grad_norm),
                "tokens": int(tokens),
                "trained_tokens": int(n_trained),
                "examples": int(examples),
                "tokens_per_s": tokens / dt,
                "trained_tokens_per_s": n_trained / dt,
                "step_time_s": dt,
            }
            if peak:
                metrics["mfu"] = flops.step(tokens, causal_pairs) / dt / (peak * d.world_size)
            if d.device.type == "cuda":
                metrics["max_memory_gib"] = torch.cuda.max_memory_allocated(d.device) / 2**30
            if step % config.log_every == 0 or step == steps:
                log.write(metrics)
            if validation is not None and (step == steps or config.eval_every and step % config.eval_every == 0):
                scores = evaluate(model, validation, collate, config, attn, d, autocast)
                log.write({"step": step, "split": "validation", **scores})
                metrics.update(scores)
            progress.update(step, metrics)
            if config.save_every and (step % config.save_every == 0 or step == steps):
                save_checkpoint(out_dir, step, position, raw_model, optimizer, config, d)
    save_final(out_dir, raw_model, tokenizer, d)
    return {**metrics, "attn_implementation": attn.implementation, "out_dir": str(out_dir)}


UNPACKED_PAD_MULTIPLE = 64  # unpacked shards: rows padded to the batch's longest, rounded up to this (few shapes)


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
