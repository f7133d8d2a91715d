"""Writing and reading one run as a 4D NIfTI image."""

from __future__ import annotations

import functools
import os
from collections.abc import Iterable
from pathlib import Path

import nibabel as nib
import numpy as np

from .._docs import fill_doc
from .._io import atomic_path
from .._writeback import DropBehind
from ..exceptions import DatasetError
from .geometry import VoxelGeometry

DESCRIP = b"llm2bids: LLM activations, not brain data"


@fill_doc
def run_image(block: np.ndarray, geometry: VoxelGeometry, repetition_time: float = 1.0):
    """Wrap a ``(T, n_layers, slice_size)`` float32 block as a 4D image (no copy).

    Parameters
    ----------
    block : ndarray of float32, shape (T, n_layers, slice_size)
        The NIfTI data block in C order.
    %(geometry)s
    %(repetition_time)s
    """
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


@functools.lru_cache(maxsize=256)
def header_bytes(geometry: VoxelGeometry, n_tokens: int, repetition_time: float = 1.0) -> bytes:
    """The 352 bytes that precede the data block of a ``.nii`` run of ``n_tokens`` volumes.

    Byte for byte what nibabel writes for :func:`run_image` (the 348-byte header with
    ``vox_offset`` 352, unit scaling, then 4 zero bytes: no extensions), so a run can be written
    as these bytes followed by the raw ``(T, n_layers, slice_size)`` float32 block. Cached: runs
    of one recording share a few lengths.
    """
    header = run_image(geometry.empty_block(1), geometry, repetition_time).header.copy()
    header.set_data_shape((*geometry.shape, int(n_tokens)))
    header.set_data_offset(_VOX_OFFSET)
    header.set_slope_inter(1.0, 0.0)
    return header.binaryblock + b"\0" * (_VOX_OFFSET - len(header.binaryblock))


_VOX_OFFSET = 352
_CHUNK = 1 << 26  # one write() call moves at most this many bytes (Linux caps one at ~2 GiB)


def write_run(
    path: str | Path,
    block: np.ndarray,
    geometry: VoxelGeometry,
    repetition_time: float = 1.0,
    drop_behind: bool = False,
) -> Path:
    """Write one run atomically (``.nii`` or ``.nii.gz`` by the extension of ``path``).

    Parameters
    ----------
    path : str or Path
        The run's final name; it exists only once the whole file is written.
    block : ndarray of float32, shape (T, n_layers, slice_size)
        The NIfTI data block in C order (see :mod:`.geometry`).
    geometry : VoxelGeometry
    repetition_time : float, default=1.0
    drop_behind : bool, default=False
        ``.nii``: see :func:`write_run_pieces`.

    Notes
    -----
    A ``.nii`` is written as its header followed by the block itself, in large sequential
    writes with no intermediate copy (the same bytes nibabel writes, several times faster);
    ``.nii.gz`` goes through nibabel.
    """
    path = Path(path)
    if path.name.endswith(".nii") and block.dtype == np.float32 and block.flags.c_contiguous:
        return write_run_pieces(
            path, [[block]], geometry, block.shape[0], repetition_time, drop_behind
        )
    with atomic_path(path) as tmp:
        run_image(block, geometry, repetition_time).to_filename(tmp)
    return path


def write_run_pieces(
    path: str | Path,
    pieces: Iterable[list[np.ndarray]],
    geometry: VoxelGeometry,
    n_tokens: int,
    repetition_time: float = 1.0,
    drop_behind: bool = False,
) -> Path:
    """Write one uncompressed run atomically from pieces of its data block, in file order.

    Parameters
    ----------
    path : str or Path
        The run's final ``.nii`` name; it exists only once the whole file is written.
    pieces : iterable of lists of ndarray or memoryview
        Float32 arrays or byte views whose bytes, one after the other, are the data block of
        ``n_tokens`` volumes (as :meth:`VoxelGeometry.block_pieces` yields them). Each list is
        written with one gather write. An exception raised by the iterable removes the partial
        file.
    geometry : VoxelGeometry
    n_tokens : int
    repetition_time : float, default=1.0
    drop_behind : bool, default=False
        Start the file's writeback as it is written and drop what was written back from the
        page cache (see :mod:`llm2bids._writeback`): for data that is not read back soon.
    """
    path = Path(path)
    if not path.name.endswith(".nii"):
        raise ValueError(f"write_run_pieces writes uncompressed .nii files, got {path.name}.")
    expected = n_tokens * geometry.volume_size * 4
    written = 0
    with (
        atomic_path(path) as tmp,
        open(tmp, "wb", buffering=0) as f,
        DropBehind(f.fileno(), enabled=drop_behind) as behind,
    ):
        header = memoryview(header_bytes(geometry, n_tokens, float(repetition_time)))
        _write_all(f, header)
        behind.wrote(len(header))
        for buffers in pieces:
            n = _writev_all(f, buffers)
            written += n
            behind.wrote(n)
        if written != expected:
            raise ValueError(f"{path.name}: the pieces hold {written} bytes, expected {expected}.")
    return path


def run_file_bytes(geometry: VoxelGeometry, n_tokens: int) -> int:
    """Bytes of a ``.nii`` run of ``n_tokens`` volumes: its header and its data block."""
    return _VOX_OFFSET + n_tokens * geometry.volume_size * 4


def run_file_complete(path: str | Path, geometry: VoxelGeometry, n_tokens: int) -> bool:
    """Whether a run's file holds all of its bytes, judged from its size alone (no read).

    A renamed file can still be short after a crash: the rename may reach the disk before the
    data does. A ``.nii`` must be exactly its header and ``n_tokens`` volumes; a ``.nii.gz``
    must end with the gzip trailer of that many bytes (ISIZE, the size modulo 2**32), which a
    cut-off file has only by chance.

    Parameters
    ----------
    path : str or Path
    geometry : VoxelGeometry
    n_tokens : int
    """
    path = Path(path)
    expected = run_file_bytes(geometry, n_tokens)
    try:
        size = path.stat().st_size
        if not path.name.endswith(".gz"):
            return size == expected
        if size < 18:  # a gzip header and trailer
            return False
        with open(path, "rb") as f:
            f.seek(-4, os.SEEK_END)
            return int.from_bytes(f.read(4), "little") == expected % (1 << 32)
    except FileNotFoundError:
        return False


def _writev_all(f, buffers: list) -> int:
    """Write ``buffers`` one after the other with as few system calls as possible."""
    views = [b if isinstance(b, memoryview) else memoryview(b).cast("B") for b in buffers]
    total = sum(len(v) for v in views)
    done = os.writev(f.fileno(), views) if hasattr(os, "writev") else 0
    if done < total:  # a short write (or no writev): finish buffer by buffer
        for view in views:
            if done >= len(view):
                done -= len(view)
                continue
            _write_all(f, view[done:])
            done = 0
    return total


def _write_all(f, data: memoryview) -> None:
    for start in range(0, len(data), _CHUNK):
        view = data[start : start + _CHUNK]
        while len(view):  # a raw write may take fewer bytes than given
            view = view[f.write(view) :]


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
