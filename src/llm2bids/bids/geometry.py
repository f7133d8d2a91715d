"""The voxel geometry: where each neuron of each layer sits in the 4D volume.

Layer ``l`` is the z-slice ``z = l``; neuron ``j`` of a layer sits at ``x = j % nx``,
``y = j // nx`` with ``nx = ceil(sqrt(n))`` and ``ny = ceil(n / nx)``. Voxels past ``n`` are
padding: zero and outside the neuron mask. The affine is the identity (1 mm voxels).

Because NIfTI stores x fastest, the bytes of one volume are exactly the layers one after the
other, each layer's neurons in order followed by its padding: an array of shape
``(n_tokens, n_layers, ny * nx)`` in C order *is* the NIfTI data block.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property

import nibabel as nib
import numpy as np
import pandas as pd

from ..exceptions import DatasetError, InputError

MAX_NIFTI_AXIS = 32767
_IOV_MAX = 1024  # buffers per gather write (POSIX guarantees at least 16; Linux allows 1024)


@dataclass(frozen=True)
class VoxelGeometry:
    """Placement of ``n_layers`` x ``n_neurons`` neurons in a 3D grid.

    Parameters
    ----------
    n_layers : int
        Number of layers (z-slices).
    n_neurons : int
        Neurons per layer.
    """

    n_layers: int
    n_neurons: int

    def __post_init__(self):
        if self.n_layers < 1 or self.n_neurons < 1:
            raise InputError(
                f"n_layers and n_neurons must be positive, got {self.n_layers} and "
                f"{self.n_neurons}."
            )
        if max(self.nx, self.ny, self.n_layers) > MAX_NIFTI_AXIS:
            raise InputError(
                f"a geometry of {self.n_layers} layers x {self.n_neurons} neurons needs an axis "
                f"longer than NIfTI's {MAX_NIFTI_AXIS}; record a subset of layers."
            )

    @property
    def nx(self) -> int:
        """Voxels along x: ``ceil(sqrt(n_neurons))``."""
        return math.ceil(math.sqrt(self.n_neurons))

    @property
    def ny(self) -> int:
        """Voxels along y: ``ceil(n_neurons / nx)``."""
        return math.ceil(self.n_neurons / self.nx)

    @property
    def slice_size(self) -> int:
        """Voxels in one z-slice (``nx * ny``), neurons plus padding."""
        return self.nx * self.ny

    @property
    def volume_size(self) -> int:
        """Voxels in one volume (one token): ``n_layers * slice_size``, padding included."""
        return self.n_layers * self.slice_size

    @property
    def shape(self) -> tuple[int, int, int]:
        """Spatial shape ``(nx, ny, n_layers)``."""
        return (self.nx, self.ny, self.n_layers)

    @property
    def n_total(self) -> int:
        """Number of neurons over all layers (voxels inside the mask)."""
        return self.n_layers * self.n_neurons

    affine = np.eye(4)

    # -- coordinates ---------------------------------------------------------------------
    def voxel_of(self, layer, neuron):
        """Return ``(x, y, z)`` of neuron(s) ``neuron`` in layer(s) ``layer``.

        Parameters
        ----------
        layer, neuron : int or array-like of int
            Layer (z-slice) and neuron index in it; arrays of the same shape give arrays.
        """
        layer = np.asarray(layer)
        neuron = np.asarray(neuron)
        if np.any((neuron < 0) | (neuron >= self.n_neurons)):
            raise InputError(f"neuron indices must lie in [0, {self.n_neurons}).")
        if np.any((layer < 0) | (layer >= self.n_layers)):
            raise InputError(f"layer indices must lie in [0, {self.n_layers}).")
        return neuron % self.nx, neuron // self.nx, layer

    def neuron_of(self, x, y, z):
        """Return ``(layer, neuron)`` of voxel(s) ``(x, y, z)``; padding voxels raise.

        Parameters
        ----------
        x, y, z : int or array-like of int
            Voxel coordinates.
        """
        neuron = np.asarray(x) + self.nx * np.asarray(y)
        if np.any(neuron >= self.n_neurons):
            raise InputError("voxel lies in the padding, not on a neuron.")
        return np.asarray(z), neuron

    @cached_property
    def mask(self) -> np.ndarray:
        """Boolean neuron mask of shape ``(nx, ny, n_layers)``."""
        x, y = np.meshgrid(np.arange(self.nx), np.arange(self.ny), indexing="ij")
        inside = (x + self.nx * y) < self.n_neurons
        return np.repeat(inside[:, :, None], self.n_layers, axis=2)

    def mask_img(self) -> nib.Nifti1Image:
        """The neuron mask as a NIfTI image (uint8), to pass as ``mask_img`` to nilearn."""
        img = nib.Nifti1Image(self.mask.astype(np.uint8), self.affine)
        img.header.set_xyzt_units("mm", "sec")
        return img

    @cached_property
    def masker_order(self) -> np.ndarray:
        """Flat ``layer * n_neurons + neuron`` index of each column nilearn's maskers return.

        nilearn masks with ``data[mask]``, which walks the mask in C order (x slowest, z
        fastest); this gives, for each such column, the neuron it holds.
        """
        x, y, z = np.nonzero(self.mask)
        return z * self.n_neurons + x + self.nx * y

    def labels(self) -> pd.DataFrame:
        """One row per mask voxel in nilearn's masker order: ``layer, neuron, x, y, z``."""
        x, y, z = np.nonzero(self.mask)
        return pd.DataFrame({"layer": z, "neuron": x + self.nx * y, "x": x, "y": y, "z": z})

    def layer_counts(self, member: np.ndarray) -> pd.DataFrame:
        """Count the neurons flagged in ``member`` (masker order) per layer.

        Parameters
        ----------
        member : ndarray of bool, shape (n_neurons_total,)
            Which neurons count (for example a network's members), in masker order.

        Returns
        -------
        DataFrame
            ``layer, n_key_neurons, fraction`` (fraction of the layer's neurons).
        """
        layers = self.labels().layer.to_numpy()
        counts = np.bincount(layers[np.asarray(member, dtype=bool)], minlength=self.n_layers)
        return pd.DataFrame(
            {
                "layer": np.arange(self.n_layers),
                "n_key_neurons": counts,
                "fraction": np.round(counts / self.n_neurons, 6),
            }
        )

    # -- data ----------------------------------------------------------------------------
    def empty_block(self, n_tokens: int, dtype=np.float32) -> np.ndarray:
        """A zeroed ``(n_tokens, n_layers, slice_size)`` block: the NIfTI data in C order.

        Parameters
        ----------
        n_tokens : int
            Volumes (tokens) of the block.
        dtype : numpy dtype, default=numpy.float32
        """
        return np.zeros((n_tokens, self.n_layers, self.slice_size), dtype=dtype)

    def block_pieces(self, layers: list[np.ndarray], piece_bytes: int = 8 << 20, scratch=None):
        """The NIfTI data block of per-layer arrays, piece by piece.

        Parameters
        ----------
        layers : list of ndarray, each ``(T, n_neurons)`` float32, C-contiguous
            One array per z-slice, in order.
        piece_bytes : int, default=8388608
            About how many bytes of the block each piece covers (8 MiB), without ``scratch``.
        scratch : ndarray or None, default=None
            A zeroed ``(k, n_layers, slice_size)`` float32 array: each piece (``k`` tokens at
            most) is copied into it and is that one buffer, whose padding stays zero. ``None``:
            nothing is assembled, each piece is the layers' own rows (and zero padding).

        Yields
        ------
        start, stop : int
            The tokens the piece covers.
        buffers : list of memoryview
            The piece's bytes in file order (token by token, each layer's neurons then its
            zero padding), ready for a gather write (``os.writev``).

        Notes
        -----
        A gather write costs about a microsecond per buffer: rows of a few kilobytes
        (SmolLM2's 1,536 neurons) write several times slower than one assembled piece, rows
        of tens of kilobytes (8,192 neurons) as fast as it without the copy (see
        :data:`llm2bids.recording.writer.GATHER_FROM_BYTES`). Rows are slices of one byte view
        per layer, made once: a NumPy row and its byte view per row cost another microsecond
        a buffer in Python (measured: 8% of a 138 MB run's write at 8,192 neurons).
        """
        n_tokens = layers[0].shape[0]
        if scratch is not None:
            for start in range(0, n_tokens, len(scratch)):
                stop = min(start + len(scratch), n_tokens)
                piece = scratch[: stop - start]
                for z, layer in enumerate(layers):
                    piece[:, z, : self.n_neurons] = layer[start:stop]
                yield start, stop, [memoryview(piece.reshape(-1)).cast("B")]
            return
        pad = self.slice_size - self.n_neurons
        zeros = memoryview(np.zeros(pad, dtype=np.float32)).cast("B")
        row = 4 * self.n_neurons
        views = [memoryview(np.ascontiguousarray(layer).reshape(-1)).cast("B") for layer in layers]
        per_token = self.n_layers * (2 if pad else 1)
        step = max(1, min(_IOV_MAX // per_token, piece_bytes // (4 * self.volume_size)))
        for start in range(0, n_tokens, step):
            stop = min(start + step, n_tokens)
            buffers = []
            for at in range(start * row, stop * row, row):
                for view in views:
                    buffers.append(view[at : at + row])
                    if pad:
                        buffers.append(zeros)
            yield start, stop, buffers

    def block_to_volume(self, block: np.ndarray) -> np.ndarray:
        """View a ``(T, n_layers, slice_size)`` block as the ``(nx, ny, n_layers, T)`` volume.

        Parameters
        ----------
        block : ndarray, shape (T, n_layers, slice_size)
            A C-ordered data block.
        """
        t = block.shape[0]
        return block.reshape(t, self.n_layers, self.ny, self.nx).T

    def volume_to_block(self, volume: np.ndarray) -> np.ndarray:
        """The ``(T, n_layers, slice_size)`` block of a 4D volume: the inverse of
        :meth:`block_to_volume` (a view of a volume read from a file, which is F-ordered).

        Parameters
        ----------
        volume : ndarray, shape (nx, ny, n_layers, T)
            A 4D volume (as nibabel reads it).
        """
        if volume.shape[:3] != self.shape:
            raise DatasetError(
                f"volume has spatial shape {volume.shape[:3]}, the geometry says {self.shape}."
            )
        return np.asarray(volume).T.reshape(volume.shape[3], self.n_layers, self.slice_size)

    def volume_to_tokens(self, volume: np.ndarray) -> np.ndarray:
        """Return the ``(T, n_layers, n_neurons)`` activations held in a 4D volume (a view).

        Parameters
        ----------
        volume : ndarray, shape (nx, ny, n_layers, T)
            A 4D volume (as nibabel reads it).
        """
        return self.volume_to_block(volume)[:, :, : self.n_neurons]

    def to_sidecar(self) -> dict:
        """The geometry as sidecar metadata, enough to invert the mapping without llm2bids."""
        return {
            "NumberOfLayers": self.n_layers,
            "NeuronsPerLayer": self.n_neurons,
            "VoxelGrid": [self.nx, self.ny, self.n_layers],
            "VoxelMapping": (
                "layer l -> z = l; neuron j -> x = j % nx, y = j // nx, with nx = "
                "ceil(sqrt(NeuronsPerLayer)), ny = ceil(NeuronsPerLayer / nx); voxels with "
                "x + nx*y >= NeuronsPerLayer are zero padding; volume t = token t."
            ),
        }

    @classmethod
    def from_sidecar(cls, meta: dict, source: str = "sidecar") -> VoxelGeometry:
        """Build the geometry from sidecar metadata written by :meth:`to_sidecar`."""
        try:
            geom = cls(int(meta["NumberOfLayers"]), int(meta["NeuronsPerLayer"]))
        except (KeyError, TypeError, ValueError) as err:
            raise DatasetError(
                f"{source} lacks a valid NumberOfLayers / NeuronsPerLayer ({err!r}); was it "
                "written by llm2bids?"
            ) from err
        grid = meta.get("VoxelGrid")
        if grid is not None and list(grid) != list(geom.shape):
            raise DatasetError(
                f"{source} says VoxelGrid {grid}, but {geom.n_layers} layers x "
                f"{geom.n_neurons} neurons give {list(geom.shape)}."
            )
        return geom
