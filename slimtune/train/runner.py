"""Run a whole recipe: its stages in order, each from the previous one, with evaluation before/after.

A stage that finished writes ``stage_summary.json``; re-running the recipe skips it (nothing done is redone). An
interrupted stage resumes from its latest checkpoint with ``resume=True``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from slimtune.config.recipe import Recipe
from slimtune.errors import SlimtuneError
from slimtune.eval.model_eval import evaluate_loaded
from slimtune.eval.runner import write_report
from slimtune.train.callbacks import TrainerCallback
from slimtune.train.distributed import barrier, is_main
from slimtune.train.evaluation import recipe_callbacks
from slimtune.train.loop import Trainer
from slimtune.train.merge import merge_to_folder
from slimtune.train.report import Reporter, SilentReporter
from slimtune.train.stages import (
    StageState,
    fingerprint,
    run_arithmetic_stage,
    run_eval_stage,
    run_merge_stage,
    stage_folder,
    tokens_per_source,
)
from slimtune.train.state import latest_checkpoint

SUMMARY = "stage_summary.json"


def _evaluate(trainer: Trainer, recipe: Recipe, base_dir: Path, label: str) -> dict[str, Any] | None:
    if recipe.eval is None:
        return None
    trainer.reporter.log(f"evaluating ({label})")
    result = evaluate_loaded(trainer.model, trainer.tokenizer, recipe.eval, base_dir=base_dir, label=label,
                             device=trainer.device, data=trainer.data, data_cfg=recipe.data)
    trainer.model.train()
    return result


def _merged_start(state: StageState, r: Recipe, out: Path, reporter: Reporter) -> Path:
    """The previous stage's model merged into ``out`` (kept: a re-run finds it), for a ``start_from: merged``."""
    if (out / "config.json").is_file():
        return out
    reporter.log(f"merging {state.adapter} into its base for start_from: merged → {out}")
    if is_main():
        merge_to_folder(state.model_config(r.model), Path(state.adapter), out, dtype=r.output.merged_dtype)
    barrier()
    return out


