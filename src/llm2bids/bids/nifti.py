"""Writing and reading one run as a 4D NIfTI image."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np

from .._io import atomic_path
from ..exceptions import DatasetError
from .geometry import VoxelGeometry

DESCRIP = b"llm2bids: LLM activations, not brain data"


def run_image(block: np.ndarray, geometry: VoxelGeometry, repetition_time: float = 1.0):
    """Wrap a ``(T, n_layers, slice_size)`` float32 block as a 4D image (no copy)."""
    volume = geometry.block_to_volume(block)
    img = nib.Nifti1Image(volume, geometry.affine)
    header = img.header
    header.set_data_dtype(block.dtype)
    header.set_xyzt_units("mm", "sec")
    zooms = header.get_zooms()
    header.set_zooms((*zooms[:3], float(repetition_time)))
    header["descrip"] = DESCRIP
    img.set_qform(geometry.affine, code=1)
    img.set_sform(geometry.affine, code=1)
    return img


def write_run(path: str | Path, block: np.ndarray, geometry: VoxelGeometry, repetition_time=1.0):
    """Write one run atomically (``.nii`` or ``.nii.gz`` by the extension of ``path``)."""
    img = run_image(block, geometry, repetition_time)
    with atomic_path(path) as tmp:
        img.to_filename(tmp)
    return Path(path)


def open_run(path: str | Path, geometry: VoxelGeometry | None = None) -> nib.Nifti1Image:
    """Open a run lazily, checking it is a readable 4D NIfTI that fits ``geometry``."""
    path = Path(path)
    try:
        img = nib.load(path)
    except FileNotFoundError:
        raise
    except Exception as err:  # nibabel raises several types for foreign or truncated files
        raise DatasetError(f"{path} is not a readable NIfTI image ({err}).") from err
    if path.suffix == ".nii":
        header = img.header
        expected = (
            int(header["vox_offset"]) + int(np.prod(img.shape)) * header.get_data_dtype().itemsize
        )
        if path.stat().st_size < expected:
            raise DatasetError(
                f"{path} is truncated ({path.stat().st_size} bytes, its header needs {expected}); "
                "record that run again (delete it and rerun the same record command)."
            )
    if len(img.shape) != 4:
        raise DatasetError(f"{path} has shape {img.shape}; a run must be a 4D image.")
    if geometry is not None and tuple(img.shape[:3]) != geometry.shape:
        raise DatasetError(
            f"{path} has spatial shape {tuple(img.shape[:3])}, but its sidecar's geometry "
            f"({geometry.n_layers} layers x {geometry.n_neurons} neurons) gives {geometry.shape}."
        )
    return img


def read_volume(img: nib.Nifti1Image, path: str | Path) -> np.ndarray:
    """Read the data of a run as float32, turning truncation into a clear error."""
    try:
        return np.asarray(img.dataobj, dtype=np.float32)
    except (OSError, ValueError, EOFError) as err:
        raise DatasetError(f"{path} is truncated or corrupt ({err}); record it again.") from err
