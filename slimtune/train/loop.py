"""The one training loop: ``Trainer`` (setup / train / save / resume / cleanup) for one stage of a recipe.

Loss normalisation: an optimizer step sums the token losses of its ``grad_accum`` micro-batches and divides by the
number of target tokens of all of them, so 4 micro-batches of 1 give the same gradient as 1 micro-batch of 4.
The loss is computed from the decoder's last hidden state by the chunked linear cross-entropy (the (T, V) logits
never exist).
"""

from __future__ import annotations

import contextlib
import json
import math
import resource
import signal
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file

from slimtune.adapters.export import export_peft, load_native, save_native, stack_on
from slimtune.adapters.inject import adapters_of, inject
from slimtune.adapters.base import cast_trainable, init_from_data, regularization
from slimtune.adapters.full import select_trainable
from slimtune.config.recipe import Recipe
from slimtune.data.dataset import TrainData, build_dataset
from slimtune.data.preference import build_preference_dataset
from slimtune.data.prompts import build_prompt_dataset
from slimtune.errors import RecipeError, SlimtuneError
from slimtune.export.run import export_adapter_gguf
from slimtune.models.fused import fuse_model
from slimtune.models.embeddings import embeddings_to_host
from slimtune.models.load import (DTYPES, LoadedModel, QuantConfig, load_model, peft_base_name,
                                  quant_storage_dtype, resolve_device, resolve_dtype, set_quant_storage)
from slimtune.objectives import build_objective, check_format, prepare_reference
from slimtune.objectives.sft import causal_lm_loss_sum
from slimtune.ops.dispatch import dispatch_report, set_backend
from slimtune.ops.generation import weights_changed
from slimtune.train.callbacks import KernelChoices, TrainerCallback
from slimtune.train.checkpointing import enable_checkpointing
from slimtune.train.distributed import DistContext, checkpoint_ranks, current, rank_rng
from slimtune.train.fsdp import LocalShards, full_value
from slimtune.train.merge import CHAT_TEMPLATE_FILE, merge_to_folder, save_model_folder
from slimtune.train.oom import oom_guard
from slimtune.train.optim import build_optimizer, build_scheduler, drop_frozen
from slimtune.train.report import Reporter, SilentReporter, append_metrics, metric_rows, truncate_metrics
from slimtune.train.state import (
    COMPLETE,
    check_resume_compatible,
    latest_checkpoint,
    rng_state,
    seed_everything,
    set_rng_state,
    write_checkpoint,
)

WEIGHTS = "weights.safetensors"  # a checkpoint's trained parameters when trainable="model"


class NonFiniteLoss(SlimtuneError):
    """The loss or the gradients became NaN/inf (exit code 4)."""

    exit_code = 4


@dataclass
class Position:
    """Where training stands: optimizer steps done and the data position (epoch, micro-batches consumed)."""

    step: int = 0
    epoch: int = 0
    batch: int = 0


@dataclass
class StepResult:
    step: int
    loss: float
    lr: float
    tokens: int
    target_tokens: int
    seconds: float
    grad_norm: float
    skipped: bool = False
    metrics: dict[str, float] = field(default_factory=dict)  # the objective's (rewards, margins, accuracy)


