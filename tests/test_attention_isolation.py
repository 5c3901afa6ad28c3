"""Packed attention is proven, not assumed.

For real architectures (Llama, Qwen2; random weights, fp32, CPU) and every attention path the trainer can
pick, the per-token loss of every example inside a micro-batch of several packed rows (with a pad tail)
equals the loss of that example run on its own. Tolerance: 1e-5 absolute on per-token cross-entropy
(fp32 on the CPU; measured differences are ~1e-6, while leakage between examples shows up as > 1e-2); 1e-4 for
flex_attention's GPU kernel in fp32, 2e-2 for flash attention (bf16 only). flex_attention runs on the GPU when
there is one (its Triton kernel is what trains), else on the CPU.

The second half pins what transformers 5.24 does *without* explicit boundaries (read in masking_utils:
packed sequences are detected from position_ids only when attention_mask is None and there is no cache;
flash attention detects them only for a single row), which is why the trainer passes them explicitly.
"""

from __future__ import annotations

import pytest
import torch
from _shards import build_shards, single_thread  # noqa: F401 (autouse fixture)
from transformers import AutoModelForCausalLM, LlamaConfig, MistralConfig, Qwen2Config
from transformers.utils import is_flash_attn_2_available

from prep.errors import ConfigError
from prep.load import Collator, PackedAttention, PackedDataset, load_shards
from prep.train import check_packed_attention, packed_logits, token_losses

TOL = 1e-5
LEAK = 1e-2
ARCHS = {"llama": LlamaConfig, "qwen2": Qwen2Config}
PATHS = [
    "sdpa",
    "eager",
    "flex_attention",
    pytest.param(
        "flash_attention_2",
        marks=pytest.mark.skipif(
            not (is_flash_attn_2_available() and torch.cuda.is_available()), reason="flash-attn not installed / no CUDA"
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
    device = "cuda" if flash or (attn == "flex_attention" and torch.cuda.is_available()) else "cpu"
    model = tiny_model(arch, attn, shards.manifest["tokenizer"]["vocab_size"], device)
    batch = Collator(shards.max_len, shards.pad_token_id, padding_free=flash)(rows)  # the trainer's choice per path
    inputs = {k: v.to(device) for k, v in batch.items() if torch.is_tensor(v)}
    assert inputs["input_ids"].shape[0] == (1 if flash else 4)
    with torch.no_grad():
        logits = packed_logits(model, inputs, check_packed_attention(model))
    packed = [x.cpu() for x in packed_examples(token_losses(logits, inputs["labels"], "none"), rows, flash)]
    alone = [x.cpu() for x in isolated_losses(model, rows)]
    tolerance = 2e-2 if flash else 1e-4 if device == "cuda" else TOL  # flash runs in bf16; GPU fp32 kernels differ
    assert max_difference(packed, alone, trained(rows)) < tolerance


def test_flex_attention_uses_the_block_mask_it_is_given(shards, rows):
    """The flex test above could pass by transformers finding the examples itself: a BlockMask that is only
    causal (no example boundaries) must leak, so the kernel really runs on the mask prep passes."""
    from torch.nn.attention.flex_attention import create_block_mask

    model = tiny_model("llama", "flex_attention", shards.manifest["tokenizer"]["vocab_size"])
    batch = Collator(shards.max_len, shards.pad_token_id)(rows)
    n, length = batch["input_ids"].shape
    causal = create_block_mask(lambda b, h, q, k: q >= k, B=n, H=None, Q_LEN=length, KV_LEN=length, device="cpu")
    assert plain_forward_difference(model, batch, rows, use_cache=False, attention_mask=causal) > LEAK


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
@pytest.mark.parametrize("attn", ["sdpa", "eager", "flex_attention"])
def test_sliding_window_models_keep_their_windows_inside_packed_rows(shards, rows, arch, attn):
    model = sliding_model(arch, attn, shards.manifest["tokenizer"]["vocab_size"])
    spec = check_packed_attention(model)
    assert spec.windows == ({"*": WINDOW} if arch == "mistral" else {"full_attention": None, "sliding_attention": WINDOW})
    batch = Collator(shards.max_len, shards.pad_token_id)(rows)
    alone = isolated_losses(model, rows)  # transformers applies the window itself on a single example
    with torch.no_grad():
        packed = split_packed(token_losses(packed_logits(model, batch, spec), batch["labels"], "none"), rows)
        full = split_packed(token_losses(packed_logits(model, batch, attn), batch["labels"], "none"), rows)
    assert max_difference(packed, alone, trained(rows)) < TOL
    assert max_difference(full, alone, trained(rows)) > LEAK  # the window matters here: dropping it is seen


def test_layer_types_without_packed_boundaries_are_refused(shards):
    model = sliding_model("qwen2-mixed", "sdpa", shards.manifest["tokenizer"]["vocab_size"])
    model.config.layer_types = ["full_attention", "linear_attention"]
    with pytest.raises(ConfigError, match="'linear_attention' layers"):
        check_packed_attention(model)
