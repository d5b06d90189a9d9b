"""The adapter study: every adapter kind on one task and base, a small learning-rate sweep per kind.

``run_study(recipe, arms)`` trains one run per (kind, lr) through the ``Trainer`` (the recipe's model, data, steps
and eval; only ``adapter``, ``quant`` where a kind needs it, and ``train.lr`` change) and reports per kind:
trainable parameters, optimizer-state bytes, bytes saved for backward per token, median step time, and the recipe's
first metric after the run at the best lr. The shipped study (``slimtune study recipes/study_demo.yaml``) is the
demo task: SmolLM2-135M NF4, ISO dates → words, exact match on held-out dates.

How each number is measured:

- trainable parameters: ``requires_grad`` values after setup;
- optimizer state: ``bench.memory.held_bytes(model, optimizer)["optimizer"]`` after the last step (AdamW: 8 B per
  trained value; fp32 masters counted when present);
- saved for backward: ``bench.memory.saved_bytes`` of one training forward of the first micro-batch, activations
  only (parameters excluded), divided by that batch's tokens;
- step time: median of the run's optimizer steps after the first (this CPU is shared: compare within one study).
"""

from __future__ import annotations

import gc
import json
import math
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from slimtune.bench.memory import held_bytes, saved_bytes
from slimtune.config.recipe import Recipe
from slimtune.errors import SlimtuneError
from slimtune.eval.runner import run_eval
from slimtune.models.streaming import release_host_memory
from slimtune.train.loop import Trainer, causal_lm_loss_sum


@dataclass
class Arm:
    """One row of the study: a name, the adapter block (merged over the recipe's), learning rates to try, and
    recipe sections a kind needs changed (``full`` trains a dense base: ``quant: {mode: none}``)."""

    name: str
    adapter: dict[str, Any]
    lrs: list[float]
    quant: dict[str, Any] | None = None


# The demo study. Centre lrs: the demo's 2e-3 for the LoRA family; full fine-tuning moves every weight, so its grid
# sits ~30x lower. One decade-wide sweep of three points per kind (the Unified Study's point: tune lr per kind).
LORA_LRS = [5e-4, 2e-3, 8e-3]
DEMO_ARMS = [
    Arm("lora", {"kind": "lora"}, LORA_LRS),
    Arm("rslora", {"kind": "rslora"}, LORA_LRS),
    Arm("dora", {"kind": "dora"}, LORA_LRS),
    Arm("lamda", {"kind": "lamda"}, LORA_LRS),
    Arm("lamda_pp", {"kind": "lamda_pp"}, LORA_LRS),
    Arm("slora", {"kind": "slora"}, LORA_LRS),
    Arm("nlora", {"kind": "nlora"}, LORA_LRS),
    Arm("inttune", {"kind": "inttune"}, LORA_LRS),
    Arm("layra", {"kind": "lora", "layers": {"first": 10, "last": 2}}, LORA_LRS),
    Arm("full", {"kind": "full", "modules": "no-embeddings"}, [2e-5, 6e-5, 2e-4], quant={"mode": "none"}),
]


@dataclass
class RunResult:
    arm: str
    kind: str
    lr: float
    metric: str
    score: float | None
    final_loss: float | None
    trainable_params: int
    optimizer_bytes: int
    saved_bytes_per_token: float
    step_seconds: float
    wall_seconds: float
    error: str | None = None
    examples: list[dict] = field(default_factory=list)


def arm_recipe(base: Recipe, arm: Arm, lr: float, run_dir: Path) -> Recipe:
    """The base recipe with this arm's adapter, quant and lr; outputs off (a study keeps numbers, not models)."""
    data = base.model_dump(mode="json")
    adapter = {k: v for k, v in data["adapter"].items() if k in ("rank", "alpha", "dropout", "targets")}
    data["adapter"] = {**adapter, **arm.adapter}
    if arm.quant is not None:
        data["quant"] = {**data["quant"], **arm.quant}
    data["train"]["lr"] = lr
    data["output"] = {**data["output"], "dir": str(run_dir), "export_peft": False, "save_merged": False}
    data["stages"] = []
    try:
        return Recipe.model_validate(data)
    except ValueError as e:
        raise SlimtuneError(f"study arm {arm.name}: {e}") from None


def _first_metric(result: dict) -> tuple[str, float | None]:
    metrics = result.get("metrics", {})
    if not metrics:
        return "loss", None
    name = next(iter(metrics))
    return name, float(metrics[name])


