"""A frozen input embedding table kept in host memory (recipe key ``train.embeddings_on: cpu``).

The table of Llama-3.1-8B is 128,256 x 4,096 values: 0.98 GiB in bf16 on the GPU for a lookup of a few thousand
rows per step. ``HostEmbedding`` keeps the original embedding module on the host (pinned when the compute device is
CUDA), looks the rows up there and sends only the (B, T, hidden) result to the compute device, 16 KiB per token at
hidden 4096 in bf16 (4096 x 2 tokens: 64 MiB per step over PCIe).

What stays the same: the module's output (bit for bit: the very module runs, on the host; a scaled embedding such
as Gemma's keeps its scale), ``.weight`` (the host table, for code that reads it), and the state dict (the table is
saved and loaded under ``weight`` as before). What changes: the table is no parameter of the model (a plain
attribute), so ``model.to(device)``, the optimizer and parameter counts do not see it.

Refused, with the reason: a table that trains (``adapter.modules_to_save``: its gradient and optimizer state would
live on the host too, a different feature) and a tied head (lm_head's weight *is* this table: moving it would move
the head off the GPU; quantize the head with ``quant.quantize_lm_head``, which gives lm_head its own NF4 copy, or
keep ``embeddings_on: gpu``).
"""

from __future__ import annotations

import torch
import torch.nn as nn

from slimtune.errors import RecipeError


TIED_HEAD_REASON = ("lm_head is tied to the embedding table (one tensor): moving it would move the head off the GPU; "
                    "set quant.quantize_lm_head: true (lm_head gets its own NF4 copy) or keep train.embeddings_on: gpu")


class HostEmbedding(nn.Module):
    """Wraps a frozen embedding module that lives in host memory; outputs go to the device of ``anchor``."""

    def __init__(self, inner: nn.Module, *, pin: bool = False):
        super().__init__()
        inner = inner.to("cpu")
        if pin:
            for p in inner.parameters():
                p.data = p.data.pin_memory()  # page-locked: the row copies to the GPU are asynchronous DMA
        self.__dict__["inner"] = inner  # not a submodule: Module.to / .parameters() / optimizers never see it
        # where the rows go: a 0-element buffer that follows model.to(device) like every other buffer
        self.register_buffer("anchor", torch.empty(0, dtype=inner.weight.dtype), persistent=False)

    @property
    def weight(self) -> torch.Tensor:
        """The host table (V, hidden)."""
        return self.inner.weight

    @property
    def num_embeddings(self) -> int:
        return int(self.inner.weight.shape[0])

    @property
    def embedding_dim(self) -> int:
        return int(self.inner.weight.shape[1])

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        device = self.anchor.device
        with torch.no_grad():
            rows = self.inner(input_ids.to("cpu"))  # (B, T, hidden) on the host
        if device.type == "cuda":
            rows = rows.pin_memory()
            return rows.to(device, non_blocking=True)
        return rows.to(device)

    # the table stays part of the model's state dict, under the same key as before
    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        destination[prefix + "weight"] = self.weight if keep_vars else self.weight.detach()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        key = prefix + "weight"
        if key in state_dict:
            with torch.no_grad():
                self.weight.copy_(state_dict.pop(key))
        elif strict:
            missing_keys.append(key)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, on host{' (pinned)' if self.weight.is_pinned() else ''}"


def why_not_on_host(model: nn.Module) -> str | None:
    """Why the input embedding of ``model`` cannot move to the host, or None when it can."""
    emb, head = model.get_input_embeddings(), model.get_output_embeddings()
    if emb is None or getattr(emb, "weight", None) is None:
        return "the model has no input embedding table"
    if isinstance(emb, HostEmbedding):
        return None
    if emb.weight.requires_grad:
        return "the embedding table trains (adapter.modules_to_save); keep train.embeddings_on: gpu"
    if head is not None and getattr(head, "weight", None) is emb.weight:
        return TIED_HEAD_REASON
    return None


def embeddings_to_host(model: nn.Module) -> HostEmbedding:
    """Replace ``model``'s input embedding by a :class:`HostEmbedding` (idempotent). Raises RecipeError when
    :func:`why_not_on_host` gives a reason."""
    emb = model.get_input_embeddings()
    if isinstance(emb, HostEmbedding):
        return emb
    why = why_not_on_host(model)
    if why is not None:
        raise RecipeError(f"train.embeddings_on: cpu: {why}")
    device = emb.weight.device
    host = HostEmbedding(emb, pin=device.type == "cuda")
    host.anchor = host.anchor.to(device)
    model.set_input_embeddings(host)
    if device.type == "cuda":
        torch.cuda.empty_cache()  # the table's GPU copy is gone: hand it back
    return host
