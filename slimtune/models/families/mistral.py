"""Mistral: Llama's layout without biases (transformers' MistralConfig has no attention_bias); optional sliding
window on every layer (passed to the attention function unchanged)."""

from slimtune.models.arch import LLAMA_PROJECTIONS, ArchSpec, register

MISTRAL = register(ArchSpec(
    model_types=("mistral",),
    gguf_arch="llama",  # llama.cpp converts Mistral checkpoints to its llama architecture
    projections=LLAMA_PROJECTIONS,
    biases=lambda config, spec: dict.fromkeys(spec.proj_names, False),
    sliding_window=lambda config: getattr(config, "sliding_window", None),
))
