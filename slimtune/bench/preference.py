"""`slimtune bench --objective dpo`: one DPO step of slimtune against TRL's `DPOTrainer` loss on HF + PEFT +
bitsandbytes, on the same random-initialised 4-bit base, the same pairs, the same LoRA.

slimtune: the recipe's path — adapters injected, `fuse_model`, the `Paired("dpo")` objective (log-probs from the
streamed head; the reference is the same base with the adapters off, under no_grad). TRL (its version is in the
report): the base wrapped by `slimtune.bench.baseline.build_baseline` (PEFT LoRA on bitsandbytes `Linear4bit`,
HF gradient checkpointing as `DPOConfig`'s default), TRL's own fused LM head added as `DPOTrainer.__init__` adds
it (`trl.trainer.utils.add_fused_lm_head`), and the loss of `DPOTrainer._compute_loss` itself, run on a stand-in
for the trainer object (the settings it reads, an accelerator that does not gather); its reference is PEFT's
adapters-off model, as `DPOTrainer` does for a PEFT model without `ref_model`.

Figures per side: bytes saved for backward per pair and per token (`slimtune.bench.memory.saved_bytes`: distinct
storages, parameters apart; the device-independent activation measure), tokens/s (median over the timed steps
after one warm-up; forward + backward of both sequences and the reference forward), and on CUDA the peak
allocated memory per phase (forward, backward).
"""

from __future__ import annotations

import statistics
import time
import types
from collections import defaultdict
from typing import Any

import torch

from slimtune.adapters.base import get_adapter_class
from slimtune.adapters.inject import inject
from slimtune.bench.baseline import build_baseline
from slimtune.bench.bench_config import resolve_bench_config
from slimtune.bench.memory import saved_bytes
from slimtune.bench.random_model import random_base
from slimtune.config.objective import PreferenceConfig
from slimtune.models.fused import fuse_model
from slimtune.objectives.preference import Paired
from slimtune.train.checkpointing import enable_checkpointing

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def pair_batch(vocab: int, *, pairs: int, prompt: int, completion: int, seed: int, device: torch.device
               ) -> dict[str, torch.Tensor]:
    """``pairs`` random pairs: rows 0..P−1 chosen, P..2P−1 rejected, sharing their prompt; completions labelled."""
    g = torch.Generator().manual_seed(seed)
    T = prompt + completion
    ids = torch.randint(3, vocab, (2 * pairs, T), generator=g)
    ids[pairs:, :prompt] = ids[:pairs, :prompt]
    labels = ids.clone()
    labels[:, :prompt] = -100
    mask = torch.ones_like(ids)
    comp = torch.zeros_like(ids)
    comp[:, prompt:] = 1
    return {k: v.to(device) for k, v in dict(input_ids=ids, labels=labels, attention_mask=mask,
                                              completion_mask=comp).items()}


def _slimtune_side(config, dtype, device, rank: int, checkpointing: str, seed: int):
    model = random_base(config, device=device, dtype=dtype, quant="nf4", seed=seed)
    inject(model, get_adapter_class("lora").Config(kind="lora", rank=rank, alpha=2 * rank, targets=list(TARGETS)))
    fuse_model(model)
    enable_checkpointing(model, checkpointing)
    model.train()
    obj = Paired("dpo", PreferenceConfig(beta=0.1))

    def loss(batch):
        return obj.loss_sum(model, batch) / obj.count(batch)
    return model, loss


class _Accelerator:
    def __init__(self, device):
        self.device = device

    def gather(self, t):
        return t

    gather_for_metrics = gather

    def unwrap_model(self, m):
        return m


