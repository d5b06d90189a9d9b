"""`slimtune bench`: slimtune against HF + PEFT + bitsandbytes, same process, same model, same data (DESIGN §4).

    result = run_bench(BenchConfig(model_config="tiny", device="cpu", steps=3), log=print)
    paths = slimtune.bench.report.write_report(result, "bench/results/cpu-2025-01-01")

Both tools train the same base: a causal LM built from a config (no download) with seeded random weights drawn and
quantized to NF4 (double quant) on the device once (``RandomBase``: both tools' models share its tensors),
adapters of the same kind, rank, alpha and targets, the same optimizer, on the same random tokens (fixed seed;
labels = inputs). slimtune: its adapters, ``fuse_model`` (fused kernels; Triton on
CUDA, the torch reference on CPU), the chunked linear cross-entropy (``causal_lm_loss``) and checkpointing mode
``--checkpointing`` (none | full | offload). Baseline: see :mod:`slimtune.bench.baseline` (PEFT LoRA on bnb
``Linear4bit``, HF gradient checkpointing with ``use_reentrant=False``, SDPA, ``model(ids, labels).loss``).
Both are trained by slimtune's one loop, ``Trainer`` (``bench_recipe``: constant lr, clipping at 1.0 as a recipe's
default, one micro-batch per step): the slimtune side as adapters, the baseline with ``trainable="model"`` (its
trainable parameters are PEFT's LoRA weights) and HF's loss as ``loss_fn``; the per-phase memory comes from a
trainer callback (``_Measure``) wrapping the trainer's forward / backward / optimizer phases.

Figures, per tool:

* peak memory per phase (load = the tool's model over the shared base, its adapters and optimizer; then forward,
  backward, optimizer step of every step, the max over steps): on CUDA ``max_memory_allocated`` /
  ``max_memory_reserved`` after ``reset_peak_memory_stats`` at each phase start; on CPU the process's peak RSS
  (VmHWM) after resetting it at each phase start (``/proc/self/clear_refs``; a sampling thread where that is not
  allowed), reported as bytes above the RSS just before the tool's model was built, less the shared base's bytes
  (so the base counts in each tool's figures, as it does on CUDA; both tools run in one process, one after the
  other);
* tokens/s: the median over the steps after ``warmup`` (forward + backward + optimizer step, synchronised);
* bytes saved for backward (``saved_tensors_hooks``, :mod:`slimtune.bench.memory`), the device-independent
  activation measure: per token per decoder layer without checkpointing (one decoder layer run on its real
  input, the rotary cos/sin it shares with the other layers excluded), and the activation term of the tool's own
  checkpointing mode (see :func:`measure_activation_term`), compared with the estimator's (the gap in %);
* with ``max_context`` on CUDA: the longest sequence (at ``batch``) that trains one step under
  ``torch.cuda.set_per_process_memory_fraction(cap / total)``: doubling from ``seq_len`` until an OOM, then
  bisection; on CPU the estimator's value only;
* a sweep over ``seq_lens``: peak allocated memory of one step (CUDA) or the saved activation term (CPU), measured
  and estimated.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import statistics
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from slimtune.adapters.base import get_adapter_class
from slimtune.adapters.inject import inject
from slimtune.bench.baseline import baseline_loss_sum, build_baseline
from slimtune.bench.bench_config import (
    PHASES, BenchConfig, check_bench_config, command_line, ratios, resolve_bench_config,
)
from slimtune.bench.configs import parameter_counts
from slimtune.bench.environment import environment
from slimtune.bench.estimate import GiB, Estimate, estimate, normalize_targets
from slimtune.bench.memory import (
    PhaseMeter,
    current_rss,
    decide_backends,
    dispatch_lens,
    estimated_activation_term,
    free_memory,
    gap_pct,
    measure_activation_term,
    measure_layer,
    recording_offload,
    saved_bytes,
)
from slimtune.bench.random_model import RandomBase, random_tokens
from slimtune.config.recipe import Recipe
from slimtune.data.dataset import TrainData
from slimtune.errors import ResourceError, SlimtuneError
from slimtune.models.fused import fuse_model
from slimtune.models.load import LoadedModel
from slimtune.models.tiny import tiny_llama_config
from slimtune.train.callbacks import TrainerCallback
from slimtune.train.checkpointing import enable_checkpointing
from slimtune.train.loop import Trainer

Log = Callable[[str], Any]


# --------------------------------------------------------------------------------------------- inputs


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name not in ("cpu", "cuda") and not name.startswith("cuda:"):
        raise SlimtuneError(f"--device {name}: expected cpu, cuda or auto")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise SlimtuneError("--device cuda: no CUDA device is available (use --device cpu)")
    return dev


def _dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, name)


# --------------------------------------------------------------------------------------------- the models


def build_slimtune(config, cfg: BenchConfig, *, device: torch.device, dtype: torch.dtype, targets: tuple[str, ...],
                   base: RandomBase | None = None) -> tuple[nn.Module, list[str]]:
    """The slimtune side: NF4 base (``base``'s tensors, else drawn here), slimtune adapters, fused kernels, chunked
    CE, ``cfg.checkpointing``."""
    model = (base or _random_base(config, cfg, device, dtype)).model()
    cls = get_adapter_class(cfg.adapter)
    inject(model, cls.Config(kind=cfg.adapter, rank=cfg.rank, alpha=_alpha(cfg), targets=list(targets)))
    report = fuse_model(model)
    enable_checkpointing(model, cfg.checkpointing)
    model.train()
    return model, report.lines()


def _random_base(config, cfg: BenchConfig, device: torch.device, dtype: torch.dtype) -> RandomBase:
    return RandomBase(config, device=device, dtype=dtype, seed=cfg.seed)


def _alpha(cfg: BenchConfig) -> float:
    return float(cfg.alpha) if cfg.alpha is not None else 2.0 * cfg.rank


# --------------------------------------------------------------------------------------------- training steps


def bench_recipe(cfg: BenchConfig, device: torch.device, targets: tuple[str, ...]) -> Recipe:
    """The bench's optimisation as a recipe for ``Trainer``: ``cfg.steps`` steps of one micro-batch at constant
    ``cfg.lr``, the recipe's default clipping (max_grad_norm 1.0). The model and data are given to the trainer
    (neither is read from here); fusing and checkpointing were applied when the model was built."""
    return Recipe.model_validate({
        "name": "bench",
        "model": {"name": cfg.model_config},
        "quant": {"mode": "nf4"},
        "adapter": {"kind": cfg.adapter, "rank": cfg.rank, "alpha": _alpha(cfg), "targets": list(targets)},
        "data": {"sources": [{"path": "bench:random-tokens"}], "format": "text"},  # Trainer(data=...) is used
        "train": {"lr": cfg.lr, "schedule": "constant", "warmup": 0, "steps": cfg.steps, "micro_batch": cfg.batch,
                  "optimizer": cfg.optimizer, "seed": cfg.seed, "fused": False, "device": device.type},
    })


def token_data(ids: torch.Tensor, seed: int) -> TrainData:
    """The (batch, seq) random tokens as training data: labels = inputs, one micro-batch per epoch, in order."""
    rows = ids.cpu()
    return TrainData(examples=[{"input_ids": r, "labels": r} for r in rows], stats={}, holdout=[], pad_id=0,
                     seed=seed, shuffle=False)


def batch_of(ids: torch.Tensor) -> dict[str, torch.Tensor]:
    return {"input_ids": ids, "labels": ids, "attention_mask": torch.ones_like(ids)}


def _is_oom(err: BaseException) -> bool:
    return isinstance(err, (torch.cuda.OutOfMemoryError, ResourceError)) or "out of memory" in str(err).lower()


def search_max_context(try_seq: Callable[[int], bool], *, start: int, limit: int, log: Log | None = None
                       ) -> tuple[int, list[tuple[int, bool]]]:
    """Longest ``seq`` with ``try_seq(seq)`` true: doubling from ``start`` until a failure (or ``limit``), then
    bisection down to a step of max(64, best/32). Returns (best, [(seq, ok), ...]); best 0 when even 1 fails."""
    trials: list[tuple[int, bool]] = []

    def attempt(seq: int) -> bool:
        ok = try_seq(seq)
        trials.append((seq, ok))
        if log:
            log(f"  max-context: {seq:,} tokens {'ok' if ok else 'OOM'}")
        return ok

    seq = max(1, min(start, limit))
    good, bad = 0, None
    while True:
        if attempt(seq):
            good = seq
            if seq >= limit:
                return good, trials
            seq = min(2 * seq, limit)
        else:
            bad = seq
            break
    while bad - good > max(64, good // 32):
        mid = (good + bad) // 2
        if mid > 64:
            mid -= mid % 64
        if mid <= good:
            break
        if attempt(mid):
            good = mid
        else:
            bad = mid
    return good, trials


# --------------------------------------------------------------------------------------------- one tool


def tool_estimate(tool: str, config, cfg: BenchConfig, dtype: torch.dtype, targets, seq_len: int) -> Estimate:
    """The estimator's figures for one tool of the bench at ``seq_len`` (slimtune: fused, its checkpointing mode;
    the baseline: unfused, full checkpointing)."""
    dt = str(dtype).removeprefix("torch.")
    return estimate(
        config, quant="nf4", double_quant=True, compute_dtype=dt, adapter_dtype="float32", kind=cfg.adapter,
        rank=cfg.rank, targets=targets, optimizer=cfg.optimizer, seq_len=seq_len, micro_batch=cfg.batch,
        grad_checkpointing=cfg.checkpointing if tool == "slimtune" else "full", fused=tool == "slimtune",
        gpu_mem_gib=cfg.mem_cap_gib,
    )


@dataclass
class _Side:
    """One tool's model in a bench, trained by ``Trainer``: what its measurements need."""

    tool: str
    trainer: Trainer
    mode: str  # its checkpointing mode
    config: Any
    cfg: BenchConfig
    device: torch.device
    dtype: torch.dtype
    targets: tuple[str, ...]

    @property
    def model(self) -> nn.Module:
        return self.trainer.model

    def ids(self, seq_len: int, seed_offset: int = 1) -> torch.Tensor:
        return random_tokens(self.config.vocab_size, self.cfg.batch, seq_len, seed=self.cfg.seed + seed_offset,
                             device=self.device)

    def loss(self, ids: torch.Tensor) -> torch.Tensor:
        """The tool's training loss on ``ids`` (a forward only: what the measurements of saved bytes run)."""
        return self.trainer.loss_fn(self.model, batch_of(ids))

    def estimate(self, seq_len: int) -> Estimate:
        return tool_estimate(self.tool, self.config, self.cfg, self.dtype, self.targets, seq_len)

    def try_step(self, ids: torch.Tensor) -> bool:
        """One training step (``Trainer.step``) on ``ids``; False on an out-of-memory error (memory freed)."""
        oom = False
        try:
            self.trainer.step([batch_of(ids)])
        except (torch.cuda.OutOfMemoryError, RuntimeError) as err:
            if not _is_oom(err):
                raise
            oom = True
        if oom:
            self.trainer.optimizer.zero_grad(set_to_none=True)
        free_memory(self.device)
        return not oom


