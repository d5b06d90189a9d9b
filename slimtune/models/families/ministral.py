"""Ministral (8B): Mistral's layout (no biases) with a sliding window on the layers ``layer_types`` marks."""

from slimtune.models.arch import LLAMA_PROJECTIONS, ArchSpec, register

MINISTRAL = register(ArchSpec(
    model_types=("ministral",),
    gguf_arch="llama",  # llama.cpp converts Ministral checkpoints to its llama architecture
    projections=LLAMA_PROJECTIONS,
    biases=lambda config, spec: dict.fromkeys(spec.proj_names, False),
    sliding_window=lambda config: getattr(config, "sliding_window", None),
    tiny=dict(head_dim=16, sliding_window=8, layer_types=["sliding_attention", "full_attention"]),
))
