"""Which model a recording was made with, and whether a loaded model is that one.

A recording's sidecar names its model (:func:`model_identity`): the id, the architecture, the
layers and neurons per layer, and a fingerprint of the weights. An analysis that loads a model
to act on a recording (a lesion, a pruning) checks the two agree (:func:`check_same_model`), so
a neuron set is never applied to a model it was not found in.
"""

from __future__ import annotations

import hashlib

import numpy as np
import torch

from ..exceptions import DatasetError
from .hooks import layer_count, neurons_per_layer

#: Values sampled from each weight tensor for the fingerprint.
FINGERPRINT_SAMPLES = 64


def weights_fingerprint(model: torch.nn.Module) -> str:
    """A SHA-256 of every parameter's name, shape, dtype and a spread sample of its values.

    Cheap at any size (``FINGERPRINT_SAMPLES`` values per tensor, gathered where the tensor
    lives), and different for any two checkpoints that differ in more than a handful of
    weights. Values are hashed in the dtype they are held in, so one model loaded in two
    dtypes has two fingerprints (:func:`check_same_model` compares them only at one dtype).

    Parameters
    ----------
    model : torch.nn.Module

    Returns
    -------
    str
        ``"n/a"`` when some weights are not in memory (offloaded to disk, on the meta device).
    """
    digest = hashlib.sha256()
    for name, param in model.named_parameters():
        if param.device.type == "meta":
            return "n/a"
        flat = param.detach().reshape(-1)
        k, n = min(FINGERPRINT_SAMPLES, flat.numel()), flat.numel()
        # integer steps: float positions round past the end above 2**24 elements
        index = torch.arange(k, dtype=torch.int64) * (n - 1) // max(k - 1, 1)
        sample = flat[index.to(flat.device)].float().cpu().numpy()
        digest.update(f"{name}:{tuple(param.shape)}:{param.dtype}:".encode())
        digest.update(np.ascontiguousarray(sample, dtype="<f4").tobytes())
    return digest.hexdigest()


def model_identity(lm) -> dict:
    """The model fields a recording's sidecar holds.

    Parameters
    ----------
    lm : LoadedModel

    Returns
    -------
    dict
        ``ModelID``, ``Architecture``, ``ModelLayers``, ``ModelNeuronsPerLayer`` (of the MLP),
        ``ModelDtype`` and ``ModelFingerprint`` (:func:`weights_fingerprint`).
    """
    return {
        "ModelID": lm.model_id,
        "Architecture": lm.architecture,
        "ModelLayers": layer_count(lm.model),
        "ModelNeuronsPerLayer": neurons_per_layer(lm.model)[0],
        "ModelDtype": str(lm.dtype).replace("torch.", ""),
        "ModelFingerprint": weights_fingerprint(lm.model),
    }


def identity_differences(recorded: dict, loaded: dict) -> list[str]:
    """The identity fields in which ``loaded`` differs from ``recorded``, as ``name: a != b``.

    Fields the recording lacks (older recordings) are not compared; the fingerprints only
    when both are known and were taken at one dtype.

    Parameters
    ----------
    recorded : dict
        A recording's sidecar (or its :func:`model_identity` fields).
    loaded : dict
        :func:`model_identity` of the model at hand.
    """
    fields = ["ModelID", "Architecture", "ModelLayers", "ModelNeuronsPerLayer"]
    known = {recorded.get("ModelFingerprint"), loaded.get("ModelFingerprint")}
    if "n/a" not in known and None not in known:
        if recorded.get("ModelDtype") == loaded.get("ModelDtype"):
            fields.append("ModelFingerprint")
    return [
        f"{name}: {recorded[name]!r} != {loaded[name]!r}"
        for name in fields
        if name in recorded and recorded[name] != loaded[name]
    ]


def check_same_model(recorded: dict, lm, recording: str) -> None:
    """Refuse to act on ``recording`` with a model that is not the one it was recorded with.

    Parameters
    ----------
    recorded : dict
        The recording's sidecar metadata.
    lm : LoadedModel
        The model about to be used.
    recording : str
        What the recording is (a file name), for the message.

    Raises
    ------
    DatasetError
        Naming both models and each field that differs.
    """
    differences = identity_differences(recorded, model_identity(lm))
    if differences:
        raise DatasetError(
            f"{recording} was recorded with {recorded.get('ModelID')!r}, but the model loaded is "
            f"{lm.model_id!r} ({'; '.join(differences)}): its neuron sets do not apply to this "
            "model. Pass the recorded model (--model), or record this one as another subject."
        )
