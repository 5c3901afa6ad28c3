"""Built-in Llama-style configs for random-init runs: `prep train --model-config tiny|small|0.5b|0.5b-qwen`.

Imports only transformers and the stdlib. Sizes are given for a 32k vocabulary; the vocabulary
always comes from the shards' tokenizer (the embedded byte-level one has about 270 tokens).
"""

from __future__ import annotations

from transformers import LlamaConfig

from prep.errors import ConfigError

MODEL_CONFIGS: dict[str, dict] = {
    # ~0.2M params besides the embeddings: trains on a laptop CPU in a couple of minutes (README demo, tests).
    "tiny": dict(
        hidden_size=64,
        intermediate_size=192,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=True,
    ),
    # ~6M params besides the embeddings: a quick GPU smoke run.
    "small": dict(
        hidden_size=256,
        intermediate_size=768,
        num_hidden_layers=8,
        num_attention_heads=4,
        num_key_value_heads=4,
        tie_word_embeddings=True,
    ),
    # ~0.4B params besides the embeddings, ~0.5B with a 32k vocabulary (untied): the speed benchmark's model.
    "0.5b": dict(
        hidden_size=1536,
        intermediate_size=4096,
        num_hidden_layers=16,
        num_attention_heads=12,
        num_key_value_heads=4,
        tie_word_embeddings=False,
    ),
    # The shape of Qwen2.5-0.5B (as a Llama config: no q/k/v biases): 0.49B params with its 151,665-token
    # vocabulary, 0.36B besides the (tied) embeddings. The GPU benchmark's model (benchmarks/gpu_check.py).
    "0.5b-qwen": dict(
        hidden_size=896,
        intermediate_size=4864,
        num_hidden_layers=24,
        num_attention_heads=14,
        num_key_value_heads=2,
        tie_word_embeddings=True,
        rms_norm_eps=1e-6,
        rope_theta=1e6,
    ),
}


def model_config(
    name: str,
    vocab_size: int,
    max_len: int,
    bos_token_id: int | None = None,
    eos_token_id: int | None = None,
    pad_token_id: int | None = None,
) -> LlamaConfig:
    """A LlamaConfig for a built-in size, sized to the tokenizer and the shards' max_len.

    Args:
        name: one of MODEL_CONFIGS.
        vocab_size: len(tokenizer) of the shards' tokenizer.
        max_len: the shards' max_len (sets max_position_embeddings).
    Raises:
        ConfigError: unknown name.

    >>> model_config("tiny", vocab_size=270, max_len=512).hidden_size
    64
    """
    if name not in MODEL_CONFIGS:
        raise ConfigError(f"unknown --model-config {name!r}; valid: {sorted(MODEL_CONFIGS)}")
    return LlamaConfig(
        vocab_size=vocab_size,
        max_position_embeddings=max_len,
        bos_token_id=bos_token_id,
        eos_token_id=eos_token_id,
        pad_token_id=pad_token_id,
        **MODEL_CONFIGS[name],
    )


def count_parameters(config: LlamaConfig) -> int:
    """Parameters of a LlamaForCausalLM built from `config`, without building it.

    >>> count_parameters(model_config("tiny", vocab_size=270, max_len=512))
    214464
    """
    h, i, n = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    kv = config.num_key_value_heads * (h // config.num_attention_heads)
    layer = 2 * h * h + 2 * h * kv + 3 * h * i + 2 * h  # q,o + k,v + gate,up,down + two norms
    embeddings = config.vocab_size * h * (1 if config.tie_word_embeddings else 2)
    return n * layer + embeddings + h
