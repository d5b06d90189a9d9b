"""Batched generation for evaluation: chat template, left padding, greedy by default, special tokens stripped.

Nothing global changes: the tokenizer is not mutated (padding is done here), the model returns to its previous
train/eval mode, and sampling runs under a forked RNG seeded from `seed`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers import GenerationConfig

from slimtune.eval.perplexity import model_device


def has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def format_prompt(tokenizer, prompt: str, *, chat_template: bool = True, system: str | None = None) -> str:
    """The prompt as one user turn of the chat template plus the assistant header; raw text without a template."""
    if not (chat_template and has_chat_template(tokenizer)):
        return prompt
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def _eos_ids(model, tokenizer) -> list[int]:
    ids: list[int] = []
    for source in (getattr(getattr(model, "generation_config", None), "eos_token_id", None), tokenizer.eos_token_id):
        for i in source if isinstance(source, (list, tuple)) else [source]:
            if i is not None and int(i) not in ids:
                ids.append(int(i))
    return ids


@torch.no_grad()
def generate(
    model: torch.nn.Module,
    tokenizer,
    prompts: Sequence[str],
    *,
    max_new_tokens: int = 128,
    batch_size: int = 4,
    device: torch.device | str | None = None,
    chat_template: bool = True,
    system: str | None = None,
    do_sample: bool = False,
    temperature: float = 0.7,
    top_p: float = 0.9,
    seed: int = 0,
) -> list[str]:
    """One completion per prompt (same order), cut at the first end-of-sequence token, decoded without special
    tokens and stripped."""
    device = torch.device(device) if device is not None else model_device(model)
    templated = bool(chat_template and has_chat_template(tokenizer))
    encoded = [
        tokenizer(
            format_prompt(tokenizer, p, chat_template=chat_template, system=system),
            add_special_tokens=not templated,  # a chat template writes its own BOS
        )["input_ids"]
        for p in prompts
    ]
    eos = _eos_ids(model, tokenizer)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (eos[0] if eos else 0)
    gen_cfg = GenerationConfig(
        max_new_tokens=max_new_tokens,
        do_sample=do_sample,
        temperature=temperature if do_sample else None,
        top_p=top_p if do_sample else None,
        top_k=None,
        pad_token_id=pad_id,
        eos_token_id=eos or None,
        bos_token_id=tokenizer.bos_token_id,
    )
    # Similar lengths together (less padding); results go back to prompt order.
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]), reverse=True)
    outputs: list[str] = [""] * len(encoded)

    was_training = model.training
    model.eval()
    fork_devices = [device] if device.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=fork_devices, enabled=do_sample):
            if do_sample:
                torch.manual_seed(seed)
            for b in range(0, len(order), batch_size):
                idx = order[b : b + batch_size]
                length = max(len(encoded[i]) for i in idx)
                input_ids = torch.full((len(idx), length), pad_id, dtype=torch.long)
                attention_mask = torch.zeros((len(idx), length), dtype=torch.long)
                for row, i in enumerate(idx):  # left padding: every prompt ends where generation starts
                    ids = encoded[i]
                    input_ids[row, length - len(ids) :] = torch.tensor(ids)
                    attention_mask[row, length - len(ids) :] = 1
                out = model.generate(
                    input_ids=input_ids.to(device),
                    attention_mask=attention_mask.to(device),
                    generation_config=gen_cfg,
                )
                for row, i in enumerate(idx):
                    new = out[row, length:].tolist()
                    cut = next((k for k, t in enumerate(new) if t in eos), len(new))
                    outputs[i] = tokenizer.decode(new[:cut], skip_special_tokens=True).strip()
    finally:
        model.train(was_training)
    return outputs
