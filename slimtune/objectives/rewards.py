"""Reward functions of `train.objective: grpo` (`train.grpo.rewards`).

Every reward is called like TRL's: ``fn(prompts, completions, **fields) -> list[float]``, one call per batch of
completions, where ``fields`` maps each record field (other than the prompt) to the list of its values, one per
completion (a prompt's G completions repeat its record), plus ``completion_ids`` (token id lists). A user reward is
named by import path (``mypkg.rewards:correct``). Built-ins (slimtune.config.grpo.RewardConfig):

- ``exact``: 1 when the completion's answer (the text after the last "answer:", else the whole completion; case,
  spaces and a final period ignored) equals the record's ``field``, else 0;
- ``numeric``: 1 when the completion's last number equals the field's number within ``tolerance`` (relative to
  max(1, |reference|); "1,234" and "$5" read as numbers);
- ``regex``: 1 when ``pattern`` is found in the completion (``fullmatch``: matches all of it), else 0;
- ``length``: −max(0, completion tokens − ``target``) / ``target``;
- ``dates``: partial credit for a date written in words ("March 5, 1957"): a third each for the month name, the day
  (the number right after it) and the year found in the completion that equal the reference's (an echoed ISO date
  earns the year only).

A reward that raises, returns the wrong number of values, or a value that is not a finite number is one
``RewardError`` naming the function and the first record it fails on (file:line), never a silent zero.
"""

from __future__ import annotations

import importlib
import math
import re
from collections.abc import Callable, Sequence
from typing import Any

import torch

from slimtune.config.grpo import RewardConfig
from slimtune.errors import SlimtuneError

MONTHS = ("january", "february", "march", "april", "may", "june", "july", "august", "september", "october",
          "november", "december")
_NUMBER = re.compile(r"-?\$?\d[\d,]*(?:\.\d+)?|-?\.\d+")


class RewardError(SlimtuneError):
    """A reward function failed on a record."""


def _norm(s: Any) -> str:
    return " ".join(str(s).strip().lower().rstrip(".").split())


def extract_answer(text: str) -> str:
    """The text after the last "answer:" (any case), else the whole text."""
    k = text.lower().rfind("answer:")
    return text[k + len("answer:"):] if k >= 0 else text


def parse_number(text: str) -> float | None:
    """The last number in ``text`` (commas and a leading $ dropped), or None."""
    found = _NUMBER.findall(str(text))
    if not found:
        return None
    try:
        return float(found[-1].replace(",", "").replace("$", ""))
    except ValueError:
        return None


def date_parts(text: str) -> tuple[str | None, int | None, int | None]:
    """(month name, day, year) of a date written in words in ``text`` ("March 5, 1957", "5 March 1957" gives no
    day), any missing as None. An ISO date ("1957-03-05") has a year but no month name and no day."""
    t = str(text).lower()
    month = next((m for m in MONTHS if re.search(rf"\b{m}\b", t)), None)
    day = year = None
    if month is not None:
        after = re.search(rf"\b{month}\b\s+(\d{{1,2}})\b", t)
        day = int(after.group(1)) if after else None
    years = re.findall(r"\b(\d{4})\b", t)
    year = int(years[-1]) if years else None
    return month, day, year


def _builtin(cfg: RewardConfig) -> Callable[..., list[float]]:
    kind, field = cfg.fn, cfg.field

    def refs(kw: dict[str, Any]) -> list[Any]:
        if field not in kw:
            raise KeyError(f"the record has no field '{field}' (train.grpo.rewards: field)")
        return kw[field]

    if kind == "exact":
        def exact(prompts, completions, **kw):
            return [float(_norm(extract_answer(c)) == _norm(r)) for c, r in zip(completions, refs(kw))]
        return exact
    if kind == "numeric":
        def numeric(prompts, completions, **kw):
            out = []
            for c, r in zip(completions, refs(kw)):
                want, got = parse_number(r), parse_number(extract_answer(c))
                if want is None:
                    raise ValueError(f"reference {r!r} holds no number")
                out.append(float(got is not None and abs(got - want) <= cfg.tolerance * max(1.0, abs(want))))
            return out
        return numeric
    if kind == "regex":
        pat = re.compile(cfg.pattern, re.DOTALL)

        def regex(prompts, completions, **kw):
            return [float(bool(pat.fullmatch(c.strip()) if cfg.fullmatch else pat.search(c))) for c in completions]
        return regex
    if kind == "length":
        def length(prompts, completions, **kw):
            return [-max(0, len(ids) - cfg.target) / cfg.target for ids in kw["completion_ids"]]
        return length
    if kind == "dates":
        def dates(prompts, completions, **kw):
            out = []
            for c, r in zip(completions, refs(kw)):
                want, got = date_parts(r), date_parts(c)
                if None in want:
                    raise ValueError(f"reference {r!r} is not a date")
                out.append(sum(float(a == b) for a, b in zip(got, want)) / 3)
            return out
        return dates
    raise ValueError(f"unknown built-in reward {kind!r}")


