"""The one model-evaluation path: load a model (+ a slimtune adapter), run an ``eval:`` section, add the held-out
figures, free the model.

    result = evaluate_model(model_cfg, quant_cfg, eval_cfg, base_dir=recipe_dir, label="after sft",
                            adapter=Path("runs/x/adapter_native"), data=recipe.data, seed=recipe.train.seed)

``evaluate_loaded`` does the same on a model already in memory (the trainer's, before/after a stage). The result is
``run_eval``'s dict (label, metrics, perplexity, translation, exact_match, generations), plus:

- with ``eval.holdout_perplexity`` and text-format ``data`` holding ``holdout`` records: one perplexity row per
  source, ``perplexity["holdout:<source>"]`` (and ``metrics["perplexity/holdout:<source>"]``);
- with ``heldout=True`` and ``data``: ``result["heldout"]`` = ``heldout_loss`` on the held-out records (any
  format: the training masking, e.g. assistant tokens only), plus ``records`` (their number).

Without an ``eval:`` section only the held-out figures are computed (``{"label", "heldout"}``).
"""

from __future__ import annotations

import gc
import math
from pathlib import Path
from typing import Any

import torch

from slimtune.adapters.export import load_native
from slimtune.config.data import DataConfig
from slimtune.config.eval import EvalConfig
from slimtune.data.dataset import TrainData, build_dataset, collate, count_target_tokens
from slimtune.errors import SlimtuneError
from slimtune.eval.perplexity import perplexity
from slimtune.eval.runner import run_eval
from slimtune.models.fused import causal_lm_loss
from slimtune.models.load import ModelConfig, QuantConfig, load_model

__all__ = ["add_holdout_perplexity", "evaluate_loaded", "evaluate_model", "heldout_loss", "holdout_perplexity"]


@torch.no_grad()
def heldout_loss(model, records: list[dict[str, Any]], *, batch_size: int = 4, pad_id: int = 0, device=None
                 ) -> dict[str, float]:
    """{"loss", "ppl", "tokens"}: the mean next-token loss (nats per target token) of ``model`` on tokenized
    records (``input_ids``/``labels``, e.g. ``TrainData.holdout``), with the training's masking."""
    was = model.training
    model.eval()
    total, n = 0.0, 0
    try:
        for i in range(0, len(records), batch_size):
            b = collate(records[i:i + batch_size], pad_id)
            k = count_target_tokens(b)
            if k == 0:
                continue
            b = {key: v.to(device) if device is not None else v for key, v in b.items()}
            total += float(causal_lm_loss(model, input_ids=b["input_ids"], labels=b["labels"],
                                          attention_mask=b["attention_mask"], reduction="sum"))
            n += k
    finally:
        model.train(was)
    if n == 0:
        raise SlimtuneError("held-out records have no target tokens")
    return {"loss": total / n, "ppl": math.exp(min(total / n, 50.0)), "tokens": n}


def holdout_perplexity(model, tokenizer, data: TrainData, *, max_seq_len: int, batch_size: int, device
                       ) -> dict[str, dict]:
    """Perplexity on the records ``data.holdout`` kept out of training (format text), one entry per source:
    {"holdout:<source>": {"ppl", "nll", "tokens"}}."""
    by_source: dict[str, list[str]] = {}
    for h in data.holdout or []:
        if isinstance(h.get("text"), str) and h["text"].strip():
            by_source.setdefault(h["source"], []).append(h["text"])
    return {f"holdout:{src}": perplexity(model, tokenizer, texts, max_seq_len=max_seq_len, batch_size=batch_size,
                                         device=device)
            for src, texts in by_source.items()}


def add_holdout_perplexity(result: dict, model, tokenizer, data: TrainData | None, eval_cfg: EvalConfig | None,
                           data_cfg: DataConfig | None, device) -> dict:
    """Add the holdout rows to a ``run_eval`` result when ``eval.holdout_perplexity`` asks for them."""
    if eval_cfg is None or not eval_cfg.holdout_perplexity or data is None:
        return result
    max_len = min(data_cfg.max_seq_len if data_cfg is not None else 1024, 1024)
    for name, r in holdout_perplexity(model, tokenizer, data, max_seq_len=max(max_len, 2),
                                      batch_size=eval_cfg.batch_size, device=device).items():
        result["perplexity"][name] = r
        result["metrics"][f"perplexity/{name}"] = r["ppl"]
    return result


def evaluate_loaded(model, tokenizer, eval_cfg: EvalConfig | None, *, base_dir: Path, label: str, device,
                    data: TrainData | None = None, data_cfg: DataConfig | None = None, heldout: bool = False
                    ) -> dict[str, Any]:
    """Evaluate a model in memory (module doc). ``data``: the tokenized data whose ``holdout`` is scored."""
    result: dict[str, Any] = {"label": label}
    if eval_cfg is not None:
        result = run_eval(model, tokenizer, eval_cfg, base_dir=base_dir, label=label, device=device)
        add_holdout_perplexity(result, model, tokenizer, data, eval_cfg, data_cfg, device)
    if heldout and data is not None and data.holdout:
        bs = eval_cfg.batch_size if eval_cfg is not None else 4
        result["heldout"] = {**heldout_loss(model, data.holdout, batch_size=bs, pad_id=data.pad_id, device=device),
                             "records": len(data.holdout)}
    return result


def evaluate_model(model_cfg: ModelConfig, quant_cfg: QuantConfig, eval_cfg: EvalConfig | None, *, base_dir: Path,
                   label: str, device: str = "auto", adapter: Path | None = None, data: DataConfig | None = None,
                   seed: int = 0, heldout: bool = False, log=None) -> dict[str, Any]:
    """Load ``model_cfg`` as ``quant_cfg`` says (plus the native ``adapter``), evaluate it, free it (module doc).

    ``data`` (a recipe's data section) is tokenized with the model's tokenizer for the held-out figures; it is
    only read when they are asked for (``eval.holdout_perplexity`` with text data, or ``heldout``)."""
    if log is not None:
        log(f"evaluating {model_cfg.name}" + (f" + {adapter}" if adapter else "") + f" ({label})")
    loaded = load_model(model_cfg, quant_cfg, device=device)
    try:
        if adapter is not None:
            load_native(loaded.model, Path(adapter))
        wants_ppl = eval_cfg is not None and eval_cfg.holdout_perplexity and data is not None \
            and data.format == "text"
        train_data = None
        if data is not None and data.holdout and (wants_ppl or heldout):
            train_data = build_dataset(data, loaded.tokenizer, base_dir=base_dir, seed=seed)
        return evaluate_loaded(loaded.model, loaded.tokenizer, eval_cfg, base_dir=base_dir, label=label,
                               device=loaded.device, data=train_data, data_cfg=data, heldout=heldout)
    finally:
        del loaded
        if torch.cuda.is_available():
            gc.collect()
            torch.cuda.empty_cache()
