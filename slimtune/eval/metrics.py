"""Corpus-level translation metrics through sacrebleu (the reference implementation papers report).

Both return sacrebleu's 0–100 score: identical hypotheses and references give 100, unrelated text close to 0.
"""

from __future__ import annotations

from collections.abc import Sequence

import sacrebleu


def _check(hyps: Sequence[str], refs: Sequence[str]) -> tuple[list[str], list[str]]:
    hyps, refs = list(hyps), list(refs)
    if len(hyps) != len(refs):
        raise ValueError(f"{len(hyps)} hypotheses but {len(refs)} references")
    if not hyps:
        raise ValueError("no hypotheses to score")
    return hyps, refs


def bleu(hyps: Sequence[str], refs: Sequence[str], *, tokenize: str = "13a") -> float:
    """Corpus BLEU (sacrebleu defaults: 4-gram, exponential smoothing, `13a` tokenizer) of one reference each."""
    hyps, refs = _check(hyps, refs)
    return float(sacrebleu.corpus_bleu(hyps, [refs], tokenize=tokenize).score)


def chrf(hyps: Sequence[str], refs: Sequence[str]) -> float:
    """Corpus chrF (character 6-grams, beta 2; sacrebleu defaults) of one reference each."""
    hyps, refs = _check(hyps, refs)
    return float(sacrebleu.corpus_chrf(hyps, [refs]).score)
