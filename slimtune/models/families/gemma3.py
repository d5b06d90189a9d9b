"""Gemma 3 (text): Gemma 2's layout (four (1 + w) norms, GeGLU, sqrt(hidden)-scaled embeddings, sliding layers)
plus per-head q/k RMSNorms; softcaps are off by default (then SDPA runs), honoured when a config sets them."""

from slimtune.models.arch import LLAMA_PROJECTIONS, ArchSpec, register
from slimtune.models.families.gemma2 import GEMMA_NORMS, gemma_biases

GEMMA3 = register(ArchSpec(
    model_types=("gemma3_text",),
    gguf_arch="gemma3",
    projections=LLAMA_PROJECTIONS,
    layer_norms=GEMMA_NORMS,
    qk_norm=True,
    rope_per_layer_type=True,
    norm_offset=1.0,
    norm_cast="fp32",
    attn_softcap=lambda config: getattr(config, "attn_logit_softcapping", None),
    final_softcap=lambda config: getattr(config, "final_logit_softcapping", None),
    sliding_window=lambda config: getattr(config, "sliding_window", None),
    biases=gemma_biases,
    embed_scale=lambda config: float(config.hidden_size) ** 0.5,
    needs_eager_attention=lambda config: getattr(config, "attn_logit_softcapping", None) is not None,
    tiny=dict(head_dim=16, query_pre_attn_scalar=16, sliding_window=8, tie_word_embeddings=True,
              layer_types=["sliding_attention", "full_attention"]),
))
