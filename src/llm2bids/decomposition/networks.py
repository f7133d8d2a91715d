"""Functional networks of neurons: nilearn's CanICA / DictLearning on recorded runs.

The decomposition itself is nilearn's; this module feeds it what LLM data needs (the explicit
neuron mask, no smoothing, per-run z-scoring, special tokens regressed out) and turns the
component maps into networks and key neurons.
"""

from __future__ import annotations

import functools
import logging
import warnings
from collections.abc import Sequence
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
from scipy import stats
from sklearn.base import BaseEstimator
from sklearn.exceptions import ConvergenceWarning
from sklearn.utils.validation import check_is_fitted

from .._docs import fill_doc
from .._gc import frozen_gc
from .._parallel import parallel_map
from ..bids.geometry import VoxelGeometry
from ..bids.nifti import read_volume
from ..bids.reader import check_same_geometry, load_img, special_mask
from ..exceptions import InputError, NumericalError, check_choice, check_positive_int

logger = logging.getLogger("llm2bids.decomposition")

METHODS = ("canica", "dictlearning")
DEFAULT_THRESHOLD = 3.0
#: Decompose all layers together, or each layer on its own (arXiv 2508.05239).
SCOPES = ("model", "layer")
#: Two-sided ``|z| >= threshold``, or one-sided ``z >= threshold`` on the heavy tail
#: (arXiv 2502.20408).
SIDES = ("two", "one")
#: Solvers of CanICA's ICA restarts, and their default iterations per restart
#: (python-picard's; scikit-learn's FastICA's, as nilearn runs it).
SOLVERS = ("picard", "fastica")
DEFAULT_MAX_ITER = {"picard": 500, "fastica": 200}


def membership_rule(sided: str, threshold: float | str = "threshold") -> str:
    """The rule that puts a neuron in a network, as the texts state it: ``|z| >= 3``.

    Parameters
    ----------
    sided : {"two", "one"}
        Two-sided ``|z| >= threshold`` or one-sided ``z >= threshold``.
    threshold : float or str, default="threshold"
        The value, or a name for it.

    Returns
    -------
    str

    Examples
    --------
    >>> membership_rule("two", 3.0)
    '|z| >= 3'
    >>> membership_rule("one", 2.5)
    'z >= 2.5'
    """
    value = f"{threshold:g}" if isinstance(threshold, (int, float)) else threshold
    return f"{'|z|' if sided == 'two' else 'z'} >= {value}"


def members(maps: np.ndarray, sided: str, threshold: float) -> np.ndarray:
    """Which neurons belong to each network: :func:`membership_rule` applied to z maps.

    Parameters
    ----------
    maps : ndarray, shape (k, n_neurons_total)
        z-scored maps.
    sided : {"two", "one"}
        Two-sided ``|z| >= threshold`` or one-sided ``z >= threshold``.
    threshold : float
    """
    return np.abs(maps) >= threshold if sided == "two" else maps >= threshold


