"""The adapter contract, run for every registered kind (PEFT-style: one test runs every method).

For each kind, on a dense fp32 and on an NF4 base: inject; the adapted model starts at the base (dense base);
exactly the declared parameters train and get gradients; native save/load rebuilds the same model; PEFT loads the
export onto a fresh base with the same logits; merge equals unmerged; unload gives the base back.
"""

import pytest
import torch

from slimtune.adapters.base import dense_weight, get_adapter_class, registry
from slimtune.adapters.export import export_peft, load_native, save_native
from slimtune.adapters.inject import adapters_of, inject, merge, unload

from adapter_helpers import tiny_base

KINDS = sorted(registry())
SEED_KINDS = {"lora", "rslora", "dora", "lamda", "lamda_pp", "slora", "nlora", "inttune"}
# Every kind with its defaults, plus the non-default options that change the math.
VARIANTS = [(k, {}) for k in KINDS] + [
    ("lamda", {"init": "random"}),
    ("nlora", {"residual": "adapter"}),
    ("nlora", {"init": "as_released"}),
    ("inttune", {"residual": "adapter"}),
]
STARTS_ELSEWHERE = [("nlora", {"init": "as_released"}),  # reproduces public code that does not start at the base
                    ("kasa", {})]  # the truncation of the r smallest singular triplets is the method


def make_model(quant="none", seed=0, layers=2):
    return tiny_base(quant, seed, layers)


def cfg(kind, **kw):
    return get_adapter_class(kind).Config(kind=kind, rank=kw.pop("rank", 16), alpha=kw.pop("alpha", 8.0), **kw)


def perturb_trainable(adapters, seed=1):
    """Move every trainable tensor (what training could change), leaving frozen ones at their init."""
    g = torch.Generator().manual_seed(seed)
    params = {}
    for name, a in adapters.items():
        for pname in a.trainable_names():
            params[f"{name}.{pname}"] = a.get_parameter(pname)
    with torch.no_grad():
        for p in params.values():
            p.add_(torch.randn(p.shape, generator=g) * 0.1)
    return params


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def test_registry_holds_the_seed_kinds():
    assert SEED_KINDS <= set(KINDS)
    for kind, cls in registry().items():
        assert cls.kind == kind and cls.Config.model_fields["kind"].default == kind and cls.description


@pytest.mark.parametrize("quant", ["none", "nf4"])
@pytest.mark.parametrize("kind,options", VARIANTS, ids=[k + "".join(f"-{v}" for v in o.values()) for k, o in VARIANTS])
def test_adapter_contract(kind, options, quant, tmp_path):
    from peft import PeftModel

    torch.manual_seed(0)
    ids = torch.randint(0, 300, (2, 9))
    model = make_model(quant)
    base_logits = logits(model, ids)
    base_w = {n: dense_weight(m).clone() for n, m in model.named_modules() if n.endswith("_proj")}

    adapters = inject(model, cfg(kind, **options))
    assert set(adapters) == set(base_w)
    base_changed = any(not torch.equal(dense_weight(a.base_layer), base_w[n]) for n, a in adapters.items())
    step0_logits = logits(model, ids)
    if quant == "none" and (kind, options) not in STARTS_ELSEWHERE:  # starts at the base (up to fp32 rounding)
        torch.testing.assert_close(step0_logits, base_logits, rtol=1e-5, atol=1e-5)
    if not base_changed and (kind, options) not in STARTS_ELSEWHERE:  # an untouched base: bit-exact start
        assert torch.equal(step0_logits, base_logits)

    # Exactly the declared parameters train; the trainer's first on_step changes nothing.
    declared = perturb_trainable(adapters)
    assert declared and {n for n, p in model.named_parameters() if p.requires_grad} == set(declared)
    assert sum(a.trainable_parameter_count() for a in adapters.values()) == sum(p.numel() for p in declared.values())
    before = logits(model, ids)
    for a in adapters.values():
        a.on_step(0, 100)
    torch.testing.assert_close(logits(model, ids), before, rtol=0, atol=0)

    model(ids, labels=ids).loss.backward()
    for n, p in model.named_parameters():
        assert (p.grad is not None) == (n in declared), n
        if p.grad is not None:
            assert torch.isfinite(p.grad).all(), n
    assert any(p.grad.abs().sum() > 0 for p in declared.values())
    model.zero_grad(set_to_none=True)
    ours = logits(model, ids)
    assert not torch.allclose(ours, base_logits, atol=1e-4)  # the perturbation matters

    # Native save/load onto a fresh base rebuilds the same model; unload gives the base back.
    save_native(model, tmp_path / "native")
    fresh = make_model(quant)
    load_native(fresh, tmp_path / "native")
    torch.testing.assert_close(logits(fresh, ids), ours, rtol=1e-6, atol=1e-6)
    unload(fresh)
    assert not adapters_of(fresh)
    if quant == "none":
        torch.testing.assert_close(logits(fresh, ids), base_logits, rtol=1e-5, atol=1e-5)

    # PEFT loads the export onto a fresh (original) base with the same logits. A kind that re-quantized a residual
    # base differs from Q(W) + delta by the weight difference Q(W) − Q(W − d) − d it had at step 0 already, so the
    # logits may differ by about what they differed from the base's at step 0 (a missing −d would differ by ~W x).
    export_peft(model, tmp_path / "peft")
    peft_model = PeftModel.from_pretrained(make_model(quant), str(tmp_path / "peft")).eval()
    theirs = logits(peft_model, ids)
    if quant == "nf4" and base_changed:
        assert (theirs - ours).norm() <= 2 * (step0_logits - base_logits).norm() + 1e-4
    else:
        torch.testing.assert_close(theirs, ours, rtol=1e-4, atol=1e-4)

    # Merge equals unmerged.
    merge(model)
    assert not adapters_of(model)
    torch.testing.assert_close(logits(model, ids), ours, rtol=1e-4, atol=1e-4)
