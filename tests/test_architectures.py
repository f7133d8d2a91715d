"""Thirty-two decoder architectures: registered ones and ones found by their structure.

Each records into one shared dataset (one subject per architecture), round-trips exactly
against a hook placed by hand on the module that holds its neurons, masks exactly, and prunes
to a smaller model with the logits of the masked one. Mixtures of experts are refused.
"""

import json

import numpy as np
import pytest
import torch
import transformers

import llm2bids
from llm2bids.bids import find_runs, load_run
from llm2bids.evaluation import mask_neurons, prune
from llm2bids.exceptions import UnsupportedArchitectureError
from llm2bids.models import ARCHITECTURES, arch_spec, wrap_model
from tiny import CONFIGS, DISCOVERED, LAYERS, tiny_model, tiny_tokenizer

ALL = sorted(CONFIGS)
TEXT = "The cat sat on the mat. Then 12 + 30 = 42, and the dog barked twice at the moon."


def _label(arch: str) -> str:
    return arch.replace("_", "")


def _neuron_path(model, arch: str) -> str:
    """Where the neurons are, written by hand (discovered) or by the registry (registered)."""
    if arch in DISCOVERED:
        return DISCOVERED[arch][1]
    spec = ARCHITECTURES[model.config.model_type]
    return ".".join(p for p in (spec.layers, "{}", spec.mlp, spec.down) if p)


def _hooked(model, arch: str, ids: torch.Tensor) -> np.ndarray:
    """``(tokens, layers, neurons)``: each down projection's input, from plain torch hooks."""
    seen = {}
    handles = [
        model.get_submodule(_neuron_path(model, arch).format(layer)).register_forward_pre_hook(
            lambda m, args, layer=layer: seen.__setitem__(layer, args[0].detach().clone())
        )
        for layer in range(LAYERS)
    ]
    try:
        with torch.no_grad():
            model(ids)
    finally:
        for handle in handles:
            handle.remove()
    return np.stack([seen[i].reshape(ids.shape[1], -1).numpy() for i in range(LAYERS)], axis=1)


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    folder = tmp_path_factory.mktemp("zoo")
    stimuli = folder / "zoo.txt"
    stimuli.write_text(TEXT, encoding="utf-8")
    root = folder / "bids"
    for arch in ALL:
        lm = wrap_model(tiny_model(arch), tiny_tokenizer(), arch)
        llm2bids.record(
            root,
            model=lm,
            subject=_label(arch),
            task="zoo",
            stimuli=stimuli,
            batch_size=1,
            device="cpu",
            verbose=0,
        )
    return root


def test_thirty_two_architectures_of_which_fifteen_discovered():
    assert len(ALL) >= 25 and len(DISCOVERED) >= 9
    for arch in ALL:
        spec = arch_spec(tiny_model(arch))
        assert spec.discovered == (arch in DISCOVERED), arch


@pytest.mark.parametrize("arch", ALL)
def test_records_exactly(zoo, arch):
    (bold,) = find_runs(zoo, subject=_label(arch))
    run = load_run(bold)
    ids = torch.as_tensor(run.events.token_id.to_numpy().copy())[None]
    np.testing.assert_array_equal(run.by_layer(), _hooked(tiny_model(arch), arch, ids))
    sidecar = json.loads(
        bold.with_name(bold.name.replace("_run-01_bold.nii", "_bold.json")).read_text()
    )
    expected = "registered" if arch not in DISCOVERED else "discovered"
    assert sidecar["ArchitectureLayout"].startswith(expected)


def test_the_dataset_of_every_architecture_validates(zoo, valid):
    assert len(find_runs(zoo)) == len(ALL)
    valid(zoo)


@pytest.mark.parametrize("arch", ALL)
def test_masks_and_prunes_exactly(arch):
    model = tiny_model(arch)
    ids = torch.as_tensor(tiny_tokenizer()(TEXT).input_ids)[None]
    n = arch_spec(model).n_neurons(model, 0)
    rng = np.random.default_rng(0)
    keep = rng.random((LAYERS, n)) < 0.5
    # ablating a set = zeroing the down projection's weights that read it (written by hand)
    reference = tiny_model(arch)
    for layer in range(LAYERS):
        down = reference.get_submodule(_neuron_path(reference, arch).format(layer))
        weight = down.weight.data
        if type(down).__name__ == "Conv1D":
            weight[~keep[layer], :] = 0
        else:
            weight[:, ~keep[layer]] = 0
    with torch.no_grad():
        expected = reference(ids).logits
        with mask_neurons(model, ~keep, mode="ablate"):
            masked = model(ids).logits
        pruned = prune(model, keep)(ids).logits
    torch.testing.assert_close(masked, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(pruned, masked, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(
    "model_type, experts",
    [
        ("mixtral", {"num_local_experts": 4}),
        ("qwen2_moe", {"num_experts": 4}),
        ("olmoe", {"num_experts": 4}),
    ],
)
def test_mixtures_of_experts_are_refused_with_the_reason(tmp_path, model_type, experts):
    config = transformers.AutoConfig.for_model(
        model_type,
        vocab_size=512,
        hidden_size=32,
        intermediate_size=40,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=2,
        **experts,
    )
    model = transformers.AutoModelForCausalLM.from_config(config)
    with pytest.raises(UnsupportedArchitectureError, match="mixture-of-experts.*router"):
        llm2bids.record(
            tmp_path / "bids",
            model=wrap_model(model, tiny_tokenizer(), "moe"),
            task="narrative",
            verbose=0,
        )
    assert not (tmp_path / "bids").exists()  # refused before anything was written


def test_a_layout_that_cannot_be_understood_gets_the_registry_error():
    class Odd(torch.nn.Module):
        config = transformers.PretrainedConfig(model_type="odd", num_hidden_layers=2, hidden_size=8)

        def __init__(self):
            super().__init__()
            self.layers = torch.nn.ModuleList([torch.nn.Linear(8, 8) for _ in range(2)])

    with pytest.raises(UnsupportedArchitectureError, match="register_architecture"):
        arch_spec(Odd())


@pytest.mark.parametrize("arch", ALL)
def test_mlp_output_dimensions_mask_exactly(arch):
    """hook_point="mlp_out" reaches every architecture's down projection output."""
    model = tiny_model(arch)
    ids = torch.as_tensor(tiny_tokenizer()(TEXT).input_ids)[None]
    hidden = model.config.hidden_size
    ablate = np.random.default_rng(1).random((LAYERS, hidden)) < 0.3
    reference = tiny_model(arch)  # the same dimensions zeroed in the weights, by hand
    for layer in range(LAYERS):
        down = reference.get_submodule(_neuron_path(reference, arch).format(layer))
        rows = torch.as_tensor(ablate[layer])
        if type(down).__name__ == "Conv1D":
            down.weight.data[:, rows] = 0
        else:
            down.weight.data[rows, :] = 0
        if down.bias is not None:
            down.bias.data[rows] = 0
    with torch.no_grad():
        expected = reference(ids).logits
        with mask_neurons(model, ablate, mode="ablate", hook_point="mlp_out"):
            masked = model(ids).logits
    torch.testing.assert_close(masked, expected, rtol=1e-5, atol=1e-5)
