"""LoRAM step 2 (optional): align the pruned model by continued pretraining on general text (DESIGN §2, LoRAM).

Pruning removes most of each pruned layer's KV groups and MLP neurons; the LoRAM paper restores part of the lost
knowledge with a short continued pretraining of the pruned model ("alignment") on general text before any adapter is
trained, and does it once per pruned base. This is full fine-tuning of the pruned model, not an adapter: every
weight trains except lm_head (with tied embeddings the embedding matrix *is* lm_head, so it stays frozen as well).

The loop is the plain one: next-token loss over the target tokens of `grad_accum` micro-batches
(`slimtune.train.loop.causal_lm_loss_sum`, the chunked linear cross-entropy), torch/bitsandbytes AdamW with decay on
matrices only (`slimtune.train.optim`), warm-up + decay schedule, gradient clipping, optional checkpointing of the
decoder layers. Weights, gradients and optimizer state are float32 (no mixed precision: alignment is a small job on
a small pruned model; 16 bytes per trained parameter plus activations).

Output: a pruned-model folder like the input (`save_pruned`: config.json = the original config, pruned safetensors,
loram.json unchanged) plus the tokenizer and `align_summary.json`. It is written into a temporary sibling folder and
renamed into place, so a folder that holds `align_summary.json` is a finished alignment (reused, never redone).
Alignment has no mid-run checkpoints: an interrupted alignment starts again.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from pathlib import Path
from typing import Any

import torch

from slimtune.errors import SlimtuneError

__all__ = ["ALIGN_SUMMARY", "align_pruned"]

ALIGN_SUMMARY = "align_summary.json"


def _batches(data, micro_batch: int):
    """Endless micro-batch stream over epochs (the data's own deterministic order)."""
    epoch = 0
    while True:
        yield from data.batches(micro_batch, epoch=epoch)
        epoch += 1


def align_pruned(
    model_dir: str | Path,
    out_dir: str | Path,
    cfg: Any,
    *,
    base_dir: Path = Path("."),
    reporter: Any = None,
    attn_implementation: str | None = "sdpa",
) -> dict[str, Any]:
    """Continued pretraining of the pruned model in `model_dir`; writes the aligned pruned model to `out_dir`.

    `cfg` is a `LoramAlignConfig` (``data`` and ``train``). Returns the summary (also in out_dir/align_summary.json).
    A finished alignment already in `out_dir` is returned as is.
    """
    from transformers import AutoTokenizer

    from slimtune.data.dataset import build_dataset, count_target_tokens
    from slimtune.loram.prune import KeptIndex, load_pruned, save_pruned
    from slimtune.models.load import ensure_pad_token, resolve_device
    from slimtune.train.checkpointing import enable_checkpointing
    from slimtune.train.loop import StepResult, causal_lm_loss_sum, peak_memory_bytes
    from slimtune.train.optim import build_optimizer, build_scheduler
    from slimtune.train.report import SilentReporter
    from slimtune.train.state import seed_everything

    reporter = reporter or SilentReporter()
    model_dir, out_dir = Path(model_dir), Path(out_dir)
    done = out_dir / ALIGN_SUMMARY
    if done.is_file():
        reporter.log(f"LoRAM align: already done ({done}), reused")
        return json.loads(done.read_text())

    t = cfg.train
    seed_everything(t.seed)
    device = resolve_device(t.device)
    kept = KeptIndex.load(model_dir)
    reporter.log(f"LoRAM align: loading the pruned model {model_dir}")
    model = load_pruned(model_dir, dtype=torch.float32, attn_implementation=attn_implementation).to(device)
    tok = AutoTokenizer.from_pretrained(model_dir)
    ensure_pad_token(tok)

    for p in model.parameters():
        p.requires_grad_(True)
    head = model.get_output_embeddings()
    head.weight.requires_grad_(False)  # tied embeddings: this is the embedding matrix too
    if getattr(head, "bias", None) is not None:
        head.bias.requires_grad_(False)
    params = [p for p in model.parameters() if p.requires_grad]
    n_train, n_total = sum(p.numel() for p in params), sum(p.numel() for p in model.parameters())
    reporter.log(f"LoRAM align: full fine-tuning of {n_train:,} of {n_total:,} parameters (lm_head frozen)")
    if t.grad_checkpointing != "none":
        enable_checkpointing(model, t.grad_checkpointing)

    data = build_dataset(cfg.data, tok, base_dir=base_dir, seed=t.seed)
    if len(data) == 0:
        raise SlimtuneError("loram.align.data: no training examples after tokenization")
    per_epoch = data.num_batches(t.micro_batch)
    total = t.steps or max(1, math.ceil(t.epochs * per_epoch / t.grad_accum))
    optimizer = build_optimizer(params, t)
    scheduler = build_scheduler(optimizer, t, total)
    reporter.log(f"LoRAM align: {len(data)} examples, {total} steps")

    model.train()
    stream = _batches(data, t.micro_batch)
    losses: list[float] = []
    t0 = time.perf_counter()
    reporter.start(total=total, done=0)
    try:
        for step in range(1, total + 1):
            ts = time.perf_counter()
            micro = [next(stream) for _ in range(t.grad_accum)]
            n_target = max(1, sum(count_target_tokens(b) for b in micro))
            loss_total = 0.0
            for b in micro:
                b = {k: v.to(device) for k, v in b.items()}
                loss_sum = causal_lm_loss_sum(model, b)
                (loss_sum / n_target).backward()
                loss_total += float(loss_sum.detach())
            gnorm = float(torch.nn.utils.clip_grad_norm_(params, t.max_grad_norm if t.max_grad_norm > 0 else math.inf))
            loss = loss_total / n_target
            if not (math.isfinite(loss) and math.isfinite(gnorm)):
                raise SlimtuneError(f"LoRAM align: non-finite loss or gradient at step {step}; "
                                    "lower loram.align.train.lr")
            lr = optimizer.param_groups[0]["lr"]
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(loss)
            tokens = sum(int(b["attention_mask"].sum()) for b in micro)
            reporter.step(StepResult(step, loss, lr, tokens, n_target, time.perf_counter() - ts, gnorm),
                          peak_memory_bytes(device))
    finally:
        reporter.stop()
    wall = time.perf_counter() - t0

    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    model.config.use_cache = True
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    save_pruned(model.to("cpu"), kept, tmp)
    tok.save_pretrained(tmp)
    summary = {
        "from": str(model_dir),
        "steps": total,
        "first_loss": losses[0],
        "final_loss": losses[-1],
        "trainable_params": n_train,
        "wall_seconds": round(wall, 2),
        "data": data.stats,
    }
    (tmp / ALIGN_SUMMARY).write_text(json.dumps(summary, indent=2, default=str))
    if out_dir.exists():
        shutil.rmtree(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp.rename(out_dir)
    reporter.log(f"LoRAM align: loss {losses[0]:.4f} → {losses[-1]:.4f} in {total} steps; written to {out_dir}")
    return summary
