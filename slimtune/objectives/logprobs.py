"""Per-sequence log-probs of completion tokens from the streamed linear head, and the reference policy.

``completion_logps(model, batch)`` runs the decoder once over all rows of the batch (a preference batch: chosen and
rejected rows together) and returns, per row, the sum of log p(token) over the tokens whose label is not -100
(labels shifted like the SFT loss: position t predicts labels[t + 1]) and their count. The log-probs come from
``slimtune.ops.linear_logprobs`` (chunks of tokens; an NF4 head dequantized one vocabulary block at a time), so no
(B, T, V) tensor exists.

``adapters_off(model)``: inside, every trained adapter is swapped out of its parent module for the layer it wraps
(a stacked adapter's frozen adapter stays: the reference of SFT → DPO is the SFT model), in the plain and the fused
model alike (the fused modules read their projections from their children at each call). ``reference_logps``
runs the model so, under ``no_grad``: the reference policy without a second model in memory.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import NamedTuple

import torch
import torch.nn as nn

from slimtune.adapters.inject import adapters_of
from slimtune.data.chat import IGNORE_INDEX
from slimtune.models.arch import spec_for
from slimtune.models.fused import _head_weight, lm_head_support
from slimtune.ops.linear_logprobs import linear_token_logprobs


class SeqLogps(NamedTuple):
    sums: torch.Tensor  # (N,) fp32: Σ log p over each row's completion tokens
    counts: torch.Tensor  # (N,) int64: completion tokens per row
    per_token: torch.Tensor  # (N, T) fp32: the token log-probs (0 off the completion), for ORPO's NLL and tests


def completion_logps(model: nn.Module, input_ids: torch.Tensor, labels: torch.Tensor,
                     attention_mask: torch.Tensor | None = None, *, temperature: float = 1.0) -> SeqLogps:
    """Per-row sums and counts of the completion tokens' log-probs; differentiable w.r.t. the trained weights.
    ``temperature``: of log softmax(logits / temperature) (GRPO scores the distribution it samples from)."""
    config = getattr(model, "config", None)
    spec = spec_for(config)
    head = getattr(model, "lm_head", None)
    why = lm_head_support(head)
    if why is not None:
        raise ValueError(f"completion_logps: {why}")
    base = spec.module(model, spec.decoder.rpartition(".")[0]) if spec is not None else model.model
    hidden = base(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state  # (N, T, H)
    targets = torch.nn.functional.pad(labels, (0, 1), value=IGNORE_INDEX)[..., 1:].to(hidden.device)  # (N, T)
    cap = spec.final_softcap(config) if spec is not None else None
    bias = head.bias
    if temperature != 1.0:  # (h Wᵀ + b) / τ = (h/τ) Wᵀ + b/τ
        if cap is not None:
            raise ValueError("completion_logps: a temperature with a final logit softcap is not supported")
        hidden, bias = hidden / temperature, None if bias is None else bias / temperature
    lp = linear_token_logprobs(hidden, _head_weight(head), targets, bias=bias, ignore_index=IGNORE_INDEX,
                               softcap=None if cap is None else float(cap))  # (N, T)
    return SeqLogps(lp.sum(dim=-1), (targets != IGNORE_INDEX).sum(dim=-1), lp)


@contextlib.contextmanager
def adapters_off(model: nn.Module) -> Iterator[None]:
    """Inside, the model computes as its base (the trained adapters swapped out for the layers they wrap)."""
    trained = {id(a): a for a in adapters_of(model).values()}
    swapped: list[tuple[nn.Module, str, nn.Module]] = []
    for parent in model.modules():
        for name, child in list(parent.named_children()):
            if id(child) in trained:
                swapped.append((parent, name, child))
    try:
        for parent, name, child in swapped:
            setattr(parent, name, child.base_layer)
        yield
    finally:
        for parent, name, child in swapped:
            setattr(parent, name, child)


def reference_logps(model: nn.Module, input_ids: torch.Tensor, labels: torch.Tensor,
                    attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Per-row completion log-prob sums (N,) under the reference policy (adapters off, no_grad), fp32 (fp64 model: fp64)."""
    if not adapters_of(model):
        raise ValueError("the reference policy without stored log-probs needs an adapter (the base with the "
                         "adapters off); full fine-tuning needs train.preference.precompute_reference: true")
    was = model.training
    model.eval()  # no dropout in the reference
    try:
        with torch.no_grad(), adapters_off(model):
            return completion_logps(model, input_ids, labels, attention_mask).sums
    finally:
        model.train(was)
