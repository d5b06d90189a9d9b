"""GRPO's loss against TRL 1.16's GRPOTrainer._compute_loss on a tiny Llama with a LoRA adapter: the same weights,
the same prompts, completions, advantages, old and reference log-probs, two accumulated micro-batches.

slimtune's side: GRPO.count / GRPO.loss_sum (streamed log-probs of the completion tokens, temperature-scaled), the
step's Σ loss_sum / Σ count as the Trainer forms it, its adapter gradient, its metrics. TRL's side: TRL's own
_compute_loss, called on a stand-in trainer object whose _get_per_token_logps_and_entropies is a plain HF forward
(full logits / temperature → log_softmax) of the same model; each micro-batch's loss (already divided by the
accumulation steps) summed and backpropagated. Only the numbers TRL computes are compared.
"""

from __future__ import annotations

import statistics
import types
from collections import defaultdict

import pytest
import torch

from slimtune.adapters.base import get_adapter_class
from slimtune.adapters.inject import adapters_of, inject
from slimtune.config.grpo import GRPOConfig
from slimtune.models.load import QuantConfig, prepare_loaded
from slimtune.objectives.grpo import GRPO, group_advantages

trl_grpo = pytest.importorskip("trl.trainer.grpo_trainer")

V = 97
T_SAMPLE = 0.7  # sampling temperature: both sides score log softmax(logits / T)


def _model(seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=32, intermediate_size=72, num_attention_heads=4, num_key_value_heads=2,
                      num_hidden_layers=2, vocab_size=V, tie_word_embeddings=False)
    model = prepare_loaded(LlamaForCausalLM(cfg).eval(), None, QuantConfig(mode="none"), device=torch.device("cpu"),
                           source="tiny").model.double()
    inject(model, get_adapter_class("lora").Config(kind="lora", rank=4, alpha=8.0))
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():  # B off zero: the adapter matters
        for a in adapters_of(model).values():
            for n in a.trainable_names():
                p = a.get_parameter(n)
                p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.3)
    return model


def _micro(prompt_lens, comp_lens, seed):
    """TRL's inputs (left-padded prompts, right-padded completions) and the same rows as slimtune's batch."""
    g = torch.Generator().manual_seed(seed)
    N, P, C = len(prompt_lens), max(prompt_lens), max(comp_lens)
    p_ids, p_mask = torch.zeros(N, P, dtype=torch.long), torch.zeros(N, P, dtype=torch.long)
    c_ids, c_mask = torch.zeros(N, C, dtype=torch.long), torch.zeros(N, C, dtype=torch.long)
    for i, (p, c) in enumerate(zip(prompt_lens, comp_lens)):
        p_ids[i, P - p:] = torch.randint(1, V, (p,), generator=g)
        p_mask[i, P - p:] = 1
        c_ids[i, :c] = torch.randint(1, V, (c,), generator=g)
        c_mask[i, :c] = 1
    ids = torch.cat([p_ids, c_ids], 1)
    attn = torch.cat([p_mask, c_mask], 1)
    labels = torch.full_like(ids, -100)
    labels[:, P:] = torch.where(c_mask.bool(), c_ids, torch.full_like(c_ids, -100))
    # old / reference log-probs: the policy's plus noise (ratios off 1, some clipped), as TRL's (N, C) and ours (N, T)
    old_c = (torch.randn(N, C, generator=g, dtype=torch.float64)
             + torch.randn(N, 1, generator=g, dtype=torch.float64)) * 0.3  # per-row offsets: sequence ratios off 1
    ref_c = torch.randn(N, C, generator=g, dtype=torch.float64) * 0.3
    trl_in = {"prompt_ids": p_ids, "prompt_mask": p_mask, "completion_ids": c_ids, "completion_mask": c_mask}
    ours = {"input_ids": ids, "attention_mask": attn, "labels": labels}
    return trl_in, ours, old_c, ref_c


def _hf_logps(model, input_ids, attention_mask, logits_to_keep, **_):
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits[:, -logits_to_keep - 1:-1]
    lp = torch.log_softmax(logits.double() / T_SAMPLE, dim=-1)
    out = lp.gather(-1, input_ids[:, -logits_to_keep:, None]).squeeze(-1)
    return out, torch.zeros_like(out), None


class _Acc:
    num_processes = 1

    def reduce(self, t, reduction="sum"):
        return t

    def gather(self, t):
        return t

    gather_for_metrics = gather


def _stand_in(model, cfg: GRPOConfig, ga: int):
    return types.SimpleNamespace(
        accelerator=_Acc(), model=types.SimpleNamespace(training=True),
        _metrics={"train": defaultdict(list), "eval": defaultdict(list)},
        _get_per_token_logps_and_entropies=lambda m, ids, mask, k, **kw: _hf_logps(m, ids, mask, k),
        top_entropy_quantile=1.0, aux_loss_enabled=False, off_policy_mask_threshold=None,
        importance_sampling_level=cfg.importance_sampling_level, beta=cfg.beta, loss_type=cfg.loss_type,
        epsilon_low=cfg.epsilon, epsilon_high=cfg.eps_high, use_vllm=False, vllm_importance_sampling_correction=False,
        current_gradient_accumulation_steps=ga, max_completion_length=cfg.max_new_tokens,
        _entropy_bonus_enabled=False, use_adaptive_entropy=False,
        args=types.SimpleNamespace(use_bias_correction_kl=False, delta=None, steps_per_generation=ga))


def _grads(model):
    g = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    for p in model.parameters():
        p.grad = None
    return g


