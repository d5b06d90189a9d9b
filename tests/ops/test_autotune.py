"""Measured dispatch (`train.kernels: auto`) on CPU: candidates timed on the real inputs, the fastest correct one
kept, wrong or failing candidates rejected, verdicts cached on disk and reused, forcing still wins."""

import json
import os
from types import SimpleNamespace

import pytest
import torch

from slimtune.ops import autotune, dispatch
from slimtune.ops import lora_linear as ll
from slimtune.ops.dispatch import GEMM_BACKENDS, dispatch_report, resolve_backend, set_backend, use_backend
from slimtune.ops.nf4 import quantize_4bit

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


@pytest.fixture(autouse=True)
def measuring(monkeypatch, tmp_path):
    monkeypatch.delenv("SLIMTUNE_KERNELS", raising=False)
    monkeypatch.setenv("SLIMTUNE_DISPATCH_CACHE", str(tmp_path / "dispatch.json"))
    autotune.clear()
    dispatch.set_measure_on_cpu(True)
    old = dispatch._mode
    yield tmp_path / "dispatch.json"
    dispatch.set_measure_on_cpu(False)
    dispatch._mode = old
    autotune.clear()


def _proj(seed=0, out_f=40, in_f=64, dora=True):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out_f, in_f, generator=g) * 0.05
    p = lambda *s: (torch.randn(*s, generator=g) * 0.1).requires_grad_()  # noqa: E731
    mag = (torch.rand(out_f, generator=g) + 0.5).requires_grad_() if dora else None
    return ll.LoRAProjection(base=quantize_4bit(w), lora_A=p(4, in_f), lora_B=p(out_f, 4), scale=2.0,
                             magnitude=mag, bias=p(out_f))  # fmt: skip


def _x(seed=1, t=8, in_f=64):
    return torch.randn(t, in_f, generator=torch.Generator().manual_seed(seed)).requires_grad_()


@pytest.mark.skipif(not INTERPRET, reason="the Triton candidate runs under TRITON_INTERPRET=1 on CPU")
def test_interpreter_triton_loses_and_verdict_is_cached(measuring):
    proj, x = _proj(), _x()
    y = ll.lora_projection(x, proj)  # auto: measures torch, dequant, triton (interpreter) on these inputs
    [v] = autotune.verdicts()
    assert v.op == "lora_linear" and set(v.times_ms) == set(GEMM_BACKENDS)
    assert v.backend != "triton" and v.times_ms["triton"] > v.times_ms[v.backend]
    assert torch.allclose(y, ll.lora_linear_reference(x, proj), atol=1e-5)
    stored = json.loads(measuring.read_text())
    [(env_key, entries)] = stored.items()
    assert env_key.startswith("cpu|torch ") and "|triton " in env_key and "|slimtune " in env_key
    [(entry_key, entry)] = entries.items()
    assert entry_key.startswith("lora_linear|float32|M16|40x64:nf4dq:r4:dora") and entry["backend"] == v.backend
    assert entry_key.endswith("|train+dx")  # x requires grad, grad mode on: forward + backward with dX
    assert any(line.startswith(entry_key) and v.backend in line for line in dispatch_report())

    autotune.clear()  # a new process: only the file remains
    calls = []
    shape_class = entry_key.split("|", 2)[2].rpartition("|")[0]  # without the grad mode, which dispatch adds
    chosen = resolve_backend(x, op="lora_linear", shape_class=shape_class, choices=GEMM_BACKENDS,
                             trial=lambda b: calls.append(b) or [])  # fmt: skip
    assert chosen == v.backend and calls == []  # no timing: read from the cache
    assert autotune.verdicts()[0].source == "cache" and "cached" in dispatch_report()[0]


def _trial(values: dict, raises=()):
    def run(backend):
        if backend in raises:
            raise RuntimeError(f"{backend} launch failed\nsecond line")
        return [values[backend]]

    return run


def test_raising_and_wrong_candidates_are_rejected():
    good = torch.ones(64)
    values = {"torch": good, "dequant": good + 1.0, "triton": good.clone()}
    chosen = autotune.choose("op_x", "M16", ["triton", "dequant", "torch"], _trial(values, raises=("triton",)),
                             dtype=torch.float32, device="cpu")  # fmt: skip
    [v] = autotune.verdicts()
    assert chosen == "torch" and v.backend == "torch"
    assert v.rejected["triton"] == "raised RuntimeError: triton launch failed"
    assert v.rejected["dequant"].startswith("mismatch: rel. error 1.00e+00")
    assert set(v.times_ms) == {"torch"} and "rejected dequant, triton" in v.why


