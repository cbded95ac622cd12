"""The package's layers (docs/concepts.md), read from its imports: no file imports a higher layer, or a
sibling folder of its own layer, and no files import each other in a circle.

Every import counts, also those inside functions and under TYPE_CHECKING: a lazy import is still a
dependency, and a circle of lazy imports is still a circle.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "rlhf_workflow"

# lowest first; a part may import the parts of lower layers and the files of its own folder
LAYERS: dict[str, int] = {
    "__init__": 0, "errors": 0, "provenance": 0,
    "processes": 1,
    "data": 2,
    "config": 3, "tasks": 3,
    "models": 4, "stages": 4,
    "train": 5, "generate": 5, "eval": 5,
    "online": 6,
    "workflow": 7,
    "cli": 8,
    "__main__": 9,
}


def module_files(package: Path) -> dict[str, Path]:
    """Dotted module name -> file, for every .py file of the package (a package is its __init__)."""
    modules = {}
    for path in sorted(package.rglob("*.py")):
        parts = ("rlhf_workflow",) + path.relative_to(package).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        modules[".".join(parts)] = path
    return modules


def part_of(module: str) -> str:
    """The layer part a module belongs to: its top folder or file under the package."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def imports(path: Path, modules: dict[str, Path]) -> set[str]:
    """The package's modules that ``path`` imports (``from pkg import submodule`` names the submodule)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [f"{node.module}.{alias.name}" for alias in node.names]
        for name in names:
            if not name.startswith("rlhf_workflow"):
                continue
            while name not in modules:  # an imported function or class: its module
                name = name.rpartition(".")[0]
            found.add(name)
    return found


def import_graph(package: Path = PACKAGE) -> dict[str, set[str]]:
    modules = module_files(package)
    return {name: imports(path, modules) - {name} for name, path in modules.items()}


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    """Imports of a higher layer, or of another part of the same layer."""
    wrong = []
    for module, targets in graph.items():
        for target in targets:
            here, there = part_of(module), part_of(target)
            if here != there and LAYERS[there] >= LAYERS[here]:
                wrong.append(f"{module} (layer {LAYERS[here]}) imports {target} (layer {LAYERS[there]})")
    return sorted(wrong)


def circles(graph: dict[str, set[str]]) -> list[str]:
    """Every circle a depth-first walk of the graph meets, as 'a -> b -> a'."""
    found: list[str] = []
    state: dict[str, int] = {}  # 1 = on the current path, 2 = finished

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        for target in sorted(graph[module]):
            if state.get(target) == 1:
                found.append(" -> ".join(path[path.index(target):] + [target]))
            elif target not in state:
                visit(target, path + [target])
        state[module] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    return found


def test_every_part_of_the_package_has_a_layer():
    assert {part_of(name) for name in module_files(PACKAGE)} <= set(LAYERS)


def test_no_import_climbs_to_a_higher_layer_or_crosses_to_a_sibling():
    wrong = upward_imports(import_graph())
    assert not wrong, "\n".join(wrong)


def test_no_files_import_each_other_in_a_circle():
    found = circles(import_graph())
    assert not found, "\n".join(found)


def test_the_checks_see_an_upward_import_and_a_circle(tmp_path):
    """The walker itself, on a fake package: models importing train inside a function, and two
    files of train importing each other (one through ``from package import module``)."""
    fake = tmp_path / "rlhf_workflow"
    (fake / "models").mkdir(parents=True)
    (fake / "train").mkdir()
    for init in (fake / "__init__.py", fake / "models" / "__init__.py", fake / "train" / "__init__.py"):
        init.write_text("")
    (fake / "models" / "a.py").write_text("def f():\n    from rlhf_workflow.train.b import g\n")
    (fake / "train" / "b.py").write_text("from rlhf_workflow.train import c\n")
    (fake / "train" / "c.py").write_text("import rlhf_workflow.train.b\n")
    graph = import_graph(fake)
    assert graph["rlhf_workflow.models.a"] == {"rlhf_workflow.train.b"}
    assert graph["rlhf_workflow.train.b"] == {"rlhf_workflow.train.c"}
    assert upward_imports(graph) == ["rlhf_workflow.models.a (layer 4) imports rlhf_workflow.train.b (layer 5)"]
    assert circles(graph) == ["rlhf_workflow.train.b -> rlhf_workflow.train.c -> rlhf_workflow.train.b"]
