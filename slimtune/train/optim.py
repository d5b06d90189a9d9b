"""Optimizers (torch AdamW, bitsandbytes 8-bit / paged AdamW) and warm-up + decay schedules."""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from slimtune.config.recipe import TrainConfig


def _inner_optimizer(groups: list[dict], cfg: TrainConfig) -> torch.optim.Optimizer:
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, foreach=False)
    import bitsandbytes as bnb

    cls = bnb.optim.PagedAdamW8bit if cfg.optimizer == "paged_adamw8bit" else bnb.optim.AdamW8bit
    return cls(groups, lr=cfg.lr, betas=cfg.betas)


def build_optimizer(params: list[nn.Parameter], cfg: TrainConfig) -> torch.optim.Optimizer:
    """One param group with weight decay on matrices, one without for vectors (norms, DoRA magnitudes).

    With ``train.adapter_dtype: bfloat16`` or ``train.optimizer_on: cpu`` the optimizer is :class:`MasterWeights`:
    fp32 master copies that only the optimizer holds (elsewhere the parameters step in their own dtype, as before).
    """
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    groups = [g for g in ({"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}) if g["params"]]
    on_host = cfg.optimizer_on == "cpu"
    if on_host or cfg.adapter_dtype != "float32":
        return MasterWeights(groups, lambda g: _inner_optimizer(g, cfg), device="cpu" if on_host else None)
    return _inner_optimizer(groups, cfg)


class PairedOptimizer(torch.optim.Optimizer):
    """An optimizer whose ``param_groups`` hold the model's parameters (what clipping, ``zero_grad`` and the lr
    schedule see) while an inner optimizer, ``self.inner``, steps other tensors paired one to one with them, group
    by group: fp32 masters (``MasterWeights``), each rank's shards (``slimtune.train.fsdp.LocalShards``)."""

    inner: torch.optim.Optimizer

    def _pairs(self):
        for gw, gi in zip(self.param_groups, self.inner.param_groups):
            yield from zip(gw["params"], gi["params"])

    def _sync_hyperparameters(self) -> None:
        """Outer → inner: the lr the schedule set (and anything else edited on the outer groups)."""
        for gw, gi in zip(self.param_groups, self.inner.param_groups):
            gi.update({k: v for k, v in gw.items() if k != "params"})

    def _adopt_hyperparameters(self) -> None:
        """Inner → outer: lr, betas, ... as the inner optimizer has them (after building or loading it)."""
        for gw, gi in zip(self.param_groups, self.inner.param_groups):
            gw.update({k: v for k, v in gi.items() if k != "params"})


class MasterWeights(PairedOptimizer):
    """Steps fp32 master copies of the parameters with an inner optimizer, then writes them back.

    The model's parameters (e.g. bf16 adapters: 2 B/value, and their bf16 gradients) are what this optimizer's
    ``param_groups`` hold, so gradient clipping, ``zero_grad`` and the lr schedule work on them unchanged. The fp32
    masters (4 B/value) and the inner optimizer's state (AdamW: 8 B/value, 8-bit AdamW: ~2 B/value) exist only
    here, on ``device`` (None: each parameter's own device; "cpu": host memory, the GPU then holds only the
    parameters and their gradients). Each step casts the gradients to fp32 next to the masters, steps, and rounds
    the masters back into the parameters; small updates accumulate in the masters instead of being lost to bf16
    rounding.
    """

    def __init__(self, groups: list[dict], make_inner, *, device: str | torch.device | None = None):
        super().__init__(groups, {})
        self.device = None if device is None else torch.device(device)  # where the masters live (None: with p)
        inner_groups = []
        for g in self.param_groups:
            masters = [p.detach().to(device or p.device, torch.float32, copy=True).requires_grad_(True)
                       for p in g["params"]]
            inner_groups.append({**{k: v for k, v in g.items() if k != "params"}, "params": masters})
        self.inner = make_inner(inner_groups)
        self._adopt_hyperparameters()  # lr, betas, ...: what the schedule edits

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        self._sync_hyperparameters()
        for p, m in self._pairs():
            m.grad = None if p.grad is None else p.grad.to(m.device, torch.float32)
        self.inner.step()
        for p, m in self._pairs():
            if m.grad is not None:
                p.copy_(m.to(p.device, non_blocking=True))
                m.grad = None
        return loss

    def state_dict(self) -> dict:
        self._sync_hyperparameters()  # the schedule may have changed the lr since the last step
        return {"inner": self.inner.state_dict(), "masters": [m.detach().clone() for _, m in self._pairs()]}

    def load_state_dict(self, state_dict: dict) -> None:
        self.inner.load_state_dict(state_dict["inner"])
        with torch.no_grad():
            for (p, m), saved in zip(self._pairs(), state_dict["masters"], strict=True):
                m.copy_(saved)
                p.copy_(m)
        self._adopt_hyperparameters()

    def drop_frozen(self) -> int:
        dropped = 0
        for gw, gi in zip(self.param_groups, self.inner.param_groups):
            keep = [(p, m) for p, m in zip(gw["params"], gi["params"]) if p.requires_grad]
            for p, m in zip(gw["params"], gi["params"]):
                if not p.requires_grad:
                    self.inner.state.pop(m, None)
                    dropped += 1
            gw["params"], gi["params"] = [p for p, _ in keep], [m for _, m in keep]
        return dropped


def warmup_steps(cfg: TrainConfig, total_steps: int) -> int:
    return int(round(cfg.warmup * total_steps)) if cfg.warmup < 1 else int(cfg.warmup)


def lr_factor(step: int, *, total_steps: int, warmup: int, schedule: str) -> float:
    """Multiplier of the peak lr for the update made at optimizer step ``step`` (0-based)."""
    if warmup > 0 and step < warmup:
        return (step + 1) / (warmup + 1)
    if schedule == "constant":
        return 1.0
    progress = (step - warmup) / max(1, total_steps - warmup)
    progress = min(max(progress, 0.0), 1.0)
    if schedule == "linear":
        return 1.0 - progress
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def build_scheduler(opt: torch.optim.Optimizer, cfg: TrainConfig, total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    w = warmup_steps(cfg, total_steps)
    return torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: lr_factor(s, total_steps=total_steps, warmup=w, schedule=cfg.schedule)
    )


def drop_frozen(opt: torch.optim.Optimizer) -> int:
    """Remove parameters whose requires_grad turned False (e.g. LaMDA's B once fully frozen) and their state."""
    if isinstance(opt, MasterWeights):
        return opt.drop_frozen()
    dropped = 0
    for group in opt.param_groups:
        keep = []
        for p in group["params"]:
            if p.requires_grad:
                keep.append(p)
            else:
                opt.state.pop(p, None)
                dropped += 1
        group["params"] = keep
    return dropped
