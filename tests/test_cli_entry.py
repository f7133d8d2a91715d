"""Every way of starting the command line sees every command."""

import re
import subprocess
import sys

import pytest

import llm2bids
from llm2bids.cli.registry import COMMANDS


@pytest.mark.parametrize("module", ["llm2bids", "llm2bids.cli.main"])
def test_python_dash_m_lists_every_command(module):
    import llm2bids.cli.commands  # noqa: F401  (fills the registry)

    out = subprocess.run(
        [sys.executable, "-m", module, "--help"], capture_output=True, text=True, check=True
    ).stdout
    assert len(COMMANDS) >= 8
    for name in COMMANDS:  # a long name gets its help on the next line
        assert re.search(rf"^    {re.escape(name)}( |$)", out, re.MULTILINE), name
    record = subprocess.run(
        [sys.executable, "-m", module, "record", "--help"], capture_output=True, text=True
    )
    assert record.returncode == 0 and "--batch-size" in record.stdout


def test_every_option_is_named_after_the_parameter_it_sets():
    """A flag's ``dest`` is a parameter of the function its command calls (old spellings stay
    as aliases), so that the docs of one are the docs of the other."""
    import argparse
    import inspect

    from llm2bids.cli.main import build_parser
    from llm2bids.demo import run_demo

    calls = {
        "record": llm2bids.record,
        "networks": llm2bids.run_networks,
        "localize": llm2bids.run_localize,
        "lesion": llm2bids.run_lesion,
        "prune": llm2bids.run_prune,
        "replicate": llm2bids.replicate,
        "demo": run_demo,
    }
    cli_only = {"help", "analysis_level"}  # argparse's, and the BIDS-Apps positional
    (commands,) = [a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)]
    assert set(calls) <= set(commands.choices)
    group_levels = {
        "networks": llm2bids.run_group_networks,
        "localize": llm2bids.run_group_localize,
    }  # `... group` calls these
    for name, fn in calls.items():
        params = set(inspect.signature(fn).parameters)
        if name in group_levels:
            params |= set(inspect.signature(group_levels[name]).parameters)
        stray = {a.dest for a in commands.choices[name]._actions} - params - cli_only
        assert not stray, f"{name}: {sorted(stray)} set no parameter of {fn.__name__}"
    for name, group in group_levels.items():  # one flag, one default, at either level
        a, b = inspect.signature(calls[name]).parameters, inspect.signature(group).parameters
        differ = {p for p in set(a) & set(b) if a[p].default != b[p].default}
        assert not differ, f"{name}: {sorted(differ)} default differently at the group level"
    parser = build_parser()
    old = parser.parse_args(["prune", "--keep", "k.tsv", "--out", "p", "--protect-layers", "0"])
    assert (str(old.output_dir), old.protected_layers) == ("p", [0])
