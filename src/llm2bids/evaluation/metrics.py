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
PERPLEXITY_BATCH = 4  # windows per forward pass


def proportion_ci(successes: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson score interval of a proportion (scipy's ``binomtest``).

    Parameters
    ----------
    successes, n : int
        Items right, items in all.
    confidence : float, default=0.95

    Returns
    -------
    tuple of float
        ``(low, high)``.
    """
    from scipy.stats import binomtest

    ci = binomtest(int(successes), int(n)).proportion_ci(confidence, method="wilson")
    return float(ci.low), float(ci.high)


@torch.inference_mode()
@fill_doc
def perplexity(
    lm: LoadedModel,
    text: str,
    window: int = PERPLEXITY_WINDOW,
    stride: int = PERPLEXITY_STRIDE,
    batch_size: int = PERPLEXITY_BATCH,
) -> dict:
    """Perplexity of ``text`` with sliding windows (each token scored once).

    Every window of ``window`` tokens starts ``stride`` after the previous one; the tokens
    it adds are scored with up to ``window - stride`` tokens of context (the Hugging Face
    recipe). Windows of equal length run ``batch_size`` at a time.

    Parameters
    ----------
    %(lm)s
    text : str
    window : int, default=256
        Tokens per window.
    stride : int, default=128
        Tokens between window starts.
    batch_size : int, default=4
        Windows per forward pass.

    Returns
    -------
    dict
        ``perplexity``, ``next_token_accuracy`` (greedy) with its 95%% Wilson interval
        (``next_token_ci_low``, ``next_token_ci_high``; tokens are not independent, so read
        it as a lower bound on the uncertainty), ``n_tokens``, ``window``, ``stride``.
    """
    ids = _ids(lm, text)
    spans, prev_end = [], 0
    for begin in range(0, len(ids) - 1, stride):
        end = min(begin + window, len(ids))
        spans.append((begin, end, end - max(prev_end, begin + 1)))  # tokens not yet scored
        prev_end = end
        if end == len(ids):
            break
    nll, correct, count = 0.0, 0, 0
    for group in _same_length_batches(spans, batch_size):
        chunk = torch.stack([ids[b:e] for b, e, _ in group]).to(lm.device)
        logits = lm.model(chunk).logits[:, :-1]
        for row, (_, _, new) in enumerate(group):
            scored, targets = logits[row, -new:].float(), chunk[row, 1:][-new:]
            nll += torch.nn.functional.cross_entropy(scored, targets, reduction="sum").item()
            correct += int((scored.argmax(-1) == targets).sum())
            count += new
    low, high = proportion_ci(correct, count)
    return {
        "perplexity": math.exp(nll / count),
        "next_token_accuracy": correct / count,
        "next_token_ci_low": low,
        "next_token_ci_high": high,
        "n_tokens": count,
        "window": window,
        "stride": stride,
    }


def _same_length_batches(spans: list, batch_size: int):
    """Consecutive runs of at most ``batch_size`` spans of one length."""
    group: list = []
    for span in spans:
        if group and (len(group) == batch_size or span[1] - span[0] != group[0][1] - group[0][0]):
            yield group
            group = []
        group.append(span)
    if group:
        yield group


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


def accuracy_text(row, name: str = "minimal_pair") -> str:
    """An accuracy with its 95%% Wilson interval, ``"0.612 [0.545, 0.675]"``, from a row.

    Parameters
    ----------
    row : pandas.Series or mapping
        A row of a lesion or keep-only table (``<name>_accuracy``, ``<name>_ci_low``,
        ``<name>_ci_high``).
    name : {"minimal_pair", "next_token"}, default="minimal_pair"
    """
    low, high = row[f"{name}_ci_low"], row[f"{name}_ci_high"]
    return f"{row[f'{name}_accuracy']:.3f} [{low:.3f}, {high:.3f}]"


@fill_doc
def minimal_pair_accuracy(lm: LoadedModel, pairs: pd.DataFrame) -> dict:
    """Fraction of pairs whose grammatical sentence gets the higher log-probability.

    Parameters
    ----------
    %(lm)s
    pairs : pandas.DataFrame
        ``good``, ``bad`` and ``phenomenon`` columns (see :func:`minimal_pairs`).

    Returns
    -------
    dict
        ``minimal_pair_accuracy``, its 95%% Wilson interval (``minimal_pair_ci_low``,
        ``minimal_pair_ci_high``), ``n_pairs``, and per phenomenon ``accuracy_<phenomenon>``
        with its interval (``accuracy_<phenomenon>_ci_low``, ``..._ci_high``).
    """
    good = sentence_logprobs(lm, pairs["good"].tolist())
    bad = sentence_logprobs(lm, pairs["bad"].tolist())
    right = good > bad
    low, high = proportion_ci(int(right.sum()), len(right))
    result = {
        "minimal_pair_accuracy": float(right.mean()),
        "minimal_pair_ci_low": low,
        "minimal_pair_ci_high": high,
        "n_pairs": len(right),
    }
    for name, idx in pairs.groupby("phenomenon").groups.items():
        hits = right[pairs.index.get_indexer(idx)]
        low, high = proportion_ci(int(hits.sum()), len(hits))
        result[f"accuracy_{name}"] = float(hits.mean())
        result[f"accuracy_{name}_ci_low"], result[f"accuracy_{name}_ci_high"] = low, high
    return result
