"""The package's imports keep to the layering in DESIGN.md: a module imports only from its own package or from a
lower layer, and no import chain (counting imports inside functions, which are still dependencies) comes back to
where it started."""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

# Lowest first. A package may import from any lower layer, never from a higher one, nor from another package of
# its own layer. `pyhv` itself is the facade (`pyhv.VM`) at the top.
LAYERS: list[set[str]] = [
    {"pyhv.errors", "pyhv.version", "pyhv.trace"},
    {"pyhv.state_codec"},
    {"pyhv.kvm"},
    {"pyhv.memory", "pyhv.stats"},
    {"pyhv.runtime"},
    {"pyhv.arch", "pyhv.assets"},
    {"pyhv.devices"},
    {"pyhv.virtio"},
    {"pyhv.vhost"},
    {"pyhv.registry"},
    {"pyhv.config"},
    {"pyhv.machine"},
    {"pyhv.monitor", "pyhv.profiler"},
    {"pyhv.api", "pyhv.cli"},
    {"pyhv"},
]


def modules() -> dict[str, Path]:
    found = {}
    for path in (ROOT / "pyhv").rglob("*.py"):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        found[".".join(parts)] = path
    return found


def resolve(name: str, known: dict[str, Path]) -> str | None:
    while name and name not in known:
        name = name.rpartition(".")[0]
    return name or None


def imports(known: dict[str, Path]) -> dict[str, set[str]]:
    """module -> the pyhv modules it imports anywhere in its body (TYPE_CHECKING blocks left out: annotations
    only)."""
    graph: dict[str, set[str]] = {}
    for module, path in known.items():
        package = module if path.name == "__init__.py" else module.rpartition(".")[0]
        targets: set[str] = set()

        def visit(node: ast.AST) -> None:
            for child in ast.iter_child_nodes(node):
                if isinstance(child, ast.If) and getattr(child.test, "id", None) == "TYPE_CHECKING":
                    continue
                if isinstance(child, ast.Import):
                    targets.update(filter(None, (resolve(a.name, known) for a in child.names)))
                elif isinstance(child, ast.ImportFrom):
                    base = child.module or ""
                    if child.level:
                        parts = package.split(".")[:len(package.split(".")) - child.level + 1]
                        base = ".".join(parts + ([base] if base else []))
                    for alias in child.names:
                        full = f"{base}.{alias.name}"
                        targets.add(full if full in known else resolve(base, known))
                visit(child)

        visit(ast.parse(path.read_text(), str(path)))
        targets.discard(module)
        targets.discard(None)
        graph[module] = targets
    return graph


def layer_of(module: str) -> tuple[int, str]:
    parts = module.split(".")
    for depth in (2, 1):
        group = ".".join(parts[:depth])
        for i, layer in enumerate(LAYERS):
            if group in layer:
                return i, group
    raise AssertionError(f"{module} is in no layer: add its package to LAYERS (and DESIGN.md's table)")


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []

    def connect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            connect(v)
    return found


def test_every_module_is_in_a_layer():
    for module in modules():
        layer_of(module)


def test_no_import_goes_up_or_sideways():
    graph = imports(modules())
    wrong = []
    for module, targets in sorted(graph.items()):
        layer, group = layer_of(module)
        for target in sorted(targets):
            target_layer, target_group = layer_of(target)
            if target_group != group and target_layer >= layer:
                wrong.append(f"{module} -> {target}")
    assert not wrong, "imports against DESIGN.md's layers:\n" + "\n".join(wrong)


def test_no_import_cycles():
    assert cycles(imports(modules())) == []


def test_the_checker_sees_a_cycle_and_a_wrong_way_import():
    """The checks above can fail: a made-up graph with a cycle, and a device importing the machine."""
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert layer_of("pyhv.devices.uart16550")[0] < layer_of("pyhv.machine.pc")[0]
