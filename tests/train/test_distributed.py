"""Data-parallel training (slimtune.train.distributed) end to end on the CPU: gloo, 2 processes, real torchrun.

One lineage of `torchrun --standalone --nproc-per-node 2 -m slimtune run` (micro_batch 2, grad_accum 2, nf4 base,
fused LoRA, fp32 adapter, dropout 0, fixed seed) against an in-process 1-process run with micro_batch 4 on the same
data:

    launch 1   fresh       SIGKILL of rank 1 after step 3 of 12: torchrun stops rank 0, exits non-zero, soon
    (1 proc)   --resume    refused: the checkpoint is of a 2-process run (the global batch would change)
    launch 2   --resume    runs to the end

The per-step losses, gradient norms and token counts of the lineage equal the 1-process run's (rtol 1e-6: the
ranks' partial sums are added in another order), and so does the final adapter (≤ ADAPTER_ATOL). The 42 examples make
the last global micro-batch of each epoch 2 rows for 4 slots: rank 1 trains a padded stand-in there (stated in
slimtune.train.distributed), which the equality covers. Every write under the run folder is recorded by an audit
hook (a sitecustomize on PYTHONPATH) in each worker: rank 0 wrote, rank 1 never did (Python-level opens, mkdir,
rename, remove; torch.save and safetensors open files natively, inside the same rank-0-only writer).

FSDP (`train.distributed: fsdp`): the same recipe with evaluation every 4 steps, on 2 ranks under DDP and under
FSDP (killed after step 5, resumed from the gathered step-4 checkpoint), against the 1-process run: per-step
losses and validation losses equal, the FSDP adapter equal to the DDP one, the gathered AdamW state equal to the
1-process state, rank 1 writes nothing.

Also: a LoRAM recipe (prune, align, train, recover, merge, evaluate) on 2 ranks equals its 1-process run; the
estimator's --nproc figures; the per-rank sharding of a global batch and the torchrun command line; what FSDP
refuses.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
from safetensors.torch import load_file
from subprocs import Proc, descendants

from slimtune.train.distributed import DistContext, _PadBatch, torchrun_argv
from slimtune.train.state import list_checkpoints

# The torchrun jobs (2 processes each on a 2-core machine) run one after another on one xdist worker
# (`make test` passes --dist loadgroup), never beside each other: timings stay those of one job.
pytestmark = pytest.mark.xdist_group("torchrun")

STEPS = 12  # the kill lands after step 3: 9 steps of headroom on a fast machine
KILL_AFTER = 3
RTOL = 1e-6
# The adapter after 12 AdamW steps: Adam divides by sqrt(v), which magnifies the ranks' other summation order on
# coordinates with tiny gradients. Measured with transformers 5.25 / torch 2.13 (CPU, gloo): 1.6e-6 (this lineage),
# 1.04e-6 (LoRAM), 2.4e-6 (FSDP stacked stages) while per-step losses and gradient norms still agree to 1e-6 relative; a gradient that is not
# reduced, or reduced twice, moves the adapter by ~1e-2.
ADAPTER_ATOL = 5e-6

# Records every write-like call of a torchrun worker under $SLIMTUNE_TEST_WATCH into writes-rank<RANK>.txt.
SITECUSTOMIZE = r'''
import os, sys
_watch, _rank = os.environ.get("SLIMTUNE_TEST_WATCH"), os.environ.get("RANK")
if _watch and _rank is not None:
    _watch = os.path.realpath(_watch)
    _fd = os.open(os.path.join(os.environ["SLIMTUNE_TEST_WATCH_LOG"], f"writes-rank{_rank}.txt"),
                  os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    _W = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC
    _PATH_EVENTS = {"os.mkdir", "os.rename", "os.replace", "os.remove", "os.rmdir", "shutil.rmtree", "os.truncate",
                    "os.symlink", "os.link", "os.chmod", "os.utime"}

    def _hook(event, args):
        if event == "open":
            path, mode, flags = args
            writes = (isinstance(mode, str) and any(c in mode for c in "wax+")) or (
                isinstance(flags, int) and bool(flags & _W))
        elif event in _PATH_EVENTS:
            path, writes = args[0], True
        else:
            return
        if not writes or not isinstance(path, (str, bytes, os.PathLike)):
            return
        p = os.fsdecode(os.fspath(path))
        p = os.path.realpath(p if os.path.isabs(p) else os.path.join(os.getcwd(), p))
        if p == _watch or p.startswith(_watch + os.sep):
            os.write(_fd, f"{event} {p}\n".encode())

    sys.addaudithook(_hook)
'''


def dp_recipe(rel, model_dir: Path, run_dir: Path, micro_batch: int) -> dict:
    r = rel.recipe(model_dir, run_dir, steps=STEPS, micro_batch=micro_batch, grad_accum=2, device="cpu")
    r["adapter"]["dropout"] = 0.0  # a 4-row dropout mask is not two 2-row ones: exact equality needs none
    r["data"]["sources"][0]["max_records"] = 2  # 42 packed examples of 32 tokens (asserted below)
    return r


def metric_rows(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().split("\n")[:-1]:
        try:
            rows.append(json.loads(line))
        except ValueError:
            pass
    return rows


def assert_rows_match(got: list[dict], ref: list[dict], label: str) -> None:
    assert [g["step"] for g in got] == [r["step"] for r in ref[: len(got)]], label
    for g, r in zip(got, ref):
        assert (g["tokens"], g["lr"], g["skipped"]) == (r["tokens"], r["lr"], r["skipped"]), (label, g, r)
        for key in ("loss", "grad_norm"):
            assert abs(g[key] - r[key]) <= RTOL * abs(r[key]), (label, key, g, r)


def adapter_tensors(run_dir: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted((run_dir / "adapter_native").glob("*.safetensors")):
        out.update({f"{f.name}:{k}": v for k, v in load_file(f).items()})
    assert out, f"no adapter tensors in {run_dir / 'adapter_native'}"
    return out


class Torchrun:
    """`torchrun --standalone --nproc-per-node 2 -m slimtune run RECIPE [ARGS]` as a subprocess (subprocs.Proc:
    output in files, the whole tree killed on a timeout, workers in their own sessions included)."""

    def __init__(self, recipe: Path, env: dict[str, str], cwd: Path):
        self.recipe, self.env, self.cwd = recipe, env, cwd

    def start(self, *extra: str) -> Proc:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
               "-m", "slimtune", "run", str(self.recipe), *extra]
        return Proc(cmd, env=self.env, cwd=self.cwd)


def finish(proc: Proc, timeout: float, what: str = "torchrun") -> tuple[str, str]:
    """Wait for a torchrun job; past ``timeout`` kill it with every worker: a hang fails the test, never outlives it."""
    with proc:
        return proc.wait(timeout, what)


def worker(proc: Proc, rank: int, timeout: float = 60):
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        for child in descendants(proc.pid):
            try:
                if child.environ().get("RANK") == str(rank):
                    return child
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
        time.sleep(0.05)
    proc.kill()
    pytest.fail(f"no rank {rank} worker in {timeout} s")


def wait_for_step(proc: Proc, run_dir: Path, step: int, timeout: float = 120) -> None:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        rows = metric_rows(run_dir)
        if rows and rows[-1]["step"] >= step:
            return
        if proc.poll() is not None:
            out, err = proc.output()
            proc.kill()
            pytest.fail(f"torchrun ended (rc {proc.returncode}) before step {step}:\n{out}\n{err[-4000:]}")
        time.sleep(0.02)
    proc.kill()
    pytest.fail(f"step {step} not reached in {timeout} s")


def rank_writes(log_dir: Path, rank: int) -> list[str]:
    path = log_dir / f"writes-rank{rank}.txt"
    return path.read_text().splitlines() if path.is_file() else []


@pytest.mark.slow
def test_two_ranks_equal_one_rank_survive_sigkill_and_resume_exactly(tmp_path, tiny_model_dir, rel):
    ref_dir, run_dir = tmp_path / "ref", tmp_path / "lineage"
    ref_recipe = rel.write_recipe(tmp_path / "ref.yaml", dp_recipe(rel, tiny_model_dir, ref_dir, micro_batch=4))
    recipe = rel.write_recipe(tmp_path / "lineage.yaml", dp_recipe(rel, tiny_model_dir, run_dir, micro_batch=2))

    # The reference: one process, micro_batch 4 (the 2-rank run's global micro-batch), in-process.
    res = rel.invoke(["run", str(ref_recipe), "--quiet"], env=rel.env)
    assert res.exit_code == 0, res.output
    ref = metric_rows(ref_dir)
    assert [r["step"] for r in ref] == list(range(1, STEPS + 1))
    n = json.loads((ref_dir / "run_summary.json").read_text())["stages"][0]["data"]["examples"]
    assert n == 42 and n % 4 == 2 and n // 4 + 1 <= 2 * STEPS, n  # the padded last global batch is trained
    ref_adapter = adapter_tensors(ref_dir)

    site, logs = tmp_path / "site", tmp_path / "writes"
    site.mkdir()
    logs.mkdir()
    (site / "sitecustomize.py").write_text(SITECUSTOMIZE)
    env = {**os.environ, **rel.env, "SLIMTUNE_DIST_TIMEOUT": "30", "PYTHONPATH": str(site),
           "SLIMTUNE_TEST_WATCH": str(run_dir), "SLIMTUNE_TEST_WATCH_LOG": str(logs)}
    env.pop("SLIMTUNE_FAULT", None)
    tr = Torchrun(recipe, env, tmp_path)

    # Launch 1: SIGKILL rank 1 after step KILL_AFTER; torchrun must end the job (rank 0 included) by itself.
    proc = tr.start("-q")
    rank0, rank1 = worker(proc, 0), worker(proc, 1)
    wait_for_step(proc, run_dir, KILL_AFTER)
    os.kill(rank1.pid, signal.SIGKILL)
    t_kill = time.monotonic()
    out, err = finish(proc, 90, "torchrun, after a rank's SIGKILL,")
    ended_after = time.monotonic() - t_kill
    assert proc.returncode != 0, (out, err[-3000:])
    assert not rank0.is_running() or rank0.status() == "zombie", "rank 0 survived its peer's death"
    got = metric_rows(run_dir)
    assert KILL_AFTER <= len(got) < STEPS
    assert_rows_match(got, ref, "launch 1")
    last = list_checkpoints(run_dir / "checkpoints")[-1]
    state = torch.load(last / "trainer.pt", map_location="cpu", weights_only=False)
    assert state["world"] == 2 and len(state["rng_ranks"]) == 2  # each rank's RNG (dropout masks differ per rank)
    assert torch.equal(state["rng_ranks"][0]["torch"], state["rng"]["torch"])
    assert not torch.equal(state["rng_ranks"][0]["torch"], state["rng_ranks"][1]["torch"])

    # A 1-process resume of the 2-process checkpoint is refused (one line, exit 2).
    res = rel.invoke(["run", str(recipe), "--resume", "latest", "--quiet"], env=rel.env)
    errors = [ln for ln in res.output.splitlines() if ln.startswith("error:")]
    assert res.exit_code == 2 and len(errors) == 1 and "2-process run" in errors[0], res.output

    # Launch 2: --resume runs to the end; the whole lineage equals the 1-process run.
    proc = tr.start("--resume", "latest")
    out, err = finish(proc, 180)
    assert proc.returncode == 0, (out, err[-4000:])
    flat = "".join(out.split())  # rich wraps long lines
    assert f"resumedfrom{run_dir}/checkpoints/step-" in flat, out
    assert flat.count("resumedfrom") == 1, out  # rank 0 alone prints
    assert_rows_match(metric_rows(run_dir), ref, "lineage")
    assert len(metric_rows(run_dir)) == STEPS
    got_adapter = adapter_tensors(run_dir)
    assert got_adapter.keys() == ref_adapter.keys()
    worst = max(float((got_adapter[k] - t).abs().max()) for k, t in ref_adapter.items())
    assert worst <= ADAPTER_ATOL, worst

    # Only rank 0 wrote under the run folder (the hook saw rank 0's writes, so it works).
    # (torch.save and safetensors open their files in C++/Rust, unseen by the hook; they run inside the same
    # rank-0-only checkpoint writer as the COMPLETE marker, which the hook sees)
    assert any("metrics.jsonl" in w for w in rank_writes(logs, 0)) and any(
        w.endswith("COMPLETE") for w in rank_writes(logs, 0)), rank_writes(logs, 0)[:5]
    assert rank_writes(logs, 1) == [], rank_writes(logs, 1)[:10]
    rel_loss = max(abs(g["loss"] - r["loss"]) / r["loss"] for g, r in zip(metric_rows(run_dir), ref))
    print(f"\n2 ranks × micro_batch 2 vs 1 rank × micro_batch 4, {STEPS} steps: max |Δ adapter| {worst:.2e}, "
          f"max rel Δ loss {rel_loss:.2e}"
          f"; torchrun ended {ended_after:.1f} s after the SIGKILL of rank 1")


@pytest.mark.slow
@pytest.mark.parametrize("fault", ["quit_at_end", "stall_at_end"])
def test_a_finished_rank_leaves_in_bounded_time_when_its_peer_is_gone(tmp_path, tiny_model_dir, rel, fault):
    """Rank 1 exits once the results are written without leaving the process group (quit_at_end), or never leaves
    (stall_at_end): rank 0 still ends with exit code 0 within SLIMTUNE_LEAVE_TIMEOUT, saying so in one line."""
    run_dir = tmp_path / "run"
    r = dp_recipe(rel, tiny_model_dir, run_dir, micro_batch=2)
    r["train"].update({"steps": 2, "save_every": 0, "eval_every": 0})
    env = {**os.environ, **rel.env, "SLIMTUNE_DIST_TIMEOUT": "300", "SLIMTUNE_LEAVE_TIMEOUT": "5",
           "SLIMTUNE_FAULT": f"{fault}@1"}
    root = Path(__file__).resolve().parents[2]  # started in the repository root: its kernels/ must shadow nothing
    proc = Torchrun(rel.write_recipe(tmp_path / "r.yaml", r), env, root).start()
    with proc:
        rank0 = worker(proc, 0)
        t0 = time.monotonic()
        while rank0.is_running() and rank0.status() != psutil.STATUS_ZOMBIE:
            assert time.monotonic() - t0 < 180, "rank 0 did not end"
            proc.poll()
            time.sleep(0.1)
        if fault == "quit_at_end":  # both workers gone: torchrun reports both exit codes
            out, err = proc.wait(60, "torchrun")
            assert proc.returncode == 0, (out, err[-3000:])
        else:  # rank 1 still sleeps: the test kills it (torchrun would wait for it)
            out, err = proc.output()
            proc.kill()
    assert (run_dir / "run_summary.json").is_file(), err[-3000:]
    assert len(metric_rows(run_dir)) == 2
    said = [line for line in err.splitlines() if "did not leave the process group" in line]
    assert len(said) == 1 and said[0].startswith("rank 0/2:"), err[-3000:]
    assert "Traceback" not in err, err[-3000:]


def test_shard_takes_the_ranks_rows_and_pads_past_the_end():
    g = {"input_ids": torch.arange(12).view(3, 4), "labels": torch.arange(12).view(3, 4),
         "attention_mask": torch.ones(3, 4, dtype=torch.long)}
    r0, r1 = (DistContext(rank=k, world=2, local_rank=k, backend="gloo") for k in (0, 1))
    assert torch.equal(r0.shard(g, 2)["input_ids"], g["input_ids"][:2])
    assert torch.equal(r1.shard(g, 2)["input_ids"], g["input_ids"][2:])  # the uneven last rows
    short = {k: v[:2] for k, v in g.items()}
    pad = r1.shard(short, 2)  # past the end: one row, no target tokens
    assert isinstance(pad, _PadBatch) and pad["input_ids"].shape == (1, 4)
    assert bool((pad["labels"] == -100).all()) and bool((short["labels"] != -100).all())


def test_torchrun_argv_drops_nproc():
    argv = torchrun_argv(2, ["run", "r.yaml", "--nproc", "2", "--resume", "latest", "--nproc=2", "-q"])
    assert argv[:3] == [sys.executable, "-m", "torch.distributed.run"]
    assert "--standalone" in argv and "--nproc-per-node=2" in argv
    assert argv[argv.index("-m", 3):] == ["-m", "slimtune", "run", "r.yaml", "--resume", "latest", "-q"]


def test_estimate_nproc_gives_the_per_rank_figures(tmp_path, rel):
    """DDP holds the full base on every rank: the per-rank total is the 1-GPU step's; the global batch scales."""
    from slimtune.models.tiny import udhr_path

    recipe = rel.write_recipe(tmp_path / "r.yaml", {
        "model": {"name": "meta-llama/Llama-3.1-8B"}, "quant": {"mode": "nf4"},
        "adapter": {"kind": "lora", "rank": 16, "alpha": 32},
        "data": {"sources": [{"path": str(udhr_path("src"))}], "format": "text", "max_seq_len": 2048},
        "train": {"micro_batch": 1, "grad_accum": 8, "grad_checkpointing": "full"},
        "output": {"dir": str(tmp_path / "run")}})
    one = rel.invoke(["estimate", str(recipe), "--json"])
    eight = rel.invoke(["estimate", str(recipe), "--json", "--nproc", "8"])
    assert one.exit_code == 0 and eight.exit_code == 0, one.output + eight.output
    a, b = json.loads(one.output), json.loads(eight.output)
    assert b["nproc"] == 8 and b["per_rank_total_bytes"] == a["per_rank_total_bytes"] == a["total_bytes"]
    assert (a["global_batch_sequences"], b["global_batch_sequences"]) == (8, 64)
    text = rel.invoke(["estimate", str(recipe), "--nproc", "8"]).output
    assert "perrankofaDDPrunon8GPUs" in "".join(text.split()), text


