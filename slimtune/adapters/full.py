"""Full fine-tuning as a training mode: ``adapter.kind: full``. The model's own weights train; nothing is wrapped.

The recipe's ``adapter:`` block chooses what trains:

- ``modules: all-linear``: every linear layer of the decoder (``targets`` and ``layers`` narrow it, as for the
  adapter kinds; lm_head is not a decoder linear);
- ``modules: no-embeddings`` (default): every parameter except the token embeddings (and lm_head when it is tied
  to them, since it then *is* the embedding matrix);
- ``modules: all``: every parameter;
- ``modules: [pattern, ...]``: parameter names ending in ``pattern`` (``q_proj``, ``norm``) or matching
  ``re:<regex>``.

The base must be dense (``quant.mode: none``): a 4-bit weight cannot take a gradient step. Weights train in the
load dtype (bf16 on CUDA, fp32 on CPU; ``quant.compute_dtype`` sets it); ``train.optimizer: adamw8bit`` /
``paged_adamw8bit`` and ``train.grad_checkpointing`` work as for adapters. The trainer runs a full run through its
``trainable="model"`` path: checkpoints hold the trained tensors, resume is exact, and the run's output is a
transformers model folder (``merged/``), not an adapter. This is a mode, not an adapter kind (no factors, no PEFT
export), so it registers with ``register_mode`` and stays out of the adapter contract tests.
"""

from __future__ import annotations

import re
from typing import Literal

import torch.nn as nn
from pydantic import Field

from slimtune.adapters.base import AdapterConfig, is_4bit, register_mode
from slimtune.adapters.inject import find_targets


@register_mode
class FullConfig(AdapterConfig):
    kind: Literal["full"] = "full"
    modules: Literal["all-linear", "no-embeddings", "all"] | list[str] = Field(
        "no-embeddings",
        description="What trains: all-linear (decoder linears, narrowed by targets/layers), no-embeddings (all but "
        "embed_tokens and a tied lm_head), all, or a list of parameter-name suffixes / 're:<regex>'.",
    )


def _tied_to_embeddings(model: nn.Module) -> set[int]:
    """ids of the input-embedding parameters (a tied lm_head shares them)."""
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    return {id(p) for p in emb.parameters()} if emb is not None else set()


def _name_matches(name: str, patterns: list[str]) -> bool:
    for pat in patterns:
        if pat.startswith("re:"):
            if re.search(pat[3:], name):
                return True
        elif name == pat or name.endswith("." + pat) or name.rsplit(".", 1)[0].endswith(pat):
            return True
    return False


def select_trainable(model: nn.Module, config: FullConfig) -> list[str]:
    """Freeze ``model``, then unfreeze what ``config.modules`` selects. Returns the trained parameter names.

    Raises ValueError (the trainer turns it into a one-line recipe error) on a 4-bit layer that would train, or
    when nothing matches.
    """
    for p in model.parameters():
        p.requires_grad_(False)
    params = dict(model.named_parameters())  # tied parameters appear once (under their first name)
    if config.modules == "all-linear":
        linears = find_targets(model, config)
        chosen = [n for n in params if n.rsplit(".", 1)[0] in set(linears)]
    elif config.modules == "no-embeddings":
        emb = _tied_to_embeddings(model)
        chosen = [n for n, p in params.items() if id(p) not in emb]
    elif config.modules == "all":
        chosen = list(params)
    else:
        chosen = [n for n in params if _name_matches(n, config.modules)]
    if not chosen:
        raise ValueError(f"adapter.modules {config.modules!r} selects no parameter of the model")
    owners = {n.rsplit(".", 1)[0] for n in chosen}
    four_bit = sorted(o for o in owners if is_4bit(model.get_submodule(o)))
    if four_bit:
        raise ValueError(f"adapter.kind full: {len(four_bit)} selected layers are 4-bit (e.g. {four_bit[0]}); full "
                         f"fine-tuning needs a dense base: set quant.mode: none")
    for n in chosen:
        params[n].requires_grad_(True)
    return chosen
