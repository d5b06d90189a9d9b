"""The time budget of bench/gpu_check.sh: each step's work on the device, estimated from what is timed here on the
CPU and the device's measured rates, against the step's cap (`gpu_check.sh --dry-run` runs it).

    python bench/gpu/budget.py --steps FILE [--setup-seconds S] [--json OUT] [--budget 480] [--here JSON]

FILE holds the script's steps, one `name|cap|command` a line. Exit 1 when a step's estimate exceeds its cap or the
caps exceed the budget; the table says which. ``--here`` reuses the timings of an earlier run's --json (to try
other caps without timing again).

Timed here, in CPU seconds (user + sys, one thread: a machine shared with other jobs does not inflate them; the
device's idle 16-core host is taken to be no slower than this machine per core, so they are upper bounds there):

* ``imports``: a fresh Python importing torch, transformers, peft, bitsandbytes, triton and slimtune (every step is
  one such process);
* ``skeleton``: the random base of Llama-3.1-8B's module structure (32 layers, every module) at a tiny width, by
  the same code as the real one (``RandomBase``): the per-module cost the device pays too, whatever the width;
* ``compile``: one Triton compile of the heaviest kernel (the NF4 GEMM) and of a light one (RMSNorm) for sm_90,
  in a fresh cache; the shipped compile matrix (compile_matrix_triton-*.json) counts the variants a Llama-3.1-8B
  run compiles. The correctness step compiles them all; later steps find them in Triton's disk cache;
* ``cpu fill``: the CPU generator's rate (values/s), what the old base build paid for 8 B values per model;
* ``setup``: gpu_check.sh times its own setup (the copy and the wheels) and passes it in.

The device (an H100, the slower kind lent; KINDS.md measured 798 TFLOP/s bf16 matmul and 3.0 TB/s copy) is
credited with fractions of those rates that QLoRA training reaches or beats (``DEVICE``): 1/8 of the matmul peak
for training steps and kernel checks, 1/4 for flash attention, 25 TFLOP/s float64 (67 at peak), half the copy
bandwidth. Training FLOPs per token: forward 2 N, input gradient 2 N (the base is frozen), recomputation 2 N of the
decoder (full checkpointing), N the matmul parameters; causal attention 2 T² d per layer forward, x4.5 with the
backward and the recomputation. The max-context search is simulated with the estimator's longest fitting sequence
(each trial a full training step, an OOM one too); the bench's dispatch trials before its measured steps
(``decide_backends`` at ``dispatch_lens``) are one forward + backward a length plus every op's candidates. Not
timed here (no driver), so assumed: 2 s of CUDA context per process, 0.5 s of launcher build per compiled Triton
variant.

Fails too when correctness, dispatch and bench are not the first steps after env and setup, or are not estimated
to be done within the first 3 minutes.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

DEVICE = {
    "name": "H100 (nvidia-h100-x1)",
    "mm_flops": 798e12 / 8,  # bf16 matmul in a training step or a kernel check
    "attn_flops": 798e12 / 4,  # SDPA flash attention
    "fp64_flops": 25e12,  # the float64 references (tensor-core fp64: 67 TFLOP/s peak)
    "bandwidth": 3.0e12 / 2,  # bytes/s (read + written)
    "rng_bytes_per_value": 2 + 4 + 4 + 1,  # draw bf16, read it as fp32 chunks, quantize (codes, absmax)
}
STEP_OVERHEAD_S = 0.3  # per training step: optimizer, Python, synchronisation
CHECK_OVERHEAD_S = 0.1  # per kernel check: inputs, poisoning, norms
RUN_OVERHEAD_S = 0.01  # per run of one op in a dispatch trial (launches, synchronisation)
CACHED_KERNEL_S = 0.05  # a Triton kernel found in the disk cache
LAUNCHER_S = 0.5  # per compiled variant: Triton's launcher stub and module load (needs the driver: not timed here)
CUDA_INIT_S = 2.0  # a process's CUDA context, cuBLAS handles
#: what the first 3 minutes must hold: these steps, in this order after env and setup, done by FIRST_S (estimated)
FIRST, FIRST_S = ("correctness", "dispatch", "bench"), 180.0


@dataclass
class Here:
    """What was timed on this machine."""

    imports_s: float  # torch, transformers, peft, bitsandbytes, triton, slimtune (a step's process)
    torch_import_s: float  # torch alone (env)
    setup_import_s: float  # what setup's check imports (bitsandbytes, pydantic, slimtune.kernels, slimtune.cli)
    skeleton_s: float  # RandomBase of the 8B module structure at a tiny width
    skeleton_layers: int
    compile_heavy_s: float
    compile_light_s: float
    cpu_fill_values_per_s: float
    setup_s: float
    heavy_variants: int
    light_variants: int


@dataclass
class Step:
    name: str
    cap: float
    command: str
    terms: dict[str, float] = field(default_factory=dict)

    @property
    def estimate(self) -> float:
        return sum(self.terms.values())


# --------------------------------------------------------------------------------------------- timing here


def _timed(code: str, env: dict) -> list[float]:
    """Run ``code`` (which prints the CPU seconds it measured, see CPU_CLOCK) in a fresh one-thread Python."""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600,
                       env={**env, "OMP_NUM_THREADS": "1"})  # fmt: skip
    if r.returncode != 0:
        raise RuntimeError(f"timing failed: {r.stderr.strip().splitlines()[-1:]}")
    return [float(v) for v in r.stdout.split()]


#: CPU seconds of this process and its finished children (ptxas, cuobjdump)
CPU_CLOCK = """
import resource, time
def cpu():
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.process_time() + kids.ru_utime + kids.ru_stime
"""
IMPORTS = CPU_CLOCK + """
t0 = cpu()
import torch
t1 = cpu()
import bitsandbytes, pydantic, slimtune.kernels, slimtune.cli
t2 = cpu()
import transformers, peft, triton
print(t1 - t0, t2 - t0, cpu() - t0)
"""

SKELETON = CPU_CLOCK + """
import torch
from slimtune.bench.bench_config import resolve_bench_config
from slimtune.bench.random_model import RandomBase
c = resolve_bench_config("Llama-3.1-8B")
c.hidden_size, c.intermediate_size, c.vocab_size, c.head_dim = 128, 256, 1024, 4
t0 = cpu(); RandomBase(c, device="cpu", dtype=torch.float32).build(); build = cpu() - t0
g = torch.Generator().manual_seed(0)
t = torch.empty(1 << 25, dtype=torch.bfloat16)
t0 = cpu(); t.normal_(0.0, 0.02, generator=g); fill = cpu() - t0
print(build, c.num_hidden_layers, t.numel() / fill)
"""

COMPILE = CPU_CLOCK + """
import torch
from slimtune.kernels import aot, rms_norm
from slimtune.ops import dispatch
from slimtune.ops.lora_linear import LoRAProjection, lora_projection
from slimtune.ops.nf4 import quantize_4bit
x = torch.zeros(64, 256, dtype=torch.bfloat16)
proj = LoRAProjection(base=quantize_4bit(torch.randn(256, 256) * 0.05), lora_A=torch.zeros(16, 256),
                      lora_B=torch.zeros(256, 16), scale=2.0)
