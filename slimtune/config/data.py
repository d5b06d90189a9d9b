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

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator


FILE_FORMATS = ("json", "jsonl", "txt", "parquet", "csv", "tsv", "arrow")
FORMAT_ALIASES = {"alpaca": "instruction", "sharegpt": "chat", "completion": "text", "pretrain": "text"}
"""Names other trainers use for a format (axolotl `type: alpaca`, LLaMA-Factory `formatting: sharegpt`)."""


class SourceConfig(BaseModel):
    """One data source: a local file (json, jsonl, csv, tsv, txt, parquet, arrow) or a hub dataset (`hub:<name>`)."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True, allow_inf_nan=False)

    path: str = Field(min_length=1)
    """A local file (`.json`: a list of records or {"data": [...]}; `.jsonl`; `.csv`; `.tsv`; `.txt`; `.parquet`;
    `.arrow`), a glob of such files (`data/*.jsonl`), a folder with `data_files`, or `hub:<dataset name>` for
    `datasets.load_dataset` (honours HF_HUB_OFFLINE; `hub:json` + `data_files` reads local files through datasets)."""

    data_files: str | list[str] | None = None
    """Files or globs: for a local folder `path`, relative to it; for a `hub:` source, passed to
    `datasets.load_dataset(data_files=...)` (local paths are taken from the recipe's folder)."""

    name: str | None = None
    """Name used in the stats; default: the file stem or the hub dataset name."""

    file_format: Literal["json", "jsonl", "txt", "parquet", "csv", "tsv", "arrow"] | None = None
    """Override the format that is otherwise taken from the file extension."""

    split: str = "train"
    """Hub sources only: the split to load."""

    subset: str | None = None
    """Hub sources only: the configuration (subset) name, e.g. a Wikipedia language dump."""

    revision: str | None = None
    """Hub sources only: branch, tag or commit of the dataset repository."""

    streaming: bool = False
    """Hub sources only: read records as they download (`load_dataset(streaming=True)`) instead of downloading the
    whole split first; with `max_records` only that many records are ever fetched (use it for Wikipedia dumps)."""

    weight: float = Field(1.0, gt=0)
    """Mixing weight by tokens: the sources of a group get token shares proportional to their weights (a source is
    down-sampled or repeated to reach its share; the group keeps its total token count)."""

    text_field: str = "text"
    """`format: text`: the field that holds the document (json/jsonl/parquet/hub)."""

    messages_field: str | None = None
    """`format: chat`: the field that holds the list of messages; default: `messages` (OpenAI) or `conversations`
    (ShareGPT), whichever the record has."""

    role_field: str | None = None
    """`format: chat`: a message's role key; default `role`, or `from` in ShareGPT records."""

    content_field: str | None = None
    """`format: chat`: a message's text key; default `content`, or `value` in ShareGPT records."""

    roles: dict[str, Literal["system", "user", "assistant", "tool"]] = Field(default_factory=dict)
    """Extra role names mapped to the standard ones, e.g. {bot: assistant}; ShareGPT's human/gpt/system/tool,
    function_call/observation and model are known already."""

    instruction_field: str | None = None
    """`format: instruction`: the user's instruction (required); default `instruction` (alpaca) or `prompt`."""

    input_field: str = "input"
    """`format: instruction`: optional extra input appended to the instruction after a blank line."""

    output_field: str | None = None
    """`format: instruction`: the assistant's answer (required); default `output` (alpaca), `completion` or
    `response`."""

    system_field: str = "system"
    """`format: instruction`: optional system prompt field (used when present and non-empty)."""

    prompt_field: str = "prompt"
    """`format: preference|kto`: the prompt (text or a list of messages); a record without it (Anthropic-HH
    transcripts, message lists) takes the common prefix of chosen and rejected as the prompt."""

    chosen_field: str = "chosen"
    """`format: preference`: the preferred completion (text, an assistant message list, or a whole transcript)."""

    rejected_field: str = "rejected"
    """`format: preference`: the dispreferred completion (same forms as chosen)."""

    completion_field: str = "completion"
    """`format: kto`: the completion (text or an assistant message list)."""

    label_field: str = "label"
    """`format: kto`: true for a desirable completion, false for an undesirable one."""

    txt_split: Literal["paragraph", "file", "line"] = "paragraph"
    """`.txt` files: one document per blank-line-separated paragraph, per whole file, or per non-empty line."""

    max_records: int | None = Field(None, gt=0)
    """Read at most this many records (after skipping bad ones), in file order (while streaming: stop fetching)."""


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

    format: Literal["text", "chat", "instruction", "preference", "kto", "prompt"] = "text"
    """`text`: continued pretraining (EOS after each document, loss on every token). `chat`: records with a list of
    messages (OpenAI {role, content} or ShareGPT {from, value}; alias `sharegpt`). `instruction`: alpaca
    instruction/input/output or prompt/completion records, turned into a user and an assistant message (alias
    `alpaca`). Chat and instruction examples are rendered with the chat template and only the assistant tokens
    (content and end-of-turn token) carry loss. `preference`: prompt/chosen/rejected pairs for train.objective
    dpo|ipo|orpo|simpo (text fields, UltraFeedback-style message lists, Anthropic-HH transcripts); `kto`: unpaired
    prompt/completion/label records (slimtune.data.preference); both rendered with the chat template, the final
    assistant reply carrying the log-probs; truncation keeps the prompt and cuts the completion. `prompt`: records
    with a prompt (`prompt_field`, text or messages) and any other fields (reference answers) for train.objective
    grpo, whose completions are sampled during training (slimtune.data.prompts)."""

    chat_template: str | None = None
    """Chat template for chat/instruction: a built-in name (chatml, llama3, alpaca, mistral, gemma, phi3) or a
    `.jinja` file; default: the tokenizer's own. Needed for a base model that has none; saved with the adapter
    and the merged model."""

    max_seq_len: int = Field(2048, gt=0)
    """Block length when packing; otherwise the truncation length."""

    packing: bool | None = None
    """Default: true for `format: text`, false for chat/instruction. Text: concatenate documents into blocks of
    exactly max_seq_len tokens (the last partial block is dropped). Chat/instruction: put whole examples side by
    side in rows of at most max_seq_len tokens, positions restarting and attention confined to each example (no
    attention across examples), loss masks kept. False: one example per row, padded in the batch."""

    replay: ReplayConfig | None = None
    """Optional replay mix with a target token ratio."""

    eval_sources: list[SourceConfig] = Field(default_factory=list)
    """Validation data of its own (axolotl `test_datasets`, LLaMA-Factory `eval_dataset`): formatted like the
    training data and never trained on; used by `train.eval_every` together with the `val_split` records."""

    holdout: Annotated[float, Field(ge=0.0, lt=1.0)] | Annotated[int, Field(ge=0)] = 0
    """Records kept out of training for evaluation (main sources only; chosen deterministically from the seed):
    a float in (0, 1) is a fraction of the records, an integer a count. 0: none. `val_split` is the same key
    (the validation set of `train.eval_every`)."""

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

    @model_validator(mode="before")
    @classmethod
    def _aliases(cls, data: Any) -> Any:
        if isinstance(data, dict) and "val_split" in data:
            if "holdout" in data:
                raise ValueError("val_split: the same key as holdout; give one of them")
            data = {**data, "holdout": data["val_split"]}
            del data["val_split"]
        return data

    @field_validator("format", mode="before")
    @classmethod
    def _format_alias(cls, v: Any) -> Any:
        return FORMAT_ALIASES.get(v, v) if isinstance(v, str) else v

    @property
    def packs(self) -> bool:
        """Whether examples are packed (the resolved `packing`)."""
        return self.format == "text" if self.packing is None else self.packing
