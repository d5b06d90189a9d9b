"""What `slimtune bench` runs and reports: its options (``BenchConfig``), the model config it builds, the command line
that reproduces a run, and the slimtune ÷ baseline ratios of the figures (used by the runner, the report and the CLI).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from slimtune.bench.baseline import BASELINE_KINDS
from slimtune.bench.configs import resolve_model_config
from slimtune.bench.estimate import CHECKPOINTING, OPTIMIZERS
from slimtune.errors import SlimtuneError
from slimtune.models.load import resolve_package_path
from slimtune.models.tiny import tiny_llama_config, tiny_qwen2_config

TOOLS = ("slimtune", "baseline")
PHASES = ("load", "forward", "backward", "optimizer")


@dataclass
class BenchConfig:
    """What `slimtune bench` runs (the CLI options, one to one)."""

    model_config: str = "tiny"
    """Built-in config name (Llama-3.1-8B, Qwen2.5-0.5B, SmolLM2-135M, ...), a folder / config.json / GGUF, or
    "tiny" (slimtune.models.tiny: hidden 64, 2 layers)."""
    layers: int | None = None
    """Override the number of decoder layers (a CPU-sized slice of a published config)."""
    device: str = "auto"
    steps: int = 5
    warmup: int = 1
    seq_len: int = 256
    batch: int = 1
    rank: int = 16
    alpha: float | None = None
    """Default 2 x rank."""
    adapter: str = "lora"
    targets: str = "all-linear"
    checkpointing: str = "full"
    """slimtune's mode (the baseline always uses HF gradient checkpointing)."""
    optimizer: str = "adamw"
    dtype: str = "auto"
    """Compute dtype: bfloat16 on CUDA, float32 on CPU (auto)."""
    max_context: bool = False
    mem_cap_gib: float = 24.0
    max_context_limit: int = 262_144
    seq_lens: list[int] | None = None
    """Sweep lengths; default seq_len/2, seq_len, 2 seq_len."""
    seed: int = 0
    lr: float = 1e-4
    tools: tuple[str, ...] = TOOLS


def resolve_bench_config(name: str, layers: int | None = None):
    """The transformers config a bench builds (no download): "tiny", a built-in name, a folder, JSON or GGUF."""
    if name in ("tiny", "tiny-llama"):
        config = tiny_llama_config()
    elif name == "tiny-qwen2":
        config = tiny_qwen2_config()
    else:
        config = resolve_model_config(resolve_package_path(name))
    if layers is not None:
        if layers < 1:
            raise SlimtuneError(f"--layers {layers}: expected a positive integer")
        config.num_hidden_layers = int(layers)
        if getattr(config, "layer_types", None) is not None:
            config.layer_types = list(config.layer_types)[:layers] + [config.layer_types[-1]] * max(
                0, layers - len(config.layer_types))
    config.use_cache = False
    config._attn_implementation = "sdpa"
    return config


def check_bench_config(cfg: BenchConfig) -> None:
    """Every option in range (one line naming the option otherwise)."""
    if cfg.steps < 1 or cfg.warmup < 0 or cfg.warmup >= cfg.steps:
        raise SlimtuneError(f"--steps {cfg.steps} --warmup {cfg.warmup}: need steps >= 1 and 0 <= warmup < steps")
    for name in ("seq_len", "batch", "rank"):
        if getattr(cfg, name) < 1:
            raise SlimtuneError(f"--{name.replace('_', '-')} {getattr(cfg, name)}: expected a positive integer")
    if cfg.adapter not in BASELINE_KINDS:
        raise SlimtuneError(f"--adapter {cfg.adapter}: the bench compares with PEFT, expected one of "
                            f"{', '.join(BASELINE_KINDS)}")
    if cfg.checkpointing not in CHECKPOINTING:
        raise SlimtuneError(f"--checkpointing {cfg.checkpointing}: expected one of {', '.join(CHECKPOINTING)}")
    if cfg.optimizer not in OPTIMIZERS:
        raise SlimtuneError(f"--optimizer {cfg.optimizer}: expected one of {', '.join(OPTIMIZERS)}")
    if cfg.dtype not in ("auto", "float32", "bfloat16", "float16"):
        raise SlimtuneError(f"--dtype {cfg.dtype}: expected auto, float32, bfloat16 or float16")
    if cfg.mem_cap_gib <= 0:
        raise SlimtuneError(f"--mem-cap-gib {cfg.mem_cap_gib}: expected a positive number")
    bad = [t for t in cfg.tools if t not in TOOLS]
    if bad or not cfg.tools:
        raise SlimtuneError(f"tools {bad or '()'}: expected some of {', '.join(TOOLS)}")
    if cfg.seq_lens is not None and any(s < 1 for s in cfg.seq_lens):
        raise SlimtuneError(f"--seq-lens {cfg.seq_lens}: expected positive integers")


