"""Gemma 2: Llama's projections, four RMSNorms per layer (pre/post attention, pre/post feed-forward) storing w
around 0 (the norm multiplies by 1 + w, in fp32), GeGLU (gelu_pytorch_tanh), tanh softcapping of the attention
logits (so HF runs eager attention: SDPA has no softcap) and of the output logits, a sliding window on every other
layer, and embeddings scaled by sqrt(hidden) (inside HF's embedding module, which the fused path keeps)."""

from slimtune.models.arch import LLAMA_PROJECTIONS, ArchSpec, register

GEMMA_NORMS = (
    ("input_layernorm", "pre"),
    ("post_attention_layernorm", "post"),
    ("pre_feedforward_layernorm", "pre"),
    ("post_feedforward_layernorm", "post"),
)


def gemma_biases(config, spec):
    """attention_bias on q/k/v/o; Gemma's MLP never has biases."""
    attn = bool(getattr(config, "attention_bias", False))
    return {p.name: attn and p.block == "attn" for p in spec.projections}


GEMMA2 = register(ArchSpec(
    model_types=("gemma2",),
    gguf_arch="gemma2",
    projections=LLAMA_PROJECTIONS,
    layer_norms=GEMMA_NORMS,
    norm_offset=1.0,
    norm_cast="fp32",
    attn_softcap=lambda config: getattr(config, "attn_logit_softcapping", None),
    final_softcap=lambda config: getattr(config, "final_logit_softcapping", None),
    sliding_window=lambda config: getattr(config, "sliding_window", None),
    biases=gemma_biases,
    embed_scale=lambda config: float(config.hidden_size) ** 0.5,
    needs_eager_attention=lambda config: getattr(config, "attn_logit_softcapping", None) is not None,
    tiny=dict(head_dim=16, query_pre_attn_scalar=16, sliding_window=8, tie_word_embeddings=True),
))
