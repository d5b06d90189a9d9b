"""LoRAM as one recipe: prune → (align) → train (Q)LoRA on the pruned model → recover → merge → eval (DESIGN §2)

A recipe with a top-level ``loram:`` block runs through `run_loram` (``slimtune run`` dispatches here):

1. prune: the recipe's base → ``<run>/pruned`` (or ``loram.pruned_dir``): a safetensors checkpoint folder (local, or
   a hub snapshot) is pruned layer by layer without building the model (`prune_checkpoint`); a GGUF file or a
   folder of .bin weights is loaded unquantized and pruned in memory (`prune_model`). The recipe's tokenizer is
   saved next to the weights. `parameter_reduction` (the paper's figure and the NF4 one) goes into the summary.
2. align (``loram.align``, optional): continued pretraining of the pruned model (`slimtune.loram.align`) →
   ``<run>/aligned`` (or ``loram.align.dir``).
3. train: the recipe itself, with the (aligned) pruned folder as its base, runs through the normal runner in
   ``<run>/train`` (stages, checkpoints, --resume, before/after evaluation of the pruned model all as usual;
   ``quant: nf4`` makes it QLoRAM). The model loader recognises a pruned folder by its loram.json.
4. recover: the trained PEFT adapter(s) → adapters for the ORIGINAL model (`recover_adapter`) in
   ``<run>/adapter_recovered`` (one sub-folder per adapter when stages stack merged adapters).
5. merge: the recovered adapter(s) added to the original weights → ``<run>/merged`` (safetensors + config +
   tokenizer; streamed shard by shard for a safetensors original, so a 70B merge needs one shard of memory).
6. eval: the original model and the merged model (both loaded as the recipe's ``quant``), each with the recipe's
   ``eval:`` section and the loss on the training data's held-out records (``data.holdout``).

Every step is skipped when its output is already there (pruned/aligned folders hold a summary file written last;
training stages have their stage_summary.json; merge and eval are keyed by a digest of the recovered adapters, eval
also by its settings), so
re-running the recipe (or ``--resume`` after an interruption) redoes nothing finished.

Adapter chains: with ``stages``, ``start_from: base`` restarts from the pruned base, ``adapter`` keeps training the
previous adapter, ``merged`` stacks a new adapter on the previous one; the adapters of the final chain are each
recovered and added to the original in order (ΔW of a sum is the sum of the recovered ΔW on the kept channels).
"""

from __future__ import annotations

import gc
import hashlib
import json
import shutil
import time
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from slimtune.config.recipe import resolve_path
from slimtune.errors import ModelError, SlimtuneError
from slimtune.eval.model_eval import evaluate_model
from slimtune.eval.runner import write_report
from slimtune.export.source import read_peft
from slimtune.io import atomic_dir
from slimtune.loram.align import align_pruned
from slimtune.loram.prune import parameter_reduction, prune_checkpoint, prune_model, validate_prune_args
from slimtune.loram.recover import recover_adapter
from slimtune.models.load import DTYPES, QuantConfig, _split_source, load_model, load_tokenizer
from slimtune.models.prequantized import read_bnb_4bit_config
from slimtune.models.pruned import KeptIndex, save_pruned
from slimtune.train.distributed import barrier, is_main
from slimtune.train.merge import make_saveable
from slimtune.train.report import SilentReporter
from slimtune.train.runner import run_recipe
from slimtune.train.stages import stage_folder

__all__ = [
    "PRUNE_SUMMARY",
    "apply_peft_deltas",
    "merge_recovered",
    "prune_to_folder",
    "run_loram",
]

PRUNE_SUMMARY = "prune_summary.json"
STATE_FILE = "loram_state.json"
PEFT_CONFIG = "adapter_config.json"
PEFT_WEIGHTS = "adapter_model.safetensors"
_SNAPSHOT_PATTERNS = ["*.json", "*.safetensors", "*.model", "*.txt", "*.tiktoken", "tokenizer*"]


# --------------------------------------------------------------------------------------------------- helpers


def _log(reporter, msg: str) -> None:
    if reporter is not None:
        reporter.log(msg)


def _free() -> None:
    """Give a dropped model's memory back to the GPU (CPU memory returns on its own: no slow full gc there)."""
    if torch.cuda.is_available():
        gc.collect()
        torch.cuda.empty_cache()


