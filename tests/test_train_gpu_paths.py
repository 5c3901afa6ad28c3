"""The trainer's GPU-side decisions, checked where they can be without a GPU: device resolution, wrapping order,
FSDP2's bf16 policy, the chunked loss, the flash boundaries taken from the collator, padding of unpacked shards,
validation rows over ranks, the tokenizer check, plain progress lines and the flex dtype cast.
The kernels themselves run in `bash benchmarks/gpu_check.sh` on a GPU."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from _shards import build_shards, single_thread  # noqa: F401 (autouse fixture)
from transformers import AutoModelForCausalLM

import prep.train as train
from prep.errors import ConfigError
from prep.load import Collator, PackedDataset, load_shards
from prep.models import model_config
from prep.train import (
    Dist,
    TrainConfig,
    ValidationRows,
    autocast_dtype_inputs,
    evaluate,
    example_boundaries,
    resolve_device,
    token_loss_sum,
    token_losses,
    train_model,
)

FAST = dict(batch_size=2, lr=3e-3, progress=False)


@pytest.fixture(scope="module")
def shards_dir(tmp_path_factory):
    return build_shards(
        tmp_path_factory.mktemp("gpu_paths") / "shards", n_examples=60, max_len=512, num_shards=1, tokenizer_name="bytes"
    )


@pytest.fixture
def one_rank_group():
    """A real one-process gloo group, so DDP and FSDP2 can be built in this process."""
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def tiny(vocab: int = 257, max_len: int = 512):
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(model_config("tiny", vocab, max_len), attn_implementation="sdpa")


# --- 16.1: the device of each process ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "device, local_rank, world_size, cuda, expected",
    [
        ("auto", 0, 1, False, "cpu"),
        ("auto", 2, 4, True, "cuda:2"),  # torchrun: every rank its own GPU
        ("cuda", 0, 1, True, "cuda:0"),  # the bare "cuda" that crashed torch.cuda.set_device
        ("cuda", 3, 8, True, "cuda:3"),
        ("cuda:1", 0, 1, True, "cuda:1"),  # one process: an explicit index is kept
        ("cpu", 1, 2, True, "cpu"),
    ],
)
def test_the_device_is_resolved_from_the_flag_and_the_rank(device, local_rank, world_size, cuda, expected):
    resolved = resolve_device(device, local_rank, world_size, cuda_available=cuda)
    assert resolved == torch.device(expected) and (resolved.type != "cuda" or resolved.index is not None)


def test_an_explicit_gpu_index_under_torchrun_and_unknown_devices_are_refused():
    with pytest.raises(ConfigError, match="would put all 2 ranks on one GPU; pass --device cuda"):
        resolve_device("cuda:1", local_rank=1, world_size=2, cuda_available=True)
    with pytest.raises(ConfigError, match="--device 'gpu'.*use auto, cpu, cuda or cuda:N"):
        resolve_device("gpu")


# --- 16.3 and 16.4: compiled layers inside DDP; FSDP2 gathers bf16 weights in a bf16 run -------------------------


def test_compile_is_per_layer_inside_ddp_with_one_graph_for_all_layers(one_rank_group):
    """DDP wraps the model whose layers are compiled in place: its gradient hooks stay outside the compiled graphs,
    so all-reduces overlap the backward pass layer by layer; the layers share one graph; the keys do not change."""
    from torch._dynamo.utils import counters
    from torch.nn.parallel import DistributedDataParallel

    model = tiny()
    keys = list(model.state_dict())
    wrapped = train.wrap_model(model, TrainConfig(compile=True), Dist(0, 2, torch.device("cpu")))
    assert isinstance(wrapped, DistributedDataParallel) and wrapped.module is model
    assert all(layer._compiled_call_impl is not None for layer in model.model.layers)
    assert model.model.embed_tokens._compiled_call_impl is None  # the layers only
    torch._dynamo.reset()
    counters.clear()
    ids = torch.randint(0, 257, (2, 32))
    token_losses(wrapped(input_ids=ids, use_cache=False).logits, ids).backward()
    assert counters["stats"]["unique_graphs"] == 1 and len(model.model.layers) == 4
    assert list(model.state_dict()) == keys


def test_fsdp2_in_bf16_gathers_bf16_weights_and_keeps_fp32_masters(one_rank_group):
    model = tiny()
    seen = []
    model.model.layers[0].mlp.down_proj.register_forward_pre_hook(lambda m, a: seen.append(m.weight.dtype))
    train.shard_model(model, Dist(0, 1, torch.device("cpu")), "bf16")
    logits = model(input_ids=torch.randint(0, 257, (2, 16)), use_cache=False).logits
    logits.float().sum().backward()
    assert seen == [torch.bfloat16] and logits.dtype == torch.bfloat16  # computed in bf16, no per-step autocast copy
    assert {p.dtype for p in model.parameters()} == {torch.float32}  # sharded masters and optimizer inputs stay fp32
    assert {p.grad.dtype for p in model.parameters()} == {torch.float32}  # reduced in fp32
    policy = train.fsdp_mixed_precision("bf16")
    assert (policy.param_dtype, policy.reduce_dtype) == (torch.bfloat16, torch.float32)
    assert train.fsdp_mixed_precision("fp32") is None


# --- 16.6: the loss in chunks ---------------------------------------------------------------------------------


def plain_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The loss as it was: one fp32 copy of all the logits."""
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100,
                           reduction="sum")


