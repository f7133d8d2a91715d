import nibabel as nib
import numpy as np
import pytest
from nilearn.maskers import NiftiMasker

from llm2bids.bids import VoxelGeometry
from llm2bids.bids.nifti import run_image
from llm2bids.exceptions import DatasetError, InputError


@pytest.mark.parametrize("n,nx,ny", [(1536, 40, 39), (40, 7, 6), (49, 7, 7), (1, 1, 1), (3, 2, 2)])
def test_grid_follows_the_documented_formula(n, nx, ny):
    geom = VoxelGeometry(5, n)
    assert (geom.nx, geom.ny) == (nx, ny)
    assert geom.mask.sum() == 5 * n
    assert geom.shape == (nx, ny, 5)


def test_voxel_mapping_inverts():
    geom = VoxelGeometry(4, 40)
    layer, neuron = np.meshgrid(np.arange(4), np.arange(40), indexing="ij")
    x, y, z = geom.voxel_of(layer.ravel(), neuron.ravel())
    assert np.all(x + geom.nx * y == neuron.ravel()) and np.all(z == layer.ravel())
    back_layer, back_neuron = geom.neuron_of(x, y, z)
    assert np.all(back_layer == layer.ravel()) and np.all(back_neuron == neuron.ravel())
    with pytest.raises(InputError):
        geom.voxel_of(0, 40)
    with pytest.raises(InputError):
        geom.neuron_of(geom.nx - 1, geom.ny - 1, 0)  # 41st slot: padding


def test_block_layout_is_the_nifti_layout_and_padding_is_zero():
    geom = VoxelGeometry(3, 40)
    rng = np.random.default_rng(0)
    acts = rng.standard_normal((5, 3, 40)).astype(np.float32)
    block = geom.empty_block(5)
    block[:, :, :40] = acts
    img = run_image(block, geom)
    data = np.asarray(img.dataobj)
    assert data.shape == (7, 6, 3, 5)
    for t, layer, neuron in [(0, 0, 0), (4, 2, 39), (2, 1, 17)]:
        x, y, z = geom.voxel_of(layer, neuron)
        assert data[x, y, z, t] == acts[t, layer, neuron]
    assert np.all(data[~geom.mask] == 0)
    np.testing.assert_array_equal(geom.volume_to_tokens(data), acts)
    assert img.header.get_zooms()[3] == 1.0
    assert img.header.get_xyzt_units() == ("mm", "sec")


def test_masker_order_matches_nilearn():
    geom = VoxelGeometry(3, 40)
    acts = np.random.default_rng(1).standard_normal((6, 3, 40)).astype(np.float32)
    block = geom.empty_block(6)
    block[:, :, :40] = acts
    img = nib.Nifti1Image(np.asarray(run_image(block, geom).dataobj), np.eye(4))
    masked = NiftiMasker(mask_img=geom.mask_img(), standardize=None).fit().transform(img)
    np.testing.assert_array_equal(masked, acts.reshape(6, -1)[:, geom.masker_order])
    labels = geom.labels()
    assert list(labels.columns) == ["layer", "neuron", "x", "y", "z"]
    np.testing.assert_array_equal(labels.layer * 40 + labels.neuron, geom.masker_order)


def test_sidecar_round_trip_and_mismatch():
    geom = VoxelGeometry(30, 1536)
    assert VoxelGeometry.from_sidecar(geom.to_sidecar()) == geom
    bad = geom.to_sidecar() | {"VoxelGrid": [48, 32, 30]}
    with pytest.raises(DatasetError, match="VoxelGrid"):
        VoxelGeometry.from_sidecar(bad)
    with pytest.raises(InputError, match="32767"):
        VoxelGeometry(40000, 4)
