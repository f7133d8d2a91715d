"""The package's seams: BIDS names live in bids/, analysis stages do not import each other."""

import ast
import re
from pathlib import Path

import pytest

import llm2bids
from llm2bids.bids.path import BIDSPath

PACKAGE = Path(llm2bids.__file__).parent
ANALYSIS_STAGES = ("decomposition", "glm", "evaluation")

# What building or finding a BIDS file name by hand looks like: an entity formatted into a
# name (followed by another entity, a suffix or a folder), a folder of the layout spelled out,
# a glob or a substring test on entity text, or the name helpers bids/ replaced.
NAME_BY_HAND = [
    re.compile(r"""\b(sub|ses|task|acq|run|desc|atlas)-\{[^}]*\}(_|/)"""),
    re.compile(r"""/\s*f?["'](sub|ses)-"""),
    re.compile(r"""["']func["']"""),
    re.compile(r"""glob\([^)]*(sub-|_desc-|_bold|_events|_task-|_acq-)"""),
    re.compile(r"""["'][^"']*_(desc|task|acq|run|sub)-[^"']*["']\s+(not\s+)?in\b"""),
    re.compile(r"""split\(["']_(desc|task|acq|run)-"""),
    re.compile(r"""\b(bids_name|parse_entities|func_dir)\b"""),
]


def _modules_outside_bids():
    for path in sorted(PACKAGE.rglob("*.py")):
        if PACKAGE / "bids" not in path.parents:
            yield path


def test_no_bids_name_is_built_or_found_outside_bids():
    offences = []
    for path in _modules_outside_bids():
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if any(pattern.search(line) for pattern in NAME_BY_HAND):
                offences.append(f"{path.relative_to(PACKAGE)}:{number}: {line.strip()}")
    assert not offences, "BIDS names by hand (use BIDSPath):\n" + "\n".join(offences)


def test_the_name_check_catches_what_it_should():
    caught = [
        'func / f"sub-{sub}_acq-mlp_desc-canica_keyneurons.tsv"',
        'Path(out) / f"sub-{sub}" / "func"',
        'func.glob("*_desc-canica_components.nii.gz")',
        'if "_desc-" in name:',
        'les.name.split("_desc-")[-1]',
        'bids_name("bold", ".json", **ents)',
    ]
    for line in caught:
        assert any(p.search(line) for p in NAME_BY_HAND), line
    allowed = ['desc=f"{sub} networks"', 'other=f"run-{run:02d}",']
    for line in allowed:
        assert not any(p.search(line) for p in NAME_BY_HAND), line


def _imported_packages(path: Path) -> set[str]:
    """The llm2bids subpackages ``path`` imports (relative or absolute)."""
    tree = ast.parse(path.read_text())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level == 2 and node.module:  # from ..stage import x
                found.add(node.module.split(".")[0])
            elif node.level == 0 and (node.module or "").startswith("llm2bids."):
                found.add(node.module.split(".")[1])
        elif isinstance(node, ast.Import):
            found |= {a.name.split(".")[1] for a in node.names if a.name.startswith("llm2bids.")}
    return found


@pytest.mark.parametrize("stage", ANALYSIS_STAGES)
def test_analysis_stages_do_not_import_each_other(stage):
    for path in sorted((PACKAGE / stage).rglob("*.py")):
        others = _imported_packages(path) & (set(ANALYSIS_STAGES) - {stage})
        assert not others, f"{path.relative_to(PACKAGE)} imports the stage(s) {sorted(others)}"


@pytest.mark.parametrize("base", ["models", "bids"])
def test_the_base_packages_import_no_stage(base):
    """models/ and bids/ sit under every stage: none of their modules imports one, even
    lazily inside a function (the pruned-model reader lives in models/)."""
    for path in sorted((PACKAGE / base).rglob("*.py")):
        stages = _imported_packages(path) & set(ANALYSIS_STAGES)
        assert not stages, f"{path.relative_to(PACKAGE)} imports the stage(s) {sorted(stages)}"


def test_bids_does_not_import_the_stimuli():
    for path in sorted((PACKAGE / "bids").rglob("*.py")):
        assert "stimuli" not in _imported_packages(path), path.name


