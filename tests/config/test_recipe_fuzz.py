"""Malformed recipes never give a traceback: always one RecipeError line (exit code 2) naming file and key path.

Property-based (hypothesis) over a valid tiny recipe: random key deletions, wrong types, unknown keys, impossible
values, bad --set overrides and YAML garbage. Everything runs in-process (load_recipe); two checks go through the
CLI (typer's CliRunner). The number of malformed recipes exercised is printed at the end of the module (-s).
"""

from __future__ import annotations

import string
from collections import Counter
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from slimtune.config.recipe import load_recipe
from slimtune.errors import RecipeError, SlimtuneError
from slimtune.models.tiny import udhr_path

FUZZ = settings(max_examples=60, deadline=None, database=None, derandomize=True,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
COUNTS: Counter = Counter()  # kind of mutation -> malformed recipes that raised RecipeError


def base_recipe() -> dict:
    return {
        "name": "fuzz",
        "model": {"name": "tiny-llama", "trust_remote_code": False},
        "quant": {"mode": "nf4", "double_quant": True, "blocksize": 64},
        "adapter": {"kind": "lora", "rank": 4, "alpha": 8, "dropout": 0.1, "targets": ["q_proj", "v_proj"],
                    "layers": {"first": 1, "last": 1}},
        "data": {"sources": [{"path": str(udhr_path("src")), "max_records": 4, "weight": 1.0}], "format": "text",
                 "max_seq_len": 32, "packing": True, "holdout": 0, "on_error": "raise"},
        "train": {"lr": 0.005, "steps": 4, "micro_batch": 2, "grad_accum": 1, "warmup": 0, "seed": 3,
                  "save_every": 1, "keep_checkpoints": 2, "on_nonfinite": "stop", "optimizer": "adamw",
                  "schedule": "cosine", "max_grad_norm": 1.0},
        "output": {"dir": "runs/{name}", "export_peft": False},
    }


REQUIRED = {"model", "model.name", "adapter", "adapter.kind", "data", "data.sources", "data.sources.0",
            "data.sources.0.path"}


def key_paths(d, prefix: str = "") -> list[str]:
    out = []
    items = d.items() if isinstance(d, dict) else enumerate(d) if isinstance(d, list) else []
    for k, v in items:
        p = f"{prefix}.{k}" if prefix else str(k)
        out.append(p)
        out += key_paths(v, p)
    return out


PATHS = key_paths(base_recipe())


def _parent_and_key(d: dict, path: str):
    parts = path.split(".")
    node = d
    for part in parts[:-1]:
        node = node[int(part)] if isinstance(node, list) else node[part]
    last = parts[-1]
    return node, (int(last) if isinstance(node, list) else last)


def delete(d: dict, path: str) -> None:
    node, key = _parent_and_key(d, path)
    if isinstance(node, list):
        if key < len(node):
            node.pop(key)
    else:
        node.pop(key, None)


def set_value(d: dict, path: str, value) -> None:
    node, key = _parent_and_key(d, path)
    node[key] = value


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    yield tmp_path_factory.mktemp("fuzz")
    total = sum(COUNTS.values())
    print(f"\nmalformed recipes exercised: {total} ({dict(sorted(COUNTS.items()))})")


def write(workdir: Path, data) -> Path:
    p = workdir / "recipe.yaml"
    p.write_text(data if isinstance(data, str) else yaml.safe_dump(data, allow_unicode=True), encoding="utf-8")
    return p


def names_place(message: str, file: Path, paths: list[str]) -> bool:
    """The message is `<file>: <key path>: ...` with a key path at, above or below one of the mutated paths."""
    if not message.startswith(f"{file}: "):
        return False
    key = message[len(str(file)) + 2:].split(": ")[0]
    return any(key == p or key.startswith(p + ".") or p.startswith(key + ".") for p in paths)


def check(kind: str, workdir: Path, data, paths: list[str] | None, *, must_fail: bool = False,
          overrides: list[str] | None = None) -> None:
    """Load; the only acceptable failure is a one-line RecipeError (exit code 2) naming the place."""
    path = write(workdir, data)
    try:
        load_recipe(path, overrides)
    except SlimtuneError as e:
        msg = str(e)
        assert isinstance(e, RecipeError) and e.exit_code == 2, (type(e), msg)
        assert "\n" not in msg and "Traceback" not in msg, msg
        assert msg.startswith(str(path)) or (overrides and msg.startswith("--set")), msg
        if paths is not None:
            assert names_place(msg, path, paths), (paths, msg)
        COUNTS[kind] += 1
        return
    assert not must_fail, f"{kind}: {paths} was accepted"


# ---------------------------------------------------------------------------------------------------- properties
@FUZZ
@given(st.lists(st.sampled_from(PATHS), min_size=1, max_size=3, unique=True))
def test_random_key_deletions(workdir, paths):
    d = base_recipe()
    for p in sorted(paths, key=lambda p: -p.count(".")):  # deepest first so parents still exist
        try:
            delete(d, p)
        except (KeyError, IndexError, TypeError):
            pass  # a parent was already deleted
    required = any(p in REQUIRED for p in paths)
    # deleting a whole section reports the first missing key of it, so only demand a name under a deleted path
    check("deleted keys", workdir, d, paths, must_fail=required)


WRONG = st.one_of(
    st.none(), st.booleans(), st.integers(-10**6, 10**6), st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12), st.lists(st.integers(), max_size=3), st.dictionaries(st.text(max_size=5), st.integers(),
                                                                              max_size=2),
)


@FUZZ
@given(st.sampled_from(PATHS), WRONG)
def test_wrong_types(workdir, path, value):
    d = base_recipe()
    set_value(d, path, value)
    check("wrong types", workdir, d, [path])


