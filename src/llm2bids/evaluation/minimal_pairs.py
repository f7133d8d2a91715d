"""Built-in minimal pairs (BLiMP-style, templated, CC0): grammatical vs ungrammatical."""

from __future__ import annotations

import random

import pandas as pd

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
_ACTIONS = ["hurt", "saw", "praised", "blamed", "described"]


def minimal_pairs(n_per_phenomenon: int = 20, seed: int = 0) -> pd.DataFrame:
    """Templated minimal pairs: ``phenomenon, good, bad``.

    Phenomena: subject-verb agreement across an attractor ("The key near the cabinets is/are
    ..."), determiner-noun agreement ("this cat" / "these cat"), and anaphor agreement ("The
    boys hurt themselves" / "The boys hurt himself").
    """
    rng = random.Random(seed)
    rows = []
    for _ in range(n_per_phenomenon):
        (sg, pl), verb = rng.choice(_NOUNS), rng.choice(_VERBS)
        attractor, prep = rng.choice(_ATTRACTORS), rng.choice(_PREPS)
        plural = rng.random() < 0.5
        subject, right, wrong = (pl, verb[1], verb[0]) if plural else (sg, verb[0], verb[1])
        end = _ENDINGS[verb[0]]
        rows.append(
            (
                "subject_verb_agreement",
                f"The {subject} {prep} the {attractor} {right} {end}.",
                f"The {subject} {prep} the {attractor} {wrong} {end}.",
            )
        )
    for _ in range(n_per_phenomenon):
        (sg, pl), agent = rng.choice(_OBJECTS), rng.choice(_AGENTS_PLURAL + _AGENTS_MALE)
        verb = rng.choice(["saw", "liked", "found", "wanted"])
        if rng.random() < 0.5:
            good, bad = f"this {sg}", f"these {sg}"
        else:
            good, bad = f"these {pl}", f"this {pl}"
        rows.append(
            ("determiner_noun_agreement", f"{agent} {verb} {good}.", f"{agent} {verb} {bad}.")
        )
    for _ in range(n_per_phenomenon):
        action = rng.choice(_ACTIONS)
        kind = rng.choice(["male", "female", "plural"])
        agent = rng.choice(
            {"male": _AGENTS_MALE, "female": _AGENTS_FEMALE, "plural": _AGENTS_PLURAL}[kind]
        )
        right = {"male": "himself", "female": "herself", "plural": "themselves"}[kind]
        wrong = "themselves" if kind != "plural" else rng.choice(["himself", "herself"])
        rows.append(
            ("anaphor_agreement", f"{agent} {action} {right}.", f"{agent} {action} {wrong}.")
        )
    return pd.DataFrame(rows, columns=["phenomenon", "good", "bad"])
