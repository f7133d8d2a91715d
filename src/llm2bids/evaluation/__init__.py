"""Evaluation: neuron sets, masking at inference, metrics, controls and pruning."""

from .lesion import LesionResult, keep_only_curve, run_lesion
from .masking import MODES, mask_neurons, neuron_means
from .metrics import accuracy_text, minimal_pair_accuracy, perplexity, sentence_logprobs
from .minimal_pairs import minimal_pairs
from .neuronsets import random_controls, rank_neurons, read_neuron_set, top_neurons
from .pruning import load_pruned, prune, run_prune, save_pruned

__all__ = [
    "MODES",
    "LesionResult",
    "accuracy_text",
    "keep_only_curve",
    "load_pruned",
    "mask_neurons",
    "minimal_pair_accuracy",
    "minimal_pairs",
    "neuron_means",
    "perplexity",
    "prune",
    "random_controls",
    "rank_neurons",
    "run_lesion",
    "run_prune",
    "read_neuron_set",
    "save_pruned",
    "sentence_logprobs",
    "top_neurons",
]
