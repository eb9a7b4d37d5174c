"""The README and the documentation pages: what they state holds, their code runs and fits its boxes."""

import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import nbformat
import pytest

ROOT = Path(__file__).parent.parent
README = (ROOT / "README.md").read_text()
#: The widest code line that fits a code box of the built documentation without a scroll bar.
MAX_CODE_WIDTH = 88


def code_blocks(markdown: str, language: str = "") -> list[str]:
    """The fenced code blocks of `markdown` (in `language`, or all); MyST directives such as ```{figure} are not code."""
    blocks, info, lines = [], None, []
    for line in markdown.splitlines():
        if not line.startswith("```"):
            lines.append(line)
        elif info is None:
            info, lines = line[3:].strip(), []
        else:
            if not info.startswith("{") and (not language or info == language):
                blocks.append("\n".join(lines))
            info = None
    return blocks


def quick_start() -> str:
    section = README.split("## Quick start", 1)[1]
    return code_blocks(section, "python")[0]


def test_readme_states_the_torch_requirement_of_the_package():
    dependencies = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    (torch,) = [dependency for dependency in dependencies if dependency.startswith("torch")]
    assert f"only asks for `{torch}`" in README


def test_ci_runs_the_readme_test_command():
    command = next(block for block in code_blocks(README, "bash") if "pytest" in block)
    assert command in (ROOT / ".ci" / "run").read_text()


def test_a_new_machine_needs_two_commands():
    """Above the line: the demo and the tests, each one command from a fresh clone (lines joined by ``\\``)."""
    commands = code_blocks(README.split("\n---\n", 1)[0], "bash")
    assert len(commands) == 2 and any("scanpy-canal demo" in command for command in commands)
    for command in commands:
        assert command.startswith("python3 -m venv") and "\n" not in command.replace("\\\n", ""), command


def test_code_fits_the_documentation_code_boxes():
    code = {
        f"{path.name}, block {index}": block
        for path in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
        for index, block in enumerate(code_blocks(path.read_text()))
    }
    for path in sorted((ROOT / "notebooks").glob("*.ipynb")):
        for i, cell in enumerate(nbformat.read(path, as_version=4).cells):
            blocks = [cell.source] if cell.cell_type == "code" else code_blocks(cell.source)
            code |= {f"{path.name}, cell {i}, block {index}": block for index, block in enumerate(blocks)}
    too_wide = [
        f"{where}: {line}" for where, text in code.items() for line in text.splitlines() if len(line) > MAX_CODE_WIDTH
    ]
    assert not too_wide, "wrap these lines:\n" + "\n".join(too_wide)


@pytest.mark.slow
def test_quick_start_runs_twice_and_assigns_the_known_cells(tmp_path):
    """Run as a new user would, twice in the same folder (a second run used to fail at `model.save`)."""
    budget = "max_epochs=2"  # instead of train()'s defaults
    code, stages = re.subn(
        r"model\.train\((\w*)\)",
        lambda call: f"model.train({', '.join(filter(None, [call[1], budget]))})",
        quick_start(),
    )
    assert stages == 2, "the quick start trains two stages with train()'s defaults"
    for _ in range(2):
        result = subprocess.run(
            [sys.executable, "-c", code],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            env={**os.environ, "MPLBACKEND": "agg"},
            timeout=600,
        )
        assert result.returncode == 0, result.stderr
        assigned, total = map(int, re.search(r"(\d+) of (\d+) cells of known types assigned", result.stdout).groups())
        assert assigned >= 0.8 * total
    assert (tmp_path / "models" / "pbmc" / "model.json").is_file()
