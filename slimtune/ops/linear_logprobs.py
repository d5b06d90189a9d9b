"""Per-token log-probabilities log softmax(cap(x Wᵀ + b))[target] without the (T, V) logits.

The preference objectives (DPO, IPO, ORPO, SimPO, KTO) need, per sequence, the sum (or mean) of its completion
tokens' log-probs, each sequence with its own upstream gradient. The work per token is that of the linear
cross-entropy (slimtune/ops/linear_ce.py), whose chunk loops this op reuses: chunks of tokens, and for an NF4 head
one dequantized vocabulary block at a time with an online logsumexp. Row t's log-prob depends on x_t alone, so its
gradient d logp_t / d x_t = −(softmax − onehot)_t · cap' · W is computed during the forward pass (one (T, H) tensor,
the size of x, which is therefore not saved) and backward scales row t by the incoming gradient g_t:
dx_t = −g_t · dx_t. Only the rows with a target go through the head (as in TRL's fused head): a prompt token costs
neither head compute nor a saved dx row. The largest live tensor is the one (c, block) logits block of the linear
cross-entropy.

A trainable dense head (or bias) cannot be pre-reduced that way (dW = Σ_t g_t dlogits_tᵀ x_t needs the g_t), so then
x is saved instead and backward recomputes each chunk's logits once.
"""

from __future__ import annotations

import torch

from slimtune.ops.dispatch import resolve_backend
from slimtune.ops.linear_ce import (
    CEPrimitives,
    _acc,
    _dense_chunk,
    _streamed_chunk,
    default_chunk_size,
    primitives,
    stream_chunk_size,
    vocab_block_rows,
)
from slimtune.ops.nf4 import NF4Weight

__all__ = ["linear_token_logprobs", "LinearTokenLogprobsFunction"]


def _row_losses(x, weight, bias, targets, options, prims, *, want_dx: bool):
    """Row losses (T,) = −log p(target) (0 on ignored rows) and, with ``want_dx``, d loss_t / d x_t (T, H)."""
    streamed = isinstance(weight, NF4Weight)
    T = x.shape[0]
    wdt = x.dtype if streamed else weight.dtype
    loss_rows = torch.empty((T,), dtype=_acc(wdt), device=x.device)
    dx = torch.empty_like(x) if want_dx else None
    need = (want_dx, False, False)
    chunk = _streamed_chunk if streamed else _dense_chunk
    for s in range(0, T, options["chunk_size"]):
        e = min(T, s + options["chunk_size"])
        chunk(options, x[s:e].to(wdt), targets[s:e], weight, bias, prims, need,
              (loss_rows[s:e], None if dx is None else dx[s:e], None, None))
    return loss_rows, dx