class FunctionalNetworks(BaseEstimator):
    """Group decomposition of recorded runs into functional networks of neurons.

    Parameters
    ----------
    method : {"canica", "dictlearning"}, default="canica"
        nilearn's ``CanICA`` (group ICA) or ``DictLearning`` (sparse dictionary learning).
    n_components : int or sequence of int, default=20
        Number of components (networks). A sequence is a sweep: one decomposition per count,
        all their components stacked, so the key neurons are the union over the sweep
        (arXiv 2502.20408 sweeps 10 to 512).
    threshold : float, default=3.0
        A neuron belongs to a network where the z-scored component map has ``|z| >=
        threshold`` (``z >= threshold`` when one-sided). Maps are z-scored over neurons; 3.0
        is two-sided p = 0.0027 under a Gaussian bulk, so only the heavy tail that ICA
        isolates passes (in a map with no structure about 0.3% of neurons would).
    scope : {"model", "layer"}, default="model"
        ``"model"``: one decomposition over the neurons of all layers. ``"layer"``: one per
        layer over that layer's neurons (arXiv 2508.05239), each map z-scored within its
        layer; components are numbered layer by layer.
    sided : {"two", "one"}, default="two"
        ``"two"``: ``|z| >= threshold``. ``"one"``: ``z >= threshold`` on the heavy tail
        (maps are signed so that it is positive), as arXiv 2502.20408 thresholds.
    standardize : bool, default=True
        z-score every neuron's time course before the decomposition (nilearn's
        ``standardize="zscore_sample"``), so that each neuron counts alike. ``False`` keeps
        the raw scale, as arXiv 2502.20408's FastICA did: high-variance units (the last
        layers' outputs) then dominate the components.
    random_state : int, default=0
        Seed of nilearn's randomized SVD and ICA / dictionary learning.
    drop_special : bool, default=True
        Regress special tokens (BOS and the like, ``special == 1`` in the events) out of each
        run with one spike regressor per token, which removes their influence exactly.
    alpha : float, default=2
        Sparsity of ``DictLearning`` (ignored by CanICA). nilearn's default of 10 suits
        brain data; on z-scored neuron data it zeroes most components, and 2 recovers
        planted networks exactly across seeds (see the tests).
    n_epochs : int, default=1
        Epochs of ``DictLearning`` (ignored by CanICA).
    n_init : int, default=10
        Restarts of the ICA (ignored by DictLearning).
    ica_solver : {"picard", "fastica"}, default="picard"
        Solver of each ICA restart (ignored by DictLearning). ``"picard"``: Picard-O
        (orthogonal, extended), which converges on the near-Gaussian maps of LLM data where
        FastICA's fixed point cycles; ``"fastica"``: nilearn's own (scikit-learn's FastICA,
        cube contrast). They find the same maps where both converge.
    ica_max_iter : int or None, default=None
        Iterations of one ICA restart; ``None``: the solver's default (500 for Picard, 200
        for FastICA as in nilearn).
    n_jobs : int, default=1
        Processes (joblib): the decompositions of a sweep or of the layers run side by side;
        a single decomposition passes them to nilearn for its per-run reductions. ``-1``:
        all cores, or every worker of a Dask cluster inside :func:`llm2bids.dask_cluster`.
        Results do not depend on it.
    verbose : int, default=0

    Attributes
    ----------
    components_ : ndarray, shape (n_maps, n_neurons_total)
        z-scored, sign-corrected maps, columns in nilearn's masker order (zero outside the
        layer of a per-layer map). ``n_maps`` is ``n_components`` summed over the sweep, times
        the number of layers when ``scope="layer"``.
    component_info_ : pandas.DataFrame
        One row per map: ``component`` (from 1), ``layer`` (``n/a`` for whole-model maps)
        and ``n_components`` (of the decomposition it comes from).
    components_img_ : nibabel.Nifti1Image
        The same maps as a 4D image (one volume per component).
    networks_ : ndarray of bool, shape (n_components, n_neurons_total)
        ``|components_| >= threshold``.
    key_neurons_ : pandas.DataFrame
        One row per (neuron, network) membership: ``layer, neuron, component, z,
        n_networks`` (``n_networks``: how many networks the neuron belongs to).
    mixing_ : pandas.DataFrame
        Component time courses of every run: ``run, volume, special`` and one column per
        component (``comp-01`` ...). Computed on first access (a second pass over the runs,
        which fits that only need the maps, such as a seed refit, never pay).
    geometry_ : VoxelGeometry
    estimator_ : nilearn.decomposition.CanICA or DictLearning
        The (first) fitted nilearn estimator.
    estimators_ : list
        Every fitted nilearn estimator, in the order of ``component_info_``.
    convergence_warnings_ : int
        How many solver calls did not converge (each is logged once as a warning; results
        are kept, never dropped).
    """

    def __init__(  # noqa: PLR0913 (public: keyword options, as the CLI's)
        self,
        method: str = "canica",
        n_components: int | Sequence[int] = 20,
        threshold: float = DEFAULT_THRESHOLD,
        random_state: int = 0,
        drop_special: bool = True,
        alpha: float = 2,
        n_epochs: int = 1,
        n_init: int = 10,
        n_jobs: int = 1,
        verbose: int = 0,
        scope: str = "model",
        sided: str = "two",
        standardize: bool = True,
        ica_solver: str = "picard",
        ica_max_iter: int | None = None,
    ):
        self.method = method
        self.n_components = n_components
        self.threshold = threshold
        self.random_state = random_state
        self.drop_special = drop_special
        self.alpha = alpha
        self.n_epochs = n_epochs
        self.n_init = n_init
        self.n_jobs = n_jobs
        self.verbose = verbose
        self.scope = scope
        self.sided = sided
        self.standardize = standardize
        self.ica_solver = ica_solver
        self.ica_max_iter = ica_max_iter

    @property
    def component_counts(self) -> list[int]:
        """``n_components`` as a list (one entry per decomposition of the sweep)."""
        n = self.n_components
        return [n] if isinstance(n, (int, np.integer)) else list(n)

    def check_params(self) -> None:
        """Check the parameters without reading any data; :meth:`fit` starts with it.

        Raises
        ------
        InputError
            Naming the first parameter that is not valid and what it accepts.
        """
        check_choice("method", self.method, METHODS)
        counts = self.component_counts
        if not counts or not all(
            isinstance(n, (int, np.integer)) and not isinstance(n, bool) and n >= 1 for n in counts
        ):
            raise InputError(
                f"n_components must be a positive integer or a list of them, got "
                f"{self.n_components!r}."
            )
        if not (np.isfinite(self.threshold) and self.threshold > 0):
            raise InputError(f"threshold must be a positive z value, got {self.threshold!r}.")
        check_choice("scope", self.scope, SCOPES)
        check_choice("sided", self.sided, SIDES)
        check_choice("ica_solver", self.ica_solver, SOLVERS)
        check_positive_int("ica_max_iter", self.ica_max_iter, allow_none=True)

    def fit(self, runs: Sequence[str | Path], y=None) -> FunctionalNetworks:
        """Decompose the runs (paths of ``_bold`` files written by llm2bids).

        Parameters
        ----------
        runs : sequence of str or Path
            Runs of one model; all must share one voxel geometry.
        y : None
            Ignored.

        Returns
        -------
        self
        """
        self.check_params()
        runs = [Path(r) for r in ([runs] if isinstance(runs, (str, Path)) else runs)]
        if not runs:
            raise InputError("no runs to decompose: check the subject and task filters.")
        self.geometry_ = check_same_geometry(runs)
        samples = [special_mask(r, load_img(r).shape[3]) for r in runs]
        check_n_components(max(self.component_counts), samples, self.drop_special)
        confounds = [_spike_regressors(s) if self.drop_special else None for s in samples]
        geom = self.geometry_
        column_layer = geom.labels().layer.to_numpy()
        parts = [None] if self.scope == "model" else list(range(geom.n_layers))
        jobs = [(layer, k) for layer in parts for k in self.component_counts]
        # Many decompositions (layers, counts) run in parallel, each on one core; a single
        # one gives nilearn the cores for its per-run reductions.
        outer = self.n_jobs if len(jobs) > 1 else 1
        inner = self.n_jobs if outer == 1 else 1
        fitted = parallel_map(
            functools.partial(_fit_part, self, geom, runs, confounds, inner),
            jobs,
            n_jobs=outer,
        )
        raws, zmaps, info, caught_all = [], [], [], []
        for (layer, k), (_, part, caught) in zip(jobs, fitted):
            columns = slice(None) if layer is None else np.flatnonzero(column_layer == layer)
            raw = np.zeros((part.shape[0], geom.n_total))
            raw[:, columns] = part
            z = np.zeros_like(raw)
            z[:, columns] = zscore_maps(part)
            raws.append(raw)
            zmaps.append(z)
            info += [("n/a" if layer is None else layer, k)] * part.shape[0]
            caught_all += caught
        self.estimators_ = [estimator for estimator, *_ in fitted]
        self.estimator_ = self.estimators_[0]
        self.convergence_warnings_ = _report_convergence(caught_all, self.method)
        raw = np.vstack(raws)
        self.components_ = np.vstack(zmaps)
        self.component_info_ = pd.DataFrame(info, columns=["layer", "n_components"])
        self.component_info_.insert(0, "component", np.arange(1, len(info) + 1))
        self.networks_ = members(self.components_, self.sided, self.threshold)
        self.components_img_ = self.maps_to_img(self.components_)
        self.key_neurons_ = key_neuron_table(self.components_, self.networks_, self.geometry_)
        self.runs_ = runs
        # What the time courses need, kept for the first access to mixing_.
        self._time_course_inputs = (jobs, confounds, samples, _signs(raw, self.components_))
        self._mixing = None
        return self

    @property
    def mixing_(self) -> pd.DataFrame:
        check_is_fitted(self, "components_")
        if self._mixing is None:
            jobs, confounds, samples, signs = self._time_course_inputs
            series = time_courses(
                self.estimators_,
                [layer for layer, _ in jobs],
                self.geometry_,
                self.runs_,
                confounds,
            )
            self._mixing = _mixing_table(series, samples, signs)
        return self._mixing

    def estimator_params(self) -> dict:
        """The nilearn estimator and the arguments it is built with (the mask aside).

        Returns
        -------
        dict
            ``{"class": "CanICA" | "DictLearning", <argument>: <value>, ...}``; what the
            derivatives' sidecars record.
        """
        counts = self.component_counts
        common = {
            "n_components": counts[0] if len(counts) == 1 else counts,
            "smoothing_fwhm": None,
            "standardize": "zscore_sample" if self.standardize else False,
            "detrend": False,
            "random_state": self.random_state,
            "n_jobs": self.n_jobs,
            "verbose": self.verbose,
            "memory_level": 0,
        }
        if self.method == "canica":
            return {
                "class": "CanICA",
                **common,
                "threshold": None,
                "n_init": self.n_init,
                "do_cca": True,
                "ica_solver": self.ica_solver,
                "ica_max_iter": self.ica_max_iter or DEFAULT_MAX_ITER[self.ica_solver],
            }
        return {"class": "DictLearning", **common, "alpha": self.alpha, "n_epochs": self.n_epochs}

    def _make_estimator(self, mask_img: nib.Nifti1Image, n_components: int, n_jobs: int = 1):
        from nilearn.decomposition import DictLearning

        from ._canica import RestartedCanICA

        params = self.estimator_params() | {"n_components": n_components, "n_jobs": n_jobs}
        if params.pop("class") == "DictLearning":
            return DictLearning(mask=mask_img, **params)
        solver, max_iter = params.pop("ica_solver"), params.pop("ica_max_iter")
        estimator = RestartedCanICA(mask=mask_img, **params)
        estimator.solver, estimator.max_iter = solver, max_iter
        return estimator

    def maps_to_img(self, maps: np.ndarray) -> nib.Nifti1Image:
        """Put ``(k, n_neurons_total)`` maps in masker order into a 4D image.

        Parameters
        ----------
        maps : ndarray, shape (k, n_neurons_total)
            One map per row, columns in nilearn's masker order.
        """
        geom = self.geometry_
        data = np.zeros((*geom.shape, maps.shape[0]), dtype=np.float32)
        data[geom.mask] = maps.T
        img = nib.Nifti1Image(data, geom.affine)
        img.header.set_xyzt_units("mm", "sec")
        return img

    def layer_counts(self) -> pd.DataFrame:
        """Key neurons per layer: ``layer, n_key_neurons, fraction``."""
        return self.geometry_.layer_counts(self.networks_.any(axis=0))


