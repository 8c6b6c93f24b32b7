"""The ECGVF visual filter: keep/drop decisions with their reasons on images whose content the test
chose, the sampling wiring, the files it writes, and `earkit filter` end to end on a tiny world and
on a tiny random Janus with an open_clip judge."""

import json

import pytest
import torch

from ecgvf_helpers import StubJudge, build_tiny_open_clip, build_tiny_world, rendered
from earkit.cli import main as cli_main
from earkit.ecgvf.filter import (
    ANCHOR_MISSES, ANCHOR_PROMPT_SHOWS, CONCEPT_PROMPT_MISSES, FilterRules, decide, decisions_path, filter_pairs,
    filter_pairs_with_model, write_filter_results,
)
from earkit.ecgvf.images import load_generator, sample_prompt_images
from earkit.engine.pair_files import PromptPair, load_pairs


@pytest.fixture(scope="module")
def tiny_world(tmp_path_factory):
    torch.set_num_threads(1)
    return build_tiny_world(tmp_path_factory.mktemp("world"))


def shapes(*names):
    return [rendered(name, seed) for seed, name in enumerate(names)]


PAIRS = [
    PromptPair("a red circle", "a red square", "circle", "square"),
    PromptPair("a blue circle", "a blue square", "circle", "square"),
    PromptPair("a big circle", "a big star", "circle", "star"),
    PromptPair("a small circle", "a small cross", "circle", "cross"),
]


def test_keeps_a_pair_whose_concept_prompt_shows_the_concept_and_drops_one_whose_anchor_prompt_still_does():
    concept_images = [shapes("circle", "circle", "square"),  # 2/3 >= 0.5: shows the concept
                      shapes("circle", "circle", "circle"),
                      shapes("square", "star", "circle"),  # 1/3 < 0.5
                      shapes("square", "square", "square")]
    anchor_images = [shapes("square", "square", "square"),
                     shapes("square", "circle", "square"),  # the anchor prompt still draws a circle once
                     shapes("star", "star", "star"),
                     shapes("circle", "cross", "cross")]
    records = filter_pairs(PAIRS, StubJudge(), concept_images, anchor_images, seeds=[0, 1, 2])
    assert [r["kept"] for r in records] == [True, False, False, False]
    assert records[0]["reasons"] == [] and records[0]["details"] == []
    assert records[1]["reasons"] == [ANCHOR_PROMPT_SHOWS]
    assert "1/3" in records[1]["details"][0]
    assert records[2]["reasons"] == [CONCEPT_PROMPT_MISSES]
    assert records[3]["reasons"] == [CONCEPT_PROMPT_MISSES, ANCHOR_PROMPT_SHOWS]  # every reason that applies
    assert records[0]["concept_prompt_rate"] == pytest.approx(2 / 3)
    assert records[1]["anchor_prompt_rate"] == pytest.approx(1 / 3)
    assert records[0]["seen"]["concept_prompt"] == [True, True, False]
    assert records[0]["scores"]["concept_prompt"] == [0.95, 0.95, 0.05] and records[0]["seeds"] == [0, 1, 2]


def test_rules_are_thresholds_and_the_anchor_can_be_required():
    assert decide([True, False], [False, False], FilterRules(min_concept_prompt_rate=0.5), concept="c")[0]
    assert not decide([True, False], [False, False], FilterRules(min_concept_prompt_rate=0.75), concept="c")[0]
    assert decide([True, True], [True, False], FilterRules(max_anchor_prompt_rate=0.5), concept="c")[0]
    with pytest.raises(ValueError, match="min_concept_prompt_rate"):
        FilterRules(min_concept_prompt_rate=1.5).validate()

    concept_images = [shapes("circle", "circle"), shapes("circle", "circle")]
    anchor_images = [shapes("square", "square"), shapes("triangle", "triangle")]  # pair 1 asked for a square
    pairs = [PAIRS[0], PromptPair("a blue circle", "a blue square", "circle", "square")]
    records = filter_pairs(pairs, StubJudge(), concept_images, anchor_images, rules=FilterRules(min_anchor_rate=0.5))
    assert records[0]["kept"] and records[0]["anchor_rate"] == 1.0
    assert records[1]["reasons"] == [ANCHOR_MISSES] and records[1]["anchor_rate"] == 0.0


def test_a_pair_without_a_concept_needs_one_given():
    pair = PromptPair("a photo of apple in Van Gogh", "a photo of apple")
    with pytest.raises(ValueError, match="--concept"):
        filter_pairs([pair], StubJudge(), [shapes("circle")], [shapes("square")])
    records = filter_pairs([pair], StubJudge(), [shapes("circle")], [shapes("square")], concept="circle")
    assert records[0]["kept"] and records[0]["judged_concept"] == "circle"


