"""Stimulus sets: what a task presents, as documents made of condition-labelled segments."""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import pandas as pd

from .._docs import fill_doc
from ..exceptions import InputError


@dataclass(frozen=True)
class Segment:
    """A stretch of text and the condition (``trial_type``) of its tokens.

    Attributes
    ----------
    text : str
    condition : str
    duration_of : int or None, default=None
        Index (in the same document) of the segment whose duration this one matches: its tokens
        are cut to that segment's token count for the model's tokenizer, so that two
        conditions last equally long in tokens (a block design's equal-duration blocks).
    """

    text: str
    condition: str
    duration_of: int | None = None


@dataclass
class Document:
    """One text, recorded as one run (or several, when longer than ``max_tokens``).

    Attributes
    ----------
    name : str
        The document's name (its text file in ``stimuli/`` is ``<name>.txt``).
    segments : list of Segment
        Its condition-labelled parts, in order.
    """

    name: str
    segments: list[Segment]

    @property
    def text(self) -> str:
        """The segments joined by single spaces, as presented."""
        return " ".join(s.text for s in self.segments)


@dataclass
class StimulusSet:
    """A task: a named list of documents.

    Attributes
    ----------
    task : str
        BIDS task label.
    description : str
        ``TaskDescription`` for the sidecar.
    documents : list of Document
    license : str
        Where the texts come from and under which terms.
    conditions : dict of str to str
        Each condition (``trial_type``) and what it means, for the task's sidecar.
    """

    task: str
    description: str
    documents: list[Document]
    license: str = "n/a"
    conditions: dict[str, str] = field(default_factory=dict)

    def fingerprint(self) -> str:
        """SHA-256 of the texts and conditions: two sets with the same fingerprint are equal."""
        payload = [
            [d.name, [[s.text, s.condition] + _if_set(s.duration_of) for s in d.segments]]
            for d in self.documents
        ]
        return hashlib.sha256(json.dumps(payload, ensure_ascii=False).encode()).hexdigest()

    def task_metadata(self) -> dict:
        """The task's sidecar fields (``TaskName``, ``TaskDescription``, the stimulus set)."""
        meta = {
            "TaskName": self.task,
            "TaskDescription": self.description,
            "StimulusSet": {
                "SHA256": self.fingerprint(),
                "Documents": [d.name for d in self.documents],
                "License": self.license,
            },
        }
        if self.conditions:
            meta["Conditions"] = self.conditions
        return meta

    def files(self) -> dict[str, str | pd.DataFrame]:
        """The texts to store with the dataset, by file name: each document as ``.txt``, and
        its segments as ``.tsv`` when they carry several conditions."""
        out: dict[str, str | pd.DataFrame] = {}
        for doc in self.documents:
            out[f"{doc.name}.txt"] = doc.text + "\n"
            if len({s.condition for s in doc.segments}) > 1:
                segs = pd.DataFrame(
                    {
                        "text": [s.text for s in doc.segments],
                        "condition": [s.condition for s in doc.segments],
                    }
                )
                if any(s.duration_of is not None for s in doc.segments):
                    # row (from 0) whose token count this segment was cut to
                    segs["duration_of"] = [
                        "n/a" if s.duration_of is None else s.duration_of for s in doc.segments
                    ]
                out[f"{doc.name}.tsv"] = segs
        return out


def _if_set(value) -> list:
    return [] if value is None else [value]


CC0 = "CC0 1.0: written for llm2bids, no rights reserved."


def _data_documents(name: str) -> list[str]:
    text = resources.files(__package__).joinpath("data", name).read_text(encoding="utf-8")
    lines = [line for line in text.splitlines() if not line.startswith("#")]
    return [doc.strip() for doc in "\n".join(lines).split("\n---\n") if doc.strip()]


def heldout_text() -> str:
    """Built-in held-out prose (CC0) for perplexity; never used as a recording stimulus."""
    return "\n\n".join(_data_documents("heldout.txt"))


def calibration_text() -> str:
    """Built-in calibration prose (CC0): the narrative and expository stimuli.

    Used for what a masking or pruning method must estimate from data (the neurons' mean
    activations for mean filling and bias compensation); never an evaluation text.
    """
    return "\n\n".join(_data_documents("narrative.txt") + _data_documents("expository.txt"))


def narrative() -> StimulusSet:
    """Four short stories (CC0)."""
    docs = [
        Document(f"story{i + 1}", [Segment(t, "narrative")])
        for i, t in enumerate(_data_documents("narrative.txt"))
    ]
    return StimulusSet("narrative", "Reading short stories (narrative prose).", docs, CC0)


def expository() -> StimulusSet:
    """Four short encyclopedic texts (CC0)."""
    docs = [
        Document(f"article{i + 1}", [Segment(t, "expository")])
        for i, t in enumerate(_data_documents("expository.txt"))
    ]
    return StimulusSet("expository", "Reading expository (encyclopedic) prose.", docs, CC0)


CODE_MODULES = ("bisect", "colorsys", "keyword")


