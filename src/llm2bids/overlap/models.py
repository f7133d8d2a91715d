"""Two models' networks compared on the words of the text both read.

:func:`word_time_course_table` brings a decomposition's time courses (``mixing.tsv``) to the
words of its stimuli, through each token's ``stim_file`` and ``word`` in the events;
:func:`compare_models` matches two such tables on the words they share (see
:mod:`.temporal`).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from .. import _io
from ..bids.events import read_events
from ..bids.reader import events_path
from ..derivatives import resolve_bids_uri
from ..exceptions import InputError
from .temporal import match_time_courses, model_similarity, word_time_courses


def word_time_course_table(mixing: str | Path, derivatives: str | Path) -> pd.DataFrame:
    """A decomposition's network time courses resampled to words.

    Parameters
    ----------
    mixing : str or Path
        A ``mixing.tsv`` written by ``llm2bids networks``.
    derivatives : str or Path
        Its derivatives dataset (where the sidecar's ``Sources`` resolve).

    Returns
    -------
    pandas.DataFrame
        Indexed by ``(stim_file, word)``, sorted; one column per component: the mean over
        the word's tokens (special tokens and whitespace have no word and are left out).
    """
    mixing = Path(mixing)
    sources = _io.read_json(mixing.with_suffix(".json")).get("Sources", [])
    runs = [resolve_bids_uri(uri, derivatives) for uri in sources]
    if not runs:
        raise InputError(f"{mixing.name} names no runs in its Sources.")
    return words_of_mixing(pd.read_csv(mixing, sep="\t"), runs)


def words_of_mixing(mixing: pd.DataFrame, runs: list[str | Path]) -> pd.DataFrame:
    """Time courses of a mixing table (``run``, ``volume``, ``comp-*``) resampled to words.

    Parameters
    ----------
    mixing : pandas.DataFrame
        A fit's ``mixing_`` (or a ``mixing.tsv`` read back): ``run`` counts ``runs`` from 1.
    runs : list of str or Path
        The fit's runs (bold files), whose events give each token's ``stim_file`` and
        ``word``.

    Returns
    -------
    pandas.DataFrame
        As :func:`word_time_course_table`.
    """
    components = [c for c in mixing.columns if c.startswith("comp-")]
    values, keys = [], []  # per token, over every run: its time courses, its (document, word)
    for number, run in enumerate(runs, 1):
        events = read_events(events_path(run))
        if "word" not in events:
            raise InputError(
                f"{Path(run).name}: its events have no word column (recorded by an older "
                "llm2bids); record it again to compare models on words."
            )
        values.append(mixing[mixing.run == number].sort_values("volume")[components].to_numpy())
        keys += [
            None if pd.isna(word) else (document, int(word))
            for document, word in zip(events["stim_file"], events["word"])
        ]
    # one index per (document, word), -1 for none: a word split over two runs is one word
    codes, words = pd.factorize(pd.Series(keys, dtype=object))
    ids, means = word_time_courses(np.vstack(values), codes)
    index = pd.MultiIndex.from_tuples(list(words[ids]), names=["stim_file", "word"])
    return pd.DataFrame(means, index=index, columns=components).sort_index()


def compare_models(
    a: pd.DataFrame, b: pd.DataFrame, n_permutations: int = 200, seed: int = 0
) -> tuple[pd.DataFrame, dict[str, float]]:
    """Match two models' networks on the words both tables hold.

    Parameters
    ----------
    a, b : pandas.DataFrame
        Tables of :func:`word_time_course_table` (two models, the same stimuli).
    n_permutations : int, default=200
        Circular shifts within each document for the null.
    seed : int, default=0

    Returns
    -------
    matching : pandas.DataFrame
        :func:`~.temporal.match_time_courses`' table, plus ``n_words`` (the shared words).
    similarity : dict
        :func:`~.temporal.model_similarity` of the matching.
    """
    common = a.index.intersection(b.index).sort_values()
    if len(common) < 10:
        raise InputError(
            f"the two models share {len(common)} words of stimuli; compare models recorded on "
            "the same task (the same stimulus files)."
        )
    documents = pd.factorize(common.get_level_values("stim_file"))[0]
    matching = match_time_courses(
        a.loc[common].to_numpy(), b.loc[common].to_numpy(), documents, n_permutations, seed
    )
    matching["n_words"] = len(common)
    return matching, model_similarity(matching)