def original_checkpoint(model_cfg) -> Path | None:
    """The original model as a local safetensors folder (a folder, or a hub snapshot fetched with
    `huggingface_hub.snapshot_download`), or None when it is a GGUF file, a folder without safetensors or a
    pre-quantized bitsandbytes 4-bit checkpoint (those are loaded into memory instead, the 4-bit weights dequantized)."""
    src, extra = _split_source(model_cfg.name)
    if extra:  # GGUF
        return None
    path = Path(src)
    if path.is_dir():
        has = (path / "model.safetensors").is_file() or (path / "model.safetensors.index.json").is_file()
        return path if has and read_bnb_4bit_config(src, model_cfg) is None else None
    try:
        from huggingface_hub import snapshot_download

        path = Path(snapshot_download(src, revision=model_cfg.revision, allow_patterns=_SNAPSHOT_PATTERNS))
    except Exception as err:  # noqa: BLE001 - hub errors come in many types; the user needs one line
        raise ModelError(f"model.name: cannot fetch {model_cfg.name} from the hub "
                         f"({type(err).__name__}: {err})") from err
    return path if read_bnb_4bit_config(str(path), model_cfg) is None else None


# --------------------------------------------------------------------------------------------------- 1. prune


def _prune_settings(lc) -> dict[str, Any]:
    return {"ratio": float(lc.ratio), "method": lc.method, "keep_first": lc.keep_first, "keep_last": lc.keep_last,
            "seed": lc.seed if lc.method == "random" else None}


def prune_to_folder(model_cfg, lc, out_dir: str | Path, *, reporter=None) -> dict[str, Any]:
    """Prune the base named by `model_cfg` with the settings of `lc` (a LoramConfig or anything with ratio, method,
    keep_first, keep_last, seed) into `out_dir`. Returns the prune summary (settings, source, parameter_reduction).
    A finished pruned folder there with the same source and settings is reused; a different one is an error."""
    out = Path(out_dir)
    validate_prune_args(lc.ratio, lc.method, lc.keep_first, lc.keep_last)  # fail before any download or load
    settings = _prune_settings(lc)
    done = out / PRUNE_SUMMARY
    if done.is_file():
        summary = json.loads(done.read_text())
        if summary.get("settings") != settings or summary.get("source") != model_cfg.name:
            raise SlimtuneError(
                f"{out}: holds {summary.get('source')} pruned with {summary.get('settings')}, not {model_cfg.name} "
                f"with {settings}; delete the folder or point loram.pruned_dir elsewhere"
            )
        _log(reporter, f"LoRAM prune: already done ({done}), reused")
        return summary

    t0 = time.perf_counter()
    with atomic_dir(out) as tmp:
        ckpt = original_checkpoint(model_cfg)
        kw = dict(ratio=lc.ratio, method=lc.method, keep_first=lc.keep_first, keep_last=lc.keep_last, seed=lc.seed)
        if ckpt is not None:
            _log(reporter, f"LoRAM prune: {model_cfg.name} at ratio {lc.ratio} ({lc.method}), streaming {ckpt}")
            kept = prune_checkpoint(ckpt, tmp, **kw)
            how = "checkpoint"
        else:
            _log(reporter, f"LoRAM prune: loading {model_cfg.name} unquantized to prune at ratio {lc.ratio} "
                           f"({lc.method})")
            loaded = load_model(model_cfg, QuantConfig(mode="none", compute_dtype="float32"), device="cpu")
            model, kept = prune_model(make_saveable(loaded.model), **kw)
            save_pruned(model, kept, tmp)
            del model, loaded
            _free()
            how = "in memory"
        kept.base_model_name_or_path = model_cfg.name
        kept.save(tmp)
        load_tokenizer(model_cfg).save_pretrained(tmp)  # the recipe's tokenizer travels with the pruned weights
        reduction = parameter_reduction(kept.original_config, kept, quant_bits=4)
        summary = {
            "source": model_cfg.name,
            "settings": settings,
            "how": how,
            "pruned_layers": sorted(kept.layers),
            "kept_kv_heads": {str(i): len(v.kv_heads) for i, v in sorted(kept.layers.items())},
            "kept_neurons": {str(i): len(v.neurons) for i, v in sorted(kept.layers.items())},
            "geometry": kept.geometry.as_dict(),
            "reduction": reduction,
            "wall_seconds": round(time.perf_counter() - t0, 2),
        }
        (tmp / PRUNE_SUMMARY).write_text(json.dumps(summary, indent=2))
    _log(reporter, "LoRAM prune: " + describe_reduction(reduction))
    return summary


