"""LaMDA: spectral init, gradual freezing of B driven like the trainer does; LaMDA++: rank allocation."""

import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from slimtune.adapters.base import dense_weight, get_adapter_class
from slimtune.adapters.export import export_peft, load_native, save_native
from slimtune.adapters.inject import inject
from slimtune.adapters.lamda import allocate_ranks, effective_rank, top_right_singular_vectors

from adapter_helpers import tiny_base


def make_model(quant="none", seed=0, layers=1):
    return tiny_base(quant, seed, layers)


def cfg(kind="lamda", **kw):
    return get_adapter_class(kind).Config(kind=kind, rank=kw.pop("rank", 4), alpha=kw.pop("alpha", 8.0), **kw)


# --------------------------------------------------------------------------------------------- init


@pytest.mark.parametrize("quant", ["none", "nf4"])
def test_svd_init_and_zero_start(quant):
    model = make_model(quant)
    adapters = inject(model, cfg(targets=["q_proj", "down_proj"]))
    for a in adapters.values():
        vh = torch.linalg.svd(dense_weight(a.base_layer), full_matrices=False).Vh[:4]  # of the dequantized W
        torch.testing.assert_close((a.lora_A @ vh.t()).abs(), torch.eye(4), atol=1e-4, rtol=0)  # same directions
        assert torch.count_nonzero(a.lora_B) == 0 and torch.count_nonzero(a.lamda_S) > 0
        assert a.trainable_names() == ["lora_B", "lamda_S"] and not a.lora_A.requires_grad
    random = inject(make_model(quant), cfg(init="random", targets=["q_proj"]))
    a = next(iter(random.values()))
    assert not torch.allclose(a.lora_A @ a.lora_A.t(), torch.eye(4), atol=1e-2)  # kaiming, not orthonormal


def test_randomized_svd_finds_the_top_directions():
    g = torch.Generator().manual_seed(0)
    u = torch.linalg.qr(torch.randn(1200, 40, generator=g)).Q  # (out, 40)
    v = torch.linalg.qr(torch.randn(1100, 40, generator=g)).Q  # (in, 40)
    s = 0.7 ** torch.arange(40.0)
    w = u @ torch.diag(s) @ v.t() + 1e-6 * torch.randn(1200, 1100, generator=g)  # min dim 1100: randomized path
    vh = top_right_singular_vectors(w, 8)
    assert vh.shape == (8, 1100)
    torch.testing.assert_close((vh @ v[:, :8]).abs(), torch.eye(8), atol=1e-4, rtol=0)
    assert torch.equal(vh, top_right_singular_vectors(w, 8))  # seeded: the same base always gives the same A


# --------------------------------------------------------------------------------------------- freezing


def test_freeze_schedule_is_exact():
    a = next(iter(inject(make_model(), cfg(rank=4, targets=["q_proj"])).values()))
    assert [a.freeze_step(j, 100) for j in range(4)] == [8, 15, 23, 30]  # ⌈(j+1)/4 · 0.3 · 100⌉
    b = next(iter(inject(make_model(), cfg(rank=3, targets=["q_proj"])).values()))
    assert [b.freeze_step(j, 10) for j in range(3)] == [1, 2, 3]  # 0.3·10 in floats is 3.0000000000000004


def drop_frozen(opt):
    """What the trainer does after on_step: parameters that stopped requiring grad leave the optimizer."""
    for group in opt.param_groups:
        for p in [p for p in group["params"] if not p.requires_grad]:
            opt.state.pop(p, None)
        group["params"] = [p for p in group["params"] if p.requires_grad]


