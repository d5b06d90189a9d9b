"""Qwen2 / Qwen2.5: Llama's layout with biases on q, k and v (always; o and the MLP have none)."""

from slimtune.models.arch import LLAMA_PROJECTIONS, ArchSpec, register

QWEN2 = register(ArchSpec(
    model_types=("qwen2",),
    gguf_arch="qwen2",
    projections=LLAMA_PROJECTIONS,
    biases=lambda config, spec: {p: p in ("q_proj", "k_proj", "v_proj") for p in spec.proj_names},
    sliding_window=lambda config: getattr(config, "sliding_window", None)
    if getattr(config, "use_sliding_window", False) else None,
))
