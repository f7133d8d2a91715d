"""Neuron sets: a per-layer boolean mask over a model's neurons, read from the derivatives."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd

from .._docs import fill_doc
from ..bids.geometry import VoxelGeometry
from ..bids.path import BIDSPath, suffix_of
from ..exceptions import DatasetError, InputError


def set_entities(path: str | Path) -> BIDSPath:
    """The BIDS entities of a neuron-set file's name (subject, task, ``acq-`` hook point ...).

    An empty :class:`~llm2bids.bids.path.BIDSPath` for a file of the user's own naming.
    """
    try:
        return BIDSPath.from_path(path)
    except (DatasetError, ValueError):  # not a BIDS name llm2bids knows
        return BIDSPath()


#: The names of the files a neuron set is read from.
SET_FILES = ("_keyneurons.tsv", "_dseg.nii.gz", "_statmap.nii.gz", "_components.nii.gz")


def check_set_file(source: str | Path, name: str = "neuron set") -> Path:
    """``source`` as a Path, if it is a file; else an error that says what to pass.

    Parameters
    ----------
    source : str or Path
    name : str, default="neuron set"
        What the caller calls it (a parameter or flag), for the message.

    Raises
    ------
    InputError
        If ``source`` does not exist or is a folder (naming neuron-set files inside it).
    """
    source = Path(source)
    if source.is_dir():
        inside = sorted(str(p) for p in source.rglob("*") if p.name.endswith(SET_FILES))
        example = f" (it holds {len(inside)}, for example {inside[0]!r})" if inside else ""
        raise InputError(
            f"{name} {str(source)!r} is a folder; pass one file: a *_keyneurons.tsv table, a "
            f"*_dseg.nii.gz atlas or a *_statmap.nii.gz map{example}."
        )
    if not source.exists():
        raise InputError(f"{name} {str(source)!r} does not exist.")
    return source


def read_neuron_set(
    source: str | Path,
    n_layers: int,
    n_neurons: int,
    component: int | None = None,
    threshold: float | None = None,
    layers: list[int] | None = None,
) -> np.ndarray:
    """Read a neuron set into a ``(n_layers, n_neurons)`` boolean mask.

    Parameters
    ----------
    source : str or Path
        - a key-neuron TSV (``layer``, ``neuron`` and optionally ``component`` columns), as
          written by ``llm2bids networks`` and ``llm2bids localize``;
        - an atlas ``*_dseg.nii.gz`` (``component`` picks a label; default every non-zero one);
        - a stat map ``*_statmap.nii.gz`` / component map, with ``threshold`` (voxels >= it).
    n_layers, n_neurons : int
        The model's layers and neurons per layer: the set must fit them.
    component : int or None, default=None
        Keep only this network (TSV ``component`` column or dseg label).
    threshold : float or None, default=None
        Needed for stat maps.
    layers : list of int or None, default=None
        Model layer of each z-slice when the recording was a subset (``RecordedLayers``).

    Returns
    -------
    ndarray of bool, shape (n_layers, n_neurons)
    """
    source = check_set_file(source)
    if source.name.endswith((".nii", ".nii.gz")):
        layer, neuron = _from_image(source, n_neurons, component, threshold)
    else:
        layer, neuron = _from_table(source, component)
    if layers is not None:
        layer = np.asarray(layers)[layer]
    if layer.size and (layer.max() >= n_layers or layer.min() < 0):
        raise InputError(
            f"{source.name} names layer {int(layer.max())}, but the model has {n_layers} layers "
            "(0-based): the table comes from a different model."
        )
    if neuron.size and (neuron.max() >= n_neurons or neuron.min() < 0):
        raise InputError(
            f"{source.name} names neuron {int(neuron.max())}, but the model has {n_neurons} "
            "neurons per layer: the table comes from a different model."
        )
    mask = np.zeros((n_layers, n_neurons), dtype=bool)
    mask[layer, neuron] = True
    if not mask.any():
        raise InputError(
            f"{source.name} selects no neuron"
            + (f" for component {component}" if component is not None else "")
            + "; lower the threshold or pick another network."
        )
    return mask


def _from_table(path: Path, component) -> tuple[np.ndarray, np.ndarray]:
    try:
        table = pd.read_csv(path, sep="\t")
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as err:
        raise InputError(f"{path} cannot be read as a TSV: {err}.") from err
    missing = {"layer", "neuron"} - set(table.columns)
    if missing:
        raise InputError(
            f"{path.name} lacks the column(s) {sorted(missing)} of a key-neuron table."
        )
    if component is not None:
        if "component" not in table:
            raise InputError(f"{path.name} has no component column to pick {component} from.")
        table = table[table.component == component]
    return _indices(table, "layer", path), _indices(table, "neuron", path)


def _indices(table: pd.DataFrame, column: str, path: Path) -> np.ndarray:
    """A column of whole numbers, or an error naming the first row that is not one."""
    values = pd.to_numeric(table[column], errors="coerce")
    bad = values.isna() | (values != values.round())
    if bad.any():
        row = int(np.flatnonzero(bad.to_numpy())[0])
        raise InputError(
            f"{path.name}: {column} must be a whole number on every row; data row {row + 1} "
            f"holds {table[column].iloc[row]!r}."
        )
    return values.to_numpy().astype(int)


def _from_image(path: Path, n_neurons, component, threshold) -> tuple[np.ndarray, np.ndarray]:
    data = np.asarray(nib.load(path).dataobj)
    if data.ndim == 4:
        if component is None:
            raise InputError(f"{path.name} is 4D: pass the component (volume, from 1) to use.")
        data = data[..., component - 1]
    geom = VoxelGeometry(data.shape[2], n_neurons)
    if data.shape[:2] != geom.shape[:2]:
        raise InputError(
            f"{path.name} has a {data.shape[:2]} grid per layer, but {n_neurons} neurons per layer "
            f"give {geom.shape[:2]}: the map comes from a different model."
        )
    if suffix_of(path) == "dseg":
        hit = data == component if component is not None else data > 0
    else:
        if threshold is None:
            raise InputError(
                f"{path.name} is a statistical map: pass a threshold (the neurons at or above "
                "it form the set; `llm2bids lesion --threshold Z`)."
            )
        hit = data >= threshold
    x, y, z = np.nonzero(hit & geom.mask)
    return z, x + geom.nx * y


def rank_neurons(components: str | Path | nib.Nifti1Image, geometry: VoxelGeometry) -> pd.DataFrame:
    """Rank every neuron by its largest ``|z|`` over a set of component maps.

    Parameters
    ----------
    components : str, Path or Nifti1Image
        A 4D component image (``*_components.nii.gz`` of ``llm2bids networks``).
    geometry : VoxelGeometry
        The recording's geometry.

    Returns
    -------
    DataFrame
        ``layer, neuron, z`` (``z``: the largest ``|z|``), one row per neuron, in masker order.
    """
    img = components if isinstance(components, nib.Nifti1Image) else nib.load(components)
    data = np.asarray(img.dataobj)
    if data.ndim == 3:
        data = data[..., None]
    if data.shape[:3] != geometry.shape:
        raise InputError(
            f"component maps of spatial shape {data.shape[:3]} do not fit a geometry of "
            f"{geometry.n_layers} layers x {geometry.n_neurons} neurons {geometry.shape}."
        )
    maps = data[geometry.mask]  # (neurons, components)
    labels = geometry.labels()
    return pd.DataFrame(
        {"layer": labels.layer, "neuron": labels.neuron, "z": np.abs(maps).max(axis=1)}
    )


def top_neurons(
    ranking: pd.DataFrame, fraction: float, n_layers: int, n_neurons: int, per_layer: bool = False
):
    """The top ``fraction`` of neurons by ``|z|``, over the whole model or in each layer.

    Parameters
    ----------
    ranking : DataFrame
        ``layer, neuron, z`` rows (as :func:`rank_neurons` gives, or a key-neuron table); a
        neuron listed several times counts once, with its largest ``|z|``.
    fraction : float
        In (0, 1].
    n_layers, n_neurons : int
        The model's size.
    per_layer : bool, default=False
        ``False``: the top ``fraction`` of all ``n_layers * n_neurons`` neurons (a layer may
        get many or none). ``True``: the top ``fraction`` of each layer's neurons (every
        layer keeps the same share).

    Returns
    -------
    ndarray of bool, shape (n_layers, n_neurons), or None
        ``None`` when the ranking lists fewer neurons than the fraction asks for.
    """
    if not 0 < fraction <= 1:
        raise InputError(f"fraction must lie in (0, 1], got {fraction!r}.")
    ranked = _strongest_first(ranking)
    if per_layer:
        k = int(round(fraction * n_neurons))
        if (_per_layer(ranked, n_layers) < k).any():
            return None
        top = ranked.groupby("layer", sort=False).head(k)
    else:
        k = int(round(fraction * n_layers * n_neurons))
        if k > len(ranked):
            return None
        top = ranked.iloc[:k]
    mask = np.zeros((n_layers, n_neurons), dtype=bool)
    mask[top.layer.to_numpy(int), top.neuron.to_numpy(int)] = True
    return mask


def top_shortfall(
    ranking: pd.DataFrame, fraction: float, n_layers: int, n_neurons: int, per_layer: bool = False
) -> str:
    """Why :func:`top_neurons` found too few neurons: what the fraction needs, what is ranked.

    Parameters
    ----------
    ranking : DataFrame
        ``layer, neuron, z`` rows, as for :func:`top_neurons`.
    fraction : float
        The fraction :func:`top_neurons` was asked for.
    n_layers, n_neurons : int
        The model's size.
    per_layer : bool, default=False
        Whether the fraction was of each layer.

    Returns
    -------
    str
        For example ``"it needs 10 neurons in every layer and the table ranks fewer (layer 2:
        5)"``.
    """
    ranked = _strongest_first(ranking)
    if not per_layer:
        need = int(round(fraction * n_layers * n_neurons))
        return f"it needs {need} neurons and the table ranks {len(ranked)}"
    need = int(round(fraction * n_neurons))
    counts = _per_layer(ranked, n_layers)
    short = ", ".join(f"layer {layer}: {n}" for layer, n in counts[counts < need].items())
    return f"it needs {need} neurons in every layer and the table ranks fewer ({short})"


def _strongest_first(ranking: pd.DataFrame) -> pd.DataFrame:
    """Rows by descending ``|z|``, each neuron once (with its largest ``|z|``)."""
    ranked = ranking.assign(absz=ranking.z.abs()).sort_values(
        "absz", ascending=False, kind="stable"
    )
    return ranked.drop_duplicates(["layer", "neuron"])


def _per_layer(ranked: pd.DataFrame, n_layers: int) -> pd.Series:
    """Ranked neurons in each layer, every layer listed."""
    return ranked.groupby("layer").size().reindex(range(n_layers), fill_value=0)


@fill_doc
def random_controls(target: np.ndarray, n_controls: int = 5, seed: int = 0) -> list[np.ndarray]:
    """Random neuron sets with as many neurons per layer as ``target`` (one per seed).

    Parameters
    ----------
    target : ndarray of bool, shape (n_layers, n_neurons)
    n_controls : int, default=5
    %(seed)s
    """
    rng = np.random.default_rng(seed)
    n_layers, n_neurons = target.shape
    sizes = target.sum(axis=1)
    controls = []
    for _ in range(n_controls):
        mask = np.zeros_like(target)
        for layer, size in enumerate(sizes):
            mask[layer, rng.choice(n_neurons, size=size, replace=False)] = True
        controls.append(mask)
    return controls
