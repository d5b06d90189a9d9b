"""GRPO (Shao et al. 2024, DeepSeekMath) and its variants, as TRL 1.16's GRPOTrainer computes them.

A step's prompts are completed G times each by the model being trained (slimtune.objectives.rollout), the
completions scored by the reward functions (slimtune.objectives.rewards; r = Σ_f w_f·r_f), and each completion i
of a group gets the advantage A_i = r_i − mean_group(r), divided by std + 1e-4 (the unbiased std of its group with
``scale_rewards: group``, of all the step's rewards with ``batch``; not divided with ``none``, Dr. GRPO).

Per completion token t, with π, π_old and π_ref the token log-probs under the policy, the policy that sampled
(π_old = π detached unless the batch is reused, ``num_iterations`` > 1) and the reference (the adapters off):

    ρ_t = exp(π_t − π_old,t)   (``importance_sampling_level: sequence``: exp of the masked mean over the sequence)
    ℓ_t = −min(ρ_t·A, clip(ρ_t, 1−ε_low, 1+ε_high)·A) + β·(exp(π_ref − π) − (π_ref − π) − 1)

and the loss aggregates ℓ over the completion tokens (mask m): ``grpo`` Σ_i(Σ_t ℓ m / Σ_t m)/N; ``bnpo`` the
micro-batch's Σ ℓ m / Σ m averaged over micro-batches; ``dr_grpo`` Σ ℓ m / (N·max_new_tokens); ``dapo``
Σ ℓ m / Σ m over the whole step. The Trainer divides Σ loss_sum by Σ count over the step's micro-batches, which
gives TRL's accumulated loss for equal micro-batches. The token log-probs come from the streamed head
(slimtune.objectives.logprobs; no logits tensor).

Metrics (TRL's names): reward, reward_std, rewards/<fn>/mean, frac_reward_zero_std, completions/mean_length,
completions/clipped_ratio (no EOS within max_new_tokens), kl (β > 0), clip_ratio/low_mean, clip_ratio/high_mean,
clip_ratio/region_mean (token means).
"""

from __future__ import annotations

import json
from collections import defaultdict
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.nn as nn

from slimtune.adapters.inject import adapters_of
from slimtune.config.grpo import GRPOConfig
from slimtune.data.chat import IGNORE_INDEX
from slimtune.errors import RecipeError
from slimtune.eval.generate import _eos_ids
from slimtune.objectives.base import Objective
from slimtune.objectives.logprobs import adapters_off, completion_logps
from slimtune.objectives.rewards import Rewards
from slimtune.objectives.rollout import left_pad, sample

STD_EPS = 1e-4  # TRL's