@pytest.fixture(scope="module")
def tiny4_dir(tmp_path_factory) -> Path:
    """A 4-layer tiny Llama (LoRAM prunes the middle two)."""
    from transformers import LlamaForCausalLM

    from slimtune.models.tiny import tiny_llama_config, tiny_tokenizer

    d = tmp_path_factory.mktemp("tiny4")
    tok = tiny_tokenizer()
    with torch.random.fork_rng():
        torch.manual_seed(0)
        LlamaForCausalLM(tiny_llama_config(vocab_size=len(tok), num_hidden_layers=4)).save_pretrained(d)
    tok.save_pretrained(d)
    return d


def loram_recipe(base: Path, run_dir: Path, micro_batch: int) -> dict:
    from slimtune.models.tiny import udhr_path

    text = {"path": str(udhr_path("eng")), "max_records": 8}
    return {
        "model": {"name": str(base), "attn_implementation": "eager"}, "quant": {"mode": "nf4"},
        "adapter": {"kind": "lora", "rank": 8, "alpha": 16},
        "data": {"sources": [text], "format": "text", "max_seq_len": 32, "holdout": 2},
        "train": {"lr": 1e-3, "steps": 4, "micro_batch": micro_batch, "grad_accum": 2, "warmup": 0, "seed": 3,
                  "device": "cpu"},
        "output": {"dir": str(run_dir), "merged_dtype": "float32", "export_peft": True},
        "loram": {"ratio": 0.5, "keep_first": 1, "keep_last": 1,
                  "align": {"data": {"sources": [text], "max_seq_len": 32},
                            "train": {"lr": 1e-3, "steps": 2, "micro_batch": micro_batch, "device": "cpu"}}},
    }