def saved_float32_sizes(fn) -> list[int]:
    """Element counts of the fp32 tensors autograd keeps for the backward pass of `fn()`."""
    sizes = []

    def pack(t):
        if t.dtype == torch.float32:
            sizes.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sizes


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_chunked_loss_equals_the_plain_loss_and_its_gradient(monkeypatch, dtype):
    monkeypatch.setattr(train, "LOSS_CHUNK_ELEMENTS", 7 * 1000)  # 7 tokens per chunk: chunks straddle the rows
    torch.manual_seed(0)
    logits = (torch.randn(3, 50, 1000) * 4).to(dtype).requires_grad_()
    labels = torch.randint(0, 1000, (3, 50))
    labels[:, :5] = -100
    labels[1, 20:] = -100
    scale = torch.tensor(1 / 12345)  # as the trainer's world_size / trained tokens
    ours = token_losses(logits, labels)
    (grad_ours,) = torch.autograd.grad(ours * scale, logits)
    reference = plain_loss(logits, labels)
    (grad_reference,) = torch.autograd.grad(reference * scale, logits)
    assert ours.dtype == torch.float32
    torch.testing.assert_close(ours, reference, rtol=1e-6, atol=0)  # fp32 rounding of the sum's order
    # The gradient (softmax - one-hot) in fp32 to a few ulps; in bf16 ours is rounded twice (before and after the
    # fp32 scaling), the reference once: at most one bf16 rounding step apart (2^-7 relative).
    rtol = 1e-6 if dtype == torch.float32 else 2**-7
    torch.testing.assert_close(grad_ours, grad_reference, rtol=rtol, atol=1e-12)


def test_chunked_loss_keeps_no_full_fp32_copy_of_the_logits(monkeypatch):
    monkeypatch.setattr(train, "LOSS_CHUNK_ELEMENTS", 16 * 1000)
    logits = torch.randn(4, 64, 1000, dtype=torch.bfloat16, requires_grad=True)
    labels = torch.randint(0, 1000, (4, 64))
    plain = saved_float32_sizes(lambda: plain_loss(logits, labels))
    chunked = saved_float32_sizes(lambda: token_losses(logits, labels))
    assert max(plain) >= 4 * 63 * 1000  # what the plain loss keeps: the whole fp32 log-softmax
    assert max(chunked, default=0) <= 16 * 1000  # the chunks' fp32 values live only inside the forward pass


def test_the_summed_loss_backward_runs_once():
    logits = torch.randn(1, 4, 10, requires_grad=True)
    loss = token_losses(logits, torch.tensor([[-100, 1, 2, 3]]))
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="runs once"):
        loss.backward()


# --- 16.5: flash boundaries from the collator, no device sync ----------------------------------------------------