class LinearTokenLogprobsFunction(torch.autograd.Function):
    """apply(x (T,H), weight (V,H) tensor or NF4Weight, bias|None, targets (T,), options, prims) -> logp (T,) fp32
    (0 where the target is ignored). Saves dx (T,H); with a trainable head or bias, x instead."""

    @staticmethod
    def forward(ctx, x, weight, bias, targets, options: dict, prims: CEPrimitives):
        streamed = isinstance(weight, NF4Weight)
        head_trains = options["compute_grad"] and (
            (not streamed and ctx.needs_input_grad[1]) or (bias is not None and ctx.needs_input_grad[2]))
        want_dx = options["compute_grad"] and ctx.needs_input_grad[0] and not head_trains
        loss_rows, dx = _row_losses(x, weight, bias, targets, options, prims, want_dx=want_dx)
        ctx.head_trains = head_trains
        ctx.options, ctx.prims = options, prims
        if head_trains:
            ctx.save_for_backward(x, weight, bias, targets)
        else:
            ctx.save_for_backward(dx)
        return -loss_rows

    @staticmethod
    def backward(ctx, grad_rows):
        if not ctx.head_trains:
            (dx,) = ctx.saved_tensors
            if dx is None:
                return None, None, None, None, None, None
            return -(dx * grad_rows.to(dx.dtype)[:, None]), None, None, None, None, None
        x, w, b, t = ctx.saved_tensors
        opts, prims = ctx.options, ctx.prims
        gx = torch.empty_like(x) if ctx.needs_input_grad[0] else None
        gw = torch.zeros(w.shape, dtype=_acc(w.dtype), device=x.device) if ctx.needs_input_grad[1] else None
        gb = torch.zeros(b.shape, dtype=_acc(w.dtype), device=x.device) if b is not None and ctx.needs_input_grad[2] \
            else None
        for s in range(0, x.shape[0], opts["chunk_size"]):  # recompute each chunk's logits, scaled by −g_t per row
            e = min(x.shape[0], s + opts["chunk_size"])
            xc = x[s:e].to(w.dtype)  # (c, H)
            logits = torch.nn.functional.linear(xc, w, b)  # (c, V)
            prims.rows(logits, t[s:e], ignore_index=opts["ignore_index"], grad=True, softcap=opts["softcap"])
            logits.mul_(-grad_rows[s:e].to(logits.dtype)[:, None])  # d(Σ g·logp)/dlogits
            if gx is not None:
                gx[s:e] = (logits @ w).to(x.dtype)
            if gw is not None:
                gw.addmm_(logits.t().to(gw.dtype), xc.to(gw.dtype))
            if gb is not None:
                gb += logits.to(gb.dtype).sum(dim=0)
        return (gx, None if gw is None else gw.to(w.dtype), None if gb is None else gb.to(b.dtype), None, None,
                None)


def linear_token_logprobs(
    x: torch.Tensor,
    weight: torch.Tensor | NF4Weight,
    targets: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    ignore_index: int = -100,
    chunk_size: int | None = None,
    backend: str | None = None,
    softcap: float | None = None,
    vocab_block: int | None = None,
) -> torch.Tensor:
    """log softmax(cap(x Wᵀ + bias))[target] per token: x (..., H), targets (...) int64 → (...) fp32, 0 where the
    target is ``ignore_index``. ``weight``: dense (V, H) or an ``NF4Weight`` (streamed one vocabulary block of
    ``vocab_block`` rows at a time, as in ``linear_cross_entropy``)."""
    if targets.shape != x.shape[:-1]:
        raise ValueError(f"linear_token_logprobs: targets {tuple(targets.shape)} do not match x {tuple(x.shape)}")
    if tuple(weight.shape)[1] != x.shape[-1]:
        raise ValueError(f"linear_token_logprobs: weight {tuple(weight.shape)} does not match x {tuple(x.shape)}")
    x2 = x.reshape(-1, x.shape[-1])  # (T, H)
    t2 = targets.reshape(-1)  # (T,)
    streamed = isinstance(weight, NF4Weight)
    if streamed and bias is not None and bias.requires_grad:
        raise ValueError("linear_token_logprobs: a trainable bias on a 4-bit head is not supported")
    block = vocab_block_rows(weight, x.dtype, vocab_block) if streamed else None
    if chunk_size is None:
        chunk_size = (stream_chunk_size(x2.shape[0], x2.shape[1]) if streamed
                      else default_chunk_size(x2.shape[0], x2.shape[1], weight.shape[0]))
    trains = x.requires_grad or (not streamed and weight.requires_grad) or (bias is not None and bias.requires_grad)
    options = dict(ignore_index=int(ignore_index), chunk_size=int(chunk_size),
                   compute_grad=torch.is_grad_enabled() and trains,
                   softcap=None if softcap is None else float(softcap), block=block)
    prims = primitives(resolve_backend(x, backend))
    valid = t2 != ignore_index  # (T,): only these rows go through the head (TRL's fused head does the same)
    if bool(valid.all()):
        return LinearTokenLogprobsFunction.apply(x2, weight, bias, t2, options, prims).reshape(targets.shape)
    lp = LinearTokenLogprobsFunction.apply(x2[valid], weight, bias, t2[valid], options, prims)  # (n,)
    return torch.zeros_like(t2, dtype=lp.dtype).masked_scatter(valid, lp).reshape(targets.shape)
