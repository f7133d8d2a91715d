"""The ``derivatives/llm2bids`` dataset: description, provenance sidecars, atomic writes."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import joblib
import nibabel as nib
import pandas as pd

from . import _io
from ._version import __version__
from .bids.dataset import (
    BIDS_VERSION,
    DERIVATIVES_BIDSIGNORE,
    NOT_BRAIN_DATA,
    generated_by,
    require_dataset,
)
from .bids.path import BIDSPath
from .exceptions import InputError


def check_output_dir(bids_dir: str | Path, output_dir: str | Path) -> None:
    """Refuse a ``bids_dir`` that is not a dataset, and an output folder that would make it invalid.

    Analyses never write into the raw dataset: ``output_dir`` must be outside ``bids_dir``, or
    inside its ``derivatives/`` folder (which the validator and pybids expect there).
    """
    bids, out = require_dataset(bids_dir).resolve(), Path(output_dir).resolve()
    if out == bids:
        raise InputError(
            "OUTPUT_DIR must differ from BIDS_DIR: analyses never write into the raw dataset. "
            f"Use for example {Path(bids_dir) / 'derivatives' / 'llm2bids'}."
        )
    if bids in out.parents and bids / "derivatives" not in out.parents:
        raise InputError(
            f"OUTPUT_DIR {output_dir} lies inside the raw dataset {bids_dir} but not under its "
            "derivatives/ folder, which would make the dataset invalid. Use for example "
            f"{Path(bids_dir) / 'derivatives' / 'llm2bids'}, or a folder outside the dataset."
        )


def init_derivatives(output_dir: str | Path, bids_dir: str | Path) -> Path:
    """Create (or reuse) a derivatives dataset; refuse ``output_dir == bids_dir``."""
    bids_dir = require_dataset(bids_dir)
    check_output_dir(bids_dir, output_dir)
    output_dir = Path(output_dir)
    description = output_dir / "dataset_description.json"
    source = _relative_url(bids_dir, output_dir)
    link = {RAW_DATASET: source}
    with _io.dataset_lock(output_dir):
        if not description.exists():
            _io.write_json(
                description,
                {
                    "Name": "llm2bids derivatives",
                    "BIDSVersion": BIDS_VERSION,
                    "DatasetType": "derivative",
                    "DatasetLinks": link,
                    "GeneratedBy": generated_by(),
                    "SourceDatasets": [{"URL": source}],
                },
            )
            _io.write_text(
                output_dir / "README.md",
                f"# llm2bids derivatives\n\n{NOT_BRAIN_DATA}\n\nComputed from "
                f"`{source}` by llm2bids {__version__}.\n",
            )
        else:  # derivatives written before DatasetLinks: the link is added, nothing changed
            known = _io.read_json(description)
            if RAW_DATASET not in known.get("DatasetLinks", {}):
                known["DatasetLinks"] = known.get("DatasetLinks", {}) | link
                _io.write_json(description, known)
        ignore = output_dir / ".bidsignore"
        # the fixed patterns, then any file names added by ignore_in_derivatives
        added = [
            line
            for line in (ignore.read_text().splitlines() if ignore.exists() else [])
            if line and line not in DERIVATIVES_BIDSIGNORE.splitlines()
        ]
        _io.write_text(ignore, DERIVATIVES_BIDSIGNORE + "".join(f"{n}\n" for n in added))
    return output_dir


#: The name of the raw dataset in the derivatives' ``DatasetLinks`` and ``bids:`` URIs.
RAW_DATASET = "raw"


def bids_uri(path: str | Path, dataset: str | Path, name: str = RAW_DATASET) -> str:
    """The BIDS URI of a file, ``bids:raw:sub-X/func/...``, as the sidecars' ``Sources``.

    Parameters
    ----------
    path : str or Path
        A file of ``dataset``.
    dataset : str or Path
        The root of the dataset that holds it.
    name : str, default="raw"
        Its name in the derivatives' ``DatasetLinks``; ``""`` for the derivatives dataset
        itself (``bids::sub-X/...``).

    Returns
    -------
    str

    Raises
    ------
    InputError
        If ``path`` is not inside ``dataset``.
    """
    relative = Path(os.path.relpath(Path(path).resolve(), Path(dataset).resolve()))
    if relative.parts[:1] == ("..",):
        raise InputError(f"{path} is not a file of the dataset {dataset}.")
    return f"bids:{name}:{relative.as_posix()}"


def resolve_bids_uri(uri: str, dataset: str | Path) -> Path:
    """The file a ``bids:<name>:<path>`` URI of ``dataset``'s sidecars names.

    ``<name>`` is looked up in ``DatasetLinks`` of ``dataset/dataset_description.json``
    (``bids::<path>``: ``dataset`` itself); a ``file://`` link may be relative to ``dataset``.

    Parameters
    ----------
    uri : str
    dataset : str or Path
        The dataset whose sidecar holds the URI.

    Returns
    -------
    Path

    Raises
    ------
    DatasetError
        If the URI is not a BIDS URI, or names a dataset ``DatasetLinks`` does not link.
    """
    from .exceptions import DatasetError

    scheme, name, path = (uri.split(":", 2) + ["", ""])[:3]
    if scheme != "bids" or not path:
        raise DatasetError(f"{uri!r} is not a BIDS URI (bids:<dataset>:<path>).")
    dataset = Path(dataset)
    if not name:
        return dataset / path
    description = dataset / "dataset_description.json"
    links = _io.read_json(description).get("DatasetLinks", {}) if description.exists() else {}
    if name not in links:
        raise DatasetError(
            f"{uri} names the dataset {name!r}, which {description} does not link "
            f"(DatasetLinks: {sorted(links)}); rerun the analysis to write the link."
        )
    root = Path(str(links[name]).removeprefix("file://"))
    return (root if root.is_absolute() else dataset / root) / path


def ignore_in_derivatives(output_dir: str | Path, names: list[str]) -> None:
    """Add ``names`` (file names or patterns) to a derivatives dataset's ``.bidsignore``.

    For files BIDS names but cannot place, such as an atlas over all tasks (functional
    derivatives need a task entity): each is listed by name, so that the validator still checks
    every other file of its kind.

    Parameters
    ----------
    output_dir : str or Path
        The derivatives dataset.
    names : list of str
    """
    path = Path(output_dir) / ".bidsignore"
    with _io.dataset_lock(output_dir):
        lines = path.read_text().splitlines() if path.exists() else []
        new = [n for n in names if n not in lines]
        if new:
            _io.write_text(path, "\n".join(lines + new) + "\n")


def _relative_url(bids_dir: Path, output_dir: Path) -> str:
    try:
        return "file://" + os.path.relpath(bids_dir.resolve(), output_dir.resolve())
    except ValueError:
        return "file://" + str(bids_dir.resolve())


def provenance(**parameters) -> dict:
    """The sidecar keys every derivative carries: generator, version and exact parameters."""
    return {"GeneratedBy": generated_by(), "Parameters": parameters}


def write_img(path: Path, img: nib.Nifti1Image, sidecar: dict | None = None) -> Path:
    """Write a NIfTI derivative (and its JSON sidecar) atomically.

    Parameters
    ----------
    path : Path
        The derivative's BIDS name (its sidecar goes beside it as ``.json``).
    img : nibabel.Nifti1Image
    sidecar : dict or None, default=None
        Metadata (usually :func:`provenance`); ``None`` writes no sidecar.
    """
    with _io.atomic_path(path) as tmp:
        img.to_filename(tmp)
    if sidecar is not None:
        _io.write_json(_json_for(path), sidecar)
    return path


def write_table(path: Path, frame: pd.DataFrame, sidecar: dict | None = None) -> Path:
    """Write a TSV derivative (and its JSON sidecar) atomically.

    Parameters
    ----------
    path : Path
        The derivative's BIDS name (its sidecar goes beside it as ``.json``).
    frame : DataFrame
    sidecar : dict or None, default=None
        Metadata (usually :func:`provenance`); ``None`` writes no sidecar.
    """
    _io.write_tsv(path, frame)
    if sidecar is not None:
        _io.write_json(_json_for(path), sidecar)
    return path


def _json_for(path: Path) -> Path:
    return path.with_name(BIDSPath.from_path(path).update(extension=".json").basename)


#: Where unfinished outputs wait (hidden: the validator and pybids skip dot-folders).
STAGING_DIR = ".llm2bids-staging"


class Staging:
    """Write an analysis's derivatives aside, publish them together, and resume finished steps.

    Files are written under ``output_dir/.llm2bids-staging/<name>-<digest>/`` with their
    final relative names (use :attr:`root` as the derivatives root), and :meth:`publish` moves
    them into place at the end: an interrupted run never leaves new files beside old ones that
    contradict them. :meth:`step` computes a result once and keeps it in the staging folder,
    so that a rerun with the same ``key`` after an interruption takes up where it stopped.

    Parameters
    ----------
    output_dir : str or Path
        The derivatives dataset.
    name : str
        What is staged (for example ``"sub-X_networks"``); staged work of the same name under
        another key is stale and removed.
    key : dict
        Everything the results depend on (parameters, input files with their sizes and
        modification times); JSON-serializable.
    """

    def __init__(self, output_dir: str | Path, name: str, key: dict):
        self.output_dir = Path(output_dir)
        digest = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode())
        folder = self.output_dir / STAGING_DIR
        self.root = folder / f"{name}-{digest.hexdigest()[:16]}"
        for stale in folder.glob(f"{name}-*"):
            if stale != self.root:
                shutil.rmtree(stale, ignore_errors=True)
        self._steps = self.root / ".steps"
        self._steps.mkdir(parents=True, exist_ok=True)

    def step(self, name: str, compute: Callable[[], object]):
        """``compute()``, or its result kept by an earlier, interrupted run of the same key.

        Parameters
        ----------
        name : str
            The step's name, unique within the staging.
        compute : callable
            Computes the result (it may write files under :attr:`root`); the result must be
            picklable.
        """
        path = self._steps / f"{name}.joblib"
        if path.exists():
            return joblib.load(path)
        result = compute()
        with _io.atomic_path(path) as tmp:
            joblib.dump(result, tmp)
        return result

    def publish(self) -> dict[Path, Path]:
        """Move every staged file into ``output_dir``; returns staged path -> final path."""
        moved = {}
        for staged in sorted(self.root.rglob("*")):
            if staged.is_dir() or self._steps in staged.parents:
                continue
            final = self.output_dir / staged.relative_to(self.root)
            final.parent.mkdir(parents=True, exist_ok=True)
            os.replace(staged, final)
            moved[staged] = final
        shutil.rmtree(self.root)
        if not any(self.root.parent.iterdir()):
            self.root.parent.rmdir()
        return moved


def input_fingerprint(paths) -> list[tuple[str, int, int]]:
    """``(path, size, mtime_ns)`` of each input: what a staging key needs to notice changes.

    Parameters
    ----------
    paths : iterable of str or Path
    """
    return [(str(p), (st := Path(p).stat()).st_size, st.st_mtime_ns) for p in paths]