def test_flash_boundaries_are_the_collators_own_and_masks_are_built_for_the_other_paths(shards_dir):
    shards = load_shards(shards_dir)
    rows = [PackedDataset(shards, shuffle=False)[i] for i in range(3)]
    batch = Collator(shards.max_len, shards.pad_token_id, padding_free=True)(rows)
    flash = example_boundaries(batch, "flash_attention_2")
    assert all(flash[k] is batch[k] for k in ("cu_seq_lens_q", "cu_seq_lens_k"))
    assert flash["max_length_q"] == batch["max_length_q"] == max(int(n) for r in rows for n in r["seq_lengths"])
    moved = train.to_device(batch, torch.device("cpu"))
    assert moved["max_length_k"] == batch["max_length_k"]  # ints travel with the tensors
    assert example_boundaries(batch, "sdpa")["attention_mask"].shape == (1, 1, *batch["input_ids"].shape[1:] * 2)


# --- unpacked shards: padded to the batch's longest row ---------------------------------------------------------


def test_pad_to_multiple_of_pads_to_the_longest_row_and_keeps_the_loss(shards_dir):
    shards = load_shards(shards_dir)
    rows = [PackedDataset(shards, shuffle=False)[i] for i in (0, 5, 9)]
    longest = max(len(r["input_ids"]) for r in rows)
    short = Collator(shards.max_len, shards.pad_token_id, pad_to_multiple_of=64)(rows)
    full = Collator(shards.max_len, shards.pad_token_id)(rows)
    assert short["input_ids"].shape[1] == min(shards.max_len, math.ceil(longest / 64) * 64)
    assert full["input_ids"].shape[1] == shards.max_len
    model = tiny().eval()
    with torch.no_grad():
        torch.testing.assert_close(token_loss_sum(model, short, "sdpa"), token_loss_sum(model, full, "sdpa"),
                                   rtol=1e-5, atol=0)
    with pytest.raises(ConfigError, match="pad_to_multiple_of=0"):
        Collator(8, 0, pad_to_multiple_of=0)


def test_unpacked_shards_train_on_rows_padded_to_the_batch(tmp_path, monkeypatch):
    unpacked = build_shards(tmp_path / "shards", n_examples=24, max_len=2048, num_shards=1, packed=False,
                            tokenizer_name="bytes")
    widths = []
    loss_sum = train.token_loss_sum
    monkeypatch.setattr(train, "token_loss_sum", lambda m, inputs, a: widths.append(inputs["input_ids"].shape[1])
                        or loss_sum(m, inputs, a))
    final = train_model(TrainConfig(shards=str(unpacked), out_dir=str(tmp_path / "out"), max_steps=3, **FAST))
    assert final["step"] == 3 and math.isfinite(final["loss"])
    assert widths and all(w % 64 == 0 for w in widths) and max(widths) < 2048


# --- issue 11: validation with fewer rows than ranks -------------------------------------------------------------


@pytest.mark.parametrize("rows, world_size", [(5, 2), (2, 4), (1, 3), (6, 3)])
def test_validation_rows_cover_every_row_once_with_equal_work_per_rank(shards_dir, rows, world_size):
    shards = load_shards(shards_dir)
    shards = type(shards)(shards.path, shards.manifest, shards.table.slice(0, rows))
    per_rank = [ValidationRows(shards, rank, world_size) for rank in range(world_size)]
    assert len({len(r) for r in per_rank}) == 1  # every rank runs the same number of forward passes
    seen = []
    for part in per_rank:
        for i in range(len(part)):
            item = part[i]
            if (item["labels"] != -100).any():
                seen.append(item["input_ids"].tolist())
            else:  # a filler: row 0 again, contributing nothing
                assert torch.equal(item["input_ids"], part.rows[0]["input_ids"])
    all_rows = [PackedDataset(shards, shuffle=False)[i]["input_ids"].tolist() for i in range(rows)]
    assert sorted(seen) == sorted(all_rows)


