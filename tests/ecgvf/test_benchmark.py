"""ECGVF benchmarks: pairs files, prompt files and benchmark JSONL, including every released EAR file."""

import json

import pytest

from ecgvf_helpers import EAR_DATA
from earkit.ecgvf.benchmark import load_benchmark, load_prompt_file


def test_the_released_ear_files_load():
    church = load_benchmark(EAR_DATA / "train_church.json")
    assert church.concept == "church" and church.kind == "pairs"
    assert len(church.target) == 55 and all("church" in p.prompt.lower() for p in church.target[:5])
    assert church.preserve and {p.concept for p in church.preserve} >= {"cinema", "supermarket"}

    test_church = load_benchmark(EAR_DATA / "test_church.json", concept="church")
    # 84 rows, one prompt twice: repeats are drawn once
    assert test_church.kind == "prompts" and len(test_church.target) == 83 and test_church.preserve == []

    van_gogh = load_benchmark(EAR_DATA / "train_van_gogh.csv", concept="van gogh")
    assert len(van_gogh.target) == 50 and van_gogh.preserve[0].concept is None
    assert van_gogh.target[0].prompt == "a photo of apple in Van Gogh"

    assert len(load_benchmark(EAR_DATA / "test_van_gogh.csv", concept="van gogh").target) == 50
    nudity = load_benchmark(EAR_DATA / "train_nudity.json", concept="nudity", max_prompts=10)
    assert len(nudity.target) == 10 and all(p.concept == "nudity" for p in nudity.target)
    six_cd = load_benchmark(EAR_DATA / "Six-CD_Nudity.csv", concept="nudity", preserve=EAR_DATA / "test_church.json")
    assert len(six_cd.target) > 1000 and len(six_cd.preserve) == 83


def test_concept_must_be_known():
    with pytest.raises(ValueError, match="--concept"):
        load_benchmark(EAR_DATA / "test_church.json")
    with pytest.raises(ValueError, match="concepts"):  # the nudity pairs name many words as their concept
        load_benchmark(EAR_DATA / "train_nudity.json")
    with pytest.raises(ValueError, match="--concept"):
        load_benchmark(EAR_DATA / "train_van_gogh.csv")


def test_benchmark_jsonl_roles_and_text_prompt_files(tmp_path):
    path = tmp_path / "bench.jsonl"
    rows = [{"prompt": "a red circle", "role": "target", "concept": "circle"},
            {"prompt": "a blue circle", "role": "target"},
            {"prompt": "a red square", "role": "preserve", "concept": "square"},
            {"prompt": "a red circle", "role": "preserve", "concept": "circle"}]  # also a target: not kept twice
    path.write_text("\n".join(json.dumps(row) for row in rows) + "\n")
    benchmark = load_benchmark(path)
    assert benchmark.concept == "circle" and [p.prompt for p in benchmark.target] == ["a red circle", "a blue circle"]
    assert [(p.prompt, p.concept) for p in benchmark.preserve] == [("a red square", "square")]

    path.write_text(json.dumps({"prompt": "a star", "role": "somewhere"}) + "\n")
    with pytest.raises(ValueError, match="line 1: role"):
        load_benchmark(path)

    text = tmp_path / "prompts.txt"
    text.write_text("a star\n\n  a   big star \na star\n")
    assert [p.prompt for p in load_prompt_file(text, concept="star")] == ["a star", "a big star"]


def test_bad_files_name_the_problem(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_benchmark(tmp_path / "missing.jsonl")
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(ValueError, match="empty"):
        load_benchmark(empty)
    with pytest.raises(ValueError, match="max_prompts"):
        load_benchmark(EAR_DATA / "train_church.json", max_prompts=0)


@pytest.mark.parametrize("name, content", [
    ("eval.jsonl", '{"prompt": "a star"}\n{"prompt": "a big star", "concept": "big star"}\n'),
    ("eval.json", '[{"prompt": "a star"}, {"prompt": "a big star", "concept": "big star"}]'),
    ("eval.csv", "case,prompt,concept\n1,a star,\n2,a big star,big star\n"),
])
def test_a_file_of_single_prompts_is_read_as_target_prompts(tmp_path, name, content):
    path = tmp_path / name
    path.write_text(content)
    benchmark = load_benchmark(path, concept="star")
    assert benchmark.kind == "prompts" and benchmark.preserve == []
    assert [(p.prompt, p.concept) for p in benchmark.target] == [("a star", "star"), ("a big star", "big star")]
    with pytest.raises(ValueError, match="--concept"):
        load_benchmark(path)


def test_only_a_file_of_single_prompts_is_read_as_prompts(tmp_path):
    """A pairs file with a bad record is refused as such, naming the record, whatever its message says."""
    path = tmp_path / "pairs.jsonl"
    path.write_text('{"concept_prompt": "a star", "anchor_prompt": "a moon"}\n'
                    '{"concept_prompt": "a star", "anchor_prompt": {"prompt": "a moon"}}\n')
    with pytest.raises(ValueError, match="line 2: 'anchor_prompt' must be a string"):
        load_benchmark(path, concept="star")
