"""A model pruned by llm2bids whose layers keep different numbers of MLP neurons.

Saved beside the weights by ``llm2bids.save_pruned`` and named in ``config.json``'s
``auto_map``, so that plain transformers builds each layer at its kept width::

    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)

It needs torch and transformers only (not llm2bids). ``config.json`` holds each layer's kept
neurons (``llm2bids_neurons_per_layer``) and whether its down projection has a bias
(``llm2bids_down_bias``); ``llm2bids_pruning.json`` says which neurons of the original model
they are.
"""

import torch
import transformers
from transformers.pytorch_utils import Conv1D

# The architecture's class and module paths: llm2bids writes the saved model's values here.
# LAYERS leads from the model to its list of blocks, MLP from a block to its MLP ("" when the
# block holds the projections); UP are the projections whose outputs are the neurons (with
# FUSED_GATE_UP, one module: gate rows, then up rows), DOWN the one whose input they are;
# CONV1D: GPT-2 Conv1D weights, (in, out).
BASE = "LlamaForCausalLM"
LAYERS = "model.layers"
MLP = "mlp"
UP = ("gate_proj", "up_proj")
DOWN = "down_proj"
FUSED_GATE_UP = False
CONV1D = False


def _get(module, path):
    for name in filter(None, path.split(".")):
        module = getattr(module, name)
    return module


def _resized(module, n_in, n_out, bias):
    """A projection like ``module`` (its dtype and device) of ``n_in`` -> ``n_out`` features."""
    if CONV1D:
        new = Conv1D(n_out, n_in)
        if not bias:
            new.bias = None
    else:
        new = torch.nn.Linear(n_in, n_out, bias=bias)
    return new.to(device=module.weight.device, dtype=module.weight.dtype)


def _widths(module):
    """(in, out) features of a projection."""
    shape = module.weight.shape
    return (shape[0], shape[1]) if CONV1D else (shape[1], shape[0])


class PrunedForCausalLM(getattr(transformers, BASE)):
    """The architecture's causal LM with each layer's MLP at its kept width."""

    @classmethod
    def is_custom_code(cls):
        """Not custom to transformers 5: the architecture's own class with narrower MLPs, so its
        checkpoint conversions (GPT-NeoX's ``embed_out``) apply, as for the base class."""
        return False

    def __init__(self, config):
        super().__init__(config)
        blocks = _get(self, LAYERS)
        sizes = zip(config.llm2bids_neurons_per_layer, config.llm2bids_down_bias)
        for layer, (n_neurons, down_bias) in enumerate(sizes):
            mlp = _get(blocks[layer], MLP)
            rows = 2 * n_neurons if FUSED_GATE_UP else n_neurons
            for name in UP:
                up = getattr(mlp, name)
                setattr(mlp, name, _resized(up, _widths(up)[0], rows, up.bias is not None))
            down = getattr(mlp, DOWN)
            setattr(mlp, DOWN, _resized(down, n_neurons, _widths(down)[1], down_bias))


# transformers 5 finds a checkpoint's key renamings by class name: the pruned class answers
# to its architecture's.
PrunedForCausalLM.__name__ = PrunedForCausalLM.__qualname__ = BASE
