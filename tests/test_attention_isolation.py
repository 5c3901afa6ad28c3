"""Packed attention is proven, not assumed.

For real architectures (Llama, Qwen2; random weights, fp32) and every attention path the trainer can pick, the
per-token loss of every example inside a micro-batch of several packed rows (with a pad tail) equals the loss of
that example run on its own through an sdpa model with the same weights (an independent reference, not the kernel
under test). Tolerance: 1e-5 absolute on per-token cross-entropy (fp32 on the CPU; measured differences are
~1e-6, while leakage between examples shows up as > 1e-2); 1e-4 for flex_attention's GPU kernel in fp32, 2e-2 for
flash attention (bf16 only).

flex_attention and flash attention run only where their kernels are right: on CUDA. PyTorch's compiled CPU flex
kernel returns wrong values on CPUs without AVX-512 (errors near 1 or NaN for sequence lengths of 8 mod 16, torch
2.13), so prep refuses it on the CPU; their model-level checks run on a GPU (`bash benchmarks/gpu_check.sh`) and
are skipped here with that reason. What is exact on any machine is checked here: the BlockMask prep builds equals
the dense block-causal mask element by element, and its block lists (which blocks the kernel computes, and which
it takes as fully visible without evaluating the mask) match that mask block by block.

The second half pins what transformers 5.24 does *without* explicit boundaries (read in masking_utils:
packed sequences are detected from position_ids only when attention_mask is None and there is no cache;
flash attention detects them only for a single row), which is why the trainer passes them explicitly.
"""

from __future__ import annotations

import copy
import json
import os

import pytest
import torch
from _shards import build_shards, single_thread  # noqa: F401 (autouse fixture)
from transformers import AutoModelForCausalLM, LlamaConfig, MistralConfig, Qwen2Config
from transformers.utils import is_flash_attn_2_available

from prep.errors import ConfigError
from prep.load import (
    Collator,
    PackedAttention,
    PackedDataset,
    block_causal_mask,
    block_mask,
    load_shards,
    packed_attention_kwargs,
)
from prep.train import check_packed_attention, packed_logits, token_losses

TOL = 1e-5
LEAK = 1e-2
ARCHS = {"llama": LlamaConfig, "qwen2": Qwen2Config}
CUDA = torch.cuda.is_available()
NEEDS_CUDA_FOR_FLEX = pytest.mark.skipif(
    not CUDA,
    reason="flex_attention runs only on CUDA: PyTorch's CPU flex kernel is wrong on CPUs without AVX-512 "
    "(prep.load.FLEX_ON_CPU); this check runs on a GPU in benchmarks/gpu_check.sh, the BlockMask itself is "
    "checked element by element below",
)
FLEX = pytest.param("flex_attention", marks=NEEDS_CUDA_FOR_FLEX)
PATHS = [
    "sdpa",
    "eager",
    FLEX,
    pytest.param(
        "flash_attention_2",
        marks=pytest.mark.skipif(
            not (is_flash_attn_2_available() and CUDA), reason="flash-attn not installed / no CUDA"
        ),
    ),
]


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return load_shards(
        build_shards(tmp_path_factory.mktemp("iso") / "shards", n_examples=120, max_len=384, num_shards=1)
    )


