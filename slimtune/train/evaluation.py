"""Evaluation during training (`train.eval_every`): validation loss and perplexity on the records that
`data.val_split` (= `data.holdout`) keeps out of training and the records of `data.eval_sources`, every N
optimizer steps and at the last step.

The numbers go to the progress display (a line above the bar), to `<run>/val_metrics.jsonl`, to the metric
loggers of `train.report_to`, and to the stage summary (`summary["val"]`). With `train.keep_best` the adapter of
the lowest validation loss is also exported (PEFT format, with the tokenizer) to `<run>/best_adapter`.

The loss is the mean next-token loss over all target tokens of the validation set (the same masking as
training: assistant tokens for chat/instruction), perplexity = exp(loss). Under a preference objective
(`train.objective` dpo, ipo, orpo, simpo, kto) the held-out pairs give the objective's mean loss, the preference
accuracy (the chosen reward above the rejected one) and the reward margin (slimtune.objectives.evaluate).
"""

from __future__ import annotations

import contextlib
import json
from types import SimpleNamespace
from typing import Any

from slimtune.adapters.export import export_peft
from slimtune.errors import SlimtuneError
from slimtune.eval.model_eval import heldout_loss
from slimtune.models.load import peft_base_name
from slimtune.objectives import build_objective
from slimtune.objectives.evaluate import evaluate_objective
from slimtune.train.callbacks import TrainerCallback
from slimtune.train.loggers import MetricLoggers

VAL_FILE = "val_metrics.jsonl"
BEST_DIR = "best_adapter"


class EvaluateDuringTraining(TrainerCallback):
    """Validation every `every` steps (see the module docstring); `loggers` receive val/loss and val/ppl."""

    def __init__(self, every: int, *, keep_best: bool = False, loggers: MetricLoggers | None = None,
                 writes: bool = True) -> None:
        self.every, self.keep_best, self.loggers, self.writes = every, keep_best, loggers, writes
        self.history: list[dict[str, Any]] = []
        self.best: dict[str, Any] | None = None

    def on_train_start(self, trainer) -> None:
        self.sft = trainer.recipe.train.objective == "sft"
        self.records = [h for h in trainer.data.holdout if not self.sft or h.get("input_ids") is not None]
        if not self.records:
            raise SlimtuneError("train.eval_every: no validation records; set data.val_split (a fraction such as "
                                "0.05, or a count) or data.eval_sources")
        path = trainer.run_dir / VAL_FILE
        rows = [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()] if path.is_file() else []
        rows = [r for r in rows if r.get("step", 0) <= trainer.pos.step]  # a resumed run keeps its earlier rows
        if self.writes:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        self.history = rows
        self.best = min(rows, key=lambda r: r["val_loss"]) if rows else None
        if not self.sft and trainer.pos.step == 0:  # preference: where the held-out accuracy starts (step 0)
            self.on_step_end(trainer, SimpleNamespace(step=0, loss=None))

    def on_step_end(self, trainer, result) -> None:
        if result.step % self.every and result.step != trainer.total_steps and result.step:
            return
        mb = trainer.recipe.train.micro_batch
        if self.sft:
            v = heldout_loss(trainer.model, self.records, pad_id=trainer.data.pad_id, batch_size=mb,
                             device=trainer.device)
            row = {"step": result.step, "val_loss": v["loss"], "val_ppl": v["ppl"], "val_tokens": v["tokens"],
                   "train_loss": result.loss}
        else:  # preference: the objective's loss, preference accuracy and reward margin on the held-out pairs
            v = (trainer.objective.evaluate(trainer.model, self.records, device=trainer.device)  # GRPO: rewards
                 if trainer.recipe.train.objective == "grpo" else
                 evaluate_objective(build_objective(trainer.recipe.train), trainer.model, self.records,
                                    pad_id=trainer.data.pad_id, batch_size=mb, device=trainer.device))
            row = {"step": result.step, "val_loss": v["loss"], "val_examples": v["examples"],
                   **{f"val_{k.replace('/', '_')}": x for k, x in v.items() if "/" in k or k == "kl"},
                   "train_loss": result.loss}
        self.history.append(row)
        improved = self.best is None or v["loss"] < self.best["val_loss"]
        if improved:
            self.best = row
        with trainer.full_weights() if improved and self.keep_best else contextlib.nullcontext():  # FSDP: gathered
            if self.writes:
                self._write(trainer, row, v, improved)

    def _write(self, trainer, row: dict[str, Any], v: dict[str, Any], improved: bool) -> None:
        """The row, the log line, the loggers and (``keep_best``, improved) the best adapter: rank 0's part."""
        result_step = row["step"]
        with open(trainer.run_dir / VAL_FILE, "a") as f:
            f.write(json.dumps(row) + "\n")
        what = (f"ppl {v['ppl']:.2f} ({v['tokens']} tokens)" if self.sft else
                f"mean reward {v['rewards/mean']:.4f}, pass@1 {v['rewards/pass@1']:.3f} ({v['examples']} prompts)"
                if "rewards/pass@1" in v else
                f"preference accuracy {v.get('rewards/accuracies', float('nan')):.3f}, reward margin "
                f"{v.get('rewards/margins', float('nan')):.4f} ({v['examples']} examples)")
        trainer.reporter.log(f"step {result_step}: val loss {v['loss']:.4f}, {what}"
                             f"{' (best)' if improved and self.keep_best else ''}")
        if self.loggers is not None:
            self.loggers.log({"val/loss": v["loss"], **({"val/ppl": v["ppl"]} if self.sft else
                             {f"val/{k}": x for k, x in v.items() if "/" in k})}, result_step)
        if improved and self.keep_best:
            out = trainer.run_dir / BEST_DIR
            export_peft(trainer.model, out, base_model_name_or_path=peft_base_name(trainer.recipe.model.name),
                        tokenizer=trainer.tokenizer, metadata={"base_model": trainer.recipe.model.name,
                                                               "step": result_step, "val_loss": v["loss"]})

    def on_train_end(self, trainer, summary) -> None:
        summary["val"] = {"last": self.history[-1] if self.history else None, "best": self.best,
                          "best_adapter": str(trainer.run_dir / BEST_DIR) if self.keep_best and self.best else None}


def recipe_callbacks(recipe, *, writes: bool = True) -> list[TrainerCallback]:
    """The callbacks a recipe's `train` section asks for: metric loggers, then evaluation during training.

    ``writes=False`` (an FSDP rank other than 0): the evaluation alone, which every rank of a sharded model runs
    together; no loggers, no files.
    """
    t = recipe.train
    loggers = MetricLoggers(t.report_to) if writes and [n for n in t.report_to if n != "jsonl"] else None
    out: list[TrainerCallback] = [loggers] if loggers is not None else []
    if t.eval_every:
        out.append(EvaluateDuringTraining(t.eval_every, keep_best=t.keep_best, loggers=loggers, writes=writes))
    return out