with dispatch.triton_on_cpu(), aot.capture() as launches:
    lora_projection(x, proj, backend="triton")
spec = rms_norm.COMPILE_VARIANTS[0]
light = aot.spec_launch(getattr(rms_norm, spec["kernel"]), spec)
out = []
for launch in (launches[0], light):
    t0 = cpu(); row = aot.compile_launch(launch, "sm_90"); out.append(cpu() - t0)
    assert row["ok"], row
print(*out)
"""


def time_here(setup_s: float) -> Here:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    torch_s, setup_import_s, imports_s = _timed(IMPORTS, env)
    skeleton_s, layers, fill = _timed(SKELETON, env)
    with tempfile.TemporaryDirectory(prefix="gpu-budget-triton-") as cache:
        heavy_s, light_s = _timed(COMPILE, {**env, "TRITON_CACHE_DIR": cache})
    matrix = sorted(HERE.glob("compile_matrix_triton-*.json"))
    rows = [r for r in json.loads(matrix[-1].read_text()) if r["arch"] == "sm_90"] if matrix else []
    heavy = sum(r["kernel"].startswith("qlora_gemm") for r in rows)
    return Here(imports_s, torch_s, setup_import_s, skeleton_s, int(layers), heavy_s, light_s, fill, setup_s, heavy,
                len(rows) - heavy)


# --------------------------------------------------------------------------------------------- the work model


def _model(name: str = "Llama-3.1-8B"):
    from slimtune.bench.bench_config import resolve_bench_config
    from slimtune.bench.configs import parameter_counts

    config = resolve_bench_config(name)
    counts = parameter_counts(config)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    n_dec = counts["per_layer_linear_weights"] * config.num_hidden_layers
    return config, counts, head_dim, n_dec


def base_build_s(here: Here, layers: int | None = None) -> float:
    """The random base drawn and quantized on the device: the per-module cost timed here, the values at the
    device's bandwidth."""
    config, counts, _, n_dec = _model()
    layers = config.num_hidden_layers if layers is None else layers
    values = counts["embed_tokens"] + counts["lm_head"] + n_dec * layers // config.num_hidden_layers
    return here.skeleton_s * layers / here.skeleton_layers + values * DEVICE["rng_bytes_per_value"] / DEVICE[
        "bandwidth"]


