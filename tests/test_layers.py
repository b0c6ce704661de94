"""The package's layering (DESIGN §10): no import cycle between fedllm modules, nothing
imports upward, the wire loads no training loop, and no function takes the untyped
federation object `fed`. Checked on the source with `ast`, so nothing is imported and every
import counts, also inside functions."""
import ast
from pathlib import Path

# prefix -> layer, bottom up; a module takes the layer of its longest matching prefix.
# The root "fedllm" matches only the package's own __init__, not everything below it.
LAYERS = {
    "fedllm.wire": 0, "fedllm.state": 0, "fedllm.distributed": 0, "fedllm.metrics": 0, "fedllm.seeds": 0,
    "fedllm.rundir": 0, "fedllm.threads": 0, "fedllm.summary": 0, "fedllm.lazy": 0, "fedllm.balance": 0,
    "fedllm.registry": 1, "fedllm.recipe": 1, "fedllm.errors": 1,
    "fedllm.data": 2, "fedllm.models": 2, "fedllm.placement": 2, "fedllm.zero": 2, "fedllm.base_layout": 2,
    "fedllm.strategies": 3, "fedllm.codecs": 3, "fedllm.privacy": 3, "fedllm.samplers": 3, "fedllm.attacks": 3,
    "fedllm.training": 3, "fedllm.devices": 3, "fedllm.secagg": 3,
    "fedllm.adapters": 4,
    "fedllm.client": 5, "fedllm.server": 5, "fedllm.channel": 5, "fedllm.collectors": 5, "fedllm.loops": 5,
    "fedllm.engine": 6, "fedllm.fleet": 6, "fedllm.asynchrony": 6, "fedllm.evaluation": 6,
    "fedllm.export": 6, "fedllm.capabilities": 6,
    "fedllm.cli": 7, "fedllm.launcher": 7, "fedllm.eval_cli": 7, "fedllm.integrations": 7, "fedllm.deploy": 7, "fedllm.__main__": 7, "fedllm": 7,
}
PACKAGE = Path(__file__).parents[1] / "fedllm"


def modules(root: Path) -> dict[str, Path]:
    """Dotted module name -> file, for every .py file of the package at `root`."""
    out = {}
    for path in sorted(root.rglob("*.py")):
        parts = list(path.relative_to(root.parent).with_suffix("").parts)
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def executed(tree: ast.AST):
    """Every node that runs, minus the bodies of `if TYPE_CHECKING:` blocks: those imports
    never execute, so they can neither form a cycle at run time nor load an upper layer."""
    for node in ast.iter_child_nodes(tree):
        test = node.test if isinstance(node, ast.If) else None
        if test is not None and "TYPE_CHECKING" in (getattr(test, "id", None), getattr(test, "attr", None)):
            for other in node.orelse:
                yield other
                yield from executed(other)
        else:
            yield node
            yield from executed(node)


