"""Loss normalisation: the gradient of a step equals the gradient of one batch holding the same rows.

The loss is sum(token losses) / (trained tokens over the whole window: every micro-batch, every rank). Checked
for k accumulation steps in one process, and for 2 gloo ranks x 2 micro-batches under DDP and FSDP2.
Tolerance: rtol 1e-4, atol 1e-6 on every gradient element (fp32, CPU; measured max difference ~1e-8),
while the mean of per-batch means differs by ~0.9% (relative norm) on the same rows.
"""

from __future__ import annotations

import functools
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from _shards import build_shards, single_thread  # noqa: F401 (autouse fixture)

from prep.load import Collator, PackedDataset, load_shards
from prep.train import Dist, finish_distributed, forward_backward, token_loss_sum, trained_tokens

RTOL, ATOL = 1e-4, 1e-6


@pytest.fixture(scope="module")
def shards_dir(tmp_path_factory):
    return build_shards(tmp_path_factory.mktemp("accum") / "shards", n_examples=60, max_len=256, num_shards=1)


def setup(shards_dir):
    """A tiny Llama (same init in every process), 8 packed rows and their collator."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    shards = load_shards(shards_dir)
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=shards.manifest["tokenizer"]["vocab_size"],
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=True,
    )
    model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")
    ds = PackedDataset(shards, shuffle=False)
    return model, [ds[i] for i in range(8)], Collator(shards.max_len, shards.pad_token_id)


def grads(model) -> dict[str, torch.Tensor]:
    out = {}
    for name, p in model.named_parameters():
        g = p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad
        out[name.removeprefix("module.")] = g.detach().clone()
    return out


@functools.cache
def one_batch_grads(shards_dir) -> dict[str, torch.Tensor]:
    model, rows, collate = setup(shards_dir)
    batch = collate(rows)
    (token_loss_sum(model, batch, "sdpa") / trained_tokens(batch["labels"])).backward()
    return grads(model)


def assert_same_grads(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=RTOL, atol=ATOL, msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.parametrize("k", [2, 4, 8])
def test_accumulation_equals_one_batch(shards_dir, k):
    model, rows, collate = setup(shards_dir)
    size = len(rows) // k
    window = [collate(rows[i * size : (i + 1) * size]) for i in range(k)]
    loss_sum, n = forward_backward(model, window, "sdpa", Dist())
    assert n == sum(trained_tokens(mb["labels"]) for mb in window)
    assert_same_grads(grads(model), one_batch_grads(shards_dir))


def test_mean_of_batch_means_would_differ(shards_dir):
    """The check above is sensitive: the naive normalisation gives a visibly different gradient."""
    model, rows, collate = setup(shards_dir)
    window = [collate(rows[i * 2 : (i + 1) * 2]) for i in range(4)]
    for mb in window:
        (token_loss_sum(model, mb, "sdpa") / trained_tokens(mb["labels"]) / len(window)).backward()
    naive, exact = grads(model), one_batch_grads(shards_dir)
    rel = max(float((naive[n] - exact[n]).norm() / exact[n].norm()) for n in exact)
    assert rel > 1e-3  # measured ~0.9%: 90x the tolerance above


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rank_worker(rank: int, world_size: int, port: int, shards_dir, out) -> None:
    """Each rank: its half of the rows as 2 micro-batches, under DDP then under FSDP2; rank 0 saves the grads."""
    import os

    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.nn.parallel import DistributedDataParallel

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    d = Dist(rank=rank, world_size=world_size)
    result = {}
    for mode in ("ddp", "fsdp"):
        model, rows, collate = setup(shards_dir)
        mine = rows[rank * 4 : (rank + 1) * 4]
        if mode == "ddp":
            model = DistributedDataParallel(model)
        else:
            mesh = init_device_mesh("cpu", (world_size,))
            for layer in model.model.layers:
                fully_shard(layer, mesh=mesh)
            fully_shard(model, mesh=mesh)
        forward_backward(model, [collate(mine[:2]), collate(mine[2:])], "sdpa", d)
        result[mode] = grads(model)
    if rank == 0:
        torch.save(result, out)
    finish_distributed()  # leaves the process (exit code 0)


def test_two_ranks_with_accumulation_equal_one_batch(shards_dir, tmp_path):
    out = tmp_path / "grads.pt"
    mp.spawn(rank_worker, args=(2, free_port(), shards_dir, out), nprocs=2, join=True)
    result, exact = torch.load(out), one_batch_grads(shards_dir)
    assert_same_grads(result["ddp"], exact)
    assert_same_grads(result["fsdp"], exact)