def train_step_s(batch: int, seq: int) -> float:
    """One QLoRA training step of Llama-3.1-8B (full checkpointing) on the device."""
    config, counts, head_dim, n_dec = _model()
    tokens = batch * seq
    n_mm = n_dec + config.vocab_size * config.hidden_size  # lm_head is a matmul too
    mm = tokens * (4 * n_mm + 2 * n_dec) / DEVICE["mm_flops"]
    attn = batch * 4.5 * 2 * seq * seq * config.num_attention_heads * head_dim * config.num_hidden_layers
    dequant = 3 * n_dec * 4.5 / DEVICE["bandwidth"]  # every 4-bit weight dequantized 3 times a step
    return mm + attn / DEVICE["attn_flops"] + dequant + STEP_OVERHEAD_S


def forward_s(batch: int, seq: int) -> float:
    config, _, head_dim, n_dec = _model()
    tokens = batch * seq
    attn = batch * 2 * seq * seq * config.num_attention_heads * head_dim * config.num_hidden_layers
    return tokens * 2 * (n_dec + config.vocab_size * config.hidden_size) / DEVICE["mm_flops"] + attn / DEVICE[
        "attn_flops"] + STEP_OVERHEAD_S


def _check_s(m: int, out_f: int, in_f: int) -> float:
    """One kernel check: forward + gradients in bf16, then the float64 reference."""
    flops = 6 * m * out_f * in_f
    return flops / DEVICE["mm_flops"] + flops / DEVICE["fp64_flops"] + CHECK_OVERHEAD_S


def correctness_terms(here: Here) -> dict[str, float]:
    from check_kernels import LLAMA

    h, inter, q, kv, vocab = LLAMA["hidden"], LLAMA["inter"], LLAMA["q"], LLAMA["kv"], LLAMA["vocab"]
    m, backends = 2048, 3
    proj = [(q, h), (kv, h), (inter, h), (h, inter)]
    per_kind = sum(_check_s(m, o, i) for o, i in proj) + _check_s(m, q + 2 * kv, h) + _check_s(m, 3 * inter, h)
    config, counts, _, n_dec = _model()
    layer_mm = n_dec // config.num_hidden_layers + vocab * h
    decoder = (base_build_s(here, layers=1) + 8 * (2 * vocab * h) / DEVICE["bandwidth"]  # the float64 copy
               + 4 * 6 * m * layer_mm / DEVICE["mm_flops"] + 6 * m * layer_mm / DEVICE["fp64_flops"])
    variants = here.heavy_variants + here.light_variants
    return {
        "imports + CUDA": here.imports_s + CUDA_INIT_S,
        "triton compile": here.heavy_variants * here.compile_heavy_s + here.light_variants * here.compile_light_s
        + variants * LAUNCHER_S,
        "kernel checks": backends * 2 * per_kind + 2 * _check_s(m, vocab, h) + 4 * CHECK_OVERHEAD_S,
        "decoder layer": decoder,
    }


def candidates_s(m: int = 4096) -> float:
    """Measured dispatch deciding every op of Llama-3.1-8B at ``m`` rows: 3 candidates x (the correctness run, a
    warm-up, 3 timed runs) of forward + backward, LoRA and DoRA projections, the MLP and q/k/v."""
    from check_kernels import LLAMA

    h, inter, q, kv = LLAMA["hidden"], LLAMA["inter"], LLAMA["q"], LLAMA["kv"]
    runs = 3 * 5
    shapes = [(q, h), (kv, h), (inter, h), (h, inter)] * 2 + [(3 * inter, h), (q + 2 * kv, h)]
    return sum(runs * (6 * m * o * i / DEVICE["mm_flops"] + RUN_OVERHEAD_S) for o, i in shapes)


