"""Malformed data never gives a traceback: `data.on_error: raise` → one DataError line (exit code 2) naming
file:line; `skip` → the record is dropped and counted in the stats.

Property-based (hypothesis): a jsonl file of valid records with malformed lines at random places (invalid JSON, wrong
field types, missing fields, non-object records, non-UTF-8 bytes) for the text, chat and instruction formats, plus
random bytes as whole json/txt/parquet files. In-process (build_dataset). The number of malformed records exercised is
printed at the end of the module (-s).
"""

from __future__ import annotations

import json
from collections import Counter

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from slimtune.config.data import DataConfig
from slimtune.data import build_dataset
from slimtune.errors import DataError, SlimtuneError
from slimtune.models.tiny import tiny_tokenizer, udhr_texts

FUZZ = settings(max_examples=40, deadline=None, database=None, derandomize=True,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
COUNTS: Counter = Counter()  # kind -> malformed records exercised
TEXTS = udhr_texts("eng")[:6]


def valid_record(fmt: str, i: int) -> dict:
    text = TEXTS[i % len(TEXTS)]
    if fmt == "text":
        return {"text": text}
    if fmt == "chat":
        return {"messages": [{"role": "user", "content": f"Say article {i}."}, {"role": "assistant", "content": text}]}
    return {"instruction": f"Say article {i}.", "output": text}


def _not_json(s: str) -> bool:
    try:
        json.loads(s)
    except ValueError:
        return True
    return False


INVALID_JSON = st.text(min_size=1, max_size=30).filter(lambda s: "\n" not in s and s.strip() and _not_json(s))
NON_UTF8 = st.binary(min_size=1, max_size=30).map(lambda b: b'{"text": "' + b + b'\xff"}').filter(
    lambda b: b"\n" not in b)
SCALARS = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False), st.lists(st.integers(),
                                                                                                  max_size=2))


def wrong_types(fmt: str):
    if fmt == "text":
        return st.builds(lambda v: {"text": v}, SCALARS.filter(lambda v: v is not None) | st.dictionaries(
            st.text(max_size=3), st.integers(), max_size=2))
    if fmt == "chat":
        msg = st.fixed_dictionaries({"role": st.sampled_from(["user", "assistant"]), "content": st.text(max_size=5)})
        bad_msg = st.one_of(
            SCALARS, st.text(max_size=4),
            st.fixed_dictionaries({"role": SCALARS, "content": st.text(max_size=5)}),
            st.fixed_dictionaries({"role": st.just("user"), "content": SCALARS}),
        )
        return st.one_of(
            st.builds(lambda v: {"messages": v}, SCALARS.filter(lambda v: not isinstance(v, list)) | st.text()),
            st.builds(lambda v: {"messages": []}, st.none()),
            st.builds(lambda a, b: {"messages": a + [b]}, st.lists(msg, max_size=2), bad_msg),
        )
    return st.one_of(
        st.builds(lambda v: {"instruction": v, "output": "x"}, SCALARS.filter(lambda v: v is not None)),
        st.builds(lambda v: {"instruction": "x", "output": v}, SCALARS.filter(lambda v: v is not None)),
        st.builds(lambda v: {"instruction": "x", "output": "y", "input": v},
                  SCALARS.filter(lambda v: v is not None)),
    )


def missing_fields(fmt: str):
    if fmt == "text":
        return st.just({"body": "no text field"})
    if fmt == "chat":
        return st.sampled_from([{"msgs": []}, {"messages": [{"role": "user"}]},
                                {"messages": [{"content": "hi"}]}])
    return st.sampled_from([{"instruction": "x"}, {"output": "y"}, {"input": "z"}])


NON_OBJECTS = st.one_of(st.integers(), st.lists(st.integers(), max_size=2), st.booleans(), st.none())


KINDS = ("invalid JSON", "non-UTF-8", "wrong field type", "missing field", "not an object")


def malformed_line(fmt: str):
    """(kind, raw bytes of one line without its newline); the kind is drawn first so each gets its share."""
    enc = lambda v: json.dumps(v).encode()  # noqa: E731
    strategies = {
        "invalid JSON": INVALID_JSON.map(lambda s: s.encode("utf-8", "surrogatepass")),
        "non-UTF-8": NON_UTF8,
        "wrong field type": wrong_types(fmt).map(enc),
        "missing field": missing_fields(fmt).map(enc),
        "not an object": NON_OBJECTS.map(enc),
    }
    return st.sampled_from(KINDS).flatmap(lambda k: strategies[k].map(lambda raw: (k, raw)))


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    yield tmp_path_factory.mktemp("datafuzz")
    print(f"\nmalformed data records exercised: {sum(COUNTS.values())} ({dict(sorted(COUNTS.items()))})")


def build(path, fmt: str, on_error: str):
    cfg = DataConfig(sources=[{"path": str(path)}], format=fmt, max_seq_len=64, shuffle=False, on_error=on_error)
    return build_dataset(cfg, tiny_tokenizer(), base_dir=path.parent, seed=0)


@pytest.mark.parametrize("fmt", ["text", "chat", "instruction"])
@FUZZ
@given(data=st.data())
def test_malformed_jsonl_records(workdir, fmt, data):
    n_valid = data.draw(st.integers(2, 6), label="valid records")
    bad = data.draw(st.lists(malformed_line(fmt), min_size=1, max_size=3), label="malformed lines")
    lines = [json.dumps(valid_record(fmt, i)).encode() for i in range(n_valid)]
    positions = []
    for kind, raw in bad:
        pos = data.draw(st.integers(0, len(lines)), label="position")
        lines.insert(pos, raw)
        positions = [p + 1 if p >= pos else p for p in positions] + [pos]
    path = workdir / f"{fmt}.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    try:
        got = build(path, fmt, "skip")
    except SlimtuneError as e:  # all valid records could still be too few for one block: a DataError, no traceback
        assert isinstance(e, DataError) and e.exit_code == 2 and "\n" not in str(e), e
    else:
        assert got.stats["skipped_records"] == len(bad), (got.stats, bad)
    with pytest.raises(DataError) as exc:
        build(path, fmt, "raise")
    msg = str(exc.value)
    first = min(positions) + 1  # 1-based line of the first malformed line
    assert exc.value.exit_code == 2 and "\n" not in msg, msg
    assert msg.startswith(f"{path}:{first}: "), (msg, first, bad)
    for kind, _ in bad:
        COUNTS[f"{fmt}: {kind}"] += 1


@pytest.mark.parametrize("suffix", [".json", ".txt", ".parquet", ".jsonl"])
@FUZZ
@given(blob=st.binary(max_size=120))
def test_random_bytes_files(workdir, suffix, blob):
    path = workdir / f"garbage{suffix}"
    path.write_bytes(blob)
    for on_error in ("raise", "skip"):
        try:
            build(path, "text", on_error)
        except SlimtuneError as e:
            msg = str(e)
            assert isinstance(e, DataError) and e.exit_code == 2, (type(e), msg)
            assert "\n" not in msg and msg.startswith((str(path), "data:")), msg
    COUNTS[f"whole {suffix} file"] += 1


def test_summary_counts_skipped(workdir):
    path = workdir / "mixed.jsonl"
    lines = [json.dumps(valid_record("text", i)) for i in range(4)]
    lines[1:1] = ["{not json", '{"text": 3}']
    path.write_bytes(("\n".join(lines) + "\n").encode() + b'{"text": "\xff"}\n')
    got = build(path, "text", "skip")
    assert got.stats["skipped_records"] == 3 and got.stats["sources"]["mixed"]["skipped"] == 3
    COUNTS["text: mixed"] += 3
