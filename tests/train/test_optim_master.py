"""fp32 master weights inside the optimizer (train.adapter_dtype: bfloat16, train.optimizer_on: cpu)."""

from __future__ import annotations

import copy

import pytest
import torch

from slimtune.config.recipe import TrainConfig
from slimtune.train.optim import MasterWeights, build_optimizer, build_scheduler, drop_frozen


def _params(dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(32, 24, generator=g).to(dtype)),
            torch.nn.Parameter(torch.randn(24, generator=g).to(dtype))]


def _grads(params, step):
    g = torch.Generator().manual_seed(100 + step)
    for p in params:
        p.grad = torch.randn(p.shape, generator=g).to(p.dtype)


def test_fp32_parameters_step_exactly_like_plain_adamw():
    cfg = TrainConfig(lr=1e-2, weight_decay=0.1)
    a, b = _params(torch.float32), _params(torch.float32)
    plain = build_optimizer(a, cfg)
    master = MasterWeights([{"params": b[:1], "weight_decay": 0.1}, {"params": b[1:], "weight_decay": 0.0}],
                           lambda g: torch.optim.AdamW(g, lr=cfg.lr, betas=cfg.betas, foreach=False))
    assert not isinstance(plain, MasterWeights)
    assert not isinstance(build_optimizer(_params(torch.bfloat16), cfg), MasterWeights)  # default: as before
    for step in range(5):
        _grads(a, step), _grads(b, step)
        plain.step(), master.step()
    for p, q in zip(a, b):
        assert torch.equal(p, q)


def test_bf16_parameters_get_fp32_masters_that_keep_small_updates():
    cfg = TrainConfig(lr=1e-4, schedule="constant", warmup=0, adapter_dtype="bfloat16")
    p = _params(torch.bfloat16)
    opt = build_optimizer(p, cfg)
    assert isinstance(opt, MasterWeights)
    masters = [m for g in opt.inner.param_groups for m in g["params"]]
    assert all(m.dtype == torch.float32 for m in masters) and all(q.dtype == torch.bfloat16 for q in p)
    assert all(not any(m is q for q in p) for m in masters)
    start = [q.detach().clone() for q in p]
    naive = [q.detach().clone().requires_grad_(True) for q in p]  # AdamW on the bf16 tensors themselves
    nopt = torch.optim.AdamW(naive, lr=cfg.lr, foreach=False)
    for step in range(20):
        _grads(p, step)
        for n, q in zip(naive, p):
            n.grad = q.grad.clone()
        opt.step(), nopt.step()
        opt.zero_grad(set_to_none=True)
        for q, m in zip(p, masters):
            assert torch.equal(q, m.to(torch.bfloat16))  # the parameter is the rounded master
    # 20 steps of ~1e-4 on values of ~1: bf16 (8 bits of mantissa) loses most of them, the masters keep them
    moved_master = sum(int((m.to(torch.bfloat16) != s).sum()) for m, s in zip(masters, start))
    moved_naive = sum(int((n.detach() != s).sum()) for n, s in zip(naive, start))
    assert moved_master > 2 * moved_naive


def test_schedule_reaches_the_inner_optimizer_and_state_round_trips():
    cfg = TrainConfig(lr=1e-2, schedule="linear", warmup=2, adapter_dtype="bfloat16")
    p = _params(torch.bfloat16)
    opt = build_optimizer(p, cfg)
    sched = build_scheduler(opt, cfg, total_steps=10)
    for step in range(4):
        _grads(p, step)
        opt.step()
        sched.step()
    _grads(p, 4)
    opt.step()
    assert opt.inner.param_groups[0]["lr"] == pytest.approx(opt.param_groups[0]["lr"])
    saved = copy.deepcopy(opt.state_dict())  # what a checkpoint file holds (state_dict returns live tensors)
    q = [torch.nn.Parameter(t.detach()) for t in _params(torch.bfloat16, seed=1)]  # other values
    opt2 = build_optimizer(q, cfg)
    opt2.load_state_dict(saved)
    for a, b in zip(p, q):
        assert torch.equal(a, b)  # the parameters come back from the masters
    for step in range(5, 8):
        _grads(p, step), _grads(q, step)
        opt.step(), opt2.step()
    for a, b in zip(p, q):
        assert torch.equal(a, b)


def test_optimizer_on_cpu_keeps_masters_on_the_host_and_drop_frozen_works():
    cfg = TrainConfig(optimizer_on="cpu")
    p = _params(torch.float32)
    opt = build_optimizer(p, cfg)
    assert isinstance(opt, MasterWeights)
    assert all(m.device.type == "cpu" for g in opt.inner.param_groups for m in g["params"])
    _grads(p, 0)
    opt.step()
    p[1].requires_grad_(False)
    assert drop_frozen(opt) == 1
    assert [len(g["params"]) for g in opt.param_groups] == [len(g["params"]) for g in opt.inner.param_groups]
    assert len(opt.inner.state) == 1
    _grads(p[:1], 1)
    opt.step()


def test_8bit_inner_optimizer_on_bf16_parameters():
    pytest.importorskip("bitsandbytes")
    p = [torch.nn.Parameter(torch.randn(64, 128).to(torch.bfloat16))]  # >= 4,096 values: 8-bit state
    opt = build_optimizer(p, TrainConfig(optimizer="adamw8bit", lr=1e-2, adapter_dtype="bfloat16"))
    before = p[0].detach().clone()
    _grads(p, 0)
    opt.step()
    (m,) = opt.inner.param_groups[0]["params"]
    assert opt.inner.state[m]["state1"].dtype == torch.uint8
    assert not torch.equal(p[0], before) and torch.equal(p[0], m.to(torch.bfloat16))
