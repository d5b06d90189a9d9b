"""The `eval:` section of a recipe: what to measure before and after each stage.

Every metric is optional; an empty `EvalConfig()` measures nothing. Paths are relative to the recipe file's
folder (the runner receives it as `base_dir`). Hub sources are loaded through `datasets` only when used, so a recipe
that names FLORES-200 still validates (and its other metrics still run) without network access.

Example (YAML)::

    eval:
      batch_size: 8
      perplexity:
        - {path: data/udhr/src.jsonl, field: text, max_seq_len: 512}
      translation:
        - direction: en→sc
          flores: {src_lang: eng_Latn, tgt_lang: srd_Latn, split: devtest}
          max_examples: 200
        - direction: en→sc (udhr)
          src: {path: data/udhr/eng.jsonl, id_field: article}
          tgt: {path: data/udhr/src.jsonl, id_field: article}
      generations:
        prompts: ["Scrie unu contu curtzu in sardu."]
      exact_match:
        - {path: data/arith.jsonl}
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

DEFAULT_TRANSLATION_PROMPT = (
    "Translate the following text from {src_lang} to {tgt_lang}. "
    "Reply with the translation only.\n\n{text}"
)
"""Default instruction; it is wrapped in the tokenizer's chat template as one user turn (when there is one)."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)


class TextSource(_Strict):
    """A corpus whose perplexity is measured: a local file (`path`) or a hub dataset (`hub`), exactly one."""

    path: str | None = None
    """Local file: `.jsonl` (one JSON object per line, text in `field`), `.json` (a list of such objects) or
    `.txt` (one record per non-empty line). Relative to the recipe's folder."""
    hub: str | None = None
    """Hub dataset id (e.g. `wikitext`), streamed through `datasets` when the eval runs."""
    subset: str | None = None
    """Hub dataset configuration name (e.g. `wikitext-2-raw-v1`)."""
    split: str = "test"
    """Hub dataset split."""
    field: str = "text"
    """Field holding the text (jsonl/json/hub)."""
    max_records: int | None = Field(default=None, ge=1)
    """Use only the first N records (None: all)."""
    max_seq_len: int = Field(default=1024, ge=2)
    """Window length in tokens; longer texts are scored in consecutive windows (see `slimtune.eval.perplexity`)."""
    name: str | None = None
    """Row name in the report (default: the file stem or the hub id)."""

    @model_validator(mode="after")
    def _one_location(self) -> TextSource:
        if (self.path is None) == (self.hub is None):
            raise ValueError("give exactly one of `path` or `hub`")
        return self

    @property
    def display_name(self) -> str:
        if self.name:
            return self.name
        if self.path is not None:
            return _stem(self.path)
        return self.hub if self.subset is None else f"{self.hub}/{self.subset}"


class AlignedFile(_Strict):
    """One side of a local parallel set: records in the same order as the other side's, or matched by an id."""

    path: str
    """`.jsonl`, `.json` or `.txt` file (txt: one segment per line, aligned by line number)."""
    field: str = "text"
    """Field holding the segment."""
    id_field: str | None = None
    """Align by this field (e.g. `article`) instead of by line; ids present on one side only are skipped."""
    lang: str | None = None
    """Language code or name used in the prompt (default: the file stem, e.g. `eng` → English)."""


class FloresSpec(_Strict):
    """A FLORES-200 / FLORES+ direction, loaded from the hub through `datasets` when the eval runs."""

    src_lang: str = "eng_Latn"
    """FLORES language code of the source side (e.g. `eng_Latn`)."""
    tgt_lang: str
    """FLORES language code of the target side (e.g. `srd_Latn`)."""
    split: Literal["dev", "devtest"] = "devtest"
    dataset: str = "openlanguagedata/flores_plus"
    """Hub dataset with one configuration per language code (`facebook/flores` parquet configs also work)."""
    field: str | None = None
    """Text field (default: `text` if present, else `sentence`)."""


