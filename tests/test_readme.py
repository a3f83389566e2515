"""The README's Flower commands use flags the installed Flower has, and the packaging says what
the dependencies need. (The e2e tests run the same recipes.)"""

import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def recipe(name: str) -> str:
    match = re.search(rf"<!-- recipe: {name} -->\s*```bash\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
    assert match, f"README has no recipe {name!r}"
    return match.group(1)


def commands(script: str) -> list[str]:
    """The script's commands, continuation lines joined, comments dropped."""
    joined = re.sub(r"\\\n\s*", " ", script)
    return [line.split(" #")[0].strip() for line in joined.splitlines() if line.strip() and not line.lstrip().startswith("#")]


@pytest.mark.parametrize("name", ["simulation", "deployment"])
def test_readme_recipes_use_only_flags_flower_has(name):
    helps = {}
    checked = 0
    for line in commands(recipe(name)):
        words = line.split()
        for i, word in enumerate(words):
            program = word.rsplit("/", 1)[-1]
            if program in ("flower-superlink", "flower-supernode") or (program == "flwr" and i + 1 < len(words)):
                sub = [program] if program != "flwr" else [program, words[i + 1]]
                key = " ".join(sub)
                if key not in helps:
                    helps[key] = subprocess.run([str(BIN / sub[0])] + sub[1:] + ["--help"], capture_output=True, text=True,
                                                timeout=120, env={"COLUMNS": "300", "PATH": str(BIN)}).stdout
                for flag in re.findall(r"(?<!\S)(--[a-z][a-z0-9-]*)", " ".join(words[i:])):
                    assert flag in helps[key], f"`{key}` has no {flag}"
                    checked += 1
                break
    assert checked >= (2 if name == "simulation" else 12)


def test_requires_python_matches_the_dependencies():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["requires-python"] == ">=3.11"  # numpy 2.4 and the pinned stack need 3.11
    assert project["license"] == "Apache-2.0"  # an SPDX string: no setuptools deprecation block
    assert sys.version_info >= (3, 11)