@pytest.fixture(scope="module")
def rows(shards):
    """Four packed rows, each with >= 2 examples, the shortest of them (most padding) included."""
    ds = PackedDataset(shards, shuffle=False)
    multi = sorted((ds[i] for i in range(len(ds)) if len(ds[i]["seq_lengths"]) >= 2), key=lambda r: len(r["input_ids"]))
    chosen = [multi[0], multi[len(multi) // 3], multi[2 * len(multi) // 3], multi[-1]]
    assert len(chosen[0]["input_ids"]) < shards.max_len - 10  # a real pad tail
    return chosen


def tiny_model(arch: str, attn: str, vocab: int, device: str = "cpu"):
    torch.manual_seed(0)
    config = ARCHS[arch](
        vocab_size=vocab,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
    )
    dtype = torch.bfloat16 if attn.startswith("flash") else torch.float32
    return AutoModelForCausalLM.from_config(config, attn_implementation=attn, dtype=dtype).to(device).eval()


def isolated_losses(model, rows) -> list[torch.Tensor]:
    """Per-token losses of every example run alone (batch of one, no padding, default positions)."""
    out = []
    for r in rows:
        starts = [0] + torch.cumsum(r["seq_lengths"], 0).tolist()
        for a, b in zip(starts[:-1], starts[1:]):
            ids, labels = r["input_ids"][a:b][None].to(model.device), r["labels"][a:b][None].to(model.device)
            with torch.no_grad():
                out.append(token_losses(model(input_ids=ids, use_cache=False).logits, labels, reduction="none")[0])
    return out


def record(test: str, **figures) -> None:
    """Append measured figures to the file PREP_ISOLATION_FIGURES names (benchmarks/gpu_check.py reports them)."""
    path = os.environ.get("PREP_ISOLATION_FIGURES")
    if path:
        with open(path, "a", encoding="utf-8") as f:
            f.write(json.dumps({"test": test, **figures}) + "\n")


def sdpa_twin(model):
    """An sdpa model with `model`'s weights, dtype and device: the independent reference for every path."""
    path = model.config._attn_implementation
    config = copy.deepcopy(model.config)  # from_config sets the attention path on the config object it is given
    twin = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa", dtype=model.dtype)
    twin.load_state_dict(model.state_dict())
    assert model.config._attn_implementation == path and twin.config._attn_implementation == "sdpa"
    return twin.to(model.device).eval()


def split_packed(losses: torch.Tensor, rows) -> list[torch.Tensor]:
    """Cut a (rows, len-1) per-token loss back into examples. The loss at an example's last token predicts the
    next example's first label, which is -100, so each example owns positions [start, end - 1)."""
    out = []
    for b, r in enumerate(rows):
        starts = [0] + torch.cumsum(r["seq_lengths"], 0).tolist()
        out += [losses[b, a : e - 1] for a, e in zip(starts[:-1], starts[1:])]
    return out


def max_difference(packed: list[torch.Tensor], alone: list[torch.Tensor], masks: list[torch.Tensor]) -> float:
    return max(float((p - a)[m].abs().max()) for p, a, m in zip(packed, alone, masks) if m.any())


def trained(rows) -> list[torch.Tensor]:
    masks = []
    for r in rows:
        starts = [0] + torch.cumsum(r["seq_lengths"], 0).tolist()
        masks += [r["labels"][a + 1 : e] != -100 for a, e in zip(starts[:-1], starts[1:])]
    return masks


def packed_examples(losses: torch.Tensor, rows, padding_free: bool) -> list[torch.Tensor]:
    """Per-example losses out of a packed forward pass, padded (rows, len-1) or padding-free (1, total-1)."""
    if not padding_free:
        return split_packed(losses, rows)
    out, start = [], 0
    for r in rows:
        for n in r["seq_lengths"].tolist():
            out.append(losses[0, start : start + n - 1])
            start += n
    return out


@pytest.mark.parametrize("arch", sorted(ARCHS))
@pytest.mark.parametrize("attn", PATHS)
def test_packed_rows_give_the_loss_of_each_example_alone(shards, rows, arch, attn):
    flash = attn.startswith("flash")
    device = "cuda" if attn in ("flex_attention", "flash_attention_2") else "cpu"
    model = tiny_model(arch, attn, shards.manifest["tokenizer"]["vocab_size"], device)
    batch = Collator(shards.max_len, shards.pad_token_id, padding_free=flash)(rows)  # the trainer's choice per path
    inputs = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
    assert inputs["input_ids"].shape[0] == (1 if flash else 4)
    with torch.no_grad():
        logits = packed_logits(model, inputs, check_packed_attention(model))
    packed = [x.cpu() for x in packed_examples(token_losses(logits, inputs["labels"], "none"), rows, flash)]
    alone = [x.cpu() for x in isolated_losses(sdpa_twin(model), rows)]
    tolerance = 2e-2 if flash else 1e-4 if device == "cuda" else TOL  # flash runs in bf16; GPU fp32 kernels differ
    difference = max_difference(packed, alone, trained(rows))
    record(f"packed_vs_alone/{attn}/{arch}/{device}", max_difference=difference, below=tolerance)
    assert difference < tolerance


@NEEDS_CUDA_FOR_FLEX
def test_flex_attention_uses_the_block_mask_it_is_given(shards, rows):
    """The flex test above could pass by transformers finding the examples itself: a BlockMask that is only
    causal (no example boundaries) must leak, so the kernel really runs on the mask prep passes."""
    from torch.nn.attention.flex_attention import create_block_mask

    model = tiny_model("llama", "flex_attention", shards.manifest["tokenizer"]["vocab_size"], "cuda")
    batch = {k: v.cuda() for k, v in Collator(shards.max_len, shards.pad_token_id)(rows).items()}
    n, length = batch["input_ids"].shape
    causal = create_block_mask(lambda b, h, q, k: q >= k, B=n, H=None, Q_LEN=length, KV_LEN=length, device="cuda")
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False,
                       attention_mask=causal).logits
    packed = [x.cpu() for x in split_packed(token_losses(logits, batch["labels"], "none"), rows)]
    alone = [x.cpu() for x in isolated_losses(sdpa_twin(model), rows)]
    difference = max_difference(packed, alone, trained(rows))
    record("leak_control/flex_attention/causal_only_mask/cuda", max_difference=difference, above=LEAK)
    assert difference > LEAK


def element_mask(mask, batch: int, length: int) -> torch.Tensor:
    """A BlockMask's mask_mod evaluated at every (row, query, key): (batch, length, length) bool."""
    b = torch.arange(batch)[:, None, None]
    q, k = torch.arange(length)[None, :, None], torch.arange(length)[None, None, :]
    return mask.mask_mod(b, 0, q, k).expand(batch, length, length)


def block_lists(mask) -> tuple[torch.Tensor, torch.Tensor]:
    """(blocks computed, blocks taken as fully visible without evaluating the mask): (batch, q blocks, kv blocks)."""
    from torch.nn.attention.flex_attention import BlockMask

    computed = mask.to_dense()[:, 0].bool()
    full = BlockMask.from_kv_blocks(mask.full_kv_num_blocks, mask.full_kv_indices, BLOCK_SIZE=mask.BLOCK_SIZE,
                                    seq_lengths=mask.seq_lengths).to_dense()[:, 0].bool()
    return computed | full, full


@pytest.mark.parametrize("window", [None, 1, 48, 200, 5000])
def test_block_mask_equals_the_dense_block_causal_mask(shards, rows, window):
    """What the flex kernel is given, checked without running it: the mask function agrees with the dense mask
    at every (row, query, key), and the kernel's block lists agree with it block by block (a block marked fully
    visible skips the mask, so one wrong mark would leak a whole 128x128 block)."""
    position_ids = Collator(shards.max_len, shards.pad_token_id)(rows)["position_ids"]
    n, length = position_ids.shape
    dense = block_causal_mask(position_ids, window=window)[:, 0]
    mask = block_mask(position_ids, window)
    assert torch.equal(element_mask(mask, n, length), dense)
    size = mask.BLOCK_SIZE[0]
    assert length % size == 0  # 384: whole blocks, so every block is entirely inside the rows
    tiles = dense.reshape(n, length // size, size, length // size, size).transpose(2, 3)
    computed, full = block_lists(mask)
    assert torch.equal(computed, tiles.any(-1).any(-1)) and torch.equal(full, tiles.all(-1).all(-1))
    if window is None:  # all three kinds of block occur (narrow windows leave no block fully visible)
        assert full.any() and (computed & ~full).any() and not computed.all()


def test_block_mask_of_a_leaking_mask_differs(shards, rows):
    """The equality above can fail: a mask without example boundaries differs on these rows."""
    position_ids = Collator(shards.max_len, shards.pad_token_id)(rows)["position_ids"]
    n, length = position_ids.shape
    causal_only = block_mask(torch.arange(length).expand(n, length))  # one example per row
    assert not torch.equal(element_mask(causal_only, n, length), block_causal_mask(position_ids)[:, 0])


def test_flex_attention_is_refused_on_the_cpu():
    with pytest.raises(ConfigError, match="flex_attention runs only on CUDA.*AVX-512.*use sdpa"):
        packed_attention_kwargs(torch.tensor([[0, 1, 2, 0, 1]]), "flex_attention")


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_padding_free_rows_on_mask_paths_are_isolated_too(shards, rows, attn):
    model = tiny_model("llama", attn, shards.manifest["tokenizer"]["vocab_size"])
    batch = Collator(shards.max_len, shards.pad_token_id, padding_free=True)(rows)
    with torch.no_grad():
        losses = token_losses(packed_logits(model, batch, attn), batch["labels"], "none")
    assert max_difference(packed_examples(losses, rows, True), isolated_losses(model, rows), trained(rows)) < TOL


# --- what transformers 5.24 does without explicit boundaries (why the trainer passes them) ------------------


def plain_forward_difference(model, batch, rows, **kwargs) -> float:
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], **kwargs).logits
    packed = split_packed(token_losses(logits, batch["labels"], "none"), rows)
    return max_difference(packed, isolated_losses(model, rows), trained(rows))


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_transformers_default_kv_cache_silently_mixes_packed_examples(shards, rows, attn):
    model = tiny_model("llama", attn, shards.manifest["tokenizer"]["vocab_size"])
    batch = Collator(shards.max_len, shards.pad_token_id)(rows)
    assert model.config.use_cache is True
    assert plain_forward_difference(model, batch, rows) > LEAK  # default use_cache=True: contaminated
    ones = torch.ones_like(batch["input_ids"])
    assert (
        plain_forward_difference(model, batch, rows, use_cache=False, attention_mask=ones) > LEAK
    )  # 2D mask: contaminated
    assert plain_forward_difference(model, batch, rows, use_cache=False) < TOL  # position-id detection (5.24)