@pytest.mark.slow
def test_loram_pipeline_on_two_ranks_equals_one(tmp_path, tiny4_dir, rel):
    """prune (rank 0) → align (full fine-tuning, DDP over every trained weight) → QLoRA train → recover + merge +
    evaluate (rank 0): 2 ranks × micro_batch 2 give the 1-process run's losses and recovered adapter."""
    one, two = tmp_path / "one", tmp_path / "two"
    r1 = rel.write_recipe(tmp_path / "one.yaml", loram_recipe(tiny4_dir, one, 4))
    r2 = rel.write_recipe(tmp_path / "two.yaml", loram_recipe(tiny4_dir, two, 2))
    res = rel.invoke(["run", str(r1), "--quiet"], env=rel.env)
    assert res.exit_code == 0, res.output
    env = {**os.environ, **rel.env, "SLIMTUNE_DIST_TIMEOUT": "60"}
    env.pop("SLIMTUNE_FAULT", None)
    proc = Torchrun(r2, env, tmp_path).start("-q")
    out, err = finish(proc, 240)
    assert proc.returncode == 0, (out, err[-4000:])
    for sub in ("aligned.run", "train"):
        ref = metric_rows(one / sub)
        assert len(ref) == len(metric_rows(two / sub)) > 0, sub
        assert_rows_match(metric_rows(two / sub), ref, sub)
    a, b = (load_file(d / "adapter_recovered" / "adapter_model.safetensors") for d in (one, two))
    assert a.keys() == b.keys()
    worst = max(float((a[k] - b[k]).abs().max()) for k in a)
    assert worst <= ADAPTER_ATOL, worst
    assert (two / "merged").is_dir() and (two / "eval.md").is_file()
    print(f"\nLoRAM on 2 ranks vs 1: max |Δ recovered adapter| {worst:.2e}")


