"""Run a whole recipe: its stages in order, each from the previous one, with evaluation before/after.

A stage that finished writes ``stage_summary.json``; re-running the recipe skips it (nothing done is redone). An
interrupted stage resumes from its latest checkpoint with ``resume=True``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from slimtune.config.recipe import Recipe
from slimtune.train.loop import Trainer
from slimtune.train.report import Reporter, SilentReporter

SUMMARY = "stage_summary.json"


def stage_dir(run_dir: Path, name: str, n_stages: int) -> Path:
    return run_dir if n_stages == 1 else run_dir / "stages" / name


def _evaluate(trainer: Trainer, recipe: Recipe, base_dir: Path, label: str) -> dict[str, Any] | None:
    if recipe.eval is None:
        return None
    from slimtune.eval.runner import run_eval

    trainer.reporter.log(f"evaluating ({label})")
    result = run_eval(trainer.model, trainer.tokenizer, recipe.eval, base_dir=base_dir, label=label,
                      device=trainer.device)
    trainer.model.train()
    return result


def run_recipe(
    recipe: Recipe, *, base_dir: Path, reporter: Reporter | None = None, resume: bool | Path = False,
    stop_after: int | None = None,
) -> dict[str, Any]:
    """Run every stage not yet done. Returns the run summary (also written to ``run_summary.json``)."""
    reporter = reporter or SilentReporter()
    run_dir = recipe.run_dir()
    run_dir.mkdir(parents=True, exist_ok=True)
    stages = recipe.resolved_stages()
    summaries: list[dict[str, Any]] = []
    evals: dict[str, Any] = {}
    prev_dir: Path | None = None
    for i, (stage, r) in enumerate(stages):
        sdir = stage_dir(run_dir, stage.name, len(stages))
        needs_merged = i + 1 < len(stages) and stages[i + 1][0].start_from == "merged"
        if needs_merged and not r.output.save_merged:
            r = r.model_copy(update={"output": r.output.model_copy(update={"save_merged": True})})
        if stage.start_from == "merged" and prev_dir is not None:
            r = r.model_copy(update={"model": r.model.model_copy(update={"name": str(prev_dir / "merged")})})
        done = sdir / SUMMARY
        if done.is_file():
            reporter.log(f"stage {stage.name}: already done ({done}), skipped")
            summary = json.loads(done.read_text())
            summaries.append(summary)
            evals.update(summary.get("eval", {}))
            prev_dir = sdir
            continue
        init_adapter = prev_dir / "adapter_native" if stage.start_from == "adapter" and prev_dir else None
        reporter.log(f"stage {stage.name} ({i + 1}/{len(stages)})")
        trainer = Trainer(r, run_dir=sdir, base_dir=base_dir, reporter=reporter, init_adapter=init_adapter,
                          stage=stage.name)
        trainer.setup()
        resumed = False
        if resume:
            resumed = trainer.resume(None if resume is True else Path(resume))
        stage_evals: dict[str, Any] = {}
        if not resumed and trainer.pos.step == 0:
            before = _evaluate(trainer, r, base_dir, f"before {stage.name}" if len(stages) > 1 else "before")
            if before is not None:
                stage_evals[before["label"]] = before
        summary = trainer.train(stop_after=stop_after)
        if summary["interrupted"]:
            summary["resume_hint"] = "slimtune run RECIPE --resume"
            (run_dir / "run_summary.json").write_text(json.dumps({"stages": summaries + [summary]}, indent=2))
            trainer.cleanup()
            return {"stages": summaries + [summary], "interrupted": True, "run_dir": str(run_dir)}
        after = _evaluate(trainer, r, base_dir, f"after {stage.name}" if len(stages) > 1 else "after")
        if after is not None:
            stage_evals[after["label"]] = after
        summary["outputs"] = trainer.save_outputs()
        summary["eval"] = stage_evals
        evals.update(stage_evals)
        if evals:
            from slimtune.eval.runner import write_report

            write_report(evals, run_dir)
        done.write_text(json.dumps(summary, indent=2, default=str))
        summaries.append(summary)
        trainer.cleanup()
        prev_dir = sdir
    result = {"stages": summaries, "interrupted": False, "run_dir": str(run_dir)}
    (run_dir / "run_summary.json").write_text(json.dumps(result, indent=2, default=str))
    return result
