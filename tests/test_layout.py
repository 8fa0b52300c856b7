"""The package's layering, read from the source with ``ast`` (nothing is imported).

Layers, bottom to top (README "Layout"): core -> engines -> methods -> models -> integration
-> bench -> cli. A module may import its own layer and the layers below it, never above. A
method may import a sibling method only to compose it (``COMPOSITION``); modules inside one
method's package (``methods/pvq/``) are free. The import graph has no cycle. Library code
(everything but ``cli.py``) has no ``print`` call, no ``jax.clear_caches()`` and no broad
``except`` around an import.
"""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "qetjax"

LAYERS = ("core", "engines", "methods", "models", "integration", "bench", "cli")
"""Bottom to top."""

TOP_LEVEL = {
    "core": "core", "metrics": "core", "budget": "core",
    "combinators": "engines", "packing": "engines", "kmeans": "engines", "codebooks": "engines",
    "rotations": "engines", "swap_tree": "engines",
    "gptq": "integration", "calibration": "integration", "tree": "integration", "kv": "integration",
    "io": "integration", "finetune": "integration", "sharding": "integration", "nn": "integration",
    "cli": "cli",
}
"""Layer of each top-level module; subpackages ``methods``, ``models``, ``bench`` are layers of their own."""

ALLOWED = {layer: set(LAYERS[: i + 1]) for i, layer in enumerate(LAYERS)}
ALLOWED["models"] = {"core", "models"}  # model definitions use no quantizer
"""Layers each layer may import (itself and below)."""

COMPOSITION = {"qet": {"pq", "scalar"}, "opq": {"pq"}}
"""Method -> sibling methods it composes: QET = swap tree + PQ (+ an RTN residual stage); OPQ = rotation + PQ."""

FACADES = {"qetjax", "qetjax.methods"}
"""Packages that import their contents to re-export or register them (exempt from the layer rule)."""


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def is_module(name: str) -> bool:
    rel = Path(*name.split("."))
    return (PACKAGE.parent / rel).with_suffix(".py").is_file() or (PACKAGE.parent / rel / "__init__.py").is_file()


def imports_of(path: Path) -> set[str]:
    """The qetjax modules ``path`` imports (anywhere in the file, relative imports resolved)."""
    name, out = module_name(path), set()
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.split(".")[0] == "qetjax"}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([node.module] if node.module else []))
            if base.split(".")[0] != "qetjax":
                continue
            for a in node.names:  # ``from qetjax import gptq`` imports the module qetjax.gptq
                out.add(f"{base}.{a.name}" if is_module(f"{base}.{a.name}") else base)
    return out - {name}


def layer_of(name: str) -> str:
    parts = name.split(".")
    if len(parts) >= 2 and parts[1] in ("methods", "models", "bench"):
        return parts[1]
    if len(parts) == 2 and parts[1] in TOP_LEVEL:
        return TOP_LEVEL[parts[1]]
    raise AssertionError(f"{name} has no layer: add it to TOP_LEVEL in tests/test_layout.py (and README's Layout)")


def method_of(name: str) -> str | None:
    parts = name.split(".")
    return parts[2] if len(parts) >= 3 and parts[1] == "methods" else None


GRAPH = {module_name(p): imports_of(p) for p in sorted(PACKAGE.rglob("*.py"))}


def test_every_module_has_a_layer():
    for name in GRAPH:
        if name not in FACADES:
            assert layer_of(name) in LAYERS


def test_no_upward_imports():
    bad = [f"{m} ({layer_of(m)}) imports {d} ({layer_of(d)})" for m, deps in GRAPH.items() if m not in FACADES
           for d in deps if d not in FACADES and layer_of(d) not in ALLOWED[layer_of(m)]]
    facade = [f"{m} imports the package facade {d}" for m, deps in GRAPH.items() if m not in FACADES
              for d in deps if d in FACADES - {"qetjax.methods"}]
    assert not bad + facade, "\n".join(bad + facade)


def test_methods_import_siblings_only_to_compose_them():
    bad = []
    for m, deps in GRAPH.items():
        for d in deps:
            a, b = method_of(m), method_of(d)
            if a and b and a != b and b not in COMPOSITION.get(a, set()):
                bad.append(f"{m} imports {d}: a shared helper belongs in an engine module, not in method {b!r}")
    assert not bad, "\n".join(bad)


def test_only_the_method_registry_imports_every_method():
    importers = {m for m, deps in GRAPH.items() if "qetjax.methods" in deps}
    assert importers <= {"qetjax", "qetjax.bench.config"}, importers  # registered_methods needs them all


def test_import_graph_is_acyclic():
    state: dict[str, int] = {}

    def visit(m: str, stack: list[str]) -> None:
        if state.get(m) == 2:
            return
        if state.get(m) == 1:
            raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(m):] + [m]))
        state[m] = 1
        for d in sorted(GRAPH.get(m, ())):
            if d not in FACADES:
                visit(d, stack + [m])
        state[m] = 2

    for m in GRAPH:
        if m not in FACADES:
            visit(m, [])


KNOWN_VIOLATIONS: dict[str, str] = {}
"""Library modules that still break the rule, each with what to change; strict xfail: fixing one fails until it is removed."""


def library_files():
    return [pytest.param(p, id=module_name(p), marks=[pytest.mark.xfail(strict=True, reason=KNOWN_VIOLATIONS[module_name(p)])]
                         if module_name(p) in KNOWN_VIOLATIONS else []) for p in sorted(PACKAGE.rglob("*.py"))
            if module_name(p) != "qetjax.cli"]


@pytest.mark.parametrize("path", library_files())
def test_library_code_has_no_print_no_cache_clearing_no_broad_except_around_imports(path):
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "print":
            raise AssertionError(f"{path.name}:{node.lineno}: print in library code (return values, logging or a callback)")
        if isinstance(node, ast.Attribute) and node.attr == "clear_caches":
            raise AssertionError(f"{path.name}:{node.lineno}: jax.clear_caches in library code (leave it to the caller)")
        if isinstance(node, ast.Try) and any(isinstance(n, (ast.Import, ast.ImportFrom)) for b in node.body for n in ast.walk(b)):
            for h in node.handlers:
                broad = h.type is None or (isinstance(h.type, ast.Name) and h.type.id in ("Exception", "BaseException"))
                assert not broad, f"{path.name}:{h.lineno}: broad except around an import (catch ImportError)"


def test_the_checker_sees_known_edges():
    """The parser resolves the import forms used here (guards against a check that cannot fail)."""
    assert "qetjax.methods.pq" in GRAPH["qetjax.methods.opq"]  # from qetjax.methods.pq import pq
    assert "qetjax.gptq" in GRAPH["qetjax.calibration"]  # from qetjax import gptq
    assert "qetjax.methods.pvq.enumeration" in GRAPH["qetjax.methods.pvq.quantizer"]  # from package import submodule
    assert layer_of("qetjax.methods.pvq.split") == "methods" and method_of("qetjax.methods.pvq.split") == "pvq"
    with pytest.raises(AssertionError, match="no layer"):
        layer_of("qetjax.unplaced")
