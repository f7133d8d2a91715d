"""Built-in minimal pairs (BLiMP-style, templated, CC0): grammatical vs ungrammatical."""

from __future__ import annotations

import random

import pandas as pd

from ..exceptions import InputError

_NOUNS = [
    ("author", "authors"),
    ("dog", "dogs"),
    ("teacher", "teachers"),
    ("key", "keys"),
    ("girl", "girls"),
    ("doctor", "doctors"),
    ("farmer", "farmers"),
    ("painting", "paintings"),
    ("student", "students"),
    ("bird", "birds"),
]
_ATTRACTORS = ["cabinet", "neighbours", "village", "windows", "king", "children", "river", "hills"]
_PREPS = ["near", "behind", "next to", "beside"]
_VERBS = [("is", "are"), ("was", "were"), ("has", "have"), ("seems", "seem")]
_ENDINGS = {"is": "old", "was": "here", "has": "gone", "seems": "happy"}
_OBJECTS = [
    ("cat", "cats"),
    ("book", "books"),
    ("car", "cars"),
    ("house", "houses"),
    ("song", "songs"),
    ("chair", "chairs"),
    ("letter", "letters"),
    ("apple", "apples"),
]
_AGENTS_MALE = ["The man", "The boy", "The king", "The waiter", "The father"]
_AGENTS_FEMALE = ["The woman", "The girl", "The queen", "The nurse", "The mother"]
_AGENTS_PLURAL = ["The men", "The boys", "The students", "The doctors", "The farmers"]
_ACTIONS = [
    "hurt",
    "saw",
    "praised",
    "blamed",
    "described",
    "trusted",
    "defended",
    "introduced",
    "doubted",
    "fed",
]


def minimal_pairs(n_per_phenomenon: int = 70, seed: int = 0) -> pd.DataFrame:
    """Templated minimal pairs, distinct within each phenomenon: ``phenomenon, good, bad``.

    Phenomena: subject-verb agreement across an attractor ("The key near the cabinets is/are
    ..."), determiner-noun agreement ("this cat" / "these cat"), and anaphor agreement ("The
    boys hurt themselves" / "The boys hurt himself"). Each phenomenon's items are drawn
    without replacement from all its template fillings, so the default 210 pairs are 210
    different items (what a confidence interval over items assumes).

    Parameters
    ----------
    n_per_phenomenon : int, default=70
        Pairs per phenomenon (at most the number of distinct fillings, 200 for anaphors).
    seed : int, default=0
    """
    rng = random.Random(seed)
    agreement = [
        (
            f"The {subject} {prep} the {attractor} {right} {_ENDINGS[verb[0]]}.",
            f"The {subject} {prep} the {attractor} {wrong} {_ENDINGS[verb[0]]}.",
        )
        for (sg, pl) in _NOUNS
        for verb in _VERBS
        for attractor in _ATTRACTORS
        for prep in _PREPS
        for subject, right, wrong in ((sg, verb[0], verb[1]), (pl, verb[1], verb[0]))
    ]
    determiner = [
        (f"{agent} {verb} {good}.", f"{agent} {verb} {bad}.")
        for (sg, pl) in _OBJECTS
        for agent in _AGENTS_PLURAL + _AGENTS_MALE
        for verb in ("saw", "liked", "found", "wanted")
        for good, bad in ((f"this {sg}", f"these {sg}"), (f"these {pl}", f"this {pl}"))
    ]
    reflexive = {"male": "himself", "female": "herself", "plural": "themselves"}
    wrongs = {"male": ["themselves"], "female": ["themselves"], "plural": ["himself", "herself"]}
    anaphor = [
        (f"{agent} {action} {reflexive[kind]}.", f"{agent} {action} {wrong}.")
        for action in _ACTIONS
        for kind, agents in (
            ("male", _AGENTS_MALE),
            ("female", _AGENTS_FEMALE),
            ("plural", _AGENTS_PLURAL),
        )
        for agent in agents
        for wrong in wrongs[kind]
    ]
    rows = []
    for name, items in (
        ("subject_verb_agreement", agreement),
        ("determiner_noun_agreement", determiner),
        ("anaphor_agreement", anaphor),
    ):
        if n_per_phenomenon > len(items):
            raise InputError(
                f"n_per_phenomenon={n_per_phenomenon} exceeds the {len(items)} distinct "
                f"{name} pairs the templates make; ask for at most {len(items)}."
            )
        rows += [(name, good, bad) for good, bad in rng.sample(items, n_per_phenomenon)]
    return pd.DataFrame(rows, columns=["phenomenon", "good", "bad"])
