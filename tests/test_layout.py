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


def test_the_product_package_never_imports_the_cloud_package():
    """One direction between the two packages: ``strategies`` (the ServerApp, the strategies)
    imports ``privtune_flwr``; nothing in ``privtune_flwr`` imports ``strategies`` back."""
    offenders = {str(p.relative_to(ROOT)): sorted(m for m in _imports(p) if m.split(".")[0] == "strategies")
                 for p in (ROOT / "privtune_flwr").rglob("*.py")}
    assert {k: v for k, v in offenders.items() if v} == {}
    assert any("privtune_flwr" in m for m in _imports(ROOT / "strategies" / "server_app.py"))


def test_the_serverapp_entry_point_loads():
    import tomllib

    spec = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["components"]["serverapp"]
    module, _, name = spec.partition(":")
    from flwr.serverapp import ServerApp

    assert isinstance(getattr(__import__(module, fromlist=[name]), name), ServerApp)


def test_the_experiments_are_not_part_of_the_installed_product():
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    include = project["tool"]["setuptools"]["packages"]["find"]["include"]
    assert sorted(include) == ["privtune_flwr*", "strategies*"]
    scripts = project["project"]["scripts"]
    assert all(not target.startswith("simulations") for target in scripts.values()), scripts


def test_the_resource_cache_is_bounded_per_kind_and_least_recently_used_goes_first():
    import pytest

    from privtune_flwr.resources import LIMITS, ResourceCache

    cache = ResourceCache({"a": 2, "b": 1})
    built = []
    for key in (1, 2, 1, 3):  # 1 is used again before 3 arrives: 2 goes
        cache.get("a", key, lambda key=key: built.append(key) or key * 10)
    assert cache.keys("a") == [1, 3] and built == [1, 2, 3]
    cache.put("b", "x", 1)
    cache.put("b", "y", 2)
    assert cache.keys("b") == ["y"] and cache.get("b", "x") is None
    cache.set_limit("a", 1)
    assert cache.keys("a") == [3]
    cache.clear()
    assert cache.sizes() == {"a": 0, "b": 0}
    with pytest.raises(KeyError, match="unknown resource kind 'c'"):
        cache.get("c", 1)
    with pytest.raises(ValueError, match=r"a=0 is outside the accepted range"):
        ResourceCache({"a": 0})
    assert all(limit >= 1 for limit in LIMITS.values())


def test_no_module_keeps_an_unbounded_cache_of_its_own():
    """Rebuildable resources live on the bounded shelves of privtune_flwr.resources; a module-level
    dict or OrderedDict that fills at run time would grow with the devices a process serves."""
    import re

    allowed = {"privtune_flwr/device_policy.py": {"_DIGESTS"},  # digests of a few policy files
               "privtune_flwr/attacks/__init__.py": {"_CLEAN"},  # the attacks (experiments' tools)
               "privtune_flwr/attacks/inversion.py": {"_ANCHOR_CACHE"}}
    pattern = re.compile(r"^(_[A-Za-z_]+)\s*(?::[^=]*)?=\s*(?:\{\}|dict\(\)|collections\.OrderedDict\(\))", re.M)
    found = {}
    for package in ("privtune_flwr", "strategies"):
        for p in (ROOT / package).rglob("*.py"):
            names = set(pattern.findall(p.read_text())) - allowed.get(str(p.relative_to(ROOT)), set())
            if names:
                found[str(p.relative_to(ROOT))] = sorted(names)
    assert found == {}
