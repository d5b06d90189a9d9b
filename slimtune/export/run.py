"""A run's adapter to GGUF files: what `slimtune export --format gguf|gguf-lora` and a recipe's ``output.gguf`` do."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from slimtune.errors import SlimtuneError
from slimtune.export.gguf_export import FILE_TYPES, GGUFExport, export_gguf, resolve_base
from slimtune.export.lora_gguf import export_lora_gguf
from slimtune.export.modelfile import ollama_command, write_modelfile
from slimtune.export.source import read_peft
from slimtune.models.load import ModelConfig, load_tokenizer


@dataclass
class GGUFFiles:
    """What was written: the merged GGUF (+ its Modelfile and import command) and/or the LoRA GGUF."""

    gguf: GGUFExport | None = None
    modelfile: Path | None = None
    ollama: str | None = None
    lora: Path | None = None


def trained_tokenizer(peft_dir: Path, base: str):
    """The tokenizer saved with the run's PEFT export (it carries the chat template trained with), else the base's."""
    if (Path(peft_dir) / "tokenizer_config.json").is_file():
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(str(peft_dir))
    return load_tokenizer(ModelConfig(name=base))


def default_system_prompt(tok) -> str | None:
    """The system prompt a ChatML template inserts when the conversation has none (SmolLM2's does), so Ollama's
    SYSTEM default reproduces the prompts the model was trained on."""
    if not isinstance(getattr(tok, "chat_template", None), str) or "<|im_start|>" not in tok.chat_template:
        return None
    text = tok.apply_chat_template([{"role": "user", "content": "x"}], tokenize=False)
    m = re.search(r"<\|im_start\|>system\n(.*?)<\|im_end\|>", text, flags=re.S)
    return m.group(1) if m else None


def export_adapter_gguf(
    peft_dir: Path, base: str, out: Path, *, name: str, quant: str | None = "Q4_K_M", lora: bool = False,
    onto: str = "original", progress: Callable[[str], None] | None = None,
) -> GGUFFiles:
    """Write ``out/<name>-<quant>.gguf`` + ``.Modelfile`` (``quant`` not None) and ``out/<name>-lora.gguf`` (``lora``)
    for the PEFT adapter in ``peft_dir`` on ``base``. Names and quant types are checked before any work."""
    if quant is not None and quant not in FILE_TYPES:
        raise SlimtuneError(f"--quant {quant}: choose one of {', '.join(FILE_TYPES)}")
    peft = read_peft(Path(peft_dir))
    files = GGUFFiles()
    out = Path(out)
    if lora:
        files.lora = export_lora_gguf(base, peft, out / f"{name}-lora.gguf")
    if quant is None:
        return files
    tok = trained_tokenizer(Path(peft_dir), base)
    files.gguf = export_gguf(base, peft, out / f"{name}-{quant}.gguf", quant=quant, onto=onto, tokenizer=tok,
                             progress=progress)
    from transformers import AutoConfig

    folder, extra = resolve_base(base)
    ctx = getattr(AutoConfig.from_pretrained(str(folder), **extra), "max_position_embeddings", None)
    template = tok.chat_template if isinstance(getattr(tok, "chat_template", None), str) else None
    files.modelfile = write_modelfile(files.gguf.path, template, eos_token=tok.eos_token, context_length=ctx,
                                      system=default_system_prompt(tok))
    files.ollama = ollama_command(files.modelfile, name.lower())
    return files
