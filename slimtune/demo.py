"""Data for the demo recipe: a task with exact answers that the project generates itself.

Task: write an ISO date (2031-04-07) in words ("April 7, 2031"). SmolLM2-135M-Instruct answers in prose or gets the
month wrong, so exact match before training is low; a short QLoRA run teaches the format and the month table.
Train and test dates are disjoint. `python -m slimtune.demo DIR` rewrites the committed files byte for byte.
"""

from __future__ import annotations

import datetime as dt
import json
import random
import sys
from pathlib import Path

MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
          "November", "December"]
PROMPT = "Write the date {iso} in words. Answer with the date only."


def _dates(rng: random.Random, n: int, exclude: set[dt.date]) -> list[dt.date]:
    out: list[dt.date] = []
    start, span = dt.date(1950, 1, 1), (dt.date(2049, 12, 31) - dt.date(1950, 1, 1)).days
    while len(out) < n:
        d = start + dt.timedelta(days=rng.randrange(span + 1))
        if d not in exclude:
            exclude.add(d)
            out.append(d)
    return out


def record(d: dt.date) -> dict[str, str]:
    return {"prompt": PROMPT.format(iso=d.isoformat()), "answer": f"{MONTHS[d.month - 1]} {d.day}, {d.year}"}


def generate(out_dir: Path, *, n_train: int = 480, n_test: int = 64, seed: int = 1234) -> tuple[Path, Path]:
    """Write demo_dates_train.jsonl and demo_dates_test.jsonl (deterministic)."""
    rng = random.Random(seed)
    seen: set[dt.date] = set()
    test = _dates(rng, n_test, seen)
    train = _dates(rng, n_train, seen)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, dates in (("train", train), ("test", test)):
        p = out_dir / f"demo_dates_{name}.jsonl"
        p.write_text("".join(json.dumps(record(d)) + "\n" for d in dates), encoding="utf-8")
        paths.append(p)
    return paths[0], paths[1]


def wrong_answer(d: dt.date, rng: random.Random) -> str:
    """A plausible wrong answer: the neighbouring month, the day off by one or two, or the year off by one."""
    how = rng.randrange(3)
    if how == 0:
        return f"{MONTHS[(d.month - 1 + rng.choice((-1, 1))) % 12]} {d.day}, {d.year}"
    if how == 1:
        day = d.day + rng.choice((-2, -1, 1, 2))
        return f"{MONTHS[d.month - 1]} {day if 1 <= day <= 28 else d.day % 28 + 1}, {d.year}"
    return f"{MONTHS[d.month - 1]} {d.day}, {d.year + rng.choice((-1, 1))}"


def preference_record(d: dt.date, rng: random.Random) -> dict[str, str]:
    """A `data.format: preference` pair: the date in words (chosen) against a plausible wrong one (rejected)."""
    r = record(d)
    return {"prompt": r["prompt"], "chosen": r["answer"], "rejected": wrong_answer(d, rng), "answer": r["answer"]}


def generate_preference(out_dir: Path, *, n_train: int = 480, n_test: int = 64, seed: int = 1234
                        ) -> tuple[Path, Path]:
    """demo_dates_pref_train.jsonl / demo_dates_pref_test.jsonl: the dates task as preference pairs, on the same
    disjoint train/test dates as `generate` (the test file also serves exact match: its `answer` field)."""
    rng = random.Random(seed)
    seen: set[dt.date] = set()
    test = _dates(rng, n_test, seen)
    train = _dates(rng, n_train, seen)
    wrong = random.Random(seed + 1)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, dates in (("train", train), ("test", test)):
        p = out_dir / f"demo_dates_pref_{name}.jsonl"
        p.write_text("".join(json.dumps(preference_record(d, wrong)) + "\n" for d in dates), encoding="utf-8")
        paths.append(p)
    return paths[0], paths[1]


if __name__ == "__main__":
    out = Path(sys.argv[1] if len(sys.argv) > 1 else "recipes/data")
    print(*generate(out), *generate_preference(out))
