"""Rotary position embedding (RoPE), HF "rotate_half" convention, applied to q and k together.

Layout: q (B, T, Hq, D), k (B, T, Hk, D) — any strides (a view of a fused qkv output is fine);
cos, sin (T, D) or (B|1, T, D) as HF's rotary module returns them (the two halves of D hold the same angles).
With q = [q1, q2] split at D/2 and cos = [c1, c2], sin = [s1, s2]:

    forward:   out1 = q1·c1 − q2·s1          out2 = q2·c2 + q1·s2
    backward:  dq1  = d1·c1 + d2·s2           dq2  = d2·c2 − d1·s1     (the transpose: a rotation by −θ)

Nothing is saved for backward but cos and sin (shared by every layer). ``rope`` is the public op.
"""

from __future__ import annotations

import torch


def rope_ref(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, *, backward: bool = False) -> torch.Tensor:
    """Rotate x (B, T, H, D) by cos/sin (B|1, T, D); ``backward=True`` applies the transpose. fp32 math."""
    half = x.shape[-1] // 2
    c = cos.float()[:, :, None, :]  # (B|1, T, 1, D)
    s = sin.float()[:, :, None, :]
    c1, c2, s1, s2 = c[..., :half], c[..., half:], s[..., :half], s[..., half:]
    x1, x2 = x.float()[..., :half], x.float()[..., half:]
    if not backward:
        out = torch.cat((x1 * c1 - x2 * s1, x2 * c2 + x1 * s2), dim=-1)
    else:
        out = torch.cat((x1 * c1 + x2 * s2, x2 * c2 - x1 * s1), dim=-1)
    return out.to(x.dtype)


def rope(
    q: torch.Tensor,
    k: torch.Tensor,
    *,
    cos: torch.Tensor,
    sin: torch.Tensor,
    head_dim: int | None = None,
    inplace: bool = False,
    backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Apply RoPE to q and k; returns (q_rot, k_rot) with the shapes of q and k.

    q (B, T, Hq, D) and k (B, T, Hk, D), or flat q (B, T, Hq·D) and k (B, T, Hk·D) with ``head_dim=D``.
    ``inplace=True`` rotates q and k in their own memory (the Function marks them dirty). That is safe when nothing
    else saved them for backward, e.g. the outputs of the fused qkv projection. Autograd allows it only for tensors
    that are neither views nor leaves requiring grad; for those the op runs out of place (same result). Pass the
    flat (B, T, H·D) projection outputs to get the in-place path.
    """
    from slimtune.kernels.rope import RoPEFunction

    if cos.dim() == 2:
        cos, sin = cos[None], sin[None]
    d = q.shape[-1] if head_dim is None else int(head_dim)
    if q.dim() != k.dim() or q.dim() not in (3, 4) or (q.dim() == 3) != (head_dim is not None):
        raise ValueError("rope: q, k must be (B, T, H, D), or (B, T, H*D) with head_dim given")
    if d % 2 or d != cos.shape[-1] or q.shape[-1] % d or k.shape[-1] % d:
        raise ValueError(f"rope: head dims of q {tuple(q.shape)}, k {tuple(k.shape)}, cos {tuple(cos.shape)} differ")
    if inplace and any((t.is_leaf and t.requires_grad) or t._base is not None for t in (q, k)):
        inplace = False
    return RoPEFunction.apply(q, k, cos, sin, d, inplace, backend)
