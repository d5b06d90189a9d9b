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


if __name__ == "__main__":
    print(*generate(Path(sys.argv[1] if len(sys.argv) > 1 else "recipes/data")))
