"""Metric loggers (`train.report_to`): TensorBoard, Weights & Biases, MLflow, through their own libraries.

`metrics.jsonl` (every optimizer step) and `val_metrics.jsonl` (every evaluation) are always written by the
trainer and `slimtune.train.evaluation`; `jsonl` in `report_to` names them and adds nothing. The others are a
`TrainerCallback` (`MetricLoggers`) that sends the same numbers to each library:

- tensorboard: event files under `<run>/tensorboard` (`torch.utils.tensorboard`; pip install 'slimtune[tensorboard]')
- wandb: a run named after the recipe, config = the resolved recipe (WANDB_MODE=offline writes `<run>/wandb`;
  pip install 'slimtune[wandb]')
- mlflow: a run in the experiment `slimtune`, tracking URI $MLFLOW_TRACKING_URI or
  `sqlite:///<run>/mlflow.db` (`<run>/mlruns` with mlflow-skinny)
  (pip install 'slimtune[mlflow]')

Scalars are `train/loss`, `train/lr`, `train/grad_norm`, `train/tokens_per_second`, `val/loss`, `val/ppl`,
indexed by the optimizer step. A missing library is a one-line error before training starts.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from slimtune.errors import SlimtuneError
from slimtune.train.callbacks import TrainerCallback

EXTRAS = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow"}


def _missing(name: str, module: str) -> SlimtuneError:
    return SlimtuneError(f"train.report_to: {name} needs the `{module}` package: pip install "
                         f"'slimtune[{EXTRAS[name]}]' (or remove {name} from train.report_to)")


class _TensorBoard:
    def __init__(self, run_dir: Path, recipe: Any) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise _missing("tensorboard", "tensorboard") from None
        self.writer = SummaryWriter(log_dir=str(run_dir / "tensorboard"))
        self.writer.add_text("recipe", f"```\n{recipe.model_dump_json(indent=2)}\n```", 0)

    def log(self, metrics: dict[str, float], step: int) -> None:
        for k, v in metrics.items():
            self.writer.add_scalar(k, v, step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class _Wandb:
    def __init__(self, run_dir: Path, recipe: Any) -> None:
        try:
            import wandb
        except ImportError:
            raise _missing("wandb", "wandb") from None
        self.wandb = wandb
        try:
            self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "slimtune"), name=recipe.name or None,
                                  dir=str(run_dir), config=recipe.model_dump(mode="json"), reinit="finish_previous")
        except Exception as e:  # not logged in, no network: one line with the way out
            raise SlimtuneError(f"train.report_to: wandb could not start ({type(e).__name__}: {e}); log in with "
                                "`wandb login`, or set WANDB_MODE=offline") from None

    def log(self, metrics: dict[str, float], step: int) -> None:
        self.run.log(metrics, step=step)

    def close(self) -> None:
        self.run.finish()


class _Mlflow:
    def __init__(self, run_dir: Path, recipe: Any) -> None:
        try:
            import mlflow
        except ImportError:
            raise _missing("mlflow", "mlflow") from None
        self.mlflow = mlflow
        if not os.environ.get("MLFLOW_TRACKING_URI"):
            mlflow.set_tracking_uri(default_mlflow_uri(run_dir))
        mlflow.set_experiment(os.environ.get("MLFLOW_EXPERIMENT_NAME", "slimtune"))
        self.run = mlflow.start_run(run_name=recipe.name or None)
        flat = {f"{sec}.{k}": v for sec, body in recipe.model_dump(mode="json").items() if isinstance(body, dict)
                for k, v in body.items() if not isinstance(v, (dict, list))}
        mlflow.log_params({k: str(v)[:250] for k, v in list(flat.items())[:100]})

    def log(self, metrics: dict[str, float], step: int) -> None:
        self.mlflow.log_metrics(metrics, step=step)

    def close(self) -> None:
        self.mlflow.end_run()


def default_mlflow_uri(run_dir: Path) -> str:
    """SQLite under the run (MLflow 3's default store); mlflow-skinny has no SQL store: a file store, opted in."""
    import importlib.util

    if importlib.util.find_spec("sqlalchemy") is not None:
        return f"sqlite:///{(run_dir / 'mlflow.db').resolve()}"
    os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 keeps file stores behind this opt-in
    return (run_dir / "mlruns").resolve().as_uri()


BACKENDS = {"tensorboard": _TensorBoard, "wandb": _Wandb, "mlflow": _Mlflow}


class MetricLoggers(TrainerCallback):
    """Send step and validation metrics to the libraries of `train.report_to` (opened at train start)."""

    def __init__(self, names: list[str]) -> None:
        self.names = [n for n in dict.fromkeys(names) if n != "jsonl"]
        self.backends: list[Any] = []

    def open(self, run_dir: Path, recipe: Any) -> None:
        """Start every backend (raises a one-line SlimtuneError for a missing library)."""
        run_dir.mkdir(parents=True, exist_ok=True)
        for n in self.names:
            self.backends.append(BACKENDS[n](run_dir, recipe))

    def log(self, metrics: dict[str, float], step: int) -> None:
        for b in self.backends:
            b.log(metrics, step)

    def on_train_start(self, trainer) -> None:
        if not self.backends:
            self.open(trainer.run_dir, trainer.recipe)

    def on_step_end(self, trainer, result) -> None:
        if result.step % trainer.recipe.train.log_every and result.step != trainer.total_steps:
            return
        m = {"train/loss": result.loss, "train/lr": result.lr, "train/grad_norm": result.grad_norm,
             **{f"train/{k}": v for k, v in getattr(result, "metrics", {}).items()}}  # preference: rewards, margins
        if result.seconds > 0:
            m["train/tokens_per_second"] = result.tokens / result.seconds
        self.log({k: float(v) for k, v in m.items() if v == v}, result.step)  # NaN (a skipped step) is left out

    def on_train_end(self, trainer, summary) -> None:
        for b in self.backends:
            b.close()
        self.backends = []


def check_available(names: list[str]) -> None:
    """Fail fast (before a model loads) when a logger's library is not installed."""
    import importlib.util

    for n in names:
        module = EXTRAS.get(n)
        if module and importlib.util.find_spec(module) is None:
            raise _missing(n, module)
