"""The layering contract: slimtune's packages import one way only, without cycles — lazy imports included.

    cli → bench → loram → train → objectives → eval → export → data → config → models → adapters → ops → kernels

An arrow is "may import"; a package may also import its own modules. ``slimtune.errors`` and ``slimtune.io`` are
importable from every layer (they import no other slimtune module). ``slimtune.doctor``, ``smoke`` and ``demo``
belong to the cli layer (only the CLI uses them). ``kernels/`` (installed as ``slimtune.kernels``) imports nothing
from slimtune outside itself, and the rest reaches it only through ``slimtune.ops.dispatch.triton_module(name)`` (so
the torch backend runs without triton).

Every import is read from the source with ``ast``: module level, inside functions, and ``importlib.import_module``
calls (a string literal, or an f-string's constant prefix). A dynamic import is allowed only where ``DYNAMIC``
lists it, or when it loads modules of the importing module's own package (the adapter and family registries find
their one-file-per-kind modules that way). ``if TYPE_CHECKING:`` imports are checked for direction but are not
edges of the cycle check (they never run).

Outside the cli layer (where lazy imports keep start-up fast) slimtune modules are imported at the top of a module,
never inside a function. ``python tests/test_layering.py`` prints the counts (module-level / function-level internal imports) and every
offender.
"""

from __future__ import annotations

import ast
import functools
import sys
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path


REPO = Path(__file__).resolve().parents[1]
LAYERS = ("cli", "bench", "loram", "train", "objectives", "eval", "export", "data", "config", "models", "adapters",
          "ops", "kernels")
ANYWHERE = ("slimtune", "slimtune.errors", "slimtune.io")  # the package itself: its version only
PLACED = {"slimtune.doctor": "cli", "slimtune.smoke": "cli", "slimtune.demo": "cli", "slimtune.__main__": "cli"}
# (module, function) → why a dynamic import there is fine
DYNAMIC = {
    ("slimtune.ops.dispatch", "triton_module"): "the one way from ops/ to the optional Triton kernels",
    ("slimtune.doctor", "_import_error"): "checks that third-party packages import",
    ("slimtune.objectives.rewards", "load_callable"): "GRPO's user reward functions, named by import path in a recipe",
}
# Other helpers' files that are mid-work at the deadline, each listed in the report: {module: reason}
KNOWN: dict[str, str] = {}


@dataclass(frozen=True)
class Import:
    source: str  # importing module
    target: str  # imported slimtune module (or a package prefix for an f-string import)
    line: int
    where: str  # "module" | "function" | "dynamic"
    function: str | None
    type_checking: bool = False

    def __str__(self) -> str:
        how = {"module": "", "function": f" (inside {self.function})", "dynamic": f" (import_module in "
               f"{self.function})"}[self.where]
        return f"{self.source}:{self.line} imports {self.target}{how}"


@functools.cache
def modules() -> dict[str, Path]:
    """Every slimtune module: slimtune/**.py and kernels/**.py (installed as slimtune.kernels)."""
    out = {}
    for root, name in ((REPO / "slimtune", "slimtune"), (REPO / "kernels", "slimtune.kernels")):
        for path in sorted(root.rglob("*.py")):
            parts = list(path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join([name, *parts])] = path
    return out


def layer(module: str) -> str | None:
    """The layer of a module: its package under slimtune, "anywhere" for errors/io, or PLACED."""
    if module in ANYWHERE:
        return "anywhere"
    if module in PLACED:
        return PLACED[module]
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in LAYERS else None


def _resolve(name: str, known: dict[str, Path]) -> str:
    """The longest known module that ``name`` names (``slimtune.train.loop.Trainer`` → ``slimtune.train.loop``)."""
    parts = name.split(".")
    for k in range(len(parts), 0, -1):
        cand = ".".join(parts[:k])
        if cand in known:
            return cand
    return name


