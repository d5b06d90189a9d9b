"""Evaluation: perplexity, translation (BLEU/chrF via sacrebleu), exact match, sample generations, reports.

    from slimtune.eval import run_eval, write_report
    results = {"base": run_eval(model, tok, recipe.eval, base_dir=recipe_dir, label="base")}
    ...train...
    results["after sft"] = run_eval(model, tok, recipe.eval, base_dir=recipe_dir, label="after sft")
    write_report(results, out_dir)          # eval.json + eval.md, labels side by side
"""

from slimtune.eval.exact_match import exact_match_eval
from slimtune.eval.generate import generate
from slimtune.eval.metrics import bleu, chrf
from slimtune.eval.perplexity import perplexity
from slimtune.eval.runner import read_report, render_markdown, run_eval, write_report
from slimtune.eval.translate import translation_eval

__all__ = [
    "bleu",
    "chrf",
    "exact_match_eval",
    "generate",
    "perplexity",
    "read_report",
    "render_markdown",
    "run_eval",
    "translation_eval",
    "write_report",
]