def describe_reduction(red: dict[str, Any]) -> str:
    """One line: parameters original → pruned and the reduction factors (the paper's convention and NF4 bytes)."""
    line = (f"{red['original_params'] / 1e6:,.1f}M → {red['pruned_params'] / 1e6:,.1f}M parameters "
            f"({red['param_reduction']:.2f}× fewer)")
    if "paper_reduction" in red:
        line += (f"; 4-bit pruned vs 16-bit original: {red['paper_reduction']:.2f}× (paper's convention), "
                 f"{red['memory_reduction']:.2f}× in NF4 bytes ({red['original_bytes_bf16'] / 2**30:.2f} GiB → "
                 f"{red['pruned_bytes'] / 2**30:.2f} GiB)")
    return line


# --------------------------------------------------------------------------------------------------- 3. train


def _check_trainable_on_pruned(recipe, kept) -> None:
    """Refuse, before any training, what recovery cannot expand exactly (see slimtune.loram.recover)."""
    pruned = set(kept.layers)
    for stage, r in recipe.resolved_stages():
        a = r.adapter
        where = "adapter" if stage.adapter is None else f"stages.{stage.name}.adapter"
        full = [m for m in a.modules_to_save if m.rsplit(".", 1)[-1] in kept.spec.proj_names]
        if full:
            raise SlimtuneError(f"{where}.modules_to_save: {full[0]} is a pruned projection; LoRAM cannot recover "
                                "its full weights (train embed_tokens/lm_head/norms only)")
        if a.kind == "dora" and pruned & set(a.layer_indices(kept.geometry.num_layers)):
            raise SlimtuneError(f"{where}.kind: DoRA on pruned layers cannot be recovered (its row norms do not "
                                "decompose over pruned channels); use lora/rslora or restrict adapter.layers to the "
                                "kept_first/keep_last layers")
        kind = getattr(stage, "kind", "train")
        if kind != "train":
            raise SlimtuneError(f"stages.{stage.name}.kind: {kind!r}; a LoRAM recipe runs training stages only")


def _train_recipe(recipe, model_dir: Path, train_dir: Path):
    """The recipe with the pruned folder as base, writing to train_dir, always exporting PEFT adapters."""
    out = recipe.output.model_copy(update={"dir": str(train_dir).replace("{", "{{").replace("}", "}}"),
                                           "export_peft": True})
    stages = [s if s.output is None else s.model_copy(update={"output": s.output.model_copy(
        update={"export_peft": True})}) for s in recipe.stages]
    model = recipe.model.model_copy(update={"name": str(model_dir), "tokenizer": None, "revision": None})
    return recipe.model_copy(update={"loram": None, "model": model, "output": out, "stages": stages})


def adapter_chain(recipe, train_dir: Path) -> list[tuple[str, Path]]:
    """(stage name, PEFT adapter folder) of the adapters that make up the final model, in the order applied."""
    stages = recipe.resolved_stages()
    chain: list[tuple[str, Path]] = []
    for stage, _ in stages:
        entry = (stage.name, stage_folder(recipe, stage, train_dir, len(stages)) / "adapter")
        if stage.start_from == "merged" and chain:
            chain.append(entry)
        elif stage.start_from in ("adapter", "stacked") and chain:  # stacked: its PEFT export holds Δ₁ + Δ₂
            chain[-1] = entry
        else:
            chain = [entry]
    return chain


# --------------------------------------------------------------------------------------------------- 5. merge