def _build_side(tool: str, config, cfg: BenchConfig, *, device: torch.device, dtype: torch.dtype,
                targets: tuple[str, ...], out: dict[str, Any], run_dir: Path, base: RandomBase | None = None) -> _Side:
    """Build the tool's model over ``base`` (drawn here when None) and its ``Trainer`` (slimtune: its adapters,
    trained as adapters; the baseline: the PEFT model, whose trainable parameters are the LoRA weights, with HF's
    loss)."""
    if tool == "slimtune":
        model, out["fuse_report"] = build_slimtune(config, cfg, device=device, dtype=dtype, targets=targets,
                                                   base=base)
        mode = cfg.checkpointing
        out["description"] = (f"slimtune {cfg.adapter} adapters, fused kernels, chunked linear CE, "
                              f"checkpointing {mode}")
        kw: dict[str, Any] = {"trainable": "adapter"}
    else:
        hf = (base or _random_base(config, cfg, device, dtype)).model()
        model = build_baseline(hf, kind=cfg.adapter, rank=cfg.rank, alpha=_alpha(cfg), targets=targets)
        mode = "full"
        out["description"] = ("HF transformers + PEFT LoRA on bitsandbytes Linear4bit, SDPA, HF gradient "
                              "checkpointing (use_reentrant=False), model(ids, labels).loss")
        kw = {"trainable": "model", "loss_fn": baseline_loss_sum}
    out["checkpointing"] = mode
    out["trainable_params"] = sum(p.numel() for p in model.parameters() if p.requires_grad)
    side_ids = random_tokens(config.vocab_size, cfg.batch, cfg.seq_len, seed=cfg.seed + 1, device=device)
    trainer = Trainer(bench_recipe(cfg, device, targets), run_dir=run_dir, stage=tool, handle_signals=False,
                      loaded=LoadedModel(model, None, dtype, device, source=f"bench:{cfg.model_config}"),
                      data=token_data(side_ids, cfg.seed), **kw)
    trainer.setup()
    return _Side(tool, trainer, mode, config, cfg, device, dtype, targets)


