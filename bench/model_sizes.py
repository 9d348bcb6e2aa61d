"""The Llama-shaped models the throughput benchmarks train (random weights, saved once per run)."""

from __future__ import annotations

SIZES = {
    # 11M parameters, its 32k x 256 embedding 74 % of them: lm_head-bound.
    "cpu": {
        "model": {
            "hidden_size": 256,
            "intermediate_size": 704,
            "num_hidden_layers": 4,
            "num_attention_heads": 8,
            "num_key_value_heads": 2,
            "vocab_size": 32000,
        },
        "dtype": "float32",
        "max_length": [512],
        "micro_batch": [4],
    },
    # Checks the code paths only (bench/gpu_check.sh --dry-run): bfloat16 like "1b".
    "tiny": {
        "model": {
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "vocab_size": 512,
        },
        "dtype": "bfloat16",
        "max_length": [64],
        "micro_batch": [2],
    },
    # SmolLM2-135M's shape (the demo model): 30 narrow layers, so the decoder, not the lm_head,
    # holds most of the compute, as in real LLMs.
    "135m": {
        "model": {
            "hidden_size": 576,
            "intermediate_size": 1536,
            "num_hidden_layers": 30,
            "num_attention_heads": 9,
            "num_key_value_heads": 3,
            "vocab_size": 49152,
            "rope_theta": 100000.0,
        },
        "dtype": "float32",
        "max_length": [512],
        "micro_batch": [4],
    },
    # Llama-3.2-1B's shape (without its rope scaling), tied embeddings.
    "1b": {
        "model": {
            "hidden_size": 2048,
            "intermediate_size": 8192,
            "num_hidden_layers": 16,
            "num_attention_heads": 32,
            "num_key_value_heads": 8,
            "vocab_size": 128256,
            "rope_theta": 500000.0,
        },
        "dtype": "bfloat16",
        "max_length": [1024, 2048],
        "micro_batch": [16, 8],
    },
}


def num_params(size: str) -> int:
    """Parameters of a size's model (tied embedding, RMSNorm weights, no biases): the same count
    ``sum(p.numel() for p in model.parameters())`` gives."""
    m = SIZES[size]["model"]
    hidden, head_dim = m["hidden_size"], m["hidden_size"] // m["num_attention_heads"]
    q, kv = m["num_attention_heads"] * head_dim, m["num_key_value_heads"] * head_dim
    layer = hidden * (2 * q + 2 * kv) + 3 * hidden * m["intermediate_size"] + 2 * hidden
    return m["vocab_size"] * hidden + m["num_hidden_layers"] * layer + hidden


def dtype_bytes(size: str) -> int:
    return 2 if SIZES[size]["dtype"] == "bfloat16" else 4