def apply_peft_deltas(weights: dict[str, torch.Tensor], peft_dir: Path) -> list[str]:
    """Add a PEFT LoRA adapter (``slimtune.export.source.read_peft``) to the matching `<module>.weight` entries of
    `weights` (in place, computed in float32, stored back in each tensor's dtype); full tensors (modules_to_save)
    replace theirs. DoRA: ``slimtune.adapters.dora.dora_merge``. Returns the keys changed; keys of `weights`
    absent here are left for another shard."""
    adapter = read_peft(Path(peft_dir))
    changed = []
    for module, delta in adapter.deltas.items():
        key = f"{module}.weight"
        if key in weights:
            w = weights[key]
            weights[key] = delta.apply(w.float()).to(w.dtype)
            changed.append(key)
    for key, t in adapter.saved.items():
        if key in weights:
            weights[key] = t.to(weights[key].dtype)
            changed.append(key)
    return changed


def _expected_keys(peft_dirs: list[Path]) -> set[str]:
    keys: set[str] = set()
    for d in peft_dirs:
        adapter = read_peft(d)
        keys |= {f"{m}.weight" for m in adapter.deltas} | set(adapter.saved)
    return keys


def merge_recovered(model_cfg, peft_dirs: list[Path], out_dir: str | Path, *, dtype: str = "bfloat16",
                    reporter=None) -> Path:
    """Write the original model with the recovered PEFT adapters added (in order) to `out_dir`.

    A safetensors original is streamed shard by shard (memory: one shard); a GGUF/.bin original is loaded
    unquantized in float32, merged and saved with `save_pretrained`. Weights are written in `dtype`."""
    out, target = Path(out_dir), DTYPES[dtype]
    with atomic_dir(out) as tmp:
        want = _expected_keys(peft_dirs)
        changed: set[str] = set()
        ckpt = original_checkpoint(model_cfg)
        if ckpt is not None:
            _log(reporter, f"LoRAM merge: streaming {ckpt} shard by shard")
            index = ckpt / "model.safetensors.index.json"
            files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.is_file() else [
                "model.safetensors"]
            weight_map, total = {}, 0
            for fname in files:
                with safe_open(str(ckpt / fname), "pt") as f:
                    weights = {k: f.get_tensor(k) for k in f.keys()}
                for d in peft_dirs:
                    changed.update(apply_peft_deltas(weights, d))
                weights = {k: (v.to(target) if v.is_floating_point() else v).contiguous() for k, v in weights.items()}
                save_file(weights, str(tmp / fname), metadata={"format": "pt"})
                for k, v in weights.items():
                    weight_map[k] = fname
                    total += v.numel() * v.element_size()
                del weights
            if index.is_file():
                (tmp / index.name).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map},
                                                         indent=1))
            for item in ckpt.iterdir():
                if item.is_file() and not item.name.endswith((".safetensors", ".bin", ".pt", ".index.json")):
                    shutil.copy2(item, tmp / item.name)
            cfg_path = tmp / "config.json"
            if cfg_path.is_file():
                cfg = json.loads(cfg_path.read_text())
                cfg["torch_dtype"] = cfg["dtype"] = dtype
                cfg_path.write_text(json.dumps(cfg, indent=2))
        else:
            _log(reporter, f"LoRAM merge: loading {model_cfg.name} unquantized")
            loaded = load_model(model_cfg, QuantConfig(mode="none", compute_dtype="float32"), device="cpu")
            model = make_saveable(loaded.model)
            params = dict(model.named_parameters())
            weights = {k: p.data for k, p in params.items()}
            for d in peft_dirs:
                changed.update(apply_peft_deltas(weights, d))
            with torch.no_grad():
                for k in changed:
                    params[k].data.copy_(weights[k])
            model = model.to(target)
            model.config.use_cache = True
            model.save_pretrained(tmp, safe_serialization=True)
            del model, loaded, weights, params
            _free()
        missing = sorted(want - changed)
        if missing:
            raise SlimtuneError(f"LoRAM merge: the original model has no weight {missing[0]} (and {len(missing) - 1} "
                                "more) that the recovered adapter changes")
        load_tokenizer(model_cfg).save_pretrained(tmp)
    return out


# --------------------------------------------------------------------------------------------------- 6. eval


