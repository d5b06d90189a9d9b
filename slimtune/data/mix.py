"""Deterministic mixing of sources by token share.

Semantics (documented in `SourceConfig.weight` and `ReplayConfig.ratio`):

- Main group: total T = Σ tokens of all main sources (the volume is kept); source s gets round(w_s / Σw · T)
  tokens. A source with more than its share is down-sampled (a seeded subset of its units), one with less is
  repeated (whole passes, then a seeded subset for the remainder).
- Replay group: R = round(T · ratio / (1 − ratio)) tokens, split among the replay sources by weight the same way,
  so replay / (T + R) = ratio.

A "unit" is a document (format text) or an example (chat/instruction). When units may be cut (text: the stream is
packed anyway) the last unit is cut so a source gets exactly its share; otherwise the last unit is taken only when
that brings the count closer to the share (error ≤ half a unit).
"""

from __future__ import annotations

import numpy as np


def group_targets(totals: list[int], weights: list[float], group_total: int) -> list[int]:
    """Token targets per source: group_total split proportionally to weights (largest remainder rounding)."""
    w = np.asarray(weights, dtype=np.float64)
    exact = w / w.sum() * group_total
    base = np.floor(exact).astype(np.int64)
    rest = int(group_total - base.sum())
    if rest > 0:
        order = np.argsort(-(exact - base), kind="stable")[:rest]
        base[order] += 1
    return [int(x) for x in base]


def replay_total(main_total: int, ratio: float) -> int:
    """Replay tokens so that replay / (main + replay) = ratio."""
    return int(round(main_total * ratio / (1.0 - ratio))) if ratio > 0 else 0


def select_units(lengths: np.ndarray, target: int, rng: np.random.Generator, *, can_cut: bool
                 ) -> list[tuple[int, int | None]]:
    """Choose units (with repetition) whose lengths sum to `target` tokens.

    Returns (unit index, cut) pairs; cut is None for a whole unit or the number of leading tokens kept.
    """
    lengths = np.asarray(lengths, dtype=np.int64)
    total = int(lengths.sum())
    if target <= 0 or total <= 0:
        return []
    n = len(lengths)
    passes, rem = divmod(int(target), total)
    chosen: list[tuple[int, int | None]] = []
    for _ in range(passes):  # whole passes in file order (the builder shuffles afterwards if asked)
        chosen += [(i, None) for i in range(n)]
    if rem:
        order = rng.permutation(n)
        cum = np.cumsum(lengths[order])
        m = int(np.searchsorted(cum, rem, side="right"))  # order[:m] sums to <= rem
        chosen += [(int(i), None) for i in order[:m]]
        got = int(cum[m - 1]) if m else 0
        if got < rem and m < n:
            nxt = int(order[m])
            if can_cut:
                chosen.append((nxt, rem - got))
            elif got + int(lengths[nxt]) - rem < rem - got:
                chosen.append((nxt, None))
    return chosen