def test_bf16_tolerance_and_fastest_correct_wins():
    ref = torch.randn(4096, generator=torch.Generator().manual_seed(0)).bfloat16()
    close = ref * (1 + 1e-3)  # within bf16 tolerance
    slow_calls = []

    def run(backend):
        if backend == "torch":
            slow_calls.append(1)
            torch.randn(400, 400) @ torch.randn(400, 400)  # the slow one
            return [ref]
        return [close]

    chosen = autotune.choose("op_y", "M16", ["dequant", "torch"], run, dtype=torch.bfloat16, device="cpu")
    # the correctness run, then WARMUP untimed runs (issue 23: none beyond the correctness run), then ITERS timed
    assert chosen == "dequant" and len(slow_calls) == 1 + autotune.WARMUP + autotune.ITERS and autotune.WARMUP >= 1


def test_model_op_rejects_a_wrong_backend(monkeypatch):
    wrong = SimpleNamespace(**vars(ll.backend_ops("dequant")))
    wrong.base_matmul = lambda *a, **k: ll.backend_ops("torch").base_matmul(*a, **k) + 0.5
    monkeypatch.setitem(ll._BACKENDS, "dequant", wrong)
    proj, x = _proj(seed=3, dora=False), _x(seed=4)
    ll.lora_projection(x, proj)
    [v] = autotune.verdicts()
    assert v.backend != "dequant" and v.rejected["dequant"].startswith("mismatch")


def test_forcing_beats_measuring(monkeypatch):
    x, never = _x(), lambda b: pytest.fail("forced backends never measure")
    set_backend("dequant")
    assert resolve_backend(x, op="z", trial=never, choices=GEMM_BACKENDS) == "dequant"
    assert resolve_backend(x, op="z", trial=never) == "torch"  # an op without a dequant variant runs torch
    with use_backend("torch"):
        assert resolve_backend(x, op="z", trial=never, choices=GEMM_BACKENDS) == "torch"
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setenv("SLIMTUNE_KERNELS", "triton")
    assert resolve_backend(x, op="z", trial=never, choices=GEMM_BACKENDS) == "triton"
    assert autotune.verdicts() == []


def test_cpu_auto_does_not_measure_by_default(measuring):
    dispatch.set_measure_on_cpu(False)
    assert resolve_backend(_x(), op="z", trial=lambda b: pytest.fail("measured"), choices=GEMM_BACKENDS) == "torch"
    assert not measuring.exists()


def test_triton_is_gated_below_sm80(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d=None: (7, 5))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda d=None: "Tesla T4")
    monkeypatch.setattr(dispatch, "_triton_ok", True)
    fake_gpu_tensor = SimpleNamespace(is_cuda=True, device=torch.device("cuda", 0))
    assert not dispatch.triton_allowed(fake_gpu_tensor)
    assert any("Tesla T4 (sm_75 < sm_80)" in line for line in dispatch_report())
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d=None: (8, 9))
    assert dispatch.triton_allowed(fake_gpu_tensor)


def test_unwritable_cache_keeps_the_verdict_in_memory(monkeypatch, tmp_path):
    (tmp_path / "file").write_text("")
    monkeypatch.setenv("SLIMTUNE_DISPATCH_CACHE", str(tmp_path / "file" / "dispatch.json"))  # parent is a file
    values = {"torch": torch.ones(3), "dequant": torch.ones(3)}
    assert autotune.choose("op_w", "M16", ["dequant", "torch"], _trial(values), dtype=torch.float32, device="cpu")
    assert len(autotune.verdicts()) == 1


def test_measuring_inside_checkpointing_hooks_keeps_the_trial_outside_them():
    packed = []
    proj, x = _proj(seed=5, dora=False), _x(seed=6)
    with torch.autograd.graph.saved_tensors_hooks(lambda t: packed.append(t) or t, lambda t: t):
        y = ll.lora_projection(x, proj)  # measures here: the trial's forward/backward run under identity hooks
        n_real = len(packed)
    assert len(autotune.verdicts()) == 1
    y.sum().backward()
    n_alone = len(_saved_by(lambda: ll.lora_projection(x, proj)))  # the real op alone, verdict now cached
    assert n_real == n_alone and proj.lora_A.grad is not None


def _saved_by(fn):
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        fn()
    return saved


def _oom():
    return torch.OutOfMemoryError("CUDA out of memory (simulated)")


