"""Run every metric of an `EvalConfig` on one model, and write a side-by-side report of several runs.

`run_eval` returns one JSON-ready dict per model state (label: "base", "after cpt", "after sft", ...):

    {"label": str,
     "metrics": {"perplexity/<name>": ppl, "BLEU/<direction>": x, "chrF/<direction>": x,
                 "exact_match/<name>": % correct},            # flat: one row each in the report
     "perplexity": {name: {"ppl", "nll", "tokens"}},
     "translation": {direction: {"bleu", "chrf", "n", "examples": [{"src", "ref", "hyp"}]}},
     "exact_match": {name: {"exact_match", "correct", "n", "examples"}},
     "generations": [{"prompt", "output"}]}

`write_report({label: result, ...}, out_dir)` writes eval.json (exactly that mapping) and eval.md. Both are
deterministic: no timestamps, labels and rows in insertion order.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import torch

from slimtune.config.eval import EvalConfig
from slimtune.eval.exact_match import exact_match_eval
from slimtune.eval.generate import generate
from slimtune.eval.loaders import load_aligned, load_exact_match, load_flores, load_texts
from slimtune.eval.perplexity import perplexity
from slimtune.eval.translate import language_name, translation_eval
from slimtune.io import write_text_atomic

log = logging.getLogger(__name__)


def run_eval(
    model: torch.nn.Module,
    tokenizer,
    cfg: EvalConfig,
    *,
    base_dir: Path,
    label: str,
    device: torch.device | str | None = None,
) -> dict:
    """Compute every metric configured in `cfg` (see the module doc for the result's shape)."""
    base_dir = Path(base_dir)
    bs = cfg.batch_size
    result: dict = {
        "label": label,
        "metrics": {},
        "perplexity": {},
        "translation": {},
        "exact_match": {},
        "generations": [],
    }
    metrics = result["metrics"]

    for source in cfg.perplexity:
        name = source.display_name
        log.info("[%s] perplexity on %s", label, name)
        texts = load_texts(source, base_dir=base_dir)
        r = perplexity(model, tokenizer, texts, max_seq_len=source.max_seq_len, batch_size=bs, device=device)
        result["perplexity"][name] = r
        metrics[f"perplexity/{name}"] = r["ppl"]

    for task in cfg.translation:
        direction = task.display_direction
        log.info("[%s] translation %s", label, direction)
        if task.flores is not None:
            pairs = load_flores(task.flores)
        else:
            pairs = load_aligned(task.src, task.tgt, base_dir=base_dir)
        pairs = pairs[: task.max_examples]
        r = translation_eval(
            model,
            tokenizer,
            [(p.src, p.tgt) for p in pairs],
            src_lang=task.src_lang or language_name(task.src_code),
            tgt_lang=task.tgt_lang or language_name(task.tgt_code),
            prompt=task.prompt,
            max_new_tokens=task.max_new_tokens,
            batch_size=bs,
            device=device,
            chat_template=task.chat_template,
            system=task.system,
            bleu_tokenize=task.bleu_tokenize,
            examples=task.examples,
        )
        result["translation"][direction] = r
        metrics[f"BLEU/{direction}"] = r["bleu"]
        metrics[f"chrF/{direction}"] = r["chrf"]

    for task in cfg.exact_match:
        name = task.display_name
        log.info("[%s] exact match on %s", label, name)
        r = exact_match_eval(
            model,
            tokenizer,
            load_exact_match(task, base_dir=base_dir),
            max_new_tokens=task.max_new_tokens,
            batch_size=bs,
            device=device,
            chat_template=task.chat_template,
            system=task.system,
            examples=task.examples,
        )
        result["exact_match"][name] = r
        metrics[f"exact_match/{name}"] = r["exact_match"]

    if cfg.generations is not None:
        g = cfg.generations
        log.info("[%s] %d sample generations", label, len(g.prompts))
        outputs = generate(
            model,
            tokenizer,
            g.prompts,
            max_new_tokens=g.max_new_tokens,
            batch_size=bs,
            device=device,
            chat_template=g.chat_template,
            system=g.system,
            do_sample=g.do_sample,
            temperature=g.temperature,
            top_p=g.top_p,
            seed=g.seed,
        )
        result["generations"] = [{"prompt": p, "output": o} for p, o in zip(g.prompts, outputs)]
    return result


# ----------------------------------------------------------------------------------------------- report


def lower_is_better(metric: str) -> bool:
    """Perplexities improve downwards; BLEU, chrF and exact match upwards."""
    return metric.startswith("perplexity/")


def _better(metric: str) -> str:
    return "↓" if lower_is_better(metric) else "↑"


def format_metric(value) -> str:
    if value is None:
        return "—"
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return f"{value:.2f}"


def _cell(text: str) -> str:
    return " ".join(str(text).split()).replace("|", "\\|")


def _clip(text: str, limit: int = 600) -> str:
    """Translation examples are clipped in the Markdown (eval.json keeps them whole)."""
    return text if len(text) <= limit else text[:limit].rstrip() + " …"


def _quote(text: str) -> list[str]:
    lines = str(text).splitlines() or [""]
    return ["> " + line if line.strip() else ">" for line in lines] if text.strip() else ["> *(empty)*"]


def render_markdown(results: dict[str, dict]) -> str:
    """The Markdown report: one metrics table (rows = metric, columns = labels), then generations and examples."""
    labels = list(results)
    rows: list[str] = []
    for r in results.values():
        rows += [m for m in r.get("metrics", {}) if m not in rows]

    out = ["# Evaluation", ""]
    if rows:
        out += ["| metric | " + " | ".join(_cell(lb) for lb in labels) + " |"]
        out += ["|---|" + "---:|" * len(labels)]
        for m in rows:
            cells = [format_metric(results[lb].get("metrics", {}).get(m)) for lb in labels]
            out += [f"| {_cell(m)} {_better(m)} | " + " | ".join(cells) + " |"]
        out += ["", "↓ lower is better, ↑ higher is better. BLEU and chrF: sacrebleu, 0–100; exact_match: % correct."]
    else:
        out += ["No metrics configured."]

    prompts: list[str] = []
    for r in results.values():
        prompts += [g["prompt"] for g in r.get("generations", []) if g["prompt"] not in prompts]
    if prompts:
        out += ["", "## Sample generations"]
        for k, prompt in enumerate(prompts, 1):
            out += ["", f"### Prompt {k}", ""] + _quote(prompt)
            for lb in labels:
                gens = {g["prompt"]: g["output"] for g in results[lb].get("generations", [])}
                if prompt in gens:
                    out += ["", f"**{lb}**", ""] + _quote(gens[prompt])

    directions: list[str] = []
    for r in results.values():
        directions += [d for d in r.get("translation", {}) if d not in directions]
    for d in directions:
        per_label = {lb: results[lb]["translation"][d] for lb in labels if d in results[lb].get("translation", {})}
        first = next(iter(per_label.values()))
        if not first.get("examples"):
            continue
        out += ["", f"## Translation examples: {d}"]
        for k, ex in enumerate(first["examples"]):
            out += ["", f"### Example {k + 1}", "", "Source:", ""] + _quote(_clip(ex["src"]))
            out += ["", "Reference:", ""] + _quote(_clip(ex["ref"]))
            for lb, r in per_label.items():
                if k < len(r.get("examples", [])):
                    out += ["", f"**{lb}**", ""] + _quote(_clip(r["examples"][k]["hyp"]))
    return "\n".join(out) + "\n"


def write_report(results: dict[str, dict], out_dir: Path) -> tuple[Path, Path]:
    """Write `out_dir/eval.json` (the `results` mapping as is) and `out_dir/eval.md`; returns both paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out_dir / "eval.json", out_dir / "eval.md"
    write_text_atomic(json_path, json.dumps(results, indent=2, ensure_ascii=False) + "\n")
    write_text_atomic(md_path, render_markdown(results))
    return json_path, md_path


def read_report(out_dir: Path) -> dict[str, dict]:
    """The results mapping of `out_dir/eval.json` ({} when there is none), to add a later stage's figures."""
    path = Path(out_dir) / "eval.json"
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
