"""Sampling completions with the model being trained (GRPO's rollouts): the same 4-bit base and current adapters
(plain or fused: the fused ops choose their backend per shape under no_grad, measured on CUDA, as in training), a
KV cache, batched sampling with temperature, top-k and top-p, each row stopping at its first end-of-sequence token.

The randomness is a ``torch.Generator`` the caller seeds (GRPO: from the run's seed and the step), so a resumed run
samples what the uninterrupted one did and nothing global is consumed. The cache lives only inside ``sample``: it is
gone before the step's forward and backward run.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn as nn
from transformers import DynamicCache


class Rollout(NamedTuple):
    ids: torch.Tensor  # (N, C) int64: sampled tokens, pad after the end
    mask: torch.Tensor  # (N, C) int64: 1 on the completion's tokens (its EOS included)
    ended: torch.Tensor  # (N,) bool: stopped at an end-of-sequence token (else cut at max_new_tokens)


def left_pad(seqs: list[torch.Tensor], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, P) ids and attention mask, each sequence right-aligned (generation continues every row at P)."""
    P = max(int(s.numel()) for s in seqs)
    ids = torch.full((len(seqs), P), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), P), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, P - s.numel():] = s
        mask[i, P - s.numel():] = 1
    return ids, mask


def pick_tokens(logits: torch.Tensor, *, temperature: float, top_k: int, top_p: float,
                generator: torch.Generator | None) -> torch.Tensor:
    """(N,) tokens sampled from (N, V) logits; temperature 0 → greedy (argmax)."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if 0 < top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]  # (N, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)  # (N, V)
        probs = sorted_logits.softmax(dim=-1)
        drop = probs.cumsum(dim=-1) - probs > top_p  # tokens after the nucleus is full (the first always stays)
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.no_grad()
def sample(model: nn.Module, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, *, max_new_tokens: int,
           eos_ids: list[int], pad_id: int, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
           generator: torch.Generator | None = None) -> Rollout:
    """Complete N left-padded prompts (N, P) in one batch with a KV cache; the model returns to its mode."""
    was = model.training
    model.eval()  # no dropout while sampling
    device = prompt_ids.device
    N = prompt_ids.shape[0]
    eos = torch.tensor(eos_ids or [-1], device=device)
    out_ids = torch.full((N, max_new_tokens), pad_id, dtype=torch.long, device=device)
    done = torch.zeros(N, dtype=torch.bool, device=device)
    ended = torch.zeros(N, dtype=torch.bool, device=device)
    lengths = torch.zeros(N, dtype=torch.long, device=device)
    cache = DynamicCache()
    attn = prompt_mask
    pos = (prompt_mask.cumsum(-1) - 1).clamp(min=0)  # (N, P): positions start at each row's first real token
    try:
        logits = model(input_ids=prompt_ids, attention_mask=attn, position_ids=pos, cache=cache,
                       use_cache=True, logits_to_keep=1).logits[:, -1]  # (N, V)
        nxt_pos = pos[:, -1:] + 1  # (N, 1)
        for t in range(max_new_tokens):
            tok = pick_tokens(logits, temperature=temperature, top_k=top_k, top_p=top_p, generator=generator)
            tok = torch.where(done, torch.full_like(tok, pad_id), tok)
            out_ids[:, t] = tok
            lengths += (~done).long()
            hit = torch.isin(tok, eos) & ~done
            ended |= hit
            done |= hit
            if bool(done.all()) or t == max_new_tokens - 1:
                break
            attn = torch.cat([attn, torch.ones((N, 1), dtype=attn.dtype, device=device)], dim=1)
            logits = model(input_ids=tok[:, None], attention_mask=attn, position_ids=nxt_pos, cache=cache,
                           use_cache=True).logits[:, -1]
            nxt_pos = nxt_pos + 1
    finally:
        del cache
        model.train(was)
    C = max(int(lengths.max()), 1)
    mask = (torch.arange(C, device=device)[None, :] < lengths[:, None]).long()  # (N, C)
    return Rollout(out_ids[:, :C], mask, ended)