def test_trainer_refuses_paths_without_explicit_boundaries(shards):
    model = tiny_model("llama", "sdpa", shards.manifest["tokenizer"]["vocab_size"])
    model.config._attn_implementation = "paged|eager"
    with pytest.raises(ConfigError, match="would let the examples of a packed row attend to each other"):
        check_packed_attention(model)


# --- sliding-window models: the masks carry the model's own windows -----------------------------------------

WINDOW = 48  # far below the examples' lengths, so a window that is ignored or off by one changes the losses
SLIDING = {
    # every layer windowed, no layer_types (as Mistral v0.1, Mixtral, Phi-3, Starcoder2)
    "mistral": lambda vocab: MistralConfig(sliding_window=WINDOW, **small(vocab)),
    # full and sliding layers mixed through layer_types (as Gemma 2/3, GPT-OSS): a dict of masks by layer type
    "qwen2-mixed": lambda vocab: Qwen2Config(use_sliding_window=True, sliding_window=WINDOW, max_window_layers=1,
                                             **small(vocab)),
}


def small(vocab: int) -> dict:
    return dict(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=512)


def sliding_model(arch: str, attn: str, vocab: int):
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(SLIDING[arch](vocab), attn_implementation=attn).eval()


@pytest.mark.parametrize("arch", sorted(SLIDING))
@pytest.mark.parametrize("attn", ["sdpa", "eager", FLEX])
def test_sliding_window_models_keep_their_windows_inside_packed_rows(shards, rows, arch, attn):
    device = "cuda" if attn == "flex_attention" else "cpu"
    model = sliding_model(arch, attn, shards.manifest["tokenizer"]["vocab_size"]).to(device)
    spec = check_packed_attention(model)
    assert spec.windows == ({"*": WINDOW} if arch == "mistral" else {"full_attention": None, "sliding_attention": WINDOW})
    batch = {k: v.to(device) for k, v in Collator(shards.max_len, shards.pad_token_id)(rows).items()}
    alone = [x.cpu() for x in isolated_losses(sdpa_twin(model), rows)]  # transformers applies the window itself
    with torch.no_grad():
        packed = split_packed(token_losses(packed_logits(model, batch, spec), batch["labels"], "none").cpu(), rows)
        full = split_packed(token_losses(packed_logits(model, batch, attn), batch["labels"], "none").cpu(), rows)
    tolerance = 1e-4 if device == "cuda" else TOL
    difference, without_window = max_difference(packed, alone, trained(rows)), max_difference(full, alone, trained(rows))
    record(f"sliding_window/{attn}/{arch}/{device}", max_difference=difference, below=tolerance,
           without_window=without_window, without_window_above=LEAK)
    assert difference < tolerance
    assert without_window > LEAK  # the window matters here: dropping it is seen


def test_layer_types_without_packed_boundaries_are_refused(shards):
    model = sliding_model("qwen2-mixed", "sdpa", shards.manifest["tokenizer"]["vocab_size"])
    model.config.layer_types = ["full_attention", "linear_attention"]
    with pytest.raises(ConfigError, match="'linear_attention' layers"):
        check_packed_attention(model)
