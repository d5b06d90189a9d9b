"""`chat` and `generate`: talk to a model, or run a batch of prompts, from the terminal.

RUN_OR_MODEL is a run folder (or its adapter_native/): the base with the adapter merged onto the NF4-dequantized
weights it trained against (the trained model exactly); or anything `model.name` accepts: a hub id, an HF folder
(a merged model), a ``.gguf`` file, ``pkg:<package>/<file>``.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Annotated, Optional

import typer

from slimtune.cli.app import app, console, guarded
from slimtune.errors import SlimtuneError


def load_for_chat(target: str):
    """(model, tokenizer, what was loaded) for RUN_OR_MODEL (see the module docstring), in eval mode."""
    from slimtune.adapters.export import NATIVE_CONFIG
    from slimtune.export.merge import load_merged
    from slimtune.models.load import ModelConfig, QuantConfig, load_model

    p = Path(target)
    native = p / "adapter_native" if (p / "adapter_native").is_dir() else p
    if (native / NATIVE_CONFIG).is_file():
        base = json.loads((native / NATIVE_CONFIG).read_text()).get("base_model")
        if not base:
            raise SlimtuneError(f"{target}: base model unknown (no base_model in {NATIVE_CONFIG})")
        loaded = load_merged(ModelConfig(name=base), native, onto="dequantized")
        label = f"{base} + adapter {native}"
    else:
        loaded = load_model(ModelConfig(name=target), QuantConfig(mode="none", compute_dtype="auto"))
        label = target
    return loaded.model.eval(), loaded.tokenizer, label


def _prompt_text(tok, messages: list[dict]) -> str:
    if getattr(tok, "chat_template", None):
        return tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return "\n".join(m["content"] for m in messages) + "\n"  # a base model without a template: plain continuation


def stream_reply(model, tok, messages: list[dict], *, max_new_tokens: int, temperature: float, top_p: float) -> str:
    """Generate the assistant's reply to ``messages``, printing tokens as they come; returns the reply."""
    from transformers import TextIteratorStreamer

    from slimtune.eval.perplexity import model_device

    enc = tok(_prompt_text(tok, messages), return_tensors="pt", add_special_tokens=not tok.chat_template)
    enc = {k: v.to(model_device(model)) for k, v in enc.items()}
    streamer = TextIteratorStreamer(tok, skip_prompt=True, skip_special_tokens=True)
    kwargs = dict(**enc, streamer=streamer, max_new_tokens=max_new_tokens, do_sample=temperature > 0,
                  pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id)
    if temperature > 0:
        kwargs.update(temperature=temperature, top_p=top_p)
    worker = threading.Thread(target=model.generate, kwargs=kwargs, daemon=True)
    worker.start()
    pieces = []
    for piece in streamer:
        console.print(piece, end="", markup=False, highlight=False, soft_wrap=True)
        pieces.append(piece)
    worker.join()
    console.print()
    return "".join(pieces).strip()


@app.command()
@guarded
def chat(
    target: Annotated[str, typer.Argument(metavar="RUN_OR_MODEL", help="A run folder, adapter_native/, model folder, "
                                          ".gguf file, hub id or pkg:<package>/<file>.")],
    system: Annotated[Optional[str], typer.Option("--system", "-s", help="System prompt.")] = None,
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", help="Longest reply, in tokens.")] = 256,
    temperature: Annotated[float, typer.Option("--temperature", help="0 = greedy.")] = 0.7,
    top_p: Annotated[float, typer.Option("--top-p", help="Nucleus sampling mass.")] = 0.9,
) -> None:
    """Chat with a model in the terminal (streaming, the model's chat template). /reset clears, /exit quits."""
    if max_new_tokens <= 0:
        raise SlimtuneError(f"--max-new-tokens {max_new_tokens}: must be > 0")
    with console.status("loading the model"):
        model, tok, label = load_for_chat(target)
    console.print(f"[bold]{label}[/] — /reset clears the conversation, /exit quits", highlight=False)
    base_messages = [{"role": "system", "content": system}] if system else []
    history: list[dict] = []
    while True:
        try:
            line = console.input("[bold cyan]you>[/] ")
        except (EOFError, KeyboardInterrupt):
            break
        cmd = line.strip()
        if cmd in ("/exit", "/quit"):
            break
        if cmd == "/reset":
            history = []
            console.print("[dim](conversation cleared)[/]")
            continue
        if not cmd:
            continue
        history.append({"role": "user", "content": line})
        console.print("[bold green]model>[/] ", end="")
        reply = stream_reply(model, tok, base_messages + history, max_new_tokens=max_new_tokens,
                             temperature=temperature, top_p=top_p)
        history.append({"role": "assistant", "content": reply})


def read_prompts(path: Path) -> list[dict]:
    """Rows of a prompts .jsonl file: each needs ``prompt`` (or ``instruction``); other keys are kept."""
    if not path.is_file():
        raise SlimtuneError(f"--file {path}: no such file")
    rows = []
    for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise SlimtuneError(f"{path}:{i}: not JSON ({e.msg})") from None
        if not isinstance(row, dict) or not isinstance(row.get("prompt", row.get("instruction")), str):
            raise SlimtuneError(f"{path}:{i}: needs a string 'prompt' (or 'instruction') field")
        rows.append(row)
    return rows


@app.command()
@guarded
def generate(
    target: Annotated[str, typer.Argument(metavar="RUN_OR_MODEL", help="As for `slimtune chat`.")],
    prompt: Annotated[Optional[list[str]], typer.Option("--prompt", "-p", help="A prompt (repeatable).")] = None,
    file: Annotated[Optional[Path], typer.Option("--file", "-f", help="prompts.jsonl: one {\"prompt\": ...} per "
                                                 "line.")] = None,
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="Output .jsonl (default: stdout).")] = None,
    system: Annotated[Optional[str], typer.Option("--system", "-s", help="System prompt.")] = None,
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", help="Longest completion, in tokens.")] = 128,
    temperature: Annotated[float, typer.Option("--temperature", help="0 = greedy.")] = 0.0,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Prompts per generate call.")] = 8,
) -> None:
    """Generate one completion per prompt and write jsonl rows {..., "output": ...}."""
    from slimtune.eval.generate import generate as run_generate

    if not prompt and file is None:
        raise SlimtuneError("give --prompt TEXT (repeatable) or --file prompts.jsonl")
    rows = [{"prompt": p} for p in prompt or []] + (read_prompts(file) if file is not None else [])
    if max_new_tokens <= 0 or batch_size <= 0:
        raise SlimtuneError("--max-new-tokens and --batch-size must be > 0")
    with console.status("loading the model"):
        model, tok, _ = load_for_chat(target)
    texts = [r.get("prompt", r.get("instruction")) for r in rows]
    outputs = run_generate(model, tok, texts, max_new_tokens=max_new_tokens, batch_size=batch_size, system=system,
                           do_sample=temperature > 0, temperature=temperature if temperature > 0 else 0.7)
    lines = [json.dumps({**r, "output": o}, ensure_ascii=False) for r, o in zip(rows, outputs, strict=True)]
    if out is None:
        for line in lines:
            typer.echo(line)
    else:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text("\n".join(lines) + "\n", encoding="utf-8")
        console.print(f"[green]wrote[/] {len(lines)} rows to {out}", highlight=False)
