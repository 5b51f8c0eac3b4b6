"""LLaMA-3-8B shapes shared by the benchmarks (imported as a sibling module of the scripts)."""

from __future__ import annotations

#: Prunable linears of one decoder block: name -> (out_features, in_features).
SHAPES_8B = {
    "q_proj": (4096, 4096),
    "k_proj": (1024, 4096),
    "v_proj": (1024, 4096),
    "o_proj": (4096, 4096),
    "gate_proj": (14336, 4096),
    "up_proj": (14336, 4096),
    "down_proj": (4096, 14336),
}

#: ``LlamaConfig`` keyword arguments of LLaMA-3-8B.
LLAMA3_8B = dict(
    vocab_size=128256,
    hidden_size=4096,
    intermediate_size=14336,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=8,
    max_position_embeddings=8192,
    rope_theta=500000.0,
)