def peak_memory_bytes(device: torch.device) -> int:
    """Peak allocated CUDA memory, or the process's peak RSS on CPU."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


@dataclass
class Trainer:
    """Trains one stage. ``model`` may be given (tests, chained stages); otherwise it is loaded from the recipe.

    ``callbacks``: ``TrainerCallback`` objects (slimtune.train.callbacks) called at the documented points of
    ``train`` and ``save_checkpoint``; append to ``trainer.callbacks`` or pass them here.

    ``trainable``: ``"adapter"`` (the default) injects the recipe's adapter (or loads ``init_adapter``) and trains
    it; ``"model"`` injects nothing and trains the parameters of the given ``loaded`` model that have
    ``requires_grad`` set (full fine-tuning, e.g. LoRAM's alignment with lm_head frozen): its checkpoints hold those
    parameters (``weights.safetensors``) instead of an adapter, the fused path (adapter-only) is not applied, and
    the caller saves the trained model (``save_outputs`` writes adapters only).

    ``frozen_adapter``: a saved adapter loaded and kept frozen, the recipe's adapter trained over it on the same
    modules (``start_from: stacked``; ``slimtune.adapters.export.stack_on``).

    ``data``: the training data, when the caller built it (the benchmark's random tokens); otherwise it is built
    from ``recipe.data``. ``loss_fn(model, batch)``: the summed token loss of a micro-batch (default: the chunked
    linear cross-entropy of ``causal_lm_loss_sum``; the benchmark's HF + PEFT baseline passes HF's own loss).
    ``handle_signals``: SIGINT/SIGTERM finish the step, checkpoint and stop (the benchmark turns it off).
    ``dist``: under torchrun, the data-parallel context (``slimtune.train.distributed``; default: the process
    group this process joined, None when alone): the data stream, the step's token counts and gradient sync, the
    checkpoint's RNG states and the rank-0-only writes go through it.
    """

    recipe: Recipe
    run_dir: Path
    base_dir: Path = Path(".")
    reporter: Reporter = field(default_factory=SilentReporter)
    loaded: LoadedModel | None = None
    init_adapter: Path | None = None
    frozen_adapter: Path | None = None
    stage: str = "main"
    callbacks: list[TrainerCallback] = field(default_factory=list)
    trainable: Literal["adapter", "model"] = "adapter"
    data: TrainData | None = None
    loss_fn: Callable[[nn.Module, dict[str, torch.Tensor]], torch.Tensor] = causal_lm_loss_sum
    handle_signals: bool = True
    dist: DistContext | None = field(default_factory=current)  # data-parallel seams (slimtune.train.distributed)

    def __post_init__(self) -> None:
        self.run_dir = Path(self.run_dir)
        self.pos = Position()
        self._stop_requested = False
        self._saved_step: int | None = None
        self.history: list[StepResult] = []

    # ------------------------------------------------------------------------------------------ setup
    def setup(self) -> None:
        r = self.recipe
        seed_everything(r.train.seed)
        if self.loaded is None:
            self.reporter.log(f"loading {r.model.name} (quant {r.quant.mode})")
            quant = r.quant
            if r.adapter.kind == "full" and quant.mode != "none":  # full fine-tuning trains a dense base
                self.reporter.log(f"adapter.kind full: the base is loaded dense (quant.mode {quant.mode} is for "
                                  f"adapter stages)")
                quant = quant.model_copy(update={"mode": "none"})
            self.loaded = self._load(quant)
            if "pre-quantized" in self.loaded.load_path:  # the checkpoint's 4-bit settings, not the recipe's quant
                self.reporter.log(f"{r.model.name}: {self.loaded.load_path.removeprefix('stream (')[:-1]}")
        self.model, self.tokenizer, self.device = self.loaded.model, self.loaded.tokenizer, self.loaded.device
        storage = quant_storage_dtype(r.quant, self.loaded.compute_dtype, sharded=self.sharded)
        if storage != torch.uint8:  # the same packed bytes, viewed as another dtype (FSDP: one all-gather dtype)
            n = set_quant_storage(self.model, storage)
            self.reporter.log(f"quant.quant_storage: {n} 4-bit weights stored as {str(storage).removeprefix('torch.')}")
        if r.adapter.kind == "full" and self.trainable == "adapter":  # full fine-tuning: the "model" path below
            try:
                select_trainable(self.model, r.adapter)
            except ValueError as e:
                raise RecipeError(str(e)) from None
            self.trainable = "model"
        if self.trainable == "model":
            self.adapters = {}
        elif adapters_of(self.model):
            self.adapters = adapters_of(self.model)
        elif self.init_adapter is not None:
            self.adapters = load_native(self.model, self.init_adapter)
        else:
            try:
                self.adapters = (inject(self.model, r.adapter) if self.frozen_adapter is None
                                 else stack_on(self.model, self.frozen_adapter, r.adapter))
            except (ValueError, KeyError) as e:  # a recipe that does not fit this model (targets, layers, rank)
                msg = str(e).strip("'\"")
                raise RecipeError(msg if msg.startswith("adapter") else f"adapter: {msg}") from None
        for a in self.adapters.values():
            facts = a.extra_adapter_config()
            if facts:
                self.reporter.log(f"{a.name}: {facts}")
        if r.train.adapter_dtype != "float32":  # fp32 master copies live in the optimizer (MasterWeights)
            cast_trainable(self.adapters, DTYPES[r.train.adapter_dtype])
        if r.train.embeddings_on == "cpu":
            embeddings_to_host(self.model)
        n_train = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
        n_total = sum(p.numel() for p in self.model.parameters())
        if n_train == 0:
            raise SlimtuneError(f"stage {self.stage}: nothing to train (no parameter requires a gradient)")
        what = "full fine-tuning" if self.trainable == "model" else f"{len(self.adapters)} {r.adapter.kind} adapters"
        self.reporter.log(f"{what}, {n_train:,} trainable parameters ({100 * n_train / max(n_total, 1):.2f}% of "
                          f"{n_total:,})")
        self.fuse_report = None
        if r.train.fused and self.trainable == "adapter":  # the fused ops train adapters on a frozen base
            set_backend(r.train.kernels)
            self.fuse_report = fuse_model(self.model, log=self.reporter.log)
            self.callbacks.append(KernelChoices())  # `auto` decides per op at first use: say what it chose
        if r.train.grad_checkpointing != "none":
            try:
                enable_checkpointing(self.model, r.train.grad_checkpointing)
            except ValueError as e:
                raise RecipeError(f"train.grad_checkpointing: {r.train.grad_checkpointing}: {e}") from None
        if self.data is None:
            check_format(r.train.objective, r.data.format)
            build = {"preference": build_preference_dataset, "kto": build_preference_dataset,
                     "prompt": build_prompt_dataset}.get(r.data.format, build_dataset)
            self.data = build(r.data, self.tokenizer, base_dir=self.base_dir, seed=r.train.seed)
        self.objective = build_objective(r.train, self.loss_fn)  # what a step optimises (slimtune.objectives)
        self.step_loss = self.objective.loss_sum  # what the step differentiates (DDP wraps it in its reducer)
        self.objective.setup(self)  # GRPO: tokenizer, end tokens, the prompts repeated over num_iterations
        prepare_reference(self.objective, r, self.model, self.data, self.run_dir, full_ft=self.trainable == "model",
                          log=self.reporter.log)  # train.preference.precompute_reference
        if len(self.data) == 0:
            raise SlimtuneError("data: no training examples after tokenization (check the sources and format)")
        init_from_data(self.adapters, self.model, self.data.batches(self._global_micro_batch, epoch=0), lambda m, b:
                       self.objective.loss_sum(m, {k: v.to(self.device) for k, v in b.items()}), r.train.lr)  # LoRA-SB
        self.batches_per_epoch = self.data.num_batches(self._global_micro_batch)  # global micro-batches
        self.total_steps = r.train.steps or max(
            1, math.ceil(r.train.epochs * self.batches_per_epoch / r.train.grad_accum)
        )
        if self.dist is not None:  # torchrun: one set of trainable values; fsdp: the model sharded (before the optimizer)
            self.dist.prepare(self)
        params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = (LocalShards(params, lambda local: build_optimizer(local, r.train)) if self.sharded
                          else build_optimizer(params, r.train))  # FSDP: the recipe's optimizer on each shard
        self.scheduler = build_scheduler(self.optimizer, r.train, self.total_steps)
        self.reporter.log(
            f"{len(self.data)} examples, {self.batches_per_epoch} micro-batches/epoch, {self.total_steps} steps"
        )
        if self.dist is not None:  # torchrun: the reducer over the trainable parameters (slimtune.train.distributed)
            self.dist.setup(self)

    def _load(self, quant: QuantConfig) -> LoadedModel:
        """The base on ``train.device``; FSDP on CUDA: in host memory (compute dtype of the GPU), each layer moving to
        the GPU as it is sharded, so a base that does not fit one card is never on one whole."""
        r = self.recipe
        target = resolve_device(r.train.device)
        if not (self.sharded and target.type == "cuda"):
            return load_model(r.model, quant, device=target)
        dtype = str(resolve_dtype(quant.compute_dtype, target)).removeprefix("torch.")
        loaded = load_model(r.model, quant.model_copy(update={"compute_dtype": dtype}), device="cpu")
        loaded.device = torch.device("cuda", torch.cuda.current_device())  # where shard_model puts it
        return loaded

    @property
    def _global_micro_batch(self) -> int:
        """Examples per micro-step over all ranks (``micro_batch`` when running alone)."""
        return self.recipe.train.micro_batch * (1 if self.dist is None else self.dist.world)

    @property
    def sharded(self) -> bool:
        """``train.distributed: fsdp`` under torchrun: the model is sharded; its forward is a collective."""
        return self.dist is not None and self.recipe.train.distributed == "fsdp"

    def full_weights(self, *, write_back: bool = False) -> contextlib.AbstractContextManager:
        """Inside, the adapter is whole in the model on every rank (FSDP: gathered, a collective that every rank
        enters; otherwise nothing happens). ``write_back``: what is loaded into it then goes back to the shards."""
        return self.dist.full_weights(write_back=write_back) if self.dist is not None else contextlib.nullcontext()

    @property
    def _writes(self) -> bool:
        """Whether this process writes files (rank 0 of a torchrun job, or the only process)."""
        return self.dist is None or self.dist.is_main

    # ------------------------------------------------------------------------------------------ resume
    @property
    def ckpt_root(self) -> Path:
        return self.run_dir / "checkpoints"

    def resume(self, path: Path | None = None) -> bool:
        """Restore the latest (or the given) checkpoint. Returns False when there is none to resume."""
        if path is not None and (Path(path) / "checkpoints").is_dir():  # a run folder: its latest checkpoint
            path = latest_checkpoint(Path(path) / "checkpoints", warn=self.reporter.warn) or path
        ckpt = Path(path) if path is not None else latest_checkpoint(self.ckpt_root, warn=self.reporter.warn)
        if ckpt is None:
            return False
        if not (ckpt / "trainer.pt").is_file():
            raise SlimtuneError(f"--resume {ckpt}: not a slimtune checkpoint (no trainer.pt)")
        if not (ckpt / COMPLETE).is_file():
            raise SlimtuneError(f"--resume {ckpt}: a half-written checkpoint (no {COMPLETE} marker); use an older one")
        try:
            saved_recipe = json.loads((ckpt / "recipe.json").read_text())
        except (OSError, ValueError) as e:
            raise SlimtuneError(f"--resume {ckpt}: unreadable recipe.json ({e})") from None
        check_resume_compatible(saved_recipe, self.recipe.model_dump(mode="json"), where=str(ckpt))
        try:
            with self.full_weights(write_back=True):  # FSDP: every rank reads the whole adapter, keeps its shard
                self._load_weights(ckpt)
            state = torch.load(ckpt / "trainer.pt", map_location="cpu", weights_only=False)
        except Exception as e:  # a damaged file: one line naming it, not a traceback
            raise SlimtuneError(f"--resume {ckpt}: cannot read the checkpoint ({type(e).__name__}: {e})") from None
        if state.get("stage", self.stage) != self.stage:
            raise SlimtuneError(f"--resume {ckpt}: a checkpoint of stage {state['stage']!r}, but the stage to run is "
                                f"{self.stage!r}")
        for a in self.adapters.values():
            a.on_step(state["step"], self.total_steps)
        if any(not p.requires_grad for g in self.optimizer.param_groups for p in g["params"]):
            drop_frozen(self.optimizer)
        if self.dist is not None:
            self.dist.load_optimizer_state(self.optimizer, state["optimizer"])  # FSDP: this rank's shard of it
        else:
            self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        set_rng_state(rank_rng(state, self.dist, where=str(ckpt)))  # this rank's RNG
        self.objective.load_state_dict(state.get("objective") or {})  # GRPO: rollouts reused by the next steps
        self.pos = Position(**state["position"])
        weights_changed()  # the loaded adapter (FSDP: written into the shards, unseen by version counters)
        self._truncate_metrics(self.pos.step)
        self.reporter.log(f"resumed from {ckpt} at step {self.pos.step}")
        return True

    # ------------------------------------------------------------------------------------------ train
    def request_stop(self, *_: Any) -> None:
        """Finish the current step, checkpoint and return (SIGINT / SIGTERM)."""
        self._stop_requested = True

    def _micro_batches(self):
        """Endless micro-batch stream from the current data position (advancing epochs)."""
        mb = self.recipe.train.micro_batch
        while True:
            for batch in self.data.batches(self._global_micro_batch, epoch=self.pos.epoch, start=self.pos.batch):
                self.pos.batch += 1
                yield batch if self.dist is None else self.dist.shard(batch, mb)  # this rank's rows
            self.pos.epoch += 1
            self.pos.batch = 0

    @contextlib.contextmanager
    def _phase(self, name: str) -> Iterator[None]:
        """The callbacks' ``phase`` context managers around one phase of a step (none registered: nothing)."""
        with contextlib.ExitStack() as stack:
            for cb in self.callbacks:
                cm = cb.phase(self, name)
                if cm is not None:
                    stack.enter_context(cm)
            yield

    def step(self, micro: list[dict[str, torch.Tensor]]) -> StepResult:
        """One optimizer step over the micro-batches ``micro`` (``train`` gives it ``grad_accum`` of the data's;
        the benchmark also calls it on batches of its own). Non-finite loss or gradient: ``train.on_nonfinite``."""
        t0 = time.perf_counter()
        if self.objective.generates:  # GRPO: sample and score completions (the cache freed before backward)
            with self._phase("generate"):
                micro = self.objective.prepare(self, micro)
        n_target = sum(self.objective.count(b) for b in micro)  # tokens (SFT), pairs or examples
        n_tokens = sum(int(b["attention_mask"].sum()) for b in micro)
        if self.dist is not None:  # the global step's counts: every rank normalises by the same target tokens
            units, (n_target, n_tokens) = n_target, self.dist.global_counts(micro)
            if self.objective.name != "sft":  # pairs / examples over all ranks
                n_target = int(self.dist.all_sum(torch.tensor(float(units))))
        total = torch.zeros((), device=self.device)  # summed on the device: one host sync per step, not per micro
        for i, b in enumerate(micro):
            b = {k: v.to(self.device) for k, v in b.items()}
            sync = self.dist.grad_sync(last=i == len(micro) - 1) if self.dist is not None else contextlib.nullcontext()
            with sync:  # torchrun: no_sync on accumulation micro-steps, one gradient all-reduce per step
                with self._phase("forward"):
                    loss_sum = self.step_loss(self.model, b)
                    for cb in self.callbacks:
                        new = cb.on_micro_batch_loss(self, i, loss_sum)
                        loss_sum = loss_sum if new is None else new
                with self._phase("backward"):
                    reg = regularization(self.adapters) if i == 0 else None  # the kind's extra loss (KaSA), once a step
                    (loss_sum / max(n_target, 1) + (0 if reg is None else reg)).backward()
            total += loss_sum.detach()
        if self.dist is not None:
            total = self.dist.all_sum(total)  # the global loss: the same on every rank (and in the log)
        with self._phase("optimizer"):
            loss, lr, gnorm, skipped = self._optimizer_step(total, n_target)
        return StepResult(self.pos.step, loss, lr, n_tokens, n_target, time.perf_counter() - t0, gnorm, skipped,
                          self.objective.pop_metrics())

    def _optimizer_step(self, total: torch.Tensor, n_target: int) -> tuple[float, float, float, bool]:
        """Clip, check for non-finite values, step the optimizer and the schedule. Returns (loss, lr, gnorm,
        skipped)."""
        r = self.recipe.train
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        if r.max_grad_norm > 0:
            gnorm = float(full_value(torch.nn.utils.clip_grad_norm_(params, r.max_grad_norm)))  # FSDP: global norm
        else:
            grads = [full_value(p.grad.float().norm()) for p in params if p.grad is not None]
            gnorm = float(torch.linalg.vector_norm(torch.stack(grads))) if grads else 0.0
        loss = float(total) / max(n_target, 1)
        lr = self.optimizer.param_groups[0]["lr"] if self.optimizer.param_groups else 0.0
        skipped = False
        if not (math.isfinite(loss) and math.isfinite(gnorm)):
            if r.on_nonfinite == "stop":
                self.optimizer.zero_grad(set_to_none=True)
                last = latest_checkpoint(self.ckpt_root)
                kept = (f"the last good checkpoint is {last} (continue with --resume)" if last is not None
                        else "no checkpoint was saved yet (set train.save_every)")
                raise NonFiniteLoss(
                    f"non-finite {'loss' if not math.isfinite(loss) else 'gradient'} at step {self.pos.step + 1}; "
                    f"stopped, {kept}; set train.on_nonfinite: skip to skip such steps (or lower train.lr in a new run)"
                )
            skipped = True
        else:
            self.optimizer.step()
            weights_changed()  # DoRA's cached norm: 8-bit AdamW, FSDP write without version bumps (ops.generation)
        with warnings.catch_warnings():  # a skipped first step makes torch warn that the scheduler ran first
            warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler.step\(\)`")
            self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.pos.step += 1
        for a in self.adapters.values():
            a.on_step(self.pos.step, self.total_steps)
        if any(not p.requires_grad for p in params):
            drop_frozen(self.optimizer)
        return loss, lr, gnorm, skipped

    def train(self, *, stop_after: int | None = None) -> dict[str, Any]:
        """Run until ``total_steps`` (or ``stop_after`` steps in this call, or a stop request). Returns the summary."""
        r = self.recipe.train
        self.model.train()
        stream = self._micro_batches()
        start_step, t_start = self.pos.step, time.perf_counter()
        old = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
        in_main = self.handle_signals and _in_main_thread()
        if in_main:
            for s in old:
                signal.signal(s, self.request_stop)
        interrupted = False
        self._truncate_metrics(self.pos.step)  # rows past the restored position belong to a lost (killed) run
        self.reporter.start(total=self.total_steps, done=self.pos.step)
        for cb in self.callbacks:
            cb.on_train_start(self)
        try:
            while self.pos.step < self.total_steps:
                with oom_guard(self.pos.step + 1, self.device, hints=self._oom_hints):
                    for cb in self.callbacks:
                        cb.on_step_start(self, self.pos.step + 1)
                    res = self.step([next(stream) for _ in range(r.grad_accum)])
                self.history.append(res)
                self._log_metrics(res)
                self.reporter.step(res, peak_memory_bytes(self.device))
                for cb in self.callbacks:
                    cb.on_step_end(self, res)
                done_here = self.pos.step - start_step
                if r.save_every and self.pos.step % r.save_every == 0 and self.pos.step < self.total_steps:
                    self.save_checkpoint()
                if self._stop_requested or (stop_after is not None and done_here >= stop_after):
                    interrupted = self.pos.step < self.total_steps
                    break
        finally:
            self.reporter.stop()
            if in_main:
                for s, h in old.items():
                    signal.signal(s, h)
        if interrupted and self._saved_step != self.pos.step:
            self.save_checkpoint()
        wall = time.perf_counter() - t_start
        steps_run = self.pos.step - start_step
        toks = sum(h.tokens for h in self.history[-steps_run:]) if steps_run else 0
        summary = {
            "stage": self.stage,
            "steps": self.pos.step,
            "total_steps": self.total_steps,
            "interrupted": interrupted,
            "final_loss": self.history[-1].loss if self.history else None,
            "first_loss": self.history[0].loss if self.history else None,
            "wall_seconds": round(wall, 2),
            "tokens_per_second": round(toks / wall, 1) if wall > 0 else None,
            "peak_memory_bytes": peak_memory_bytes(self.device),
            "device": str(self.device),
            "data": self.data.stats,
            "skipped_steps": [row["step"] for row in metric_rows(self.metrics_path) if row.get("skipped")],
            "fused": self.fuse_report.lines() if self.fuse_report is not None else None,
            "kernels": dispatch_report() if self.fuse_report is not None else None,
        }
        for cb in self.callbacks:
            cb.on_train_end(self, summary)
        return summary

    def _oom_hints(self, error: BaseException) -> list[str]:
        return [h for cb in self.callbacks if (h := cb.on_oom(self, error))]

    # ------------------------------------------------------------------------------------------ save
    @property
    def metrics_path(self) -> Path:
        return self.run_dir / "metrics.jsonl"

    def _log_metrics(self, res: StepResult) -> None:
        if self._writes:
            append_metrics(self.metrics_path, {
                "step": res.step, "loss": res.loss, "lr": res.lr, "tokens": res.tokens, "grad_norm": res.grad_norm,
                "seconds": round(res.seconds, 4), "skipped": res.skipped, **res.metrics})

    def _truncate_metrics(self, step: int) -> None:
        if self._writes:
            truncate_metrics(self.metrics_path, step)

    def save_checkpoint(self) -> Path:
        ranks = checkpoint_ranks(self.dist)  # world size and every rank's RNG (torchrun: a collective, all ranks)
        optimizer = self.optimizer.state_dict() if self.dist is None else self.dist.optimizer_state(self.optimizer)
        with self.full_weights():  # FSDP: the adapter whole on every rank (a collective), written by rank 0
            if not self._writes:  # rank 0 writes the checkpoint
                self._saved_step = self.pos.step
                return self.ckpt_root / f"step-{self.pos.step:08d}"
            return self._write_checkpoint(ranks, optimizer)

    def _write_checkpoint(self, ranks: dict[str, Any], optimizer: dict[str, Any]) -> Path:
        """Rank 0 (or the only process): the checkpoint folder, written whole or not at all."""

        def writer(tmp: Path) -> None:
            self._save_weights(tmp)
            for cb in self.callbacks:
                cb.on_checkpoint_write(self, tmp)
            torch.save(
                {
                    "step": self.pos.step,
                    "position": vars(self.pos).copy(),
                    "optimizer": optimizer,
                    "scheduler": self.scheduler.state_dict(),
                    "rng": rng_state(),
                    "objective": self.objective.state_dict(),
                    **ranks,
                    "stage": self.stage,
                },
                tmp / "trainer.pt",
            )
            (tmp / "recipe.json").write_text(json.dumps(self.recipe.model_dump(mode="json"), indent=2))

        path = write_checkpoint(self.ckpt_root, self.pos.step, writer, keep=self.recipe.train.keep_checkpoints)
        self._saved_step = self.pos.step
        self.reporter.log(f"checkpoint {path}")
        for cb in self.callbacks:
            cb.on_checkpoint(self, path)
        return path

    def _trained_tensors(self) -> dict[str, torch.Tensor]:
        return {n: p.detach().to("cpu").contiguous() for n, p in self.model.named_parameters() if p.requires_grad}

    def _save_weights(self, folder: Path) -> None:
        """What a checkpoint holds of the model: the adapter, or (trainable="model") the trained parameters."""
        if self.trainable == "model":
            save_file(self._trained_tensors(), str(folder / WEIGHTS))
        else:
            save_native(self.model, folder / "adapter", extra={"base_model": self.recipe.model.name})

    def _load_weights(self, ckpt: Path) -> None:
        if self.trainable == "adapter":
            load_native(self.model, ckpt / "adapter")
            return
        saved = load_file(str(ckpt / WEIGHTS))
        params = dict(self.model.named_parameters())
        if set(saved) != set(self._trained_tensors()):
            raise SlimtuneError(f"--resume {ckpt}: {WEIGHTS} holds other parameters than the model trains")
        with torch.no_grad():
            for name, t in saved.items():
                params[name].copy_(t)

    def save_outputs(self) -> dict[str, str]:
        """Native adapter, PEFT adapter and (optionally) the merged model, as the recipe's output asks."""
        out: dict[str, str] = {}
        if self.recipe.adapter.kind == "full":  # a full run's output is the model itself, as a transformers folder
            return {"adapter_native": None, "merged": str(save_model_folder(  # type: ignore[dict-item]
                self.model, self.tokenizer, self.run_dir / "merged", dtype=self.recipe.output.merged_dtype))}
        out["adapter_native"] = str(save_native(self.model, self.run_dir / "adapter_native",
                                                extra={"base_model": self.recipe.model.name}))
        template = getattr(self.tokenizer, "chat_template", None)
        if isinstance(template, str) and self.recipe.data is not None and self.recipe.data.chat_template:
            (self.run_dir / "adapter_native" / CHAT_TEMPLATE_FILE).write_text(template, encoding="utf-8")
        if self.recipe.output.export_peft:  # a base PEFT loads by name; the pkg:/local spec stays in slimtune.json
            out["adapter"] = str(export_peft(
                self.model, self.run_dir / "adapter", base_model_name_or_path=peft_base_name(self.recipe.model.name),
                tokenizer=self.tokenizer, metadata={"base_model": self.recipe.model.name,
                                                    "chat_template": self.recipe.data.chat_template
                                                    if self.recipe.data is not None else None}))
        if self.recipe.output.save_merged:
            out["merged"] = str(merge_to_folder(self.recipe.model, self.run_dir / "adapter_native",
                                                self.run_dir / "merged", dtype=self.recipe.output.merged_dtype))
        gguf = self.recipe.output.gguf
        if gguf is not None and "adapter" in out:  # llama.cpp / Ollama files, from the PEFT export just written
            files = export_adapter_gguf(Path(out["adapter"]), self.recipe.model.name, self.run_dir / "gguf",
                                        name=self.run_dir.name, quant=gguf.quant, lora=gguf.lora, onto=gguf.onto)
            out.update({k: str(v) for k, v in (("gguf", files.gguf and files.gguf.path), ("gguf_lora", files.lora),
                                                ("modelfile", files.modelfile)) if v is not None})
        return out

    def cleanup(self) -> None:
        self.model = None  # type: ignore[assignment]
        self.loaded = None
        self.optimizer = None  # type: ignore[assignment]
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def _in_main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()  # signal handlers can only be set there