def load_callable(path: str) -> Callable[..., Any]:
    """``module.path:name`` → the object (a one-line RewardError when it cannot be imported)."""
    mod, _, name = path.partition(":")
    try:
        obj = importlib.import_module(mod)
        for part in name.split("."):
            obj = getattr(obj, part)
    except (ImportError, AttributeError) as e:
        raise RewardError(f"train.grpo.rewards: cannot import {path} ({type(e).__name__}: {e})") from None
    if not callable(obj):
        raise RewardError(f"train.grpo.rewards: {path} is not callable")
    return obj


class Rewards:
    """The recipe's reward functions, loaded once; ``__call__`` scores a batch of completions."""

    def __init__(self, specs: Sequence[RewardConfig]):
        if not specs:
            raise RewardError("train.grpo.rewards: give at least one reward function")
        self.specs = list(specs)
        self.fns = [_builtin(s) if ":" not in s.fn else load_callable(s.fn) for s in self.specs]
        self.names = [s.label for s in self.specs]
        self.weights = torch.tensor([s.weight for s in self.specs], dtype=torch.float64)

    def __call__(self, records: Sequence[dict[str, Any]], completions: Sequence[str],
                 completion_ids: Sequence[Sequence[int]]) -> torch.Tensor:
        """(N, F) float64: reward function f on completion n. ``records[n]``: the prompt example of completion n
        ({"prompt", "fields", "where"})."""
        prompts = [r["prompt"] for r in records]
        keys = sorted({k for r in records for k in r["fields"]})
        out = torch.zeros((len(completions), len(self.fns)), dtype=torch.float64)
        for j, (fn, spec) in enumerate(zip(self.fns, self.specs)):
            out[:, j] = self._one(fn, spec, records, prompts, completions, completion_ids, keys)
        return out

    def _one(self, fn, spec, records, prompts, completions, completion_ids, keys) -> torch.Tensor:
        def call(rows: list[int]) -> list[Any]:
            kw = {k: [records[i]["fields"].get(k) for i in rows] for k in keys}
            kw["completion_ids"] = [list(completion_ids[i]) for i in rows]
            return list(fn([prompts[i] for i in rows], [completions[i] for i in rows], **kw))

        rows, vals = list(range(len(completions))), []
        try:
            vals = call(rows)
            bad = next((i for i, v in enumerate(vals) if not _finite(v)), None)
            if len(vals) == len(rows) and bad is None:
                return torch.tensor([float(v) for v in vals], dtype=torch.float64)
        except Exception:  # find the record it fails on, one at a time, and name it
            pass
        for i in rows:
            try:
                v = call([i])
            except Exception as e:
                raise RewardError(f"reward {spec.fn} raised {type(e).__name__}: {e} on record {records[i]['where']}"
                                  ) from None
            if len(v) != 1:
                raise RewardError(f"reward {spec.fn} returned {len(v)} values for 1 completion (record "
                                  f"{records[i]['where']})")
            if not _finite(v[0]):
                raise RewardError(f"reward {spec.fn} returned {v[0]!r}, not a finite number, on record "
                                  f"{records[i]['where']}")
        raise RewardError(f"reward {spec.fn} returned {len(vals)} values for {len(rows)} completions, or values "
                          f"that differ from its one-by-one calls")


def _finite(v: Any) -> bool:
    try:
        return not isinstance(v, str) and v is not None and math.isfinite(float(v))
    except (TypeError, ValueError):
        return False
