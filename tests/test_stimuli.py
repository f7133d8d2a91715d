import sys

import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from llm2bids.exceptions import InputError, StimuliError
from llm2bids.stimuli import BUILTIN_SETS, builtin_set, read_stimuli, tokenize_runs
from tiny import tiny_tokenizer

#: Python's csv module reads (and writes) NUL characters from 3.11 on; on 3.10 the stimuli
#: reader refuses them with a message that says so.
CSV_KEEPS_NUL = sys.version_info >= (3, 11)


def _write_quoted_tsv(path, columns: dict[str, list[str]]) -> None:
    """A TSV with every cell quoted (standard CSV quoting), written by hand: Python 3.10's
    csv module, under pandas too, cannot write a NUL character."""

    def quote(cell: str) -> str:
        return '"' + cell.replace('"', '""') + '"'

    rows = [list(columns), *zip(*columns.values())]
    with open(path, "w", encoding="utf-8", newline="") as f:
        f.writelines("\t".join(quote(cell) for cell in row) + "\n" for row in rows)


def _read_back(path, texts: list[str]) -> None:
    """The texts read back exactly, or on Python 3.10 a NUL refused by name."""
    if CSV_KEEPS_NUL or not any("\x00" in t for t in texts):
        assert [d.segments[0].text for d in read_stimuli(path, "t").documents] == texts
    else:
        with pytest.raises(StimuliError, match="Remove NUL characters"):
            read_stimuli(path, "t")


def test_builtin_sets_are_distinct_tasks_with_several_runs():
    for name in BUILTIN_SETS:
        stimset = builtin_set(name)
        assert stimset.task == name
        assert len(stimset.documents) >= 3
        assert stimset.license
    with pytest.raises(InputError, match="built-in tasks"):
        builtin_set("nope")


def test_langloc_is_a_block_design_with_balanced_conditions():
    stimset = builtin_set("langloc")
    for doc in stimset.documents:
        conds = [s.condition for s in doc.segments]
        assert set(conds) == {"sentence", "nonword"}
        assert conds.count("sentence") == conds.count("nonword")
        # blocks: runs of at least two equal conditions
        changes = sum(a != b for a, b in zip(conds, conds[1:]))
        assert changes == len(conds) // 2 - 1
    sentences = [s.text for d in stimset.documents for s in d.segments if s.condition == "sentence"]
    nonwords = [s.text for d in stimset.documents for s in d.segments if s.condition == "nonword"]
    assert [len(s.split()) for s in sentences] == [len(s.split()) for s in nonwords]
    # every nonword string is paired with a sentence of its own run
    for doc in stimset.documents:
        pairs = [doc.segments[s.duration_of] for s in doc.segments if s.condition == "nonword"]
        assert [p.condition for p in pairs] == ["sentence"] * len(pairs)
        assert len({id(p) for p in pairs}) == len(pairs)


def test_langloc_conditions_last_equally_long_in_tokens():
    """Blocks of equal duration: each run has as many sentence tokens as nonword tokens."""
    stimset = builtin_set("langloc")
    for run, doc in zip(
        tokenize_runs(stimset, tiny_tokenizer(), max_tokens=4096), stimset.documents
    ):
        n_sentence, n_nonword = run.conditions.count("sentence"), run.conditions.count("nonword")
        assert n_sentence == n_nonword > 0
        # cut, not padded: a nonword string's tokens are the first tokens of its full text
        assert len(tiny_tokenizer()(doc.text)["input_ids"]) > len(run)


def test_tokenize_splits_long_documents_and_labels_every_token():
    tok = tiny_tokenizer()
    runs = tokenize_runs(builtin_set("langloc"), tok, max_tokens=64)
    assert all(len(r) <= 64 for r in runs)
    assert [r.index for r in runs] == list(range(1, len(runs) + 1))
    for r in runs:
        assert r.special[0] and r.token_ids[0] == tok.bos_token_id and not r.special[1:].any()
        assert len(r.conditions) == len(r) and r.conditions[0] == "special"
        assert set(r.conditions[1:]) <= {"sentence", "nonword"}
    with pytest.raises(InputError, match="max_tokens"):
        tokenize_runs(builtin_set("langloc"), tok, max_tokens=1)


def test_read_text_folder_and_tsv(tmp_path):
    (tmp_path / "a.txt").write_text("First text.", encoding="utf-8")
    (tmp_path / "b.txt").write_text("Second text.", encoding="utf-8")
    one = read_stimuli(tmp_path / "a.txt", "mine")
    assert one.task == "mine" and one.documents[0].text == "First text."
    folder = read_stimuli(tmp_path, "mine")
    assert [d.name for d in folder.documents] == ["a", "b"]
    pd.DataFrame(
        {
            "text": ["The cat sat.", "Blick florp.", "A dog ran."],
            "condition": ["s", "n", "s"],
            "run": [1, 1, 2],
        }
    ).to_csv(tmp_path / "s.tsv", sep="\t", index=False)
    tsv = read_stimuli(tmp_path / "s.tsv", "mine")
    assert [[s.condition for s in d.segments] for d in tsv.documents] == [["s", "n"], ["s"]]


@pytest.mark.parametrize(
    "content,match",
    [("", "empty"), ("   \n", "empty"), (b"\xff\xfe\x00bad", "UTF-8")],
)
def test_bad_text_files(tmp_path, content, match):
    path = tmp_path / "bad.txt"
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(StimuliError, match=match):
        read_stimuli(path, "t")


def test_bad_tsv_and_paths(tmp_path):
    (tmp_path / "x.tsv").write_text("words\tcondition\nhello\ts\n", encoding="utf-8")
    with pytest.raises(StimuliError, match="no 'text' column"):
        read_stimuli(tmp_path / "x.tsv", "t")
    with pytest.raises(StimuliError, match="does not exist"):
        read_stimuli(tmp_path / "missing.txt", "t")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(StimuliError, match="no .txt files"):
        read_stimuli(empty, "t")


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(st.lists(st.text(min_size=1).filter(lambda s: s.strip()), min_size=1, max_size=5))
def test_tsv_reader_round_trips_hostile_text(tmp_path, texts):
    path = tmp_path / "h.tsv"
    # Texts with tabs or line breaks must be quoted (standard CSV quoting) to be unambiguous.
    _write_quoted_tsv(path, {"text": texts, "condition": ["c"] * len(texts)})
    _read_back(path, texts)


def test_tsv_reader_keeps_nul_and_names_bad_rows(tmp_path):
    """Every character survives whatever pandas version is installed (3.0 dropped NUL); on
    Python 3.10, whose csv module cannot read NUL, it is refused with a clear message."""
    texts = ["\x00", "a\x00b", 'say "hi"\tthen\nleave']
    path = tmp_path / "nul.tsv"
    _write_quoted_tsv(path, {"text": texts})
    _read_back(path, texts)
    _write_quoted_tsv(path, {"text": texts[2:]})  # and without NUL on every Python
    _read_back(path, texts[2:])
    ragged = tmp_path / "ragged.tsv"
    ragged.write_text("text\tcondition\nfine\tc\ntoo\tmany\tcells\n", encoding="utf-8")
    with pytest.raises(StimuliError, match="row 3 has 3 cells, the header 2"):
        read_stimuli(ragged, "t")