def group_advantages(rewards: torch.Tensor, G: int, scale: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Advantages (N,) of rewards (N,) in groups of G consecutive completions, and the std used (N,)."""
    groups = rewards.view(-1, G)  # (N/G, G)
    mean = groups.mean(dim=1).repeat_interleave(G)
    if scale == "batch":
        std = rewards.std().expand_as(rewards) if rewards.numel() > 1 else torch.zeros_like(rewards)
    else:
        std = groups.std(dim=1).repeat_interleave(G)  # unbiased, as TRL's nanstd
    adv = rewards - mean
    return (adv if scale == "none" else adv / (std + STD_EPS)), std


class TokenTerms(NamedTuple):
    loss: torch.Tensor  # (N, T) or (N, 1) per-token loss ℓ (before masking)
    kl: torch.Tensor | None  # (N, T) k3 KL per token
    ratio: torch.Tensor  # (N, T) or (N, 1) ρ


def token_terms(logps: torch.Tensor, old: torch.Tensor, ref: torch.Tensor | None, adv: torch.Tensor,
                mask: torch.Tensor, cfg: GRPOConfig) -> TokenTerms:
    """ℓ, KL and ρ from token log-probs (N, T), advantages (N,) and the completion mask (N, T)."""
    log_ratio = logps - old
    if cfg.importance_sampling_level == "sequence":
        log_ratio = ((log_ratio * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).unsqueeze(-1)  # (N, 1)
    ratio = torch.exp(log_ratio)
    clipped = torch.clamp(ratio, 1 - cfg.epsilon, 1 + cfg.eps_high)
    a = adv.to(logps.dtype).unsqueeze(1)  # (N, 1)
    loss = -torch.min(ratio * a, clipped * a)
    kl = None
    if cfg.beta != 0.0:
        d = ref - logps
        kl = torch.exp(d) - d - 1
        loss = loss + cfg.beta * kl
    return TokenTerms(loss, kl, ratio)


def aggregate(loss: torch.Tensor, mask: torch.Tensor, loss_type: str, max_new_tokens: int) -> torch.Tensor:
    """The micro-batch's loss sum (0-dim), to be divided by the step's Σ ``units`` (see the module docstring)."""
    masked = loss * mask  # (N, T)
    if loss_type == "grpo":
        return (masked.sum(-1) / mask.sum(-1).clamp(min=1.0)).sum()
    if loss_type == "bnpo":
        return masked.sum() / mask.sum().clamp(min=1.0) * mask.shape[0]
    if loss_type == "dr_grpo":
        return masked.sum() / max_new_tokens
    if loss_type == "dapo":
        return masked.sum()
    raise ValueError(f"unknown loss_type {loss_type!r}")


def units(mask: torch.Tensor, loss_type: str) -> int:
    """What the step's loss is divided by: completion tokens (dapo) or sequences."""
    return int(mask.sum()) if loss_type == "dapo" else int(mask.shape[0])


def step_seed(seed: int, group: int, index: int) -> int:
    """The sampling seed of micro-batch ``index`` of generation ``group`` (the same after a resume)."""
    return int(np.random.SeedSequence([int(seed), int(group), int(index), 0x6770]).generate_state(1, np.uint64)[0]
               >> np.uint64(1))


class GRPO(Objective):
    """`train.objective: grpo` on `data.format: prompt` (slimtune.data.prompts). ``prepare`` samples, scores and
    collates the step's micro-batches (before any forward of the step); ``loss_sum`` is the clipped surrogate."""

    name = "grpo"
    generates = True

    def __init__(self, cfg: GRPOConfig, seed: int = 0):
        super().__init__()
        self.cfg, self.seed = cfg, seed
        self.rewards = Rewards(cfg.rewards)
        self.uses_reference = cfg.beta != 0.0
        self.tokenizer = None
        self.eos_ids: list[int] = []
        self.pad_id = 0
        self.buffer: tuple[int, list[dict[str, torch.Tensor]], dict[str, float]] | None = None  # (generation,
        # prepared micro-batches, their rollout metrics): reused by the num_iterations steps of a generation
        self.samples_path = None
        self._step_metrics: dict[str, float] = {}
        self._tok: dict[str, float] = defaultdict(float)

    # ---------------------------------------------------------------------------------------------- setup
    def setup(self, trainer) -> None:
        if trainer.dist is not None:
            raise RecipeError("train.objective: grpo runs in one process (torchrun / train.distributed is not "
                              "supported for it yet)")
        if self.uses_reference and not adapters_of(trainer.model):
            raise RecipeError("train.grpo.beta: the reference is the base with the adapters off, so full "
                              "fine-tuning needs beta: 0")
        self.tokenizer = trainer.tokenizer
        self.pad_id = int(trainer.data.pad_id)
        self.eos_ids = _eos_ids(trainer.model, self.tokenizer)  # the generation config's and the tokenizer's
        data = trainer.data
        if hasattr(data, "repeat"):  # each step's prompts μ times in a row (num_iterations)
            data.window, data.repeat = trainer.recipe.train.grad_accum, self.cfg.num_iterations
        if self.cfg.sample_every and trainer._writes:
            self.samples_path = trainer.run_dir / "samples.jsonl"

    def state_dict(self) -> dict[str, Any]:
        if self.buffer is None or self.cfg.num_iterations == 1:
            return {}
        return {"generation": self.buffer[0], "micro": [{k: v.cpu() for k, v in b.items()} for b in self.buffer[1]],
                "metrics": self.buffer[2]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.buffer = (state["generation"], state["micro"], state["metrics"]) if state else None

    # ---------------------------------------------------------------------------------------------- rollouts
    def prepare(self, trainer, micro: list[list[dict[str, Any]]]) -> list[dict[str, torch.Tensor]]:
        """The step's micro-batches of prompt examples → tensor batches with completions, advantages and (β > 0,
        μ > 1) the reference's and the sampling policy's token log-probs."""
        step = trainer.pos.step + 1
        gen = (step - 1) // self.cfg.num_iterations
        if self.buffer is not None and self.buffer[0] == gen:
            self._step_metrics = dict(self.buffer[2])  # the generation's rollout metrics, logged on each of its steps
            return [{k: v.to(trainer.device) for k, v in b.items()} for b in self.buffer[1]]
        model, device = trainer.model, trainer.device
        G = self.cfg.num_generations
        parts, all_rewards, per_fn, records, texts = [], [], [], [], []
        for i, exs in enumerate(micro):
            g = torch.Generator(device=device).manual_seed(step_seed(self.seed, gen, i))
            prompts = [e["prompt_ids"][-self.cfg.max_prompt_len:] for e in exs for _ in range(G)]
            p_ids, p_mask = left_pad(prompts, self.pad_id)
            p_ids, p_mask = p_ids.to(device), p_mask.to(device)
            ro = sample(model, p_ids, p_mask, max_new_tokens=self.cfg.max_new_tokens, eos_ids=self.eos_ids,
                        pad_id=self.pad_id, temperature=self.cfg.temperature, top_k=self.cfg.top_k,
                        top_p=self.cfg.top_p, generator=g)
            comp = [ro.ids[k, :int(ro.mask[k].sum())].tolist() for k in range(ro.ids.shape[0])]
            text = self.tokenizer.batch_decode(comp, skip_special_tokens=True)
            recs = [e for e in exs for _ in range(G)]
            r = self.rewards(recs, text, comp)  # (B·G, F)
            per_fn.append(r)
            all_rewards.append(r @ self.rewards.weights)
            records += recs
            texts += text
            parts.append(self._collate(p_ids, p_mask, ro))
        rewards = torch.cat(all_rewards)
        adv, std = group_advantages(rewards, G, self.cfg.scale_rewards)
        out, s = [], 0
        for b in parts:
            n = b["input_ids"].shape[0]
            b["advantages"] = adv[s:s + n].float().to(device)
            s += n
            self._extra_logps(model, b)
            out.append(b)
        self._rollout_metrics(rewards, torch.cat(per_fn), std, out)
        self._write_samples(step, records[:G], texts[:G], rewards[:G])
        if self.cfg.num_iterations > 1:
            self.buffer = (gen, out, dict(self._step_metrics))
        return out

    def _collate(self, p_ids: torch.Tensor, p_mask: torch.Tensor, ro) -> dict[str, torch.Tensor]:
        """(N, P + C) input_ids, attention_mask and labels (the completion's tokens; −100 elsewhere)."""
        ids = torch.cat([p_ids, ro.ids], dim=1)
        attn = torch.cat([p_mask, ro.mask], dim=1)
        labels = torch.full_like(ids, IGNORE_INDEX)
        P = p_ids.shape[1]
        labels[:, P:] = torch.where(ro.mask.bool(), ro.ids, torch.full_like(ro.ids, IGNORE_INDEX))
        return {"input_ids": ids, "attention_mask": attn, "labels": labels, "ended": ro.ended}

    @torch.no_grad()
    def _extra_logps(self, model: nn.Module, b: dict[str, torch.Tensor]) -> None:
        """The reference's (β > 0; the adapters off) and, when the batch is reused, the sampling policy's token
        log-probs (N, T), computed before any forward of the step with a gradient."""
        if not (self.uses_reference or self.cfg.num_iterations > 1):
            return
        was = model.training
        model.eval()
        try:
            if self.uses_reference:
                with adapters_off(model):
                    b["ref_logps"] = self._logps(model, b)
            if self.cfg.num_iterations > 1:
                b["old_logps"] = self._logps(model, b)
        finally:
            model.train(was)

    def _logps(self, model: nn.Module, b: dict[str, torch.Tensor]) -> torch.Tensor:
        return completion_logps(model, b["input_ids"], b["labels"], b["attention_mask"],
                                temperature=self.cfg.temperature).per_token

    # ---------------------------------------------------------------------------------------------- loss
    def count(self, batch: dict[str, torch.Tensor]) -> int:
        return units(completion_mask(batch["labels"]), self.cfg.loss_type)

    def loss_sum(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        logps = self._logps(model, batch)  # (N, T)
        mask = completion_mask(batch["labels"]).to(logps.dtype)
        old = batch["old_logps"].to(logps.dtype) if "old_logps" in batch else logps.detach()
        ref = batch["ref_logps"].to(logps.dtype) if "ref_logps" in batch else None
        terms = token_terms(logps, old, ref, batch["advantages"], mask, self.cfg)
        self._token_metrics(terms, batch["advantages"], mask)
        return aggregate(terms.loss, mask, self.cfg.loss_type, self.cfg.max_new_tokens)

    # ---------------------------------------------------------------------------------------------- evaluation
    @torch.no_grad()
    def evaluate(self, model: nn.Module, records: list[dict[str, Any]], *, device: torch.device,
                 batch_size: int = 16) -> dict[str, Any]:
        """Held-out prompts (at most ``eval_max_prompts``), one greedy completion each: {"loss": −mean reward (so
        the lowest is the best), "examples", "rewards/mean", "rewards/pass@1" (the share whose reward reaches
        ``pass_reward``), "rewards/<fn>/mean", "completions/mean_length"}."""
        records = records[:self.cfg.eval_max_prompts]
        per_fn, lengths = [], []
        for s in range(0, len(records), batch_size):
            exs = records[s:s + batch_size]
            p_ids, p_mask = left_pad([e["prompt_ids"][-self.cfg.max_prompt_len:] for e in exs], self.pad_id)
            ro = sample(model, p_ids.to(device), p_mask.to(device), max_new_tokens=self.cfg.max_new_tokens,
                        eos_ids=self.eos_ids, pad_id=self.pad_id, temperature=0)
            comp = [ro.ids[k, :int(ro.mask[k].sum())].tolist() for k in range(len(exs))]
            per_fn.append(self.rewards(exs, self.tokenizer.batch_decode(comp, skip_special_tokens=True), comp))
            lengths += [len(c) for c in comp]
        r = torch.cat(per_fn)  # (n, F)
        total = r @ self.rewards.weights
        return {"loss": -float(total.mean()), "examples": len(records), "rewards/mean": float(total.mean()),
                "rewards/pass@1": float((total >= self.cfg.pass_reward).double().mean()),
                **{f"rewards/{n}/mean": float(r[:, j].mean()) for j, n in enumerate(self.rewards.names)},
                "completions/mean_length": sum(lengths) / max(len(lengths), 1)}

    # ---------------------------------------------------------------------------------------------- metrics
    def _rollout_metrics(self, rewards, per_fn, std, batches) -> None:
        m = {"reward": float(rewards.mean()), "reward_std": float(rewards.std()) if rewards.numel() > 1 else 0.0,
             "frac_reward_zero_std": float(torch.isclose(std, torch.zeros_like(std)).double().mean())}
        for j, name in enumerate(self.rewards.names):
            m[f"rewards/{name}/mean"] = float(per_fn[:, j].mean())
        lengths = torch.cat([completion_mask(b["labels"]).sum(-1) for b in batches]).double()
        ended = torch.cat([b["ended"] for b in batches])
        m["completions/mean_length"] = float(lengths.mean())
        m["completions/clipped_ratio"] = float((~ended).double().mean())
        self._step_metrics = m

    def _token_metrics(self, terms: TokenTerms, adv: torch.Tensor, mask: torch.Tensor) -> None:
        """Token means of the micro-batch (clip fractions as TRL counts them: ratio out of the band on the side the
        advantage's sign makes binding; KL), averaged over the step's micro-batches by pop_metrics."""
        a = adv.unsqueeze(1)
        r = terms.ratio.detach()
        low = (r < 1 - self.cfg.epsilon) & (a < 0)
        high = (r > 1 + self.cfg.eps_high) & (a > 0)
        n = mask.sum().clamp(min=1.0)
        t = self._tok
        t["micro"] += 1
        for key, flag in (("low", low), ("high", high), ("region", low | high)):
            f = flag.to(mask.dtype)  # sequence level: one ratio per sequence, the mean over sequences
            t[f"clip_ratio/{key}_mean"] += float(f.mean() if f.shape[1] == 1 else (f * mask).sum() / n)
        if terms.kl is not None:
            t["kl"] += float((terms.kl.detach() * mask).sum() / n)

    def pop_metrics(self) -> dict[str, float]:
        n = max(self._tok.pop("micro", 0.0), 1.0)
        out = {**self._step_metrics, **{k: v / n for k, v in self._tok.items()}}
        self._tok.clear()
        return out

    def _write_samples(self, step: int, recs, texts, rewards) -> None:
        if self.samples_path is None or step % self.cfg.sample_every:
            return
        with open(self.samples_path, "a") as f:
            for rec, text, r in zip(recs, texts, rewards.tolist()):
                f.write(json.dumps({"step": step, "where": rec["where"], "completion": text, "reward": r}) + "\n")


def completion_mask(labels: torch.Tensor) -> torch.Tensor:
    """(N, T) bool: positions whose next token is a completion token (the alignment of completion_logps)."""
    return torch.nn.functional.pad(labels, (0, 1), value=IGNORE_INDEX)[..., 1:] != IGNORE_INDEX