def _eval_model(name: str, label: str, recipe, base_dir: Path, holdout_cfg, reporter) -> dict[str, Any]:
    """Load `name` as the recipe's quant says, run the recipe's eval section and the held-out loss."""
    model_cfg = recipe.model if name == recipe.model.name else recipe.model.model_copy(
        update={"name": name, "tokenizer": None, "revision": None})
    _log(reporter, f"LoRAM eval: {label} ({name}, quant {recipe.quant.mode})")
    data_cfg, seed = holdout_cfg if holdout_cfg is not None else (None, 0)
    res = evaluate_model(model_cfg, recipe.quant, recipe.eval, base_dir=base_dir, label=label,
                         device=recipe.train.device, data=data_cfg, seed=seed, heldout=holdout_cfg is not None)
    result: dict[str, Any] = {"label": label, "model": name}
    if "heldout" in res:
        result["heldout"] = res.pop("heldout")
    if recipe.eval is not None:
        result["eval"] = res
    return result


def _digest(paths: list[Path]) -> str:
    h = hashlib.sha256()
    for p in paths:
        for f in (PEFT_CONFIG, PEFT_WEIGHTS):
            h.update((p / f).read_bytes())
    return h.hexdigest()[:16]


# --------------------------------------------------------------------------------------------------- the pipeline


