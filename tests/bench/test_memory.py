"""saved_bytes on cases whose saved tensors are known exactly; the bench decides its backends before measuring."""

import contextlib

import pytest
import torch
import torch.nn as nn

from slimtune.bench.memory import per_token_per_layer, saved_bytes


def test_chain_with_known_saved_tensors():
    n = 1000
    x = torch.randn(n, requires_grad=True)

    def fn():
        y = torch.exp(x)  # saves its result y (4n bytes)
        z = torch.sin(y)  # saves y again: same storage, counted once
        w = z * 2.0  # scalar multiply: saves nothing
        v = x.pow(2)  # saves x (4n bytes), a leaf: still an activation here (no modules given)
        return (w + v[:n]).sum()  # add/sum save no tensors

    r = saved_bytes(fn)
    assert r.activation_bytes == 2 * 4 * n
    assert r.param_bytes == 0 and r.n_storages == 2 and r.n_saved == 3


def test_views_count_their_whole_storage_once():
    x = torch.randn(64, 32, requires_grad=True)

    def fn():
        h = x * 1.0  # saves nothing (scalar)
        a = torch.tanh(h[:, :16])  # tanh saves its own output (64x16), a fresh storage
        b = h[:8] ** 2  # saves a view of h: the whole 64x32 storage counts, once
        c = h[8:] ** 3  # another view of h: deduplicated
        return a.sum() + b.sum() + c.sum()

    r = saved_bytes(fn)
    assert r.activation_bytes == 64 * 16 * 4 + 64 * 32 * 4


def test_parameters_counted_apart():
    lin = nn.Linear(20, 30, bias=True)
    x = torch.randn(5, 20, requires_grad=True)
    r = saved_bytes(lambda: lin(x).sum(), modules=[lin])
    assert r.activation_bytes == 5 * 20 * 4  # the input
    assert r.param_bytes == 30 * 20 * 4  # the weight (saved to compute dx); bias needs nothing
    r2 = saved_bytes(lambda: lin(x).sum())
    assert r2.activation_bytes == 5 * 20 * 4 + 30 * 20 * 4


def test_per_token_per_layer_cancels_model_terms():
    tokens, width = 10, 8

    def measure(n_layers):
        torch.manual_seed(0)
        x = torch.randn(tokens, width, requires_grad=True)

        def fn():
            h = torch.exp(x)  # per-model term: 4·T·W bytes
            for _ in range(n_layers):
                h = torch.tanh(h) * 1.0  # per layer: tanh saves its output (4·T·W)
            return h.sum()

        return saved_bytes(fn)

    assert per_token_per_layer(measure, layers=3, tokens=tokens) == 4 * width


def test_saved_bytes_bench_meets_target():
    """bench/saved_bytes.py on a small config: the fused path saves <= 0.4x of HF + PEFT per token per layer."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "bench" / "saved_bytes.py"
    spec = importlib.util.spec_from_file_location("saved_bytes_bench", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    H, inter, heads, kv, r = 128, 344, 4, 2, 16
    out = bench.main(["--hidden", str(H), "--intermediate", str(inter), "--heads", str(heads), "--kv-heads", str(kv),
                      "--layers", "1", "--seq", "32", "--vocab", "200", "--rank", str(r)])
    assert out["ratio"] <= 0.4
    assert not [line for line in out["slimtune"]["fuse_report"] if line.startswith("not fused")]
    # What the fused layer may keep, per token (bf16): the two norm outputs (shared with the q/k/v and MLP inputs),
    # e and g of the MLP, SDPA's q, k, v and output (the output is also o_proj's input), one (r,) X Aᵀ per adapter,
    # SDPA's fp32 logsumexp per head and the norms' fp32 rstd.
    hq, hkv = H, H // heads * kv
    bound = 2 * (2 * H + 2 * inter + 2 * hq + 2 * hkv + 7 * r) + 4 * heads + 2 * 4
    assert out["slimtune"]["bytes_per_token_per_layer"] <= bound


# --------------------------------------------------------------------------------------------- held state vs estimate

_SETTINGS = {
    "defaults": {},
    "nf4 lm_head": {"quantize_lm_head": True},
    "embeddings on cpu": {"embeddings_on": "cpu"},
    "8-bit AdamW": {"optimizer": "adamw8bit"},
    "bf16 adapters": {"adapter_dtype": "bfloat16"},
    "floor": {"quantize_lm_head": True, "embeddings_on": "cpu", "optimizer": "adamw8bit",
              "adapter_dtype": "bfloat16", "optimizer_on": "cpu"},
}


@pytest.mark.parametrize("name", list(_SETTINGS))
def test_held_state_matches_the_estimate_within_5_percent(name):
    """What the model, its adapters and the optimizer really hold after a step (storage accounting, by component,
    on the device and in host memory) against the estimator's terms for the same settings."""
    import transformers

    from slimtune.adapters.base import cast_trainable
    from slimtune.adapters.inject import inject
    from slimtune.adapters.lora import LoRAConfig
    from slimtune.bench.estimate import estimate
    from slimtune.bench.memory import held_bytes
    from slimtune.config.recipe import TrainConfig
    from slimtune.models.embeddings import embeddings_to_host
    from slimtune.models.load import QuantConfig, prepare_loaded
    from slimtune.models.tiny import tiny_llama_config
    from slimtune.train.optim import build_optimizer

    s = _SETTINGS[name]
    # every LoRA factor >= 4,096 values (bitsandbytes keeps smaller ones in 32-bit state; the estimator knows)
    cfg = tiny_llama_config(vocab_size=1024, hidden_size=256, intermediate_size=688, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=2)
    torch.manual_seed(0)
    q = QuantConfig(mode="nf4", compute_dtype="bfloat16", quantize_lm_head=s.get("quantize_lm_head", False))
    model = prepare_loaded(transformers.LlamaForCausalLM(cfg), None, q, device=torch.device("cpu"),
                           source="tiny").model
    adapters = inject(model, LoRAConfig(rank=16))
    train = TrainConfig(**{k: v for k, v in s.items() if k != "quantize_lm_head"})
    if train.adapter_dtype != "float32":
        cast_trainable(adapters, torch.bfloat16)
    if train.embeddings_on == "cpu":
        embeddings_to_host(model)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = build_optimizer(params, train)
    for p in params:
        p.grad = torch.full_like(p, 1e-3)
    opt.step()
    held = held_bytes(model, opt)
    est = estimate(cfg, quant="nf4", compute_dtype="bfloat16", rank=16, **s)
    comp = est.components()
    host = {"host_weights_embed": est.host_bytes.get("embedding table (pinned)", 0),
            "host_optimizer": est.host_bytes.get("optimizer: fp32 masters + state", 0)}
    for key in ("weights_linear", "weights_embed", "weights_other", "adapter_params", "adapter_grads", "optimizer",
                "host_weights_embed", "host_optimizer"):
        want = comp[key] if key in comp else host[key]
        got = held.get(key, 0)
        assert abs(want - got) <= 0.05 * max(got, 1), (name, key, want, got)


