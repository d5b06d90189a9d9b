"""A tiny Llama saved as a local HF folder (save_pretrained + the tiny tokenizer) and a recipe writer, for the
reliability tests that run the real `slimtune run` (test_crash_resume.py, test_faults.py)."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import pytest
import torch
import yaml

from slimtune.models.tiny import tiny_llama_config, tiny_tokenizer, udhr_path

# What the CLI subprocesses run with: offline, one thread (bit-identical results across processes).
SUBPROCESS_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
                  "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    from transformers import LlamaForCausalLM

    d = tmp_path_factory.mktemp("tiny_llama")
    tok = tiny_tokenizer()
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = LlamaForCausalLM(tiny_llama_config(vocab_size=len(tok)))
    model.save_pretrained(d)
    tok.save_pretrained(d)
    return d


def tiny_recipe(model_dir: Path, run_dir: Path, *, steps: int = 6, **train) -> dict:
    """A small nf4 LoRA run on Sardinian UDHR text; dropout > 0 so the RNG state matters on resume."""
    return {
        "model": {"name": str(model_dir)},
        "quant": {"mode": "nf4"},
        "adapter": {"kind": "lora", "rank": 4, "alpha": 8, "dropout": 0.1},
        "data": {"sources": [{"path": str(udhr_path("src")), "max_records": 12}], "format": "text",
                 "max_seq_len": 32},
        "train": {"lr": 5e-3, "steps": steps, "micro_batch": 2, "grad_accum": 2, "warmup": 1, "seed": 3,
                  "save_every": 1, "keep_checkpoints": 2, **train},
        "output": {"dir": str(run_dir), "export_peft": False},
    }


def write_recipe(path: Path, recipe: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(recipe))
    return path


@contextlib.contextmanager
def one_thread():
    """In-process runs use one thread like the subprocesses (OMP_NUM_THREADS=1), so results match bit for bit."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def invoke(args: list[str], env: dict[str, str] | None = None):
    """`slimtune ARGS` in-process (typer's CliRunner), with extra environment variables."""
    from typer.testing import CliRunner

    from slimtune.cli import app

    with one_thread():
        return CliRunner().invoke(app, args, env={**(env or {})}, catch_exceptions=True)


@pytest.fixture
def no_fault(monkeypatch):
    monkeypatch.delenv("SLIMTUNE_FAULT", raising=False)
    return os.environ


class _Helpers:
    """The helpers above as one fixture (test modules cannot import a conftest reliably)."""

    env = SUBPROCESS_ENV
    recipe = staticmethod(tiny_recipe)
    write_recipe = staticmethod(write_recipe)
    one_thread = staticmethod(one_thread)
    invoke = staticmethod(invoke)


@pytest.fixture
def rel(no_fault) -> _Helpers:
    return _Helpers()