MICRO = [([4, 4, 4, 4, 6, 6, 6, 6], [5, 2, 7, 3, 4, 6, 1, 5]), ([3, 3, 3, 3, 5, 5, 5, 5], [6, 6, 2, 4, 3, 7, 5, 2])]
REWARDS = [0.0, 1.0, 0.5, 1.0, 0.0, 0.0, 1.0, 0.25, 1.0, 1.0, 1.0, 1.0, 0.0, 0.75, 0.5, 0.0]  # 4 groups of G = 4


@pytest.mark.parametrize("loss_type,level,beta,reuse,scale", [
    ("grpo", "token", 0.0, True, "group"), ("bnpo", "token", 0.04, True, "group"),
    ("dr_grpo", "token", 0.04, True, "none"), ("dapo", "token", 0.0, True, "batch"),
    ("dapo", "token", 0.04, False, "group"), ("grpo", "sequence", 0.04, True, "group"),
    ("dapo", "sequence", 0.0, True, "group")])
def test_grpo_loss_gradient_metrics_match_trl(loss_type, level, beta, reuse, scale):
    cfg = GRPOConfig(num_generations=4, max_new_tokens=8, temperature=T_SAMPLE, beta=beta, epsilon=0.2,
                     epsilon_high=0.28, loss_type=loss_type, importance_sampling_level=level, scale_rewards=scale,
                     num_iterations=2 if reuse else 1, rewards=[{"fn": "exact"}])
    model = _model()
    adv, _ = group_advantages(torch.tensor(REWARDS, dtype=torch.float64), 4, scale)
    micro = [_micro(p, c, seed=10 + i) for i, (p, c) in enumerate(MICRO)]
    with torch.no_grad():  # the old policy near the current one (ratios around 1, some clipped)
        base = [_hf_logps(model, torch.cat([t["prompt_ids"], t["completion_ids"]], 1),
                          torch.cat([t["prompt_mask"], t["completion_mask"]], 1), t["completion_ids"].shape[1])[0]
                for t, *_ in micro]

    # TRL: each micro-batch's _compute_loss (÷ accumulation steps inside), summed, one backward
    ga = len(micro)
    trl = _stand_in(model, cfg, ga)
    n_items = sum(int(t["completion_mask"].sum()) for t, *_ in micro)
    total = 0.0
    for k, ((t, _, old_c, ref_c), b0) in enumerate(zip(micro, base)):
        n = t["prompt_ids"].shape[0]
        inp = {**t, "advantages": adv[k * n:(k + 1) * n], "num_items_in_batch": torch.tensor(float(n_items))}
        if reuse:
            inp["old_per_token_logps"] = b0 + old_c
        if beta:
            inp["ref_per_token_logps"] = b0 + ref_c
        total = total + trl_grpo.GRPOTrainer._compute_loss(trl, model, inp)
    total.backward()
    trl_grads = _grads(model)
    trl_metrics = {k: sum(v) / len(v) for k, v in trl._metrics["train"].items()}

    # slimtune: Σ loss_sum / Σ count over the step, one backward
    obj = GRPO(cfg)
    batches = []
    for k, ((t, b, old_c, ref_c), b0) in enumerate(zip(micro, base)):
        n, P = b["input_ids"].shape[0], t["prompt_ids"].shape[1]
        b = {**b, "advantages": adv[k * n:(k + 1) * n]}
        C = t["completion_ids"].shape[1]
        for key, noise, on in (("old_logps", old_c, reuse), ("ref_logps", ref_c, beta)):
            if on:
                full = torch.zeros(n, P + C, dtype=torch.float64)
                full[:, P - 1:P - 1 + C] = (b0 + noise) * t["completion_mask"]
                b[key] = full
        batches.append(b)
    units = sum(obj.count(b) for b in batches)
    ours = sum(obj.loss_sum(model, b) for b in batches) / units
    ours.backward()
    our_grads = _grads(model)
    our_metrics = obj.pop_metrics()

    assert float(ours.detach()) == pytest.approx(float(total.detach()), rel=1e-9, abs=1e-12)
    assert set(our_grads) == set(trl_grads)
    for n in trl_grads:
        torch.testing.assert_close(our_grads[n], trl_grads[n], rtol=1e-7, atol=1e-10, msg=n)
    assert any(float(g.abs().max()) > 0 for g in trl_grads.values())
    keys = [k for k in trl_metrics if k.startswith("clip_ratio/") and k.endswith("_mean")] + (["kl"] if beta else [])
    for k in keys:
        assert our_metrics[k] == pytest.approx(trl_metrics[k], rel=1e-6, abs=1e-9), k  # TRL counts in fp32
    if reuse:
        assert trl_metrics["clip_ratio/region_mean"] > 0  # the clipped branch was exercised


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_group_advantages_float64_formula(scale):
    """A_i = r_i − mean(group), ÷ (unbiased std of the group / of all rewards + 1e-4) unless scale none."""
    r = [0.0, 1.0, 0.5, 1.0, 0.2, 0.2, 0.2, 0.2, 1.0, 0.0, 0.0, 0.0]
    adv, std = group_advantages(torch.tensor(r, dtype=torch.float64), 4, scale)
    for i, x in enumerate(r):
        grp = r[i // 4 * 4:i // 4 * 4 + 4]
        s = statistics.stdev(r) if scale == "batch" else statistics.stdev(grp)
        want = x - statistics.fmean(grp)
        if scale != "none":
            want /= s + 1e-4
        assert float(adv[i]) == pytest.approx(want, rel=1e-12, abs=1e-12)
        assert float(std[i]) == pytest.approx(s, rel=1e-12, abs=1e-15)
    if scale != "none":
        assert float(adv[4:8].abs().max()) == 0.0  # a group of equal rewards: no signal