def test_gradual_freezing_with_adamw(tmp_path):
    total, r = 12, 4  # freeze_fraction 0.5: columns freeze after steps 2, 3, 5, 6
    model = make_model()
    adapters = inject(model, cfg(rank=r, freeze_fraction=0.5, targets=["q_proj", "v_proj"]))
    a = adapters["model.layers.0.self_attn.q_proj"]
    t = [a.freeze_step(j, total) for j in range(r)]
    assert t == [2, 3, 5, 6]
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.5)
    for ad in adapters.values():
        ad.on_step(0, total)  # the trainer's call at the start of training
    A0 = a.lora_A.clone()
    B_hist, S_hist = [a.lora_B.detach().clone()], [a.lamda_S.detach().clone()]
    ids = torch.randint(0, 300, (2, 9), generator=torch.Generator().manual_seed(0))
    for step in range(1, total + 1):
        model(ids, labels=ids).loss.backward()
        done = sum(tj < step for tj in t)  # columns frozen before this step
        if a.lora_B.requires_grad:
            assert torch.count_nonzero(a.lora_B.grad[:, :done]) == 0  # the hook zeroed the frozen columns
            assert torch.count_nonzero(a.lora_B.grad[:, done:]) > 0
        opt.step()
        opt.zero_grad(set_to_none=True)
        for ad in adapters.values():
            ad.on_step(step, total)
        drop_frozen(opt)
        B_hist.append(a.lora_B.detach().clone())
        S_hist.append(a.lamda_S.detach().clone())

    for j, tj in enumerate(t):
        assert not torch.equal(B_hist[tj][:, j], B_hist[0][:, j])  # it trained before its freeze
        for step in range(tj, total + 1):  # and never moved after (despite momentum and weight decay)
            assert torch.equal(B_hist[step][:, j], B_hist[tj][:, j]), (j, step)
    assert torch.equal(a.lora_B, B_hist[t[-1]])  # bit-identical to its value at the freeze point
    assert not a.lora_B.requires_grad and a.trainable_names() == ["lamda_S"]
    assert all(p is not a.lora_B for g in opt.param_groups for p in g["params"])  # B left the optimizer
    for step in range(t[-1] + 1, total + 1):
        assert not torch.equal(S_hist[step], S_hist[step - 1])  # S keeps learning
    assert torch.equal(a.lora_A, A0)


def test_freeze_state_survives_save_and_load(tmp_path):
    total = 10
    model = make_model()
    adapters = inject(model, cfg(rank=4, freeze_fraction=0.4, targets=["q_proj"]))  # freezes after 1, 2, 3, 4
    a = next(iter(adapters.values()))
    with torch.no_grad():
        a.lora_B.normal_()
    a.on_step(2, total)  # two columns frozen
    save_native(model, tmp_path / "mid")
    with torch.no_grad():
        a.lora_B.add_(1.0)  # an optimizer step moves everything ...
    a.on_step(3, total)  # ... the frozen columns are put back, column 2 freezes with its moved value
    save_native(model, tmp_path / "end")

    fresh = make_model()
    b = next(iter(load_native(fresh, tmp_path / "mid").values()))
    assert b.lamda_frozen.tolist() == [True, True, False, False]
    assert torch.equal(b.lamda_B_frozen[:, :2], b.lora_B[:, :2]) and b.lora_B.requires_grad
    with torch.no_grad():
        b.lora_B.add_(1.0)
    b.on_step(3, total)  # resumed: the same freezing and restoring as the uninterrupted run
    assert torch.equal(b.lora_B, a.lora_B) and torch.equal(b.lamda_B_frozen, a.lamda_B_frozen)

    a.on_step(4, total)
    save_native(model, tmp_path / "all")
    c = next(iter(load_native(make_model(), tmp_path / "all").values()))
    assert not c.lora_B.requires_grad and c.trainable_names() == ["lamda_S"]  # after_load saw a fully frozen B


# --------------------------------------------------------------------------------------------- LaMDA++


def test_effective_rank():
    energies = torch.tensor([0.5, 0.3, 0.15, 0.05])
    w = torch.diag(energies.sqrt())
    assert effective_rank(w, 0.9) == 3 and effective_rank(w, 0.8) == 2 and effective_rank(w, 0.5) == 1
    assert effective_rank(torch.zeros(5, 3), 0.9) == 1
    assert effective_rank(torch.randn(40, 7) @ torch.randn(7, 30), 0.999999) <= 7


def test_allocate_ranks_example():
    ranks = allocate_ranks([10, 20, 30, 40, 200], budget=5 * 16, r_min=8, r_max=32, multiple=8)
    assert ranks == [8, 8, 16, 16, 32]
    assert sum(allocate_ranks([1, 1, 1], 24, 8, 64)) == 24
    with pytest.raises(ValueError, match="cannot be split"):
        allocate_ranks([1, 2], budget=96, r_min=8, r_max=32)


