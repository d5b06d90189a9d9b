"""Built-in chat templates (`data.chat_template: <name>`) and template files (`data.chat_template: x.jinja`).

A base model usually ships no chat template; SFT then needs one chosen here. Each built-in template is
prefix-stable (rendering a conversation prefix gives a prefix of the full rendering), which is what the loss mask
of `slimtune.data.chat` needs, and ends every assistant turn with the end-of-turn token of its family (or the eos
token for alpaca and mistral). The formats are the public prompt formats of each family:

- chatml: `<|im_start|>role\\n...<|im_end|>\\n` (Qwen, SmolLM2, many fine-tunes)
- llama3: `<|start_header_id|>role<|end_header_id|>\\n\\n...<|eot_id|>`
- alpaca: `### Instruction:` / `### Response:` blocks, eos after each response (works on any base vocabulary)
- mistral: `[INST] ... [/INST] answer</s>` (the system prompt joins the first user turn)
- gemma: `<start_of_turn>user|model\\n...<end_of_turn>\\n` (the system prompt joins the first user turn)
- phi3: `<|role|>\\n...<|end|>\\n`

The template chosen is set on the tokenizer, so it is saved with the adapter and the merged model.
"""

from __future__ import annotations

from pathlib import Path

from slimtune.errors import DataError, ModelError

_SYSTEM_INTO_FIRST_USER = (  # mistral and gemma have no system role: prepend it to the first user message
    "{%- set ns = namespace(system='') -%}"
)

TEMPLATES: dict[str, str] = {
    "chatml": (
        "{%- for m in messages -%}"
        "{{- '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>' + '\\n' -}}"
        "{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
    ),
    "llama3": (
        "{{- bos_token -}}"
        "{%- for m in messages -%}"
        "{{- '<|start_header_id|>' + m['role'] + '<|end_header_id|>\\n\\n' + m['content'] | trim + '<|eot_id|>' -}}"
        "{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' -}}{%- endif -%}"
    ),
    "alpaca": (
        "{%- if messages and messages[0]['role'] == 'system' -%}"
        "{{- messages[0]['content'] + '\\n\\n' -}}{%- set rest = messages[1:] -%}"
        "{%- else -%}"
        "{{- 'Below is an instruction that describes a task. Write a response that appropriately completes the "
        "request.\\n\\n' -}}{%- set rest = messages -%}"
        "{%- endif -%}"
        "{%- for m in rest -%}"
        "{%- if m['role'] == 'assistant' -%}{{- '### Response:\\n' + m['content'] + eos_token + '\\n\\n' -}}"
        "{%- else -%}{{- '### Instruction:\\n' + m['content'] + '\\n\\n' -}}{%- endif -%}"
        "{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{- '### Response:\\n' -}}{%- endif -%}"
    ),
    "mistral": (
        _SYSTEM_INTO_FIRST_USER + "{{- bos_token -}}"
        "{%- for m in messages -%}"
        "{%- if m['role'] == 'system' -%}{%- set ns.system = m['content'] + '\\n\\n' -%}"
        "{%- elif m['role'] == 'assistant' -%}{{- ' ' + m['content'] + eos_token -}}"
        "{%- else -%}{{- '[INST] ' + ns.system + m['content'] + ' [/INST]' -}}{%- set ns.system = '' -%}"
        "{%- endif -%}"
        "{%- endfor -%}"
    ),
    "gemma": (
        _SYSTEM_INTO_FIRST_USER + "{{- bos_token -}}"
        "{%- for m in messages -%}"
        "{%- if m['role'] == 'system' -%}{%- set ns.system = m['content'] + '\\n\\n' -%}"
        "{%- elif m['role'] == 'assistant' -%}{{- '<start_of_turn>model\\n' + m['content'] + '<end_of_turn>\\n' -}}"
        "{%- else -%}{{- '<start_of_turn>user\\n' + ns.system + m['content'] + '<end_of_turn>\\n' -}}"
        "{%- set ns.system = '' -%}"
        "{%- endif -%}"
        "{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{- '<start_of_turn>model\\n' -}}{%- endif -%}"
    ),
    "phi3": (
        "{%- for m in messages -%}"
        "{{- '<|' + m['role'] + '|>\\n' + m['content'] + '<|end|>\\n' -}}"
        "{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{- '<|assistant|>\\n' -}}{%- endif -%}"
    ),
}

CHOICES = ", ".join(TEMPLATES)


def resolve_template(spec: str, base_dir: Path | None = None) -> str:
    """The Jinja text of `spec`: a built-in name or a .jinja file (relative to `base_dir`, else the cwd)."""
    if spec in TEMPLATES:
        return TEMPLATES[spec]
    p = Path(spec).expanduser()
    if not p.is_absolute() and base_dir is not None and (Path(base_dir) / p).is_file():
        p = Path(base_dir) / p
    if p.suffix in (".jinja", ".j2", ".jinja2") or p.is_file():
        if not p.is_file():
            raise DataError(f"data.chat_template: {spec}: no such file")
        return p.read_text(encoding="utf-8")
    raise DataError(f"data.chat_template: unknown template {spec!r} (one of {CHOICES}, or a .jinja file)")


def set_chat_template(tokenizer, spec: str | None, base_dir: Path | None = None) -> None:
    """Put the chosen template on the tokenizer (saved with it); None keeps the tokenizer's own."""
    if spec is not None:
        tokenizer.chat_template = resolve_template(spec, base_dir)


def no_template_error(tokenizer) -> ModelError:
    name = getattr(tokenizer, "name_or_path", "") or "the base model"
    return ModelError(
        f"the tokenizer of {name} has no chat template (a base model), so format: chat/instruction cannot be "
        f"rendered: set data.chat_template to one of {CHOICES} (alpaca suits a base model's vocabulary; use the "
        "family's own for a model you will chat with) or to a .jinja file, or use format: text")