def _part_imgs(runs: list[Path], layer: int | None) -> list:
    """What nilearn reads for a part: the runs' paths, or a layer's z-slice of each run.

    Paths, not opened images: nilearn keeps the data it reads on an image object it is given
    (``_data_cache``), so a list of opened runs would hold every run in memory by the end of
    a pass (30 GB for an 8B-size dataset); from a path, it opens, reads and drops each run in
    turn. A layer's slice reads 1/n_layers of the data.
    """
    if layer is None:
        return [str(r) for r in runs]
    return [load_img(r).slicer[:, :, layer : layer + 1, :] for r in runs]


def time_courses(estimators, layers, geometry, runs, confounds) -> list[np.ndarray]:
    """Each run's component time courses, ``(T, n_components)`` with the parts side by side.

    The values of nilearn 0.14's ``estimator.transform`` (each volume regressed on the part's
    maps by least squares, then the confounds regressed out by :func:`nilearn.signal.clean`),
    computed from one read of each run in the file's own order: each part's pseudo-inverse
    is laid onto the file's voxels (zero on the padding), so a run costs one matrix product
    per part over contiguous memory. nilearn's masker instead gathers every neuron's time
    series across the volumes (a strided read of the whole run per part); before nilearn
    0.14 it also collected garbage before each image it read and regressed only on the
    voxels where some map is positive (``_trim_maps``), which for signed ICA maps is not the
    least-squares fit. Here every supported nilearn gives nilearn 0.14's numbers.

    Parameters
    ----------
    estimators : list of fitted nilearn decompositions
        One per part, as in ``FunctionalNetworks.estimators_``.
    layers : list of int or None
        Each part's layer (None: the whole model).
    geometry : VoxelGeometry
        The runs' geometry.
    runs : list of Path
        The runs.
    confounds : list of ndarray or None
        Each run's confounds, as given to the fit.

    Returns
    -------
    list of ndarray
        One ``(n_volumes, n_components_total)`` float array per run.
    """
    from nilearn.signal import clean

    labels = geometry.labels()
    layer_of = labels.layer.to_numpy()
    file_column = layer_of * geometry.slice_size + labels.neuron.to_numpy()
    projections = []  # (start, stop, pseudo-inverse over the file columns start:stop)
    for estimator, layer in zip(estimators, layers):
        columns = file_column if layer is None else file_column[layer_of == layer]
        start = 0 if layer is None else layer * geometry.slice_size
        stop = geometry.volume_size if layer is None else start + geometry.slice_size
        pinv = np.zeros((stop - start, len(estimator.components_)), dtype=np.float32)
        pinv[columns - start] = np.linalg.pinv(np.asarray(estimator.components_, np.float64))
        projections.append((start, stop, pinv))
    standardize = _no_standardization()
    series = []
    for run, confound in zip(runs, confounds):
        block = geometry.volume_to_block(read_volume(load_img(run), run))
        voxels = block.reshape(len(block), -1)  # token by token, in file order (a view)
        ts = np.hstack([voxels[:, start:stop] @ pinv for start, stop, pinv in projections])
        if confound is not None:
            ts = clean(
                ts,
                confounds=confound,
                detrend=False,
                standardize=standardize,
                standardize_confounds=True,
            )
        series.append(ts)
    return series


