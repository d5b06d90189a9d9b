"""Token-weighted perplexity of a causal LM on a list of texts.

Each text is tokenized on its own (with the tokenizer's special tokens, e.g. BOS) and every token after the first
is predicted exactly once. A text longer than `max_seq_len` is cut into consecutive windows of at most
`max_seq_len` tokens; a window starts at the last token of the previous one, so that token is context only and
the scored tokens of the windows never overlap (no token is scored twice and none is skipped). Windows do not see
context from before their start.

    nll = Σ −log p(token | prefix in its window) / tokens,   ppl = exp(nll)
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F


def windows(ids: Sequence[int], max_seq_len: int) -> list[list[int]]:
    """Split token ids into windows of ≤ max_seq_len tokens sharing one boundary token (see module doc)."""
    if max_seq_len < 2:
        raise ValueError("max_seq_len must be at least 2")
    ids = list(ids)
    if len(ids) < 2:
        return []
    out, start = [], 0
    while start < len(ids) - 1:
        out.append(ids[start : start + max_seq_len])
        start += max_seq_len - 1
    return out


def model_device(model: torch.nn.Module) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")


@torch.no_grad()
def perplexity(
    model: torch.nn.Module,
    tokenizer,
    texts: Sequence[str],
    *,
    max_seq_len: int,
    batch_size: int = 4,
    device: torch.device | str | None = None,
) -> dict:
    """{"ppl", "nll" (mean per token, nats), "tokens" (number scored)} over all texts, token-weighted.

    The model is put in eval mode for the call and returned to its previous mode afterwards.
    """
    device = torch.device(device) if device is not None else model_device(model)
    all_windows: list[list[int]] = []
    for text in texts:
        ids = tokenizer(text, add_special_tokens=True)["input_ids"]
        all_windows.extend(windows(ids, max_seq_len))
    if not all_windows:
        raise ValueError("no tokens to score (every text is shorter than two tokens)")
    # Longest first: fewer pad tokens per batch and the largest batch (peak memory) comes first.
    all_windows.sort(key=len, reverse=True)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0

    was_training = model.training
    model.eval()
    total_nll, total_tokens = 0.0, 0
    try:
        for b in range(0, len(all_windows), batch_size):
            batch = all_windows[b : b + batch_size]
            length = max(len(w) for w in batch)
            input_ids = torch.full((len(batch), length), pad_id, dtype=torch.long)
            attention_mask = torch.zeros((len(batch), length), dtype=torch.long)
            for i, w in enumerate(batch):  # right padding: causal attention never looks at the pads
                input_ids[i, : len(w)] = torch.tensor(w)
                attention_mask[i, : len(w)] = 1
            input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
            logits = model(input_ids=input_ids, attention_mask=attention_mask).logits  # (B, T, V)
            for i, w in enumerate(batch):  # one row at a time: only (T, V) is ever upcast to fp32
                n = len(w)
                total_nll += F.cross_entropy(
                    logits[i, : n - 1].float(), input_ids[i, 1:n], reduction="sum"
                ).item()
                total_tokens += n - 1
            del logits
    finally:
        model.train(was_training)
    nll = total_nll / total_tokens
    ppl = math.exp(nll) if nll < 700 else math.inf
    return {"ppl": ppl, "nll": nll, "tokens": total_tokens}
