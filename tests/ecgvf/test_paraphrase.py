"""Paraphrase prompts (the paraphrase attack): prompts that show a concept without naming it, from
the offline template backend (its description table, and ShapesWorld's vocabulary, which has no
word for a shape but the shape's own), from a backend that misbehaves, written and read back, and
`earkit pairs --paraphrase` end to end."""

import json
import os
import re
import subprocess
import sys

import pytest

from earkit.ecgvf.pair_generation import (
    DUPLICATE, NAMES_CONCEPT, NOT_TEXT, PARAPHRASE_TEMPLATE, TOO_LONG, BackendError, TemplateBackend,
    generate_paraphrases, load_paraphrases, paraphrase_request_messages, write_paraphrases,
)
from earkit.ecgvf.pair_generation.parsing import concept_pattern
from earkit.engine.shapesworld import generator_folder

RECORD_KEYS = {"prompt", "concept", "backend", "model", "template", "seed"}
SHAPES = ("circle", "square", "triangle", "star", "cross")


def shipped_vocabulary() -> dict:
    return json.loads((generator_folder() / "prompt_vocabulary.json").read_text())


def tokenizer_words() -> set:
    """The words the shipped generator's word-level tokenizer knows (its own file, not the vocabulary's)."""
    tokenizer = json.loads((generator_folder() / "tokenizer.json").read_text())
    return {word for word in tokenizer["model"]["vocab"] if not word.startswith("<")}


def prompts_of(concept, backend, *, n, seed=0):
    records, summary = generate_paraphrases(concept, backends=[backend], n=n, seed=seed, progress=False)
    return [record["prompt"] for record in records], records, summary


# ---------------------------------------------------------------- the offline backend


def test_template_paraphrases_of_church_never_name_it_and_are_deterministic_per_seed():
    prompts, records, summary = prompts_of("church", TemplateBackend(), n=60, seed=3)
    assert len(prompts) == 60 and summary["stopped"] == "enough prompts"
    assert summary["malformed_replies"] == 0 and summary["backend_errors"] == 0
    assert not any(re.search(r"church", prompt, re.IGNORECASE) for prompt in prompts)
    assert not any(concept_pattern("church").search(prompt) for prompt in prompts)
    assert len({prompt.lower() for prompt in prompts}) == 60
    assert all(set(record) == RECORD_KEYS and record["concept"] == "church" and record["template"] == PARAPHRASE_TEMPLATE
               and record["backend"] == "template" for record in records)
    assert all(4 <= len(prompt.split()) <= 25 for prompt in prompts)
    again, _, _ = prompts_of("church", TemplateBackend(), n=60, seed=3)
    other, _, _ = prompts_of("church", TemplateBackend(), n=60, seed=4)
    assert again == prompts and other != prompts


def test_every_description_leaves_out_every_word_of_its_concept():
    for concept, descriptions in TemplateBackend.DESCRIPTIONS.items():
        assert 3 <= len(descriptions) <= 6, concept
        for description in descriptions:
            words = set(re.findall(r"\w+", description.lower()))
            assert not words & set(concept.split()), (concept, description)


def test_shapesworld_paraphrases_use_only_words_its_tokenizer_knows_and_no_shape_word_of_the_concept():
    known = tokenizer_words()
    for concept in SHAPES:
        prompts, _, summary = prompts_of(concept, TemplateBackend(shipped_vocabulary()), n=40, seed=1)
        assert len(prompts) == 40 and summary["backend_errors"] == 0, concept
        for prompt in prompts:
            words = prompt.split()
            assert set(words) <= known, prompt
            assert concept not in words, prompt
            # ShapesWorld has no word that describes a shape without naming one: the shape is left out.
            assert not set(words) & set(SHAPES), prompt
    prompts, _, _ = prompts_of("circle", TemplateBackend(shipped_vocabulary()), n=200, seed=0)
    assert "a photo of a small red on a white background" in prompts


def test_a_description_made_of_vocabulary_words_fills_the_concept_slot():
    vocabulary = {"format": "earkit-prompt-vocabulary", "version": 1, "templates": ["a {colour} {shape}"],
                  "slots": {"shape": ["circle", "disc", "square"], "colour": ["red", "blue"]}}
    prompts, _, _ = prompts_of("circle", TemplateBackend(vocabulary), n=2)
    assert sorted(prompts) == ["a blue disc", "a red disc"]  # "disc" is a description of a circle, and a word here


def test_an_unknown_concept_gets_nothing_from_the_template_backend_and_says_why():
    with pytest.raises(BackendError, match="no description of 'zebra'.*--backend openai"):
        TemplateBackend().complete(paraphrase_request_messages("zebra"), seed=0)
    records, summary = generate_paraphrases("zebra", backends=[TemplateBackend(shipped_vocabulary())], n=5,
                                            progress=False)
    assert records == [] and summary["valid"] == 0 and summary["stopped"].startswith("every backend retired")
    assert "transformers:FOLDER" in summary["per_backend"]["template:builtin-templates"]["errors"][0]


