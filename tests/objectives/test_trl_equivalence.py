"""Every preference loss against TRL 1.16 on a tiny Llama with a LoRA adapter: the same weights, the same batch.

slimtune's side: the objective's loss (streamed log-probs, reference = the base with the adapters off) and its
gradient w.r.t. the adapter, and its logged metrics. TRL's side: TRL's own loss code (DPOTrainer._compute_loss,
KTOTrainer._compute_loss, CPOTrainer.cpo_loss, ORPOTrainer.odds_ratio_loss) called on a stand-in trainer object,
fed the log-probs of a plain HF forward (full logits → log_softmax) of the same model, the reference log-probs
from a separate copy of the base taken before the adapter was injected, its gradient flowing through the same
adapter. Only the numbers TRL computes are compared; nothing of slimtune's runs on TRL's side.
"""

from __future__ import annotations

import copy
import types
from collections import defaultdict

import pytest
import torch
import torch.nn.functional as F

from slimtune.adapters.base import get_adapter_class
from slimtune.adapters.inject import adapters_of, inject
from slimtune.config.objective import PreferenceConfig
from slimtune.models.load import QuantConfig, prepare_loaded
from slimtune.objectives.kto import KTO
from slimtune.objectives.preference import Paired

trl_dpo = pytest.importorskip("trl.trainer.dpo_trainer")
trl_kto = pytest.importorskip("trl.trainer.kto_trainer")
trl_cpo = pytest.importorskip("trl.experimental.cpo.cpo_trainer")
trl_orpo = pytest.importorskip("trl.experimental.orpo.orpo_trainer")

V = 97


def _model(seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=32, intermediate_size=72, num_attention_heads=4, num_key_value_heads=2,
                      num_hidden_layers=2, vocab_size=V, tie_word_embeddings=False)
    base = prepare_loaded(LlamaForCausalLM(cfg).eval(), None, QuantConfig(mode="none"), device=torch.device("cpu"),
                          source="tiny").model.double()
    ref = copy.deepcopy(base)
    lora = get_adapter_class("lora").Config(kind="lora", rank=4, alpha=8.0)
    inject(base, lora)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():  # move B off zero so the policy differs from the reference
        for a in adapters_of(base).values():
            for n in a.trainable_names():
                p = a.get_parameter(n)
                p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.3)
    return base, ref


def _rows(lengths, seed):
    """Rows of (prompt p, completion c) lengths, right-padded: input_ids, labels, attention_mask, completion_mask."""
    g = torch.Generator().manual_seed(seed)
    T = max(p + c for p, c in lengths)
    ids = torch.zeros(len(lengths), T, dtype=torch.long)
    labels = torch.full_like(ids, -100)
    mask, comp = torch.zeros_like(ids), torch.zeros_like(ids)
    for i, (p, c) in enumerate(lengths):
        ids[i, : p + c] = torch.randint(1, V, (p + c,), generator=g)
        labels[i, p: p + c] = ids[i, p: p + c]
        mask[i, : p + c] = 1
        comp[i, p: p + c] = 1
    return ids, labels, mask, comp


def _hf_token_logps(model, ids, mask, labels):
    """(N, T−1) log p(token t+1) from HF's full logits, 0 off the completion (what TRL's fused head returns)."""
    logits = model(input_ids=ids, attention_mask=mask).logits  # (N, T, V)
    lp = torch.log_softmax(logits[:, :-1].double(), dim=-1)
    t = labels[:, 1:]
    out = lp.gather(-1, t.clamp(min=0)[..., None]).squeeze(-1)
    return torch.where(t != -100, out, torch.zeros_like(out))


class _Acc:
    device = torch.device("cpu")

    def gather(self, t):
        return t

    gather_for_metrics = gather

    def unwrap_model(self, m):
        return m