class _Visitor(ast.NodeVisitor):
    def __init__(self, module: str, is_pkg: bool, known: dict[str, Path]):
        self.module, self.is_pkg, self.known = module, is_pkg, known
        self.found: list[Import] = []
        self.dynamic_unresolved: list[Import] = []
        self.func: list[str] = []
        self.tc = 0

    def _add(self, target: str, node: ast.AST, where: str | None = None) -> None:
        if target != "slimtune" and not target.startswith("slimtune."):
            return
        where = where or ("function" if self.func else "module")
        self.found.append(Import(self.module, _resolve(target, self.known), node.lineno, where,
                                 self.func[-1] if self.func else None, self.tc > 0))

    def _func(self, node) -> None:
        self.func.append(node.name)
        self.generic_visit(node)
        self.func.pop()

    visit_FunctionDef = visit_AsyncFunctionDef = _func

    def visit_If(self, node: ast.If) -> None:
        test = node.test
        is_tc = (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
            isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")
        if is_tc:
            self.tc += 1
            for n in node.body:
                self.visit(n)
            self.tc -= 1
            for n in node.orelse:
                self.visit(n)
        else:
            self.generic_visit(node)

    def visit_Import(self, node: ast.Import) -> None:
        for a in node.names:
            self._add(a.name, node)

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        base = node.module or ""
        if node.level:
            pkg = self.module.split(".") if self.is_pkg else self.module.split(".")[:-1]
            pkg = pkg[: len(pkg) - (node.level - 1)]
            base = ".".join(pkg + ([base] if base else []))
        for a in node.names:  # `from pkg import module` imports that module
            full = f"{base}.{a.name}"
            self._add(full if full in self.known else base, node)

    def visit_Call(self, node: ast.Call) -> None:
        f = node.func
        name = f.attr if isinstance(f, ast.Attribute) else f.id if isinstance(f, ast.Name) else None
        if name in ("import_module", "__import__") and node.args:
            arg = node.args[0]
            target = None
            if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
                target = arg.value
            elif isinstance(arg, ast.JoinedStr) and arg.values and isinstance(arg.values[0], ast.Constant):
                target = str(arg.values[0].value).rstrip(".")
            imp = Import(self.module, _resolve(target, self.known) if target else "<computed>", node.lineno,
                         "dynamic", self.func[-1] if self.func else "<module>")
            if target is None:
                self.dynamic_unresolved.append(imp)
            elif target == "slimtune" or target.startswith("slimtune."):
                self.found.append(imp)
        self.generic_visit(node)


def imports() -> tuple[list[Import], list[Import]]:
    """(every internal import, dynamic imports whose target is not a literal)."""
    known = modules()
    found, unresolved = [], []
    for mod, path in known.items():
        v = _Visitor(mod, path.name == "__init__.py", known)
        v.visit(ast.parse(path.read_text(), filename=str(path)))
        found += v.found
        unresolved += v.dynamic_unresolved
    return found, unresolved


def _package(module: str) -> str:
    return module if modules()[module].name == "__init__.py" else module.rpartition(".")[0]


def _own_package(imp: Import) -> bool:
    pkg = _package(imp.source)
    return imp.target == pkg or imp.target.startswith(pkg + ".")


def direction_violations(found: list[Import], unresolved: list[Import]) -> list[str]:
    out = []
    for imp in found:
        src, dst = layer(imp.source), layer(imp.target)
        if src is None:
            out.append(f"{imp.source}: not in a layer (add it to LAYERS/PLACED)")
            continue
        if imp.where == "dynamic" and (imp.source, imp.function) not in DYNAMIC and not _own_package(imp):
            out.append(f"{imp}: a dynamic import (only slimtune.ops.dispatch.triton_module may import dynamically)")
            continue
        if dst == "kernels" and src != "kernels" and (imp.source, imp.function) not in DYNAMIC:
            out.append(f"{imp}: kernels are reached only through slimtune.ops.dispatch.triton_module")
        elif src == "kernels" and dst != "kernels":
            out.append(f"{imp}: kernels/ imports only torch, triton and slimtune.kernels")
        elif src == "anywhere" and dst != "anywhere":
            out.append(f"{imp}: {imp.source} is importable from everywhere, so it imports no layer")
        elif dst in (None, "anywhere") or dst == src or dst == "kernels":
            continue
        elif LAYERS.index(dst) < LAYERS.index(src):
            out.append(f"{imp}: {src} → {dst} goes up the layers")
    for imp in unresolved:
        if (imp.source, imp.function) not in DYNAMIC:
            out.append(f"{imp}: a dynamic import of a computed name")
    return list(dict.fromkeys(out))  # `from x import a, b` is one offence


def _sccs(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one node (Tarjan, iterative)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph.get(root, ()))))]
        index[root] = low[root] = counter[0]
        counter[0] += 1
        stack.append(root)
        on.add(root)
        while work:
            node, it = work[-1]
            nxt = next(it, None)
            if nxt is not None:
                if nxt not in index:
                    index[nxt] = low[nxt] = counter[0]
                    counter[0] += 1
                    stack.append(nxt)
                    on.add(nxt)
                    work.append((nxt, iter(sorted(graph.get(nxt, ())))))
                elif nxt in on:
                    low[node] = min(low[node], index[nxt])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                comp = []
                while True:
                    w = stack.pop()
                    on.discard(w)
                    comp.append(w)
                    if w == node:
                        break
                if len(comp) > 1:
                    out.append(sorted(comp))
    return out


