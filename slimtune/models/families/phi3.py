"""Phi-3 / Phi-3.5: Llama's math with packed projections — ``qkv_proj`` = q | k | v and ``gate_up_proj`` =
gate | up (rows in that order). Adapters sit on the packed modules (PEFT's target_modules for Phi-3 are qkv_proj,
o_proj, gate_up_proj, down_proj); the fused ops split the packed output. No biases. A partial rotary factor < 1
(Phi-4-mini) rotates only part of each head, which the fused RoPE does not do: such configs train unfused."""

from slimtune.models.arch import ArchSpec, Proj, register

PHI3_PROJECTIONS = (
    Proj("qkv_proj", "attn", ("q", "k", "v"), "out"),
    Proj("o_proj", "attn", ("o",), "in"),
    Proj("gate_up_proj", "mlp", ("gate", "up"), "out"),
    Proj("down_proj", "mlp", ("down",), "in"),
)


def _partial_rotary(config) -> float:
    params = getattr(config, "rope_parameters", None) or {}
    return float(params.get("partial_rotary_factor", getattr(config, "partial_rotary_factor", 1.0)) or 1.0)


PHI3 = register(ArchSpec(
    model_types=("phi3",),
    gguf_arch="phi3",
    projections=PHI3_PROJECTIONS,
    biases=lambda config, spec: dict.fromkeys(spec.proj_names, False),
    sliding_window=lambda config: getattr(config, "sliding_window", None),
    fusable=lambda config: None if _partial_rotary(config) == 1.0
    else f"partial_rotary_factor {_partial_rotary(config):g} < 1 (the fused RoPE rotates whole heads)",
    # Phi3Attention splits qkv_proj at config.num_attention_heads · head_dim, which a pruned layer no longer has
    loram_prunable=lambda config: "its attention splits qkv_proj by the config's head counts (LoRAM changes them "
    "per layer)",
    tiny=dict(pad_token_id=3),
))
