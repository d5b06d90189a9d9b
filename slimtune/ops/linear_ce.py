"""Linear cross-entropy: loss of softmax(x Wᵀ + b) against targets, without ever holding the (T, V) logits.

Tokens are processed in chunks. Per chunk: logits (c, V) = x_c Wᵀ → per row logsumexp and loss → dlogits =
softmax − onehot (zero on ignored rows) → dx_c = dlogits W (and dW += dlogitsᵀ x_c when the head trains). Because
the loss is a scalar, the gradients are computed during the forward pass; backward only scales them by the incoming
gradient. Saved for backward: dx (T, H) in x's dtype — the same size as x, which is therefore not saved — and dW
(fp32) only when the head requires grad.

``reduction="mean"`` divides by the number of non-ignored targets (0 when there are none, instead of NaN);
``reduction="sum"`` returns the plain sum, divided by ``normalizer`` when one is given, so a training loop can
normalise by the target-token count of the whole (accumulated) batch.

``linear_cross_entropy`` is the public op; ``ce_rows_ref`` is the per-chunk ground truth the torch backend runs.
"""

from __future__ import annotations

import torch


def ce_rows_ref(logits: torch.Tensor, targets: torch.Tensor, *, ignore_index: int, grad: bool) -> torch.Tensor:
    """Per-row loss (c,) (fp32; fp64 for fp64 logits) of logits (c, V) against targets (c,).

    With ``grad`` the logits buffer is overwritten in place by d(Σ loss)/d(logits) = softmax − onehot (rows with an
    ignored target get zeros)."""
    z = logits.to(torch.promote_types(logits.dtype, torch.float32))  # (c, V)
    lse = torch.logsumexp(z, dim=-1)  # (c,)
    valid = targets != ignore_index  # (c,)
    safe_t = torch.where(valid, targets, 0)
    loss = torch.where(valid, lse - z.gather(1, safe_t[:, None]).squeeze(1), 0.0)
    if grad:
        p = torch.exp(z - lse[:, None])  # softmax (c, V)
        p[torch.arange(p.shape[0], device=p.device), safe_t] -= 1.0
        p *= valid[:, None]
        logits.copy_(p)
    return loss


MIN_CHUNK_LOGITS_BYTES = 64 * 2**20


def default_chunk_size(n_tokens: int, hidden: int, vocab: int) -> int:
    """Tokens per chunk: one chunk of logits about the size of x (Liger's rule), but at least 64 MiB of fp32 logits
    (else every chunk re-reads the whole lm_head for a handful of tokens: SmolLM2's 49k vocab at 376 tokens went
    from chunks of 8 tokens to 341 and its loss from 7.0 s to 0.9 s on this 2-core CPU). A power of two."""
    per = max(1, -(-n_tokens // max(1, -(-vocab // hidden))), MIN_CHUNK_LOGITS_BYTES // (4 * max(vocab, 1)))
    return 1 << (per - 1).bit_length()


def linear_cross_entropy(
    x: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    normalizer: float | torch.Tensor | None = None,
    chunk_size: int | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """Cross-entropy of the logits x Wᵀ (+ bias) against targets, chunked over tokens.

    x (..., H), weight (V, H) dense (frozen by default; dW is computed only when it requires grad), targets (...)
    int64 with ``ignore_index`` for tokens without a target. Returns a 0-dim fp32 loss.
    """
    from slimtune.kernels.linear_ce import LinearCrossEntropyFunction

    if reduction not in ("mean", "sum"):
        raise ValueError(f"linear_cross_entropy: reduction must be 'mean' or 'sum', not {reduction!r}")
    if normalizer is not None and reduction != "sum":
        raise ValueError("linear_cross_entropy: normalizer is only meaningful with reduction='sum'")
    if targets.shape != x.shape[:-1]:
        raise ValueError(f"linear_cross_entropy: targets {tuple(targets.shape)} do not match x {tuple(x.shape)}")
    x2 = x.reshape(-1, x.shape[-1])  # (T, H)
    t2 = targets.reshape(-1)  # (T,)
    if chunk_size is None:
        chunk_size = default_chunk_size(x2.shape[0], x2.shape[1], weight.shape[0])
    if normalizer is not None and not torch.is_tensor(normalizer):
        normalizer = torch.tensor(float(normalizer), device=x.device)
    compute_grad = torch.is_grad_enabled() and (
        x.requires_grad or weight.requires_grad or (bias is not None and bias.requires_grad)
    )
    return LinearCrossEntropyFunction.apply(
        x2, weight, bias, t2, normalizer, int(ignore_index), reduction, int(chunk_size), compute_grad, backend
    )
