"""Build training data from a `DataConfig`: read → tokenize → hold out → mix by tokens → pack → batches.

    data = build_dataset(cfg.data, tokenizer, base_dir=recipe_path.parent, seed=cfg.train.seed)
    for step, batch in enumerate(data.batches(micro_batch=4, epoch=0, start=resume_batch)):
        loss = model(**batch).loss            # labels are aligned with input_ids; the model shifts them

Formats:

- `text`: each document is tokenized without special tokens and followed by EOS. With `packing` the (shuffled)
  documents are concatenated and cut into blocks of exactly `max_seq_len` tokens (labels = input_ids, attention
  over the whole block, documents are not isolated from each other); the last partial block is dropped and counted
  as `tail_tokens_dropped`. Without packing a document is one example, truncated to `max_seq_len`.
- `chat` / `instruction`: rendered with the tokenizer's chat template; labels are -100 except on the assistant
  replies and their end-of-turn tokens (see `slimtune.data.chat`). Truncated to `max_seq_len`; an example with no
  target token left is dropped and counted. With `packing: true` whole examples share rows of `max_seq_len`
  tokens with `position_ids` restarting per example (`pack_examples`): attention stays inside each example.

Determinism: everything is a function of (data, tokenizer, config, seed); the batch order of an epoch is a function
of (seed, epoch), so a run resumed at (epoch, start batch) sees exactly the batches an uninterrupted run would.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from slimtune.config.data import DataConfig, SourceConfig
from slimtune.data.chat import (
    IGNORE_INDEX,
    check_chat_tokenizer,
    has_generation_markers,
    render_conversations,
)
from slimtune.data.mix import group_targets, replay_total, select_units
from slimtune.data.readers import Invalid, RecordError, extract_messages, extract_text, iter_records, source_name
from slimtune.data.templates import set_chat_template
from slimtune.errors import DataError, ModelError

_CHUNK = 1024  # records tokenized per tokenizer call


def _rng(seed: int, *keys: int) -> np.random.Generator:
    return np.random.default_rng([seed % (1 << 63), *keys])


@dataclass
class _Unit:
    ids: np.ndarray  # int64 token ids (text: document + EOS)
    labels: np.ndarray | None  # None: labels = ids
    raw: Any  # document text or list of messages
    where: str


@dataclass
class _Source:
    cfg: SourceConfig
    name: str
    group: str  # "main" | "replay"
    units: list[_Unit] = field(default_factory=list)
    stats: dict[str, Any] = field(default_factory=dict)


# ------------------------------------------------------------------------------------------------------ TrainData
@dataclass
class TrainData:
    """Tokenized training examples plus a deterministic, resumable batch sampler.

    `examples[i]` is {"input_ids": LongTensor (T_i,), "labels": LongTensor (T_i,)} (labels aligned with input_ids,
    -100 where there is no loss). `holdout` holds the records kept out for evaluation: dicts with "source", "where",
    "text" (format text) or "messages" (chat/instruction), and the tokenized "input_ids"/"labels" (max_seq_len).
    """

    examples: list[dict[str, torch.Tensor]]
    stats: dict[str, Any]
    holdout: list[dict[str, Any]]
    pad_id: int
    seed: int
    shuffle: bool = True

    def __len__(self) -> int:
        return len(self.examples)

    def order(self, epoch: int) -> np.ndarray:
        """Example indices in the order of `epoch` (a seeded permutation when shuffling)."""
        if epoch < 0:
            raise ValueError(f"epoch must be >= 0, got {epoch}")
        n = len(self.examples)
        return _rng(self.seed, 3, epoch).permutation(n) if self.shuffle else np.arange(n)

    def num_batches(self, micro_batch: int, *, drop_last: bool = False) -> int:
        """Micro-batches per epoch."""
        if micro_batch <= 0:
            raise ValueError(f"micro_batch must be > 0, got {micro_batch}")
        n = len(self.examples)
        return n // micro_batch if drop_last else -(-n // micro_batch)

    def batches(self, micro_batch: int, *, epoch: int, start: int = 0, drop_last: bool = False,
                pad_to_multiple_of: int | None = None) -> Iterator[dict[str, torch.Tensor]]:
        """Yield the micro-batches of `epoch`, beginning with batch index `start` (batches already consumed).

        Each batch: input_ids, labels, attention_mask, all (B, T) int64, right-padded to the longest example
        (rounded up to `pad_to_multiple_of`) with the pad id, label -100 and mask 0. The last batch is smaller
        unless `drop_last`. `batches(mb, epoch=e, start=k)` yields exactly what `batches(mb, epoch=e)` yields from
        its k-th batch on, so checkpoint (epoch, batches consumed) to resume.
        """
        total = self.num_batches(micro_batch, drop_last=drop_last)
        if not 0 <= start <= total:
            raise ValueError(f"start must be in [0, {total}], got {start}")
        order = self.order(epoch)
        for b in range(start, total):
            idx = order[b * micro_batch:(b + 1) * micro_batch]
            yield collate([self.examples[i] for i in idx], self.pad_id, pad_to_multiple_of=pad_to_multiple_of)


def collate(examples: Sequence[dict[str, Any]], pad_id: int, *, pad_to_multiple_of: int | None = None
            ) -> dict[str, torch.Tensor]:
    """Right-pad examples ({"input_ids", "labels"} lists or 1-D tensors) into (B, T) int64 tensors."""
    if not examples:
        raise ValueError("collate needs at least one example")
    ids = [torch.as_tensor(e["input_ids"], dtype=torch.long) for e in examples]
    labels = [torch.as_tensor(e["labels"], dtype=torch.long) for e in examples]
    t = max(int(x.numel()) for x in ids)
    if pad_to_multiple_of:
        t = -(-t // pad_to_multiple_of) * pad_to_multiple_of
    out_ids = torch.full((len(ids), t), pad_id, dtype=torch.long)
    out_labels = torch.full((len(ids), t), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(ids), t), dtype=torch.long)
    packed = "position_ids" in examples[0]
    pos = torch.zeros((len(ids), t), dtype=torch.long) if packed else None
    for i, (x, y) in enumerate(zip(ids, labels)):
        n = x.numel()
        out_ids[i, :n] = x
        out_labels[i, :n] = y
        mask[i, :n] = 1
        if pos is not None:  # the padding run is one more block of its own (positions from 0): nothing attends to it
            pos[i, :n] = torch.as_tensor(examples[i]["position_ids"], dtype=torch.long)
            pos[i, n:] = torch.arange(t - n)
    batch = {"input_ids": out_ids, "labels": out_labels, "attention_mask": mask}
    if pos is not None:
        batch["position_ids"] = pos
    return batch


def pack_examples(pieces: Sequence[tuple[np.ndarray, np.ndarray | None]], max_len: int
                  ) -> list[dict[str, torch.Tensor]]:
    """Pack SFT examples into rows of at most `max_len` tokens without cutting one (first fit over the last 16
    open rows, in the given order).

    Each row: input_ids, labels (each example's first label set to -100: it would be predicted from the previous
    example's last token) and position_ids restarting at 0 per example. The model is called with these
    position_ids and no attention_mask, which transformers (masking_utils.find_packed_sequence_indices) turns into
    a block-diagonal causal mask, so no token attends across examples; the rotary phases are those of the
    example alone. Loss sums are then exactly those of the examples run one by one.
    """
    rows: list[list[int]] = []  # indices into pieces
    room: list[int] = []
    for k, (ids, _) in enumerate(pieces):
        n = len(ids)
        for j in range(max(0, len(rows) - 16), len(rows)):
            if room[j] >= n:
                rows[j].append(k)
                room[j] -= n
                break
        else:
            rows.append([k])
            room.append(max_len - n)
    out = []
    for row in rows:
        ids = np.concatenate([pieces[k][0] for k in row])
        labels = np.concatenate([pieces[k][0] if pieces[k][1] is None else pieces[k][1] for k in row]).copy()
        pos = np.concatenate([np.arange(len(pieces[k][0]), dtype=np.int64) for k in row])
        labels[pos == 0] = IGNORE_INDEX
        out.append({"input_ids": torch.from_numpy(ids), "labels": torch.from_numpy(labels),
                    "position_ids": torch.from_numpy(pos)})
    return out


def count_target_tokens(batch: dict[str, torch.Tensor]) -> int:
    """Tokens that carry loss: labels != -100 after the causal shift (position 0 is never predicted)."""
    return int((batch["labels"][..., 1:] != IGNORE_INDEX).sum())


# ---------------------------------------------------------------------------------------------------- the builder
def build_dataset(cfg: DataConfig, tokenizer, *, base_dir: Path, seed: int) -> TrainData:
    """Read, format, hold out, mix and pack the data of `cfg` (paths relative to `base_dir`).

    Raises DataError (file:line) for bad data and ModelError for a tokenizer that cannot do the format.
    `data.chat_template` is set on `tokenizer` itself, so that the outputs saved with it carry the template used.
    """
    seed = cfg.seed if cfg.seed is not None else int(seed)
    base_dir = Path(base_dir)
    eos_id = tokenizer.eos_token_id
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_id
    if cfg.format == "text" and eos_id is None:
        raise ModelError("the tokenizer has no eos token; format: text needs one to separate documents")
    if pad_id is None:
        raise ModelError("the tokenizer has neither a pad nor an eos token")
    if cfg.format != "text":
        set_chat_template(tokenizer, cfg.chat_template, base_dir)  # on the tokenizer: saved with the outputs
        check_chat_tokenizer(tokenizer)
        if cfg.loss_mask == "generation" and not has_generation_markers(tokenizer):
            raise ModelError("data.loss_mask: generation needs a chat template with {% generation %} markers")

    sources = _make_sources(cfg)
    for src in sources:
        _load_source(src, cfg, tokenizer, base_dir, eos_id)

    holdout = _split_holdout(sources, cfg, seed)
    holdout += [_holdout_record(s, u, cfg) for s in sources if s.group == "eval" for u in s.units]
    sources = [s for s in sources if s.group != "eval"]

    # Mixing by token share, main group then replay group.
    can_cut = cfg.format == "text" and cfg.packs
    pieces: list[tuple[np.ndarray, np.ndarray | None]] = []
    group_totals: dict[str, int] = {}
    for gi, group in enumerate(("main", "replay")):
        members = [s for s in sources if s.group == group]
        if not members:
            continue
        totals = []
        for s in members:
            tot = int(sum(len(u.ids) for u in s.units))
            if tot == 0:
                st = s.stats
                raise DataError(f"{s.cfg.path}: no usable records ({st['records']} read, {st['skipped']} skipped, "
                                f"{st['dropped_no_target']} without target tokens, {st['holdout']} held out)")
            totals.append(tot)
        if group == "main":
            group_total = sum(totals)
        else:
            group_total = replay_total(group_totals["main"], cfg.replay.ratio)
        targets = group_targets(totals, [s.cfg.weight for s in members], group_total)
        got_total = 0
        for si, (s, target) in enumerate(zip(members, targets)):
            lengths = np.array([len(u.ids) for u in s.units], dtype=np.int64)
            chosen = select_units(lengths, target, _rng(seed, 1, gi, si), can_cut=can_cut)
            got = 0
            for ui, cut in chosen:
                u = s.units[ui]
                ids = u.ids if cut is None else u.ids[:cut]
                lab = u.labels if (cut is None or u.labels is None) else u.labels[:cut]
                pieces.append((ids, lab))
                got += len(ids)
            s.stats["tokens"] = got
            s.stats["repeat"] = round(got / s.stats["tokens_available"], 4)
            got_total += got
        group_totals[group] = got_total

    if cfg.shuffle:
        perm = _rng(seed, 2).permutation(len(pieces))
        pieces = [pieces[i] for i in perm]

    tail = 0
    if can_cut:
        stream = np.concatenate([p[0] for p in pieces]) if pieces else np.zeros(0, dtype=np.int64)
        n_blocks = len(stream) // cfg.max_seq_len
        if n_blocks == 0:
            raise DataError(f"data: only {len(stream)} tokens, fewer than one block of max_seq_len="
                            f"{cfg.max_seq_len}")
        tail = len(stream) - n_blocks * cfg.max_seq_len
        blocks = torch.from_numpy(stream[: n_blocks * cfg.max_seq_len].copy()).view(n_blocks, cfg.max_seq_len)
        examples = [{"input_ids": b, "labels": b} for b in blocks]
    elif cfg.packs:  # SFT packing: whole examples side by side, each in its own attention block
        if not pieces:
            raise DataError("data: no training examples")
        examples = pack_examples(pieces, cfg.max_seq_len)
    else:
        examples = []
        for ids, lab in pieces:
            t = torch.from_numpy(ids)
            examples.append({"input_ids": t, "labels": t if lab is None else torch.from_numpy(lab)})
        if not examples:
            raise DataError("data: no training examples")

    main, replay = group_totals.get("main", 0), group_totals.get("replay", 0)
    per_source = {s.name: s.stats for s in sources}
    stats: dict[str, Any] = {
        "format": cfg.format,
        "seed": seed,
        "max_seq_len": cfg.max_seq_len,
        "packing": cfg.packs,
        "packed_examples": len(pieces) if cfg.packs and not can_cut else None,
        "sources": per_source,
        "records": sum(v["records"] for v in per_source.values()),
        "skipped_records": sum(v["skipped"] for v in per_source.values()),
        "dropped_examples": sum(v["dropped_no_target"] for v in per_source.values()),
        "truncated_examples": sum(v["truncated"] for v in per_source.values()),
        "holdout_records": len(holdout),
        "examples": len(examples),
        "tokens": main + replay,
        "tail_tokens_dropped": tail,
        "target_tokens": sum(int((e["labels"][1:] != IGNORE_INDEX).sum()) for e in examples),
        "replay_ratio": (replay / (main + replay)) if cfg.replay is not None and main + replay else None,
        "replay_ratio_target": cfg.replay.ratio if cfg.replay is not None else None,
    }
    return TrainData(examples=examples, stats=stats, holdout=holdout, pad_id=int(pad_id), seed=seed,
                     shuffle=cfg.shuffle)


def chat_setup(cfg: DataConfig, tokenizer, base_dir: Path, seed: int) -> tuple[int, int]:
    """The common start of the unpacked chat formats (preference, kto, prompt): no replay or packing, the chat
    template set on the tokenizer and checked. Returns (the data seed, the pad id)."""
    if cfg.replay is not None or cfg.packing:
        raise DataError(f"data.format: {cfg.format}: replay and packing apply to SFT data only")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad_id is None:
        raise ModelError("the tokenizer has neither a pad nor an eos token")
    set_chat_template(tokenizer, cfg.chat_template, base_dir)
    check_chat_tokenizer(tokenizer)
    return (cfg.seed if cfg.seed is not None else int(seed)), pad_id


def hold_out(train: list, held: list, holdout: float | int | None, seed: int) -> tuple[list, list]:
    """Move ``data.holdout`` of the unpacked formats' training examples (a fraction or a count, drawn with the data
    seed) to the front of ``held``. Returns (train, held)."""
    if not holdout:
        return train, held
    k = max(1, int(round(holdout * len(train)))) if isinstance(holdout, float) else int(holdout)
    if k >= len(train):
        raise DataError(f"data.holdout: {holdout} leaves no training records (the sources have {len(train)})")
    pick = set(_rng(seed, 0).permutation(len(train))[:k].tolist())
    return [e for i, e in enumerate(train) if i not in pick], [train[i] for i in sorted(pick)] + held


def _make_sources(cfg: DataConfig) -> list[_Source]:
    out: list[_Source] = []
    seen: dict[str, int] = {}
    groups = [("main", cfg.sources)] + ([("replay", cfg.replay.sources)] if cfg.replay is not None else [])
    groups.append(("eval", cfg.eval_sources))
    for group, srcs in groups:
        for sc in srcs:
            name = source_name(sc)
            if name in seen:
                seen[name] += 1
                name = f"{name}#{seen[name]}"
            else:
                seen[name] = 1
            out.append(_Source(cfg=sc, name=name, group=group))
    return out


def _load_source(src: _Source, cfg: DataConfig, tokenizer, base_dir: Path, eos_id: int | None) -> None:
    sc = src.cfg
    st = src.stats
    st.update(group=src.group, path=sc.path, weight=sc.weight, records=0, skipped=0, empty=0,
              dropped_no_target=0, truncated=0, holdout=0, tokens_available=0, tokens=0, repeat=0.0)

    def bad(where: str, err: Exception) -> None:
        if cfg.on_error == "raise":
            raise DataError(f"{where}: {err}") from None
        st["skipped"] += 1

    records: list[tuple[str, Any]] = []
    for where, rec in iter_records(sc, base_dir):
        if sc.max_records is not None and len(records) >= sc.max_records:
            break
        try:
            if isinstance(rec, Invalid):
                raise RecordError(rec.reason)
            if cfg.format == "text":
                content = extract_text(rec, sc)
                if not content.strip():
                    st["empty"] += 1
                    continue
            else:
                content = extract_messages(rec, sc, cfg.format)
        except RecordError as e:
            bad(where, e)
            continue
        records.append((where, content))

    L = cfg.max_seq_len
    for c0 in range(0, len(records), _CHUNK):
        chunk = records[c0:c0 + _CHUNK]
        if cfg.format == "text":
            enc = tokenizer([r[1] for r in chunk], add_special_tokens=False)["input_ids"]
            for (where, text), ids in zip(chunk, enc):
                arr = np.fromiter(ids, dtype=np.int64, count=len(ids))
                arr = np.append(arr, np.int64(eos_id))
                if not cfg.packs and len(arr) > L:
                    arr = arr[:L]
                    st["truncated"] += 1
                src.units.append(_Unit(ids=arr, labels=None, raw=text, where=where))
                st["records"] += 1
        else:
            results = render_conversations(tokenizer, [r[1] for r in chunk], cfg.loss_mask)
            for (where, msgs), res in zip(chunk, results):
                if isinstance(res, RecordError):
                    bad(where, res)
                    continue
                ids, labels = res
                st["records"] += 1
                if len(ids) > L:
                    ids, labels = ids[:L], labels[:L]
                    st["truncated"] += 1
                lab = np.asarray(labels, dtype=np.int64)
                if not (lab[1:] != IGNORE_INDEX).any():
                    st["dropped_no_target"] += 1
                    continue
                src.units.append(_Unit(ids=np.asarray(ids, dtype=np.int64), labels=lab, raw=msgs, where=where))
    st["tokens_available"] = int(sum(len(u.ids) for u in src.units))


def _holdout_record(s: _Source, u: _Unit, cfg: DataConfig) -> dict[str, Any]:
    """A record kept for evaluation: its source, place, raw content and tokens (truncated to max_seq_len)."""
    ids = torch.from_numpy(u.ids[: cfg.max_seq_len].copy())
    labels = ids if u.labels is None else torch.from_numpy(u.labels[: cfg.max_seq_len].copy())
    rec = {"source": s.name, "where": u.where, "input_ids": ids, "labels": labels}
    rec["text" if cfg.format == "text" else "messages"] = u.raw
    return rec


def _split_holdout(sources: list[_Source], cfg: DataConfig, seed: int) -> list[dict[str, Any]]:
    """Move a seeded choice of main-source units into the holdout (tokens truncated to max_seq_len)."""
    h = cfg.holdout
    if not h:
        return []
    pool = [(si, ui) for si, s in enumerate(sources) if s.group == "main" for ui in range(len(s.units))]
    n = len(pool)
    k = max(1, int(round(h * n))) if isinstance(h, float) else int(h)
    if k >= n:
        raise DataError(f"data.holdout: {h} leaves no training records (the main sources have {n})")
    picked = sorted(pool[i] for i in _rng(seed, 0).permutation(n)[:k])
    by_source: dict[int, set[int]] = {}
    for si, ui in picked:
        by_source.setdefault(si, set()).add(ui)
    out = [_holdout_record(sources[si], sources[si].units[ui], cfg) for si, ui in picked]
    for si, drop in by_source.items():
        s = sources[si]
        s.units = [u for ui, u in enumerate(s.units) if ui not in drop]
        s.stats["holdout"] = len(drop)
        s.stats["tokens_available"] = int(sum(len(u.ids) for u in s.units))
    return out
