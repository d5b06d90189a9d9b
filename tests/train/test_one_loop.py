"""One training loop: only ``Trainer`` steps an optimizer, and LoRAM's alignment and the benchmark (both of its
tools) train through it."""

from __future__ import annotations

import ast
from pathlib import Path

import torch

import slimtune
from slimtune.bench.bench_config import BenchConfig
from slimtune.bench.runner import _build_side
from slimtune.models.tiny import tiny_llama_config

ROOT = Path(slimtune.__file__).resolve().parent


def _step_calls(path: Path) -> list[int]:
    """Lines of ``<x>.step()`` calls (optimizer / scheduler steps: no arguments), except inside a method named
    ``step`` (an optimizer wrapping another, e.g. train/optim.py's fp32 master weights, steps its inner one)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    inside_step = {id(c) for f in ast.walk(tree) if isinstance(f, ast.FunctionDef) and f.name == "step"
                   for c in ast.walk(f)}
    return [n.lineno for n in ast.walk(tree) if isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute)
            and n.func.attr == "step" and not n.args and not n.keywords and id(n) not in inside_step]


def test_only_the_trainer_steps_an_optimizer():
    files = sorted(ROOT.rglob("*.py")) + sorted((ROOT.parent / "kernels").rglob("*.py"))
    found = {str(p.relative_to(ROOT.parent)): lines for p in files if (lines := _step_calls(p))}
    assert set(found) == {"slimtune/train/loop.py"}, found


def test_bench_trains_both_tools_with_the_trainer(tmp_path):
    config = tiny_llama_config(num_hidden_layers=1)
    config.use_cache = False
    cfg = BenchConfig(device="cpu", steps=2, warmup=0, seq_len=16, rank=4, lr=1e-2, checkpointing="none")
    for tool in ("slimtune", "baseline"):
        side = _build_side(tool, config, cfg, device=torch.device("cpu"), dtype=torch.float32,
                           targets=("q_proj", "v_proj"), out={}, run_dir=tmp_path / tool)
        trainable = {n: p.detach().clone() for n, p in side.model.named_parameters() if p.requires_grad}
        frozen = {n: p.detach().clone() for n, p in side.model.named_parameters()
                  if not p.requires_grad and p.dtype.is_floating_point}
        assert trainable and all("lora" in n for n in trainable), (tool, list(trainable)[:4])
        summary = side.trainer.train()
        assert summary["steps"] == 2 and len(side.trainer.history) == 2, tool
        after = dict(side.model.named_parameters())
        assert any(not torch.equal(after[n], v) for n, v in trainable.items()), f"{tool}: adapters did not train"
        assert all(torch.equal(after[n], v) for n, v in frozen.items()), f"{tool}: a frozen weight changed"
        assert side.try_step(side.ids(16)) and side.trainer.pos.step == 3
