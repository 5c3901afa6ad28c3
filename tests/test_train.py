"""prep.train: a tiny model on real shards learns, logs, resumes exactly, saves a model transformers reloads."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from _shards import build_shards, single_thread  # noqa: F401 (autouse fixture)
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

import prep.train as train
from prep.errors import ConfigError, OutputExistsError
from prep.load import Collator, PackedDataset, load_shards
from prep.models import model_config
from prep.train import (
    TrainConfig,
    count_flops,
    get_lr,
    parse_args,
    peak_flops,
    train_model,
)

FAST = dict(batch_size=2, lr=3e-3, progress=False)


@pytest.fixture(scope="module")
def shards_dir(tmp_path_factory):
    """Real Alpaca text, byte-level tokens (257): the tiny model trains in seconds, like the README demo."""
    return build_shards(
        tmp_path_factory.mktemp("train") / "shards", n_examples=120, max_len=512, num_shards=2, tokenizer_name="bytes"
    )


@pytest.fixture(scope="module")
def trained(shards_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "out"
    final = train_model(
        TrainConfig(shards=str(shards_dir), out_dir=str(out), max_steps=30, **{**FAST, "progress": True})
    )
    return out, final


def saved_random_model(folder: Path, config) -> Path:
    """A random-init model of `config` (seed 0), saved in `folder` for `--model`."""
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    return folder


def small_llama(**overrides) -> LlamaConfig:
    """A one-layer Llama config for `--model` tests (vocab_size and the rest as given)."""
    return LlamaConfig(**{"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                          "num_attention_heads": 2, **overrides})


def read_metrics(out) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_loss_goes_down_over_a_few_dozen_steps(trained):
    out, final = trained
    losses = [m["loss"] for m in read_metrics(out)]
    assert len(losses) == 30 and final["step"] == 30 and final["out_dir"] == str(out)
    assert losses[0] == pytest.approx(math.log(257), abs=0.3)  # random init: ~uniform over the vocabulary
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 1.0


def test_metrics_jsonl_has_one_line_per_step_with_the_documented_keys(trained):
    metrics = read_metrics(trained[0])
    assert [m["step"] for m in metrics] == list(range(1, 31))
    for m in metrics:
        assert {
            "step",
            "epoch",
            "loss",
            "lr",
            "grad_norm",
            "tokens",
            "trained_tokens",
            "examples",
            "tokens_per_s",
            "trained_tokens_per_s",
            "step_time_s",
        } <= set(m)
        assert 0 < m["trained_tokens"] <= m["tokens"] <= 2 * 512 and m["examples"] >= 2
        assert "mfu" not in m  # CPU: no known peak, so MFU is omitted
    lrs = [m["lr"] for m in metrics]
    assert lrs[0] < lrs[1] == pytest.approx(3e-3)  # warmup (5% of 30 steps = 1 step), then the peak
    assert lrs[-1] == pytest.approx(3e-4) and all(a >= b for a, b in zip(lrs[1:], lrs[2:]))  # cosine to 10%


def test_saved_model_reloads_and_generates(trained, shards_dir):
    out = trained[0]
    model = AutoModelForCausalLM.from_pretrained(out)
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert len(tokenizer) == len(AutoTokenizer.from_pretrained(shards_dir / "tokenizer"))
    prompt = tokenizer("###instruction###\nGive three tips for staying healthy.\n###response###\n", return_tensors="pt")
    assert tokenizer.decode(prompt["input_ids"][0]).startswith("###instruction###")
    generated = model.generate(**prompt, max_new_tokens=12, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    assert generated.shape[1] > prompt["input_ids"].shape[1]
    assert isinstance(tokenizer.decode(generated[0]), str)
    torch.testing.assert_close(
        load_file(out / "model.safetensors")["model.norm.weight"], model.model.norm.weight.detach()
    )


def untimed(metrics: list[dict]) -> list[dict]:
    """Metrics without the wall-clock ones."""
    timed = {"tokens_per_s", "trained_tokens_per_s", "step_time_s"}
    return [{k: v for k, v in m.items() if k not in timed} for m in metrics]


class Stop(Exception):
    pass


def test_resume_gives_the_result_of_an_uninterrupted_run(shards_dir, tmp_path, monkeypatch):
    run = dict(shards=str(shards_dir), max_steps=8, grad_accum=2, save_every=4, **FAST)
    train_model(TrainConfig(out_dir=str(tmp_path / "a"), **run))

    save = train.save_checkpoint

    def save_then_crash(out_dir, step, *args, **kwargs):
        save(out_dir, step, *args, **kwargs)
        if step == 4:
            raise Stop

    monkeypatch.setattr(train, "save_checkpoint", save_then_crash)
    with pytest.raises(Stop):
        train_model(TrainConfig(out_dir=str(tmp_path / "b"), **run))
    monkeypatch.setattr(train, "save_checkpoint", save)
    with pytest.raises(OutputExistsError, match="--resume"):
        train_model(TrainConfig(out_dir=str(tmp_path / "b"), **run))
    train_model(TrainConfig(out_dir=str(tmp_path / "b"), resume=True, **run))

    a, b = load_file(tmp_path / "a" / "model.safetensors"), load_file(tmp_path / "b" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)  # bitwise: model, optimizer, schedule and data position restored
    assert untimed(read_metrics(tmp_path / "a")) == untimed(read_metrics(tmp_path / "b"))  # same losses, lr, tokens
    assert sorted(p.name for p in (tmp_path / "b" / "checkpoints").iterdir()) == ["step-0000004", "step-0000008"]


def test_resume_refuses_a_changed_batch_size(shards_dir, tmp_path):
    train_model(TrainConfig(shards=str(shards_dir), out_dir=str(tmp_path), max_steps=1, save_every=1, **FAST))
    with pytest.raises(ConfigError, match="batch_size=2, this run has 4"):
        train_model(
            TrainConfig(
                shards=str(shards_dir), out_dir=str(tmp_path), max_steps=2, resume=True, **{**FAST, "batch_size": 4}
            )
        )


def test_resume_without_checkpoint_is_an_error(shards_dir, tmp_path):
    with pytest.raises(ConfigError, match="no checkpoint"):
        train_model(TrainConfig(shards=str(shards_dir), out_dir=str(tmp_path), max_steps=1, resume=True, **FAST))


def test_marker_tokens_resize_a_pretrained_models_embeddings(tmp_path):
    shards_dir = build_shards(tmp_path / "shards", n_examples=16, max_len=256, num_shards=1, markers=True)
    base = saved_random_model(tmp_path / "base", small_llama(vocab_size=49152, tie_word_embeddings=True))
    train_model(
        TrainConfig(shards=str(shards_dir), out_dir=str(tmp_path / "out"), model=str(base), max_steps=2, **FAST)
    )
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert model.get_input_embeddings().num_embeddings == 49154 == len(AutoTokenizer.from_pretrained(tmp_path / "out"))


def test_a_model_with_full_and_sliding_window_layers_trains_with_one_mask_per_layer_type(
    shards_dir, tmp_path, monkeypatch
):
    from transformers import Qwen2Config

    config = Qwen2Config(
        vocab_size=257,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        use_sliding_window=True,
        sliding_window=32,
        max_window_layers=1,
    )
    base = saved_random_model(tmp_path / "base", config)
    masks = []
    build = train.PackedAttention.kwargs

    def spy(self, *args, **kwargs):
        masks.append(build(self, *args, **kwargs)["attention_mask"])
        return {"attention_mask": masks[-1]}

    monkeypatch.setattr(train.PackedAttention, "kwargs", spy)
    run = TrainConfig(shards=str(shards_dir), out_dir=str(tmp_path / "out"), model=str(base), max_steps=2, **FAST)
    final = train_model(run)
    assert final["step"] == 2 and math.isfinite(final["loss"])
    assert masks and all(set(m) == {"full_attention", "sliding_attention"} for m in masks)


def test_a_model_whose_tokenizer_differs_from_the_shards_is_refused(shards_dir, tmp_path):
    from _shards import load_tokenizer

    base = saved_random_model(tmp_path / "base", small_llama(vocab_size=49152))
    load_tokenizer("smollm2-135m").save_pretrained(base)  # the model's own tokenizer; the shards use bytes
    run = TrainConfig(shards=str(shards_dir), out_dir=str(tmp_path / "out"), model=str(base), max_steps=1, **FAST)
    with pytest.raises(ConfigError, match=r"packed with another tokenizer .* pack again with --tokenizer"):
        train_model(run)
    # smollm2 plus two marker tokens: every model token keeps its id, so the check passes (and embeddings grow)
    matching = build_shards(tmp_path / "smol", n_examples=16, max_len=256, num_shards=1, markers=True)
    assert train_model(TrainConfig(**{**vars(run), "shards": str(matching), "overwrite": True}))["step"] == 1


def test_examples_longer_than_the_models_context_are_warned_about(shards_dir, tmp_path, capsys):
    base = saved_random_model(tmp_path / "base", small_llama(vocab_size=257, max_position_embeddings=64))
    train_model(TrainConfig(shards=str(shards_dir), out_dir=str(tmp_path / "out"), model=str(base), max_steps=1, **FAST))
    longest = max(max(r["seq_lengths"].tolist()) for r in PackedDataset(load_shards(shards_dir), shuffle=False))
    assert f"warning: the longest example has {longest:,} tokens, more than the model's max_position_embeddings (64)" \
        in capsys.readouterr().err
    train_model(TrainConfig(shards=str(shards_dir), out_dir=str(tmp_path / "out2"), max_steps=1, **FAST))
    assert "warning" not in capsys.readouterr().err  # the built-in configs take the shards' max_len


def test_epochs_mode_runs_whole_accumulation_windows(shards_dir, tmp_path):
    small = build_shards(tmp_path / "shards", n_examples=40, max_len=512, num_shards=1, tokenizer_name="bytes")
    final = train_model(
        TrainConfig(
            shards=str(small), out_dir=str(tmp_path / "out"), epochs=2, grad_accum=3, **{**FAST, "batch_size": 4}
        )
    )
    rows = json.loads((small / "manifest.json").read_text())["counts"]["rows"]
    assert final["step"] == 2 * math.ceil(rows / 4) // 3 and final["epoch"] == 1


def test_contaminating_attention_path_is_refused(shards_dir, tmp_path):
    with pytest.raises(ConfigError, match="attend to each other"):
        train_model(
            TrainConfig(
                shards=str(shards_dir), out_dir=str(tmp_path), attn_implementation="paged|eager", max_steps=1, **FAST
            )
        )


@pytest.mark.parametrize(
    "bad, message",
    [
        (dict(shards=""), "no shards folder"),
        (dict(batch_size=0), "--batch-size must be >= 1"),
        (dict(warmup_ratio=1.0), "--warmup-ratio"),
        (dict(precision="fp8"), "--precision 'fp8'"),
        (dict(model_config="huge"), "unknown --model-config 'huge'"),
    ],
)
def test_bad_options_raise_config_error_naming_the_flag(shards_dir, tmp_path, bad, message):
    with pytest.raises(ConfigError, match=message):
        train_model(TrainConfig(**{"shards": str(shards_dir), "out_dir": str(tmp_path), "max_steps": 1, **FAST, **bad}))


def test_flex_attention_on_cpu_is_refused_before_training(shards_dir, tmp_path):
    config = TrainConfig(shards=str(shards_dir), out_dir=str(tmp_path), attn_implementation="flex_attention", **FAST)
    with pytest.raises(ConfigError, match="flex_attention trains only on CUDA"):
        train_model(config)


def test_mfu_with_a_given_peak_counts_attention_per_example(shards_dir, tmp_path):
    out = tmp_path / "out"
    train_model(TrainConfig(shards=str(shards_dir), out_dir=str(out), max_steps=3, peak_tflops=0.5, **FAST))
    model = AutoModelForCausalLM.from_pretrained(out)
    flops = count_flops(model)
    rows = PackedDataset(load_shards(shards_dir), seed=0)
    first = [rows[i]["seq_lengths"] for i in range(2)]  # step 1 = the first micro-batch of epoch 0
    pairs = sum(n * (n + 1) // 2 for x in first for n in x.tolist())  # causal pairs inside each example
    m = read_metrics(out)[0]
    assert m["tokens"] == sum(int(x.sum()) for x in first)
    assert m["mfu"] == pytest.approx(flops.step(m["tokens"], pairs) / m["step_time_s"] / 0.5e12, rel=1e-9)


def test_bf16_autocast_trains_close_to_fp32_with_fp32_weights(shards_dir, tmp_path):
    """The GPU default (bf16 autocast, fp32 master weights, fp32 loss), run through CPU autocast."""
    run = dict(shards=str(shards_dir), max_steps=5, **FAST)
    fp32 = train_model(TrainConfig(out_dir=str(tmp_path / "fp32"), precision="fp32", **run))
    bf16 = train_model(TrainConfig(out_dir=str(tmp_path / "bf16"), precision="bf16", **run))
    losses = [m["loss"] for m in read_metrics(tmp_path / "bf16")]
    assert losses[-1] < losses[0] and bf16["loss"] == pytest.approx(fp32["loss"], rel=1e-2)
    weights = load_file(tmp_path / "bf16" / "model.safetensors")
    assert all(w.dtype == torch.float32 for w in weights.values())


def test_get_lr_warmup_then_cosine():
    config = TrainConfig(lr=1.0, warmup_ratio=0.1, min_lr_ratio=0.1)
    lrs = [get_lr(s, 100, config) for s in range(100)]
    assert lrs[0] == pytest.approx(1 / 11) and lrs[9] == pytest.approx(10 / 11) and lrs[10] == pytest.approx(1.0)
    assert lrs[99] == pytest.approx(0.1) and lrs[55] == pytest.approx(0.55, abs=0.01)


def attention_flops_by_hand(lengths: list[int], layers: int, heads: int, head_dim: int) -> int:
    """Causal attention FLOPs counted pair by pair: query q of an example sees keys 0..q of the same example; each
    (query, key) pair costs a q·k dot product and a weighted add of v (2·head_dim FLOPs each, multiply + add) per
    head and layer, and the backward pass twice the forward."""
    pairs = sum(q + 1 for n in lengths for q in range(n))
    return pairs * (2 * head_dim + 2 * head_dim) * heads * layers * 3


def test_flops_are_6n_per_token_plus_causal_attention_within_each_example():
    model = AutoModelForCausalLM.from_config(model_config("tiny", vocab_size=270, max_len=512))
    n = sum(p.numel() for p in model.parameters())  # tied: the embedding counts once, as the output matmul
    flops = count_flops(model)
    one = [512]  # one 512-token example, then four 128-token examples in one row
    assert flops.step(tokens=512, causal_pairs=512 * 513 // 2) == 6 * n * 512 + attention_flops_by_hand(one, 4, 4, 16)
    four = [128] * 4
    assert flops.step(tokens=512, causal_pairs=4 * 128 * 129 // 2) == 6 * n * 512 + attention_flops_by_hand(
        four, 4, 4, 16
    )
    assert peak_flops(torch.device("cpu"), "auto") is None


def test_micro_batches_count_the_causal_pairs_of_their_examples(shards_dir):
    shards = load_shards(shards_dir)
    dataset = PackedDataset(shards, seed=0)
    batches = train.micro_batches(dataset, Collator(shards.max_len, shards.pad_token_id), 3, train.Position())
    for b in range(4):
        mb = next(batches)
        lengths = [n for row in range(3 * b, 3 * b + 3) for n in dataset[row]["seq_lengths"].tolist()]
        assert mb.examples == len(lengths) >= 3 and mb.tokens == sum(lengths)
        assert mb.causal_pairs * 12 * 4 * 4 * 16 == attention_flops_by_hand(lengths, 4, 4, 16)


@pytest.mark.parametrize(
    "name, peak",
    [("NVIDIA H200 NVL", 835), ("NVIDIA H200", 989), ("NVIDIA H100 80GB HBM3", 989), ("NVIDIA H100 PCIe", 756),
     ("NVIDIA H100 NVL", 835), ("NVIDIA GH200 480GB", 989), ("NVIDIA A100-SXM4-80GB", 312), ("Tesla T4", None)],
)
def test_peak_flops_by_device_name_takes_the_variant_before_its_family(name, peak):
    assert (train.peak_bf16_flops(name) or 0) / 1e12 == (peak or 0)


def test_parse_args_maps_every_flag_onto_a_field():
    config = parse_args(
        [
            "shards",
            "-o",
            "out",
            "--max-steps",
            "3",
            "--lr",
            "1e-4",
            "--fsdp",
            "--no-progress",
            "--attn-implementation",
            "eager",
            "--gradient-checkpointing",
        ]
    )
    assert config == TrainConfig(
        shards="shards",
        out_dir="out",
        max_steps=3,
        lr=1e-4,
        fsdp=True,
        progress=False,
        attn_implementation="eager",
        gradient_checkpointing=True,
    )


@pytest.mark.parametrize(
    "variant",
    [
        dict(gradient_checkpointing=True),
        dict(compile=True),
        dict(attn_implementation="eager"),
        pytest.param(
            dict(attn_implementation="flex_attention", device="cuda"),
            marks=pytest.mark.skipif(
                not torch.cuda.is_available(),
                reason="flex_attention trains only on CUDA (no CPU backward; a CPU kernel that is wrong on AVX2-only "
                "CPUs): runs in benchmarks/gpu_check.sh",
            ),
        ),
    ],
    ids=["checkpointing", "compile", "eager", "flex_attention"],
)
def test_checkpointing_compile_and_other_attention_paths_train_like_the_default(shards_dir, tmp_path, variant):
    """Other kernels round differently, so what must agree closely is what rounding barely moves: the first step's
    gradient norm (same weights, same batch) and the loss of every step (a mean over ~800 tokens). The weights only
    within Adam's own bound: Adam scales each update to about lr per coordinate whatever the gradient's size, so
    a coordinate whose gradient is ~0 and changes sign with rounding moves by lr one way in one run and the other
    way in the other. Over these steps (betas 0.9/0.95) |m/sqrt(v)| <= 1.001 by Cauchy-Schwarz, so no weight may
    differ by more than 2 * 1.001 * sum(lr); a wrong kernel moves the losses and the gradient norm long before."""
    # fp32 and sdpa: the same numerics on a GPU too (auto would pick flash attention, bf16 only, where installed)
    run = dict(shards=str(shards_dir), max_steps=3, precision="fp32", attn_implementation="sdpa", **FAST)
    train_model(TrainConfig(out_dir=str(tmp_path / "base"), **run))
    train_model(TrainConfig(out_dir=str(tmp_path / "variant"), **{**run, **variant}))
    base, other = read_metrics(tmp_path / "base"), read_metrics(tmp_path / "variant")
    assert other[0]["grad_norm"] == pytest.approx(base[0]["grad_norm"], rel=1e-5)
    assert [m["loss"] for m in other] == pytest.approx([m["loss"] for m in base], abs=1e-5)
    bound = 2 * 1.001 * sum(m["lr"] for m in base)
    a, b = load_file(tmp_path / "base" / "model.safetensors"), load_file(tmp_path / "variant" / "model.safetensors")
    for k in a:
        assert float((a[k] - b[k]).abs().max()) <= bound, k
