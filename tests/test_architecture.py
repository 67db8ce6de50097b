"""The floors of the code (docs/ARCHITECTURE.md), read off every module's imports, lazy ones included:

    geovote  <-  embed, index  <-  retrieve  <-  finetune  <-  benchmark        (libraries)
    commands (python -m ...) on top: they may import any library; nothing imports a command.

A library may import its own package and the floors below it, never a sibling on its floor or a floor
above. `geovote/` and the voting predictor never import torch (or FAISS, open_clip) at module level.
"""
import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FLOOR = {"geovote": 0, "embed": 1, "index": 1, "retrieve": 2, "finetune": 3, "benchmark": 4}
COMMANDS = {  # the modules run with `python -m`: parse, call a library, report
    "embed.build", "retrieve.query", "retrieve.tune", "retrieve.serve", "finetune.train", "benchmark.run",
    "benchmark.score", "geovote.sample", "geovote.download", "benchmark.embed_bench", "benchmark.index_bench",
    "benchmark.query_bench", "benchmark.serve_load", "benchmark.csv_read", "benchmark.gpu_check",
    "benchmark.vote_bench", "retrieve.publish", "benchmark.album_bench", "benchmark.album_eval",
    "benchmark.share_bench", "benchmark.shard_io",
    "geovote.console",
}
HEAVY = ("torch", "faiss", "open_clip", "torchvision")
TORCH_FREE = ("geovote", "retrieve.predict")


def modules() -> dict[str, Path]:
    out = {}
    for package in FLOOR:
        for path in sorted((ROOT / package).rglob("*.py")):
            name = ".".join(path.relative_to(ROOT).with_suffix("").parts)
            out[name.removesuffix(".__init__")] = path
    return out


def imports(path: Path) -> list[tuple[str, int, bool]]:
    """(imported module, line, at module level) for every import statement in the file."""
    tree = ast.parse(path.read_text(), str(path))
    top = {id(node) for node in tree.body}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(a.name, node.lineno, id(node) in top) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found += [(node.module, node.lineno, id(node) in top)]
            # `from geovote import distributed`: the submodule is what is imported
            found += [(f"{node.module}.{a.name}", node.lineno, id(node) in top) for a in node.names]
    return found


def violations(mods: dict[str, Path], root: Path = ROOT) -> list[str]:
    bad = []
    for name, path in mods.items():
        package = name.split(".")[0]
        for target, line, top_level in imports(path):
            where = f"{path.relative_to(root)}:{line}: {name} imports {target}"
            if target in COMMANDS:
                bad.append(f"{where}, a command")
                continue
            if top_level and target.split(".")[0] in HEAVY and name.startswith(TORCH_FREE):
                bad.append(f"{where} at module level (the numpy core must import without it)")
            other = target.split(".")[0]
            if name in COMMANDS or other not in FLOOR or other == package:
                continue
            if FLOOR[other] >= FLOOR[package]:
                bad.append(f"{where}: floor {FLOOR[other]} from floor {FLOOR[package]}")
    return bad


def test_every_import_points_down_and_no_library_imports_a_command():
    mods = modules()
    assert {"embed.split", "retrieve.engine", "geovote.layout", "benchmark.methods"} <= set(mods)
    assert set(COMMANDS) <= set(mods), set(COMMANDS) - set(mods)
    assert violations(mods) == []


def test_the_check_catches_each_kind_of_violation(tmp_path):
    """The rule above, on made-up modules: an upward import, a sibling, a command, torch in the core."""
    cases = {
        "embed.up": "from retrieve.engine import Engine\n",
        "embed.sibling": "def f():\n    from index.search import GeoIndex\n",
        "retrieve.cmd": "from retrieve.query import main\n",
        "geovote.heavy": "import torch\n",
        "retrieve.fine": "from geovote.geo import haversine_km\nfrom embed.features import pick_device\n",
        "geovote.lazy": "def f():\n    import torch\n",
    }
    mods = {}
    for name, text in cases.items():
        mods[name] = tmp_path / f"{name}.py"
        mods[name].write_text(text)
    found = violations(mods, root=tmp_path)
    flagged = {line.split(": ")[1].split(" imports ")[0] for line in found}
    assert flagged == {"embed.up", "embed.sibling", "retrieve.cmd", "geovote.heavy"}


def circles(mods: dict[str, Path]) -> list[list[str]]:
    """Groups of modules that import each other, directly or round a ring (lazy imports count: a lazy
    import only hides a circle), by Tarjan's strongly connected components."""
    graph = {name: sorted({t for t, _, _ in imports(path) if t in mods and t != name})
             for name, path in mods.items()}
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                found.append(sorted(group))

    for v in graph:
        if v not in index:
            visit(v)
    return found


def test_no_two_modules_import_each_other():
    assert circles(modules()) == []


def test_the_circle_check_finds_a_ring(tmp_path):
    cases = {"index.a": "def f():\n    from index.b import g\n", "index.b": "from index.c import h\n",
             "index.c": "import index.a\n", "index.d": "from index.a import f\n"}
    mods = {}
    for name, text in cases.items():
        mods[name] = tmp_path / f"{name}.py"
        mods[name].write_text(text)
    assert circles(mods) == [["index.a", "index.b", "index.c"]]


@pytest.mark.parametrize("module", ["geovote.geo", "geovote.cells", "geovote.metrics", "geovote.layout",
                                    "geovote.config", "geovote.shards", "retrieve.predict"])
def test_core_modules_import_without_torch(module):
    import subprocess
    import sys

    code = f"import sys, {module}; assert 'torch' not in sys.modules, 'torch imported'"
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
