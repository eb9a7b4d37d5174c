"""The benchmark scripts agree with each other (read as text: they import heavy peers)."""

import ast
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def dict_keys(path: Path, name: str) -> set[str]:
    """The string keys of the dict literal assigned to `name` at the top of `path`."""
    for node in ast.parse(path.read_text()).body:
        targets = node.targets if isinstance(node, ast.Assign) else []
        if any(isinstance(target, ast.Name) and target.id == name for target in targets):
            return {key.value for key in node.value.keys if isinstance(key, ast.Constant)}
    raise LookupError(f"{name} is not assigned in {path.name}")


def test_every_continual_method_has_a_style_in_the_report():
    """The report prints each method of a run by its style; a method without one stopped it after the JSON."""
    variants = dict_keys(BENCHMARKS / "continual_stream.py", "CANAL_VARIANTS")
    assert variants <= dict_keys(BENCHMARKS / "continual_stream_report.py", "STYLE")