def run_arm(base: Recipe, arm: Arm, lr: float, *, base_dir: Path, work_dir: Path) -> RunResult:
    """Train and evaluate one (kind, lr) through the Trainer; a failure (e.g. a non-finite loss) is recorded."""
    t0 = time.perf_counter()
    run_dir = work_dir / f"{arm.name}-lr{lr:g}"
    r = arm_recipe(base, arm, lr, run_dir)
    trainer = Trainer(r, run_dir=run_dir, base_dir=base_dir, handle_signals=False)
    trainer.setup()
    n_train = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    batch = next(iter(trainer.data.batches(r.train.micro_batch, epoch=0)))
    trainer.model.train()
    probe = saved_bytes(lambda: causal_lm_loss_sum(trainer.model, batch), modules=[trainer.model])
    per_token = probe.activation_bytes / max(int(batch["attention_mask"].sum()), 1)
    error = None
    try:
        trainer.train()
    except SlimtuneError as e:  # a diverged run is a result of the study, not a crash of it
        error = str(e)
    steps = [h.seconds for h in trainer.history]
    step_s = statistics.median(steps[1:] or steps) if steps else math.nan
    final_loss = trainer.history[-1].loss if trainer.history else None
    opt_bytes = held_bytes(trainer.model, trainer.optimizer).get("optimizer", 0)
    metric, score, examples = "exact_match", None, []
    if error is None and r.eval is not None:
        trainer.model.eval()
        ev = run_eval(trainer.model, trainer.tokenizer, r.eval, base_dir=base_dir, label=f"{arm.name} lr {lr:g}",
                      device=trainer.device)
        metric, score = _first_metric(ev)
        for res in ev.get("exact_match", {}).values():
            examples = res.get("examples", [])[:2]
    kind = r.adapter.kind
    trainer.cleanup()
    del trainer, probe
    gc.collect()
    release_host_memory()  # 30 runs in one process: give each model's pages back (peak RSS was 15.7 GB without)
    return RunResult(arm.name, kind, lr, metric, score, final_loss, n_train, int(opt_bytes), per_token, step_s,
                     time.perf_counter() - t0, error, examples)


def best_per_arm(runs: list[RunResult]) -> dict[str, RunResult]:
    """The run with the best score per arm (higher is better; lowest final loss breaks ties / stands in)."""
    best: dict[str, RunResult] = {}
    for run in runs:
        key = (run.score if run.score is not None else -math.inf,
               -(run.final_loss if run.final_loss is not None and math.isfinite(run.final_loss) else math.inf))
        cur = best.get(run.arm)
        if cur is None or key > (cur.score if cur.score is not None else -math.inf,
                                 -(cur.final_loss if cur.final_loss is not None and math.isfinite(cur.final_loss)
                                   else math.inf)):
            best[run.arm] = run
    return best


def _schedule(arms: list[Arm]) -> list[tuple[Arm, float]]:
    """Every arm's middle lr first, then the others: a study stopped early still covers every kind."""
    def order(n: int) -> list[int]:
        mid = n // 2
        return [mid] + [i for i in range(n) if i != mid]

    todo = [(arm, [arm.lrs[i] for i in order(len(arm.lrs))]) for arm in arms]
    return [(arm, lrs[k]) for k in range(max(len(a.lrs) for a in arms)) for arm, lrs in todo if k < len(lrs)]


def run_study(
    base: Recipe, arms: list[Arm], *, base_dir: Path, work_dir: Path,
    progress: Callable[[str], Any] | None = None,
    on_run: Callable[[dict[str, Any]], Any] | None = None,
) -> dict[str, Any]:
    """Every arm at every lr. Returns the JSON-able study result (runs, best per arm, settings, wall time);
    ``on_run(partial_result)`` after each run (the CLI writes the files as it goes)."""
    t0 = time.perf_counter()
    runs: list[RunResult] = []
    plan = _schedule(arms)
    total = len(plan)
    study: dict[str, Any] = {}
    for arm, lr in plan:
        if progress is not None:
            progress(f"[{len(runs) + 1}/{total}] {arm.name} lr {lr:g}")
        try:
            runs.append(run_arm(base, arm, lr, base_dir=base_dir, work_dir=work_dir))
        except Exception as e:  # one broken arm must not lose the others' hours: recorded, shown in the table
            runs.append(RunResult(arm.name, str(arm.adapter.get("kind")), lr, "", None, None, 0, 0, 0.0,
                                  math.nan, 0.0, error=f"{type(e).__name__}: {e}"))
        if progress is not None:
            r = runs[-1]
            progress(f"    {r.metric} {r.score} loss {r.final_loss} ({r.wall_seconds:.0f} s)"
                     + (f" error: {r.error}" if r.error else ""))
        study = _result(base, arms, runs, time.perf_counter() - t0, complete=len(runs) == total)
        if on_run is not None:
            on_run(study)
    return study


