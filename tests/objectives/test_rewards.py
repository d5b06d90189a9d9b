"""GRPO's reward functions: the built-ins on hand-checked completions, a user callable by import path receiving the
prompts, completions and record fields, and failures that name the function and the record."""

from __future__ import annotations

import pytest
import torch

from slimtune.config.grpo import GRPOConfig, RewardConfig
from slimtune.objectives.rewards import RewardError, Rewards, date_parts, parse_number


def _recs(*answers):
    return [{"prompt": f"q{i}", "fields": {"answer": a, "id": i}, "where": f"data.jsonl:{i + 1}"}
            for i, a in enumerate(answers)]


def _score(specs, recs, completions, ids=None):
    r = Rewards([RewardConfig(**s) for s in specs])
    return r(recs, completions, ids or [[1] * len(c.split()) for c in completions])


def test_builtins():
    recs = _recs("42", "1,234", "7", "Paris")
    comps = ["so the answer: 42.", "It is $1234", "3 + 4 = 8", "answer: paris."]
    out = _score([{"fn": "exact"}, {"fn": "regex", "pattern": r"answer:"}, {"fn": "length", "target": 2},
                  {"fn": "regex", "pattern": r"\d+", "fullmatch": True}], recs, comps)
    assert out[:, 0].tolist() == [1.0, 0.0, 0.0, 1.0]  # after "answer:", case and final period ignored
    assert out[:, 1].tolist() == [1.0, 0.0, 0.0, 1.0]
    assert out[:, 2].tolist() == [-1.0, -0.5, -1.5, 0.0]  # -(words - 2)/2 with one id per word here
    assert out[:, 3].tolist() == [0.0, 0.0, 0.0, 0.0]
    num = _score([{"fn": "numeric"}], recs[:3], comps[:3])
    assert num[:, 0].tolist() == [1.0, 1.0, 0.0]  # the last number; "1,234" and "$1234" are the same


def test_numeric_and_dates_partial_credit():
    recs = _recs("March 5, 1957", "March 5, 1957", "March 5, 1957", "March 5, 1957")
    out = _score([{"fn": "dates"}], recs, ["March 5, 1957", "March 6, 1957", "April 6, 1957", "nothing"])
    assert out[:, 0].tolist() == pytest.approx([1.0, 2 / 3, 1 / 3, 0.0])
    assert date_parts("1957-03-05") == (None, None, 1957)  # the ISO echo is not the word format
    iso = _score([{"fn": "dates"}], recs[:1], ["1957-03-05"])
    assert iso[0, 0] == pytest.approx(1 / 3)
    assert parse_number("x = -3.5 then 7") == 7.0 and parse_number("none") is None


def test_weights_sum(monkeypatch, tmp_path):
    (tmp_path / "myrewards.py").write_text(
        "def starts(prompts, completions, answer, id, completion_ids, **kw):\n"
        "    assert len(prompts) == len(completions) == len(answer) == len(id) == len(completion_ids)\n"
        "    return [float(c.startswith(a)) + 0.5 * (p == 'q1') for p, c, a in zip(prompts, completions, answer)]\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    r = Rewards([RewardConfig(fn="myrewards:starts", weight=2.0), RewardConfig(fn="exact", weight=0.5)])
    out = r(_recs("a", "b"), ["a", "xb"], [[1], [1, 2]])
    assert out.tolist() == [[1.0, 1.0], [0.5, 0.0]]
    assert (out @ r.weights).tolist() == [2.5, 1.0]
    assert r.names == ["starts", "exact"]


@pytest.mark.parametrize("body,msg", [
    ("    if 'bad' in completions: raise ValueError('boom')\n    return [1.0] * len(completions)",
     "reward myr:f raised ValueError: boom on record data.jsonl:2"),
    ("    return [float('nan') if c == 'bad' else 1.0 for c in completions]",
     "reward myr:f returned nan, not a finite number, on record data.jsonl:2"),
    ("    return [None if c == 'bad' else 1.0 for c in completions]",
     "reward myr:f returned None, not a finite number, on record data.jsonl:2"),
])
def test_failing_reward_names_function_and_record(monkeypatch, tmp_path, body, msg):
    mod = f"myr_{abs(hash(body))}"  # a module per case (imports are cached)
    (tmp_path / f"{mod}.py").write_text("def f(prompts, completions, **kw):\n" + body + "\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    msg = msg.replace("myr:f", f"{mod}:f")
    r = Rewards([RewardConfig(fn=f"{mod}:f")])
    with pytest.raises(RewardError) as e:
        r(_recs("x", "y", "z"), ["ok", "bad", "ok"], [[1], [1], [1]])
    assert str(e.value) == msg


def test_wrong_length_and_missing_field(monkeypatch, tmp_path):
    (tmp_path / "myr2.py").write_text("def f(prompts, completions, **kw):\n    return [1.0]\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(RewardError, match="returned 1 values for 2 completions"):
        Rewards([RewardConfig(fn="myr2:f")])(_recs("x", "y"), ["a", "b"], [[1], [1]])
    with pytest.raises(RewardError, match=r"reward numeric raised KeyError: .*no field 'gold'.* on record "
                                          r"data.jsonl:1"):
        Rewards([RewardConfig(fn="numeric", field="gold")])(_recs("1"), ["1"], [[1]])
    with pytest.raises(RewardError, match="cannot import nosuchmod:f"):
        Rewards([RewardConfig(fn="nosuchmod:f")])


def test_config_checks():
    with pytest.raises(ValueError, match="a built-in"):
        RewardConfig(fn="nope")
    with pytest.raises(ValueError, match="needs pattern"):
        RewardConfig(fn="regex")
    assert GRPOConfig().eps_high == 0.2 and GRPOConfig(epsilon_high=0.28).eps_high == 0.28
    assert isinstance(_score([{"fn": "exact"}], _recs("a"), ["a"]), torch.Tensor)