def run_loram(recipe, *, base_dir: Path, reporter=None, resume: bool | Path = False,
              stop_after: int | None = None, callbacks: list | None = None) -> dict[str, Any]:
    """Run the LoRAM pipeline of a recipe with a ``loram`` block (module docstring). Returns the run summary (also
    written to <run>/run_summary.json): the training stages as `run_recipe` reports them, plus ``loram``."""
    lc = recipe.loram
    if lc is None:
        raise SlimtuneError("run_loram: the recipe has no loram section")
    reporter = reporter or SilentReporter()
    base_dir = Path(base_dir)
    run_dir = recipe.run_dir()
    if is_main():  # torchrun: rank 0 alone writes; the others wait where they read what it wrote
        run_dir.mkdir(parents=True, exist_ok=True)
    info: dict[str, Any] = {"timings": {}}
    t0 = time.perf_counter()

    # 1. prune
    pruned_dir = resolve_path(lc.pruned_dir, base_dir) if lc.pruned_dir else run_dir / "pruned"
    if not is_main():
        barrier()  # torchrun: rank 0 prunes (below: after this barrier the folder is done and only read here)
    prune = prune_to_folder(recipe.model, lc, pruned_dir, reporter=reporter)
    if is_main():
        barrier()
    info["pruned_dir"], info["prune"] = str(pruned_dir), prune
    info["timings"]["prune"] = round(time.perf_counter() - t0, 2)
    kept = KeptIndex.load(pruned_dir)
    _check_trainable_on_pruned(recipe, kept)

    # 2. align
    model_dir = pruned_dir
    if lc.align is not None:
        t = time.perf_counter()
        model_dir = resolve_path(lc.align.dir, base_dir) if lc.align.dir else run_dir / "aligned"
        info["align"] = align_pruned(pruned_dir, model_dir, lc.align, base_dir=base_dir, reporter=reporter,
                                     attn_implementation=recipe.model.attn_implementation, resume=bool(resume),
                                     callbacks=callbacks)
        info["aligned_dir"] = str(model_dir)
        info["timings"]["align"] = round(time.perf_counter() - t, 2)
        if info["align"].get("interrupted"):  # SIGINT/SIGTERM during alignment: its checkpoint is saved
            result = {"stages": [info["align"]], "interrupted": True, "run_dir": str(run_dir), "loram": info}
            if is_main():
                (run_dir / "run_summary.json").write_text(json.dumps(result, indent=2, default=str))
            return result

    # 3. train (Q)LoRA on the pruned model: the normal runner
    t = time.perf_counter()
    train_dir = run_dir / "train"
    train_recipe = _train_recipe(recipe, model_dir, train_dir)
    trained = run_recipe(train_recipe, base_dir=base_dir, reporter=reporter, resume=resume, stop_after=stop_after,
                         callbacks=callbacks)
    info["timings"]["train"] = round(time.perf_counter() - t, 2)
    result = {"stages": trained["stages"], "interrupted": trained["interrupted"], "run_dir": str(run_dir),
              "loram": info}
    if trained["interrupted"]:
        if is_main():
            (run_dir / "run_summary.json").write_text(json.dumps(result, indent=2, default=str))
        return result
    if not is_main():  # torchrun: recover, merge and evaluate need no other rank; rank 0 does them alone
        return result

    # 4. recover
    chain = adapter_chain(train_recipe, train_dir)
    rec_root = run_dir / "adapter_recovered"
    recovered: list[Path] = []
    for name, peft_dir in chain:
        dest = rec_root if len(chain) == 1 else rec_root / name
        recovered.append(recover_adapter(peft_dir, kept, dest, base_model_name_or_path=recipe.model.name))
    info["recovered"] = [str(p) for p in recovered]
    _log(reporter, f"LoRAM recover: {len(recovered)} adapter(s) for {recipe.model.name} in {rec_root}")

    state_path = run_dir / STATE_FILE
    digest = _digest(recovered)
    state = json.loads(state_path.read_text()) if state_path.is_file() else {}
    if state.get("digest") != digest:
        state = {"digest": digest}

    # 5. merge into the original model
    merged_dir = run_dir / "merged"
    if lc.merge:
        if state.get("merged") and merged_dir.is_dir():
            _log(reporter, f"LoRAM merge: already done ({merged_dir}), reused")
        else:
            t = time.perf_counter()
            merge_recovered(recipe.model, recovered, merged_dir, dtype=recipe.output.merged_dtype, reporter=reporter)
            state["merged"] = str(merged_dir)
            info["timings"]["merge"] = round(time.perf_counter() - t, 2)
            state_path.write_text(json.dumps(state, indent=2))
        info["merged"] = str(merged_dir)

    # 6. eval of the ORIGINAL model before/after
    last = recipe.resolved_stages()[-1][1]
    holdout_cfg = (last.data, last.train.seed) if last.data is not None and last.data.holdout else None
    if holdout_cfg is not None or last.eval is not None:  # the last stage's eval and held-out data
        eval_key = hashlib.sha256(json.dumps([
            last.eval.model_dump(mode="json") if last.eval is not None else None,
            holdout_cfg[0].model_dump(mode="json") if holdout_cfg else None, holdout_cfg and holdout_cfg[1],
            last.quant.model_dump(mode="json"), lc.merge], sort_keys=True).encode()).hexdigest()[:16]
        if state.get("eval_key") != eval_key:
            state.pop("eval", None)
        if "eval" not in state:
            t = time.perf_counter()
            evals = {"original": _eval_model(last.model.name, "original", last, base_dir, holdout_cfg, reporter)}
            if lc.merge:
                evals["merged"] = _eval_model(str(merged_dir), "original + recovered adapter", last, base_dir,
                                              holdout_cfg, reporter)
            state["eval"], state["eval_key"] = evals, eval_key
            info["timings"]["eval"] = round(time.perf_counter() - t, 2)
            state_path.write_text(json.dumps(state, indent=2, default=str))
        else:
            _log(reporter, f"LoRAM eval: already done ({state_path}), reused")
        info["eval"] = state["eval"]
        _write_report(trained, state["eval"], run_dir)
        before, after = state["eval"]["original"].get("heldout"), state["eval"].get("merged", {}).get("heldout")
        if before and after:
            _log(reporter, f"LoRAM eval: held-out loss of the original model {before['loss']:.4f} → "
                           f"{after['loss']:.4f} with the recovered adapter")
    info["timings"]["total"] = round(time.perf_counter() - t0, 2)
    (run_dir / "run_summary.json").write_text(json.dumps(result, indent=2, default=str))
    return result


def _write_report(trained: dict, evals: dict, run_dir: Path) -> None:
    """<run>/eval.json + eval.md: the pruned model before/after training (from the stages) and the original model
    before/after the recovered adapter, side by side (held-out loss as a perplexity row)."""
    rows: dict[str, dict] = {}
    for s in trained["stages"]:
        for label, res in (s.get("eval") or {}).items():
            rows[f"pruned {label}"] = {**res, "label": f"pruned {label}"}
    for res in evals.values():
        r = dict(res.get("eval") or {"label": res["label"], "metrics": {}, "perplexity": {}, "translation": {},
                                     "exact_match": {}, "generations": []})
        r = {**r, "metrics": dict(r.get("metrics", {}))}
        if res.get("heldout"):
            r["metrics"]["perplexity/held-out (data.holdout)"] = res["heldout"]["ppl"]
        rows[res["label"]] = r
    if rows:
        write_report(rows, run_dir)
