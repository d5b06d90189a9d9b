"""Every kernel variant a QLoRA run on Llama-3.1-8B / Qwen2.5-3B launches compiles ahead of time for sm_80/86/89/90
with the installed triton, within each arch's shared memory per block; the limit check itself can fail."""

import json
import os
import subprocess
import sys
import textwrap

import pytest

from slimtune.ops.compile_matrix import ARCH_NAMES, compile_matrix


pytestmark = pytest.mark.slow  # ~40 s the first time (160 compiles); triton's cache makes reruns fast


@pytest.fixture(scope="module")
def rows():
    return compile_matrix(ARCH_NAMES)  # one child process, one kernel at a time (~40 variants x 4 archs)


def test_every_variant_compiles_within_limits_on_every_arch(rows):
    bad = [f"{r['kernel']} {r['arch']}: {r['error']}" for r in rows if not r["ok"]]
    assert not bad, bad
    kernels = {r["kernel"] for r in rows}
    for name in kernels:
        assert sorted(r["arch"] for r in rows if r["kernel"] == name) == sorted(ARCH_NAMES), name
    for r in rows:
        assert r["shared_bytes"] <= r["shared_limit_kib"] * 1024 and r["registers"] > 0
    assert {r["shared_limit_kib"] for r in rows if r["arch"] in ("sm_86", "sm_89")} == {99}


def test_the_run_s_kernels_are_all_there(rows):
    kernels = " ".join({r["kernel"] for r in rows})
    for want in ("qlora_gemm[fwd,nf4dq,has_lora,", "qlora_gemm[fwd,nf4dq,has_lora+has_colscale,",  # LoRA, DoRA
                 "qlora_gemm[fwd,nf4dq,has_lora+has_bias,",  # Qwen's q/k/v bias
                 "qlora_gemm[dx,nf4dq,a_kscale+has_lora+accumulate,", "qlora_gemm[dmag,", "row_norm_sq[nf4dq",
                 "rms_norm_fwd[N=4096,bf16", "rms_norm_bwd[N=2048,bf16", "rope[32/8x128,bf16", "rope[16/2x128,bf16",
                 "glu_fwd[bf16,silu]", "glu_bwd[bf16,silu]", "ce_rows[bf16", "nf4_dequantize[dq]"):  # fmt: skip
        assert want in kernels, want


SCRIPT = textwrap.dedent(
    """
    import json, torch
    from slimtune.kernels import aot, qlora_linear as ql
    from slimtune.ops import dispatch
    from slimtune.ops.lora_linear import LoRAProjection, lora_projection
    from slimtune.ops.nf4 import quantize_4bit

    ql.DEFAULT_BLOCKS = ql.GemmBlocks(num_stages=3)  # 64x64x64 in 3 stages: ~112 KiB, too much for sm_86
    x = torch.zeros(64, 256, dtype=torch.bfloat16)
    proj = LoRAProjection(base=quantize_4bit(torch.randn(256, 256) * 0.05))
    with dispatch.triton_on_cpu(), aot.capture() as launches:
        lora_projection(x, proj, backend="triton")
    print(json.dumps([aot.compile_launch(launches[0], a) for a in ("sm_86", "sm_90")]))
    """
)


def test_shared_memory_limit_is_enforced():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    sm86, sm90 = json.loads(r.stdout.strip().splitlines()[-1])
    assert not sm86["ok"] and "KiB > 99 KiB" in sm86["error"] and sm86["shared_bytes"] > 99 * 1024
    assert sm90["ok"] and 99 * 1024 < sm90["shared_bytes"] <= 227 * 1024  # fits H100, not an RTX 30xx/40xx


def test_kernels_compile_command_reports_the_same_table(rows):
    """`slimtune kernels compile --json` prints the matrix (kernel x arch, registers, spills, shared memory)."""
    from typer.testing import CliRunner

    from slimtune.cli import app

    res = CliRunner().invoke(app, ["kernels", "compile", "--arch", "sm_86", "--json"])
    assert res.exit_code == 0, res.output
    table = json.loads(res.output)
    assert {r["arch"] for r in table} == {"sm_86"} and all(r["ok"] for r in table)
    want = {(r["kernel"], r["registers"], r["shared_bytes"]) for r in rows if r["arch"] == "sm_86"}
    assert {(r["kernel"], r["registers"], r["shared_bytes"]) for r in table} == want
    bad = CliRunner().invoke(app, ["kernels", "compile", "--arch", "sm_61"])
    assert bad.exit_code == 2 and "Traceback" not in bad.output
