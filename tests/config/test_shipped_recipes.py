"""Every YAML shipped in recipes/ validates (and names an adapter kind that exists)."""

from pathlib import Path

import pytest

from slimtune.adapters.base import modes, registry
from slimtune.config.recipe import load_recipe

RECIPES = sorted((Path(__file__).resolve().parents[2] / "recipes").glob("*.yaml"))


def test_there_are_recipes():
    assert any(p.name == "demo.yaml" for p in RECIPES)


@pytest.mark.parametrize("path", RECIPES, ids=[p.name for p in RECIPES])
def test_recipe_validates(path):
    r = load_recipe(path)
    assert r.description, f"{path.name}: add a one-line description"
    assert r.adapter.kind in registry() | modes()  # modes: adapter.kind full (slimtune.adapters.full)
    for stage, sr in r.resolved_stages():
        assert sr.adapter.kind in registry() | modes()


def test_demo_data_is_what_the_generator_writes(tmp_path):
    from slimtune.demo import generate

    train, test = generate(tmp_path)
    shipped = Path(__file__).resolve().parents[2] / "recipes" / "data"
    assert train.read_bytes() == (shipped / train.name).read_bytes()
    assert test.read_bytes() == (shipped / test.name).read_bytes()
    train_prompts = {ln for ln in train.read_text().splitlines()}
    assert not train_prompts & set(test.read_text().splitlines())  # disjoint


@pytest.mark.parametrize("path", RECIPES, ids=[p.name for p in RECIPES])
def test_bounded_hub_sources_stream(path):
    """A hub source cut by max_records (Wikipedia dumps, MetaMathQA) streams: only those records are fetched, never
    the whole dump first."""
    r = load_recipe(path)
    datas = [sr.data for _, sr in r.resolved_stages() if sr.data is not None]
    if r.loram is not None and r.loram.align is not None:
        datas.append(r.loram.align.data)
    for d in datas:
        for src in d.sources + (d.replay.sources if d.replay else []):
            if src.path.startswith("hub:") and src.max_records:
                assert src.streaming, f"{path.name}: {src.path} {src.subset or ''}: set streaming: true"