def _trl_side(config, dtype, device, rank: int, checkpointing: bool, seed: int):
    from trl.trainer.dpo_trainer import DPOTrainer
    from trl.trainer.utils import add_fused_lm_head

    base = random_base(config, device=device, dtype=dtype, quant="nf4", seed=seed)
    add_fused_lm_head(base, outputs=("log_probs", "entropy", "mean_logits", "is_top1"))  # as DPOTrainer.__init__
    model = build_baseline(base, kind="lora", rank=rank, alpha=2 * rank, targets=TARGETS, checkpointing=checkpointing)
    stand_in = types.SimpleNamespace(
        model=model, ref_model=None, accelerator=_Accelerator(device), aux_loss_enabled=False,
        precompute_ref_logps=False, ld_alpha=None, f_divergence_type="reverse_kl", loss_types=["sigmoid"],
        loss_weights=[1.0], beta=0.1, label_smoothing=0.0, use_weighting=False, _total_train_tokens=0, _tp_size=1,
        _metrics={"train": defaultdict(list), "eval": defaultdict(list)},
        args=types.SimpleNamespace(gradient_checkpointing_kwargs={"use_reentrant": False}))

    def loss(batch):
        inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "completion_mask")}
        return DPOTrainer._compute_loss(stand_in, model, inputs, return_outputs=False)
    return model, loss


def _measure(model, loss_fn, batch, *, steps: int, device: torch.device) -> dict[str, Any]:
    tokens = int(batch["attention_mask"].sum())
    sb = saved_bytes(lambda: loss_fn(batch), modules=[model])
    times, peaks = [], {}
    for i in range(steps + 1):
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        loss = loss_fn(batch)
        if device.type == "cuda":
            torch.cuda.synchronize()
            peaks["forward"] = max(peaks.get("forward", 0), torch.cuda.max_memory_allocated())
            torch.cuda.reset_peak_memory_stats()
        loss.backward()
        if device.type == "cuda":
            torch.cuda.synchronize()
            peaks["backward"] = max(peaks.get("backward", 0), torch.cuda.max_memory_allocated())
        model.zero_grad(set_to_none=True)
        if i:  # the first step warms up
            times.append(time.perf_counter() - t0)
    pairs = batch["input_ids"].shape[0] // 2
    return {"saved_bytes_per_pair": sb.activation_bytes / pairs, "saved_bytes_per_token": sb.activation_bytes / tokens,
            "tokens_per_second": tokens / statistics.median(times) if times else None,
            "peak_bytes": peaks or None, "loss": float(loss.detach())}


def preference_bench(model_config: str = "tiny", *, layers: int | None = 2, prompt: int = 128,
                     completion: int = 128, pairs: int = 1, rank: int = 16, steps: int = 2, seed: int = 0,
                     checkpointing: str = "full", device: str | None = None) -> dict[str, Any]:
    """Both sides on the same base and pairs (``layers``: decoder layers kept, None = all). ``checkpointing``:
    slimtune's `train.grad_checkpointing` ("none", "full", "offload"); the TRL side checkpoints unless "none"."""
    import trl

    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    cfg = resolve_bench_config(model_config, layers)  # "tiny", a built-in name, a folder, JSON or GGUF
    batch = pair_batch(cfg.vocab_size, pairs=pairs, prompt=prompt, completion=completion, seed=seed, device=dev)
    out: dict[str, Any] = {"model_config": model_config, "layers": cfg.num_hidden_layers, "pairs": pairs,
                           "prompt": prompt, "completion": completion, "rank": rank, "checkpointing": checkpointing,
                           "device": str(dev), "dtype": str(dtype).removeprefix("torch."), "trl_version": trl.__version__}
    for name, build in (("slimtune", lambda: _slimtune_side(cfg, dtype, dev, rank, checkpointing, seed)),
                        ("trl", lambda: _trl_side(cfg, dtype, dev, rank, checkpointing != "none", seed))):
        model, loss_fn = build()
        out[name] = _measure(model, loss_fn, batch, steps=steps, device=dev)
        del model, loss_fn
    out["saved_ratio"] = out["slimtune"]["saved_bytes_per_pair"] / max(out["trl"]["saved_bytes_per_pair"], 1)
    return out
