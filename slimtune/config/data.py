"""The `data:` section of a recipe: sources, format, sequence length, packing, replay mixing, holdout.

    data:
      format: text                 # continued pretraining
      max_seq_len: 2048
      sources:
        - path: data/sardinian.jsonl
      replay:                      # 17% of the tokens from Romance languages
        ratio: 0.17
        sources:
          - {path: data/ita.jsonl, weight: 1}
          - {path: hub:wikimedia/wikipedia, subset: 20231101.es, max_records: 20000}
      holdout: 0.05

Relative local paths are resolved against the recipe file's folder by the caller (`build_dataset(base_dir=...)`).
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field


class SourceConfig(BaseModel):
    """One data source: a local file (json, jsonl, txt, parquet) or a Hugging Face hub dataset (`hub:<name>`)."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True, allow_inf_nan=False)

    path: str = Field(min_length=1)
    """A local file (`.json`: a list of records or {"data": [...]}; `.jsonl`; `.txt`; `.parquet`), a glob of such
    files (`data/*.jsonl`), or `hub:<dataset name>` for `datasets.load_dataset` (honours HF_HUB_OFFLINE)."""

    name: str | None = None
    """Name used in the stats; default: the file stem or the hub dataset name."""

    file_format: Literal["json", "jsonl", "txt", "parquet"] | None = None
    """Override the format that is otherwise taken from the file extension."""

    split: str = "train"
    """Hub sources only: the split to load."""

    subset: str | None = None
    """Hub sources only: the configuration (subset) name, e.g. a Wikipedia language dump."""

    weight: float = Field(1.0, gt=0)
    """Mixing weight by tokens: the sources of a group get token shares proportional to their weights (a source is
    down-sampled or repeated to reach its share; the group keeps its total token count)."""

    text_field: str = "text"
    """`format: text`: the field that holds the document (json/jsonl/parquet/hub)."""

    messages_field: str = "messages"
    """`format: chat`: the field that holds the list of {role, content} messages."""

    instruction_field: str = "instruction"
    """`format: instruction`: the user's instruction (required)."""

    input_field: str = "input"
    """`format: instruction`: optional extra input appended to the instruction after a blank line."""

    output_field: str = "output"
    """`format: instruction`: the assistant's answer (required)."""

    system_field: str = "system"
    """`format: instruction`: optional system prompt field (used when present and non-empty)."""

    txt_split: Literal["paragraph", "file", "line"] = "paragraph"
    """`.txt` files: one document per blank-line-separated paragraph, per whole file, or per non-empty line."""

    max_records: int | None = Field(None, gt=0)
    """Read at most this many records (after skipping bad ones), in file order."""


class ReplayConfig(BaseModel):
    """Replay data mixed in to limit forgetting (e.g. Italian/Spanish/Catalan while training on Sardinian)."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True, allow_inf_nan=False)

    ratio: float = Field(ge=0.0, lt=1.0)
    """Target share of replay tokens in the final mix: replay / (main + replay). 0.17 → 17% replay tokens."""

    sources: list[SourceConfig] = Field(min_length=1)
    """Replay sources; their weights split the replay share among them."""


class DataConfig(BaseModel):
    """What to train on and how examples are built."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True, allow_inf_nan=False)

    sources: list[SourceConfig] = Field(min_length=1)
    """Main sources, mixed by token share according to their weights."""

    format: Literal["text", "chat", "instruction"] = "text"
    """`text`: continued pretraining (EOS after each document, loss on every token). `chat`: records with a list of
    {role, content} messages. `instruction`: instruction/input/output records, turned into a user and an assistant
    message. Chat and instruction examples are rendered with the tokenizer's chat template and only the assistant
    tokens (content and end-of-turn token) carry loss."""

    max_seq_len: int = Field(2048, gt=0)
    """Block length when packing; otherwise the truncation length."""

    packing: bool = True
    """`format: text` only: concatenate documents into blocks of exactly max_seq_len tokens (the last partial block
    is dropped). When false each document is one example, truncated to max_seq_len and padded in the batch."""

    replay: ReplayConfig | None = None
    """Optional replay mix with a target token ratio."""

    holdout: Annotated[float, Field(ge=0.0, lt=1.0)] | Annotated[int, Field(ge=0)] = 0
    """Records kept out of training for evaluation (main sources only; chosen deterministically from the seed):
    a float in (0, 1) is a fraction of the records, an integer a count. 0: none."""

    on_error: Literal["raise", "skip"] = "raise"
    """What a malformed record does: `raise` stops with file:line; `skip` drops it and counts it in the stats."""

    shuffle: bool = True
    """Shuffle documents before packing and examples every epoch (deterministic from seed and epoch)."""

    seed: int | None = Field(None, ge=0, lt=2**63)
    """Seed for mixing, holdout and shuffling; default: inherit `train.seed`."""

    loss_mask: Literal["auto", "prefix", "generation"] = "auto"
    """How assistant tokens are found: `prefix` renders the conversation prefix by prefix and maps the character
    spans to tokens (works with any template); `generation` uses the template's {% generation %} markers; `auto`
    tries `prefix` and falls back to `generation` when the template is not prefix-stable."""