# ---------------------------------------------------------------------------------------- FSDP (train.distributed)
def fsdp_recipe(rel, model_dir: Path, run_dir: Path, micro_batch: int, distributed: str) -> dict:
    """dp_recipe with evaluation during training (1 held-out record) and a checkpoint every 4 steps."""
    r = dp_recipe(rel, model_dir, run_dir, micro_batch)
    r["data"]["sources"][0]["max_records"] = 3
    r["data"]["holdout"] = 1
    r["train"].update({"distributed": distributed, "eval_every": 4, "save_every": 4})
    return r


def val_rows(run_dir: Path) -> list[dict]:
    return [json.loads(ln) for ln in (run_dir / "val_metrics.jsonl").read_text().splitlines() if ln.strip()]


@pytest.mark.slow
def test_fsdp_equals_ddp_and_one_rank_survives_sigkill_and_resumes_exactly(tmp_path, tiny_model_dir, rel):
    """FSDP2 (sharded nf4 base stored as fp32, sharded LoRA and AdamW state) on 2 ranks × micro_batch 2: the same
    per-step losses, validation losses and final adapter as DDP on 2 ranks and as 1 process × micro_batch 4; a
    SIGKILL of rank 1 ends the job, ``--resume`` continues from the gathered checkpoint; rank 1 writes nothing."""
    runs = {k: tmp_path / k for k in ("ref", "ddp", "fsdp")}
    recipes = {k: rel.write_recipe(tmp_path / f"{k}.yaml", fsdp_recipe(
        rel, tiny_model_dir, d, 4 if k == "ref" else 2, "fsdp" if k == "fsdp" else "ddp")) for k, d in runs.items()}
    res = rel.invoke(["run", str(recipes["ref"]), "--quiet"], env=rel.env)
    assert res.exit_code == 0, res.output
    ref = metric_rows(runs["ref"])
    assert len(ref) == STEPS and len(val_rows(runs["ref"])) == 3
    n = json.loads((runs["ref"] / "run_summary.json").read_text())["stages"][0]["data"]["examples"]
    assert n % 4 == 2 and n // 4 + 1 <= 2 * STEPS, n  # rank 1 trains the padded stand-in of the last global batch

    site, logs = tmp_path / "site", tmp_path / "writes"
    site.mkdir()
    logs.mkdir()
    (site / "sitecustomize.py").write_text(SITECUSTOMIZE)
    env = {**os.environ, **rel.env, "SLIMTUNE_DIST_TIMEOUT": "30", "PYTHONPATH": str(site),
           "SLIMTUNE_TEST_WATCH": str(runs["fsdp"]), "SLIMTUNE_TEST_WATCH_LOG": str(logs)}
    env.pop("SLIMTUNE_FAULT", None)

    out, err = finish(Torchrun(recipes["ddp"], env, tmp_path).start("-q"), 180)
    assert metric_rows(runs["ddp"]) and len(metric_rows(runs["ddp"])) == STEPS, (out, err[-4000:])

    tr = Torchrun(recipes["fsdp"], env, tmp_path)
    proc = tr.start("-q")
    rank1 = worker(proc, 1)
    wait_for_step(proc, runs["fsdp"], 5)  # past the step-4 checkpoint
    os.kill(rank1.pid, signal.SIGKILL)
    finish(proc, 90, "torchrun, after a rank's SIGKILL,")
    assert proc.returncode != 0
    assert [c.name for c in list_checkpoints(runs["fsdp"] / "checkpoints")] == ["step-00000004"]
    proc = tr.start("--resume", "latest")
    out, err = finish(proc, 180)
    assert proc.returncode == 0, (out, err[-4000:])
    flat = "".join(out.split())
    assert "resumedfrom" in flat and "4-bitweightsstoredasfloat32" in flat, out  # quant_storage auto, fp32 here

    for k in ("ddp", "fsdp"):
        assert len(metric_rows(runs[k])) == STEPS, k
        assert_rows_match(metric_rows(runs[k]), ref, k)
        for g, r in zip(val_rows(runs[k]), val_rows(runs["ref"]), strict=True):  # every rank evaluated together
            assert g["step"] == r["step"] and abs(g["val_loss"] - r["val_loss"]) <= RTOL * r["val_loss"], (k, g, r)
    a, b, c = (adapter_tensors(runs[k]) for k in ("fsdp", "ddp", "ref"))
    assert a.keys() == b.keys() == c.keys()
    vs_ddp = max(float((a[k] - b[k]).abs().max()) for k in a)
    vs_one = max(float((a[k] - c[k]).abs().max()) for k in a)
    assert vs_ddp <= 1e-6 and vs_one <= ADAPTER_ATOL, (vs_ddp, vs_one)  # FSDP equals DDP; both near 1 process

    # The step-8 checkpoint (written after the resume) holds each rank's AdamW state of its shards: put together
    # along dim 0 (FSDP's split), the 1-process state.
    ranks, ref_opt = (torch.load(d / "checkpoints" / "step-00000008" / "trainer.pt", map_location="cpu",
                                 weights_only=False)["optimizer"] for d in (runs["fsdp"], runs["ref"]))
    shards = [r["inner"]["state"] for r in ranks["ranks"]]
    assert len(shards) == 2 and shards[0].keys() == ref_opt["state"].keys()
    worst_state = 0.0
    for k, st in ref_opt["state"].items():
        for n in ("exp_avg", "exp_avg_sq"):
            whole = torch.cat([sh[k][n] for sh in shards])
            assert whole.shape == st[n].shape and shards[1][k][n].shape[0] < st[n].shape[0]  # really sharded
            worst_state = max(worst_state, float((whole - st[n]).abs().max() / (st[n].abs().max() + 1e-12)))
    assert worst_state <= 1e-5, worst_state
    assert any("metrics.jsonl" in w for w in rank_writes(logs, 0)), rank_writes(logs, 0)[:5]
    assert rank_writes(logs, 1) == [], rank_writes(logs, 1)[:10]
    print(f"\nFSDP 2 ranks vs DDP 2 ranks: max |Δ adapter| {vs_ddp:.2e}; vs 1 rank: {vs_one:.2e}; "
          f"AdamW state at step 8: max rel Δ {worst_state:.2e}")


