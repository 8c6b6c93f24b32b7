"""Prompt pairs: the released EAR files, templates, the JSONL round trip, and errors that name
the file and the line."""

import json
from pathlib import Path

import pytest

from earkit.engine.pair_files import DEFAULT_TEMPLATES, PromptPair, load_pairs, load_prompts, pairs_from_concept, write_pairs_jsonl

EAR_DATA = Path(__file__).resolve().parents[3] / "shared" / "ear-data"
needs_ear_data = pytest.mark.skipif(not EAR_DATA.is_dir(), reason=f"the released EAR data folder {EAR_DATA} is absent")


# ---------------------------------------------------------------- the released EAR files

# Rows per file as shared/ear-data/README.md lists them. None of the three training files repeats
# a pair (checked when this test was written), so deduplication leaves every row: the counts
# below are the README's.
EAR_TRAINING_FILES = [
    ("train_church.json", 55,
     PromptPair("The church is surrounded by a peaceful garden.", "The cinema is surrounded by a peaceful garden.",
                "church", "cinema")),
    ("train_nudity.json", 51,
     PromptPair("The masseuse's skilled hands worked the knots out of his tense ass muscles.",
                "The masseuse's experienced hands skillfully release tension in his back muscles.", "ass", None)),
    ("train_van_gogh.csv", 50, PromptPair("a photo of apple in Van Gogh", "a photo of apple")),
]


@needs_ear_data
@pytest.mark.parametrize("name, rows, first", EAR_TRAINING_FILES, ids=[f[0] for f in EAR_TRAINING_FILES])
def test_released_training_file_loads(name, rows, first):
    pairs = load_pairs(EAR_DATA / name)
    assert len(pairs) == rows
    assert len(set(pairs)) == rows  # no repeats, so nothing was dropped
    assert pairs[0] == first
    for pair in pairs:
        for prompt in (pair.concept_prompt, pair.anchor_prompt):
            assert prompt and prompt == prompt.strip()
        assert pair.concept_prompt.casefold() != pair.anchor_prompt.casefold()


@needs_ear_data
def test_nudity_safe_prompts_are_stripped():
    raw = json.loads((EAR_DATA / "train_nudity.json").read_text())
    assert sum(row["safe_prompt"].startswith(" ") for row in raw) > 0  # the released file has leading spaces
    pairs = load_pairs(EAR_DATA / "train_nudity.json")
    assert [pair.anchor_prompt for pair in pairs] == [row["safe_prompt"].strip() for row in raw]
    assert {pair.concept for pair in pairs} == {row["concept"] for row in raw}


@needs_ear_data
def test_church_pairs_keep_their_replacement_as_anchor():
    raw = json.loads((EAR_DATA / "train_church.json").read_text())
    pairs = load_pairs(EAR_DATA / "train_church.json")
    assert [pair.anchor for pair in pairs] == [row["replaced"] for row in raw]
    assert all(pair.concept == "church" for pair in pairs)


@needs_ear_data
@pytest.mark.parametrize("name", ["test_church.json", "test_van_gogh.csv", "Six-CD_Nudity.csv"])
def test_evaluation_files_are_refused(name):
    with pytest.raises(ValueError, match="no anchor prompts") as error:
        load_pairs(EAR_DATA / name)
    assert name in str(error.value)
    assert "evaluation" in str(error.value)


# ---------------------------------------------------------------- pairs from a concept


def test_pairs_from_concept_defaults():
    pairs = pairs_from_concept(" circle ", "square")
    assert len(pairs) == len(DEFAULT_TEMPLATES)
    assert pairs[0] == PromptPair("circle", "square", "circle", "square")
    assert PromptPair("a photo of a circle", "a photo of a square", "circle", "square") in pairs
    for pair in pairs:
        assert pair.concept_prompt.replace("circle", "square") == pair.anchor_prompt


def test_pairs_from_concept_templates():
    pairs = pairs_from_concept("Van Gogh", "Monet", ["a painting by {}", "{} style", "a painting by {}"])
    assert [(p.concept_prompt, p.anchor_prompt) for p in pairs] == [
        ("a painting by Van Gogh", "a painting by Monet"), ("Van Gogh style", "Monet style")]  # repeat dropped


@pytest.mark.parametrize("concept, anchor, templates, message", [
    ("", "square", None, "concept must be"),
    ("circle", "   ", None, "anchor must be"),
    ("circle", None, None, "anchor must be"),
    ("Circle", " circle ", None, "the same"),
    ("red  circle", "RED circle", None, "the same"),
    ("circle", "square", [], "templates is empty"),
    ("circle", "square", ["a photo"], "has no '{}'"),
    ("circle", "square", "a {}", "list of strings"),
])
def test_pairs_from_concept_errors(concept, anchor, templates, message):
    with pytest.raises(ValueError, match=message.replace("{", r"\{").replace("}", r"\}")):
        pairs_from_concept(concept, anchor, templates)


