"""Data-parallel training on torch.distributed: DDP over the adapter parameters, one process per GPU.

Launch with torchrun (``torchrun --nproc-per-node N -m slimtune run RECIPE``, or ``slimtune run RECIPE --nproc N``,
which execs it). What changes against one process:

- **Batch.** The global micro-batch is ``micro_batch × world_size`` examples of the data's order; rank r trains rows
  ``[r·micro_batch, (r+1)·micro_batch)`` of it, padded to the global micro-batch's longest row (so a 2-rank run
  sees the very tensors of a 1-rank run with ``micro_batch × 2``). The optimizer step is over
  ``micro_batch × grad_accum × world_size`` examples. The data position (epoch, global micro-batches consumed) is
  the same number on every rank; each rank's rows follow from it and its rank.
- **Uneven last batch: padded.** The last global micro-batch of an epoch may hold fewer rows than
  ``micro_batch × world_size``: the ranks past its end get a one-row stand-in batch whose labels are all -100 (no
  target token, so no loss and a zero gradient; its tokens are not counted). Nothing is dropped, and the run stays
  equal to a 1-rank run of the same global batch.
- **Loss.** Every rank divides its summed token loss by the target tokens of the *global* step (one all-reduce of
  two int64 counts per step); the reducer *sums* the gradients (a comm hook: no division by the world size), so
  the gradient is exactly the 1-process one.
- **Reducer.** ``DistributedDataParallel`` wraps the loss computation (model + loss function) with every frozen
  parameter and every buffer ignored: only the trainable (adapter) parameters are in its buckets. Gradients are
  all-reduced once per optimizer step: the accumulation micro-steps run under ``no_sync``. The trainable
  parameters are broadcast from rank 0 once at set-up (the 4-bit base is loaded by each rank and never sent).
- **Files.** Rank 0 alone writes metrics, checkpoints, outputs and summaries, and alone evaluates, merges,
  prunes and recovers (multi-stage recipes, LoRAM); the others wait at a barrier where they need what rank 0
  wrote (a stage summary, the pruned or aligned model), so the run folder must be shared by every rank (one node:
  always). A checkpoint holds every rank's RNG state (gathered to rank 0) and the world size; a resume with
  another world size is refused (the batch would change), and ranks that start from different positions stop.
- **Stops.** SIGINT/SIGTERM (torchrun forwards them) is agreed on after every step (one tiny all-reduce), so all
  ranks stop after the same step and rank 0 saves one checkpoint.
- **Failures.** A collective waits at most ``SLIMTUNE_DIST_TIMEOUT`` seconds (default 1800) for a peer; when a
  rank dies, torchrun stops the others, and ``--resume`` continues from the last complete checkpoint. A failed
  collective is one error line (exit code 5), not a traceback.
- **Backends.** NCCL on CUDA (each rank on ``cuda:LOCAL_RANK``), gloo on the CPU.
- **Sharded** (``train.distributed: fsdp``): the same batch, loss, stop and file rules, with FSDP2 instead of the
  DDP reducer: the base and the adapters are sharded over the ranks (``slimtune.train.fsdp``). Evaluation is the
  exception to "rank 0 alone": a sharded forward is a collective, so every rank evaluates and rank 0 writes.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel

from slimtune.adapters.base import Adapter
from slimtune.data.dataset import count_target_tokens
from slimtune.errors import SlimtuneError
from slimtune.train import fsdp
from slimtune.train.callbacks import TrainerCallback
from slimtune.train.state import rng_state

if TYPE_CHECKING:  # typing only: the loop imports this module
    from slimtune.train.loop import StepResult, Trainer

TIMEOUT_ENV = "SLIMTUNE_DIST_TIMEOUT"
DEFAULT_TIMEOUT_S = 1800.0  # long enough for rank 0's evaluation or merge while the others wait at a barrier


class DistributedError(SlimtuneError):
    """A collective failed: a peer process died, or did not answer within the timeout (exit code 5)."""

    exit_code = 5


class _PadBatch(dict):
    """The stand-in micro-batch of a rank past the end of an uneven last global batch (labels all -100)."""


def _sum_hook(process_group, bucket):  # no annotations: DDP checks them against the class, not a string
    """DDP comm hook: all-reduce a gradient bucket (a ``dist.GradBucket``) as a plain sum (DDP's default divides
    by the world size; the loss here is already normalised by the global target-token count)."""
    work = dist.all_reduce(bucket.buffer(), group=process_group, async_op=True)
    return work.get_future().then(lambda fut: fut.value()[0])


class _LossModule(nn.Module):
    """``loss_fn(model, batch)`` as a module, so DDP's forward sees the whole loss (the chunked linear CE calls the
    decoder and the head itself, never ``model.forward``)."""

    def __init__(self, model: nn.Module, loss_fn: Callable[[nn.Module, dict[str, torch.Tensor]], torch.Tensor]):
        super().__init__()
        self.model = model
        self.loss_fn = loss_fn

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.loss_fn(self.model, batch)


@dataclass
class DistContext:
    """This process's place in the process group, and the data-parallel pieces the ``Trainer`` calls."""

    rank: int
    world: int
    local_rank: int
    backend: str
    mode: str = "ddp"  # train.distributed of the stage being trained: "ddp" | "fsdp"
    ddp: DistributedDataParallel | None = None
    _loss_fn: Any = field(default=None, repr=False)
    _model: nn.Module | None = field(default=None, repr=False)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def sharded(self) -> bool:
        """FSDP: the model is sharded over the ranks, so every forward (evaluation too) is a collective."""
        return self.mode == "fsdp"

    @property
    def comm_device(self) -> torch.device:
        return torch.device("cuda", torch.cuda.current_device()) if self.backend == "nccl" else torch.device("cpu")

    # ---------------------------------------------------------------------------------- collectives
    def barrier(self) -> None:
        dist.barrier()

    def all_sum(self, t: torch.Tensor) -> torch.Tensor:
        """The sum over ranks of ``t`` (a new tensor on ``t``'s device)."""
        out = t.detach().to(self.comm_device, copy=True)
        dist.all_reduce(out)
        return out.to(t.device)

    def any(self, flag: bool) -> bool:
        t = torch.tensor([int(flag)], dtype=torch.int64, device=self.comm_device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item())

    # ---------------------------------------------------------------------------------- data
    def shard(self, batch: dict[str, torch.Tensor], micro_batch: int) -> dict[str, torch.Tensor]:
        """This rank's rows of a global micro-batch (``micro_batch × world`` rows, fewer at an epoch's end)."""
        lo = self.rank * micro_batch
        n = batch["input_ids"].shape[0]
        if lo >= n:  # past the end of an uneven last batch: one row without targets (zero loss, zero gradient)
            pad = _PadBatch({k: v[:1].clone() for k, v in batch.items()})
            pad["labels"].fill_(-100)
            return pad
        return {k: v[lo:lo + micro_batch] for k, v in batch.items()}

    def global_counts(self, micro: list[dict[str, torch.Tensor]]) -> tuple[int, int]:
        """(target tokens, tokens) of the global optimizer step: this rank's micro-batches summed over ranks."""
        real = [b for b in micro if not isinstance(b, _PadBatch)]
        local = [sum(count_target_tokens(b) for b in real), sum(int(b["attention_mask"].sum()) for b in real)]
        t = torch.tensor(local, dtype=torch.int64, device=self.comm_device)
        dist.all_reduce(t)
        return int(t[0]), int(t[1])

    def grad_sync(self, last: bool) -> contextlib.AbstractContextManager:
        """Around a micro-batch's forward and backward: ``no_sync`` unless it is the step's last micro-batch."""
        if self.sharded:
            fsdp.set_gradient_sync(self._model, last)
            return contextlib.nullcontext()
        if self.ddp is None or last:
            return contextlib.nullcontext()
        return self.ddp.no_sync()

    # ---------------------------------------------------------------------------------- whole tensors (FSDP)
    def full_weights(self, *, write_back: bool = False) -> contextlib.AbstractContextManager:
        """FSDP: the adapter whole on every rank inside (a collective; ``fsdp.full_parameters``). DDP: nothing."""
        if not self.sharded:
            return contextlib.nullcontext()
        return fsdp.full_parameters(self._model, write_back=write_back)

    def optimizer_state(self, optimizer: torch.optim.Optimizer) -> dict[str, Any] | None:
        """What a checkpoint holds of the optimizer. DDP: its state (the same on every rank). FSDP: every rank's
        state of its shards, gathered to rank 0 (a collective; None on the other ranks)."""
        if not self.sharded:
            return optimizer.state_dict()
        every: list[Any] | None = [None] * self.world if self.is_main else None
        dist.gather_object(fsdp.to_cpu(optimizer.state_dict()), every, dst=0)
        return {"ranks": every} if self.is_main else None

    def load_optimizer_state(self, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
        if not self.sharded:
            optimizer.load_state_dict(state)
        elif "ranks" not in state or len(state["ranks"]) != self.world:
            raise SlimtuneError(f"--resume: the checkpoint's optimizer state is not of a {self.world}-rank FSDP run")
        else:
            optimizer.load_state_dict(state["ranks"][self.rank])

    # ---------------------------------------------------------------------------------- set-up
    def prepare(self, trainer: Trainer) -> None:
        """Before the optimizer exists: the same trainable values on every rank; FSDP: the model sharded."""
        self.mode = trainer.recipe.train.distributed
        self._model = trainer.model
        with torch.no_grad():
            for p in (p for p in trainer.model.parameters() if p.requires_grad):  # the base is never sent
                buf = p.detach().to(self.comm_device, copy=True)
                dist.broadcast(buf, src=0)
                p.copy_(buf.to(p.device))
        if self.sharded:
            fsdp.check_adapters(trainer.adapters)
            fsdp.shard_model(trainer.model, self.comm_device, self.world,
                             embeddings_on_host=trainer.recipe.train.embeddings_on == "cpu")

    def setup(self, trainer: Trainer) -> None:
        """After the trainer's set-up: the reducer (DDP; FSDP reduces in its own hooks), per-rank dropout RNG, the
        agreed stop."""
        if not self.sharded:
            self._setup_ddp(trainer)
        if self.rank > 0:  # rank 0 keeps the stream of a 1-process run; the others draw their own dropout masks
            torch.manual_seed(trainer.recipe.train.seed * 1_000_003 + self.rank)
        stop = _AgreeOnStop(self)
        trainer.request_stop = stop.request  # the signal handler train() installs: a request, agreed on below
        trainer.callbacks.append(stop)

    def _setup_ddp(self, trainer: Trainer) -> None:
        params = [(n, p) for n, p in trainer.model.named_parameters() if p.requires_grad]
        module = _LossModule(trainer.model, trainer.step_loss)  # the objective's loss: SFT's, DPO's, ...
        trainable = {f"model.{n}" for n, _ in params}
        ignored = [n for n, _ in module.named_parameters() if n not in trainable]
        ignored += [n for n, _ in module.named_buffers()]
        DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(module, ignored)
        # an adapter whose trainable set changes during training (LaMDA freezes B) leaves parameters without a
        # gradient in some steps: the reducer must look for them
        dynamic = any(type(a).on_step is not Adapter.on_step for a in trainer.adapters.values())
        device_ids = [torch.cuda.current_device()] if self.backend == "nccl" else None
        self.ddp = DistributedDataParallel(
            module, device_ids=device_ids, init_sync=False,  # buffers are ignored: nothing to sync
            find_unused_parameters=dynamic, gradient_as_bucket_view=True,
        )
        self.ddp.register_comm_hook(None, _sum_hook)
        self._loss_fn = trainer.step_loss
        trainer.step_loss = self._ddp_loss

    def _ddp_loss(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        if not torch.is_grad_enabled():  # evaluation on one rank: no reducer, no collective
            return self._loss_fn(model, batch)
        return self.ddp(batch)

    # ---------------------------------------------------------------------------------- checkpoints
    def gather_rng(self) -> list[dict[str, Any]]:
        out: list[Any] = [None] * self.world
        dist.all_gather_object(out, rng_state())
        return out


class _AgreeOnStop(TrainerCallback):
    """Every rank starts from the same position (a resume read the same checkpoint), and a stop request
    (SIGINT/SIGTERM) seen by any rank stops every rank after the same step."""

    def __init__(self, ctx: DistContext):
        self.ctx = ctx
        self.pending = False

    def request(self, *_: Any) -> None:
        """SIGINT/SIGTERM: noted here, not in the trainer's flag, so that a signal arriving after this step's
        agreement (during its checkpoint) stops every rank after the next step, never this rank alone."""
        self.pending = True

    def on_train_start(self, trainer: Trainer) -> None:
        here = (trainer.pos.step, trainer.pos.epoch, trainer.pos.batch)
        every: list[Any] = [None] * self.ctx.world
        dist.all_gather_object(every, here)
        if len(set(every)) > 1:
            raise SlimtuneError(f"the ranks start from different positions (step, epoch, batch per rank: {every}): "
                                f"every rank must see the same run folder (a shared file system) to resume")

    def on_step_end(self, trainer: Trainer, result: StepResult) -> None:
        trainer._stop_requested = self.ctx.any(self.pending or trainer._stop_requested)


# ---------------------------------------------------------------------------------------- the process group
_CURRENT: DistContext | None = None


def current() -> DistContext | None:
    """The data-parallel context of this process, or None when it runs alone (no torchrun, or one process)."""
    return _CURRENT


def is_main() -> bool:
    """Whether this process writes files and prints (rank 0, or the only process)."""
    return _CURRENT is None or _CURRENT.is_main


def world_size() -> int:
    return 1 if _CURRENT is None else _CURRENT.world


def barrier() -> None:
    """Wait for every rank (nothing when running alone)."""
    if _CURRENT is not None:
        _CURRENT.barrier()


def launched_by_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def timeout() -> datetime.timedelta:
    raw = os.environ.get(TIMEOUT_ENV, "")
    try:
        seconds = float(raw) if raw else DEFAULT_TIMEOUT_S
    except ValueError:
        raise SlimtuneError(f"{TIMEOUT_ENV}={raw}: not a number of seconds") from None
    return datetime.timedelta(seconds=seconds)


def init_from_env(device: torch.device) -> DistContext | None:
    """Join the process group torchrun describes (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT).

    Returns None when this process runs alone. On CUDA each rank takes ``cuda:LOCAL_RANK`` as its current device
    (so ``train.device: cuda`` means that device) and the backend is NCCL; on the CPU it is gloo.
    """
    global _CURRENT
    if _CURRENT is not None:
        return _CURRENT
    if not launched_by_torchrun():
        return None
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    backend = "nccl" if device.type == "cuda" else "gloo"
    if backend == "nccl":
        if local_rank >= torch.cuda.device_count():
            raise SlimtuneError(f"LOCAL_RANK {local_rank}: only {torch.cuda.device_count()} CUDA devices are visible "
                                f"(give torchrun --nproc-per-node at most that many)")
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        kw = {"device_id": torch.device("cuda", local_rank)} if backend == "nccl" else {}
        dist.init_process_group(backend, rank=rank, world_size=world, timeout=timeout(), **kw)
    _CURRENT = DistContext(rank=rank, world=world, local_rank=local_rank, backend=backend)
    return _CURRENT


LEAVE_TIMEOUT_ENV = "SLIMTUNE_LEAVE_TIMEOUT"
DEFAULT_LEAVE_TIMEOUT_S = 60.0  # the results are written by then: the peers have nothing left but to leave
_LEFT_ALONE = False  # set when this rank left the group without its peers (the CLI then exits at once)


def _leave_timeout() -> float:
    raw = os.environ.get(LEAVE_TIMEOUT_ENV, "")
    try:
        return float(raw) if raw else DEFAULT_LEAVE_TIMEOUT_S
    except ValueError:
        raise SlimtuneError(f"{LEAVE_TIMEOUT_ENV}={raw}: not a number of seconds") from None


def _bounded(fn: Callable[[], Any], seconds: float) -> bool:
    """Run ``fn`` in a daemon thread; True if it returned within ``seconds`` (an error counts as not returning).

    torch's collectives and ``destroy_process_group`` can block in C++ with no timeout of their own once a peer is
    gone (a gloo rank was seen to wait in teardown forever after its peer exited): the thread is abandoned then.
    """
    done, ok = threading.Event(), []

    def target() -> None:
        try:
            fn()
            ok.append(True)
        except Exception:  # a peer that closed its connection: gloo raises at once
            pass
        finally:
            done.set()

    threading.Thread(target=target, name="slimtune-leave", daemon=True).start()
    return done.wait(seconds) and bool(ok)


def shutdown() -> None:
    """Leave the process group after a clean run, in bounded time on every rank.

    Every rank meets at a last barrier first (a rank that destroyed its group while a peer was still working was seen
    to hang), then destroys the group. Both wait at most ``SLIMTUNE_LEAVE_TIMEOUT`` seconds (default 60): a peer that
    exited or stopped answering after the results were written must not keep this rank alive. Past that the rank
    says so in one line and leaves regardless (``left_alone()``; the CLI then ends the process at once, since the
    abandoned collective may block the interpreter's own exit).
    """
    global _CURRENT, _LEFT_ALONE
    ctx = _CURRENT
    _CURRENT = None
    if ctx is None or not dist.is_initialized():
        return
    seconds = _leave_timeout()
    t0 = time.monotonic()
    if _bounded(dist.barrier, seconds) and _bounded(dist.destroy_process_group,
                                                     max(1.0, seconds - (time.monotonic() - t0))):
        return
    _LEFT_ALONE = True
    print(f"rank {ctx.rank}/{ctx.world}: the other ranks did not leave the process group within {seconds:.0f} s "
          f"({LEAVE_TIMEOUT_ENV}); leaving without them (the results are written)", file=sys.stderr, flush=True)


def left_alone() -> bool:
    """Whether ``shutdown`` gave up on its peers (the process should end without the interpreter's teardown)."""
    return _LEFT_ALONE


def _is_comm_error(e: BaseException) -> bool:
    if isinstance(e, getattr(dist, "DistError", ())):
        return True
    text = str(e)
    return isinstance(e, RuntimeError) and any(w in text for w in (
        "Connection closed by peer", "Connection reset by peer", "Timed out", "timed out", "[gloo", "NCCL",
        "ProcessGroup", "Broken pipe"))


@contextlib.contextmanager
def session(device: torch.device, callbacks: list[TrainerCallback] = ()) -> Iterator[DistContext | None]:
    """Join the process group for a run (nothing when alone); a failed collective becomes ``DistributedError``;
    a clean end calls every callback's ``on_run_end`` and leaves the group (bounded: ``shutdown``)."""
    ctx = init_from_env(device)
    try:
        yield ctx
    except Exception as e:
        if ctx is None or not _is_comm_error(e):
            raise
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DistributedError(f"rank {ctx.rank}/{ctx.world}: a collective failed ({first[:200]}); another rank "
                               f"died or stopped answering within {timeout().total_seconds():.0f} s "
                               f"({TIMEOUT_ENV}); continue with --resume") from None
    for cb in callbacks:
        cb.on_run_end(ctx)
    shutdown()


# ---------------------------------------------------------------------------------------- the loop's seams
def checkpoint_ranks(ctx: DistContext | None) -> dict[str, Any]:
    """What a checkpoint records of the process group: the world size and every rank's RNG state (a collective:
    every rank calls it)."""
    if ctx is None:
        return {"world": 1}
    return {"world": ctx.world, "rng_ranks": ctx.gather_rng()}


def rank_rng(state: dict[str, Any], ctx: DistContext | None, *, where: str) -> dict[str, Any]:
    """This rank's RNG state from a checkpoint's ``trainer.pt``; refuses another world size (another batch)."""
    world = 1 if ctx is None else ctx.world
    saved = int(state.get("world", 1))
    if saved != world:
        raise SlimtuneError(f"--resume {where}: a checkpoint of a {saved}-process run, but this run has {world} "
                            f"(the global batch would change); resume with --nproc {saved}")
    return state["rng"] if ctx is None else state["rng_ranks"][ctx.rank]


# ---------------------------------------------------------------------------------------- slimtune run --nproc
def torchrun_argv(nproc: int, argv: list[str]) -> list[str]:
    """The torchrun command line for ``slimtune ARGV`` on ``nproc`` local processes (``--nproc N`` removed)."""
    rest: list[str] = []
    skip = False
    for a in argv:
        if skip:
            skip = False
            continue
        if a == "--nproc":
            skip = True
            continue
        if a.startswith("--nproc="):
            continue
        rest.append(a)
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
            "-m", "slimtune", *rest]
