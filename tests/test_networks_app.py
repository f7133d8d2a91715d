from pathlib import Path

import pandas as pd
import pytest
from bids import BIDSLayout

import llm2bids
from llm2bids.cli.main import main
from llm2bids.decomposition import run_networks


@pytest.fixture(scope="module")
def networks_written(recorded, tmp_path_factory):
    """The derivatives folder of ``run_networks`` on the recorded dataset, and what it
    returned (the files it wrote, by role)."""
    out = tmp_path_factory.mktemp("deriv") / "llm2bids"
    return out, run_networks(recorded, out, n_components=3, n_permutations=20, verbose=0)


@pytest.fixture(scope="module")
def derivatives(networks_written):
    """The derivatives folder ``run_networks`` wrote."""
    return networks_written[0]


def test_run_networks_returns_its_files_by_role(networks_written):
    """What was written comes back by role, and each role is the files' own suffix."""
    _, results = networks_written
    assert list(results) == ["tinyllama"]  # per subject, as the other apps return
    written = results["tinyllama"].files
    assert {"components", "keyneurons", "layercounts", "dseg", "recurrence"} <= set(written)
    for role, paths in written.items():
        assert paths and all(p.exists() and p.name.split(".")[0].endswith(role) for p in paths)


def test_networks_writes_valid_indexed_derivatives(recorded, derivatives, valid):
    valid(derivatives)
    func = derivatives / "sub-tinyllama" / "func"
    for task in ("narrative", "langloc"):
        stem = f"sub-tinyllama_task-{task}_acq-mlp"
        for name in (
            "desc-canica_components.nii.gz",
            "desc-canica_mixing.tsv",
            "desc-canica_keyneurons.tsv",
            "desc-canica_layercounts.tsv",
            "atlas-canica_dseg.nii.gz",
            "atlas-canica_dseg.tsv",
            "atlas-canica_probseg.nii.gz",
            "desc-canica_connectivity.tsv",
            "desc-canicaRecurrence_map.nii.gz",
        ):
            assert (func / f"{stem}_{name}").exists(), name
    assert (func / "sub-tinyllama_acq-mlp_desc-canica_components.nii.gz").exists()  # all tasks
    recurrence = pd.read_csv(func / "sub-tinyllama_acq-mlp_desc-canica_recurrence.tsv", sep="\t")
    assert set(recurrence.scope) == {"seed", "task", "run"}
    assert recurrence.p_value.between(0, 1).all()
    layout = BIDSLayout(recorded, validate=False, derivatives=[str(derivatives)])
    found = layout.derivatives["llm2bids"].get(
        subject="tinyllama", desc="canica", suffix="keyneurons", extension=".tsv"
    )
    assert len(found) >= 2
    meta = found[0].get_metadata()
    assert meta["Parameters"]["random_state"] == 0 and meta["GeneratedBy"][0]["Name"] == "llm2bids"


def test_same_seed_gives_identical_key_neurons(recorded, derivatives, tmp_path):
    out = tmp_path / "again"
    run_networks(recorded, out, tasks=["langloc"], n_components=3, per_run=False, verbose=0)
    name = "sub-tinyllama/func/sub-tinyllama_task-langloc_acq-mlp_desc-canica_keyneurons.tsv"
    assert (out / name).read_bytes() == (derivatives / name).read_bytes()


def test_cli_bad_inputs_write_nothing(recorded, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["networks", str(tmp_path), str(out), "participant"]) == 2
    assert "not a BIDS dataset" in capsys.readouterr().err
    assert main(["networks", str(recorded), str(recorded), "participant"]) == 2
    assert "must differ" in capsys.readouterr().err
    assert main(["networks", str(recorded), str(out), "participant", "--task", "nope"]) == 2
    assert "no runs" in capsys.readouterr().err
    assert main(["networks", str(recorded), str(out), "participant", "--n-components", "5000"]) == 2
    assert "exceeds the number of time points" in capsys.readouterr().err
    assert not out.exists()
    assert llm2bids.validate(recorded).valid


def test_validator_checks_every_derivative_the_schema_names(derivatives):
    """.bidsignore hides only what BIDS does not name: the atlas files are really validated."""
    import fnmatch

    ignored = [p for p in (derivatives / ".bidsignore").read_text().splitlines() if p]
    # dseg and probseg are BIDS suffixes: no pattern hides them, only the all-task atlas
    # (functional derivatives need a task) is listed by name
    assert all("*" not in p and "_task-" not in p for p in ignored if "seg" in p)
    files = [p for p in derivatives.rglob("*") if p.is_file()]
    visible = [
        p
        for p in files
        if not any(part.startswith(".") for part in p.relative_to(derivatives).parts)
        and not any(fnmatch.fnmatch(p.name, pattern) for pattern in ignored)
    ]
    atlas = [p for p in visible if "_dseg." in p.name or "_probseg." in p.name]
    assert len(atlas) >= 6  # three tasks' worth of dseg (.nii.gz, .tsv, .json) and probseg
    result = llm2bids.validate(derivatives)
    assert result.valid, result.summary()
    assert result.n_files_checked == len(visible), sorted(p.name for p in visible)


def test_a_one_sided_fit_is_drawn_and_described_as_its_atlas(recorded, tmp_path, monkeypatch):
    """After ``sided="one"``, the report draws exactly the atlas's members (no negative tail)
    and every text states ``z >= threshold``: the sidecar, the captions, the Methods."""
    import json

    import nibabel as nib
    import numpy as np

    from llm2bids.report import figures

    out = tmp_path / "llm2bids"
    run_networks(
        recorded, out, n_components=3, sided="one", threshold=1.5, per_run=False, verbose=0
    )
    func = out / "sub-tinyllama" / "func"
    stem = func / "sub-tinyllama_acq-mlp"
    maps = np.asarray(nib.load(f"{stem}_desc-canica_components.nii.gz").dataobj)
    members = np.asarray(nib.load(f"{stem}_atlas-canica_probseg.nii.gz").dataobj) > 0
    assert (maps[members] >= 1.5).all() and (maps <= -1.5).any()  # a negative tail exists
    drawn = []
    real = figures.layer_mosaic
    monkeypatch.setattr(
        figures, "layer_mosaic", lambda data, *a, **k: drawn.append(data) or real(data, *a, **k)
    )
    page = llm2bids.build_report(out, "tinyllama").read_text()
    assert len(drawn) == 3
    for k, data in enumerate(drawn):
        np.testing.assert_array_equal(data, np.where(members[..., k], maps[..., k], 0))
    sidecar = json.loads(Path(f"{stem}_desc-canica_keyneurons.json").read_text())
    assert "z >= 1.5" in sidecar["Description"] and "|z|" not in sidecar["Description"]
    assert "z &gt;= 1.5" in page or "z >= 1.5" in page
    assert "|z| &gt;=" not in page and "|z| >=" not in page
