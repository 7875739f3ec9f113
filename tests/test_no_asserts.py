"""Library code states its invariants with named errors: ``assert`` vanishes under ``python -O``."""

from __future__ import annotations

import ast

from conftest import REPO


def test_the_library_has_no_assert_statements() -> None:
    found = []
    for path in sorted((REPO / "src" / "fedguard").rglob("*.py")):
        tree = ast.parse(path.read_text(), filename=str(path))
        found += [
            f"{path.relative_to(REPO)}:{node.lineno}"
            for node in ast.walk(tree)
            if isinstance(node, ast.Assert)
        ]
    assert not found, "raise a named error instead of assert at " + ", ".join(found)