def test_fsdp_refuses_what_it_does_not_shard(tmp_path, tiny_model_dir, rel):
    from slimtune.adapters.base import get_adapter_class
    from slimtune.config.recipe import load_recipe_dict
    from slimtune.errors import SlimtuneError
    from slimtune.train.fsdp import check_adapters

    r = fsdp_recipe(rel, tiny_model_dir, tmp_path / "r", 2, "fsdp")
    with pytest.raises(Exception, match="full fine-tuning"):
        load_recipe_dict({**r, "adapter": {"kind": "full"}}, base_dir=tmp_path)
    lamda = get_adapter_class("lamda")
    with pytest.raises(SlimtuneError, match="changes what it trains"):
        check_adapters({"q": lamda.__new__(lamda)})
    check_adapters({"q": get_adapter_class("lora").__new__(get_adapter_class("lora"))})  # LoRA: fine


@pytest.mark.slow
def test_fsdp_steps_the_shards_with_8bit_adamw_and_host_masters_like_ddp(tmp_path, tiny_model_dir, rel):
    """bf16 adapters, fp32 masters and bitsandbytes' 8-bit AdamW in host memory (MasterWeights), each rank
    stepping its shards (fsdp.LocalShards): the DDP run's losses and adapter."""
    env = {**os.environ, **rel.env, "SLIMTUNE_DIST_TIMEOUT": "60"}
    env.pop("SLIMTUNE_FAULT", None)
    runs = {}
    for mode in ("ddp", "fsdp"):
        r = fsdp_recipe(rel, tiny_model_dir, tmp_path / mode, 2, mode)
        r["train"].update({"steps": 6, "eval_every": 0, "save_every": 0, "optimizer": "adamw8bit",
                           "adapter_dtype": "bfloat16", "optimizer_on": "cpu"})
        proc = Torchrun(rel.write_recipe(tmp_path / f"{mode}.yaml", r), env, tmp_path).start("-q")
        out, err = finish(proc, 180)
        assert proc.returncode == 0, (mode, out, err[-4000:])
        runs[mode] = tmp_path / mode
    assert len(metric_rows(runs["fsdp"])) == 6
    assert_rows_match(metric_rows(runs["fsdp"]), metric_rows(runs["ddp"]), "8-bit host")
    a, b = adapter_tensors(runs["fsdp"]), adapter_tensors(runs["ddp"])
    assert a.keys() == b.keys() and max(float((a[k].float() - b[k].float()).abs().max()) for k in a) <= 1e-6