def dispatch_terms(here: Here) -> dict[str, float]:
    return {"imports + CUDA": here.imports_s + CUDA_INIT_S,
            "cached kernels": (here.heavy_variants + here.light_variants) * CACHED_KERNEL_S,
            "measured candidates": candidates_s()}


def microbench_terms(here: Here) -> dict[str, float]:
    from check_kernels import LLAMA

    h, inter, q, kv = LLAMA["hidden"], LLAMA["inter"], LLAMA["q"], LLAMA["kv"]
    timings = 0.0
    for m in (1024, 4096, 16384):
        for o, i in [(q, h), (kv, h), (inter, h), (h, inter)]:
            run = 6 * m * o * i / DEVICE["mm_flops"] + o * i * 4.5 / DEVICE["bandwidth"]
            timings += 4 * (max(0.15, 5 * run) + 0.1)  # do_bench: 25 ms warm-up + 100 ms, at least a few runs
    return {"imports + CUDA": here.imports_s + CUDA_INIT_S,
            "cached kernels": (here.heavy_variants + here.light_variants) * CACHED_KERNEL_S,
            "do_bench timings": timings}  # fmt: skip


def _bench_args(command: str) -> argparse.Namespace:
    ap = argparse.ArgumentParser(add_help=False)
    for opt, kind, default in (("--seq-len", int, 256), ("--batch", int, 1), ("--steps", int, 5),
                               ("--warmup", int, 1), ("--mem-cap-gib", float, 24.0), ("--rank", int, 16),
                               ("--max-context-limit", int, 262_144), ("--seq-lens", str, None)):
        ap.add_argument(opt, type=kind, default=default)
    ap.add_argument("--max-context", action="store_true")
    a, _ = ap.parse_known_args(shlex.split(command))
    return a


def bench_terms(here: Here, command: str) -> dict[str, float]:
    """`slimtune bench` of Llama-3.1-8B: warm-up, the base once, then per tool its steps, the forwards that count
    saved bytes, the sweep and (with --max-context) the search."""
    from slimtune.bench.bench_config import BenchConfig
    from slimtune.bench.memory import dispatch_lens
    from slimtune.bench.runner import _sweep_lens, search_max_context, tool_estimate

    a = _bench_args(command)
    cfg = BenchConfig(model_config="Llama-3.1-8B", seq_len=a.seq_len, batch=a.batch, steps=a.steps,
                      warmup=a.warmup, rank=a.rank, mem_cap_gib=a.mem_cap_gib, max_context=a.max_context,
                      max_context_limit=a.max_context_limit,
                      seq_lens=[int(s) for s in a.seq_lens.split(",")] if a.seq_lens else None)
    config, *_ = _model()
    targets = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    import torch

    warm = 2 * 2 * STEP_OVERHEAD_S + (here.heavy_variants + here.light_variants) * CACHED_KERNEL_S
    lens = dispatch_lens([cfg.seq_len, *_sweep_lens(cfg)], batch=cfg.batch, grow=cfg.max_context)
    terms = {"imports + CUDA": here.imports_s + CUDA_INIT_S, "warm-up + cached kernels": warm,
             "random base (once)": base_build_s(here),
             "dispatch trials": sum(train_step_s(cfg.batch, s) for s in lens) + candidates_s()}
    for tool in ("slimtune", "baseline"):
        terms[f"{tool} steps"] = (cfg.steps * train_step_s(cfg.batch, cfg.seq_len)
                                  + 3 * forward_s(cfg.batch, cfg.seq_len)
                                  + sum(train_step_s(cfg.batch, s) for s in _sweep_lens(cfg)))
        if cfg.max_context:
            longest = tool_estimate(tool, config, cfg, torch.bfloat16, targets, cfg.seq_len).max_seq_len_that_fits()
            _, trials = search_max_context(lambda s, n=longest: s <= n, start=cfg.seq_len,
                                           limit=cfg.max_context_limit)
            terms[f"{tool} search ({len(trials)} trials)"] = sum(train_step_s(cfg.batch, s) for s, _ in trials)
    return terms


