"""`slimtune estimate` on a GRPO recipe: the training step is micro_batch x G rows of prompt + completion tokens
(the same bytes as an SFT step of that shape), the sampling phase's KV cache is named, and the issue's goal holds:
Llama-3.1-8B with G = 8, 256-token prompts and 1,024-token completions fits in 16 GiB."""

from pathlib import Path

from slimtune.bench.recipe_estimate import estimate_for_recipe
from slimtune.config.recipe import load_recipe

RECIPE = Path(__file__).resolve().parents[2] / "recipes" / "grpo_qwen25_3b_gsm8k.yaml"


def test_grpo_rows_and_lengths_are_an_sft_step_of_that_shape():
    grpo = estimate_for_recipe(load_recipe(RECIPE, []))
    sft = estimate_for_recipe(load_recipe(RECIPE, ["train.objective=sft", "data.format=chat", "train.micro_batch=8",
                                                   "data.max_seq_len=768"]))
    assert grpo.inputs["micro_batch"] == 8 and grpo.inputs["seq_len"] == 256 + 512
    assert grpo.total_bytes == sft.total_bytes  # sampling (KV cache 0.2 GiB) peaks below the training step
    assert any("GRPO sampling: KV cache" in n for n in grpo.notes)
    assert grpo.fits(24)


def test_llama31_8b_goal_fits_16_gib():
    est = estimate_for_recipe(load_recipe(RECIPE, ["model.name=meta-llama/Llama-3.1-8B-Instruct",
                                                   "train.grpo.max_new_tokens=1024"]))
    assert est.inputs["micro_batch"] == 8 and est.inputs["seq_len"] == 1280
    assert est.total_bytes <= 16 * 2**30, est.total_bytes / 2**30


def test_sampling_phase_counts_when_it_is_the_peak():
    """A long completion with a short training row count: the KV cache phase can exceed the step; the total then
    covers it."""
    r = load_recipe(RECIPE, ["train.grpo.max_new_tokens=32768", "train.grpo.num_generations=16",
                             "train.grad_checkpointing=full"])
    est = estimate_for_recipe(r)
    note = next(n for n in est.notes if "GRPO sampling" in n)
    kv = 2 * 36 * 2 * 128 * (256 + 32768) * 16 * 2  # Qwen2.5-3B: 36 layers, 2 KV heads of 128, bf16
    assert f"KV cache {kv / 2**30:.2f} GiB" in note
    persistent = sum(v for k, v in est.components().items() if k not in ("layer_inputs", "activations", "logits"))
    assert est.total_bytes >= persistent + kv