def _no_standardization():
    """nilearn's value for "do not standardize": None from 0.13 (False deprecated), else False."""
    import nilearn
    from packaging.version import Version

    return None if Version(nilearn.__version__) >= Version("0.13") else False


def _fit_part(networks, geometry, runs, confounds, n_jobs, job):
    """One decomposition: the whole model (``layer`` None) or one layer, ``k`` components.

    Returns the fitted nilearn estimator, its maps (over the part's neurons) and the warnings
    it raised (as plain tuples, so a worker process can send them back).
    """
    layer, k = job
    mask_img = geometry.mask_img()
    if layer is not None:
        mask_img = mask_img.slicer[:, :, layer : layer + 1]
    estimator = networks._make_estimator(mask_img, k, n_jobs)
    with warnings.catch_warnings(record=True) as caught, frozen_gc():
        warnings.simplefilter("always")
        estimator.fit(_part_imgs(runs, layer), confounds=confounds)
    part = np.asarray(estimator.components_, dtype=np.float64)
    if not np.all(np.isfinite(part)):
        raise NumericalError(
            f"{networks.method} produced non-finite component maps"
            + (f" in layer {layer}" if layer is not None else "")
            + "; check the runs for constant or non-finite neurons."
        )
    caught = [(w.category, str(w.message), w.filename, w.lineno) for w in caught]
    return estimator, part, caught