def imports(name: str, path: Path, known: set[str]) -> set[str]:
    """The package modules that `name` imports (a parent package's __init__, which Python
    runs on the way, is not counted: it is the parent's own edges that matter)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in executed(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package
            for _ in range(node.level - 1):
                base = base.rpartition(".")[0]
            base = ".".join(p for p in (base if node.level else "", node.module or "") if p)
            for alias in node.names:  # `from pkg import sub` imports the submodule pkg.sub
                found.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base)
    return {m for m in found if m in known and m != name}


def parents(name: str) -> set[str]:
    """pkg.sub.a -> {pkg.sub, pkg}: the packages whose __init__ runs before the module."""
    return {name.rsplit(".", i)[0] for i in range(1, name.count(".") + 1)}


def loaded_by(names: list[str], root: Path) -> dict[str, list[str]]:
    """Every package module that importing `names` runs, each with one chain of imports that
    leads to it. Unlike the layering's edges, a parent package's __init__ counts here: Python
    runs it on the way to any of its submodules."""
    mods = modules(root)
    graph = {m: imports(m, p, set(mods)) | parents(m) for m, p in mods.items()}
    chains, frontier = {name: [name] for name in names}, list(names)
    while frontier:  # breadth first: each chain is a shortest one
        v = frontier.pop(0)
        for w in sorted(graph[v] - set(chains)):
            chains[w] = chains[v] + [w]
            frontier.append(w)
    return chains


def layer(name: str, layers: dict[str, int]):
    hits = [p for p in layers if name == p or ("." in p and name.startswith(p + "."))]
    return layers[max(hits, key=len)] if hits else None


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One concrete cycle per strongly connected component of more than one module."""
    index, low, stack, on, comps = {}, {}, [], set(), []

    def visit(v):  # Tarjan
        index[v] = low[v] = len(index)
        stack.append(v), on.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = set()
            while v not in comp:
                w = stack.pop()
                on.discard(w), comp.add(w)
            comps.append(comp)

    for v in sorted(graph):
        if v not in index:
            visit(v)
    out = []
    for comp in (c for c in comps if len(c) > 1):
        start = min(comp)
        paths = {start: [start]}
        frontier = [start]
        while frontier:  # shortest way around the component, back to its first module
            v = frontier.pop(0)
            nxt = sorted(w for w in graph[v] if w in comp)
            if start in nxt:
                out.append(paths[v] + [start])
                break
            for w in (w for w in nxt if w not in paths):
                paths[w] = paths[v] + [w]
                frontier.append(w)
    return out


def problems(root: Path, layers: dict[str, int]) -> list[str]:
    mods = modules(root)
    graph = {m: imports(m, p, set(mods)) for m, p in mods.items()}
    out = [f"{m} is in no layer: add it to LAYERS in tests/test_layers.py" for m in mods if layer(m, layers) is None]
    for a in sorted(graph):
        for b in sorted(graph[a]):
            la, lb = layer(a, layers), layer(b, layers)
            if la is not None and lb is not None and lb > la:
                out.append(f"upward import: {a} (layer {la}) -> {b} (layer {lb})")
    out += ["import cycle: " + " -> ".join(c) for c in cycles(graph)]
    for m, path in mods.items():
        nodes = sorted((n for n in ast.walk(ast.parse(path.read_text())) if hasattr(n, "lineno")), key=lambda n: n.lineno)
        for node in nodes:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
                a = node.args
                if "fed" in [x.arg for x in a.posonlyargs + a.args + a.kwonlyargs + [a.vararg, a.kwarg] if x]:
                    out.append(f"{path.relative_to(root.parent)}:{node.lineno} {getattr(node, 'name', 'lambda')} takes `fed`")
    return out


def test_fedllm_imports_only_downward_without_cycles_and_no_function_takes_fed():
    found = problems(PACKAGE, LAYERS)
    assert not found, f"{len(found)} layering problems:\n" + "\n".join(found)


def test_the_wire_loads_no_training_loop():
    """A seeded (seed, scalar) message is a wire concept (fedllm.codecs.seeded): the wire and
    the channel decode every upload without a local loop, not even through a package's __init__."""
    chains = loaded_by(["fedllm.wire", "fedllm.channel"], PACKAGE)
    found = [" -> ".join(chains[m]) for m in chains if m == "fedllm.loops" or m.startswith("fedllm.loops.")]
    assert not found, "\n".join(found)


def classes_deriving(root: Path, base: str) -> list[str]:
    """Every class of the package that names `base` among its bases."""
    found = []
    for name, path in modules(root).items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ClassDef) and any(getattr(b, "id", getattr(b, "attr", None)) == base for b in node.bases):
                found.append(f"{name}.{node.name}")
    return found


def builders_of(root: Path, callee: str) -> set[str]:
    """The package modules that call `callee(...)` (by its bare or dotted name)."""
    out = set()
    for name, path in modules(root).items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and getattr(node.func, "id", getattr(node.func, "attr", None)) == callee:
                out.add(name)
    return out


