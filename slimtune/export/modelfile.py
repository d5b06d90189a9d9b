"""An Ollama ``Modelfile`` next to an exported GGUF: FROM, the chat template in Ollama's Go-template syntax, stops.

Ollama renders prompts with Go templates (``{{ .System }}``, ``{{ range .Messages }}``), not Jinja, so the model's
Jinja chat template is recognised by its markers and replaced by the equivalent Go template for the families we
know (ChatML: Qwen2, SmolLM2; Llama 3; Mistral/Llama-2 ``[INST]``). An unknown template gets no TEMPLATE line
(Ollama then falls back to its own detection from the GGUF's ``tokenizer.chat_template``).
"""

from __future__ import annotations

from pathlib import Path

CHATML = (
    "{{- if .System }}<|im_start|>system\n{{ .System }}<|im_end|>\n{{ end }}"
    "{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}"
    "<|im_start|>assistant\n"
)
LLAMA3 = (
    "{{- if .System }}<|start_header_id|>system<|end_header_id|>\n\n{{ .System }}<|eot_id|>{{ end }}"
    "{{- range .Messages }}<|start_header_id|>{{ .Role }}<|end_header_id|>\n\n{{ .Content }}<|eot_id|>{{ end }}"
    "<|start_header_id|>assistant<|end_header_id|>\n\n"
)
INST = (
    "{{- if .System }}[INST] {{ .System }} [/INST]{{ end }}"
    "{{- range .Messages }}{{ if eq .Role \"user\" }}[INST] {{ .Content }} [/INST]"
    "{{ else if eq .Role \"assistant\" }}{{ .Content }}</s>{{ end }}{{ end }}"
)
FAMILIES = (  # (marker in the Jinja template, family, Go template, stop strings)
    ("<|im_start|>", "chatml", CHATML, ("<|im_start|>", "<|im_end|>")),
    ("<|start_header_id|>", "llama3", LLAMA3, ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")),
    ("[INST]", "inst", INST, ("[INST]", "[/INST]")),
)


def template_family(chat_template: str | None) -> tuple[str, str, tuple[str, ...]] | None:
    """(family, Ollama template, stop strings) for a known Jinja chat template, else None."""
    if not chat_template:
        return None
    for marker, family, go, stops in FAMILIES:
        if marker in chat_template:
            return family, go, stops
    return None


def write_modelfile(gguf_path: Path, chat_template: str | None, *, eos_token: str | None = None,
                    context_length: int | None = None, system: str | None = None) -> Path:
    """Write ``<gguf stem>.Modelfile`` beside ``gguf_path`` (one per GGUF: several quants can share a folder) and
    return its path."""
    gguf_path = Path(gguf_path)
    path = gguf_path.with_name(gguf_path.stem + ".Modelfile")
    lines = [f"# Ollama Modelfile written by slimtune. Import: ollama create NAME -f {path}",
             f"FROM ./{gguf_path.name}", ""]
    fam = template_family(chat_template)
    stops: list[str] = []
    if fam is not None:
        family, go, fam_stops = fam
        lines += [f"# chat template: {family} (translated from the model's Jinja template)", f'TEMPLATE """{go}"""', ""]
        stops += fam_stops
    else:
        lines += ["# chat template: not a known family; Ollama reads tokenizer.chat_template from the GGUF", ""]
    if eos_token and eos_token not in stops:
        stops.append(eos_token)
    if system:
        lines += [f'SYSTEM """{system}"""', ""]
    lines += [f'PARAMETER stop "{s}"' for s in stops]
    lines += ["PARAMETER temperature 0.7", "PARAMETER top_p 0.9", "PARAMETER repeat_penalty 1.1"]
    if context_length:
        lines.append(f"PARAMETER num_ctx {min(int(context_length), 4096)}")
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def ollama_command(modelfile: Path, name: str) -> str:
    """The one line that imports the model into Ollama."""
    return f"ollama create {name} -f {modelfile}"
