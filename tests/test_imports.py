"""The package's modules import each other without cycles, imports inside functions included: a reader
can follow the layers down, and a change to one low module cannot need a higher one. The same for what
stays beside it (research/, benchmarks/), which reach the package without sys.path tricks or private names."""

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
ROOT = REPO / "svd_lightning"


def module_imports(root: Path = ROOT) -> dict[str, set[str]]:
    """Module -> the modules of package ``root`` it imports (``from svd_lightning.x import y`` counts x, and
    x.y where y is a module), read from the source: every import statement, at any depth."""
    package = root.name
    modules = {".".join(p.relative_to(root.parent).with_suffix("").parts).removesuffix(".__init__"): p
               for p in root.rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        found = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith(package):
                found |= {node.module, *(f"{node.module}.{a.name}" for a in node.names)}
            elif isinstance(node, ast.Import):
                found |= {a.name for a in node.names}
        graph[name] = {m for m in found if m in modules and m != name and m != package}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        state[node] = 2
        path.pop()
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_package_has_no_import_cycles():
    graph = module_imports()
    assert "svd_lightning.files" in graph["svd_lightning.run.writer"]  # the graph is read, not empty
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


def test_the_cycle_finder_finds_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def third_party_imports(path: Path) -> set[str]:
    """The top-level packages a module imports from outside svd_lightning, at any depth."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and not node.level:
            found.add(node.module.split(".")[0])
        elif isinstance(node, ast.Import):
            found |= {a.name.split(".")[0] for a in node.names}
    return found - {"svd_lightning"}


# Each layer, lowest first, with what it may import of the package beyond itself (the layers under it).
MATH = ("svd_lightning.steering",)
FORWARD = ("svd_lightning.forward",)
DECODING = ("svd_lightning.scoring", "svd_lightning.generation")
CALIBRATION = ("svd_lightning.calibration",)
LIGHTNING = ("svd_lightning.module", "svd_lightning.callbacks", "svd_lightning.logger", "svd_lightning.data",
             "svd_lightning.cli", "svd_lightning.strategies", "svd_lightning.entry")
BASE = ("svd_lightning.config", "svd_lightning.batch", "svd_lightning.log", "svd_lightning.sharding",
        "svd_lightning.progress")
LAYERS = [(MATH, BASE), (FORWARD, BASE), (DECODING, BASE + MATH + FORWARD),
          (CALIBRATION, BASE + MATH + FORWARD + DECODING)]


def _within(module: str, prefixes) -> bool:
    return any(module == p or module.startswith(p + ".") for p in prefixes)


def test_each_layer_imports_only_the_layers_under_it():
    """The math imports no model code, the forward no scoring, scoring and generation no calibration, and
    none of them anything of the run record, the plain-Python API or the Lightning layer."""
    graph = module_imports()
    checked = 0
    for layer, below in LAYERS:
        for module, imported in graph.items():
            if _within(module, layer):
                checked += 1
                above = {m for m in imported if not _within(m, layer + below)}
                assert not above, f"{module} imports {sorted(above)}, above its layer"
    assert checked >= 15


def test_only_the_lightning_layer_imports_lightning_and_the_math_only_torch():
    for path in ROOT.rglob("*.py"):
        module = ".".join(path.relative_to(ROOT.parent).with_suffix("").parts).removesuffix(".__init__")
        imported = third_party_imports(path)
        if "lightning" in imported:
            assert _within(module, LIGHTNING), f"{module} imports Lightning outside the Lightning layer"
        if _within(module, MATH):
            assert imported <= {"torch", "math", "dataclasses", "typing", "__future__"}, f"{module}: {sorted(imported)}"


@pytest.mark.parametrize("folder", ["research", "benchmarks"])
def test_research_and_benchmarks_import_as_packages_without_cycles_or_private_names(folder):
    root = REPO / folder
    graph = module_imports(root)
    assert len(graph) >= 5 and find_cycle(graph) is None, " -> ".join(find_cycle(graph) or [])
    for path in root.glob("*.py"):
        source = path.read_text(encoding="utf-8")
        assert "sys.path" not in source, f"{path.name} edits sys.path: run it with python -m {folder}.{path.stem}"
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] in (folder, "svd_lightning"):
                private = [a.name for a in node.names if a.name.startswith("_")]
                assert not private, f"{path.name} imports private names {private} from {node.module}"