@pytest.mark.slow
def test_fsdp_runs_a_stacked_two_stage_recipe_with_evaluation_and_merge(tmp_path, tiny_model_dir, rel):
    """CPT (LoRA) → SFT (rsLoRA stacked on it), perplexity before and after each stage, PEFT export and merged
    model: under FSDP on 2 ranks the same numbers as 1 process (the evaluation runs sharded on both ranks)."""
    from slimtune.models.tiny import udhr_path

    def recipe(out: Path, micro_batch: int, distributed: str) -> dict:
        train = {"lr": 5e-3, "steps": 4, "micro_batch": micro_batch, "grad_accum": 2, "warmup": 0, "seed": 3,
                 "device": "cpu", "distributed": distributed}
        return {"model": {"name": str(tiny_model_dir)}, "quant": {"mode": "nf4", "compute_dtype": "float32"},
                "adapter": {"kind": "lora", "rank": 4, "alpha": 8}, "train": train,
                "data": {"sources": [{"path": str(udhr_path("glg")), "max_records": 3}], "format": "text",
                         "max_seq_len": 32},
                "eval": {"perplexity": [{"path": str(udhr_path("glg")), "max_records": 2, "max_seq_len": 32,
                                         "name": "glg"}]},
                "output": {"dir": str(out), "export_peft": True, "save_merged": True, "merged_dtype": "float32"},
                "stages": [{"name": "one", "start_from": "base"},
                           {"name": "two", "start_from": "stacked", "adapter": {"kind": "rslora", "rank": 8,
                                                                                 "alpha": 4},
                            "train": {**train, "steps": 3}}]}

    one, two = tmp_path / "one", tmp_path / "two"
    res = rel.invoke(["run", str(rel.write_recipe(tmp_path / "one.yaml", recipe(one, 4, "ddp"))), "--quiet"],
                     env=rel.env)
    assert res.exit_code == 0, res.output
    env = {**os.environ, **rel.env, "SLIMTUNE_DIST_TIMEOUT": "60"}
    env.pop("SLIMTUNE_FAULT", None)
    proc = Torchrun(rel.write_recipe(tmp_path / "two.yaml", recipe(two, 2, "fsdp")), env, tmp_path).start("-q")
    out, err = finish(proc, 180)
    assert proc.returncode == 0, (out, err[-4000:])
    for stage in ("one", "two"):
        a, b = (d / "stages" / stage for d in (one, two))
        assert_rows_match(metric_rows(b), metric_rows(a), stage)
        ta, tb = adapter_tensors(a), adapter_tensors(b)
        assert ta.keys() == tb.keys() and max(float((ta[k] - tb[k]).abs().max()) for k in ta) <= ADAPTER_ATOL
        ea, eb = (json.loads((d / "stage_summary.json").read_text())["eval"] for d in (a, b))
        assert ea.keys() == eb.keys() and len(ea) == 2, ea  # before and after
        for label in ea:
            pa, pb = ea[label]["metrics"]["perplexity/glg"], eb[label]["metrics"]["perplexity/glg"]
            assert abs(pa - pb) <= 1e-6 * pa, (stage, label, pa, pb)
    assert (two / "stages" / "two" / "merged" / "config.json").is_file()
    assert (two / "stages" / "two" / "adapter" / "adapter_config.json").is_file()