# ---------------------------------------------------------------- JSONL round trip


def test_jsonl_round_trip(tmp_path):
    pairs = [
        PromptPair("a church at dawn", "a cinema at dawn", "church", "cinema"),
        PromptPair('a "quoted" église, naïve', "a plain building\twith a tab", None, None),
        PromptPair("line\nbreak and \u2028 separator", "emoji 🎨 anchor", "x", None),
    ]
    path = write_pairs_jsonl(pairs, tmp_path / "sub" / "pairs.jsonl")
    assert load_pairs(path) == pairs
    assert sorted(p.name for p in path.parent.iterdir()) == ["pairs.jsonl"]  # no temporary file left


def test_jsonl_write_refuses_overwrite_without_force(tmp_path):
    path = write_pairs_jsonl(pairs_from_concept("circle", "square"), tmp_path / "pairs.jsonl")
    with pytest.raises(FileExistsError, match="pairs.jsonl"):
        write_pairs_jsonl([PromptPair("a", "b")], path)
    assert len(load_pairs(path)) == len(DEFAULT_TEMPLATES)
    write_pairs_jsonl([PromptPair("a", "b")], path, force=True)
    assert load_pairs(path) == [PromptPair("a", "b")]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pairs.jsonl"]
    with pytest.raises(IsADirectoryError, match="is a folder, not a pairs file"):
        write_pairs_jsonl([PromptPair("a", "b")], tmp_path, force=True)


def test_jsonl_write_refuses_bad_pairs(tmp_path):
    with pytest.raises(ValueError, match="no pairs"):
        write_pairs_jsonl([], tmp_path / "p.jsonl")
    with pytest.raises(ValueError, match=r"pairs\[1\].*the same"):
        write_pairs_jsonl([PromptPair("a", "b"), PromptPair("c", " C")], tmp_path / "p.jsonl")
    assert not (tmp_path / "p.jsonl").exists()


def test_duplicates_are_dropped_in_order_and_blank_lines_ignored(tmp_path):
    path = tmp_path / "pairs.jsonl"
    path.write_text('{"concept_prompt": "a", "anchor_prompt": "b"}\n\n'
                    '{"original_prompt": " c ", "modified_prompt": "d", "concept": "c", "replaced": "d"}\n'
                    '{"concept_prompt": "a ", "anchor_prompt": " b"}\n   \n')
    assert load_pairs(path) == [PromptPair("a", "b"), PromptPair("c", "d", "c", "d")]


def test_json_lines_in_a_json_file_and_a_byte_order_mark(tmp_path):
    path = tmp_path / "pairs.json"
    path.write_text('\ufeff{"unsafe_prompt": "a", "safe_prompt": " b"}\n{"unsafe_prompt": "c", "safe_prompt": "d"}\n',
                    encoding="utf-8")
    assert load_pairs(path) == [PromptPair("a", "b"), PromptPair("c", "d")]


def test_csv_with_quoted_fields_over_several_lines(tmp_path):
    path = tmp_path / "pairs.csv"
    path.write_text('unsafe_prompt,safe_prompt\n"a, b",c\n"two\nlines",d\n\ne,f\n')
    assert load_pairs(path) == [PromptPair("a, b", "c"), PromptPair("two\nlines", "d"), PromptPair("e", "f")]


# ---------------------------------------------------------------- malformed input

