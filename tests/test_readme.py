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


def test_the_deployment_recipe_states_its_small_job_and_its_wall_time():
    script = recipe("deployment")
    run = next(line for line in commands(script) if line.startswith("flwr run "))
    assert "federation.num-rounds=1" in run and "data.max-examples=" in run and "run.output-dir='$OUT'" in run
    # step 6 stops each job with its descendants (SuperExecs, flwr-serverapp, ClientApps), by pid
    assert "pids=$(tree $(jobs -p" in script and "kill -9 $pids" in script and "pkill" not in script and "killall" not in script


def test_the_simulation_recipe_stops_the_local_superlink_it_leaves_running(tmp_path, monkeypatch):
    script = recipe("simulation")
    assert 'dir="$FLWR_HOME/local-superlink/"' in script and "kill $(tree " in script
    # ps cuts the command line to $COLUMNS without -ww, and the folder sits near its end
    assert "ps -ww -eo pid=,args=" in script
    # the folder the recipe looks for is on the local SuperLink's command line whether or not it
    # keeps a database (an in-memory one has no --database): Flower always passes its --log-file
    from flwr.cli.local_superlink import _get_local_superlink_paths

    monkeypatch.setenv("FLWR_HOME", str(tmp_path))
    _, log_file = _get_local_superlink_paths()
    assert str(log_file).startswith(f"{tmp_path}/local-superlink/")


def test_readme_states_the_defaults_of_the_label_defences():
    from privtune_flwr.config import RunConfig

    text = (ROOT / "README.md").read_text()
    assert f"`rank` directions (default {RunConfig().subspace_rank})" in text
    assert "~/.local/share/privtune_flwr/<supernode>/device-<partition-id>.key" in text


def test_the_recipes_stop_step_ends_detached_descendants(tmp_path):
    """What step 6 does, on stand-ins: a background job whose child left its session (as Flower's
    SuperLink starts its SuperExec) and whose grandchild sleeps on (as flwr-serverapp would)."""
    import os
    import time

    tree = next(line for line in recipe("deployment").splitlines() if line.startswith("tree() "))
    lines = recipe("deployment").splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("pids=$(tree"))
    stop = "\n".join(lines[start:start + 3])
    pids = tmp_path / "pids"
    (tmp_path / "grandchild.py").write_text(
        "import subprocess, sys, time\n"
        f"q = subprocess.Popen(['sleep', '300']); open({str(pids)!r}, 'a').write(f'{{q.pid}} '); time.sleep(300)\n")
    (tmp_path / "job.py").write_text(
        "import subprocess, sys, time\n"
        f"p = subprocess.Popen([sys.executable, {str(tmp_path / 'grandchild.py')!r}], start_new_session=True)\n"
        f"open({str(pids)!r}, 'a').write(f'{{p.pid}} '); time.sleep(300)\n")
    script = (f'{tree}\n"{sys.executable}" "{tmp_path / "job.py"}" &\n'
              f'while [ "$(cat {pids} 2>/dev/null | wc -w)" -lt 2 ]; do sleep 0.1; done\n{stop}\n')
    done = subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    started = [int(p) for p in pids.read_text().split()]
    assert len(started) == 2

    def running(pid: int) -> bool:
        try:
            with open(f"/proc/{pid}/stat") as f:
                return f.read().rsplit(")", 1)[1].split()[0] != "Z"
        except OSError:
            return False

    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and any(map(running, started)):
        time.sleep(0.1)
    assert [p for p in started if running(p)] == []


DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def anchors(page: Path) -> set[str]:
    """GitHub's heading anchors of a Markdown page (fenced code skipped; repeats get -1, -2, ...)."""
    seen: dict[str, int] = {}
    out = set()
    fenced = False
    for line in page.read_text().splitlines():
        if line.startswith("```"):
            fenced = not fenced
        if fenced or not re.match(r"#{1,6} ", line):
            continue
        slug = re.sub(r"[^\w\- ]", "", line.lstrip("#").strip().lower()).replace(" ", "-")
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        out.add(slug if n == 0 else f"{slug}-{n}")
    return out


@pytest.mark.parametrize("page", DOCS, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_every_link_and_figure_a_page_names_exists(page):
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)
    targets = re.findall(r"\]\(([^)\s]+)\)", text)
    assert targets, f"{page.name} links nowhere"
    for target in targets:
        if re.match(r"[a-z]+://", target):
            continue
        path, _, anchor = target.partition("#")
        resolved = (page.parent / path).resolve() if path else page
        assert resolved.exists(), f"{page.name} names {target!r}, which does not exist"
        if anchor:
            assert anchor in anchors(resolved), f"{page.name} links to #{anchor}, which {resolved.name} has no heading for"


def test_readme_is_short_and_shows_the_frontier_figure():
    text = (ROOT / "README.md").read_text()
    assert len(text.splitlines()) <= 300
    assert re.search(r"!\[[^\]]*\]\(docs/figures/[^)]+\.png\)", text)
