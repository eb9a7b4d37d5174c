"""The layout rules of the package: short modules, imports in one direction, no import circles, no use of another
package's private names, and a line in docs/code_map.md for every module."""

import ast
import re
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "scanpy_canal"
MAX_LINES = 400
#: Layers from the bottom: a module may import its own layer and those below (see docs/code_map.md). The package
#: itself is the top: it exposes the others (lazily).
LAYERS = [
    {
        "scanpy_canal._logging",
        "scanpy_canal._version",
        "scanpy_canal._directories",
        "scanpy_canal._snapshot",
        "scanpy_canal._genes",
        "scanpy_canal._option_docs",
        "scanpy_canal._choices",
    },
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


def imports(name: str) -> list[tuple[str, str | None]]:
    """What module `name` imports anywhere (module level, functions, TYPE_CHECKING blocks): ``(module, name)`` for
    ``from module import name``, ``(module, None)`` for ``import module``; relative imports made absolute."""
    path = MODULES[name]
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [(alias.name, None) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(
                    [*package.split(".")[: len(package.split(".")) - node.level + 1], *filter(None, [base])]
                )
            found += [(base, alias.name) for alias in node.names]
    return found


def imported_modules(name: str) -> set[str]:
    """Package modules `name` imports anywhere (module level, functions, TYPE_CHECKING blocks)."""
    found = set()
    for base, attribute in imports(name):  # `from package import submodule` imports the submodule
        found.add(f"{base}.{attribute}" if f"{base}.{attribute}" in MODULES else base)
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


def package_of(name: str) -> str:
    """The package `name` belongs to: a subpackage (``scanpy_canal.nn``) or a top-level module (``scanpy_canal._demo``)."""
    return ".".join(name.split(".")[:2])


def is_private(name: str) -> bool:
    return name.startswith("_") and not name.endswith("__")


def private_imports(name: str) -> list[str]:
    """Private names of other packages that `name` imports: their private modules, or their names starting with ``_``."""
    found = []
    for module, attribute in imports(name):
        if not module.startswith("scanpy_canal.") or package_of(module) == package_of(name):
            continue
        inner = module.split(".")[2:]  # the path inside the other package
        if any(map(is_private, inner)) or (attribute is not None and is_private(attribute)):
            found.append(module if attribute is None else f"{module} import {attribute}")
    return found


def private_definitions(package: str) -> set[str]:
    """Private names `package` defines: functions, classes, methods, variables and attributes it assigns."""
    names = set()
    for module, path in MODULES.items():
        if package_of(module) != package:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
                names.add(node.name)
            elif isinstance(node, ast.Name | ast.Attribute) and isinstance(node.ctx, ast.Store):
                names.add(node.id if isinstance(node, ast.Name) else node.attr)
    return set(filter(is_private, names))


PACKAGES = sorted({package_of(name) for name in MODULES if name != "scanpy_canal"})


def private_attributes_used(name: str) -> list[str]:
    """Uses of ``something._name`` in `name` where ``_name`` is private to another package of scanpy_canal.

    Found by name: an attribute counts when another package defines it and the module's own package does not (so a
    private attribute of a third-party object is not counted). ``self._name`` and ``cls._name`` are the object's own.
    """
    own = private_definitions(package_of(name))
    others = set().union(*(private_definitions(package) for package in PACKAGES if package != package_of(name)))
    return [
        f"line {node.lineno}: {ast.unparse(node)}"
        for node in ast.walk(ast.parse(MODULES[name].read_text()))
        if isinstance(node, ast.Attribute)
        and is_private(node.attr)
        and node.attr in others - own
        and not (isinstance(node.value, ast.Name) and node.value.id in {"self", "cls"})
    ]


@pytest.mark.parametrize("name", sorted(MODULES))
def test_no_private_name_of_another_package_is_used(name):
    """A package reaches another only through its public names: what a subpackage's ``__init__`` exports, or a
    top-level module's names without a leading underscore."""
    used = private_imports(name) + private_attributes_used(name)
    assert not used, f"{name} uses private names of other packages: {used}"


def test_code_map_lists_every_module():
    """Every module has a line in docs/code_map.md: its own, or its package's line naming its file."""
    code_map = (PACKAGE.parents[1] / "docs" / "code_map.md").read_text()
    rows = dict(re.findall(r"^\| `([\w/.]+)` \|(.*)$", code_map, flags=re.MULTILINE))
    missing = []
    for path in MODULES.values():
        relative = path.relative_to(PACKAGE)
        if relative.name in {"__init__.py", "__main__.py"} or relative.as_posix() in rows:
            continue
        if f"`{relative.name}`" not in rows.get(f"{relative.parts[0]}/", ""):
            missing.append(relative.as_posix())
    assert not missing, f"docs/code_map.md has no line for {missing}"
