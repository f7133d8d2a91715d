"""A plain ``pip install llm2bids`` (no extras) has everything the default path imports."""

import importlib.metadata as md
import json
import re
import subprocess
import sys
import textwrap
from pathlib import Path

TESTS = Path(__file__).parent

# Imported by code the default path runs, though not by name in llm2bids: transformers loads a
# GGUF file (the embedded default model) with gguf and accelerate.
NEEDED_BY_THE_DEFAULT_MODEL = {"gguf", "accelerate"}


def _name(requirement: str) -> str:
    return re.split(r"[\s;<>=!~\[]", requirement, maxsplit=1)[0].lower().replace("_", "-")


def _core_requirements() -> set[str]:
    """The distributions a plain install brings: core requirements and theirs, no extras."""
    seen, todo = set(), [_name(r) for r in md.requires("llm2bids") if "extra ==" not in r]
    while todo:
        dist = todo.pop()
        if dist in seen:
            continue
        seen.add(dist)
        try:
            requires = md.requires(dist) or []
        except md.PackageNotFoundError:
            continue
        todo += [_name(r) for r in requires if "extra ==" not in r]
    return seen


def test_the_default_model_loaders_are_core_dependencies():
    core = {_name(r) for r in md.requires("llm2bids") if "extra ==" not in r}
    assert NEEDED_BY_THE_DEFAULT_MODEL <= core


def test_every_module_a_study_imports_comes_with_a_plain_install(tmp_path):
    """Record, analyse, lesion and report in a fresh process; map what it imported to
    distributions; each must be a core requirement (or one of theirs)."""
    code = textwrap.dedent(f"""
        import json, sys
        sys.path.insert(0, {str(TESTS)!r})
        from tiny import save_tiny
        import llm2bids
        root = {str(tmp_path)!r}
        model = save_tiny("llama", root + "/model")
        llm2bids.record(root + "/bids", model=str(model), task="langloc", max_tokens=48,
                        verbose=0)
        out = root + "/bids/derivatives/llm2bids"
        llm2bids.run_networks(root + "/bids", out, n_components=2, per_run=False, threshold=1.0,
                              n_permutations=2, verbose=0)
        llm2bids.run_localize(root + "/bids", out, task="langloc", top_percent=5)
        llm2bids.build_report(out, "model")
        print(json.dumps(sorted({{m.split(".")[0] for m in sys.modules}})))
    """)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    modules = json.loads(done.stdout.strip().splitlines()[-1])
    providers = md.packages_distributions()
    core = _core_requirements() | {"llm2bids"}
    test_only = {"tiny"}  # the test's own helper module
    # present in a test environment, and imported when present by libraries that do not need
    # them (scikit-learn's testing helpers try pytest): not on the default path
    opportunistic = {"pytest", "pluggy", "iniconfig", "pygments"}  # pygments: pytest imports it
    missing = {}
    for module in modules:
        if module in sys.stdlib_module_names or module.startswith("_") or module in test_only:
            continue
        dists = {d.lower().replace("_", "-") for d in providers.get(module, [])}
        if dists and not dists & core and not dists <= opportunistic:
            missing[module] = sorted(dists)
    assert not missing, f"imported but not brought by a plain install: {missing}"


def _floors() -> dict[str, str]:
    """``{distribution: lowest version}`` from pyproject.toml's core dependencies."""
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib

    project = tomllib.loads((TESTS.parent / "pyproject.toml").read_text())["project"]
    floors = {}
    for requirement in project["dependencies"]:
        match = re.fullmatch(r"([A-Za-z0-9_.-]+)>=([0-9.]+)", requirement.strip())
        assert match, f"{requirement!r}: a core dependency is declared as NAME>=FLOOR"
        floors[_name(match[1])] = match[2]
    return floors


def test_the_lowest_stack_pins_every_floor_pyproject_declares():
    """`make test-lowest` installs the floors, torch's included, so the lower bounds users
    are promised are the ones the suite ran on."""
    pins = {}
    for line in (TESTS.parent / "constraints" / "lowest.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, version = line.split("==")
            pins[_name(name)] = version
    floors = _floors()
    assert set(pins) == set(floors)
    for name, floor in floors.items():  # a patch release of the floor's own release
        assert pins[name].split(".")[: len(floor.split("."))] == floor.split("."), name


def test_the_newest_and_lowest_stacks_find_their_python(tmp_path):
    """`make test-newest` / `make test-lowest` take their interpreter from tools/find-python:
    the newest / oldest at least as new as asked (numpy 2.5 needs 3.12; the lowest stack runs
    on requires-python's floor), from PATH or pyenv; none says what to do."""
    script = TESTS.parent / "tools" / "find-python"
    asked = "{}.{}".format(*sys.version_info[:2])
    pyenv = tmp_path / "pyenv"  # this interpreter, installed as pyenv installs one
    (pyenv / "versions" / asked / "bin").mkdir(parents=True)
    (pyenv / "versions" / asked / "bin" / "python3").symlink_to(sys.executable)
    env = {"PATH": "/usr/bin:/bin", "PYENV_ROOT": str(pyenv)}

    def version(*args: str) -> tuple[int, ...]:
        found = subprocess.run(
            [script, *args], capture_output=True, text=True, check=True, env=env
        ).stdout.strip()
        printed = subprocess.run(
            [found, "-c", "import sys; print(*sys.version_info[:2])"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        return tuple(map(int, printed.split()))

    newest, oldest = version(asked), version("--oldest", asked)
    assert newest >= oldest >= sys.version_info[:2], (newest, oldest)
    refused = subprocess.run([script, "3.99"], capture_output=True, text=True, env=env)
    assert refused.returncode == 1 and refused.stdout == ""
    assert "no Python >= 3.99 found" in refused.stderr and "NEWEST_PYTHON=" in refused.stderr
