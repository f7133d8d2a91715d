"""Language-model metrics: perplexity, minimal-pair accuracy, greedy next-token accuracy."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import torch

from .._docs import fill_doc
from ..models import LoadedModel


def _ids(lm: LoadedModel, text: str) -> torch.Tensor:
    ids = lm.tokenizer(text, add_special_tokens=False)["input_ids"]
    bos = lm.tokenizer.bos_token_id
    return torch.tensor(([bos] if bos is not None else []) + ids)


PERPLEXITY_WINDOW = 256  # tokens per sliding window
PERPLEXITY_STRIDE = 128  # tokens between window starts


@torch.inference_mode()
@fill_doc
def perplexity(
    lm: LoadedModel, text: str, window: int = PERPLEXITY_WINDOW, stride: int = PERPLEXITY_STRIDE
) -> dict:
    """Perplexity of ``text`` with sliding windows (each token scored once).

    Every window of ``window`` tokens starts ``stride`` after the previous one; the tokens
    it adds are scored with up to ``window - stride`` tokens of context (the Hugging Face
    recipe).

    Parameters
    ----------
    %(lm)s
    text : str
    window : int, default=256
        Tokens per window.
    stride : int, default=128
        Tokens between window starts.

    Returns
    -------
    dict
        ``perplexity``, ``next_token_accuracy`` (greedy), ``n_tokens``, ``window``, ``stride``.
    """
    ids = _ids(lm, text)
    nll, correct, count, prev_end = 0.0, 0, 0, 0
    for begin in range(0, len(ids) - 1, stride):
        end = min(begin + window, len(ids))
        chunk = ids[begin:end][None].to(lm.device)
        logits = lm.model(chunk).logits[0, :-1].float()
        targets = chunk[0, 1:]
        new = end - max(prev_end, begin + 1)  # tokens not yet scored
        logits, targets = logits[-new:], targets[-new:]
        nll += torch.nn.functional.cross_entropy(logits, targets, reduction="sum").item()
        correct += int((logits.argmax(-1) == targets).sum())
        count += new
        prev_end = end
        if end == len(ids):
            break
    return {
        "perplexity": math.exp(nll / count),
        "next_token_accuracy": correct / count,
        "n_tokens": count,
        "window": window,
        "stride": stride,
    }


@torch.inference_mode()
@fill_doc
def sentence_logprobs(lm: LoadedModel, sentences: list[str], batch_size: int = 32) -> np.ndarray:
    """Total log-probability of each sentence (after BOS), batched with right padding.

    Parameters
    ----------
    %(lm)s
    sentences : list of str
    batch_size : int, default=32
    """
    out = []
    for i in range(0, len(sentences), batch_size):
        seqs = [_ids(lm, s) for s in sentences[i : i + batch_size]]
        longest = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), longest), lm.tokenizer.pad_token_id or 0)
        mask = torch.zeros_like(ids)
        for j, s in enumerate(seqs):
            ids[j, : len(s)], mask[j, : len(s)] = s, 1
        logits = lm.model(ids.to(lm.device), attention_mask=mask.to(lm.device)).logits.float()
        logp = torch.log_softmax(logits[:, :-1], -1).gather(-1, ids[:, 1:, None].to(lm.device))[
            ..., 0
        ]
        out.extend((logp * mask[:, 1:].to(lm.device)).sum(-1).cpu().tolist())
    return np.asarray(out)


def minimal_pair_accuracy(lm: LoadedModel, pairs: pd.DataFrame) -> dict:
    """Fraction of pairs whose grammatical sentence gets the higher log-probability.

    Returns ``minimal_pair_accuracy`` and one ``accuracy_<phenomenon>`` per phenomenon.
    """
    good = sentence_logprobs(lm, pairs["good"].tolist())
    bad = sentence_logprobs(lm, pairs["bad"].tolist())
    right = good > bad
    result = {"minimal_pair_accuracy": float(right.mean())}
    for name, idx in pairs.groupby("phenomenon").groups.items():
        result[f"accuracy_{name}"] = float(right[pairs.index.get_indexer(idx)].mean())
    return result