def test_validation_loss_over_more_ranks_than_rows_is_the_single_process_loss(shards_dir):
    """Three ranks, two rows: what the ranks' evaluate passes sum to (their all-reduce) is the one-process loss."""
    shards = load_shards(shards_dir)
    shards = type(shards)(shards.path, shards.manifest, shards.table.slice(0, 2))
    model, collate, config = tiny().eval(), Collator(shards.max_len, shards.pad_token_id), TrainConfig(batch_size=1)
    alone = evaluate(model, ValidationRows(shards), collate, config, "sdpa", Dist())
    ranks = [evaluate(model, ValidationRows(shards, r, 3), collate, config, "sdpa", Dist()) for r in range(3)]
    tokens = sum(r["val_tokens"] for r in ranks)
    assert tokens == alone["val_tokens"] > 0 and ranks[2]["val_tokens"] == 0
    assert sum(r["val_loss"] * r["val_tokens"] for r in ranks) / tokens == pytest.approx(alone["val_loss"], rel=1e-6)


# --- issue 11: the tokenizer check never switches itself off silently --------------------------------------------


def test_a_model_without_tokenizer_trains_with_a_warning_and_a_broken_tokenizer_is_an_error(shards_dir, tmp_path,
                                                                                             capsys):
    base = tmp_path / "base"
    tiny().save_pretrained(base)
    run = dict(shards=str(shards_dir), model=str(base), max_steps=1, **FAST)
    train_model(TrainConfig(out_dir=str(tmp_path / "a"), **run))
    assert f"warning: --model {base} ships no tokenizer" in capsys.readouterr().err
    (base / "tokenizer.json").write_text("{ not json")
    (base / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "PreTrainedTokenizerFast"}))
    with pytest.raises(ConfigError, match=r"--model .*: its tokenizer cannot be loaded \(\w+: .*\), so the shards'"):
        train_model(TrainConfig(out_dir=str(tmp_path / "b"), **run))


# --- issue 11: progress in a log file ------------------------------------------------------------------------


def test_progress_without_a_terminal_prints_plain_periodic_lines(shards_dir, tmp_path, capsys):
    train_model(TrainConfig(shards=str(shards_dir), out_dir=str(tmp_path), max_steps=40,
                            **{**FAST, "progress": True}))
    captured = capsys.readouterr()
    lines = [line for line in captured.err.splitlines() if line.startswith("step ")]
    assert lines[0].startswith("step 1/40  loss ") and lines[-1].startswith("step 40/40  loss ")
    assert [int(line.split()[1].split("/")[0]) for line in lines] == [1, *range(2, 41, 2)]  # every 40 // 20 steps
    for line in lines:
        assert " lr " in line and " tok/s " in line and " elapsed " in line
    assert "━" not in captured.out + captured.err  # no squeezed bar


# --- 16.7: flex_attention gets one dtype under autocast -----------------------------------------------------------


def test_flex_inputs_are_cast_to_the_autocast_dtype_and_left_alone_without_autocast():
    def seen(module, q, k, v, *args, **kwargs):
        return q.dtype, k.dtype, v.dtype, args, kwargs

    wrapped = autocast_dtype_inputs(seen)
    q, k = torch.ones(2, 4), torch.ones(2, 4)  # fp32 after the rotary embedding
    v = torch.ones(2, 4, dtype=torch.bfloat16)  # bf16 out of the autocast linear layer
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert wrapped(None, q, k, v, 1, scaling=0.5) == (torch.bfloat16,) * 3 + ((1,), {"scaling": 0.5})
    assert wrapped(None, q, k, v) == (torch.float32, torch.float32, torch.bfloat16, (), {})


def test_the_flex_cast_is_installed_once_in_transformers():
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    original = ALL_ATTENTION_FUNCTIONS["flex_attention"]
    try:
        train.cast_flex_attention_inputs()
        installed = ALL_ATTENTION_FUNCTIONS["flex_attention"]
        train.cast_flex_attention_inputs()
        assert installed.casts_to_autocast_dtype and ALL_ATTENTION_FUNCTIONS["flex_attention"] is installed
    finally:
        ALL_ATTENTION_FUNCTIONS._local_mapping.pop("flex_attention", None)
    assert ALL_ATTENTION_FUNCTIONS["flex_attention"] is original


def test_train_and_load_docstring_examples_run():
    import doctest

    import prep.load

    for module in (train, prep.load):
        assert doctest.testmod(module).failed == 0