def test_out_of_memory_of_the_reference_is_remembered_not_retried(measuring):
    """Issue 23: an OOM while measuring used to cache nothing, so every later call (every layer, recompute, step)
    measured again. Now the outcome is kept for the process (not on disk) and the lean default runs."""
    calls = []

    def run(backend):
        calls.append(backend)
        if backend == "torch":
            raise _oom()
        return [torch.ones(3)]

    for _ in range(3):
        assert autotune.choose("op_m", "M16", ["dequant", "torch"], run, dtype=torch.float32, device="cpu",
                               default="dequant") == "dequant"  # fmt: skip
    assert calls == ["torch"]  # measured once
    [v] = autotune.verdicts()
    assert v.backend == "dequant" and v.source == "oom" and not measuring.exists()
    assert any("out of memory while measuring" in line and "this process only" in line for line in dispatch_report())


def test_out_of_memory_of_a_candidate_never_picks_the_reference(measuring):
    """Issue 23: a non-torch candidate's OOM kept "torch" (the heaviest backend) for the process, exactly when
    memory is short. Now: the fastest other correct candidate, else the default; remembered, not on disk."""
    calls = []

    def run(backend):
        calls.append(backend)
        if backend == "dequant":
            raise _oom()
        if backend == "triton":
            torch.randn(300, 300) @ torch.randn(300, 300)  # slower than torch: still chosen
        return [torch.ones(3)]

    got = autotune.choose("op_n", "M16", ["triton", "dequant", "torch"], run, dtype=torch.float32, device="cpu",
                          default="dequant")  # fmt: skip
    assert got == "triton" and "raised OutOfMemoryError" in autotune.verdicts()[0].rejected["dequant"]
    n = len(calls)
    assert autotune.choose("op_n", "M16", ["triton", "dequant", "torch"], run, dtype=torch.float32, device="cpu",
                           default="dequant") == "triton" and len(calls) == n  # fmt: skip
    # only the reference measured correctly: the default (leaner than the reference), not torch
    assert autotune.choose("op_o", "M16", ["dequant", "torch"], run, dtype=torch.float32, device="cpu",
                           default="dequant") == "dequant"  # fmt: skip
    assert [v.source for v in autotune.verdicts()] == ["oom", "oom"] and not measuring.exists()


def test_trials_never_run_more_rows_than_the_cap(monkeypatch):
    """Issue 23: the trial ran at the step's full size (the torch reference is the biggest), so it could need more
    memory than the step it decides. Now its token rows stop at MAX_TRIAL_ROWS; the op itself runs them all."""
    rows = []
    for name in ("torch", "dequant"):
        real = ll.backend_ops(name)
        spy = SimpleNamespace(**vars(real))
        spy.base_matmul = lambda x, *a, _r=real, **k: rows.append(x.shape[0]) or _r.base_matmul(x, *a, **k)
        monkeypatch.setitem(ll._BACKENDS, name, spy)
    monkeypatch.setattr(autotune, "MAX_TRIAL_ROWS", 64)
    proj, x = _proj(seed=7, dora=False), _x(seed=8, t=300)
    y = ll.lora_projection(x, proj)
    [v] = autotune.verdicts()
    assert "|M64|" in f"|{v.key.split('|', 2)[2]}" and y.shape == (300, 40)
    assert rows[-1] == 300 and max(rows[:-1]) == 64 and len(rows) > 2  # trials at 64 rows, then the real call
    assert torch.allclose(y, ll.lora_linear_reference(x, proj), atol=1e-5)
    rows.clear()
    ll.lora_projection(_x(seed=9, t=1000), proj)  # a larger micro-batch: the same bucket, no new trial
    assert rows == [1000] and len(autotune.verdicts()) == 1


def test_evaluation_and_training_verdicts_are_apart():
    """Issue 23: the key ignored whether X needs a gradient, so a verdict measured in evaluation (forward only)
    was reused for training. The grad mode is part of the key, and an evaluation trial runs the forward only."""
    proj = _proj(seed=10, dora=False)
    with torch.no_grad():
        ll.lora_projection(_x(seed=11), proj)
    ll.lora_projection(_x(seed=11).detach(), proj)  # training, X without grad (first layer)
    ll.lora_projection(_x(seed=11), proj)  # training with dX
    keys = [v.key for v in autotune.verdicts()]
    assert [k.rpartition("|")[2] for k in keys] == ["eval", "train", "train+dx"], keys
    assert len({k.rpartition("|")[0] for k in keys}) == 1