@settings(max_examples=300, deadline=None)
@given(
    effective=st.lists(st.integers(1, 4096), min_size=1, max_size=40),
    rank=st.sampled_from([8, 16, 32, 64]),
    r_min=st.sampled_from([1, 8, 16]),
    r_max=st.sampled_from([32, 64, 256]),
)
def test_allocate_ranks_properties(effective, rank, r_min, r_max):
    n = len(effective)
    budget = rank * n
    lo, hi = -(-r_min // 8) * 8, r_max // 8 * 8
    if not n * lo <= budget <= n * hi:
        with pytest.raises(ValueError):
            allocate_ranks(effective, budget, r_min, r_max)
        return
    ranks = allocate_ranks(effective, budget, r_min, r_max)
    assert sum(ranks) == budget  # exactly the budget
    assert all(r % 8 == 0 and lo <= r <= hi for r in ranks)  # multiples of 8 inside the clamps
    for i in range(n):
        for j in range(n):
            if effective[i] > effective[j]:
                assert ranks[i] >= ranks[j]  # a larger effective rank never gets less


def test_lamda_pp_flatter_spectrum_gets_higher_rank(tmp_path):
    from peft import PeftModel

    def spectral_model():
        model = make_model(layers=2)
        g = torch.Generator().manual_seed(3)
        flat = torch.linalg.qr(torch.randn(64, 64, generator=g)).Q * 0.05  # all σ equal
        steep = torch.randn(64, 3, generator=g) @ torch.randn(3, 64, generator=g) * 0.02  # rank 3
        with torch.no_grad():
            model.model.layers[0].self_attn.q_proj.weight.copy_(flat)
            model.model.layers[1].self_attn.q_proj.weight.copy_(steep)
        return model

    model = spectral_model()
    c = cfg("lamda_pp", rank=16, r_min=8, r_max=40, targets=["q_proj", "o_proj"])
    adapters = inject(model, c)
    facts = {n: a.extra_adapter_config() for n, a in adapters.items()}
    ranks = {n: f["rank"] for n, f in facts.items()}
    assert sum(ranks.values()) == 16 * 4  # the budget rank × modules, exactly
    assert all(r % 8 == 0 and 8 <= r <= 40 for r in ranks.values())
    assert facts["model.layers.0.self_attn.q_proj"]["effective_rank"] > 50
    assert facts["model.layers.1.self_attn.q_proj"]["effective_rank"] <= 3
    assert ranks["model.layers.0.self_attn.q_proj"] > ranks["model.layers.1.self_attn.q_proj"]
    for n, a in adapters.items():
        assert a.lora_A.shape == (ranks[n], 64) and a.lamda_S.shape == (ranks[n], ranks[n])
        assert a.scale == 8.0 / ranks[n]

    with torch.no_grad():
        for a in adapters.values():
            a.lora_B.normal_(0, 0.1)
    ids = torch.randint(0, 300, (2, 7))
    with torch.no_grad():
        ours = model(ids).logits
    save_native(model, tmp_path / "native")  # the allocation is saved with the adapter ...
    saved = json.loads((tmp_path / "native" / "slimtune_adapter.json").read_text())["modules"]
    assert {n: f["rank"] for n, f in saved.items()} == ranks
    export_peft(model, tmp_path / "peft")  # ... and exported as a PEFT rank_pattern
    peft_cfg = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert peft_cfg["rank_pattern"]
    peft_model = PeftModel.from_pretrained(spectral_model(), str(tmp_path / "peft")).eval()
    with torch.no_grad():
        torch.testing.assert_close(peft_model(ids).logits, ours, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kind", ["lamda", "lamda_pp"])
def test_load_never_recomputes_the_spectrum(kind, tmp_path, monkeypatch):
    """The saved A is the SVD's result (and LaMDA++'s ranks are saved facts): a load must not run an SVD."""
    model = make_model()
    extra = {"rank": 16, "r_min": 8, "r_max": 40} if kind == "lamda_pp" else {}
    adapters = inject(model, cfg(kind, targets=["q_proj", "o_proj"], **extra))
    with torch.no_grad():
        for a in adapters.values():
            a.lora_B.normal_(0, 0.05)
    ids = torch.randint(0, 300, (2, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = model(ids).logits
    save_native(model, tmp_path / "native")

    def no_svd(*a, **k):
        raise AssertionError("an SVD ran during a load")

    for fn in ("svd", "svdvals", "qr"):
        monkeypatch.setattr(torch.linalg, fn, no_svd)
    fresh = make_model()
    load_native(fresh, tmp_path / "native")
    with torch.no_grad():
        torch.testing.assert_close(fresh(ids).logits, ours, rtol=1e-5, atol=1e-5)