def test_bids_path_round_trips_and_queries(tmp_path):
    run = BIDSPath(
        subject="m1", task="narrative", acquisition="mlp", run=3, suffix="bold", extension=".nii"
    )
    assert run.basename == "sub-m1_task-narrative_acq-mlp_run-03_bold.nii"
    placed = run.update(root=tmp_path)
    assert placed.fpath == tmp_path / "sub-m1" / "func" / run.basename
    assert BIDSPath.from_path(placed.fpath, root=tmp_path) == placed
    stat = BIDSPath(subject="m1", task="t", contrast="aMinusB", stat="z", suffix="statmap")
    assert (
        stat.update(extension=".nii.gz").basename
        == "sub-m1_task-t_contrast-aMinusB_stat-z_statmap.nii.gz"
    )

    for r in (1, 2):
        for suffix, ext in (("bold", ".nii"), ("events", ".tsv")):
            path = placed.update(run=r, suffix=suffix, extension=ext).fpath
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(b"")
    placed.update(run=None, extension=".json").fpath.write_text("{}")
    (
        placed.directory / ".llm2bids-tmp-1-x-sub-m1_task-narrative_acq-mlp_run-09_bold.nii"
    ).write_bytes(b"")
    (placed.directory / "notes.txt").write_text("not BIDS")
    bolds = BIDSPath(suffix="bold", extension=".nii", root=tmp_path).match()
    assert [b.run for b in bolds] == [1, 2]  # hidden temporaries and foreign files never match
    assert len(BIDSPath(subject="m1", task="narrative", root=tmp_path).match()) == 5
    assert BIDSPath(subject="m2", root=tmp_path).match() == []
    # a run's sidecar is the recording's (inheritance), or its own when it has one
    assert bolds[0].sidecar() == placed.update(run=None, extension=".json")
    with pytest.raises(llm2bids.exceptions.InputError, match="letters and digits"):
        BIDSPath(subject="m_1")
    with pytest.raises(llm2bids.exceptions.InputError, match="no field"):
        run.update(desc="x")


def test_cli_defaults_are_the_libraries():
    from llm2bids.cli.main import build_parser

    parser = build_parser()
    args = parser.parse_args(["networks", "bids", "out", "participant"])
    assert args.n_components == 20 and args.method == "canica" and args.hook_point == "mlp"
    args = parser.parse_args(["record", "bids"])
    assert args.max_tokens == 512 and args.batch_size == 4
    args = parser.parse_args(["localize", "b", "o", "participant", "--task", "t"])
    assert args.hook_point == "mlp"


def test_help_states_every_default():
    """Each option with a default says it; required options and flags do not say '(default:'."""
    from llm2bids.cli.main import build_parser

    parser = build_parser()
    for name, sub in parser._subparsers._group_actions[0].choices.items():
        text = sub.format_help()
        for action in sub._actions:
            if not action.option_strings or action.help == "==SUPPRESS==":
                continue
            shown = f"(default: {action.default})"
            if (
                action.required
                or action.default in (None, "==SUPPRESS==")
                or isinstance(action.default, bool)
            ):
                continue
            flat = "".join(text.split())  # help wraps lines, even inside a value
            assert shown.replace(" ", "") in flat, f"{name} {action.option_strings[0]}"
        assert "(default: None)" not in text, name


#: Functions whose body may exceed 60 lines, each with its reason and its current length (it
#: may shrink, never grow).
LONG_FUNCTIONS = {
    "recording/recorder.py:record": (
        75,
        "the one entry point that plans and checks every task before anything is written, "
        "in an order the data-safety tests pin down",
    ),
    "evaluation/lesion.py:run_lesion": (
        67,
        "a BIDS app: checks every input before loading a model, then one study per subject",
    ),
    "models/registry.py:discover_architecture": (
        67,
        "one search over a model's modules, whose cases read best side by side",
    ),
    "report/html.py:_dashboards": (66, "one HTML section laid out in the order it renders"),
}


def _function_lengths():
    """Body length (docstring excluded) of every function of the package, by place."""
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                body = node.body
                if len(body) > 1 and isinstance(getattr(body[0], "value", None), ast.Constant):
                    body = body[1:]  # the docstring
                place = f"{path.relative_to(PACKAGE).as_posix()}:{node.name}"
                yield place, node.end_lineno - body[0].lineno + 1


def test_no_function_body_grows_past_60_lines_without_a_recorded_reason():
    too_long = {
        place: n for place, n in _function_lengths() if n > LONG_FUNCTIONS.get(place, (60, ""))[0]
    }
    assert not too_long, f"split these (or record why not in LONG_FUNCTIONS): {too_long}"