def test_every_driver_composes_the_federation_and_the_round_tail_is_written_once():
    """Sync, async, deployed and Trainer-callback rounds reach the server half through
    fedllm.server (DESIGN §12): nothing derives from Federation, and only the server builds
    the RoundInfo an aggregation is handed (a second round tail would build its own)."""
    assert classes_deriving(PACKAGE, "Federation") == []
    assert builders_of(PACKAGE, "RoundInfo") == {"fedllm.server"}


# ---- the checker itself, on a synthetic package ----------------------------------------
def package(tmp_path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        (tmp_path / "pkg" / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "pkg" / name).write_text(text)
    return tmp_path / "pkg"


TOY = {"pkg": 2, "pkg.low": 0, "pkg.sub": 1, "pkg.high": 2}


def test_the_composition_checks_find_a_subclass_and_a_second_round_tail(tmp_path):
    root = package(tmp_path, {"__init__.py": "", "engine.py": "class Federation:\n    pass\n",
                              "server.py": "RoundInfo(0, [], 0.0, 1)\n",
                              "deployed.py": "from pkg import engine\nclass Deployed(engine.Federation):\n    pass\n"
                                             "def tail():\n    return RoundInfo(1, [], 0.0, 1)\n"})
    assert classes_deriving(root, "Federation") == ["pkg.deployed.Deployed"]
    assert builders_of(root, "RoundInfo") == {"pkg.server", "pkg.deployed"}


def test_checker_passes_a_clean_package(tmp_path):
    root = package(tmp_path, {
        "__init__.py": "from pkg import high\n", "low.py": "import os\n", "sub/__init__.py": "from ..low import x\n",
        "sub/a.py": "from . import b\nfrom pkg.low import y\n", "sub/b.py": "",
        "high.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg import high\nimport pkg.sub.a\n",
    })
    assert problems(root, TOY) == []


def test_checker_finds_a_cycle_an_upward_import_an_unmapped_module_and_fed(tmp_path):
    root = package(tmp_path, {
        "__init__.py": "", "low.py": "def f():\n    from pkg.sub import a\n",  # inside a function: still counts
        "sub/__init__.py": "", "sub/a.py": "from .b import z\n", "sub/b.py": "from pkg.sub import a\n",
        "high.py": "def run(model, fed):\n    pass\n", "stray.py": "",
    })
    assert sorted(problems(root, TOY)) == sorted([
        "pkg.stray is in no layer: add it to LAYERS in tests/test_layers.py",
        "upward import: pkg.low (layer 0) -> pkg.sub.a (layer 1)",
        "import cycle: pkg.sub.a -> pkg.sub.b -> pkg.sub.a",
        "pkg/high.py:1 run takes `fed`",
    ])


def test_loaded_by_follows_imports_and_the_init_of_each_parent_package(tmp_path):
    root = package(tmp_path, {
        "__init__.py": "", "low.py": "from pkg.sub import a\n", "sub/__init__.py": "from pkg import high\n",
        "sub/a.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg import stray\n",
        "high.py": "", "stray.py": "",
    })
    assert loaded_by(["pkg.low"], root) == {
        "pkg.low": ["pkg.low"], "pkg": ["pkg.low", "pkg"], "pkg.sub.a": ["pkg.low", "pkg.sub.a"],
        "pkg.sub": ["pkg.low", "pkg.sub.a", "pkg.sub"], "pkg.high": ["pkg.low", "pkg.sub.a", "pkg.sub", "pkg.high"],
    }


def test_only_the_entry_point_imports_the_cli():
    """The one-line error reporting every command shares lives in fedllm.errors; nothing but
    `python -m fedllm` reaches into the CLI (a party's worker once imported it for that)."""
    found = modules(PACKAGE)
    users = sorted(name for name, path in found.items() if "fedllm.cli" in imports(name, path, set(found)))
    assert users == ["fedllm.__main__"], users
