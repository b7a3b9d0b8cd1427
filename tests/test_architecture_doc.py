"""docs/architecture.md's module table matches the package tree: every module is named, every named module exists."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "speechlab"


def _module_rows() -> dict[str, str]:
    """The table's rows: ``speechlab/<path>`` (first cell) -> the row's text."""
    rows = {}
    for line in (ROOT / "docs" / "architecture.md").read_text().splitlines():
        match = re.match(r"\| `(speechlab/[^`]*)` \|(.*)\|$", line)
        if match:
            rows[match.group(1)] = match.group(2)
    return rows


def test_every_module_of_the_package_has_its_row_or_is_named_in_its_folder_row():
    rows = _module_rows()
    missing = []
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(ROOT).as_posix()
        if rel in rows:
            continue
        folder_row = rows.get(path.parent.relative_to(ROOT).as_posix() + "/")
        named = folder_row is not None and re.search(rf"`{path.stem}(\.py)?[` ]", folder_row)
        if not (named or path.name == "__init__.py"):
            missing.append(rel)
    assert not missing, f"docs/architecture.md does not name: {missing}"


def test_every_module_the_table_names_exists():
    absent = []
    for first_cell, text in _module_rows().items():
        target = ROOT / first_cell
        if not target.exists():
            absent.append(first_cell)
        if first_cell.endswith("/"):
            absent += [
                f"{first_cell}{name}"
                for name in re.findall(r"`(\w+\.py)", text)
                if not (target / name).exists()
            ]
    assert not absent, f"docs/architecture.md names modules that are not in the tree: {absent}"