def check_n_components(n_components: int, samples: Sequence[np.ndarray], drop_special=True):
    """Refuse more components than the shortest run has time points (``samples``: sample masks).

    Parameters
    ----------
    n_components : int
        The components asked for.
    samples : sequence of ndarray of bool
        Each run's sample mask (True for ordinary tokens).
    drop_special : bool, default=True
        Whether special tokens are left out (then only ordinary tokens count).
    """
    usable = min(int(s.sum()) if drop_special else len(s) for s in samples)
    if n_components > usable:
        raise InputError(
            f"n_components={n_components} exceeds the number of time points of the shortest "
            f"run ({usable} tokens without special ones); lower --n-components or record "
            "longer runs (--max-tokens)."
        )


def zscore_maps(maps: np.ndarray, orient: bool = True) -> np.ndarray:
    """z-score each map over neurons and flip its sign so its heavy tail is positive.

    Parameters
    ----------
    maps : ndarray, shape (k, n_neurons_total)
        Raw component maps.
    orient : bool, default=True
        Flip each map's sign so its heavy tail is positive; ``False`` keeps the signs (maps
        whose signs are already set, such as a group map's back-projection).
    """
    maps = np.asarray(maps, dtype=np.float64)
    centered = maps - maps.mean(axis=1, keepdims=True)
    std = centered.std(axis=1, keepdims=True)
    z = np.divide(centered, std, out=np.zeros_like(centered), where=std > 0)
    if orient:
        skew = stats.skew(z, axis=1)
        z[np.nan_to_num(skew) < 0] *= -1
    return z


