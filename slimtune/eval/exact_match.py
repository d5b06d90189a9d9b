"""Exact-match accuracy: greedy answers compared with the expected answers after stripping whitespace."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from slimtune.eval.generate import generate


def exact_match_eval(
    model: torch.nn.Module,
    tokenizer,
    items: Sequence[tuple[str, str]],
    *,
    max_new_tokens: int = 32,
    batch_size: int = 4,
    device: torch.device | str | None = None,
    chat_template: bool = True,
    system: str | None = None,
    examples: int = 3,
) -> dict:
    """{"exact_match" (% correct, 0–100), "correct", "n", "examples": [{"prompt", "answer", "output"}]}."""
    items = list(items)
    if not items:
        raise ValueError("no items to score")
    outputs = generate(
        model,
        tokenizer,
        [p for p, _ in items],
        max_new_tokens=max_new_tokens,
        batch_size=batch_size,
        device=device,
        chat_template=chat_template,
        system=system,
    )
    correct = sum(out.strip() == str(ans).strip() for (_, ans), out in zip(items, outputs))
    return {
        "exact_match": 100.0 * correct / len(items),
        "correct": correct,
        "n": len(items),
        "examples": [
            {"prompt": p, "answer": a, "output": o} for (p, a), o in list(zip(items, outputs))[:examples]
        ],
    }