class TranslationEval(_Strict):
    """One translation direction scored with BLEU and chrF: either `src` + `tgt` files, or `flores`."""

    direction: str | None = None
    """Name used in the report, e.g. `en→sc` (default: `<src>→<tgt>` from the language codes)."""
    src: AlignedFile | None = None
    tgt: AlignedFile | None = None
    flores: FloresSpec | None = None
    src_lang: str | None = None
    """Source language name put in the prompt (default: derived from the code, e.g. `eng_Latn` → English)."""
    tgt_lang: str | None = None
    """Target language name put in the prompt."""
    max_examples: int | None = Field(default=None, ge=1)
    """Translate only the first N aligned pairs (None: all)."""
    max_new_tokens: int = Field(default=256, ge=1)
    prompt: str = DEFAULT_TRANSLATION_PROMPT
    """Template with the placeholders {src_lang}, {tgt_lang} and {text}."""
    chat_template: bool = True
    """Wrap the prompt in the tokenizer's chat template (ignored when the tokenizer has none)."""
    system: str | None = None
    """Optional system message (chat template only)."""
    bleu_tokenize: str = "13a"
    """sacrebleu tokenizer for BLEU (`13a`, `intl`, `char`, `zh`, ...; `flores200` needs its SentencePiece model)."""
    examples: int = Field(default=3, ge=0)
    """How many (source, reference, hypothesis) triples to keep for the report."""

    @field_validator("src", "tgt", mode="before")
    @classmethod
    def _path_shorthand(cls, v: object) -> object:
        return {"path": v} if isinstance(v, str) else v

    @field_validator("prompt")
    @classmethod
    def _prompt_has_text(cls, v: str) -> str:
        if "{text}" not in v:
            raise ValueError("prompt must contain the {text} placeholder")
        return v

    @model_validator(mode="after")
    def _one_source(self) -> TranslationEval:
        local = self.src is not None or self.tgt is not None
        if local and self.flores is not None:
            raise ValueError("give either `src` + `tgt` files or `flores`, not both")
        if not local and self.flores is None:
            raise ValueError("give `src` + `tgt` files or `flores`")
        if local and (self.src is None or self.tgt is None):
            raise ValueError("give both `src` and `tgt`")
        return self

    @property
    def src_code(self) -> str:
        """Language code (or name) of the source side: FLORES code, `src.lang`, or the file stem."""
        return self.flores.src_lang if self.flores else _side_code(self.src)

    @property
    def tgt_code(self) -> str:
        return self.flores.tgt_lang if self.flores else _side_code(self.tgt)

    @property
    def display_direction(self) -> str:
        return self.direction or f"{self.src_code}→{self.tgt_code}"


def _stem(path: str) -> str:
    name = path.replace("\\", "/").rsplit("/", 1)[-1]
    return name.rsplit(".", 1)[0] if "." in name else name


def _side_code(side: AlignedFile | None) -> str:
    assert side is not None
    return side.lang or _stem(side.path)


class GenerationEval(_Strict):
    """A few prompts whose completions are shown in the report (qualitative check; greedy by default)."""

    prompts: list[str] = Field(min_length=1)
    max_new_tokens: int = Field(default=128, ge=1)
    do_sample: bool = False
    """False: greedy decoding (deterministic)."""
    temperature: float = Field(default=0.7, gt=0)
    """Used only when `do_sample` is true."""
    top_p: float = Field(default=0.9, gt=0, le=1)
    """Used only when `do_sample` is true."""
    seed: int = 0
    """Seed for sampling (the global RNG state is left untouched)."""
    chat_template: bool = True
    """Wrap each prompt in the tokenizer's chat template (ignored when the tokenizer has none)."""
    system: str | None = None


class ExactMatchEval(_Strict):
    """Accuracy of greedy answers on a task with exact answers: hypothesis.strip() == answer.strip()."""

    path: str
    """`.jsonl` (or `.json` list) file of records with a prompt and an answer."""
    prompt_field: str = "prompt"
    answer_field: str = "answer"
    max_examples: int | None = Field(default=None, ge=1)
    max_new_tokens: int = Field(default=32, ge=1)
    chat_template: bool = True
    system: str | None = None
    name: str | None = None
    """Row name in the report (default: the file stem)."""
    examples: int = Field(default=3, ge=0)
    """How many (prompt, answer, output) triples to keep for the report."""

    @property
    def display_name(self) -> str:
        return self.name or _stem(self.path)


class EvalConfig(_Strict):
    """Everything measured by `slimtune.eval.runner.run_eval`; each list may be empty."""

    perplexity: list[TextSource] = Field(default_factory=list)
    translation: list[TranslationEval] = Field(default_factory=list)
    generations: GenerationEval | None = None
    exact_match: list[ExactMatchEval] = Field(default_factory=list)
    batch_size: int = Field(default=4, ge=1)
    """Sequences per forward pass / per `generate` call."""
    holdout_perplexity: bool = False
    """Training runs only: also measure perplexity on the records `data.holdout` kept out of training (format text;
    rows `perplexity/holdout:<source>`, windows of min(data.max_seq_len, 1024) tokens)."""

    @field_validator("perplexity", "translation", "exact_match", mode="before")
    @classmethod
    def _single_to_list(cls, v: object) -> object:
        return [v] if isinstance(v, dict) else v

    @field_validator("generations", mode="before")
    @classmethod
    def _prompt_list_shorthand(cls, v: object) -> object:
        return {"prompts": v} if isinstance(v, list) else v

    @model_validator(mode="after")
    def _unique_names(self) -> EvalConfig:
        """Report rows are keyed by these names, so two entries of one kind must not share one."""
        for kind, names in (
            ("perplexity", [s.display_name for s in self.perplexity]),
            ("translation", [t.display_direction for t in self.translation]),
            ("exact_match", [t.display_name for t in self.exact_match]),
        ):
            dup = sorted({n for n in names if names.count(n) > 1})
            if dup:
                raise ValueError(f"{kind}: duplicate name {dup[0]!r} (set `name`/`direction` to tell them apart)")
        return self