SECTIONS = ["", "model", "quant", "adapter", "adapter.layers", "data", "data.sources.0", "train", "output"]


@FUZZ
@given(st.sampled_from(SECTIONS), st.text(string.ascii_letters + "_", min_size=1, max_size=14))
def test_unknown_keys(workdir, section, key):
    d = base_recipe()
    node = d
    for part in filter(None, section.split(".")):
        node = node[int(part)] if isinstance(node, list) else node[part]
    from slimtune.adapters.lora import LoRAConfig
    from slimtune.config.data import DataConfig, SourceConfig
    from slimtune.config.recipe import OutputConfig, Recipe, TrainConfig
    from slimtune.models.load import ModelConfig, QuantConfig

    known = {"": Recipe, "model": ModelConfig, "quant": QuantConfig, "adapter": LoRAConfig, "data": DataConfig,
             "data.sources.0": SourceConfig, "train": TrainConfig, "output": OutputConfig}
    fields = set(known[section].model_fields) if section in known else {"first", "last"}
    if key in fields:
        return
    node[key] = 1
    full = f"{section}.{key}" if section else key
    check("unknown keys", workdir, d, [full], must_fail=True)


IMPOSSIBLE = [
    ("adapter.rank", 0), ("adapter.rank", -4), ("adapter.rank", 10**6), ("adapter.alpha", 0),
    ("adapter.alpha", float("nan")), ("adapter.dropout", 1.0), ("adapter.dropout", -0.1), ("adapter.kind", "lorax"),
    ("adapter.layers", [-1]), ("adapter.layers.first", -2), ("adapter.targets", "everything"),
    ("quant.mode", "nf3"), ("quant.blocksize", 7), ("quant.blocksize", 0), ("quant.compute_dtype", "int4"),
    ("data.max_seq_len", 0), ("data.max_seq_len", -5), ("data.format", "audio"), ("data.holdout", 1.5),
    ("data.holdout", -1), ("data.sources", []), ("data.sources.0.path", ""), ("data.sources.0.weight", 0),
    ("data.sources.0.max_records", 0), ("data.sources.0.path", "does/not/exist.jsonl"), ("data.on_error", "ignore"),
    ("data.replay", {"ratio": 1.0, "sources": [{"path": str(udhr_path("ita"))}]}), ("data.replay", {"ratio": 0.2}),
    ("train.lr", 0), ("train.lr", 5.0), ("train.lr", float("inf")), ("train.steps", 0), ("train.epochs", 0),
    ("train.epochs", float("inf")), ("train.micro_batch", 0), ("train.grad_accum", -1), ("train.warmup", -1),
    ("train.seed", -1), ("train.seed", 2**70), ("train.schedule", "exponential"), ("train.optimizer", "sgd"),
    ("train.keep_checkpoints", 0), ("train.save_every", -1), ("train.on_nonfinite", "ignore"),
    ("train.max_grad_norm", -1), ("train.device", "tpu"), ("train.kernels", "cuda"), ("output.dir", "runs/{nope}"),
    ("output.dir", "runs/{"), ("output.merged_dtype", "int8"), ("model.attn_implementation", "flash"),
    ("train.betas", [0.9]),
]


@pytest.mark.parametrize("path,value", IMPOSSIBLE, ids=[f"{p}={v!r}"[:40] for p, v in IMPOSSIBLE])
def test_impossible_values(workdir, path, value):
    d = base_recipe()
    set_value(d, path, value)
    check("impossible values", workdir, d, [path], must_fail=True)


@FUZZ
@given(st.binary(max_size=200))
def test_yaml_garbage_bytes(workdir, blob):
    p = workdir / "recipe.yaml"
    p.write_bytes(blob)
    with pytest.raises(RecipeError) as exc:  # garbage is never a whole valid recipe
        load_recipe(p)
    assert str(exc.value).startswith(str(p)) and "\n" not in str(exc.value)
    COUNTS["yaml garbage"] += 1


@FUZZ
@given(st.integers(0, 10**6), st.text(":{}[]-!&*#|>'\"%@`\t\n ,?", min_size=1, max_size=6))
def test_yaml_corrupted_text(workdir, pos, junk):
    text = yaml.safe_dump(base_recipe())
    i = pos % (len(text) + 1)
    check("corrupted yaml", workdir, text[:i] + junk + text[i:], None)


@FUZZ
@given(st.sampled_from(PATHS + ["train", "nosuch.key", "adapter.rank.deeper"]), st.text(max_size=10))
def test_bad_overrides(workdir, path, raw):
    check("bad --set overrides", workdir, base_recipe(), None, overrides=[f"{path}={raw}"])


def test_override_without_equals(workdir):
    check("bad --set overrides", workdir, base_recipe(), None, overrides=["train.lr"], must_fail=True)


# ---------------------------------------------------------------------------------------------------- CLI
@pytest.mark.parametrize("command", ["validate", "run"])
def test_cli_malformed_recipe_one_line_exit_2(workdir, command):
    from typer.testing import CliRunner

    from slimtune.cli import app

    d = base_recipe()
    d["train"]["lr"] = "fast"
    d["adapter"]["bogus"] = True
    path = write(workdir, d)
    res = CliRunner().invoke(app, [command, str(path)])
    out = res.output
    assert res.exit_code == 2, out
    assert "Traceback" not in out and res.exception is None or isinstance(res.exception, SystemExit), out
    lines = [ln for ln in out.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"error: {path}:"), out
    assert "adapter.bogus: unknown key" in out or "train.lr:" in out, out
    COUNTS["CLI"] += 1