def _stand_in(**attrs):
    """What TRL's loss code reads of its trainer: an accelerator that does not gather, metric lists, settings."""
    s = types.SimpleNamespace(accelerator=_Acc(), model=types.SimpleNamespace(training=True),
                              _metrics={"train": defaultdict(list), "eval": defaultdict(list)},
                              _total_train_tokens=0, _tp_size=1, aux_loss_enabled=False, **attrs)
    return s


def _hf_outputs(model):
    def call(input_ids, attention_mask, labels, **_):
        lp = _hf_token_logps(model, input_ids, attention_mask, labels)
        z = torch.zeros_like(lp)
        return types.SimpleNamespace(log_probs=lp, entropy=z, mean_logits=z, is_top1=z.bool())
    return call


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def _zero(model):
    for p in model.parameters():
        p.grad = None


PAIRS = [(5, 4), (3, 7), (6, 2)]  # (prompt, chosen completion); rejected completions differ in length
REJ = [(5, 6), (3, 3), (6, 5)]


def _pair_batch(seed=3):
    ids, labels, mask, comp = _rows(PAIRS + REJ, seed)
    for i, (p, _) in enumerate(PAIRS):  # the same prompt for both sides of pair i
        ids[i + len(PAIRS), :p] = ids[i, :p]
    return ids, labels, mask, comp


def _ours(obj, model, batch):
    _zero(model)
    loss = obj.loss_sum(model, batch) / obj.count(batch)
    loss.backward()
    return float(loss.detach()), _grads(model), obj.pop_metrics()


@pytest.mark.parametrize("kind,cfg", [("dpo", {"beta": 0.1}), ("dpo", {"beta": 0.5}), ("ipo", {"beta": 0.3})])
def test_dpo_ipo_equal_trl(kind, cfg):
    model, ref = _model()
    ids, labels, mask, comp = _pair_batch()
    batch = {"input_ids": ids, "labels": labels, "attention_mask": mask}
    loss, grads, metrics = _ours(Paired(kind, PreferenceConfig(**cfg)), model, batch)

    with torch.no_grad():
        ref_sums = _hf_token_logps(ref, ids, mask, labels).sum(-1)
    B = len(PAIRS)
    s = _stand_in(precompute_ref_logps=True, ld_alpha=None, f_divergence_type="reverse_kl", beta=cfg["beta"],
                  loss_types=["sigmoid" if kind == "dpo" else "ipo"], loss_weights=[1.0], use_weighting=False,
                  label_smoothing=0.0)
    inputs = {"input_ids": ids, "attention_mask": mask, "completion_mask": comp,
              "ref_chosen_logps": ref_sums[:B], "ref_rejected_logps": ref_sums[B:]}
    _zero(model)
    trl_loss = trl_dpo.DPOTrainer._compute_loss(s, _hf_outputs(model), inputs, return_outputs=False)
    trl_loss.backward()
    assert abs(loss - float(trl_loss)) < 1e-9 * max(1.0, abs(loss))
    for n, g in _grads(model).items():
        assert torch.allclose(grads[n], g, rtol=1e-7, atol=1e-11), n
    m = s._metrics["train"]
    for key in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen",
                "logps/rejected"):
        assert metrics[key] == pytest.approx(m[key][-1], rel=1e-7 if "acc" in key else 1e-9, abs=1e-12), key


def test_cdpo_label_smoothing_equals_trl_conservative_sigmoid():
    """cDPO's −(1−ε)·log σ(βΔ) − ε·log σ(−βΔ): TRL 1.16's DPO 'sigmoid' has no ε, its CPO 'sigmoid' has exactly this
    form on a difference of log-ratios (fed here the policy/reference log-ratios of an independent HF forward)."""
    model, ref = _model(seed=4)
    ids, labels, mask, _ = _pair_batch(seed=5)
    cfg = PreferenceConfig(beta=0.2, label_smoothing=0.25)
    loss, grads, _ = _ours(Paired("dpo", cfg), model, {"input_ids": ids, "labels": labels, "attention_mask": mask})
    _zero(model)
    B = len(PAIRS)
    with torch.no_grad():
        r = _hf_token_logps(ref, ids, mask, labels).sum(-1)
    p = _hf_token_logps(model, ids, mask, labels).sum(-1)
    s = _stand_in(alpha=0.0, beta=0.2, loss_type="sigmoid", label_smoothing=0.25)
    losses, _, _ = trl_cpo.CPOTrainer.cpo_loss(s, p[:B] - r[:B], p[B:] - r[B:])
    losses.mean().backward()
    assert loss == pytest.approx(float(losses.mean()), rel=1e-10)
    for n, g in _grads(model).items():
        assert torch.allclose(grads[n], g, rtol=1e-7, atol=1e-11), n