def run_tool(tool: str, config, cfg: BenchConfig, *, device: torch.device, dtype: torch.dtype,
             targets: tuple[str, ...], log: Log, base: RandomBase | None = None) -> dict[str, Any]:
    """Build one tool's model (over ``base``, shared with the other tool), train ``cfg.steps`` steps, measure.
    Returns its figures (see the module doc)."""
    free_memory(device)
    host_base = base.nbytes if base is not None and device.type == "cpu" else 0  # counted as the model's
    out: dict[str, Any] = {"tool": tool, "rss_start_bytes": current_rss() - host_base}
    meter = PhaseMeter(device)
    log(f"{tool}: building the model")
    with tempfile.TemporaryDirectory(prefix=f"slimtune-bench-{tool}-") as run_dir:  # the trainer's metrics.jsonl
        with meter.phase("load"):
            side = _build_side(tool, config, cfg, device=device, dtype=dtype, targets=targets, out=out,
                               run_dir=Path(run_dir), base=base)
        if tool == "slimtune":  # dispatch trials before the measured steps, never inside them (issue 23)
            lens = dispatch_lens([cfg.seq_len, *_sweep_lens(cfg)], batch=cfg.batch,
                                 grow=cfg.max_context and device.type == "cuda")
            decide_backends(lambda s: side.loss(side.ids(s)), lens, device=device,
                            zero_grad=lambda: side.trainer.optimizer.zero_grad(set_to_none=True))
        _train(side, meter, out, log)
        est = side.estimate(cfg.seq_len)
        log(f"{tool}: measuring bytes saved for backward")
        _saved_figures(side, est, out)
        out["seq_sweep"] = _sweep(side, out, log)
        out["max_context"] = _max_context(side, est, log)
        side.trainer.cleanup()
        del side
    free_memory(device)
    return out


