"""The bench's random base: drawn on the model's device by a generator seeded per (seed, tensor name), quantized
there, and built once for both tools of `slimtune bench` (their models share its tensors)."""

from __future__ import annotations

import pytest
import torch

from slimtune.bench import runner
from slimtune.bench.bench_config import BenchConfig, resolve_bench_config
from slimtune.bench.random_model import RandomBase, random_base, tensor_seed


def _tiny():
    return resolve_bench_config("tiny")


def test_models_of_one_base_share_its_tensors_and_compute_the_same():
    base = RandomBase(_tiny(), device="cpu", dtype=torch.float32).build()
    a, b = base.model(), base.model()
    pa, pb = dict(a.named_parameters()), dict(b.named_parameters())
    assert pa.keys() == pb.keys() and len(pa) > 10
    for name in pa:
        assert pa[name] is not pb[name] and pa[name].data_ptr() == pb[name].data_ptr(), name  # shared, no copy
        assert not pa[name].requires_grad
    qa, qb = a.model.layers[0].self_attn.q_proj, b.model.layers[0].self_attn.q_proj
    assert type(qa).__name__ == "Linear4bit" and qa.weight.quant_state is not qb.weight.quant_state
    stored = sum(p.numel() * p.element_size() for p in pa.values())
    assert stored < base.nbytes < stored * 1.2  # the packed codes and dense tensors, plus the quant states
    ids = torch.randint(0, base.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    la, lb = a(input_ids=ids, labels=ids).loss, b(input_ids=ids, labels=ids).loss
    assert torch.isfinite(la) and torch.equal(la, lb)
    assert a.config.use_cache is False and a.training


def test_each_tensor_is_drawn_from_its_own_seeded_generator():
    config = _tiny()
    model = random_base(config, device=torch.device("cpu"), dtype=torch.float32, seed=7)
    std = config.initializer_range
    name = "model.embed_tokens.weight"
    want = torch.empty(config.vocab_size, config.hidden_size).normal_(
        0.0, std, generator=torch.Generator().manual_seed(tensor_seed(7, name)))
    assert torch.equal(dict(model.named_parameters())[name], want)  # independent of the build order
    assert torch.equal(model.model.norm.weight, torch.ones(config.hidden_size))
    again = random_base(config, device=torch.device("cpu"), dtype=torch.float32, seed=7)
    other = random_base(config, device=torch.device("cpu"), dtype=torch.float32, seed=8)
    sd, sd2, sd3 = model.state_dict(), again.state_dict(), other.state_dict()
    tensors = [k for k, v in sd.items() if isinstance(v, torch.Tensor)]
    assert all(torch.equal(sd[k], sd2[k]) for k in tensors)
    assert not torch.equal(sd["model.layers.0.mlp.down_proj.weight"], sd3["model.layers.0.mlp.down_proj.weight"])
    # the quantized weight dequantizes to its drawn values (NF4: ~10% relative error)
    w = torch.empty(config.hidden_size, config.intermediate_size).normal_(
        0.0, std, generator=torch.Generator().manual_seed(tensor_seed(7, "model.layers.0.mlp.down_proj.weight")))
    import bitsandbytes.functional as bnbf

    down = model.model.layers[0].mlp.down_proj.weight
    deq = bnbf.dequantize_4bit(down.data, down.quant_state).float()
    assert ((deq - w).norm() / w.norm()).item() < 0.12


def test_bench_draws_one_base_for_both_tools(monkeypatch):
    made: list[tuple[RandomBase, torch.nn.Module]] = []
    original = RandomBase.model

    def recording(self):
        model = original(self)
        made.append((self, model))
        return model

    monkeypatch.setattr(RandomBase, "model", recording)
    cfg = BenchConfig(model_config="tiny", device="cpu", steps=1, warmup=0, seq_len=16, rank=4, seq_lens=[16])
    result = runner.run_bench(cfg)
    layers = resolve_bench_config("tiny").num_hidden_layers
    bases = {id(b): b for b, m in made if b.config.num_hidden_layers == layers}  # the warm-up's base has 1 layer
    assert len(bases) == 1
    (base,) = bases.values()
    models = [m for b, m in made if b is base]
    assert len(models) == 3  # build() once, then one model per tool, over the same tensors
    assert result["base"]["bytes"] == base.nbytes > 0 and result["base"]["build_seconds"] > 0
    assert set(result["tools"]) == {"slimtune", "baseline"}
    s, b = result["tools"]["slimtune"], result["tools"]["baseline"]
    assert s["losses"][0] == pytest.approx(b["losses"][0], rel=1e-3)  # same weights, same tokens, B = 0 at init
