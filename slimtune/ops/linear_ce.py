"""Linear cross-entropy: loss of softmax(cap(x Wᵀ + b)) against targets, without ever holding the (T, V) logits.

Tokens are processed in chunks. Per chunk: logits (c, V) = x_c Wᵀ → optional softcap (Gemma-2's final-logit
softcapping, cap(z) = s·tanh(z/s)) → per row logsumexp and loss → dlogits = (softmax − onehot)·cap'(z) (zero on
ignored rows) → dx_c = dlogits W (and dW += dlogitsᵀ x_c when the head trains). Because the loss is a scalar, the
gradients are computed during the forward pass; backward only scales them by the incoming gradient. Saved for
backward: dx (T, H) in x's dtype — the same size as x, which is therefore not saved — and dW (fp32) only when the
head requires grad.

**NF4 head, streamed.** ``weight`` may be an :class:`~slimtune.ops.nf4.NF4Weight` (a frozen 4-bit lm_head). Then no
(V, H) copy in the compute dtype ever exists: per token chunk the head is dequantized one vocabulary block of
``vocab_block`` rows at a time, twice — pass 1 folds each block's logits (c, block) into an online logsumexp per
token (running max m, running Σ exp, and the target's logit), pass 2 recomputes each block's logits, turns them
into dlogits with the final lse and accumulates dx_c += dlogits W_block in fp32. At most one (block, H) weight block,
one (c, block) logits block and the (c, H) fp32 accumulator are alive at a time, and the default c
(``stream_chunk_size``) keeps them bounded at any context length. Blocks start at multiples of
``NF4Weight.row_unit()`` rows so each owns whole quantization blocks.

``reduction="mean"`` divides by the number of non-ignored targets (0 when there are none, instead of NaN);
``reduction="sum"`` returns the plain sum, divided by ``normalizer`` when one is given, so a training loop can
normalise by the target-token count of the whole (accumulated) batch.

``linear_cross_entropy`` is the public op. The per-row work on a logits buffer is a backend primitive
(:class:`CEPrimitives`): the ``*_ref`` functions here on the torch backend, the Triton rows kernels of
slimtune/kernels/linear_ce.py (same signatures) otherwise; the GEMMs are torch matmuls (cuBLAS) on both.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch

from slimtune.ops.dispatch import resolve_backend, triton_module
from slimtune.ops.nf4 import NF4Weight, dense_weight

__all__ = [
    "linear_cross_entropy",
    "ce_rows_ref",
    "ce_block_stats_ref",
    "ce_block_grad_ref",
    "CEPrimitives",
    "LinearCrossEntropyFunction",
    "default_chunk_size",
    "stream_buffer_bytes",
    "stream_chunk_size",
    "vocab_block_rows",
]


def _acc(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)  # fp32 math (fp64 stays fp64, for tests)


def _cap(z: torch.Tensor, softcap: float | None) -> torch.Tensor:
    return z if softcap is None else softcap * torch.tanh(z / softcap)


def _cap_grad_(g: torch.Tensor, capped: torch.Tensor, softcap: float | None) -> torch.Tensor:
    """g ·= d cap / dz = 1 − tanh²(z/s) = 1 − (cap(z)/s)², in place."""
    return g if softcap is None else g.mul_(1.0 - (capped / softcap).square())


def ce_rows_ref(
    logits: torch.Tensor, targets: torch.Tensor, *, ignore_index: int, grad: bool, softcap: float | None = None
) -> torch.Tensor:
    """Per-row loss (c,) (fp32; fp64 for fp64 logits) of logits (c, V) against targets (c,).

    With ``grad`` the logits buffer is overwritten in place by d(Σ loss)/d(logits) = (softmax − onehot)·cap'
    (rows with an ignored target get zeros)."""
    z = _cap(logits.to(_acc(logits.dtype)), softcap)  # (c, V)
    lse = torch.logsumexp(z, dim=-1)  # (c,)
    valid = targets != ignore_index  # (c,)
    safe_t = torch.where(valid, targets, 0)
    loss = torch.where(valid, lse - z.gather(1, safe_t[:, None]).squeeze(1), 0.0)
    if grad:
        p = torch.exp(z - lse[:, None])  # softmax (c, V)
        p[torch.arange(p.shape[0], device=p.device), safe_t] -= 1.0
        p *= valid[:, None]
        logits.copy_(_cap_grad_(p, z, softcap))
    return loss


def ce_block_stats_ref(
    logits: torch.Tensor, targets: torch.Tensor, m: torch.Tensor, s: torch.Tensor, zt: torch.Tensor, *,
    v0: int, softcap: float | None = None,
) -> None:
    """Fold one vocabulary block of logits (c, Vb) (columns v0 … v0+Vb−1) into the running statistics, in place:
    m (c,) running max, s (c,) running Σ exp(z − m), zt (c,) the target's (capped) logit when it lies in the block."""
    z = _cap(logits.to(m.dtype), softcap)  # (c, Vb)
    m_new = torch.maximum(m, z.max(dim=1).values)
    s.mul_(torch.exp(m - m_new)).add_(torch.exp(z - m_new[:, None]).sum(dim=1))
    m.copy_(m_new)
    local = targets - v0
    inside = (local >= 0) & (local < z.shape[1])
    hit = z.gather(1, torch.where(inside, local, 0)[:, None]).squeeze(1)
    zt.copy_(torch.where(inside, hit, zt))


