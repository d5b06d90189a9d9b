"""SentencePiece-style vocabularies (Llama-2, Mistral v0.1–0.3) and llama3 RoPE factors, as llama.cpp reads them.

A Llama-2 / Mistral HF fast tokenizer is a BPE model with ``byte_fallback``, a ``▁`` space marker and ``<0xXX>``
byte tokens. llama.cpp's ``llama`` (SPM) tokenizer has no merge list: it merges the adjacent pair whose result has
the highest score. The score of a piece is therefore derived from the merge list: ``-rank`` of the first merge
that makes it (what a SentencePiece BPE model stores), so the GGUF tokenizes exactly as the HF one.
"""

from __future__ import annotations

import math
import re

import torch
from gguf import TokenType

_BYTE = re.compile(r"<0x[0-9A-Fa-f]{2}>")
USER_SCORE = -1000.0  # llama.cpp's converter gives added (user-defined / padding) tokens this score


def is_spm_bpe(model: dict) -> bool:
    """A tokenizer.json ``model`` of the Llama-2 kind: BPE with byte fallback."""
    return model.get("type") == "BPE" and bool(model.get("byte_fallback"))


def _add_space_prefix(tj: dict) -> bool:
    """Whether the tokenizer prepends ``▁`` to the text (Metaspace prepend_scheme, or a Prepend normalizer)."""
    def walk(node):
        if not isinstance(node, dict):
            return
        yield node
        for key in ("normalizers", "pretokenizers"):
            for child in node.get(key) or []:
                yield from walk(child)

    for node in walk(tj.get("pre_tokenizer")):
        if node.get("type") == "Metaspace":
            return node.get("prepend_scheme", "always") != "never" and node.get("add_prefix_space", True)
    for node in walk(tj.get("normalizer")):
        if node.get("type") == "Prepend" and node.get("prepend") == "▁":
            return True
    return False


def spm_facts(tok, tj: dict, n: int) -> dict:
    """tokens, scores, token types and add_space_prefix for a byte-fallback BPE tokenizer of ``n`` slots."""
    model = tj["model"]
    vocab: dict[str, int] = model["vocab"]
    merges = [m.split(" ", 1) if isinstance(m, str) else m for m in model.get("merges", [])]
    first_rank: dict[str, int] = {}
    for rank, (a, b) in enumerate(merges):
        first_rank.setdefault(a + b, rank)
    tokens = [f"[PAD{i}]" for i in range(n)]
    scores = [USER_SCORE] * n
    types = [int(TokenType.UNUSED)] * n
    unk = model.get("unk_token") or getattr(tok, "unk_token", None)
    n_merges = len(merges)
    for piece, i in vocab.items():
        tokens[i] = piece
        if piece == unk:
            scores[i], types[i] = 0.0, int(TokenType.UNKNOWN)
        elif _BYTE.fullmatch(piece):
            scores[i], types[i] = 0.0, int(TokenType.BYTE)
        elif piece in first_rank:
            scores[i], types[i] = -float(first_rank[piece]), int(TokenType.NORMAL)
        else:  # a base character: below every merged piece, as in a SentencePiece BPE model
            scores[i], types[i] = -float(n_merges + i), int(TokenType.NORMAL)
    for added in tj.get("added_tokens", []):
        i, content = added["id"], added["content"]
        tokens[i] = content
        if content == unk:
            scores[i], types[i] = 0.0, int(TokenType.UNKNOWN)
        elif added.get("special"):
            scores[i], types[i] = 0.0, int(TokenType.CONTROL)
        else:
            scores[i], types[i] = USER_SCORE, int(TokenType.USER_DEFINED)
    return {"tokens": tokens, "scores": scores, "types": types, "add_space_prefix": _add_space_prefix(tj)}


def llama3_rope_factors(rp: dict, head_dim: int, theta: float) -> torch.Tensor:
    """llama.cpp's ``rope_freqs.weight`` for ``rope_type: llama3``: per frequency pair, the divisor of its frequency.

    1 for wavelengths below ``original / high_freq_factor``, ``factor`` above ``original / low_freq_factor``, and a
    smooth blend between (Llama-3.1's rule). Shape (head_dim // 2,), fp32.
    """
    factor = float(rp.get("factor", 8.0))
    low, high = float(rp.get("low_freq_factor", 1.0)), float(rp.get("high_freq_factor", 4.0))
    old = float(rp.get("original_max_position_embeddings", 8192))
    freqs = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)  # (head_dim/2,)
    out = []
    for f in freqs.tolist():
        wavelen = 2 * math.pi / f
        if wavelen < old / high:
            out.append(1.0)
        elif wavelen > old / low:
            out.append(factor)
        else:
            smooth = (old / wavelen - low) / (high - low)
            out.append(1.0 / ((1 - smooth) / factor + smooth))
    return torch.tensor(out, dtype=torch.float32)