class _Measure(TrainerCallback):
    """Per-phase peak memory (``PhaseMeter``) and a log line per step, from inside ``Trainer.train``."""

    def __init__(self, meter: PhaseMeter, log: Log, tokens: int):
        self.meter, self.log, self.tokens = meter, log, tokens

    def phase(self, trainer, name: str):
        return self.meter.phase(name)

    def on_step_end(self, trainer, result) -> None:
        self.log(f"{trainer.stage}: step {result.step}/{trainer.total_steps} loss {result.loss:.4f} "
                 f"{self.tokens / result.seconds:,.0f} tok/s")


def _train(side: _Side, meter: PhaseMeter, out: dict[str, Any], log: Log) -> None:
    """``cfg.steps`` training steps with per-phase memory; fills step times, losses, tokens/s and the phases."""
    cfg, trainer = side.cfg, side.trainer
    tokens = cfg.batch * cfg.seq_len
    out["oom"] = False
    measure = _Measure(meter, log, tokens)
    trainer.callbacks.append(measure)
    try:
        trainer.train()
    except (torch.cuda.OutOfMemoryError, RuntimeError, ResourceError) as err:
        if not _is_oom(err):
            raise
        out["oom"] = True
        log(f"{side.tool}: out of memory at {cfg.seq_len} x {cfg.batch} tokens")
    finally:
        trainer.callbacks.remove(measure)
    trainer.optimizer.zero_grad(set_to_none=True)
    free_memory(side.device)
    step_seconds = [h.seconds for h in trainer.history]
    losses = [h.loss for h in trainer.history]
    timed = step_seconds[cfg.warmup:]
    out["step_seconds"] = [round(s, 5) for s in step_seconds]
    out["losses"] = [round(v, 5) for v in losses]
    out["tokens_per_step"] = tokens
    out["tokens_per_second"] = round(tokens / statistics.median(timed), 2) if timed and not out["oom"] else None
    out["memory_method"] = meter.method
    out["phases"] = {}
    for ph in PHASES:
        peaks = dict(meter.peaks.get(ph, {}))
        if "rss_peak_bytes" in peaks:
            peaks["rss_above_start_bytes"] = max(0, peaks["rss_peak_bytes"] - out["rss_start_bytes"])
        out["phases"][ph] = peaks
    out["phase_seconds"] = {k: round(v, 4) for k, v in meter.seconds.items()}