def test_simpo_equals_trl_cpo_simpo():
    model, _ = _model(seed=6)
    ids, labels, mask, comp = _pair_batch(seed=7)
    cfg = PreferenceConfig(beta=2.0, gamma=0.7, label_smoothing=0.1)
    loss, grads, metrics = _ours(Paired("simpo", cfg), model,
                                 {"input_ids": ids, "labels": labels, "attention_mask": mask})
    _zero(model)
    B = len(PAIRS)
    lp = _hf_token_logps(model, ids, mask, labels)
    mean = lp.sum(-1) / comp[:, 1:].sum(-1)  # TRL's average_log_prob
    s = _stand_in(alpha=0.0, beta=2.0, loss_type="simpo", simpo_gamma=0.7, label_smoothing=0.1)
    losses, cr, rr = trl_cpo.CPOTrainer.cpo_loss(s, mean[:B], mean[B:])
    losses.mean().backward()
    assert loss == pytest.approx(float(losses.mean()), rel=1e-10)
    for n, g in _grads(model).items():
        assert torch.allclose(grads[n], g, rtol=1e-7, atol=1e-11), n
    assert metrics["rewards/chosen"] == pytest.approx(float(cr.mean()), rel=1e-9)
    assert metrics["rewards/accuracies"] == pytest.approx(float((cr > rr).double().mean()))


def test_orpo_equals_trl_odds_ratio_plus_nll():
    """ORPO: TRL's odds_ratio_loss on mean log-probs plus its NLL of the chosen completions. TRL's NLL is a token
    mean over the batch and the paper's (ours) a per-sequence mean: equal here, all chosen completions being 4
    tokens long."""
    model, _ = _model(seed=8)
    pairs, rej = [(5, 4), (3, 4), (6, 4)], [(5, 6), (3, 2), (6, 5)]
    ids, labels, mask, comp = _rows(pairs + rej, 9)
    loss, grads, metrics = _ours(Paired("orpo", PreferenceConfig(beta=0.25)), model,
                                 {"input_ids": ids, "labels": labels, "attention_mask": mask})
    _zero(model)
    B = len(pairs)
    lp = _hf_token_logps(model, ids, mask, labels)
    mean = lp.sum(-1) / comp[:, 1:].sum(-1)
    logits = model(input_ids=ids[:B], attention_mask=mask[:B]).logits
    nll = F.cross_entropy(logits[:, :-1].reshape(-1, V).double(), labels[:B, 1:].reshape(-1), ignore_index=-100)
    s = _stand_in(beta=0.25)
    losses, cr, rr, _, _ = trl_orpo.ORPOTrainer.odds_ratio_loss(s, mean[:B], mean[B:])
    total = nll - losses.mean()
    total.backward()
    assert loss == pytest.approx(float(total), rel=1e-7)  # TRL's odds ratio runs in fp32 (.float())
    for n, g in _grads(model).items():
        assert torch.allclose(grads[n], g, rtol=1e-5, atol=1e-8), n
    assert metrics["rewards/margins"] == pytest.approx(float((cr - rr).mean()), rel=1e-5)  # fp32 in TRL


