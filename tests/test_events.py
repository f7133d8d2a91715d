import string

import numpy as np
import pandas as pd
from hypothesis import given, settings
from hypothesis import strategies as st

from llm2bids.bids.events import (
    escape_token,
    events_frame,
    read_events,
    unescape_token,
    write_events,
)

NASTY = [
    "",
    "n/a",
    "\\",
    "\\t",
    "\t",
    "\n",
    "\r\n",
    '"',
    "'",
    " ",
    "a\u2028b",
    "\x00",
    "é",
    "🙂",
    "\\x6e/a",
    "#",
    "\ufeff",
    "\x85",
]


def test_escape_examples():
    assert escape_token("") == "n/a"
    assert escape_token("n/a") == "\\x6e/a"
    assert escape_token("a\tb\n") == "a\\tb\\n"
    for token in NASTY:
        cell = escape_token(token)
        assert unescape_token(cell) == token
        assert not any(c in cell for c in "\t\n\r\u2028\u2029\x85")
        assert cell != ""


@settings(max_examples=300, deadline=None)
@given(st.text())
def test_escape_round_trip_any_text(token):
    cell = escape_token(token)
    assert unescape_token(cell) == token
    assert len(cell.splitlines()) <= 1 and "\t" not in cell


@settings(max_examples=60, deadline=None)
@given(st.lists(st.text(), min_size=1, max_size=20))
def test_events_tsv_parses_back_to_the_same_tokens(tmp_path_factory, tokens):
    path = tmp_path_factory.mktemp("ev") / "x_events.tsv"
    frame = events_frame(np.arange(len(tokens)), tokens, ["c"] * len(tokens), [0] * len(tokens))
    write_events(path, frame)
    back = read_events(path)
    assert back["token"].tolist() == tokens
    assert back["token_id"].tolist() == list(range(len(tokens)))
    assert len(back) == len(tokens)


def test_events_columns(tmp_path):
    frame = events_frame([5, 6, 7], ["<s>", " the", " cat"], ["special", "s", "s"], [1, 0, 0])
    write_events(tmp_path / "e.tsv", frame)
    raw = pd.read_csv(tmp_path / "e.tsv", sep="\t")
    assert list(raw.columns) == [
        "onset",
        "duration",
        "trial_type",
        "token",
        "token_id",
        "special",
        "position",
    ]
    assert raw.onset.tolist() == [0.0, 1.0, 2.0] and raw.duration.tolist() == [1.0] * 3
    assert set(string.whitespace) & set(raw.columns[0]) == set()