def run_recipe(
    recipe: Recipe, *, base_dir: Path, reporter: Reporter | None = None, resume: bool | Path = False,
    stop_after: int | None = None, callbacks: list[TrainerCallback] | None = None,
) -> dict[str, Any]:
    """Run every stage not yet done. Returns the run summary (also written to ``run_summary.json``).

    ``callbacks`` are given to the trainer of every training stage. A recipe with a ``loram`` block runs through
    ``slimtune.loram.pipeline.run_loram`` (which calls this for its training stages).
    """
    reporter = reporter or SilentReporter()
    if getattr(recipe, "loram", None) is not None:
        raise SlimtuneError("a recipe with a loram section runs through slimtune.loram.pipeline.run_loram")
    run_dir = recipe.run_dir()
    if is_main():  # torchrun: rank 0 alone writes under the run folder
        run_dir.mkdir(parents=True, exist_ok=True)
    stages = recipe.resolved_stages()
    summaries: list[dict[str, Any]] = []
    evals: dict[str, Any] = {}
    state: StageState | None = None  # the model so far (None: nothing ran yet)
    for i, (stage, r) in enumerate(stages):
        sdir = stage_folder(recipe, stage, run_dir, len(stages))
        nxt = stages[i + 1][0] if i + 1 < len(stages) else None
        needs_merged = nxt is not None and nxt.start_from == "merged" and nxt.kind != "merge"
        if needs_merged and not r.output.save_merged:
            r = r.model_copy(update={"output": r.output.model_copy(update={"save_merged": True})})
        init_adapter = frozen_adapter = None
        if state is not None and stage.kind == "train" and stage.start_from == "merged":
            if not state.merged and state.adapter:  # e.g. a shared stage done for a recipe that stacked on it
                state = StageState(model=state.model, adapter=state.adapter,
                                   merged=str(_merged_start(state, r, sdir / "start_merged", reporter)))
            if not state.merged:
                raise SlimtuneError(f"stages.{stage.name}: start_from merged, but no earlier stage wrote a merged "
                                    f"model (add a merge stage, or use start_from: adapter)")
            # the merged folder holds its own tokenizer: a tokenizer override or swap was applied when it was built
            r = r.model_copy(update={"model": r.model.model_copy(
                update={"name": state.merged, "tokenizer": None, "tokenizer_swap": None})})
        elif state is not None and stage.kind == "train" and stage.start_from == "adapter":
            if not state.adapter:
                raise SlimtuneError(f"stages.{stage.name}: start_from adapter, but the previous stage left none")
            r = r.model_copy(update={"model": state.model_config(r.model)})
            init_adapter = Path(state.adapter)
        elif state is not None and stage.kind == "train" and stage.start_from == "stacked":
            if not state.adapter:
                raise SlimtuneError(f"stages.{stage.name}: start_from stacked, but the previous stage left no adapter")
            if r.adapter.kind == "full":
                raise SlimtuneError(f"stages.{stage.name}: start_from stacked needs an adapter stage (adapter.kind "
                                    f"full trains the weights themselves: use start_from: merged)")
            kinds = {r.adapter.kind, json.loads((Path(state.adapter) / "slimtune_adapter.json").read_text())["kind"]}
            if "dora" in kinds and r.output.export_peft:
                raise SlimtuneError(f"stages.{stage.name}: a DoRA adapter stacked on another has no PEFT form: set "
                                    f"output.export_peft: false, or use start_from: merged")
            r = r.model_copy(update={"model": state.model_config(r.model)})
            frozen_adapter = Path(state.adapter)
        done = sdir / SUMMARY
        if stage.kind != "train" and not is_main():
            barrier()  # torchrun: rank 0 runs the stage (below) and writes its summary; this rank reads it
        if done.is_file():
            summary = json.loads(done.read_text())
            if summary.get("fingerprint") not in (None, fingerprint(stage, r)):
                reporter.warn(f"stage {stage.name}: {sdir} was done with other settings; kept as is (delete the "
                              f"folder to redo the stage)")
            reporter.log(f"stage {stage.name}: already done ({done}), skipped")
            summaries.append(summary)
            evals.update(summary.get("eval", {}))
            state = StageState.from_summary(summary, r, sdir)
            if stage.kind != "train" and is_main():
                barrier()
            continue
        if stage.kind != "train":
            sdir.mkdir(parents=True, exist_ok=True)
            reporter.log(f"stage {stage.name} ({i + 1}/{len(stages)}, {stage.kind})")
            cur = state or StageState()
            if stage.kind == "merge":
                summary, state = run_merge_stage(stage, r, cur, sdir, base_dir, reporter)
            elif stage.kind == "eval":
                summary, state = run_eval_stage(stage, r, recipe.model, cur, base_dir, reporter)
            else:
                summary, state = run_arithmetic_stage(stage, r, recipe.model, cur, sdir, base_dir, reporter)
            summary["fingerprint"] = fingerprint(stage, r)
            evals.update(summary["eval"])
            if evals:
                write_report(evals, run_dir)
            done.write_text(json.dumps(summary, indent=2, default=str))
            summaries.append(summary)
            barrier()  # torchrun: the other ranks read the summary now
            continue
        if not resume and latest_checkpoint(sdir / "checkpoints") is not None:  # never overwrite progress silently
            raise SlimtuneError(
                f"{sdir / 'checkpoints'} holds checkpoints of an unfinished run: continue it with --resume, or "
                f"start over with --restart (the old folder is moved aside)"
            )
        reporter.log(f"stage {stage.name} ({i + 1}/{len(stages)})")
        trainer = Trainer(r, run_dir=sdir, base_dir=base_dir, reporter=reporter, init_adapter=init_adapter,
                          frozen_adapter=frozen_adapter, stage=stage.name, callbacks=list(callbacks or []))
        # torchrun: rank 0 logs and evaluates; FSDP: every rank evaluates (a collective forward), rank 0 writes
        evaluates = is_main() or trainer.sharded
        trainer.callbacks += recipe_callbacks(r, writes=is_main()) if evaluates else []
        trainer.setup()
        resumed = False
        if resume:
            resumed = trainer.resume(None if resume is True else Path(resume))
        stage_evals: dict[str, Any] = {}
        before_file = sdir / "eval_before.json"  # kept so that a resumed stage still reports its "before"
        if not resumed and trainer.pos.step == 0 and evaluates:
            before = _evaluate(trainer, r, base_dir, f"before {stage.name}" if len(stages) > 1 else "before")
            if before is not None and is_main():
                stage_evals[before["label"]] = before
                sdir.mkdir(parents=True, exist_ok=True)
                before_file.write_text(json.dumps(before, indent=2, default=str))
        elif before_file.is_file():
            before = json.loads(before_file.read_text())
            stage_evals[before["label"]] = before
        summary = trainer.train(stop_after=stop_after)
        if summary["interrupted"]:
            summary["resume_hint"] = "slimtune run RECIPE --resume"
            if is_main():
                (run_dir / "run_summary.json").write_text(json.dumps({"stages": summaries + [summary]}, indent=2))
            trainer.cleanup()
            return {"stages": summaries + [summary], "interrupted": True, "run_dir": str(run_dir)}
        if not is_main():  # torchrun: rank 0 evaluates, saves the outputs and the stage summary; this rank reads them
            if trainer.sharded:  # FSDP: this rank takes part in the evaluation and in gathering the adapter
                _evaluate(trainer, r, base_dir, "")
                with trainer.full_weights():
                    pass
            trainer.cleanup()
            barrier()
            summary = json.loads(done.read_text())
            summaries.append(summary)
            state = StageState.from_summary(summary, r, sdir)
            continue
        after = _evaluate(trainer, r, base_dir, f"after {stage.name}" if len(stages) > 1 else "after")
        if after is not None:
            stage_evals[after["label"]] = after
        with trainer.full_weights():  # FSDP: the adapter gathered on every rank (a collective); else nothing
            summary["outputs"] = trainer.save_outputs()
        summary["eval"] = stage_evals
        summary["tokens_per_source"] = tokens_per_source(summary.get("data"))
        summary["fingerprint"] = fingerprint(stage, r)
        state = StageState(model=r.model.model_dump(mode="json"), adapter=summary["outputs"]["adapter_native"],
                           merged=summary["outputs"].get("merged"))
        summary["state"] = state.to_json()
        evals.update(stage_evals)
        if evals:
            write_report(evals, run_dir)
        done.write_text(json.dumps(summary, indent=2, default=str))
        summaries.append(summary)
        trainer.cleanup()
        barrier()  # torchrun: the other ranks read the stage summary now
    result = {"stages": summaries, "interrupted": False, "run_dir": str(run_dir)}
    if is_main():
        (run_dir / "run_summary.json").write_text(json.dumps(result, indent=2, default=str))
    return result