def _saved_figures(side: _Side, est: Estimate, out: dict[str, Any]) -> None:
    """Bytes saved for backward (one layer, and the activation term of the tool's mode) against the estimate."""
    cfg = side.cfg
    ids = side.ids(cfg.seq_len)
    tokens = cfg.batch * cfg.seq_len
    predicted = estimated_activation_term(est)
    est_layer = sum(est.activation_per_token_per_layer.values())
    try:
        layer = measure_layer(side.model, ids)
        per_layer = layer["saved"]
        measured = measure_activation_term(side.model, ids, side.mode, layer=layer)
        step = measure_step_saved(side, ids)
    except (torch.cuda.OutOfMemoryError, RuntimeError) as err:
        if not _is_oom(err):
            raise
        per_layer, measured, step = None, {"total": None}, None
    free_memory(side.device)
    layer_per_token = None if per_layer is None else round(per_layer / tokens, 2)
    out["saved_bytes_per_token_per_layer"] = layer_per_token
    out["saved_bytes_step"] = step
    out["activation"] = {
        "mode": side.mode, "tokens": tokens, "measured": measured, "estimated": predicted,
        "gap_pct": gap_pct(predicted["total"], measured["total"] or 0),
        "per_token_per_layer": {"measured": layer_per_token, "estimated": est_layer,
                                "gap_pct": gap_pct(est_layer, per_layer / tokens if per_layer else 0)},
    }
    out["estimate"] = {"total_bytes": est.total_bytes, "total_gib": round(est.total_bytes / GiB, 4),
                       "cuda_context_bytes": est.cuda_context_bytes, "components_bytes": est.components(),
                       "max_seq_len": est.max_seq_len_that_fits(), "gpu_mem_gib": cfg.mem_cap_gib}
    if side.device.type == "cuda" and not out["oom"]:
        peak = max(p.get("allocated_bytes", 0) for p in out["phases"].values())
        out["estimate"]["peak_allocated_bytes"] = peak
        out["estimate"]["peak_gap_pct"] = gap_pct(est.total_bytes - est.cuda_context_bytes, peak)


def measure_step_saved(side: _Side, ids: torch.Tensor) -> int:
    """Bytes kept for backward by a whole forward with the loss (device + offloaded host memory): the decoder in
    the tool's checkpointing mode plus what the loss keeps (HF: the (T, V) logits' log-softmax; slimtune: dx)."""
    with recording_offload() as host:
        r = saved_bytes(lambda: side.loss(ids), modules=[side.model])
    return r.activation_bytes + int(host["bytes"])


