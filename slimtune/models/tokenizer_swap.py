"""Swap a model's tokenizer for another one (ChocoLlama's Dutch tokenizer option), re-initialising the embeddings.

The new vocabulary's embeddings are built from the old ones, so training starts from a sensible point instead of
random rows:

- a new token whose string is also an old token (same vocabulary entry, e.g. ``<|im_end|>`` or ``Ġde`` in two
  byte-level BPEs) keeps that old token's row;
- the new tokenizer's bos/eos/pad/unk take the old tokenizer's bos/eos/pad/unk rows (same role);
- any other new token: its text (the token decoded by the new tokenizer) is tokenized with the old tokenizer and
  its row is the mean of those old rows (``weighting: mean``) or their average weighted by each old piece's length
  in characters (``weighting: length``);
- a token whose text the old tokenizer cannot express (empty) gets the mean of all old rows.

Both the input embeddings and (when not tied) the output embeddings (lm_head) are rebuilt this way and resized to
the new vocabulary; ``config.vocab_size`` and the special-token ids follow. The mapping is a pure function of the
two tokenizers, so a merge or a resumed run rebuilds exactly the same model.

    mapping = build_mapping(old_tok, new_tok)          # list of (old ids, weights) per new id
    swap_tokenizer(model, old_tok, new_tok)            # in place; returns a report dict

``model.tokenizer_swap`` in a recipe: ``slimtune.models.load.load_model`` loads the new tokenizer
(``load_swap_tokenizer``) and calls ``swap_tokenizer``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn as nn

Weighting = Literal["mean", "length"]

_ROLES = ("bos_token_id", "eos_token_id", "pad_token_id", "unk_token_id")


@dataclass
class Mapping:
    """For each new token id: the old ids whose embeddings are averaged, their weights (sum 1), and how."""

    sources: list[list[int]]
    weights: list[list[float]]
    how: list[str]  # "same" | "role" | "pieces" | "mean"

    def counts(self) -> dict[str, int]:
        out = {"same": 0, "role": 0, "pieces": 0, "mean": 0}
        for h in self.how:
            out[h] += 1
        return out


def _token_text(tok, token_id: int) -> str:
    """The text a single token stands for (byte-level and SentencePiece markers decoded)."""
    piece = tok.convert_ids_to_tokens(token_id)
    if piece is None:
        return ""
    try:
        return tok.convert_tokens_to_string([piece])
    except Exception:  # some slow tokenizers reject lone pieces
        return tok.decode([token_id])


def build_mapping(old_tok, new_tok, *, weighting: Weighting = "mean") -> Mapping:
    """How every new token's embedding is made from the old embeddings (see the module doc)."""
    if weighting not in ("mean", "length"):
        raise ValueError(f"weighting must be 'mean' or 'length', got {weighting!r}")
    old_vocab = old_tok.get_vocab()
    n_new = len(new_tok)
    new_vocab = new_tok.get_vocab()
    by_id = {i: s for s, i in new_vocab.items()}
    role_of: dict[int, int] = {}
    for role in _ROLES:
        new_id, old_id = getattr(new_tok, role, None), getattr(old_tok, role, None)
        if new_id is not None and old_id is not None and new_id not in role_of:
            role_of[int(new_id)] = int(old_id)
    special_new = set(getattr(new_tok, "all_special_ids", []))
    sources: list[list[int]] = []
    weights: list[list[float]] = []
    how: list[str] = []
    for j in range(n_new):
        piece = by_id.get(j)
        if piece is not None and piece in old_vocab:
            sources.append([int(old_vocab[piece])]), weights.append([1.0]), how.append("same")
            continue
        if j in role_of:
            sources.append([role_of[j]]), weights.append([1.0]), how.append("role")
            continue
        text = "" if j in special_new else _token_text(new_tok, j)
        ids = old_tok(text, add_special_tokens=False)["input_ids"] if text else []
        if not ids:
            sources.append([]), weights.append([]), how.append("mean")
            continue
        if weighting == "length":
            lens = [max(len(_token_text(old_tok, i)), 1) for i in ids]
            total = float(sum(lens))
            w = [n / total for n in lens]
        else:
            w = [1.0 / len(ids)] * len(ids)
        sources.append([int(i) for i in ids]), weights.append(w), how.append("pieces")
    return Mapping(sources=sources, weights=weights, how=how)


@torch.no_grad()
def remap_matrix(old: torch.Tensor, mapping: Mapping) -> torch.Tensor:
    """Rows of the new embedding matrix (n_new, hidden) from the old one (n_old, hidden), computed in fp32."""
    old32 = old.detach().float()
    mean_row = old32.mean(dim=0)
    rows = []
    for src, w in zip(mapping.sources, mapping.weights):
        if not src:
            rows.append(mean_row)
        elif len(src) == 1:
            rows.append(old32[src[0]])
        else:
            idx = torch.tensor(src, dtype=torch.long, device=old32.device)
            wt = torch.tensor(w, dtype=torch.float32, device=old32.device)
            rows.append(wt @ old32[idx])
    return torch.stack(rows).to(old.dtype)


def _tied(model: nn.Module) -> bool:
    out = model.get_output_embeddings()
    return out is not None and out.weight is model.get_input_embeddings().weight


@torch.no_grad()
def swap_tokenizer(model: nn.Module, old_tok, new_tok, *, weighting: Weighting = "mean") -> dict:
    """In place: give ``model`` the vocabulary of ``new_tok`` (embeddings re-initialised from ``old_tok``'s).

    Returns a report: {"old_vocab", "new_vocab", "same", "role", "pieces", "mean", "tied"}.
    """
    mapping = build_mapping(old_tok, new_tok, weighting=weighting)
    emb = model.get_input_embeddings()
    head = model.get_output_embeddings()
    tied = _tied(model)
    new_in = remap_matrix(emb.weight, mapping)
    new_out = None if (head is None or tied) else remap_matrix(head.weight, mapping)
    n_new = len(mapping.sources)
    # resize_token_embeddings keeps config.vocab_size and tying right; the rows are then overwritten.
    model.resize_token_embeddings(n_new, mean_resizing=False)
    model.get_input_embeddings().weight.copy_(new_in.to(model.get_input_embeddings().weight.device))
    if new_out is not None:
        model.get_output_embeddings().weight.copy_(new_out.to(model.get_output_embeddings().weight.device))
    if getattr(model.get_output_embeddings(), "bias", None) is not None:
        bias = head.bias  # type: ignore[union-attr]
        model.get_output_embeddings().bias.copy_(remap_matrix(bias[:, None], mapping)[:, 0])
    for cfg in (model.config, getattr(model, "generation_config", None)):
        if cfg is None:
            continue
        for role in ("bos_token_id", "eos_token_id", "pad_token_id"):
            if hasattr(cfg, role):
                setattr(cfg, role, getattr(new_tok, role, None))
    report = {"old_vocab": len(old_tok), "new_vocab": n_new, "tied": tied, **mapping.counts()}
    return report
