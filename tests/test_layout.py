"""The README's layout table names every module of the package, and every module says
what it owns (a docstring): a newcomer finds each file from the README."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "quartchat"


def layout_rows() -> list[str]:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = text.split("\n## Layout\n", 1)[1].split("\n## ", 1)[0]
    return [line for line in section.splitlines() if line.startswith("| `")]


def named(row: str) -> set[str]:
    """The file names a row mentions in backticks (`quartchat/app.py`, `launcher.py`)."""
    return {Path(word).name for word in re.findall(r"`([^`]+\.py)`", row)}


def test_every_module_is_in_the_layout_table() -> None:
    rows = layout_rows()
    # A top-level module is named in the first cell of its row ("`server.py`, `cli.py`").
    top = set().union(*(named(row.split("|")[1]) for row in rows))
    missing = []
    for module in sorted(PACKAGE.glob("*.py")):
        if module.name not in {"__init__.py", "__main__.py"} and module.name not in top:
            missing.append(str(module.relative_to(ROOT)))
    for package in sorted(p for p in PACKAGE.iterdir() if (p / "__init__.py").is_file()):
        row = next((r for r in rows if r.startswith(f"| `quartchat/{package.name}/`")), None)
        assert row is not None, f"no layout row for quartchat/{package.name}/"
        for module in sorted(package.glob("*.py")):
            if module.name != "__init__.py" and module.name not in named(row):
                missing.append(str(module.relative_to(ROOT)))
    assert not missing, f"README's layout table does not name {missing}"


def test_every_module_says_what_it_owns() -> None:
    silent = [
        str(module.relative_to(ROOT))
        for module in sorted(PACKAGE.rglob("*.py"))
        if "migrations" not in module.parts and not ast.get_docstring(ast.parse(module.read_text()))
    ]
    assert not silent, f"modules without a docstring: {silent}"
