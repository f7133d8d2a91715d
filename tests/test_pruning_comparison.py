"""``compare-pruning``: a model intact, keep-masked and pruned, compared (issue 29)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

import llm2bids
from llm2bids.exceptions import InputError
from llm2bids.models import load_model


def test_pruning_comparison_tables_and_datasets(tmp_path, tiny_dir, valid):
    lm = load_model(str(tiny_dir("llama")), device="cpu")
    result = llm2bids.compare_pruning(
        tmp_path, lm, percent=50, max_tokens=96, n_components=4, n_permutations=50, verbose=0
    )
    # three units, every pair compared on words; the masked model also neuron by neuron
    table = result.group.similarity.set_index(["unit_a", "unit_b"])
    assert len(table) == 3
    masked = table.loc[("sub-intact", "sub-masked50")]
    assert not np.isnan(masked.spatial_matched_share)
    assert np.isnan(table.loc[("sub-intact", "sub-pruned50"), "spatial_matched_share"])
    survival = result.survival
    fit = result.group.fits["sub-intact"]
    assert list(survival.network) == list(range(1, len(fit.components_) + 1))
    assert (survival.n_members == fit.networks_.sum(axis=1)).all()
    assert survival.kept_share.between(0, 1).all()
    assert {"pruned_r", "pruned_matched", "masked_r", "masked_matched", "masked_dice"} <= set(
        survival.columns
    )
    written = pd.read_csv(result.files["survival"], sep="\t")
    pd.testing.assert_frame_equal(written, survival, check_dtype=False, atol=1e-4)
    # the pruned model has half the neurons of each layer; both datasets are valid
    pruned_run = llm2bids.find_runs(result.files["bids"], subject="pruned50")[0]
    assert llm2bids.load_run(pruned_run).geometry.n_neurons == 20
    assert "sub-intact and sub-" in result.files["report"].read_text()
    valid(result.files["bids"])
    valid(result.files["derivatives"])


def test_pruning_comparison_refuses_a_bad_percent(tmp_path):
    with pytest.raises(InputError, match="percent must be an integer"):
        llm2bids.compare_pruning(tmp_path, percent=100)
    assert not list(tmp_path.iterdir())
