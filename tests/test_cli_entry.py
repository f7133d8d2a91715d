"""Every way of starting the command line sees every command."""

import subprocess
import sys

import pytest

from llm2bids.cli.registry import COMMANDS


@pytest.mark.parametrize("module", ["llm2bids", "llm2bids.cli.main"])
def test_python_dash_m_lists_every_command(module):
    import llm2bids.cli.commands  # noqa: F401  (fills the registry)

    out = subprocess.run(
        [sys.executable, "-m", module, "--help"], capture_output=True, text=True, check=True
    ).stdout
    assert len(COMMANDS) >= 8
    for name in COMMANDS:
        assert f"    {name} " in out, name
    record = subprocess.run(
        [sys.executable, "-m", module, "record", "--help"], capture_output=True, text=True
    )
    assert record.returncode == 0 and "--batch-size" in record.stdout
