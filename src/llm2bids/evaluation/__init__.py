"""Evaluation: neuron sets, masking at inference, metrics, controls and pruning."""

from .lesion import run_lesion
from .masking import MODES, mask_neurons, neuron_means
from .metrics import minimal_pair_accuracy, perplexity, sentence_logprobs
from .minimal_pairs import minimal_pairs
from .neuronsets import random_controls, read_neuron_set
from .pruning import load_pruned, prune, save_pruned

__all__ = [
    "MODES",
    "load_pruned",
    "mask_neurons",
    "minimal_pair_accuracy",
    "minimal_pairs",
    "neuron_means",
    "perplexity",
    "prune",
    "random_controls",
    "run_lesion",
    "read_neuron_set",
    "save_pruned",
    "sentence_logprobs",
]
