"""Optimizers (torch AdamW, bitsandbytes 8-bit / paged AdamW) and warm-up + decay schedules."""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from slimtune.config.recipe import TrainConfig


def build_optimizer(params: list[nn.Parameter], cfg: TrainConfig) -> torch.optim.Optimizer:
    """One param group with weight decay on matrices, one without for vectors (norms, DoRA magnitudes)."""
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    groups = [g for g in ({"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}) if g["params"]]
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, foreach=False)
    import bitsandbytes as bnb

    cls = bnb.optim.PagedAdamW8bit if cfg.optimizer == "paged_adamw8bit" else bnb.optim.AdamW8bit
    return cls(groups, lr=cfg.lr, betas=cfg.betas)


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
