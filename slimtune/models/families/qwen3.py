"""Qwen3: Llama's layout (``attention_bias`` rule) plus a per-head RMSNorm on q and k before RoPE."""

from slimtune.models.arch import LLAMA_PROJECTIONS, ArchSpec, register

QWEN3 = register(ArchSpec(
    model_types=("qwen3",),
    gguf_arch="qwen3",
    projections=LLAMA_PROJECTIONS,
    qk_norm=True,
    tiny=dict(head_dim=16),  # Qwen3Config defaults to head_dim 128
    sliding_window=lambda config: getattr(config, "sliding_window", None)
    if getattr(config, "use_sliding_window", False) else None,
))