@pytest.mark.parametrize("labels_", [[True, False, True, False], [True, True, False, True]])
def test_kto_equals_trl(labels_):
    """KTO with the KL reference point from mismatched rows (prompt i + completion i−1), weights λ_D ≠ λ_U."""
    model, ref = _model(seed=10)
    lengths = [(4, 5), (6, 3), (3, 6), (5, 4)]
    ids, labels, mask, comp = _rows(lengths, 11)
    kl_ids, kl_labels, kl_mask, kl_comp = _rows([(p, lengths[i - 1][1]) for i, (p, _) in enumerate(lengths)], 12)
    for i, (p, _) in enumerate(lengths):  # KL row i: prompt i, completion of i−1
        q, c = lengths[i - 1]
        kl_ids[i, :p] = ids[i, :p]
        kl_ids[i, p: p + c] = ids[i - 1, q: q + c]
        kl_labels[i, p: p + c] = kl_ids[i, p: p + c]
    lab = torch.tensor(labels_)
    cfg = PreferenceConfig(beta=0.3, desirable_weight=1.0, undesirable_weight=1.5)
    batch = {"input_ids": ids, "labels": labels, "attention_mask": mask, "kto_label": lab,
             "kl_input_ids": kl_ids, "kl_labels": kl_labels, "kl_attention_mask": kl_mask}
    loss, grads, metrics = _ours(KTO(cfg), model, batch)

    with torch.no_grad():
        ref_lp = _hf_token_logps(ref, ids, mask, labels).sum(-1)
        ref_kl = _hf_token_logps(ref, kl_ids, kl_mask, kl_labels).sum(-1)
    s = _stand_in(calculate_KL=True, precompute_ref_logps=True, loss_type="kto", beta=0.3, desirable_weight=1.0,
                  undesirable_weight=1.5)
    s._compute_kl_logps = types.MethodType(trl_kto.KTOTrainer._compute_kl_logps, s)
    inputs = {"input_ids": ids, "attention_mask": mask, "completion_mask": comp, "label": lab.long(),
              "KL_input_ids": kl_ids, "KL_attention_mask": kl_mask, "KL_completion_mask": kl_comp,
              "ref_logps": ref_lp, "ref_KL_logps": ref_kl}
    _zero(model)
    trl_loss = trl_kto.KTOTrainer._compute_loss(s, _hf_outputs(model), inputs, return_outputs=False)
    trl_loss.backward()
    assert loss == pytest.approx(float(trl_loss), rel=1e-10)
    for n, g in _grads(model).items():
        assert torch.allclose(grads[n], g, rtol=1e-7, atol=1e-11), n
    m = s._metrics["train"]
    assert metrics["kl"] == pytest.approx(m["kl"][-1], rel=1e-6, abs=1e-12)
    for key in ("rewards/chosen", "rewards/rejected", "rewards/margins"):
        assert metrics[key] == pytest.approx(m[key][-1], rel=1e-9), key


def test_kto_float64_transcription_of_the_paper():
    """KTO eq. (7) written out on scalars: v = λ_D σ(β(r − z₀)) or λ_U σ(β(z₀ − r)); loss = λ_y − v."""
    from slimtune.objectives.kto import kto_losses

    cfg = PreferenceConfig(beta=0.7, desirable_weight=1.3, undesirable_weight=0.8)
    pol = torch.tensor([-3.0, -5.5, -2.25, -7.0], dtype=torch.float64)
    ref = torch.tensor([-3.5, -5.0, -2.0, -6.0], dtype=torch.float64)
    lab = torch.tensor([True, False, True, False])
    z0 = torch.tensor(0.4, dtype=torch.float64)
    got, _ = kto_losses(cfg, pol, ref, lab, z0)
    import math

    sig = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    for i in range(4):
        r = float(pol[i] - ref[i])
        want = 1.3 - 1.3 * sig(0.7 * (r - 0.4)) if lab[i] else 0.8 - 0.8 * sig(0.7 * (0.4 - r))
        assert float(got[i]) == pytest.approx(want, rel=1e-14)