def _result(base: Recipe, arms: list[Arm], runs: list[RunResult], seconds: float, *, complete: bool) -> dict:
    return {
        "recipe": base.name, "model": base.model.name, "quant": base.quant.mode,
        "rank": base.adapter.rank, "alpha": base.adapter.alpha, "steps": base.train.steps,
        "micro_batch": base.train.micro_batch, "threads": torch.get_num_threads(), "complete": complete,
        "arms": [asdict(a) for a in arms], "runs": [asdict(r) for r in runs],
        "best": {k: asdict(v) for k, v in best_per_arm(runs).items()},
        "wall_seconds": round(seconds, 1),
    }


# --------------------------------------------------------------------------------------------- reporting


def _mib(n: float) -> str:
    return f"{n / 2**20:.2f}"


def render_markdown(study: dict[str, Any]) -> str:
    """The per-kind table (best lr) and the full sweep."""
    runs = [RunResult(**r) for r in study["runs"]]
    best = {k: RunResult(**v) for k, v in study["best"].items()}
    metric = next((r.metric for r in runs if r.score is not None), "score")
    lines = [
        f"# Adapter study: {study['recipe']}",
        "",
        f"Base `{study['model']}` ({study['quant']}), rank {study['rank']}, alpha {study['alpha']}, "
        f"{study['steps']} steps × {study['micro_batch']} sequences, {study['threads']} thread(s); "
        f"wall time {study['wall_seconds'] / 60:.1f} min."
        + ("" if study.get("complete", True) else f" **Partial: {len(runs)} runs done when this was written.**"),
        "",
        f"| kind | best lr | {metric} | trainable params | optimizer state MiB | saved for backward KiB/token "
        "| step s (fastest run's median) | lrs tried → score |",
        "|---|---|---|---|---|---|---|---|",
    ]
    def score(r: RunResult) -> str:
        return "failed" if r.error else "—" if r.score is None else f"{r.score:.1f}"

    for name, b in best.items():
        sweep = ", ".join(f"{r.lr:g}→{score(r)}" for r in runs if r.arm == name)
        step_s = min((r.step_seconds for r in runs if r.arm == name and math.isfinite(r.step_seconds)),
                     default=math.nan)  # the least contended of the arm's runs (a shared CPU makes steps noisy)
        lines.append(f"| {name} | {b.lr:g} | {score(b)} | {b.trainable_params:,} | "
                     f"{_mib(b.optimizer_bytes)} | {b.saved_bytes_per_token / 1024:.1f} | {step_s:.2f} | "
                     f"{sweep} |")
    return "\n".join(lines) + "\n"


def plot(study: dict[str, Any], path: Path) -> Path:
    """Score against lr, one line per kind (log x)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [RunResult(**r) for r in study["runs"]]
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for name in dict.fromkeys(r.arm for r in runs):
        pts = sorted((r.lr, r.score if r.score is not None else 0.0) for r in runs if r.arm == name)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=name)
    ax.set_xscale("log")
    ax.set_xlabel("learning rate")
    metric = next((r.metric for r in runs if r.score is not None), "score")
    ax.set_ylabel(metric)
    ax.set_title(f"{study['recipe']}: {study['steps']} steps, rank {study['rank']}")
    ax.legend(fontsize=8, ncol=2)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_results(study: dict[str, Any], out_dir: Path, *, png: bool = True) -> dict[str, Path]:
    """study.json, study.md and (``png``) study.png in ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"json": out_dir / "study.json", "md": out_dir / "study.md"}
    paths["json"].write_text(json.dumps(study, indent=2, default=str) + "\n")
    paths["md"].write_text(render_markdown(study))
    if png:
        paths["png"] = plot(study, out_dir / "study.png")
    return paths