def _sweep(side: _Side, out: dict[str, Any], log: Log) -> list[dict[str, Any]]:
    """Memory against the sequence length: peak allocated of one step (CUDA) or the saved activation term (CPU)."""
    rows = []
    for seq in _sweep_lens(side.cfg):
        ids = side.ids(seq)
        e = side.estimate(seq)
        row: dict[str, Any] = {"seq_len": seq}
        if side.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(side.device)
            ok = side.try_step(ids)
            row["measured_bytes"] = int(torch.cuda.max_memory_allocated(side.device)) if ok else None
            row["estimated_bytes"] = e.total_bytes - e.cuda_context_bytes
            row["metric"] = "peak allocated (one training step)"
        else:
            same = seq == side.cfg.seq_len and out["activation"]["measured"]["total"] is not None
            row["measured_bytes"] = (out["activation"]["measured"]["total"] if same
                                     else measure_activation_term(side.model, ids, side.mode)["total"])
            row["estimated_bytes"] = estimated_activation_term(e)["total"]
            row["metric"] = "bytes saved for backward (activation term)"
        row["gap_pct"] = gap_pct(row["estimated_bytes"], row["measured_bytes"] or 0)
        rows.append(row)
        log(f"{side.tool}: seq {seq}: {row['metric']} {_mib(row['measured_bytes'])} "
            f"(estimate {_mib(row['estimated_bytes'])})")
        free_memory(side.device)
    return rows


def _max_context(side: _Side, est: Estimate, log: Log) -> dict[str, Any]:
    """The longest sequence that trains one step under ``mem_cap_gib`` (CUDA), and the estimator's answer."""
    cfg, device = side.cfg, side.device
    mc: dict[str, Any] = {"cap_gib": cfg.mem_cap_gib, "estimated": est.max_seq_len_that_fits(), "measured": None}
    if not cfg.max_context:
        return mc
    if device.type != "cuda":
        mc["note"] = "measured on CUDA only (set_per_process_memory_fraction); the estimate is shown"
        return mc
    total = torch.cuda.get_device_properties(device).total_memory
    frac = min(1.0, cfg.mem_cap_gib * GiB / total)
    mc["memory_fraction"] = round(frac, 4)
    log(f"{side.tool}: longest sequence under {cfg.mem_cap_gib:g} GiB (memory fraction {frac:.3f})")
    torch.cuda.set_per_process_memory_fraction(frac, device)
    try:
        best, trials = search_max_context(lambda s: side.try_step(side.ids(s, seed_offset=2)),
                                          start=cfg.seq_len, limit=cfg.max_context_limit, log=log)
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0, device)
    mc.update(measured=best, trials=trials, limit=cfg.max_context_limit)
    return mc


