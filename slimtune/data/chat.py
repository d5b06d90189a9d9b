"""SFT formatting: render a conversation with the tokenizer's chat template and mask the loss to assistant tokens.

Targets are the assistant message content and its end-of-turn token (e.g. `<|im_end|>`); the role header,
system/user turns and anything the template adds after the end-of-turn token (a newline) get label -100.

Two ways to find the assistant tokens:

- `prefix` (any template): render `messages[:i]` with the generation prompt and `messages[:i+1]`; the assistant
  turn is the text between them, cut after the first end-of-turn token. Both renderings must be prefixes of the
  full rendering ("prefix-stable" template, true of ChatML, Llama 3, Mistral, Gemma, ...). The character spans are
  mapped to tokens with the fast tokenizer's offset mapping, so the tokenization is exactly that of the full text.
- `generation`: the template's `{% generation %}` markers through `return_assistant_tokens_mask=True`.

`auto` uses `prefix` and falls back to `generation` for a template that is not prefix-stable.
"""

from __future__ import annotations

import re
from typing import Any

from slimtune.data.readers import RecordError
from slimtune.data.templates import no_template_error
from slimtune.errors import ModelError

IGNORE_INDEX = -100

# Strings that end a turn in common chat templates; the tokenizer's own eos token is always included.
_KNOWN_END_OF_TURN = ("<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|end|>", "<|endoftext|>", "</s>",
                      "<|end_of_text|>", "<｜end▁of▁sentence｜>")


class NotPrefixStable(Exception):
    pass


def end_of_turn_tokens(tokenizer) -> list[str]:
    """The end-of-turn strings to look for after an assistant reply (the eos token first)."""
    specials = set(getattr(tokenizer, "all_special_tokens", []) or [])
    try:
        specials |= {str(t) for t in tokenizer.get_added_vocab()}
    except Exception:  # pragma: no cover - slow tokenizers without added vocab
        pass
    out = [tokenizer.eos_token] if tokenizer.eos_token else []
    out += [t for t in _KNOWN_END_OF_TURN if t in specials and t not in out]
    return out


_GENERATION_TAG = re.compile(r"{%-?\s*generation\s*-?%}")


def has_generation_markers(tokenizer) -> bool:
    """Whether the chat template marks assistant output with {% generation %} ... {% endgeneration %}."""
    template = getattr(tokenizer, "chat_template", None)
    return isinstance(template, str) and bool(_GENERATION_TAG.search(template))


def check_chat_tokenizer(tokenizer) -> None:
    """Raise ModelError when the tokenizer cannot do SFT formatting (no chat template, not a fast tokenizer)."""
    if not getattr(tokenizer, "chat_template", None):
        raise no_template_error(tokenizer)
    if not getattr(tokenizer, "is_fast", False):
        raise ModelError("format: chat/instruction needs a fast tokenizer (offset mapping)")


def _render(tokenizer, messages: list[dict], *, generation_prompt: bool = False) -> str:
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
    except Exception as e:  # jinja raises TemplateError (e.g. "roles must alternate") with arbitrary text
        raise RecordError(f"chat template failed: {type(e).__name__}: {e}") from None


def assistant_spans(tokenizer, messages: list[dict]) -> tuple[str, list[tuple[int, int]]]:
    """Render `messages` and return (text, character spans of the assistant targets) by prefix diffing.

    Raises NotPrefixStable when a partial rendering is not a prefix of the full one.
    """
    full = _render(tokenizer, messages)
    eot = end_of_turn_tokens(tokenizer)
    spans: list[tuple[int, int]] = []
    cursor = 0
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before = _render(tokenizer, messages[:i], generation_prompt=True)
        upto = _render(tokenizer, messages[: i + 1])
        if not (full.startswith(before) and full.startswith(upto)) or len(before) < cursor or len(upto) <= len(before):
            raise NotPrefixStable(f"message {i}")
        start, stop = len(before), len(upto)
        seg = full[start:stop]
        content = m["content"].strip()
        c = seg.find(content) if content else 0
        after = c + len(content) if c >= 0 else 0
        best: tuple[int, int] | None = None
        for t in eot:
            k = seg.find(t, after)
            if k >= 0 and (best is None or k < best[0]):
                best = (k, len(t))
        end = start + (best[0] + best[1] if best else len(seg.rstrip()))
        if end > start:
            spans.append((start, end))
        cursor = stop
    return full, spans


def tokenize_with_spans(tokenizer, texts: list[str], spans: list[list[tuple[int, int]]]
                        ) -> list[tuple[list[int], list[int]]]:
    """Tokenize rendered conversations (no extra special tokens) and label the tokens overlapping a span."""
    enc = tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True)
    out = []
    for ids, offsets, sp in zip(enc["input_ids"], enc["offset_mapping"], spans):
        labels = [IGNORE_INDEX] * len(ids)
        j = 0
        for t, (a, b) in enumerate(offsets):
            while j < len(sp) and sp[j][1] <= a:
                j += 1
            if j == len(sp):
                break
            if b > a and a < sp[j][1] and b > sp[j][0]:
                labels[t] = ids[t]
        out.append((list(ids), labels))
    return out


def generation_mask_example(tokenizer, messages: list[dict]) -> tuple[list[int], list[int]]:
    """input_ids and labels from the template's {% generation %} markers."""
    try:
        enc = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True,
                                            return_assistant_tokens_mask=True)
    except Exception as e:
        raise RecordError(f"chat template failed: {type(e).__name__}: {e}") from None
    ids = list(enc["input_ids"])
    mask = list(enc["assistant_masks"])
    return ids, [t if m else IGNORE_INDEX for t, m in zip(ids, mask)]


def render_conversations(tokenizer, conversations: list[list[dict]], method: str = "auto") -> list[Any]:
    """Turn conversations into (input_ids, labels) pairs (untruncated), or a RecordError per failed conversation.

    The result list is parallel to `conversations`; failures are returned, not raised, so the caller can name the
    record's file:line and apply `on_error`.
    """
    results: list[Any] = [None] * len(conversations)
    texts, spans, idx = [], [], []
    for k, msgs in enumerate(conversations):
        try:
            if method in ("auto", "prefix"):
                try:
                    text, sp = assistant_spans(tokenizer, msgs)
                    texts.append(text)
                    spans.append(sp)
                    idx.append(k)
                    continue
                except NotPrefixStable as e:
                    if method == "prefix" or not has_generation_markers(tokenizer):
                        raise RecordError(
                            f"the chat template is not prefix-stable ({e}) and has no {{% generation %}} markers, "
                            "so the assistant tokens cannot be found"
                        ) from None
            results[k] = generation_mask_example(tokenizer, msgs)
        except RecordError as e:
            results[k] = e
    if texts:
        for k, pair in zip(idx, tokenize_with_spans(tokenizer, texts, spans)):
            results[k] = pair
    return results
