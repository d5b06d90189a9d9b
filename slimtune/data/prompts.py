"""Prompt data: `data.format: prompt`, the records of `train.objective: grpo`.

A record holds a prompt (`prompt_field`: text, one user turn; or a list of messages) and any other fields, which
the reward functions receive (a reference answer: {"prompt": "What is 3 + 4?", "answer": "7"}). The prompt is
rendered with the chat template and the assistant header (generation prompt) and tokenized; prompts longer than
`train.grpo.max_prompt_len` keep their last tokens. There is no completion: GRPO samples it during training.

An example is {"prompt_ids": LongTensor (P,), "prompt": the rendered text, "fields": the record without the
prompt, "where": file:line}. A batch is the list of its examples (the objective samples, scores and collates them
into tensors). With `repeat` μ > 1 (`grpo.num_iterations`), each window of `window` batches (one optimizer step's)
is yielded μ times in a row, so the steps that reuse a generation see the same prompts and the position stays the
loop's (epoch, batches consumed).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from slimtune.config.data import DataConfig, SourceConfig
from slimtune.data.dataset import TrainData, _make_sources, chat_setup, hold_out
from slimtune.data.readers import Invalid, RecordError, extract_messages, iter_records
from slimtune.errors import DataError


def prompt_messages(rec: Any, src: SourceConfig) -> list[dict]:
    """The prompt of a record as messages (a string is one user turn)."""
    if not isinstance(rec, dict) or src.prompt_field not in rec:
        raise RecordError(f"no field '{src.prompt_field}' (the prompt)")
    value = rec[src.prompt_field]
    if isinstance(value, str):
        if not value.strip():
            raise RecordError(f"field '{src.prompt_field}' is empty")
        return [{"role": "user", "content": value}]
    if hasattr(value, "tolist"):
        value = value.tolist()
    if not isinstance(value, list) or not value:
        raise RecordError(f"field '{src.prompt_field}' must be a string or a non-empty list of messages")
    return extract_messages({"messages": value}, src.model_copy(update={"messages_field": "messages",
                                                                        "system_field": "\0"}), "chat")


def render_prompt(tokenizer, messages: list[dict]) -> str:
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    except Exception as e:  # jinja raises TemplateError with arbitrary text
        raise RecordError(f"chat template failed: {type(e).__name__}: {e}") from None


class PromptData(TrainData):
    """TrainData of prompts; batches are lists of examples (see the module docstring)."""

    window: int = 1
    repeat: int = 1

    def num_batches(self, micro_batch: int, *, drop_last: bool = False) -> int:
        n = super().num_batches(micro_batch, drop_last=drop_last)
        if self.repeat == 1:
            return n
        return -(-n // self.window) * self.window * self.repeat  # whole windows, each μ times

    def batches(self, micro_batch: int, *, epoch: int, start: int = 0, drop_last: bool = False,
                pad_to_multiple_of: int | None = None) -> Iterator[list[dict[str, Any]]]:
        total = self.num_batches(micro_batch, drop_last=drop_last)
        if not 0 <= start <= total:
            raise ValueError(f"start must be in [0, {total}], got {start}")
        order = self.order(epoch)
        n = len(order)
        for k in range(start, total):
            w, j = divmod(k, self.window * self.repeat)
            b = w * self.window + j % self.window  # the data batch of this position
            s = b * micro_batch
            idx = order[s:s + micro_batch] if s < n else order[:micro_batch]  # a window's tail past the data wraps
            yield [self.examples[int(i)] for i in idx]


def build_prompt_dataset(cfg: DataConfig, tokenizer, *, base_dir: Path, seed: int) -> PromptData:
    """Read and tokenize `format: prompt` data (`holdout` and `eval_sources`: the held-out prompts of the
    evaluation). Prompts are not truncated here: the objective keeps their last `max_prompt_len` tokens."""
    seed, pad_id = chat_setup(cfg, tokenizer, base_dir, seed)
    train: list[dict] = []
    held: list[dict] = []
    per_source: dict[str, dict] = {}
    for s in _make_sources(cfg):
        st = {"path": s.cfg.path, "records": 0, "skipped": 0}
        for where, rec in iter_records(s.cfg, Path(base_dir)):
            if s.cfg.max_records is not None and st["records"] >= s.cfg.max_records:
                break
            try:
                if isinstance(rec, Invalid):
                    raise RecordError(rec.reason)
                text = render_prompt(tokenizer, prompt_messages(rec, s.cfg))
            except RecordError as e:
                if cfg.on_error == "raise":
                    raise DataError(f"{where}: {e}") from None
                st["skipped"] += 1
                continue
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
            fields = {k: v for k, v in rec.items() if k != s.cfg.prompt_field}
            (held if s.group == "eval" else train).append(
                {"prompt_ids": torch.tensor(ids, dtype=torch.long), "prompt": text, "fields": fields,
                 "where": where, "source": s.name})
            st["records"] += 1
        per_source[s.name] = {**st, "group": s.group}
    train, held = hold_out(train, held, cfg.holdout, seed)
    if not train:
        raise DataError("data: no training prompts")
    stats = {"format": "prompt", "seed": seed, "sources": per_source,
             "records": sum(v["records"] for v in per_source.values()),
             "skipped_records": sum(v["skipped"] for v in per_source.values()),
             "holdout_records": len(held), "examples": len(train),
             "prompt_tokens": sum(int(e["prompt_ids"].numel()) for e in train)}
    return PromptData(examples=train, stats=stats, holdout=held, pad_id=int(pad_id), seed=seed, shuffle=cfg.shuffle)