def code() -> StimulusSet:
    """Real Python source from the standard library of the running interpreter."""
    import importlib

    docs = []
    for name in CODE_MODULES:
        path = Path(importlib.import_module(name).__file__)
        docs.append(Document(name, [Segment(path.read_text(encoding="utf-8").strip(), "code")]))
    return StimulusSet(
        "code",
        "Reading Python source code (modules of the Python standard library).",
        docs,
        "Python standard library source, PSF License Agreement.",
    )


@fill_doc
def arithmetic(n_documents: int = 4, n_problems: int = 24, seed: int = 0) -> StimulusSet:
    """Generated addition, subtraction and multiplication problems with their answers.

    Parameters
    ----------
    n_documents : int, default=4
        Documents (runs).
    n_problems : int, default=24
        Problems per document.
    %(seed)s
    """
    rng = random.Random(seed)
    docs = []
    for d in range(n_documents):
        segments = []
        for _ in range(n_problems):
            op = rng.choice("+-*")
            a, b = rng.randint(2, 99), rng.randint(2, 99 if op != "*" else 12)
            value = a + b if op == "+" else a - b if op == "-" else a * b
            segments.append(Segment(f"{a} {op} {b} =", "problem"))
            segments.append(Segment(f"{value}.", "answer"))
        docs.append(Document(f"sheet{d + 1}", segments))
    return StimulusSet(
        "arithmetic",
        "Reading arithmetic problems (problem tokens) followed by their answers (answer tokens).",
        docs,
        CC0,
        {"problem": "tokens of 'a op b ='", "answer": "tokens of the result"},
    )


_ONSETS = "b d f g k l m n p r s t v z br dr fl gr pl st tr".split()
_VOWELS = "a e i o u ai ee oo".split()
_CODAS = ["", "", "", "n", "s", "t", "m", "ck", "sh", "l"]


def _nonword(rng: random.Random) -> str:
    return "".join(
        rng.choice(_ONSETS) + rng.choice(_VOWELS) + rng.choice(_CODAS)
        for _ in range(rng.randint(1, 3))
    )


@fill_doc
def langloc(n_runs: int = 4, items_per_block: int = 2, seed: int = 0) -> StimulusSet:
    """Language localizer: sentences versus strings of pronounceable nonwords, block design.

    After Fedorenko et al. (2010). Each run alternates sentence and nonword blocks (runs start
    with either condition in turn). A block lasts as long as its pair in tokens, the unit of
    time here: every nonword string is written with as many nonwords as its sentence has words
    (several tokens each, so it is always longer) and presented cut to its sentence's token
    count (``Segment.duration_of``). Both conditions therefore have the same number of tokens
    in every run, whatever the tokenizer.

    Parameters
    ----------
    n_runs : int, default=4
    items_per_block : int, default=2
        Sentences (or nonword strings) per block.
    %(seed)s
    """
    sentences = _data_documents("langloc_sentences.txt")[0].splitlines()
    rng = random.Random(seed)
    per_run = len(sentences) // n_runs
    if per_run < items_per_block:
        raise InputError("not enough localizer sentences for the requested blocks.")
    docs = []
    for r in range(n_runs):
        run_sentences = sentences[r * per_run : (r + 1) * per_run]
        segments: list[Segment] = []
        for b in range(0, per_run, items_per_block):
            items = run_sentences[b : b + items_per_block]
            nonwords = [
                " ".join(_nonword(rng) for _ in s.split()).capitalize() + "." for s in items
            ]
            sentences_first = r % 2 == 0
            at = len(segments) + (0 if sentences_first else len(items))  # this block's sentences
            sentence_block = [Segment(text, "sentence") for text in items]
            nonword_block = [Segment(text, "nonword", at + j) for j, text in enumerate(nonwords)]
            if sentences_first:
                segments.extend(sentence_block + nonword_block)
            else:
                segments.extend(nonword_block + sentence_block)
        docs.append(Document(f"localizer{r + 1}", segments))
    return StimulusSet(
        "langloc",
        "Language localizer (block design): sentences versus strings of pronounceable "
        "nonwords, after Fedorenko et al. (2010).",
        docs,
        CC0,
        {
            "sentence": "tokens of English sentences",
            "nonword": "tokens of nonword strings, each cut to its paired sentence's token count",
        },
    )


BUILTIN_SETS = {
    "narrative": narrative,
    "expository": expository,
    "code": code,
    "arithmetic": arithmetic,
    "langloc": langloc,
}


def builtin_set(name: str) -> StimulusSet:
    """Return the built-in stimulus set ``name``.

    Parameters
    ----------
    name : str
        One of :data:`BUILTIN_SETS`.
    """
    if name not in BUILTIN_SETS:
        raise InputError(
            f"unknown built-in task {name!r}; built-in tasks: {', '.join(BUILTIN_SETS)}. To "
            "record your own text, pass --stimuli with a file, a folder or a TSV and name the "
            "task with --task."
        )
    return BUILTIN_SETS[name]()
