"""The baseline of every benchmark (DESIGN §4): HF transformers + PEFT + bitsandbytes QLoRA, as its users run it.

    model = random_base(config, device=dev, dtype=torch.bfloat16)        # runner.py: same base as slimtune's
    model = build_baseline(model, kind="lora", rank=16, alpha=32, targets=PROJECTIONS)
    Trainer(recipe, run_dir, loaded=LoadedModel(model, ...), trainable="model", loss_fn=baseline_loss_sum)
    # the bench trains it with slimtune's one loop; the loss is HF's model(input_ids, labels).loss

What it is, piece by piece:

* the base: the same bitsandbytes ``Linear4bit`` layers (NF4, double quant) that ``slimtune.models.load`` makes
  (``quantize_linears``: the quantization is done on the target device, so this is what
  ``from_pretrained(quantization_config=BitsAndBytesConfig(...))`` gives too, quant states declaring the compute
  dtype, so PEFT's backward dequantizes to bf16 as for HF users), SDPA attention; the model is
  flagged ``is_loaded_in_4bit`` so that PEFT picks its bitsandbytes LoRA layer (``peft.tuners.lora.bnb``), as it
  does for a model loaded in 4-bit by transformers;
* ``peft.get_peft_model(model, LoraConfig(r, lora_alpha, lora_dropout=0, target_modules))``: adapters in fp32
  (PEFT's default ``autocast_adapter_dtype``), ``use_rslora`` / ``use_dora`` for those kinds;
* gradient checkpointing on: transformers' ``gradient_checkpointing_enable`` (now ``activation_checkpointing_
  enable``) with ``use_reentrant=False``, which also makes the embedding output require grad, as in HF's Trainer;
* the loss: ``model(input_ids=ids, labels=ids).loss`` (full (T, V) logits, upcast to fp32 by transformers).

Not applied: ``peft.prepare_model_for_kbit_training``. It casts every non-4-bit parameter (embeddings, lm_head,
norms) to fp32, which would make the baseline larger and slower; leaving it out is the stronger baseline.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn

from slimtune.data.dataset import count_target_tokens
from slimtune.errors import SlimtuneError

#: Adapter kinds with a PEFT equivalent (a bench compares like with like).
BASELINE_KINDS = ("lora", "rslora", "dora")


def build_baseline(
    model: nn.Module, *, kind: str = "lora", rank: int = 16, alpha: float = 32.0, targets: Sequence[str],
    dropout: float = 0.0, checkpointing: bool = True,
) -> nn.Module:
    """Wrap a 4-bit causal LM with PEFT LoRA adapters and turn on HF gradient checkpointing. Returns the PeftModel."""
    import peft

    if kind not in BASELINE_KINDS:
        raise SlimtuneError(f"--adapter {kind}: the HF + PEFT baseline has {', '.join(BASELINE_KINDS)}")
    model.is_loaded_in_4bit = True  # what transformers sets for a bitsandbytes 4-bit model; PEFT reads it
    for p in model.parameters():
        p.requires_grad_(False)
    cfg = peft.LoraConfig(
        r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=list(targets), bias="none",
        task_type="CAUSAL_LM", use_rslora=kind == "rslora", use_dora=kind == "dora",
    )
    peft_model = peft.get_peft_model(model, cfg)
    if checkpointing:
        hf = peft_model.get_base_model()
        kwargs = {"use_reentrant": False}
        if hasattr(hf, "activation_checkpointing_enable"):  # transformers >= 5.x name (the old one warns)
            hf.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:  # pragma: no cover - older transformers
            hf.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    peft_model.config.use_cache = False
    peft_model.train()
    return peft_model


def baseline_loss_sum(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """HF's loss as the summed token loss ``Trainer`` normalises: ``model(input_ids, labels, attention_mask).loss``
    (the mean over the target tokens) times the number of target tokens."""
    loss = model(input_ids=batch["input_ids"], labels=batch["labels"], attention_mask=batch["attention_mask"],
                 use_cache=False).loss
    return loss * count_target_tokens(batch)


def hf_decoder(model: nn.Module) -> nn.Module:
    """The decoder stack (``LlamaModel``-like: embed_tokens, layers, norm) of a causal LM or a PEFT wrapper."""
    if hasattr(model, "get_base_model"):
        model = model.get_base_model()
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else getattr(model, "model", None)
    if decoder is None or not hasattr(decoder, "layers"):
        raise SlimtuneError(f"{type(model).__name__}: no decoder with .layers")
    return decoder