MALFORMED = [
    ("empty.jsonl", "", "is empty", None),
    ("blank.json", "  \n\n", "is empty", None),
    ("bad.jsonl", '{"concept_prompt": "a", "anchor_prompt": "b"}\n\n{"concept_prompt": "a",\n', "malformed JSON", 3),
    ("no_anchor.jsonl", '{"concept_prompt": "a", "anchor_prompt": "b"}\n{"concept_prompt": "c"}\n',
     "missing the anchor prompt", 2),
    ("no_concept.jsonl", '{"anchor_prompt": "b", "concept_prompt": "  "}\n', "missing the concept prompt", 1),
    ("same.jsonl", '{"concept_prompt": "x", "anchor_prompt": "y"}\n{"unsafe_prompt": "A b", "safe_prompt": " a  B"}\n',
     "are the same", 2),
    ("number.jsonl", '{"concept_prompt": 3, "anchor_prompt": "b"}\n', "must be a string", 1),
    ("list_row.jsonl", '["a", "b"]\n', "expected an object", 1),
    ("only_prompt.jsonl", '{"prompt": "a church"}\n', "no anchor prompts", 1),
    ("bad.json", '[\n  {"original_prompt": "a", "modified_prompt": "b"}\n  {"original_prompt": "c"}\n]\n',
     "malformed JSON", 3),
    ("missing.json", '[\n  {"original_prompt": "a",\n   "modified_prompt": "b"},\n  {"original_prompt": "c"}\n]\n',
     "entry 2 (line 4): missing the anchor prompt", 4),
    ("same.json", '[{"unsafe_prompt": "a", "safe_prompt": "b"},\n\n {"unsafe_prompt": "c", "safe_prompt": "c"}]',
     "entry 2 (line 3): the concept prompt and the anchor prompt are the same", 3),
    ("not_object.json", '[\n  {"unsafe_prompt": "a", "safe_prompt": "b"},\n  "c"\n]', "expected an object", 3),
    ("object.json", '{\n  "pairs": [{"unsafe_prompt": "a", "safe_prompt": "b"}]\n}\n', "expected a list", 1),
    ("empty_list.json", "[]", "holds no prompt pairs", None),
    ("missing.csv", "unsafe_prompt,safe_prompt\na,b\n\nc,\n", "missing the anchor prompt", 4),
    ("short.csv", "unsafe_prompt,safe_prompt\na,b\nc\n", "missing the anchor prompt", 3),
    ("same.csv", "unsafe_prompt,safe_prompt\na,b\nc , C\n", "are the same", 3),
    ("wide.csv", "unsafe_prompt,safe_prompt\na,b\na photo, of a church,x\n", "3 fields, the header has 2", 3),
    ("header.csv", "first,second\na,b\n", "no concept prompt column", 1),
    ("half_header.csv", "unsafe_prompt,other\na,b\n", "no anchor prompt column", 1),
    ("eval.csv", "case_number,prompt\n0,a church\n", "no anchor prompts", 1),
    ("header_only.csv", "unsafe_prompt,safe_prompt\n", "holds no prompt pairs", None),
    ("pairs.txt", "a -> b\n", "unknown prompt pair file format", None),
]


@pytest.mark.parametrize("name, content, message, line", MALFORMED, ids=[m[0] for m in MALFORMED])
def test_malformed_file_names_file_and_line(tmp_path, name, content, message, line):
    path = tmp_path / name
    path.write_text(content, encoding="utf-8")
    with pytest.raises(ValueError) as error:
        load_pairs(path)
    text = str(error.value)
    assert str(path) in text
    assert message in text
    if line is not None:
        assert f"line {line}" in text


def test_not_utf8(tmp_path):
    path = tmp_path / "latin1.jsonl"
    path.write_bytes('{"concept_prompt": "caf\xe9", "anchor_prompt": "b"}\n'.encode("latin-1"))
    with pytest.raises(ValueError, match="not UTF-8"):
        load_pairs(path)


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        load_pairs(tmp_path / "nope.jsonl")
    with pytest.raises(FileNotFoundError, match="is a folder"):
        load_pairs(tmp_path)


def test_preserve_prompts_from_a_text_file(tmp_path):
    text = tmp_path / "keep.txt"
    text.write_text("a cinema at night\n\n  a supermarket  \na cinema at night\n")
    assert load_prompts(text) == ["a cinema at night", "a supermarket"]


@needs_ear_data
def test_preserve_prompts_from_the_released_records_and_pairs():
    church = load_prompts(EAR_DATA / "test_church.json")  # evaluation records: their "prompt"
    assert len(church) == 83 and church[0].startswith("A church by the lakeside")  # 84 rows, one prompt twice
    assert len(load_prompts(EAR_DATA / "test_van_gogh.csv")) == 50
    anchors = load_prompts(EAR_DATA / "train_church.json")  # pairs: their anchor (replacement) prompts
    assert anchors and all("church" not in prompt.lower() for prompt in anchors)


@pytest.mark.parametrize("name, content, message", [
    ("empty.txt", "  \n", "empty"),
    ("nothing.jsonl", '{"concept_prompt": "a church"}\n', "line 1: no prompt"),
    ("listed.json", '[{"prompt": "a cinema"}, 3]', "entry 2"),
    ("columns.csv", "case,seed\n1,2\n", "prompt"),
])
def test_preserve_prompt_file_errors_name_the_file(tmp_path, name, content, message):
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(ValueError, match=message) as error:
        load_prompts(path)
    assert name in str(error.value)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_prompts(tmp_path / "missing.txt")