def _sweep_lens(cfg: BenchConfig) -> list[int]:
    """The sequence lengths of the memory sweep: ``seq_lens``, else seq_len / 2, seq_len, 2 seq_len."""
    if cfg.seq_lens:
        return sorted(set(int(s) for s in cfg.seq_lens))
    return sorted({max(1, cfg.seq_len // 2), cfg.seq_len, 2 * cfg.seq_len})


def _mib(n: int | None) -> str:
    return "OOM" if n is None else f"{n / 2**20:.2f} MiB"


# --------------------------------------------------------------------------------------------- the bench


def run_bench(cfg: BenchConfig, *, log: Log | None = None, argv: list[str] | None = None) -> dict[str, Any]:
    """Run every tool in ``cfg.tools`` (one after the other, in this process) and collect the report dict."""
    log = log or (lambda _m: None)
    check_bench_config(cfg)
    device = _device(cfg.device)
    dtype = _dtype(cfg.dtype, device)
    config = resolve_bench_config(cfg.model_config, cfg.layers)
    targets = normalize_targets(cfg.targets)
    counts = parameter_counts(config)
    started = _dt.datetime.now(_dt.timezone.utc)
    result: dict[str, Any] = {
        "created": started.isoformat(timespec="seconds"),
        "command": {"argv": list(argv) if argv is not None else command_line(cfg), "args": _plain(asdict(cfg))},
        "environment": environment(device),
        "model": {
            "config": cfg.model_config, "model_type": config.model_type,
            "hidden_size": config.hidden_size, "intermediate_size": config.intermediate_size,
            "num_hidden_layers": config.num_hidden_layers, "num_attention_heads": config.num_attention_heads,
            "num_key_value_heads": config.num_key_value_heads, "vocab_size": config.vocab_size,
            "parameters": counts["total"],
        },
        "settings": {
            "device": str(device), "dtype": str(dtype).removeprefix("torch."), "quant": "nf4 + double quant",
            "adapter": cfg.adapter, "rank": cfg.rank, "alpha": _alpha(cfg), "targets": list(targets),
            "seq_len": cfg.seq_len, "batch": cfg.batch, "tokens_per_step": cfg.seq_len * cfg.batch,
            "steps": cfg.steps, "warmup": cfg.warmup, "optimizer": cfg.optimizer, "lr": cfg.lr,
            "slimtune_checkpointing": cfg.checkpointing, "baseline_checkpointing": "full (HF, use_reentrant=False)",
            "seed": cfg.seed, "mem_cap_gib": cfg.mem_cap_gib,
            "loop": "slimtune Trainer for both tools (constant lr, max_grad_norm 1.0)",
        },
        "tools": {},
    }
    log(f"bench on {result['environment']['device_name']}: {cfg.model_config} ({config.num_hidden_layers} layers, "
        f"{counts['total']:,} parameters), seq {cfg.seq_len} x batch {cfg.batch}, {cfg.adapter} r{cfg.rank}")
    with _quiet_warnings():
        warm_up(cfg, device=device, dtype=dtype, targets=targets)
        base = _random_base(config, cfg, device, dtype).build()  # once, for both tools
        result["base"] = {"device": str(device), "build_seconds": round(base.build_seconds, 3),
                          "bytes": base.nbytes, "seed": cfg.seed}
        log(f"random base drawn and quantized on {device} in {base.build_seconds:.1f} s ({base.nbytes / GiB:.2f} GiB)")
        for tool in cfg.tools:
            result["tools"][tool] = run_tool(tool, config, cfg, device=device, dtype=dtype, targets=targets, log=log,
                                             base=base)
        del base
    result["ratios"] = ratios(result["tools"])
    result["wall_seconds"] = round((_dt.datetime.now(_dt.timezone.utc) - started).total_seconds(), 1)
    return result


def warm_up(cfg: BenchConfig, *, device: torch.device, dtype: torch.dtype, targets: tuple[str, ...]) -> None:
    """One training step of each tool on a 1-layer tiny model, untimed and unmeasured.

    Both tools run in one process, so whatever is loaded or initialised once (Python modules of PEFT,
    bitsandbytes and the kernels, torch's CPU thread pools and oneDNN buffers) would otherwise land in the first
    tool's memory and time figures.
    """
    tiny = tiny_llama_config(num_hidden_layers=1)
    tiny.use_cache = False
    tiny._attn_implementation = "sdpa"
    small = BenchConfig(**{**asdict(cfg), "seq_len": 16, "batch": 1})
    for tool in cfg.tools:
        with tempfile.TemporaryDirectory(prefix=f"slimtune-bench-warmup-{tool}-") as run_dir:
            side = _build_side(tool, tiny, small, device=device, dtype=dtype, targets=targets, out={},
                               run_dir=Path(run_dir))
            side.try_step(side.ids(16))
            side.trainer.cleanup()
            del side
        free_memory(device)


@contextlib.contextmanager
def _quiet_warnings() -> Iterator[None]:
    import warnings

    with warnings.catch_warnings():
        # bitsandbytes / transformers notices that repeat every step and say nothing about the figures
        warnings.filterwarnings("ignore", message=".*inference or training with bf16.*")
        warnings.filterwarnings("ignore", message=".*Paged optimizers are not supported on CPU.*")
        warnings.filterwarnings("ignore", category=FutureWarning)
        yield


def _plain(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    return obj