def ce_block_grad_ref(
    logits: torch.Tensor, targets: torch.Tensor, lse: torch.Tensor, *, v0: int, ignore_index: int,
    softcap: float | None = None,
) -> None:
    """Overwrite one vocabulary block of logits (c, Vb) by its dlogits (softmax − onehot)·cap', given the final
    lse (c,) of every row (zeros on ignored rows)."""
    z = _cap(logits.to(lse.dtype), softcap)  # (c, Vb)
    p = torch.exp(z - lse[:, None])
    local = targets - v0
    inside = (local >= 0) & (local < z.shape[1])
    rows = torch.nonzero(inside).squeeze(1)
    p[rows, local[rows]] -= 1.0
    p *= (targets != ignore_index)[:, None]
    logits.copy_(_cap_grad_(p, z, softcap))


class CEPrimitives(NamedTuple):
    """Per-row work of one backend on logits buffers (same signatures as the ``*_ref`` functions)."""

    rows: Callable[..., torch.Tensor]  # whole-vocabulary rows: loss, and dlogits in place
    block_stats: Callable[..., None]  # streamed head, pass 1
    block_grad: Callable[..., None]  # streamed head, pass 2


TORCH_PRIMITIVES = CEPrimitives(ce_rows_ref, ce_block_stats_ref, ce_block_grad_ref)


def primitives(backend: str) -> CEPrimitives:
    """The primitives of ``"torch"`` or ``"triton"`` (the kernels module is imported only for the latter)."""
    if backend == "torch":
        return TORCH_PRIMITIVES
    k = triton_module("linear_ce")
    return CEPrimitives(k.ce_rows_triton, k.ce_block_stats_triton, k.ce_block_grad_triton)


MIN_CHUNK_LOGITS_BYTES = 64 * 2**20
VOCAB_BLOCK_BYTES = 16 * 2**20  # one dequantized lm_head block: 2048 rows of Llama-3.1-8B (4096 wide) in bf16
STREAM_ACC_BYTES = 64 * 2**20  # the fp32 (c, H) dx accumulator of a streamed chunk: 4096 tokens of Llama-3.1-8B


