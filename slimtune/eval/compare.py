"""`slimtune compare RUN_DIR...`: one table of several runs' evaluations (e.g. the Sardinian SFT ablations).

Each run folder holds the ``eval.json`` its run wrote ({label: result}, labels in the order they were measured).
By default a run contributes its last label (the final model, e.g. "after sft"); ``labels`` picks others (a run
without any of them contributes no row), and ``all_labels`` takes every one. Columns are the metrics (BLEU, chrF,
perplexity, exact match, in that order); the best value of each column is marked.

    comp = compare_runs([Path("runs/sardinian_rslora"), Path("runs/sardinian_lora_r64")])
    print(render_markdown(comp))
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from slimtune.errors import SlimtuneError
from slimtune.eval.runner import format_metric, lower_is_better

_ORDER = ("BLEU/", "chrF/", "perplexity/", "exact_match/")


@dataclass
class Row:
    run: str
    label: str
    metrics: dict[str, float]


@dataclass
class Comparison:
    rows: list[Row] = field(default_factory=list)
    metrics: list[str] = field(default_factory=list)

    def best(self, metric: str) -> float | None:
        vals = [r.metrics[metric] for r in self.rows if _finite(r.metrics.get(metric))]
        if not vals:
            return None
        return min(vals) if lower_is_better(metric) else max(vals)

    def to_json(self) -> dict[str, Any]:
        return {"metrics": self.metrics,
                "rows": [{"run": r.run, "label": r.label, "metrics": r.metrics} for r in self.rows]}


def _finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and math.isfinite(v)


def load_eval(run_dir: Path) -> dict[str, dict]:
    """The {label: result} mapping of ``run_dir/eval.json``."""
    path = Path(run_dir) / "eval.json"
    if not path.is_file():
        raise SlimtuneError(f"{run_dir}: no eval.json (run the recipe with an eval: section, or `slimtune eval`)")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise SlimtuneError(f"{path}:{e.lineno}: invalid JSON: {e.msg}") from None
    if not isinstance(data, dict) or not data:
        raise SlimtuneError(f"{path}: no evaluations in it")
    return data


def _metric_key(m: str) -> tuple[int, str]:
    for i, prefix in enumerate(_ORDER):
        if m.startswith(prefix):
            return i, m[len(prefix):]
    return len(_ORDER), m


def compare_runs(run_dirs: list[Path], *, labels: list[str] | None = None, all_labels: bool = False) -> Comparison:
    """Gather the chosen labels of every run into one Comparison."""
    if not run_dirs:
        raise SlimtuneError("compare: give at least one run folder")
    comp = Comparison()
    seen: list[str] = []
    names = [Path(d).name for d in run_dirs]
    for d, name in zip(run_dirs, names):
        if names.count(name) > 1:
            name = str(d)
        results = load_eval(Path(d))
        if all_labels:
            chosen = list(results)
        elif labels:  # a run without any of them contributes no row
            chosen = [lb for lb in labels if lb in results]
        else:
            chosen = [list(results)[-1]]
        for lb in chosen:
            metrics = {k: v for k, v in (results[lb].get("metrics") or {}).items() if isinstance(v, (int, float))}
            seen += [m for m in metrics if m not in seen]
            comp.rows.append(Row(run=name, label=lb, metrics=metrics))
    if not comp.rows:
        raise SlimtuneError(f"compare: no run has an evaluation labelled {' or '.join(map(repr, labels or []))}")
    comp.metrics = sorted(seen, key=_metric_key)
    return comp


def render_markdown(comp: Comparison) -> str:
    """A Markdown table: one row per (run, label), one column per metric, best values in bold."""
    out = ["# Comparison", ""]
    if not comp.rows:
        return "\n".join(out + ["No runs."]) + "\n"
    head = ["run", "label"] + [f"{m} {'↓' if lower_is_better(m) else '↑'}" for m in comp.metrics]
    out.append("| " + " | ".join(head) + " |")
    out.append("|---|---|" + "---:|" * len(comp.metrics))
    best = {m: comp.best(m) for m in comp.metrics}
    for r in comp.rows:
        cells = []
        for m in comp.metrics:
            v = r.metrics.get(m)
            text = format_metric(v)
            if len(comp.rows) > 1 and _finite(v) and best[m] is not None and v == best[m]:
                text = f"**{text}**"
            cells.append(text)
        out.append(f"| {r.run} | {r.label} | " + " | ".join(cells) + " |")
    out += ["", "↓ lower is better, ↑ higher is better; best of each column in bold. "
                "BLEU and chrF: sacrebleu, 0–100."]
    return "\n".join(out) + "\n"
