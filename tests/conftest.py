"""Shared fixtures: tiny models saved to disk, recorded datasets, and a validator check."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))

import llm2bids  # noqa: E402
from tiny import save_tiny  # noqa: E402

torch.set_num_threads(2)


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    """Factory: folder of a saved tiny model of an architecture (cached per session)."""
    cache: dict[str, Path] = {}

    def make(arch: str = "llama") -> Path:
        if arch not in cache:
            cache[arch] = save_tiny(arch, tmp_path_factory.mktemp("models") / f"tiny-{arch}")
        return cache[arch]

    return make


@pytest.fixture(scope="session")
def recorded(tmp_path_factory, tiny_dir):
    """A dataset with the tiny llama recorded on the narrative and langloc tasks."""
    root = tmp_path_factory.mktemp("recorded") / "bids"
    llm2bids.record(
        root,
        model=str(tiny_dir("llama")),
        task=["narrative", "langloc"],
        max_tokens=96,
        batch_size=3,
        verbose=0,
    )
    return root


def assert_valid(root) -> None:
    """Run the real BIDS validator and fail with its report on any error."""
    result = llm2bids.validate(root)
    assert result.valid, result.summary()


@pytest.fixture
def valid():
    return assert_valid
