"""Llama 2 / 3.x (and SmolLM2, which is a Llama): the reference layout every default of ArchSpec describes."""

from slimtune.models.arch import LLAMA_PROJECTIONS, ArchSpec, register

LLAMA = register(ArchSpec(model_types=("llama",), gguf_arch="llama", projections=LLAMA_PROJECTIONS))