def estimate_steps(steps: list[Step], here: Here) -> None:
    for s in steps:
        if s.name == "env":
            s.terms = {"import torch + CUDA": here.torch_import_s + CUDA_INIT_S, "nvidia-smi, pip list": 3.0}
        elif s.name == "setup":
            s.terms = {"copy + wheels (timed here)": here.setup_s, "imports (its check)": here.setup_import_s}
        elif s.name == "correctness":
            s.terms = correctness_terms(here)
        elif s.name == "dispatch":
            s.terms = dispatch_terms(here)
        elif s.name == "microbench":
            s.terms = microbench_terms(here)
        elif "slimtune.cli bench" in s.command:
            s.terms = bench_terms(here, s.command)
        else:
            raise SystemExit(f"budget.py: no work model for step {s.name!r}")


def table(steps: list[Step], here: Here, budget: float) -> tuple[list[str], bool]:
    lines = [f"== time budget on the device ({DEVICE['name']}; see bench/gpu/budget.py for the model)",
             f"  timed here: imports {here.imports_s:.1f} s; 8B module skeleton {here.skeleton_s:.2f} s "
             f"({here.skeleton_layers} layers); Triton compile sm_90 {here.compile_heavy_s:.1f} s (NF4 GEMM) / "
             f"{here.compile_light_s:.1f} s (RMSNorm) x {here.heavy_variants} / {here.light_variants} variants; "
             f"setup {here.setup_s:.1f} s",
             f"  random base of Llama-3.1-8B on the device: {base_build_s(here):.1f} s (the CPU generator here: "
             f"{here.cpu_fill_values_per_s / 1e6:.0f} M values/s, {_cpu_base_s(here):.0f} s per model)",
             f"  {'step':<12} {'estimate':>9} {'cap':>6} {'done by':>8} {'at worst':>9}  verdict   largest term"]
    ok, start, done = True, 0.0, 0.0
    for s in steps:
        fits = s.estimate <= s.cap
        ok &= fits
        big = max(s.terms, key=s.terms.get)
        done, start = done + s.estimate, start + s.cap
        lines.append(f"  {s.name:<12} {s.estimate:>7.0f} s {s.cap:>4.0f} s {done:>6.0f} s {start:>7.0f} s  "
                     f"{'fits' if fits else 'TOO LONG'}  {big} {s.terms[big]:.0f} s")
    lines.append(f"  time caps: {start:.0f} s in all (budget {budget:.0f})")
    if start > budget:
        ok = False
        lines.append(f"  TOO LONG: the caps exceed the budget by {start - budget:.0f} s")
    names = [s.name for s in steps]
    first = [s for s in steps if s.name not in ("env", "setup")][: len(FIRST)]
    first_done = sum(s.estimate for s in steps[: names.index(first[-1].name) + 1]) if first else 0.0
    if tuple(s.name for s in first) != FIRST or first_done > FIRST_S:
        ok = False
        lines.append(f"  FIRST 3 MINUTES: {', '.join(FIRST)} must come first and be done by {FIRST_S:.0f} s "
                     f"(estimated {first_done:.0f} s, order {', '.join(names)})")
    else:
        lines.append(f"  first 3 minutes: {', '.join(FIRST)} done by {first_done:.0f} s (estimated)")
    return lines, ok


def _cpu_base_s(here: Here) -> float:
    config, counts, _, n_dec = _model()
    return (counts["embed_tokens"] + counts["lm_head"] + n_dec) / here.cpu_fill_values_per_s


def read_steps(path: Path) -> list[Step]:
    steps = []
    for line in path.read_text().splitlines():
        if line.strip():
            name, cap, command = line.split("|", 2)
            steps.append(Step(name, float(cap), command))
    return steps


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=Path, required=True, help="one name|cap|command a line")
    ap.add_argument("--setup-seconds", type=float, default=0.0)
    ap.add_argument("--budget", type=float, default=480.0)
    ap.add_argument("--json", type=Path)
    ap.add_argument("--here", type=Path, help="an earlier --json: its timings, not new ones")
    a = ap.parse_args(argv)
    steps = read_steps(a.steps)
    here = Here(**json.loads(a.here.read_text())["here"]) if a.here else time_here(a.setup_seconds)
    estimate_steps(steps, here)
    lines, ok = table(steps, here, a.budget)
    print("\n".join(lines), flush=True)
    if a.json:
        a.json.write_text(json.dumps({"device": DEVICE, "here": vars(here), "budget": a.budget, "ok": ok,
                                      "steps": [{"name": s.name, "cap": s.cap, "estimate": round(s.estimate, 2),
                                                 "terms": {k: round(v, 2) for k, v in s.terms.items()}}
                                                for s in steps]}, indent=1))  # fmt: skip
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
