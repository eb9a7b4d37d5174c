"""The layout rules of the package: short modules, imports in one direction, no import circles."""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "scanpy_canal"
MAX_LINES = 400
#: Layers from the bottom: a module may import its own layer and those below (see docs/code_map.md). The package
#: itself is the top: it exposes the others (lazily).
LAYERS = [
    {"scanpy_canal._logging", "scanpy_canal._version", "scanpy_canal._directories", "scanpy_canal._snapshot"},
    {"scanpy_canal.nn"},
    {"scanpy_canal.pp", "scanpy_canal.datasets"},
    {"scanpy_canal.model"},
    {"scanpy_canal.tl", "scanpy_canal.pl", "scanpy_canal._demo"},
    {"scanpy_canal.cli"},
    {"scanpy_canal"},
]


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def imported_modules(name: str) -> set[str]:
    """Package modules `name` imports anywhere (module level, functions, TYPE_CHECKING blocks)."""
    path = MODULES[name]
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(
                    [*package.split(".")[: len(package.split(".")) - node.level + 1], *filter(None, [base])]
                )
            for alias in node.names:  # `from package import submodule` imports the submodule
                found.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else base)
    return {module for module in found if module in MODULES and module != name}


def layer(name: str) -> int:
    """The layer of module `name`: that of the longest entry of :data:`LAYERS` it is or lies in."""
    levels = {top: level for level, tops in enumerate(LAYERS) for top in tops}
    owner = max((top for top in levels if name == top or name.startswith(top + ".")), key=len)
    return levels[owner]


@pytest.mark.parametrize("name", sorted(MODULES))
def test_module_is_short(name):
    n_lines = len(MODULES[name].read_text().splitlines())
    assert n_lines <= MAX_LINES, f"{name} has {n_lines} lines"


@pytest.mark.parametrize("name", sorted(MODULES))
def test_imports_go_down_the_layers(name):
    upward = sorted(module for module in imported_modules(name) if layer(module) > layer(name))
    assert not upward, f"{name} (layer {layer(name)}) imports {upward}"


def test_no_import_circles():
    graph = {name: imported_modules(name) for name in MODULES}
    visiting, done = [], set()

    def visit(name):
        if name in visiting:
            raise AssertionError("import circle: " + " -> ".join([*visiting[visiting.index(name) :], name]))
        if name in done:
            return
        visiting.append(name)
        for imported in sorted(graph[name]):
            visit(imported)
        visiting.pop()
        done.add(name)

    for name in sorted(graph):
        visit(name)