def default_chunk_size(n_tokens: int, hidden: int, vocab: int) -> int:
    """Tokens per chunk: one chunk of logits about the size of x (Liger's rule), but at least 64 MiB of fp32 logits
    (else every chunk re-reads the whole lm_head for a handful of tokens: SmolLM2's 49k vocab at 376 tokens went
    from chunks of 8 tokens to 341 and its loss from 7.0 s to 0.9 s on this 2-core CPU). A power of two."""
    per = max(1, -(-n_tokens // max(1, -(-vocab // hidden))), MIN_CHUNK_LOGITS_BYTES // (4 * max(vocab, 1)))
    return 1 << (per - 1).bit_length()


def stream_chunk_size(n_tokens: int, hidden: int) -> int:
    """Tokens per chunk for a streamed NF4 head: as many as fit an fp32 (c, H) dx accumulator of
    ``STREAM_ACC_BYTES`` (each chunk dequantizes the head twice, so fewer chunks are cheaper), at most all tokens.
    The chunk's buffers then stay bounded at any context length: for Llama-3.1-8B (bf16, 2048-row blocks) 4096
    tokens hold 64 MiB of accumulator + 32 MiB of block product + 16 MiB of logits + the 16 MiB block. A power of
    two."""
    per = min(max(1, n_tokens), max(1, STREAM_ACC_BYTES // (4 * max(hidden, 1))))
    return 1 << (per - 1).bit_length()


def _block_rows(vocab: int, hidden: int, elt: int, unit: int, rows: int | None) -> int:
    want = rows if rows is not None else VOCAB_BLOCK_BYTES // max(1, hidden * elt)
    return min(max(unit, want // unit * unit), max(vocab, 1))


def vocab_block_rows(weight: NF4Weight, dtype: torch.dtype, rows: int | None = None) -> int:
    """Rows per dequantized block of an NF4 head: ``rows`` (default: ``VOCAB_BLOCK_BYTES`` of ``dtype``) rounded
    down to a multiple of ``weight.row_unit()`` (at least one unit), at most the whole vocabulary."""
    V, H = weight.shape
    return _block_rows(V, H, torch.finfo(dtype).bits // 8, weight.row_unit(), rows)


def stream_buffer_bytes(n_tokens: int, hidden: int, vocab: int, elt: int, *, row_unit: int = 1) -> int:
    """Peak bytes of the transient buffers of the streamed NF4 head with the default block and chunk (for the
    estimator; dx (T, H), saved for backward, and the (T,) row losses are not included): the dequantized
    (block, H) weight, the (c, block) logits, the fp32 (c, H) dx accumulator, the (c, H) block product, and five
    fp32 (c,) row statistics. ``elt``: bytes per element of the compute dtype. Triton backend (the torch
    reference adds elementwise temporaries of the logits' size)."""
    b = _block_rows(vocab, hidden, elt, row_unit, None)
    c = min(n_tokens, stream_chunk_size(n_tokens, hidden))
    return b * hidden * elt + c * b * elt + c * hidden * (4 + elt) + 5 * c * 4


# ----------------------------------------------------------------------------------------------------------------
# one token chunk: dense head (whole-vocabulary logits) or streamed NF4 head (one vocabulary block at a time)
# ----------------------------------------------------------------------------------------------------------------


def _dense_chunk(opts, xc, tc, w, bias, prims, need, out):
    """xc (c, H) in w's dtype. Writes the row losses, dx_c, and accumulates dW / db (``out`` = the buffers)."""
    loss_rows, dx, dw, db = out
    grad = any(need)
    logits = torch.nn.functional.linear(xc, w, bias)  # (c, V), the only logits that exist
    loss_rows.copy_(prims.rows(logits, tc, ignore_index=opts["ignore_index"], grad=grad, softcap=opts["softcap"]))
    if need[0]:
        torch.matmul(logits, w, out=dx) if dx.dtype == w.dtype else dx.copy_(logits @ w)
    if need[1]:
        dw.addmm_(logits.t().to(dw.dtype), xc.to(dw.dtype))
    if need[2]:
        db += logits.to(db.dtype).sum(dim=0)


def _head_block(w: NF4Weight, v0: int, v1: int, dtype: torch.dtype) -> torch.Tensor:
    """Rows v0:v1 of the head dequantized to ``dtype``: the one (block, H) weight copy that exists at a time."""
    return dense_weight(w.rows(v0, v1), dtype)


def _streamed_chunk(opts, xc, tc, w: NF4Weight, bias, prims, need, out):
    """The same as `_dense_chunk` for an NF4 head, one vocabulary block of ``opts['block']`` rows at a time.

    Pass 2 recomputes each block's logits (one more x_c W_bᵀ GEMM than the dense path) and dequantizes the head a
    second time; on CPU the smaller working set pays for it: loss + backward of SmolLM2's 49152 x 576 NF4 head at
    512 tokens (fp32, 1 thread) took 2.19 s with the whole head dequantized, 1.93 s streamed in 7168-row blocks
    (the default) and 1.80 s in 2048-row blocks (`python bench/lm_head_stream.py`, min of 5; runs on this shared
    2-core machine vary by ~20 %). Untimed on a GPU.
    """
    loss_rows, dx, _, db = out
    V, blk, softcap = w.shape[0], opts["block"], opts["softcap"]
    c = xc.shape[0]
    acc = _acc(xc.dtype)
    m = torch.full((c,), float("-inf"), dtype=acc, device=xc.device)  # running max
    s = torch.zeros((c,), dtype=acc, device=xc.device)  # running Σ exp(z − m)
    zt = torch.zeros((c,), dtype=acc, device=xc.device)  # the target's logit
    for v0 in range(0, V, blk):  # pass 1: online logsumexp over vocabulary blocks
        v1 = min(V, v0 + blk)
        wb = _head_block(w, v0, v1, xc.dtype)  # (b, H)
        logits = torch.nn.functional.linear(xc, wb, None if bias is None else bias[v0:v1])  # (c, b)
        del wb  # before the next block is dequantized: one block alive at a time
        prims.block_stats(logits, tc, m, s, zt, v0=v0, softcap=softcap)
        del logits
    lse = m + torch.log(s)
    valid = (tc != opts["ignore_index"]) & (tc >= 0) & (tc < V)
    loss_rows.copy_(torch.where(valid, lse - zt, 0.0))
    if not any(need):
        return
    dxc = torch.zeros((c, xc.shape[1]), dtype=acc, device=xc.device) if need[0] else None  # (c, H) fp32
    for v0 in range(0, V, blk):  # pass 2: recompute each block's logits, dlogits, dx_c += dlogits W_b
        v1 = min(V, v0 + blk)
        wb = _head_block(w, v0, v1, xc.dtype)
        logits = torch.nn.functional.linear(xc, wb, None if bias is None else bias[v0:v1])
        prims.block_grad(logits, tc, lse, v0=v0, ignore_index=opts["ignore_index"], softcap=softcap)
        if need[0]:
            dxc += logits @ wb
        if need[2]:
            db[v0:v1] += logits.to(db.dtype).sum(dim=0)
        del wb, logits
    if need[0]:
        dx.copy_(dxc)


class LinearCrossEntropyFunction(torch.autograd.Function):
    """apply(x (T,H), weight (V,H) tensor or NF4Weight, bias|None, targets (T,), normalizer|None, options, prims)
    -> loss (0-dim fp32). ``options``: dict of ignore_index, reduction, chunk_size, compute_grad, softcap, block.
    Saves dx (T,H), and dW / db only when those train."""

    @staticmethod
    def forward(ctx, x, weight, bias, targets, normalizer, options: dict, prims: CEPrimitives):
        streamed = isinstance(weight, NF4Weight)
        T, H = x.shape
        grad = options["compute_grad"]
        need = (
            grad and ctx.needs_input_grad[0],
            grad and not streamed and ctx.needs_input_grad[1],
            grad and bias is not None and ctx.needs_input_grad[2],
        )
        wdt = x.dtype if streamed else weight.dtype  # the compute dtype of the logits
        acc = _acc(wdt)
        loss_rows = torch.empty((T,), dtype=acc, device=x.device)
        dx = torch.empty_like(x) if need[0] else None
        dw = torch.zeros(weight.shape, dtype=acc, device=x.device) if need[1] else None
        db = torch.zeros(bias.shape, dtype=acc, device=x.device) if need[2] else None
        chunk = _streamed_chunk if streamed else _dense_chunk
        for s in range(0, T, options["chunk_size"]):
            e = min(T, s + options["chunk_size"])
            out = (loss_rows[s:e], None if dx is None else dx[s:e], dw, db)
            chunk(options, x[s:e].to(wdt), targets[s:e], weight, bias, prims, need, out)
        total = loss_rows.sum()
        if options["reduction"] == "mean":
            factor = 1.0 / (targets != options["ignore_index"]).sum().clamp(min=1).to(acc)
        elif normalizer is not None:
            factor = 1.0 / normalizer.to(device=x.device, dtype=acc)
        else:
            factor = torch.ones((), dtype=acc, device=x.device)
        ctx.save_for_backward(dx, dw, db, factor)
        ctx.dtypes = (x.dtype, None if streamed else weight.dtype, None if bias is None else bias.dtype)
        return total * factor

    @staticmethod
    def backward(ctx, grad_loss):
        dx, dw, db, factor = ctx.saved_tensors
        g = (grad_loss.to(factor.dtype) * factor).reshape(())
        _, w_dt, b_dt = ctx.dtypes
        gx = (dx * g.to(dx.dtype)) if dx is not None else None
        gw = (dw * g).to(w_dt) if dw is not None else None
        gb = (db * g).to(b_dt) if db is not None else None
        return gx, gw, gb, None, None, None, None


def linear_cross_entropy(
    x: torch.Tensor,
    weight: torch.Tensor | NF4Weight,
    targets: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    normalizer: float | torch.Tensor | None = None,
    chunk_size: int | None = None,
    backend: str | None = None,
    softcap: float | None = None,
    vocab_block: int | None = None,
) -> torch.Tensor:
    """Cross-entropy of the logits cap(x Wᵀ + bias) against targets, chunked over tokens.

    x (..., H); weight (V, H): a dense tensor (frozen by default; dW is computed only when it requires grad) or an
    ``NF4Weight`` (frozen 4-bit head, streamed one vocabulary block at a time in x's dtype; ``vocab_block`` rows
    per block, default ``VOCAB_BLOCK_BYTES`` of them); targets (...) int64 with ``ignore_index`` for tokens without
    a target; ``softcap`` s applies s·tanh(logits/s) before the softmax (Gemma-2's final_logit_softcapping).
    Returns a 0-dim fp32 loss.
    """
    if reduction not in ("mean", "sum"):
        raise ValueError(f"linear_cross_entropy: reduction must be 'mean' or 'sum', not {reduction!r}")
    if normalizer is not None and reduction != "sum":
        raise ValueError("linear_cross_entropy: normalizer is only meaningful with reduction='sum'")
    if targets.shape != x.shape[:-1]:
        raise ValueError(f"linear_cross_entropy: targets {tuple(targets.shape)} do not match x {tuple(x.shape)}")
    if tuple(weight.shape)[1] != x.shape[-1]:
        raise ValueError(f"linear_cross_entropy: weight {tuple(weight.shape)} does not match x {tuple(x.shape)}")
    if softcap is not None and not softcap > 0:
        raise ValueError(f"linear_cross_entropy: softcap must be positive, got {softcap}")
    x2 = x.reshape(-1, x.shape[-1])  # (T, H)
    t2 = targets.reshape(-1)  # (T,)
    streamed = isinstance(weight, NF4Weight)
    block = vocab_block_rows(weight, x.dtype, vocab_block) if streamed else None
    if chunk_size is None and streamed:
        chunk_size = stream_chunk_size(x2.shape[0], x2.shape[1])
    elif chunk_size is None:
        chunk_size = default_chunk_size(x2.shape[0], x2.shape[1], weight.shape[0])
    if normalizer is not None and not torch.is_tensor(normalizer):
        normalizer = torch.tensor(float(normalizer), device=x.device)
    trains = x.requires_grad or (not streamed and weight.requires_grad) or (bias is not None and bias.requires_grad)
    options = dict(
        ignore_index=int(ignore_index), reduction=reduction, chunk_size=int(chunk_size),
        compute_grad=torch.is_grad_enabled() and trains, softcap=None if softcap is None else float(softcap),
        block=block,
    )
    prims = primitives(resolve_backend(x, backend))
    return LinearCrossEntropyFunction.apply(x2, weight, bias, t2, normalizer, options, prims)
