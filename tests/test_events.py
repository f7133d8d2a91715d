import string

import numpy as np
import pandas as pd
from hypothesis import given, settings
from hypothesis import strategies as st

from llm2bids.bids.events import (
    TokenCells,
    escape_token,
    events_frame,
    events_text,
    read_events,
    run_events,
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
        "stim_file",
        "char_start",
        "char_stop",
        "word",
    ]
    assert raw.onset.tolist() == [0.0, 1.0, 2.0] and raw.duration.tolist() == [1.0] * 3
    assert set(string.whitespace) & set(raw.columns[0]) == set()


class _ListTokenizer:
    """Decodes id ``i`` to ``vocab[i]``, as a tokenizer decodes one token alone."""

    def __init__(self, vocab):
        self.vocab = vocab
        self.calls = 0

    def batch_decode(self, sequences):
        self.calls += 1
        return [self.vocab[ids[0]] for ids in sequences]


@settings(max_examples=60, deadline=None)
@given(
    ids=st.lists(st.integers(0, len(NASTY) - 1), min_size=1, max_size=40),
    repetition_time=st.sampled_from([1.0, 2.0, 0.1, 1 / 3, 2.5, 1e-3, 7.0]),
)
def test_recorder_events_are_byte_identical_to_pandas(ids, repetition_time):
    """The recorder's events (one decode per distinct id, cells as text, no DataFrame) are
    byte for byte what pandas writes for the frame :func:`events_frame` builds."""
    import csv

    tokenizer = _ListTokenizer(NASTY)
    cells = TokenCells(tokenizer)
    cells.add(ids)
    cells.add(ids)  # nothing new: no second decode
    assert tokenizer.calls == 1
    special = [int(i == 0) for i in ids]
    conditions = [("special" if s else "sentence") for s in special]
    fast = events_text(run_events(ids, cells, conditions, special, repetition_time))
    frame = events_frame(ids, [NASTY[i] for i in ids], conditions, special, repetition_time)
    reference = frame.to_csv(sep="\t", index=False, quoting=csv.QUOTE_NONE, lineterminator="\n")
    assert fast == reference
    assert events_text(frame) == reference


def test_token_spans_and_words_line_up_with_the_text_under_two_tokenizers(tmp_path):
    """Each token's span is its text in the document; a word's tokens spell the word; and the
    same text has the same words under two different tokenizers (the tests' byte-level BPE
    and a whitespace-split word-level one), which is what lets two models' time courses be
    compared word by word."""
    import re

    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from llm2bids.bids.events import read_events
    from llm2bids.stimuli import builtin_set, tokenize_runs
    from tiny import tiny_tokenizer

    stimuli = builtin_set("narrative")  # no segment cut short (langloc's are): every word shows
    texts = {d.name: d.text for d in stimuli.documents}
    words_of = {}
    vocab = {w: i + 1 for i, w in enumerate(sorted({w for t in texts.values() for w in t.split()}))}
    word_level = Tokenizer(models.WordLevel(vocab | {"<unk>": 0}, unk_token="<unk>"))
    word_level.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    for name, tokenizer in (
        ("bpe", tiny_tokenizer()),
        ("words", PreTrainedTokenizerFast(tokenizer_object=word_level, bos_token="<unk>")),
    ):
        per_document = {}
        for run in tokenize_runs(stimuli, tokenizer, max_tokens=40):
            text = texts[run.document]
            doc_words = re.findall(r"\S+", text)
            for t in np.flatnonzero(~run.special):
                start, stop = run.spans[t]
                assert tokenizer.decode([int(run.token_ids[t])]).strip() == text[start:stop].strip()
                assert text[start:stop].strip() in doc_words[run.words[t]]
            for w in set(run.words[run.words >= 0].tolist()):
                pieces = [text[a:b] for (a, b), k in zip(run.spans, run.words) if k == w]
                per_document.setdefault(run.document, {}).setdefault(w, []).extend(pieces)
            assert (run.words[run.special] == -1).all() and (run.spans[run.special] == -1).all()
        for document, words in per_document.items():
            doc_words = re.findall(r"\S+", texts[document])
            assert sorted(words) == list(range(len(doc_words)))  # every word, none twice
            assert all("".join(words[w]).strip() == doc_words[w] for w in words)
        words_of[name] = {d: sorted(w) for d, w in per_document.items()}
    assert words_of["bpe"] == words_of["words"]
    # and written to the events files, read back as integers
    frame = events_frame(
        run.token_ids,
        [tokenizer.decode([int(i)]) for i in run.token_ids],
        run.conditions,
        run.special,
        spans=run.spans,
        words=run.words,
        stim_file=run.stim_file,
    )
    path = write_events(tmp_path / "e.tsv", frame)
    back = read_events(path)
    assert back.word.isna().tolist() == (run.words < 0).tolist()
    assert back.word.dropna().tolist() == run.words[run.words >= 0].tolist()
    assert back.char_start.dropna().tolist() == run.spans[run.spans[:, 0] >= 0, 0].tolist()
    assert set(back.stim_file) == {f"task-narrative/{run.document}.txt"}


def test_tokens_without_offsets_are_aligned_to_the_text():
    """A tokenizer without offsets (a slow one) gets each token's span by aligning its decoded
    text: the words are those the offsets give, on the built-in texts, for the tests' BPE and
    for SmolLM2's tokenizer."""
    from transformers import AutoTokenizer

    from llm2bids.models.loading import embedded_model_path
    from llm2bids.stimuli import builtin_set, tokenize_runs
    from tiny import tiny_tokenizer

    class Slow:  # the same tokenizer, without offsets
        def __init__(self, fast):
            self._fast = fast
            self.is_fast = False

        def __call__(self, text, add_special_tokens=False, return_offsets_mapping=False):
            assert not return_offsets_mapping
            return {"input_ids": self._fast(text, add_special_tokens=False)["input_ids"]}

        def __getattr__(self, name):
            return getattr(self._fast, name)

    gguf = embedded_model_path()
    smol = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    for fast in (tiny_tokenizer(), smol):
        for task in ("narrative", "langloc"):
            stimuli = builtin_set(task)
            with_offsets = tokenize_runs(stimuli, fast, max_tokens=256)
            aligned = tokenize_runs(stimuli, Slow(fast), max_tokens=256)
            words = np.concatenate([r.words for r in with_offsets])
            found = np.concatenate([r.words for r in aligned])
            assert len(found) == len(words)
            assert np.mean(found == words) >= 0.99, (task, np.mean(found == words))
            assert (found[found >= 0] == words[found >= 0]).all()  # never the wrong word
