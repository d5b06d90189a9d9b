"""`slimtune bench --objective dpo`: slimtune's DPO step against TRL's DPOTrainer loss on HF + PEFT +
bitsandbytes, on the same random 4-bit base and pairs."""

import json

from typer.testing import CliRunner

from slimtune.bench.preference import preference_bench
from slimtune.cli import app


def test_same_loss_fewer_saved_bytes_without_checkpointing():
    r = preference_bench("tiny", layers=2, prompt=16, completion=16, steps=1, checkpointing="none")
    s, t = r["slimtune"], r["trl"]
    # the same model and pairs: both start at log 2 (LoRA B = 0: policy = reference)
    assert abs(s["loss"] - 0.6931471805599453) < 1e-5 and abs(t["loss"] - 0.6931471805599453) < 1e-5
    assert 0 < s["saved_bytes_per_pair"] < t["saved_bytes_per_pair"]
    assert r["saved_ratio"] == s["saved_bytes_per_pair"] / t["saved_bytes_per_pair"]
    assert s["tokens_per_second"] > 0 and t["tokens_per_second"] > 0


def test_cli_writes_the_report(tmp_path):
    res = CliRunner().invoke(app, ["bench", "--objective", "dpo", "--model-config", "tiny", "--layers", "1",
                                   "--seq-len", "16", "--steps", "1", "--checkpointing", "none", "-o",
                                   str(tmp_path)])
    assert res.exit_code == 0, res.output
    assert "slimtune / TRL saved bytes per pair" in res.output
    r = json.loads((tmp_path / "dpo.json").read_text())
    assert r["layers"] == 1 and r["prompt"] == 8 and r["completion"] == 8 and r["trl_version"].startswith("1.")
    assert set(r["trl"]) >= {"saved_bytes_per_pair", "tokens_per_second"}