def test_the_pairs_requests_are_answered_as_before():
    from earkit.ecgvf.pair_generation import pair_request_messages

    reply = json.loads(TemplateBackend().complete(pair_request_messages("church", count=3), seed=0))
    assert len(reply) == 3 and all(set(pair) == {"original_prompt", "modified_prompt", "replaced"} for pair in reply)


def test_the_request_says_the_task_and_the_rules():
    system, user = paraphrase_request_messages("golf ball", count=7)
    assert "never use the concept's word" in system["content"].lower()
    assert "JSON list" in system["content"]
    request = [line for line in user["content"].splitlines() if line.startswith("Request (JSON): ")]
    assert json.loads(request[0].removeprefix("Request (JSON): ")) == {"task": "paraphrase", "concept": "golf ball",
                                                                       "count": 7}
    for bad in ("", None):
        with pytest.raises(ValueError, match="concept"):
            paraphrase_request_messages(bad)
    with pytest.raises(ValueError, match="count"):
        paraphrase_request_messages("church", count=0)


# ---------------------------------------------------------------- a backend that misbehaves


class ScriptedBackend:
    """Answers the replies it was given, one per call, in order."""

    name = "scripted"
    model = "fake"

    def __init__(self, replies):
        self.replies = list(replies)
        self.calls = 0

    def complete(self, messages, *, seed, temperature, max_tokens):
        reply = self.replies[min(self.calls, len(self.replies) - 1)]
        self.calls += 1
        if isinstance(reply, Exception):
            raise reply
        return reply


def test_each_bad_prompt_is_counted_by_its_reason():
    long_prompt = " ".join(["word"] * 78)
    replies = [
        "Sure! Here you go:\n```json\n" + json.dumps([
            "a tall stone building with a steeple",             # good
            "a church on a hill",                                # names the concept
            "two Churches by the sea",                           # plural names it too
            "A tall stone building   with a steeple",            # duplicate (case and spaces)
            "",                                                  # empty
            17,                                                  # not text
            {"prompt": "a chapel with a bell tower at dusk"},    # good, as an object
            {"text": "no prompt field"},                         # not text
            long_prompt,                                         # too long
        ]) + "\n```\nHope this helps.",
        "I cannot help with that.",                              # malformed: retried
        BackendError("HTTP 500 from the server"),                # a backend error: retried
        '["a house of worship with pews and an altar", "a gothic cathedral with pointed arches",]',  # trailing comma
    ]
    backend = ScriptedBackend(replies)
    records, summary = generate_paraphrases("church", backends=[backend], n=4, retries=2, progress=False)
    assert [record["prompt"] for record in records] == [
        "a tall stone building with a steeple", "a chapel with a bell tower at dusk",
        "a house of worship with pews and an altar", "a gothic cathedral with pointed arches"]
    assert summary["rejected"] == {NAMES_CONCEPT: 2, DUPLICATE: 1, NOT_TEXT: 3, TOO_LONG: 1}
    assert summary["malformed_replies"] == 1 and summary["backend_errors"] == 1 and summary["stopped"] == "enough prompts"
    assert summary["received"] == 11 and summary["valid"] == 4
    assert {item["reason"] for item in summary["rejected_prompts"]} == {NAMES_CONCEPT, DUPLICATE, NOT_TEXT, TOO_LONG}
    assert summary["per_backend"]["scripted:fake"]["errors"] == ["HTTP 500 from the server"]
    assert all(record["backend"] == "scripted" and record["model"] == "fake" for record in records)
    json.dumps(summary)  # writable as it is


def test_a_backend_that_only_fails_is_retired_and_a_cut_off_list_is_salvaged():
    records, summary = generate_paraphrases("dog", backends=[ScriptedBackend(["[]"])], n=3, progress=False)
    assert records == [] and summary["malformed_replies"] == 9 and summary["stopped"].startswith("every backend retired")
    cut = '["a puppy with floppy ears", "a loyal hound fetching a stick", "a furry can'
    records, summary = generate_paraphrases("dog", backends=[ScriptedBackend([cut])], n=2, progress=False)
    assert [record["prompt"] for record in records] == ["a puppy with floppy ears", "a loyal hound fetching a stick"]
    wrapped = json.dumps({"prompts": [{"prompt": "a golden retriever on a beach"}]})
    records, _ = generate_paraphrases("dog", backends=[ScriptedBackend([wrapped])], n=1, progress=False)
    assert records[0]["prompt"] == "a golden retriever on a beach"


