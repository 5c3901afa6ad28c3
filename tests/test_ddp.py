"""Two gloo processes on CPU: ranks see disjoint rows and end with identical weights (DDP); FSDP2 under
PyTorch's own launcher (`torchrun -m prep.train --fsdp`) ends with the same weights as DDP."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest
import torch
import torch.multiprocessing as mp
from _shards import REPO, build_shards, single_thread  # noqa: F401 (autouse fixture)
from safetensors.torch import load_file

STEPS, BATCH = 4, 2


@pytest.fixture(scope="module")
def shards_dir(tmp_path_factory):
    return build_shards(
        tmp_path_factory.mktemp("ddp") / "shards", n_examples=60, max_len=512, num_shards=2, tokenizer_name="bytes"
    )


@pytest.fixture(scope="module")
def ddp_run(shards_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp_out")
    mp.spawn(rank_worker, args=(2, free_port(), shards_dir, out), nprocs=2, join=True)
    return out, [torch.load(out / f"rank{r}.pt") for r in range(2)]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rank_worker(rank: int, world_size: int, port: int, shards_dir, out_dir) -> None:
    """train_model on one rank, recording the rows it read and its final weights."""
    import prep.train as train
    from prep.load import PackedDataset

    torch.set_num_threads(1)
    os.environ.update(
        RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)
    )
    rows: list[int] = []
    weights: dict[str, torch.Tensor] = {}
    getitem, save_final = PackedDataset.__getitem__, train.save_final

    def recording_getitem(self, index):
        rows.append(int(self.rows[index]))
        return getitem(self, index)

    def capturing_save_final(out, model, tokenizer, d):
        weights.update({k: v.detach().clone() for k, v in model.state_dict().items()})
        save_final(out, model, tokenizer, d)

    PackedDataset.__getitem__ = recording_getitem
    train.save_final = capturing_save_final
    config = train.TrainConfig(
        shards=str(shards_dir),
        out_dir=str(out_dir / "model"),
        max_steps=STEPS,
        batch_size=BATCH,
        lr=3e-3,
        progress=False,
    )
    train.train_model(config)
    torch.save({"rows": rows, "weights": weights}, out_dir / f"rank{rank}.pt")
    train.finish_distributed()  # leaves the process (exit code 0)


def test_ranks_read_disjoint_rows(ddp_run):
    _, ranks = ddp_run
    rows0, rows1 = ranks[0]["rows"], ranks[1]["rows"]
    assert len(rows0) == len(rows1) == STEPS * BATCH
    assert not set(rows0) & set(rows1)


def test_ranks_end_with_identical_weights_equal_to_the_saved_model(ddp_run):
    out, ranks = ddp_run
    w0, w1 = ranks[0]["weights"], ranks[1]["weights"]
    assert w0.keys() == w1.keys() and all(torch.equal(w0[k], w1[k]) for k in w0)
    saved = load_file(out / "model" / "model.safetensors")
    assert all(torch.equal(saved[k], w0[k]) for k in saved)
    assert (out / "model" / "metrics.jsonl").read_text().count("\n") == STEPS


def test_torchrun_fsdp_matches_ddp(ddp_run, shards_dir, tmp_path):
    out, _ = ddp_run
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node",
        "2",
        "--master-port",
        str(free_port()),
        "-m",
        "prep.train",
        str(shards_dir),
        "-o",
        str(tmp_path),
        "--max-steps",
        str(STEPS),
        "--batch-size",
        str(BATCH),
        "--lr",
        "3e-3",
        "--fsdp",
        "--no-progress",
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # rank 0's last line is the final metrics: printed before finish_distributed leaves with os._exit
    assert json.loads(proc.stdout.strip().splitlines()[-1])["step"] == STEPS
    fsdp, ddp = load_file(tmp_path / "model.safetensors"), load_file(out / "model" / "model.safetensors")
    assert fsdp.keys() == ddp.keys()
    for k in ddp:
        torch.testing.assert_close(fsdp[k], ddp[k], rtol=1e-4, atol=1e-5)