def test_bench_decides_the_backends_before_its_measured_steps(monkeypatch, tmp_path):
    """Issue 23: measured dispatch ran its trials inside step 1 (and at the sweep's new shapes), so the per-phase
    peaks held the trials and depended on whether the verdict file existed. Every measurement now happens after
    the model is built and before the first measured phase of a step; none later (the sweep's lengths included)."""
    from slimtune.bench import memory
    from slimtune.bench.bench_config import BenchConfig, resolve_bench_config
    from slimtune.bench.estimate import normalize_targets
    from slimtune.bench.runner import run_tool
    from slimtune.ops import autotune, dispatch

    events: list[tuple[str, str]] = []
    real_measure, real_phase = autotune._measure, memory.PhaseMeter.phase

    def measure(op, key, *a, **k):
        events.append(("measure", key))
        return real_measure(op, key, *a, **k)

    @contextlib.contextmanager
    def phase(self, name):
        events.append(("phase", name))
        with real_phase(self, name):
            yield
        events.append(("end", name))

    monkeypatch.setattr(autotune, "_measure", measure)
    monkeypatch.setattr(memory.PhaseMeter, "phase", phase)
    monkeypatch.setattr(dispatch, "triton_allowed", lambda x: False)  # torch vs dequant: no interpreter runs
    monkeypatch.setenv("SLIMTUNE_DISPATCH_CACHE", str(tmp_path / "dispatch.json"))
    monkeypatch.delenv("SLIMTUNE_KERNELS", raising=False)
    autotune.clear()
    dispatch.set_measure_on_cpu(True)
    try:
        cfg = BenchConfig(model_config="tiny", device="cpu", steps=2, warmup=1, seq_len=32, batch=2, rank=4,
                          seq_lens=[16, 64], checkpointing="full", tools=("slimtune",), dtype="float32")
        out = run_tool("slimtune", resolve_bench_config("tiny"), cfg, device=torch.device("cpu"),
                       dtype=torch.float32, targets=normalize_targets(cfg.targets), log=lambda m: None)
    finally:
        dispatch.set_measure_on_cpu(False)
        autotune.clear()
    assert len(out["losses"]) == 2 and not out["oom"]
    inside, during = 0, []
    for kind, what in events:
        inside += {"phase": 1, "end": -1}.get(kind, 0)
        if kind == "measure" and inside:
            during.append(what)
    assert not during, during  # no trial inside a measured phase
    first_step = events.index(("phase", "forward"))
    training = [(i, key) for i, (k, key) in enumerate(events) if k == "measure" and not key.endswith("|eval")]
    assert training and events.index(("end", "load")) < training[0][0] and training[-1][0] < first_step, events
    rows = {key.split("|")[2] for _, key in training}
    assert {"M32", "M64", "M128"} <= rows, rows  # 2 x 16, 2 x 32, 2 x 64 tokens: the sweep's lengths too