# ---------------------------------------------------------------- files


def test_written_prompts_load_back_and_bad_files_fail_in_one_line(tmp_path):
    records, summary = generate_paraphrases("cat", backends=[TemplateBackend()], n=5, progress=False)
    path = write_paraphrases(records, tmp_path / "cat.jsonl", summary=summary)
    assert load_paraphrases(path) == [record["prompt"] for record in records]
    assert json.loads((tmp_path / "cat.summary.json").read_text())["returned"] == 5
    with pytest.raises(FileExistsError):
        write_paraphrases(records, path)
    write_paraphrases(records[:1], path, force=True)
    assert len(load_paraphrases(path)) == 1
    with pytest.raises(ValueError, match="no paraphrase prompts"):
        write_paraphrases([], tmp_path / "empty.jsonl")

    text = tmp_path / "prompts.txt"
    text.write_text("# prompts for the attack\n\na small whiskered pet\n  a tabby   kitten  \n")
    assert load_paraphrases(text) == ["a small whiskered pet", "a tabby kitten"]

    bad = {
        "missing.jsonl": (None, "does not exist"),
        "empty.txt": ("\n\n", "empty"),
        "comments.txt": ("# only\n\n# comments\n", "holds no prompts"),
        "broken.jsonl": ('{"prompt": "fine"}\n{"prompt": \n', "line 2: not JSON"),
        "field.jsonl": ('{"prompt": "fine"}\n\n{"text": "x"}\n', 'line 3: expected a JSON object with a non-empty "prompt"'),
        "surrogate.jsonl": ('{"prompt": "a \\ud800 cat"}\n', "line 1: the prompt is not valid Unicode"),
    }
    for name, (content, words) in bad.items():
        path = tmp_path / name
        if content is not None:
            path.write_text(content)
        with pytest.raises(ValueError) as error:
            load_paraphrases(path)
        message = str(error.value)
        assert words in message and str(path) in message and "\n" not in message, message


# ---------------------------------------------------------------- the command


def earkit(*argv, cwd):
    return subprocess.run([sys.executable, "-m", "earkit", *argv], cwd=cwd, capture_output=True, text=True,
                          timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})


def test_earkit_pairs_paraphrase_writes_shapesworld_prompts_and_refuses_a_rerun(tmp_path):
    out = tmp_path / "circle.jsonl"
    done = earkit("pairs", "--paraphrase", "--concept", "circle", "--n", "10", "--out", str(out), "--quiet",
                  cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    records = [json.loads(line) for line in out.read_text().splitlines()]
    expected, _ = generate_paraphrases("circle", backends=[TemplateBackend(shipped_vocabulary())], n=10, seed=0,
                                       progress=False)
    assert records == expected and len(records) == 10
    assert all("circle" not in record["prompt"].split() for record in records)
    assert json.loads((tmp_path / "circle.summary.json").read_text())["returned"] == 10
    again = earkit("pairs", "--paraphrase", "--concept", "circle", "--n", "10", "--out", str(out), "--quiet",
                   cwd=tmp_path)
    err = again.stderr.strip()
    assert again.returncode == 2 and len(err.splitlines()) == 1 and "already exists" in err, err


@pytest.mark.parametrize("extra, words", [
    (["--concept", "zebra"], "no valid paraphrase prompts for 'zebra'"),
    (["--concept", "church", "--anchor", "cinema"], "--anchor shape(s) pairs only"),
    (["--concept", "church", "--min-similarity", "0.5", "--examples", "x.json"], "--min-similarity, --examples"),
])
def test_earkit_pairs_paraphrase_fails_in_one_line_and_writes_nothing(tmp_path, capsys, extra, words):
    from earkit.cli import main

    assert main(["pairs", "--paraphrase", "--n", "3", "--out", str(tmp_path / "p.jsonl"), "--quiet", *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err and words in err, err
    assert list(tmp_path.iterdir()) == []


def test_the_backend_flags_can_be_shared_by_another_command(tmp_path):
    import argparse

    from earkit.cli.pairs import add_backend_arguments, backends_from_args

    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cuda")  # the command's own
    parser.add_argument("--model", default=None)
    add_backend_arguments(parser, device=False)
    backends = backends_from_args(parser.parse_args(["--backend", "template"]))
    assert [backend.name for backend in backends] == ["template"]
    assert backends[0].vocabulary == shipped_vocabulary()  # the default model's (the shipped generator)
    with pytest.raises(ValueError, match="--openai-url URL and --openai-model MODEL"):
        backends_from_args(parser.parse_args(["--backend", "openai"]))
    with pytest.raises(ValueError, match="--timeout"):
        backends_from_args(parser.parse_args(["--timeout", "0"]))
