"""The shipped recipes and their small data install with the wheel: `slimtune recipes` and `slimtune cp` work from
an installed wheel (built from a copy of the sources, installed into a temporary folder)."""

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    pytest.importorskip("setuptools")
    src = tmp_path_factory.mktemp("src")
    skip = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info")
    for name in ("slimtune", "kernels", "recipes"):
        shutil.copytree(ROOT / name, src / name, ignore=skip)
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, src / name)
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out),
                    str(src)], check=True, capture_output=True, timeout=300)
    (whl,) = out.glob("slimtune-*.whl")
    return whl


def test_wheel_holds_the_recipes_and_their_data(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    for recipe in ROOT.glob("recipes/*.yaml"):
        assert f"slimtune/recipes/{recipe.name}" in names, recipe.name
    for data in ROOT.glob("recipes/data/**/*.jsonl"):
        assert f"slimtune/recipes/{data.relative_to(ROOT / 'recipes').as_posix()}" in names, data
    assert "slimtune/cli/runs.py" in names
    kernels = {f"slimtune/kernels/{p.name}" for p in ROOT.glob("kernels/*.py")}
    assert len(kernels) >= 7 and kernels <= names, kernels - names  # the folder, installed as slimtune.kernels
    assert not any(n.startswith("kernels/") for n in names)  # never as a top-level `kernels`


def test_recipes_and_cp_from_an_installed_wheel(wheel, tmp_path):
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(wheel)],
                   check=True, capture_output=True, timeout=300)
    env = {**os.environ, "PYTHONPATH": str(target), "COLUMNS": "200"}
    work = tmp_path / "work"
    work.mkdir()

    script = """
import json, sys
from typer.testing import CliRunner
from slimtune.cli import app
r = CliRunner()
import os
import slimtune.kernels.rms_norm as k  # from the wheel's slimtune/kernels, not the checkout
assert k.__file__ == os.path.join(os.environ["PYTHONPATH"], "slimtune", "kernels", "rms_norm.py"), k.__file__
out = [r.invoke(app, a.split()) for a in ("recipes", "cp demo", "validate demo.yaml", "cp demo")]
print(json.dumps([[x.exit_code, x.output] for x in out]))
"""
    res = subprocess.run([sys.executable, "-c", script], cwd=work, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    (listed, copied, validated, again) = json.loads(res.stdout.strip().splitlines()[-1])
    assert listed[0] == 0 and str(target / "slimtune" / "recipes") in listed[1].replace("\n", "")
    assert "demo.yaml" in listed[1]
    assert copied[0] == 0, copied
    assert (work / "demo.yaml").read_text() == (ROOT / "recipes" / "demo.yaml").read_text()
    assert (work / "data" / "demo_dates_train.jsonl").is_file()  # the data it names, beside the copy
    assert validated[0] == 0 and "records of 1 local sources checked" in validated[1], validated
    assert again[0] == 2 and "exists" in again[1]


def test_the_checkout_root_on_sys_path_shadows_nothing():
    """`python -c`, `python -m slimtune` and torchrun started in the repository root put the root first on sys.path:
    its kernels/ folder (no __init__.py) must not hide the PyPI package `kernels` that transformers imports while
    loading any model, and must still be slimtune.kernels."""
    script = """
import json, kernels
from transformers import LlamaConfig
from transformers.integrations import hub_kernels
import slimtune.kernels.rms_norm as k
print(json.dumps([kernels.__file__, k.__name__, k.__file__]))
"""
    res = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    pypi, name, ours = json.loads(res.stdout.strip().splitlines()[-1])
    assert "site-packages" in pypi and not pypi.startswith(str(ROOT / "kernels")), pypi
    assert name == "slimtune.kernels.rms_norm" and ours == str(ROOT / "kernels" / "rms_norm.py")
    res = subprocess.run([sys.executable, "-m", "slimtune", "validate", "recipes/demo.yaml"], cwd=ROOT,
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0 and res.stdout.startswith("ok "), res.stdout + res.stderr[-3000:]