def command_line(cfg: BenchConfig) -> list[str]:
    """The `slimtune bench` options that reproduce ``cfg`` (every option spelled out)."""
    argv = ["--model-config", cfg.model_config]
    if cfg.layers is not None:
        argv += ["--layers", str(cfg.layers)]
    argv += ["--device", cfg.device, "--steps", str(cfg.steps), "--warmup", str(cfg.warmup),
             "--seq-len", str(cfg.seq_len), "--batch", str(cfg.batch), "--rank", str(cfg.rank)]
    if cfg.alpha is not None:
        argv += ["--alpha", f"{cfg.alpha:g}"]
    argv += ["--adapter", cfg.adapter, "--targets", cfg.targets, "--checkpointing", cfg.checkpointing,
             "--optimizer", cfg.optimizer, "--dtype", cfg.dtype, "--mem-cap-gib", f"{cfg.mem_cap_gib:g}"]
    if cfg.max_context:
        argv += ["--max-context", "--max-context-limit", str(cfg.max_context_limit)]
    if cfg.seq_lens:
        argv += ["--seq-lens", ",".join(str(s) for s in cfg.seq_lens)]
    if tuple(cfg.tools) != TOOLS:
        argv += ["--tools", ",".join(cfg.tools)]
    argv += ["--seed", str(cfg.seed)]
    return argv


def memory_key(tool: dict[str, Any]) -> str:
    """The per-phase figure a report shows: allocated bytes on CUDA, RSS above the start on CPU."""
    phases = tool.get("phases", {})
    any_phase = next((p for p in phases.values() if p), {})
    return "allocated_bytes" if "allocated_bytes" in any_phase else "rss_above_start_bytes"


def ratios(tools: dict[str, dict[str, Any]]) -> dict[str, float | None]:
    """slimtune ÷ baseline for every figure both tools have (memory: lower is better; tokens/s, context: higher)."""
    if not all(t in tools for t in TOOLS):
        return {}
    s, b = tools["slimtune"], tools["baseline"]

    def div(x, y):
        return round(x / y, 4) if x is not None and y else None

    key = memory_key(s)
    out: dict[str, float | None] = {}
    for ph in PHASES:
        out[f"{ph}_{key}"] = div(s["phases"].get(ph, {}).get(key), b["phases"].get(ph, {}).get(key))
        if key == "allocated_bytes":
            out[f"{ph}_reserved_bytes"] = div(s["phases"].get(ph, {}).get("reserved_bytes"),
                                              b["phases"].get(ph, {}).get("reserved_bytes"))
    out["tokens_per_second"] = div(s.get("tokens_per_second"), b.get("tokens_per_second"))
    out["saved_bytes_per_token_per_layer"] = div(s.get("saved_bytes_per_token_per_layer"),
                                                 b.get("saved_bytes_per_token_per_layer"))
    out["activation_measured"] = div(s["activation"]["measured"]["total"], b["activation"]["measured"]["total"])
    out["saved_bytes_step"] = div(s.get("saved_bytes_step"), b.get("saved_bytes_step"))
    out["max_context_measured"] = div(s["max_context"].get("measured"), b["max_context"].get("measured"))
    out["max_context_estimated"] = div(s["max_context"].get("estimated"), b["max_context"].get("estimated"))
    return out
