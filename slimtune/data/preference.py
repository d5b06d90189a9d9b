"""Preference data: `data.format: preference` (paired) and `data.format: kto` (unpaired), for the objectives of
slimtune/objectives/.

Record layouts (fields renamed with the source's `prompt_field`, `chosen_field`, `rejected_field`,
`completion_field`, `label_field`):

- text: {"prompt": "...", "chosen": "...", "rejected": "..."}: a user turn and two assistant replies;
- UltraFeedback-binarized: {"prompt": "...", "chosen": [{role: user, ...}, {role: assistant, ...}], "rejected":
  [...]}: message lists (OpenAI or ShareGPT keys) whose common prefix is the prompt; `prompt` may also be a list;
- Anthropic-HH: {"chosen": "\\n\\nHuman: ... \\n\\nAssistant: ...", "rejected": "..."}: whole transcripts, parsed
  into turns; their common prefix is the prompt;
- kto: {"prompt": ..., "completion": "..." or [assistant message], "label": true|false}.

Each (prompt, reply) is rendered with the chat template like SFT data (slimtune.data.chat); the labels keep only
the final assistant reply (content and end-of-turn token), the tokens whose log-probs the objectives score.
Truncation to `max_seq_len` keeps the prompt and cuts the completion; an example whose prompt leaves no completion
token is dropped and counted (`dropped_long_prompt`).

A paired example is {"chosen_input_ids", "chosen_labels", "rejected_input_ids", "rejected_labels"}; a batch of B
pairs is one (2B, T) forward: rows 0..B−1 the chosen sequences, B..2B−1 the rejected ones (`collate_pairs`). An
unpaired example is {"input_ids", "labels", "prompt_len", "kto_label"}; its batch adds the KL rows of KTO (prompt i
with the completion of example i−1 of the batch, as TRL builds them) when B > 1. Stored reference log-probs
(`precompute_reference`) ride along as "ref_logps" (and "ref_kl_logps").
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from slimtune.config.data import DataConfig, SourceConfig
from slimtune.data.chat import IGNORE_INDEX, render_conversations
from slimtune.data.dataset import TrainData, _make_sources, chat_setup, collate, hold_out
from slimtune.data.readers import Invalid, RecordError, extract_messages, iter_records
from slimtune.errors import DataError

PAIR_KEYS = ("chosen", "rejected")
_HH_TURN = re.compile(r"\n\n(Human|Assistant):[ ]?")


# ------------------------------------------------------------------------------------------------ record parsing
def _as_messages(value: Any, src: SourceConfig, key: str) -> list[dict]:
    """A message list (OpenAI / ShareGPT keys) or a string: an HH transcript when it has Human:/Assistant: turns,
    else one assistant reply."""
    if isinstance(value, str):
        return _hh_turns(value) or [{"role": "assistant", "content": value}]
    if hasattr(value, "tolist") and not isinstance(value, (str, bytes)):
        value = value.tolist()
    if not isinstance(value, list) or not value:
        raise RecordError(f"field '{key}' must be a string or a non-empty list of messages")
    try:
        return extract_messages({"messages": value}, src.model_copy(update={"messages_field": "messages",
                                                                            "system_field": "\0"}), "chat")
    except RecordError as e:
        raise RecordError(str(e).replace("messages", key, 1)) from None


def _hh_turns(text: str) -> list[dict] | None:
    """Anthropic-HH '\\n\\nHuman: ...\\n\\nAssistant: ...' as messages; None when the text has no such turns."""
    parts = _HH_TURN.split("\n\n" + text.lstrip("\n") if not text.startswith("\n\n") else text)
    if len(parts) < 3 or parts[0].strip():
        return None
    return [{"role": "user" if who == "Human" else "assistant", "content": body.strip()}
            for who, body in zip(parts[1::2], parts[2::2])]


def _prompt(rec: dict, src: SourceConfig) -> list[dict] | None:
    if src.prompt_field not in rec or rec[src.prompt_field] is None:
        return None
    p = rec[src.prompt_field]
    msgs = (_hh_turns(p) or [{"role": "user", "content": p}]) if isinstance(p, str) else \
        _as_messages(p, src, src.prompt_field)
    if len(msgs) > 1 and msgs[-1]["role"] == "assistant" and not msgs[-1]["content"]:
        msgs = msgs[:-1]  # an HH prompt ending in an empty "Assistant:" turn
    return msgs


def _split(prompt: list[dict] | None, full: list[dict], key: str) -> tuple[list[dict], dict]:
    """(prompt messages, the final assistant reply) of one side of a record."""
    if full[-1]["role"] != "assistant":
        raise RecordError(f"field '{key}' must end with an assistant message")
    if prompt is None or full[: len(prompt)] == prompt:  # a whole conversation: its last reply is the completion
        head = full[:-1]
        return (head if prompt is None or len(head) >= len(prompt) else prompt), full[-1]
    if len(full) != 1:
        raise RecordError(f"field '{key}': a message list that does not start with the prompt must be one "
                          f"assistant message")
    return prompt, full[-1]


def extract_pair(rec: Any, src: SourceConfig) -> tuple[list[dict], dict, dict]:
    """(prompt messages, chosen reply, rejected reply) of a `format: preference` record."""
    if not isinstance(rec, dict):
        raise RecordError("format: preference needs JSON objects with chosen and rejected")
    for k in (src.chosen_field, src.rejected_field):
        if k not in rec:
            raise RecordError(f"missing field '{k}'")
    prompt = _prompt(rec, src)
    c_prompt, chosen = _split(prompt, _as_messages(rec[src.chosen_field], src, src.chosen_field), src.chosen_field)
    r_prompt, rejected = _split(prompt, _as_messages(rec[src.rejected_field], src, src.rejected_field),
                                src.rejected_field)
    if c_prompt != r_prompt:
        raise RecordError(f"'{src.chosen_field}' and '{src.rejected_field}' do not share a prompt (their turns "
                          f"before the last reply differ)")
    if not c_prompt:
        raise RecordError(f"no prompt: give '{src.prompt_field}', or conversations in chosen/rejected")
    return c_prompt, chosen, rejected


def extract_unpaired(rec: Any, src: SourceConfig) -> tuple[list[dict], dict, bool]:
    """(prompt messages, completion, label) of a `format: kto` record."""
    if not isinstance(rec, dict):
        raise RecordError("format: kto needs JSON objects with prompt, completion and label")
    for k in (src.prompt_field, src.completion_field, src.label_field):
        if k not in rec:
            raise RecordError(f"missing field '{k}'")
    label = rec[src.label_field]
    if not isinstance(label, (bool, np.bool_)):
        raise RecordError(f"field '{src.label_field}' must be true or false, got {type(label).__name__}")
    prompt, completion = _split(_prompt(rec, src),
                                _as_messages(rec[src.completion_field], src, src.completion_field),
                                src.completion_field)
    return prompt, completion, bool(label)


def check_preference_record(rec: Any, src: SourceConfig, fmt: str) -> None:
    """Raise RecordError when `rec` cannot be used for `format: preference|kto` (slimtune validate)."""
    if isinstance(rec, Invalid):
        raise RecordError(rec.reason)
    (extract_pair if fmt == "preference" else extract_unpaired)(rec, src)


# ------------------------------------------------------------------------------------------------ tokenization
def last_reply_only(labels: np.ndarray) -> int:
    """Keep the labels of the final assistant reply (the last run of labelled tokens), in place; returns where
    that reply starts (the prompt's length in tokens)."""
    idx = np.nonzero(labels != IGNORE_INDEX)[0]
    if len(idx) == 0:
        return len(labels)
    start = int(idx[-1])
    while start > 0 and labels[start - 1] != IGNORE_INDEX:
        start -= 1
    labels[:start] = IGNORE_INDEX
    return start


def _truncate(ids: np.ndarray, labels: np.ndarray, start: int, max_len: int) -> tuple | None:
    """Prompt kept, completion cut to max_len; None when no completion token would be left to score."""
    if start >= max_len:
        return None
    return ids[:max_len], labels[:max_len], len(ids) > max_len


def _encode(tokenizer, convs: list[list[dict]], method: str) -> list[Any]:
    out = []
    for res in render_conversations(tokenizer, convs, method):
        if isinstance(res, RecordError):
            out.append(res)
            continue
        ids, labels = np.asarray(res[0], dtype=np.int64), np.asarray(res[1], dtype=np.int64)
        out.append((ids, labels, last_reply_only(labels)))
    return out


# ------------------------------------------------------------------------------------------------ the data
class PreferenceData(TrainData):
    """TrainData whose examples are pairs (`format: preference`) or labelled completions (`format: kto`); the
    same deterministic, resumable order as SFT data."""

    kind: str = "preference"

    def batches(self, micro_batch: int, *, epoch: int, start: int = 0, drop_last: bool = False,
                pad_to_multiple_of: int | None = None) -> Iterator[dict[str, torch.Tensor]]:
        total = self.num_batches(micro_batch, drop_last=drop_last)
        if not 0 <= start <= total:
            raise ValueError(f"start must be in [0, {total}], got {start}")
        order = self.order(epoch)
        for b in range(start, total):
            exs = [self.examples[i] for i in order[b * micro_batch:(b + 1) * micro_batch]]
            yield collate_pairs(exs, self.pad_id) if self.kind == "preference" else collate_unpaired(exs, self.pad_id)


def collate_pairs(examples: Sequence[dict[str, Any]], pad_id: int) -> dict[str, torch.Tensor]:
    """B pairs → one (2B, T) batch: chosen rows first, then rejected (and "ref_logps" (2B,) when stored)."""
    rows = [{"input_ids": e[f"{k}_input_ids"], "labels": e[f"{k}_labels"]} for k in PAIR_KEYS for e in examples]
    batch = collate(rows, pad_id)
    if all("ref_chosen" in e for e in examples):
        batch["ref_logps"] = torch.tensor([float(e[f"ref_{k}"]) for k in PAIR_KEYS for e in examples],
                                          dtype=torch.float64)
    return batch


def add_kl_rows(examples: list[dict[str, Any]]) -> None:
    """KTO's mismatched sequences, fixed per example (TRL's sequential KL completions): example i gets the prompt
    of i with the completion of example i−1 (cyclic, in data order) as "kl_input_ids" / "kl_labels"."""
    for i, e in enumerate(examples):
        o = examples[i - 1]
        p, c = int(e["prompt_len"]), int(o["prompt_len"])
        e["kl_input_ids"] = torch.cat([e["input_ids"][:p], o["input_ids"][c:]])[: e["max_len"]]
        e["kl_labels"] = torch.cat([torch.full((p,), IGNORE_INDEX, dtype=torch.long), o["labels"][c:]])[: e["max_len"]]


def collate_unpaired(examples: Sequence[dict[str, Any]], pad_id: int) -> dict[str, torch.Tensor]:
    """B labelled completions → (B, T) rows, "kto_label" (B,), the KL rows ("kl_" keys) and stored reference
    log-probs ("ref_logps", "ref_kl_logps")."""
    batch = collate(examples, pad_id)
    batch["kto_label"] = torch.tensor([bool(e["kto_label"]) for e in examples])
    kl = collate([{"input_ids": e["kl_input_ids"], "labels": e["kl_labels"]} for e in examples], pad_id)
    batch.update({f"kl_{k}": v for k, v in kl.items()})
    if all("ref_logp" in e for e in examples):
        batch["ref_logps"] = torch.tensor([float(e["ref_logp"]) for e in examples], dtype=torch.float64)
        batch["ref_kl_logps"] = torch.tensor([float(e["ref_kl_logp"]) for e in examples], dtype=torch.float64)
    return batch


def build_preference_dataset(cfg: DataConfig, tokenizer, *, base_dir: Path, seed: int) -> PreferenceData:
    """Read and tokenize `format: preference|kto` data (main sources; `holdout` and `eval_sources` give the
    held-out examples of `train.eval_every`). Replay mixing and packing do not apply to preference data."""
    seed, pad_id = chat_setup(cfg, tokenizer, base_dir, seed)
    train: list[dict] = []
    held: list[dict] = []
    per_source: dict[str, dict] = {}
    for s in _make_sources(cfg):
        exs, stats = _read_source(s.cfg, cfg, tokenizer, Path(base_dir))
        for e in exs:
            e["source"] = s.name
        per_source[s.name] = {**stats, "group": s.group}
        (held if s.group == "eval" else train).extend(exs)
    train, held = hold_out(train, held, cfg.holdout, seed)
    if not train:
        raise DataError("data: no training examples")
    if cfg.format == "kto":
        add_kl_rows(train)
        add_kl_rows(held)
    stats = {"format": cfg.format, "seed": seed, "max_seq_len": cfg.max_seq_len, "packing": False,
             "sources": per_source, "records": sum(v["records"] for v in per_source.values()),
             "skipped_records": sum(v["skipped"] for v in per_source.values()),
             "dropped_examples": sum(v["dropped_long_prompt"] for v in per_source.values()),
             "truncated_examples": sum(v["truncated"] for v in per_source.values()),
             "holdout_records": len(held), "examples": len(train),
             "tokens": sum(_tokens(e) for e in train)}
    data = PreferenceData(examples=train, stats=stats, holdout=held, pad_id=int(pad_id), seed=seed,
                          shuffle=cfg.shuffle)
    data.kind = cfg.format
    return data


def _tokens(e: dict) -> int:
    return sum(int(e[k].numel()) for k in ("input_ids", "chosen_input_ids", "rejected_input_ids") if k in e)


def _read_source(sc: SourceConfig, cfg: DataConfig, tokenizer, base_dir: Path) -> tuple[list[dict], dict]:
    st = {"path": sc.path, "records": 0, "skipped": 0, "dropped_long_prompt": 0, "truncated": 0}
    parsed: list[tuple[str, Any]] = []
    for where, rec in iter_records(sc, base_dir):
        if sc.max_records is not None and len(parsed) >= sc.max_records:
            break
        try:
            if isinstance(rec, Invalid):
                raise RecordError(rec.reason)
            parsed.append((where, extract_pair(rec, sc) if cfg.format == "preference" else extract_unpaired(rec, sc)))
        except RecordError as e:
            if cfg.on_error == "raise":
                raise DataError(f"{where}: {e}") from None
            st["skipped"] += 1
    sides = 2 if cfg.format == "preference" else 1
    convs = [p[0] + [p[1 + j]] for _, p in parsed for j in range(sides)]
    enc = _encode(tokenizer, convs, cfg.loss_mask)
    out = []
    for k, (where, p) in enumerate(parsed):
        ex: dict[str, Any] = {"where": where}
        bad = next((r for r in enc[k * sides:(k + 1) * sides] if isinstance(r, RecordError)), None)
        if bad is not None:
            if cfg.on_error == "raise":
                raise DataError(f"{where}: {bad}")
            st["skipped"] += 1
            continue
        st["records"] += 1
        cut = [_truncate(*enc[k * sides + j], cfg.max_seq_len) for j in range(sides)]
        if any(c is None for c in cut):
            st["dropped_long_prompt"] += 1
            continue
        st["truncated"] += any(c[2] for c in cut)
        if cfg.format == "preference":
            for key, (ids, labels, _) in zip(PAIR_KEYS, cut):
                ex[f"{key}_input_ids"], ex[f"{key}_labels"] = torch.from_numpy(ids), torch.from_numpy(labels)
        else:
            ids, labels, _ = cut[0]
            ex.update(input_ids=torch.from_numpy(ids), labels=torch.from_numpy(labels),
                      prompt_len=enc[k][2], kto_label=p[2], max_len=cfg.max_seq_len)
        out.append(ex)
    return out, st
