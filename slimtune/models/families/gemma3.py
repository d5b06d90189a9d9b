"""Gemma 3 (text): Gemma 2's layout (four (1 + w) norms, GeGLU, sqrt(hidden)-scaled embeddings, sliding layers)
plus per-head q/k RMSNorms and RoPE per layer type; softcaps are off by default (then SDPA runs), honoured when a
config sets them."""

from dataclasses import replace

from slimtune.models.arch import register
from slimtune.models.families.gemma2 import GEMMA2

GEMMA3 = register(replace(
    GEMMA2,
    model_types=("gemma3_text",),
    gguf_arch="gemma3",
    qk_norm=True,
    rope_per_layer_type=True,
    tiny={**GEMMA2.tiny, "layer_types": ["sliding_attention", "full_attention"]},
))
