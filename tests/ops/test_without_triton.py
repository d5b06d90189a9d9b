"""The torch and dequant backends run with triton hidden: a fused forward/backward of a tiny Llama through
slimtune.ops, in a subprocess whose import system refuses `triton`, matches the unfused model."""

import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent(
    """
    import importlib.abc, sys

    class NoTriton(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name == "triton" or name.startswith("triton."):
                raise ModuleNotFoundError("No module named 'triton' (hidden by the test)", name=name)
            return None

    sys.meta_path.insert(0, NoTriton())

    import copy
    import torch, transformers
    from slimtune.adapters.base import get_adapter_class
    from slimtune.adapters.inject import inject
    from slimtune.models.fused import fuse_model
    from slimtune.ops.dispatch import triton_available, use_backend

    assert not triton_available()
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(hidden_size=64, intermediate_size=136, num_attention_heads=4,
                                   num_key_value_heads=2, num_hidden_layers=2, vocab_size=300)
    plain = transformers.LlamaForCausalLM(cfg).float().train()
    inject(plain, get_adapter_class("dora").Config(rank=4, alpha=8.0))
    for n, p in plain.named_parameters():
        if n.endswith("lora_B"):
            torch.nn.init.normal_(p, std=0.05)
    ids = torch.randint(0, 300, (2, 29))

    def grads(model):
        model.zero_grad(set_to_none=True)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    want_loss, want = grads(plain)
    fused = copy.deepcopy(plain)
    report = fuse_model(fused)
    assert len(report.fused) >= 8, report.fused
    for mode in ("auto", "dequant", "torch"):
        with use_backend(mode):
            loss, got = grads(fused)
        assert abs(loss - want_loss) < 1e-5 * abs(want_loss), (mode, loss, want_loss)
        worst = max(((got[n] - want[n]).norm() / want[n].norm()).item() for n in want)
        assert worst < 1e-4, (mode, worst)
    assert not any(m == "triton" or m.startswith(("triton.", "slimtune.kernels")) for m in sys.modules)
    print("OK", len(want), "gradients")
    """
)


def test_fused_step_with_triton_hidden():
    r = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=300,
                       env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1"})
    assert r.returncode == 0 and "OK" in r.stdout, r.stderr[-3000:]