def test_sampling_judges_each_prompts_own_images(tiny_world):
    model, tokenizer = load_generator(tiny_world / "generator", device="cpu")
    judge = StubJudge()
    records = filter_pairs_with_model(model, tokenizer, PAIRS[:2], judge, seeds=[3, 4], progress=False)
    assert len(records) == 2 and records[0]["seeds"] == [3, 4]
    expected = sample_prompt_images(model, tokenizer, [p.concept_prompt for p in PAIRS[:2]] +
                                    [p.anchor_prompt for p in PAIRS[:2]], [3, 4], progress=False)
    (concept, judged_concept_images), (_, judged_anchor_images) = judge.calls
    assert concept == "circle"
    assert [image.tobytes() for image in judged_concept_images] == [image.tobytes() for row in expected[:2]
                                                                    for image in row]
    assert [image.tobytes() for image in judged_anchor_images] == [image.tobytes() for row in expected[2:]
                                                                   for image in row]


def test_written_files_load_and_refuse_to_be_overwritten(tmp_path):
    records = filter_pairs(PAIRS[:2], StubJudge(), [shapes("circle"), shapes("square")],
                           [shapes("square"), shapes("square")])
    out = tmp_path / "kept.jsonl"
    kept, decisions = write_filter_results(records, out, judge={"name": "stub"}, rules=FilterRules())
    assert decisions == decisions_path(out) == tmp_path / "kept.decisions.jsonl"
    assert load_pairs(kept) == [PAIRS[0]]
    lines = [json.loads(line) for line in decisions.read_text().splitlines()]
    assert lines[0]["filter"]["summary"] == {"pairs": 2, "kept": 1, "dropped": 1,
                                             "dropped_by_reason": {CONCEPT_PROMPT_MISSES: 1}}
    assert [line["kept"] for line in lines[1:]] == [True, False]
    with pytest.raises(FileExistsError, match="--force"):
        write_filter_results(records, out)
    write_filter_results(records, out, force=True)
    assert not [p for p in tmp_path.iterdir() if ".partial" in p.name]


def test_earkit_filter_on_a_tiny_world(tiny_world, tmp_path, capsys):
    from earkit.engine.shapesworld.render import BACKGROUNDS, CAPTION_TEMPLATES, COLOURS, SHAPES, SIZES

    # The world's prompt vocabulary, so that the pairs are in words its tokenizer knows.
    vocabulary = {"format": "earkit-prompt-vocabulary", "version": 1, "templates": list(CAPTION_TEMPLATES),
                  "slots": {"shape": list(SHAPES), "colour": list(COLOURS), "size": list(SIZES),
                            "background": list(BACKGROUNDS)}}
    (tiny_world / "generator" / "prompt_vocabulary.json").write_text(json.dumps(vocabulary))
    pairs = tmp_path / "circle.jsonl"
    assert cli_main(["pairs", "--concept", "circle", "--n", "6", "--model", str(tiny_world / "generator"),
                     "--out", str(pairs), "--quiet"]) == 0
    out = tmp_path / "kept.jsonl"
    argv = ["filter", "--pairs", str(pairs), "--model", str(tiny_world / "generator"), "--seeds", "2",
            "--out", str(out), "--device", "cpu", "--quiet"]
    assert cli_main(argv) == 0
    printed = capsys.readouterr().out
    assert "filter: 6 pairs, 2 seeds, judge shapesworld" in printed
    decisions = [json.loads(line) for line in decisions_path(out).read_text().splitlines()[1:]]
    assert len(decisions) == 6
    for record in decisions:  # an untrained world keeps or drops at random, but always says why
        assert record["kept"] == (not record["reasons"]) and len(record["details"]) == len(record["reasons"])
        assert len(record["scores"]["concept_prompt"]) == 2
    assert len(out.read_text().splitlines()) == sum(r["kept"] for r in decisions)

    assert cli_main(argv) == 2  # exists: one line, no sampling
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and "already exists" in error[0]
    assert cli_main(argv + ["--force", "--concept", "church"]) == 2
    assert "cannot judge 'church'" in capsys.readouterr().err


def test_earkit_filter_on_a_tiny_random_janus_with_an_open_clip_judge(tmp_path, capsys):
    from earkit.engine.tiny import save_tiny_janus

    save_tiny_janus(tmp_path / "janus", ["church", "cinema", "photo", "a", "of"])
    config, weights = build_tiny_open_clip(tmp_path / "clip")
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text(json.dumps({"concept_prompt": "a photo of a church", "anchor_prompt": "a photo of a cinema",
                                 "concept": "church", "anchor": "cinema"}) + "\n")
    out = tmp_path / "kept.jsonl"
    assert cli_main(["filter", "--pairs", str(pairs), "--model", str(tmp_path / "janus"), "--judge",
                     f"openclip:{config}:{weights}", "--seeds", "2", "--out", str(out), "--device", "cpu",
                     "--quiet", "--min-anchor-rate", "0.5"]) == 0
    record = json.loads(decisions_path(out).read_text().splitlines()[1])
    assert record["anchor_rate"] is not None and record["scores"]["anchor"] is not None
    assert "judge openclip" in capsys.readouterr().out