@fill_doc
def key_neuron_table(
    components: np.ndarray, networks: np.ndarray, geometry: VoxelGeometry
) -> pd.DataFrame:
    """Rows ``layer, neuron, component, z, n_networks`` for every membership.

    Parameters
    ----------
    components : ndarray, shape (n_components, n_neurons_total)
        z-scored maps, columns in nilearn's masker order.
    networks : ndarray of bool, same shape
        Membership (``|z| >= threshold``).
    %(geometry)s
    """
    labels = geometry.labels()
    comp, col = np.nonzero(networks)
    counts = networks.sum(axis=0)
    table = pd.DataFrame(
        {
            "layer": labels.layer.to_numpy()[col],
            "neuron": labels.neuron.to_numpy()[col],
            "component": comp + 1,
            "z": np.round(components[comp, col], 4),
            "n_networks": counts[col],
        }
    )
    return table.sort_values(["component", "layer", "neuron"], ignore_index=True)


def _spike_regressors(sample_mask: np.ndarray) -> np.ndarray | None:
    """One indicator column per dropped volume (None when nothing is dropped)."""
    dropped = np.flatnonzero(~sample_mask)
    if dropped.size == 0:
        return None
    spikes = np.zeros((len(sample_mask), dropped.size))
    spikes[dropped, np.arange(dropped.size)] = 1.0
    return spikes


def _signs(raw: np.ndarray, zmaps: np.ndarray) -> np.ndarray:
    """+1 or -1 per map: the flip :func:`zscore_maps` applied, for the time courses to follow."""
    signs = np.sign(np.sum(raw * zmaps, axis=1))
    signs[signs == 0] = 1
    return signs


def _mixing_table(series, samples, signs) -> pd.DataFrame:
    frames = []
    for i, (ts, sample) in enumerate(zip(series, samples)):
        ts = np.asarray(ts) * signs
        frame = pd.DataFrame(ts, columns=[f"comp-{k + 1:02d}" for k in range(ts.shape[1])])
        frame.insert(0, "special", (~sample).astype(int))
        frame.insert(0, "volume", np.arange(len(frame)))
        frame.insert(0, "run", i + 1)
        frames.append(frame)
    return pd.concat(frames, ignore_index=True)


def _report_convergence(caught, method: str) -> int:
    """Log the solver's convergence warnings once, saying how often and why; return the count.

    Every other warning caught during the fit is issued again, unchanged.
    """
    texts = []
    for category, message, filename, lineno in caught:
        if issubclass(category, ConvergenceWarning) or "converge" in message.lower():
            texts.append(message)
        else:
            warnings.warn_explicit(message, category, filename, lineno)
    if not texts:
        return 0
    message = (
        f"{method} did not converge in {len(texts)} solver call(s); results are kept but may "
        f"be unstable (try more components' data, another seed, or for DictLearning more "
        f"n_epochs). Last solver message: {texts[-1]}"
    )
    logger.warning(message)
    return len(texts)