def cycles(found: list[Import]) -> list[str]:
    """Module cycles (runtime imports: module level, in functions, dynamic), each with the imports that close it."""
    graph: dict[str, set[str]] = defaultdict(set)
    edges: dict[tuple[str, str], Import] = {}
    for imp in found:
        if imp.type_checking or imp.target == imp.source:
            continue
        graph[imp.source].add(imp.target)
        edges.setdefault((imp.source, imp.target), imp)
    out = []
    for comp in _sccs(graph):
        members = set(comp)
        inner = [str(edges[(a, b)]) for a in comp for b in sorted(graph[a]) if b in members]
        out.append(f"cycle {' ↔ '.join(comp)}: " + "; ".join(inner))
    return out


def _not_known(lines: list[str]) -> list[str]:
    return [ln for ln in lines if ln.split(":")[0] not in KNOWN]


def test_every_module_has_a_layer():
    assert [m for m in modules() if layer(m) is None] == []


def test_imports_point_down_the_layers():
    found, unresolved = imports()
    bad = _not_known(direction_violations(found, unresolved))
    assert not bad, "imports against the layering contract:\n" + "\n".join(bad)


def test_no_import_cycles():
    found, _ = imports()
    bad = [c for c in cycles(found) if not all(m in KNOWN for m in c.split(":")[0].removeprefix("cycle ")
                                               .split(" ↔ "))]
    assert not bad, "import cycles:\n" + "\n".join(bad)


def test_function_level_imports_only_in_the_cli_layer():
    """No import inside a function outside the cli layer (there, lazy imports keep `slimtune --help` fast): with the
    layers one-way, a slimtune module can always be imported at the top. A registry importing its own package to
    list its modules is fine."""
    found, _ = imports()
    bad = sorted({str(i) for i in found if i.where == "function" and layer(i.source) != "cli"
                  and i.target != _package(i.source) and i.source not in KNOWN})
    assert not bad, "imports inside functions (move them to the top of the module):\n" + "\n".join(bad)


def test_the_checker_sees_function_level_and_dynamic_imports(tmp_path):
    """The checker itself: an upward import inside a function and an import_module string are both caught."""
    src = ("import importlib\n\ndef f():\n    from slimtune.train.loop import Trainer\n"
           "    return importlib.import_module('slimtune.bench.runner')\n")
    known = {"slimtune.data.x": tmp_path / "x.py", "slimtune.train.loop": tmp_path / "l.py",
             "slimtune.bench.runner": tmp_path / "r.py"}
    v = _Visitor("slimtune.data.x", False, known)
    v.visit(ast.parse(src))
    assert [(i.target, i.where) for i in v.found] == [("slimtune.train.loop", "function"),
                                                      ("slimtune.bench.runner", "dynamic")]
    assert _sccs({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


if __name__ == "__main__":  # counts and offenders
    found, unresolved = imports()
    static = list({(i.source, i.line): i for i in found if i.where != "dynamic"}.values())  # statements
    fn = [i for i in static if i.where == "function"]
    print(f"{len(static)} internal import statements: {len(static) - len(fn)} at module level, {len(fn)} inside "
          f"functions; {len([i for i in found if i.where == 'dynamic'])} dynamic")
    pkgs = defaultdict(set)
    for i in found:
        if not i.type_checking and layer(i.source) != layer(i.target):
            pkgs[layer(i.source)].add(layer(i.target))
    print("package cycles:", _sccs({k: set(v) for k, v in pkgs.items()}))
    for line in direction_violations(found, unresolved) + cycles(found):
        print(line)
    sys.exit(0)
