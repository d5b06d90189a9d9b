"""RoPE: the Triton kernel, its launcher ``rope_triton`` (the Triton primitive of slimtune/ops/rope.py).

One program per (batch, token): it loads that token's cos/sin once and rotates every head of q and of k. The
same kernel runs the backward with ``BACKWARD=True`` (the transpose, a rotation by −θ). Inputs may be strided
views; outputs may alias the inputs (in place). The math, the autograd Function (which saves cos and sin only) and
the public op live in slimtune/ops/rope.py; this module imports only torch, triton and
slimtune.kernels.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from slimtune.kernels.nf4 import device_guard

__all__ = ["rope_triton", "COMPILE_VARIANTS"]


@triton.jit
def _rotate_heads(
    in_ptr, out_ptr,
    s_b, s_t, s_h, s_d, o_b, o_t, o_h, o_d,
    b, t, H, HALF,
    c1, c2, s1, s2,
    BACKWARD: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr,
):
    h = tl.arange(0, BLOCK_H)[:, None]  # (BLOCK_H, 1)
    d = tl.arange(0, BLOCK_HALF)[None, :]  # (1, BLOCK_HALF)
    mask = (h < H) & (d < HALF)
    src = in_ptr + b * s_b + t * s_t + h * s_h + d * s_d
    x1 = tl.load(src, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(src + HALF * s_d, mask=mask, other=0.0).to(tl.float32)
    if BACKWARD:
        y1 = x1 * c1 + x2 * s2
        y2 = x2 * c2 - x1 * s1
    else:
        y1 = x1 * c1 - x2 * s1
        y2 = x2 * c2 + x1 * s2
    dst = out_ptr + b * o_b + t * o_t + h * o_h + d * o_d
    tl.store(dst, y1.to(out_ptr.dtype.element_ty), mask=mask)
    tl.store(dst + HALF * o_d, y2.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _rope_kernel(
    q_ptr, qo_ptr, k_ptr, ko_ptr, cos_ptr, sin_ptr,
    q_sb, q_st, q_sh, q_sd, qo_sb, qo_st, qo_sh, qo_sd,
    k_sb, k_st, k_sh, k_sd, ko_sb, ko_st, ko_sh, ko_sd,
    c_sb, c_st, c_sd,
    T, HQ, HK, HALF,
    BACKWARD: tl.constexpr, BLOCK_HQ: tl.constexpr, BLOCK_HK: tl.constexpr, BLOCK_HALF: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    b = pid // T
    t = pid % T
    d = tl.arange(0, BLOCK_HALF)[None, :]  # (1, BLOCK_HALF)
    dmask = d < HALF
    cbase = b * c_sb + t * c_st
    c1 = tl.load(cos_ptr + cbase + d * c_sd, mask=dmask, other=0.0).to(tl.float32)
    c2 = tl.load(cos_ptr + cbase + (d + HALF) * c_sd, mask=dmask, other=0.0).to(tl.float32)
    s1 = tl.load(sin_ptr + cbase + d * c_sd, mask=dmask, other=0.0).to(tl.float32)
    s2 = tl.load(sin_ptr + cbase + (d + HALF) * c_sd, mask=dmask, other=0.0).to(tl.float32)
    _rotate_heads(q_ptr, qo_ptr, q_sb, q_st, q_sh, q_sd, qo_sb, qo_st, qo_sh, qo_sd, b, t, HQ, HALF,
                  c1, c2, s1, s2, BACKWARD, BLOCK_HQ, BLOCK_HALF)
    _rotate_heads(k_ptr, ko_ptr, k_sb, k_st, k_sh, k_sd, ko_sb, ko_st, ko_sh, ko_sd, b, t, HK, HALF,
                  c1, c2, s1, s2, BACKWARD, BLOCK_HK, BLOCK_HALF)


def rope_triton(
    q: torch.Tensor, k: torch.Tensor, q_out: torch.Tensor, k_out: torch.Tensor,
    cos: torch.Tensor, sin: torch.Tensor, *, backward: bool,
) -> None:
    """Rotate q (B, T, Hq, D) into q_out and k (B, T, Hk, D) into k_out (outputs may alias inputs).

    cos, sin: (B|1, T, D) — a batch of 1 is broadcast (stride 0)."""
    B, T, HQ, D = q.shape
    HK = k.shape[2]
    if B * T == 0:
        return
    if cos.stride() != sin.stride():
        cos, sin = cos.contiguous(), sin.contiguous()
    c_sb = 0 if cos.shape[0] == 1 else cos.stride(0)
    half = D // 2
    with device_guard(q):
        _rope_kernel[(B * T,)](
            q, q_out, k, k_out, cos, sin,
            *q.stride(), *q_out.stride(), *k.stride(), *k_out.stride(),
            c_sb, cos.stride(1), cos.stride(2),
            T, HQ, HK, half,
            BACKWARD=backward, **_blocks(HQ, HK, half),
            num_warps=4,
        )


def _blocks(hq: int, hk: int, half: int) -> dict[str, int]:
    return dict(
        BLOCK_HQ=triton.next_power_of_2(hq), BLOCK_HK=triton.next_power_of_2(hk),
        BLOCK_HALF=max(triton.next_power_of_2(half), 2),
    )


# ----------------------------------------------------------------------------------------------------------------
# the launches a training run makes, for the AOT compile matrix (tests/kernels/test_compile_matrix.py): dicts with
# name, kernel (attribute name), signature (runtime args), constexprs, num_warps, num_stages
# ----------------------------------------------------------------------------------------------------------------


def _compile_variants() -> list[dict]:
    out = []
    # (q heads, kv heads, head_dim): Llama-3.1-8B, Qwen2.5-3B, Gemma-2-9B, Gemma-3-4B, Phi-3-mini
    for hq, hk, d in ((32, 8, 128), (16, 2, 128), (16, 8, 256), (8, 4, 256), (32, 32, 96)):
        for act, trig in (("bf16", "bf16"), ("bf16", "fp32"), ("fp16", "fp16")):
            ints = [n for n in _rope_kernel.arg_names if n[0] in "qkc" and "_s" in n] + ["T", "HQ", "HK", "HALF"]
            types = {n: "i32" for n in ints}
            types |= {n: f"*{act}" for n in ("q_ptr", "qo_ptr", "k_ptr", "ko_ptr")}
            types |= {"cos_ptr": f"*{trig}", "sin_ptr": f"*{trig}"}
            for backward in (False, True):
                cx = {"BACKWARD": backward, **_blocks(hq, hk, d // 2)}
                out.append({
                    "name": f"rope[{hq}/{hk}x{d},{act}/{trig},{'bwd' if backward else 'fwd'}]",
                    "kernel": "_rope_kernel", "signature": types, "constexprs": cx, "num_warps": 4, "num_stages": 2,
                })
    return out


COMPILE_VARIANTS: list[dict] = _compile_variants()
