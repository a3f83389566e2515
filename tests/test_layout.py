"""The product and its experiments: nothing in the product imports the experiments."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module)
    return found


def test_the_product_never_imports_the_experiments():
    offenders = {str(p.relative_to(ROOT)): sorted(m for m in _imports(p) if m.split(".")[0] == "simulations")
                 for package in ("privtune_flwr", "strategies") for p in (ROOT / package).rglob("*.py")}
    assert {k: v for k, v in offenders.items() if v} == {}
    assert len(offenders) > 30  # the scan saw the product's modules


def test_the_old_launcher_name_runs_the_product_launcher():
    from privtune_flwr import launch
    from simulations import launch as old

    assert old.main is launch.main
