"""GRPO in the one Trainer on a tiny NF4 Llama with LoRA: rollouts with a KV cache equal transformers' generate,
sampling is seeded by the step, the reward of a reward-only task rises, a stop + resume (rollouts reused over
num_iterations, the reference term on) reproduces the uninterrupted run exactly, samples are written."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from slimtune.adapters.base import get_adapter_class
from slimtune.adapters.inject import adapters_of, inject
from slimtune.config.recipe import load_recipe_dict
from slimtune.data.prompts import PromptData
from slimtune.models.fused import fuse_model
from slimtune.models.load import QuantConfig, prepare_loaded
from slimtune.models.tiny import tiny_llama_config, tiny_tokenizer
from slimtune.objectives.rollout import left_pad, sample
from slimtune.ops.dispatch import set_backend
from slimtune.train.evaluation import recipe_callbacks
from slimtune.train.loop import Trainer

DATA = Path(__file__).resolve().parents[2] / "recipes" / "data" / "demo_dates_train.jsonl"
REWARD = "def low_ids(prompts, completions, completion_ids, **kw):\n" \
         "    return [sum(i < 256 for i in ids) / max(len(ids), 1) for ids in completion_ids]\n"


def loaded(init=0.2):
    """A tiny NF4 Llama whose larger initialisation gives peaked next-token distributions (a random model with
    the default 0.02 is near-uniform over 512 tokens, which a reward moves only slowly)."""
    tok = tiny_tokenizer()
    torch.manual_seed(0)
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM(tiny_llama_config(vocab_size=len(tok), initializer_range=init))
    return prepare_loaded(model, tok, QuantConfig(mode="nf4"), device=torch.device("cpu"), source="tiny")


def recipe(tmp_path, records=16, data=None, **grpo):
    train = grpo.pop("train", {})
    return load_recipe_dict({
        "name": "t", "model": {"name": "tiny-llama"}, "quant": {"mode": "nf4"},
        "adapter": {"kind": "lora", "rank": 8, "alpha": 16},
        "data": {"sources": [{"path": str(DATA), "max_records": records}], "format": "prompt", "max_seq_len": 64,
                 **(data or {})},
        "train": {"lr": 1e-2, "steps": 12, "micro_batch": 2, "warmup": 0, "seed": 3, "fused": False,
                  "schedule": "constant", "objective": "grpo", **train,
                  "grpo": {"num_generations": 8, "max_new_tokens": 2,
                           "rewards": [{"fn": "grpo_test_rewards:low_ids"}], **grpo}},
        "output": {"dir": str(tmp_path / "run"), "export_peft": False},
    })


@pytest.fixture(autouse=True)
def reward_module(tmp_path, monkeypatch):
    (tmp_path / "grpo_test_rewards.py").write_text(REWARD)
    monkeypatch.syspath_prepend(str(tmp_path))


def rows(run):
    return [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]


def _adapted(fused=False):
    L = loaded(init=0.02)
    inject(L.model, get_adapter_class("lora").Config(kind="lora", rank=4, alpha=8.0))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # B off zero: generation must see the adapter
        for a in adapters_of(L.model).values():
            for n in a.trainable_names():
                p = a.get_parameter(n)
                p.add_(torch.randn(p.shape, generator=g) * 0.5)
    if fused:  # the fused ops (the recipe default) with the KV cache
        set_backend("auto")
        fuse_model(L.model)
    tok = L.tokenizer
    ids, mask = left_pad([torch.tensor(tok(t)["input_ids"]) for t in ("hello there friend", "a b", "x")],
                         tok.pad_token_id)
    return L.model, ids, mask


@pytest.mark.parametrize("fused", [False, True])
def test_greedy_rollout_equals_generate_and_stops_at_eos(fused):
    model, ids, mask = _adapted(fused)
    hf = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False,
                        pad_token_id=3, eos_token_id=None)[:, ids.shape[1]:]
    ro = sample(model, ids, mask, max_new_tokens=6, eos_ids=[], pad_id=3, temperature=0)
    assert torch.equal(ro.ids, hf) and bool(ro.mask.all()) and not bool(ro.ended.any())
    eos = int(hf[0, 2])  # row 0 ends at its third token (EOS kept in the mask), the other rows as they go
    ro = sample(model, ids, mask, max_new_tokens=6, eos_ids=[eos], pad_id=3, temperature=0)
    for r in range(ids.shape[0]):
        hit = (hf[r] == eos).nonzero()
        n = int(hit[0]) + 1 if len(hit) else 6
        assert int(ro.mask[r].sum()) == n and bool(ro.ended[r]) == bool(len(hit))
        assert torch.equal(ro.ids[r, :n], hf[r, :n]) and bool((ro.ids[r, n:] == 3).all())
    assert int(ro.mask[0].sum()) == 3


def test_sampling_is_seeded_and_top_k_1_is_greedy():
    model, ids, mask = _adapted()

    def draw(seed, **kw):
        g = torch.Generator().manual_seed(seed)
        return sample(model, ids, mask, max_new_tokens=8, eos_ids=[], pad_id=3, generator=g, **kw).ids

    assert torch.equal(draw(5), draw(5))
    assert not torch.equal(draw(5), draw(6))
    greedy = sample(model, ids, mask, max_new_tokens=8, eos_ids=[], pad_id=3, temperature=0).ids
    assert torch.equal(draw(7, top_k=1), greedy)
    assert torch.equal(draw(7, top_p=1e-6), greedy)  # the nucleus holds only the top token


def test_prompt_windows_repeat_for_num_iterations():
    exs = [{"prompt_ids": torch.tensor([i])} for i in range(6)]
    d = PromptData(examples=exs, stats={}, holdout=[], pad_id=0, seed=0, shuffle=False)
    d.window, d.repeat = 2, 2
    got = [[int(e["prompt_ids"]) for e in b] for b in d.batches(1, epoch=0)]
    assert got == [[0], [1], [0], [1], [2], [3], [2], [3], [4], [5], [4], [5]]
    assert d.num_batches(1) == 12
    assert [[int(e["prompt_ids"]) for e in b] for b in d.batches(1, epoch=0, start=5)] == got[5:]


@pytest.mark.slow
@pytest.mark.parametrize("fused", [False, True])
def test_reward_rises_from_reward_alone(tmp_path, fused):
    """The reward (share of completion tokens with id < 256) climbs over 16 steps of GRPO, on the training and on
    held-out prompts."""
    rec = recipe(tmp_path, records=24, sample_every=4, train={"eval_every": 8, "steps": 16, "fused": fused},
                 data={"holdout": 8})
    t = Trainer(rec, run_dir=tmp_path / "run", loaded=loaded(), callbacks=recipe_callbacks(rec))
    t.setup()
    t.train()
    r = rows(tmp_path / "run")
    rewards = [x["reward"] for x in r]
    assert sum(rewards[-3:]) / 3 > sum(rewards[:3]) / 3 + 0.15, rewards
    assert all(x["rewards/low_ids/mean"] == x["reward"] for x in r)  # one function of weight 1
    assert all(1.0 <= x["completions/mean_length"] <= 2.0 for x in r)  # max_new_tokens 2 (EOS may come first)
    samples = [json.loads(ln) for ln in (tmp_path / "run" / "samples.jsonl").read_text().splitlines()]
    assert sorted({s["step"] for s in samples}) == [4, 8, 12, 16] and len(samples) == 4 * 8
    val = [json.loads(ln) for ln in (tmp_path / "run" / "val_metrics.jsonl").read_text().splitlines()]
    assert [v["step"] for v in val] == [0, 8, 16] and all(v["val_examples"] == 8 for v in val)
    assert all(0 <= v["val_rewards_pass@1"] <= v["val_rewards_mean"] <= 1 for v in val)  # pass: reward 1
    assert val[-1]["val_rewards_mean"] > val[0]["val_rewards_mean"], val  # held-out greedy reward rises
    assert all(v["val_loss"] == -v["val_rewards_mean"] for v in val)


@pytest.mark.slow
def test_resume_is_exact(tmp_path):
    """4 steps in one go == 2 steps, a checkpoint, a new process-like Trainer resuming for 2 more (num_iterations 2
    keeps the rollouts of step 3 for step 4 in the checkpoint; the sampling seed comes from the step)."""
    kw = dict(num_generations=4, max_new_tokens=3, beta=0.05, num_iterations=2, train={"steps": 4, "grad_accum": 2})
    a = tmp_path / "a"
    ta = Trainer(recipe(a, **kw), run_dir=a / "run", loaded=loaded())
    ta.setup()
    ta.train()
    b = tmp_path / "b"
    t = Trainer(recipe(b, **kw), run_dir=b / "run", loaded=loaded())
    t.setup()
    t.train(stop_after=3)  # stops mid-generation: step 4 reuses step 3's rollouts
    t = Trainer(recipe(b, **kw), run_dir=b / "run", loaded=loaded())
    t.setup()
    assert t.resume() and t.pos.step == 3 and t.objective.buffer is not None
    t.train()
    ra, rb = rows(a / "run"), rows(b / "run")
    assert len(ra) == len(rb) == 4
    for x, y in zip(ra, rb):
        x.pop("seconds"), y.pop("seconds")
        assert x == y
    assert ra[1]["clip_ratio/region_mean"] >= 0 and "kl" in ra[0]
    wa, wb = ta._trained_tensors(), t._trained_tensors()
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def test_full_fine_tuning_with_kl_is_refused(tmp_path):
    """β > 0 needs the adapters-off reference: a full fine-tuning run says so in one line instead of a zero KL."""
    from slimtune.errors import RecipeError

    rec = recipe(tmp_path, beta=0.1)
    t = Trainer(rec, run_dir=tmp_path / "run", loaded=loaded(), trainable="model")
    for p in t.loaded.model.parameters():
        p.requires_grad_(False)
    t.loaded.model.lm_head.weight.requires_grad_(True)
    with pytest.raises(RecipeError, match="full fine-tuning needs beta: 0"):
        t.setup()
