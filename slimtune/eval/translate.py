"""Translation eval: prompt the model with each source segment, score the outputs with BLEU and chrF."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from slimtune.config.eval import DEFAULT_TRANSLATION_PROMPT
from slimtune.eval.generate import generate
from slimtune.eval.metrics import bleu, chrf

# ISO 639-3 codes (FLORES codes are `<iso639-3>_<script>`) of the languages the shipped recipes use.
LANGUAGE_NAMES = {
    "eng": "English",
    "src": "Sardinian",
    "srd": "Sardinian",
    "sc": "Sardinian",
    "nld": "Dutch",
    "glg": "Galician",
    "swh": "Swahili",
    "swa": "Swahili",
    "urd": "Urdu",
    "ita": "Italian",
    "spa": "Spanish",
    "cat": "Catalan",
    "fra": "French",
    "deu": "German",
    "por": "Portuguese",
    "ron": "Romanian",
    "en": "English",
    "nl": "Dutch",
    "gl": "Galician",
    "sw": "Swahili",
    "ur": "Urdu",
    "it": "Italian",
    "es": "Spanish",
    "ca": "Catalan",
}


def language_name(code: str) -> str:
    """`eng_Latn` / `eng` / `en` → English; unknown codes (or names) come back unchanged."""
    return LANGUAGE_NAMES.get(code.split("_")[0].lower(), code)


def fill_prompt(template: str, *, src_lang: str, tgt_lang: str, text: str) -> str:
    """Substitute {src_lang}, {tgt_lang}, {text}; other braces in the template or the text are left alone."""
    return template.replace("{src_lang}", src_lang).replace("{tgt_lang}", tgt_lang).replace("{text}", text)


def translation_eval(
    model: torch.nn.Module,
    tokenizer,
    pairs: Sequence[tuple[str, str]],
    *,
    src_lang: str,
    tgt_lang: str,
    prompt: str = DEFAULT_TRANSLATION_PROMPT,
    max_new_tokens: int = 256,
    batch_size: int = 4,
    device: torch.device | str | None = None,
    chat_template: bool = True,
    system: str | None = None,
    bleu_tokenize: str = "13a",
    examples: int = 3,
) -> dict:
    """{"bleu", "chrf", "n", "examples": [{"src", "ref", "hyp"}]} for (source, reference) pairs, greedy decoding.

    `src_lang` / `tgt_lang` are the language names written into the prompt.
    """
    pairs = [(s, r) for s, r in pairs]
    prompts = [fill_prompt(prompt, src_lang=src_lang, tgt_lang=tgt_lang, text=s) for s, _ in pairs]
    hyps = generate(
        model,
        tokenizer,
        prompts,
        max_new_tokens=max_new_tokens,
        batch_size=batch_size,
        device=device,
        chat_template=chat_template,
        system=system,
    )
    refs = [r for _, r in pairs]
    return {
        "bleu": bleu(hyps, refs, tokenize=bleu_tokenize),
        "chrf": chrf(hyps, refs),
        "n": len(pairs),
        "examples": [{"src": s, "ref": r, "hyp": h} for (s, r), h in list(zip(pairs, hyps))[:examples]],
    }
