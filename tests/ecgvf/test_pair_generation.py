"""The ECGVF prompt-pair generator: the offline template backend, an OpenAI-compatible server that
misbehaves in every way it can, a tiny local causal LM, reply parsing, pair validation, and the
written file loading with earkit.engine.pair_files.load_pairs."""

import argparse
import json
import threading
import time
from http.server import BaseHTTPRequestHandler
from pathlib import Path

import pytest

from ecgvf_helpers import LocalServer
from earkit.ecgvf.pair_generation import (
    ANCHOR_MISSING, CONCEPT_IN_ANCHOR_PROMPT, CONCEPT_MISSING, DUPLICATE, IDENTICAL, MISSING_FIELD, NOT_AN_OBJECT,
    REWRITTEN, TEMPLATE, BackendError, MalformedReply, OpenAIChatBackend, TemplateBackend, TransformersBackend,
    extract_pair_list, generate_pairs, load_examples, pair_request_messages, summary_path, validate_items,
    write_generated,
)
from earkit.cli.pairs import add_arguments as add_pairs_arguments, parse_backend, run as run_pairs
from earkit.engine.pair_files import PromptPair, load_pairs

EAR_DATA = Path(__file__).resolve().parents[3] / "shared" / "ear-data"
PROVENANCE_KEYS = {"concept_prompt", "anchor_prompt", "concept", "anchor", "backend", "model", "template", "seed",
                   "attempt"}


def shapes_world_vocabulary() -> dict:
    """ShapesWorld's words as a prompt vocabulary (the file a generator folder ships as
    prompt_vocabulary.json), built from the renderer's own constants."""
    from earkit.engine.shapesworld.render import BACKGROUNDS, CAPTION_TEMPLATES, COLOURS, SHAPES, SIZES

    return {"format": "earkit-prompt-vocabulary", "version": 1, "templates": list(CAPTION_TEMPLATES),
            "slots": {"shape": list(SHAPES), "colour": list(COLOURS), "size": list(SIZES),
                      "background": list(BACKGROUNDS)}}


# ---------------------------------------------------------------- the offline backend


def test_template_backend_gives_200_valid_circle_pairs_that_load(tmp_path):
    pairs, summary = generate_pairs("circle", backends=[TemplateBackend(shapes_world_vocabulary())], n_pairs=200,
                                    seed=0, progress=False)
    assert len(pairs) == 200 and summary["returned"] == 200 and summary["stopped"] == "enough pairs"
    assert summary["malformed_replies"] == 0 and summary["backend_errors"] == 0
    assert set(summary["rejected"]) <= {DUPLICATE}  # composed pairs fail no check, only repeat
    assert summary["received"] == summary["valid"] + sum(summary["rejected"].values())
    keys = {(p["concept_prompt"].lower(), p["anchor_prompt"].lower()) for p in pairs}
    assert len(keys) == 200
    from earkit.engine.shapesworld.render import SHAPES, vocabulary

    # world.vocabulary() drops "background" with the template placeholder names; captions use the word.
    known_words = set(vocabulary()) | {"background"}
    for pair in pairs:
        assert set(pair) == PROVENANCE_KEYS
        assert pair["concept"] == "circle" and pair["anchor"] in SHAPES and pair["anchor"] != "circle"
        assert "circle" in pair["concept_prompt"].split() and "circle" not in pair["anchor_prompt"].split()
        assert pair["concept_prompt"].replace("circle", pair["anchor"]) == pair["anchor_prompt"]
        assert set(pair["concept_prompt"].split()) <= known_words  # the ShapesWorld tokenizer knows every word
        assert pair["template"] == TEMPLATE and pair["backend"] == "template" and pair["attempt"] == 0

    path = write_generated(pairs, tmp_path / "circle.jsonl", summary=summary)
    loaded = load_pairs(path)  # the provenance keys beside earkit's four do not disturb it
    assert loaded == [PromptPair(p["concept_prompt"], p["anchor_prompt"], "circle", p["anchor"]) for p in pairs]
    assert json.loads(summary_path(path).read_text())["returned"] == 200


def test_template_backend_is_deterministic_and_works_for_any_concept():
    first, _ = generate_pairs("church", backends=TemplateBackend(), n_pairs=30, seed=3, progress=False)
    again, _ = generate_pairs("church", backends=TemplateBackend(), n_pairs=30, seed=3, progress=False)
    other, _ = generate_pairs("church", backends=TemplateBackend(), n_pairs=30, seed=4, progress=False)
    assert first == again and first != other
    assert all("church" in p["concept_prompt"] and "church" not in p["anchor_prompt"] for p in first)
    anchored, _ = generate_pairs("church", backends=[TemplateBackend()], n_pairs=20, anchors=["cinema", "ground"],
                                 progress=False)
    assert {p["anchor"] for p in anchored} == {"cinema", "ground"}
    red, _ = generate_pairs("red", backends=[TemplateBackend(shapes_world_vocabulary())], n_pairs=20,
                            progress=False)  # a ShapesWorld colour
    assert all(p["anchor"] in {"green", "blue", "yellow", "purple", "orange"} for p in red)


def test_template_asks_for_the_json_schema_and_takes_released_examples():
    messages = pair_request_messages("church", count=7, anchors=["cinema"], style_hints=["photographs"])
    assert [m["role"] for m in messages] == ["system", "user"]
    system, user = messages[0]["content"], messages[1]["content"]
    assert '"original_prompt"' in system and '"modified_prompt"' in system and '"replaced"' in system
    assert "write 7 different pairs" in user and "cinema" in user and "photographs" in user
    if EAR_DATA.is_dir():
        examples = load_examples(EAR_DATA / "train_church.json", limit=2)
        assert examples[0] == {"concept_prompt": "The church is surrounded by a peaceful garden.",
                               "anchor_prompt": "The cinema is surrounded by a peaceful garden.", "anchor": "cinema"}
        user = pair_request_messages("church", examples=examples)[1]["content"]
        assert "The church is surrounded by a peaceful garden." in user
        van_gogh = load_examples(EAR_DATA / "train_van_gogh.csv", limit=1)  # no concept column: no replacement
        assert van_gogh == [{"concept_prompt": "a photo of apple in Van Gogh", "anchor_prompt": "a photo of apple",
                             "anchor": ""}]
    with pytest.raises(ValueError, match="concept"):
        pair_request_messages("  ")


# ---------------------------------------------------------------- an OpenAI-compatible server


def good_reply(seed: int) -> str:
    """Prose, a fenced list with a trailing comma: two valid pairs (different per seed), one
    without the concept, one repeat."""
    pairs = [
        {"original_prompt": f"a red circle on a white background, picture {seed}",
         "modified_prompt": f"a red square on a white background, picture {seed}", "replaced": "square"},
        {"original_prompt": f"a small circle, version {seed}", "modified_prompt": f"a small star, version {seed}",
         "replaced": "star"},
        {"original_prompt": "a blue square", "modified_prompt": "a blue triangle", "replaced": "triangle"},
        {"original_prompt": f"A small circle, version {seed}.", "modified_prompt": f"a small star, version {seed}",
         "replaced": "star"},
    ]
    return "Here are the pairs:\n```json\n" + json.dumps(pairs, indent=1)[:-1] + ",]\n```\nEnjoy!"


class StubChatServer(LocalServer):
    """An OpenAI-compatible /v1/chat/completions on 127.0.0.1 whose behaviour is the model name:
    good, malformed, slow (answers after `slow_seconds`), error500, notjson. It records each
    request and shuts itself down after `lifetime` seconds whatever happens."""

    def __init__(self, slow_seconds: float = 2.0, lifetime: float = 60.0):
        self.requests = []
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep the test output clean
                pass

            def send(self, status: int, body: bytes, content_type: str = "application/json"):
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", content_type)
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
                except (BrokenPipeError, ConnectionResetError):  # the client gave up (the slow case)
                    pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                stub.requests.append({"path": self.path, "headers": dict(self.headers), "body": body})
                mode = body.get("model")
                if mode == "error500":
                    return self.send(500, b'{"error": "the model crashed"}')
                if mode == "notjson":
                    return self.send(200, b"<html>502 Bad Gateway</html>", "text/html")
                if mode == "slow":
                    time.sleep(slow_seconds)
                content = "Sorry, I cannot help with that." if mode == "malformed" else good_reply(body["seed"])
                answer = {"id": "x", "object": "chat.completion", "model": mode,
                          "choices": [{"index": 0, "message": {"role": "assistant", "content": content},
                                       "finish_reason": "stop"}]}
                self.send(200, json.dumps(answer).encode())

        super().__init__(Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        self.deadline = threading.Timer(lifetime, self.server.shutdown)
        self.deadline.daemon = True

    def __enter__(self):
        self.deadline.start()
        return super().__enter__()

    def __exit__(self, *exc):
        self.deadline.cancel()
        super().__exit__(*exc)


def test_openai_backends_count_each_failure_and_keep_the_good_pairs(tmp_path):
    with StubChatServer(slow_seconds=2.0) as stub:
        backends = [OpenAIChatBackend(stub.url, model, api_key="test-key" if model == "good" else None, timeout=0.5)
                    for model in ("good", "malformed", "slow", "error500", "notjson")]
        started = time.monotonic()
        pairs, summary = generate_pairs("circle", backends=backends, n_pairs=4, seed=1, retries=1, pairs_per_request=4,
                                        temperature=0.7, max_tokens=512, progress=False)
        elapsed = time.monotonic() - started
        requests = list(stub.requests)

    # Round 1: every backend is asked once (two attempts each, retries=1); round 2 stops after
    # the good backend, which then has its 4 pairs.
    assert summary["stopped"] == "enough pairs" and summary["requests"] == 6 and elapsed < 10
    per = summary["per_backend"]
    good = {"requests": 2, "attempts": 2, "received": 8, "valid": 4, "malformed_replies": 0, "backend_errors": 0,
            "rejected": {CONCEPT_MISSING: 2, DUPLICATE: 2}, "retired": False}
    assert {key: per["openai:good"][key] for key in good} == good
    assert (per["openai:malformed"]["malformed_replies"], per["openai:malformed"]["backend_errors"]) == (2, 0)
    assert "Sorry" in per["openai:malformed"]["malformed_example"]
    for name, words in (("slow", "within 0.5 s"), ("error500", "HTTP 500"), ("notjson", "non-JSON body")):
        counts = per[f"openai:{name}"]
        assert (counts["backend_errors"], counts["malformed_replies"], counts["received"]) == (2, 0, 0), name
        assert words in counts["errors"][0], counts["errors"]
    assert "the model crashed" in per["openai:error500"]["errors"][0]
    assert summary["malformed_replies"] == 2 and summary["backend_errors"] == 6
    assert summary["received"] == 8 and summary["valid"] == 4 and summary["rejected"] == {CONCEPT_MISSING: 2,
                                                                                          DUPLICATE: 2}
    assert {r["reason"] for r in summary["rejected_pairs"]} == {CONCEPT_MISSING, DUPLICATE}

    assert len(pairs) == 4 and all(p["backend"] == "openai" and p["model"] == "good" for p in pairs)
    assert all(p["anchor"] in ("square", "star") and p["attempt"] == 0 for p in pairs)

    # The requests have the OpenAI shape; a retry asks with another seed.
    assert len(requests) == 2 + 2 + 2 + 2 + 2
    for request in requests:
        body = request["body"]
        assert request["path"] == "/v1/chat/completions"
        assert request["headers"]["Content-Type"] == "application/json"
        assert set(body) == {"model", "messages", "temperature", "seed", "max_tokens"}
        assert body["temperature"] == 0.7 and body["max_tokens"] == 512 and isinstance(body["seed"], int)
        assert [m["role"] for m in body["messages"]] == ["system", "user"]
        assert all(isinstance(m["content"], str) for m in body["messages"])
        assert ("Authorization" in request["headers"]) == (body["model"] == "good")
    assert {r["headers"].get("Authorization") for r in requests if r["body"]["model"] == "good"} == {"Bearer test-key"}
    malformed_seeds = [r["body"]["seed"] for r in requests if r["body"]["model"] == "malformed"]
    assert len(set(malformed_seeds)) == 2

    path = write_generated(pairs, tmp_path / "stub.jsonl")
    assert [pair.anchor_prompt for pair in load_pairs(path)] == [p["anchor_prompt"] for p in pairs]


def test_unreachable_server_is_a_backend_error_and_retires_the_backend():
    import socket

    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    backend = OpenAIChatBackend(f"http://127.0.0.1:{port}/v1", "any", timeout=1)
    with pytest.raises(BackendError, match="cannot reach"):
        backend.complete([{"role": "user", "content": "hi"}], seed=0, temperature=0, max_tokens=8)
    pairs, summary = generate_pairs("circle", backends=[backend], n_pairs=5, retries=0, max_failed_requests=2,
                                    progress=False)
    assert pairs == [] and summary["backend_errors"] == 2 and summary["per_backend"]["openai:any"]["retired"]
    assert summary["stopped"].startswith("every backend retired")


# ---------------------------------------------------------------- a tiny local causal LM


@pytest.fixture(scope="module")
def tiny_causal_lm(tmp_path_factory):
    """A random LlamaForCausalLM at toy width with earkit's word-level tokenizer over the template's
    words, saved twice: without a chat template, and with one."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from earkit.engine.tiny import word_tokenizer, words_of

    messages = pair_request_messages("circle", count=3)
    tokenizer = word_tokenizer(words_of(m["content"] for m in messages))
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=2048,
                         tie_word_embeddings=False, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    folders = {}
    for kind in ("plain", "chat"):
        folder = tmp_path_factory.mktemp(f"tiny-lm-{kind}")
        if kind == "chat":
            tokenizer.chat_template = ("{% for m in messages %}<|User|> {{ m['content'] }} {% endfor %}"
                                       "{% if add_generation_prompt %}<|Assistant|>{% endif %}")
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        folders[kind] = folder
    return folders


@pytest.mark.parametrize("kind, temperature", [("plain", 0.0), ("chat", 0.9)])
def test_transformers_backend_counts_garbage_as_malformed(tiny_causal_lm, kind, temperature):
    backend = TransformersBackend(tiny_causal_lm[kind])
    assert backend.name == "transformers" and backend.model == tiny_causal_lm[kind].name
    messages = pair_request_messages("circle", count=3)
    input_ids, _ = backend.prompt_ids(messages)
    assistant = backend.tokenizer.convert_tokens_to_ids("<|Assistant|>")
    assert (assistant in input_ids[0].tolist()) == (kind == "chat")  # the chat template is used when there is one
    reply = backend.complete(messages, seed=5, temperature=temperature, max_tokens=12)
    assert isinstance(reply, str)
    assert reply == backend.complete(messages, seed=5, temperature=temperature, max_tokens=12)  # seeded

    pairs, summary = generate_pairs("circle", backends=[backend], n_pairs=5, retries=1, pairs_per_request=3,
                                    temperature=temperature, max_tokens=12, max_requests=2, progress=False)
    assert pairs == [] and summary["requests"] == 2
    assert summary["malformed_replies"] == 4 and summary["backend_errors"] == 0 and summary["received"] == 0
    assert summary["stopped"] == "request budget spent (2 requests)"


def test_transformers_backend_needs_a_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        TransformersBackend(tmp_path / "absent")


# ---------------------------------------------------------------- parsing and validation


def test_extract_pair_list_tolerates_what_llms_do():
    pair = {"original_prompt": "a circle", "modified_prompt": "a star", "replaced": "star"}
    listed = json.dumps([pair])
    assert extract_pair_list(listed) == ([pair], False)
    assert extract_pair_list(f"Sure! Here are [1] pairs:\n```json\n{listed}\n```\nAnything else?") == ([pair], False)
    assert extract_pair_list(listed[:-1] + " , ]") == ([pair], False)  # a trailing comma
    tricky = {"original_prompt": 'a circle, "big",]', "modified_prompt": "a star", "replaced": "star"}
    assert extract_pair_list(json.dumps([tricky])[:-1] + ",]") == ([tricky], False)  # commas in strings kept
    assert extract_pair_list(json.dumps({"pairs": [pair]})) == ([pair], False)
    cut_off = json.dumps([pair, pair])[:-20]  # ran out of tokens in the second object
    assert extract_pair_list(cut_off) == ([pair], True)
    assert extract_pair_list(json.dumps(pair)) == ([pair], False)
    for reply, reason in (("", "empty reply"), ("I cannot do that.", "no JSON list"), ("[]", "empty list"),
                          ("[1, 2, 3]", "no JSON list"), ("{'original_prompt': 'x'}", "no JSON list"), (None, "empty")):
        with pytest.raises(MalformedReply, match=reason):
            extract_pair_list(reply)


def test_validation_rejects_each_bad_pair_with_its_reason():
    items = [
        {"original_prompt": "a red circle on a white background", "modified_prompt": "a red square on a white background",
         "replaced": "square"},  # valid
        {"original_prompt": "two circles on a table", "modified_prompt": "two stars on a table", "replaced": "stars"},
        {"original_prompt": "a cat near a Circle", "modified_prompt": "a cat near a triangle"},  # replacement inferred
        {"original_prompt": "a red square", "modified_prompt": "a red star", "replaced": "star"},
        {"original_prompt": "a semicircle on a wall", "modified_prompt": "a star on a wall", "replaced": "star"},
        {"original_prompt": "a red circle", "modified_prompt": "a red circle and a star", "replaced": "star"},
        {"original_prompt": "a small red circle on a white background",
         "modified_prompt": "a dog running through a park at night", "replaced": "dog"},
        {"original_prompt": "a red circle", "modified_prompt": "A red  circle.", "replaced": "circle"},
        {"original_prompt": "A Red Circle on a white background.",
         "modified_prompt": "a red square on a white background", "replaced": "square"},  # repeats the first
        {"original_prompt": "a green circle", "modified_prompt": "a green square", "replaced": "star"},
        {"original_prompt": "a green circle"},
        "a circle -> a star",
    ]
    accepted, rejected = validate_items(items, "circle")
    assert [(p["concept_prompt"], p["anchor"]) for p in accepted] == [
        ("a red circle on a white background", "square"), ("two circles on a table", "stars"),
        ("a cat near a Circle", "triangle")]
    assert all(p["similarity"] == 1.0 for p in accepted)
    assert [r["reason"] for r in rejected] == [CONCEPT_MISSING, CONCEPT_MISSING, CONCEPT_IN_ANCHOR_PROMPT, REWRITTEN,
                                               IDENTICAL, DUPLICATE, ANCHOR_MISSING, MISSING_FIELD, NOT_AN_OBJECT]
    assert rejected[3]["modified_prompt"] == "a dog running through a park at night"  # the pair is kept with its reason
    assert rejected[-1] == {"value": "a circle -> a star", "reason": NOT_AN_OBJECT}

    # Possessives and multi-word concepts match as whole words; "a"/"an" do not count as a rewrite.
    accepted, rejected = validate_items([
        {"original_prompt": "The church's door is open.", "modified_prompt": "The cinema's door is open.",
         "replaced": "cinema"},
        {"original_prompt": "a still life in Van  Gogh style", "modified_prompt": "a still life in Monet style",
         "replaced": "Monet"},
        {"original_prompt": "a photo of a church", "modified_prompt": "a photo of an apple", "replaced": "apple"},
    ], "church")
    assert len(accepted) == 2 and [r["reason"] for r in rejected] == [CONCEPT_MISSING]
    accepted, _ = validate_items([{"original_prompt": "a still life in Van  Gogh style",
                                   "modified_prompt": "a still life in Monet style"}], "van gogh")
    assert accepted[0]["anchor"] == "Monet"
    accepted, _ = validate_items([{"original_prompt": "a photo of a church", "modified_prompt": "a photo of an apple",
                                   "replaced": "apple"}], "church")
    assert accepted[0]["similarity"] == 1.0


def test_arguments_are_checked():
    with pytest.raises(ValueError, match="no backends"):
        generate_pairs("circle", backends=[], n_pairs=5)
    with pytest.raises(ValueError, match="n_pairs"):
        generate_pairs("circle", backends=[TemplateBackend()], n_pairs=0)
    with pytest.raises(ValueError, match="contains the concept"):
        generate_pairs("circle", backends=[TemplateBackend()], n_pairs=5, anchors=["big circles"])
    with pytest.raises(ValueError, match="single string"):
        generate_pairs("circle", backends=[TemplateBackend()], n_pairs=5, anchors="square")


# ---------------------------------------------------------------- writing and the command line


def test_write_generated_refuses_to_overwrite_and_leaves_no_partial_file(tmp_path):
    pairs, _ = generate_pairs("circle", backends=[TemplateBackend()], n_pairs=3, progress=False)
    path = write_generated(pairs, tmp_path / "out" / "p.jsonl")
    with pytest.raises(FileExistsError, match="already exists"):
        write_generated(pairs[:1], path)
    write_generated(pairs[:1], path, force=True)
    assert len(load_pairs(path)) == 1 and [p.name for p in path.parent.iterdir()] == ["p.jsonl"]
    with pytest.raises(ValueError, match="no pairs"):
        write_generated([], tmp_path / "empty.jsonl")


def test_parse_backend_forms():
    template = parse_backend("template")
    assert isinstance(template, TemplateBackend) and template.vocabulary is None
    vocabulary = shapes_world_vocabulary()
    assert parse_backend("template", vocabulary=vocabulary).vocabulary == vocabulary
    backend = parse_backend("openai", openai_url="http://127.0.0.1:8000/v1", openai_model="qwen2.5:7b", timeout=3)
    assert (backend.url, backend.model, backend.timeout) == ("http://127.0.0.1:8000/v1/chat/completions", "qwen2.5:7b", 3)
    for bad in ("openai:http://127.0.0.1:8000/v1:m", "llm", "transformers:"):
        with pytest.raises(ValueError, match="--backend"):
            parse_backend(bad)
    with pytest.raises(ValueError, match="--openai-url URL and --openai-model MODEL"):
        parse_backend("openai", openai_url="http://127.0.0.1:8000/v1")


def pairs_argv(tmp_path, *extra):
    return ["pairs", "--concept", "circle", "--n", "2", "--out", str(tmp_path / "p.jsonl"), "--quiet", *extra]


@pytest.mark.parametrize("extra, words", [
    (["--backend", "openai"], "--backend openai needs --openai-url URL and --openai-model MODEL"),
    (["--backend", "openai", "--openai-url", "http://127.0.0.1:1/v1"], "needs --openai-url URL and --openai-model"),
    (["--backend", "openai", "--openai-model", "m"], "needs --openai-url URL and --openai-model"),
    (["--openai-url", "http://127.0.0.1:1/v1", "--openai-model", "m"],
     "--openai-url and --openai-model given without --backend openai"),
    (["--backend", "template", "--openai-model", "m"], "--openai-model given without --backend openai"),
    (["--backend", "openai", "--backend", "openai", "--openai-url", "http://127.0.0.1:1/v1", "--openai-model", "m"],
     "--backend openai is given 2 time(s), --openai-url 1 and --openai-model 1"),
    (["--backend", "openai:http://127.0.0.1:1/v1:m"], "--backend openai --openai-url"),
])
def test_openai_flags_are_checked_in_one_line_before_any_request(tmp_path, capsys, extra, words):
    from earkit.cli import main

    assert main(pairs_argv(tmp_path, *extra)) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err and words in err, err
    assert list(tmp_path.iterdir()) == []


def test_each_openai_backend_takes_its_own_url_and_model_in_order(tmp_path, capsys):
    from earkit.cli import main

    with StubChatServer() as first, StubChatServer() as second:
        status = main(pairs_argv(tmp_path, "--backend", "openai", "--backend", "template", "--backend", "openai",
                                 "--openai-url", first.url, "--openai-model", "good", "--openai-url", second.url,
                                 "--openai-model", "malformed", "--n", "6", "--retries", "0", "--per-request", "1"))
        assert status == 0, capsys.readouterr().err
        assert {r["body"]["model"] for r in first.requests} == {"good"}
        assert {r["body"]["model"] for r in second.requests} == {"malformed"}
    summary = json.loads(summary_path(tmp_path / "p.jsonl").read_text())
    assert list(summary["per_backend"]) == ["openai:good", "template:builtin-templates", "openai:malformed"]


def test_the_template_backend_composes_with_the_same_draws_as_before():
    """A ShapesWorld concept with ShapesWorld's vocabulary gives exactly the pairs the built-in
    ShapesWorld composer gave (same seed, same pairs: the draws come in the same order)."""
    import hashlib

    backend = TemplateBackend(shapes_world_vocabulary())
    pairs, _ = generate_pairs("circle", backends=[backend], n_pairs=4, seed=5, progress=False)
    assert [(p["concept_prompt"], p["anchor_prompt"], p["anchor"]) for p in pairs] == [
        ("a yellow circle", "a yellow square", "square"),
        ("a photo of a large blue circle on a black background",
         "a photo of a large blue square on a black background", "square"),
        ("a photo of a small red circle on a gray background", "a photo of a small red star on a gray background", "star"),
        ("orange circle", "orange cross", "cross"),
    ]
    digests = {"circle": "c83e3e0c7a64201d", "red": "7062590eb16d5d3d"}
    for concept, digest in digests.items():
        pairs, _ = generate_pairs(concept, backends=[backend], n_pairs=200, seed=5, progress=False)
        written = [(p["concept_prompt"], p["anchor_prompt"], p["anchor"], p["seed"]) for p in pairs]
        assert hashlib.sha256(json.dumps(written).encode()).hexdigest()[:16] == digest, concept
    # Without a vocabulary (or for a word in none of its slots) the generic scene templates are used.
    generic, _ = generate_pairs("circle", backends=[TemplateBackend()], n_pairs=5, seed=5, progress=False)
    assert all(p["anchor"] in TemplateBackend.GENERIC_ANCHORS for p in generic)


def test_a_prompt_vocabulary_file_is_checked_with_one_clear_error(tmp_path):
    from earkit.ecgvf.pair_generation import load_prompt_vocabulary, model_prompt_vocabulary

    assert model_prompt_vocabulary(tmp_path) is None  # a model folder without one
    path = tmp_path / "prompt_vocabulary.json"
    path.write_text(json.dumps(shapes_world_vocabulary()))
    assert model_prompt_vocabulary(tmp_path) == shapes_world_vocabulary()
    good = shapes_world_vocabulary()
    bad_ones = {
        "format": {**good, "format": "something-else"},
        "version": {**good, "version": 2},
        "slot 'shape'": {**good, "slots": {"shape": []}},
        "templates": {**good, "templates": "a {shape}"},
        "no slot fills": {**good, "templates": ["a {colour} {animal}"]},
        "JSON object": ["a list"],
    }
    for words, vocabulary in bad_ones.items():
        path.write_text(json.dumps(vocabulary))
        with pytest.raises(ValueError, match="not an earkit prompt vocabulary") as error:
            load_prompt_vocabulary(path)
        assert str(path) in str(error.value) and words in str(error.value), error.value
    path.write_text("{not json")
    with pytest.raises(ValueError, match="is not JSON") as error:
        load_prompt_vocabulary(path)
    assert str(path) in str(error.value)
    with pytest.raises(ValueError, match="version"):
        TemplateBackend({**good, "version": 7})


def test_earkit_pairs_composes_with_the_vocabulary_of_model(tmp_path, capsys):
    from earkit.cli import main

    model = tmp_path / "model"
    model.mkdir()
    (model / "prompt_vocabulary.json").write_text(json.dumps(shapes_world_vocabulary()))
    out = tmp_path / "circle.jsonl"
    assert main(["pairs", "--concept", "circle", "--n", "20", "--seed", "5", "--model", str(model), "--out", str(out),
                 "--quiet"]) == 0
    expected, _ = generate_pairs("circle", backends=[TemplateBackend(shapes_world_vocabulary())], n_pairs=20, seed=5,
                                 progress=False)
    assert [json.loads(line) for line in out.read_text().splitlines()] == expected
    (model / "prompt_vocabulary.json").write_text('{"format": "earkit-prompt-vocabulary", "version": 9}')
    assert main(["pairs", "--concept", "circle", "--n", "2", "--model", str(model), "--out", str(tmp_path / "x.jsonl"),
                 "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "prompt_vocabulary.json" in err and "version 9" in err, err
    assert main(["pairs", "--concept", "circle", "--n", "2", "--model", str(tmp_path / "absent"), "--out",
                 str(tmp_path / "x.jsonl"), "--quiet"]) == 2
    assert "no such model folder" in capsys.readouterr().err


def test_the_default_model_without_a_vocabulary_falls_back_to_the_generic_templates(tmp_path, monkeypatch, capsys):
    from earkit.cli import main
    from earkit.cli import pairs as pairs_command

    monkeypatch.setattr(pairs_command, "resolve_model", lambda model: str(model) if model else str(tmp_path / "nowhere"))
    out = tmp_path / "church.jsonl"
    assert main(["pairs", "--concept", "circle", "--n", "5", "--out", str(out), "--quiet"]) == 0
    assert all(pair.anchor in TemplateBackend.GENERIC_ANCHORS for pair in load_pairs(out))


def test_a_reply_in_earkit_field_names_is_read_too():
    items = [{"concept_prompt": "a red circle", "anchor_prompt": "a red square", "anchor": "square"},
             {"original_prompt": "a blue circle", "modified_prompt": "a blue star", "replaced": "star"}]
    accepted, rejected = validate_items(items, "circle")
    assert rejected == [] and [(p["anchor_prompt"], p["anchor"]) for p in accepted] == [
        ("a red square", "square"), ("a blue star", "star")]
    examples = [{"concept_prompt": "a red circle", "anchor_prompt": "a red square", "anchor": "square"}]
    assert ('{"original_prompt": "a red circle", "modified_prompt": "a red square", "replaced": "square"}'
            in pair_request_messages("circle", examples=examples)[1]["content"])


def test_run_pairs_writes_pairs_and_summary(tmp_path, capsys):
    parser = argparse.ArgumentParser()
    add_pairs_arguments(parser)
    out = tmp_path / "circle.jsonl"
    argv = ["--concept", "circle", "--n", "25", "--out", str(out), "--quiet", "--anchor", "square"]
    if EAR_DATA.is_dir():
        argv += ["--examples", str(EAR_DATA / "train_church.json")]
    summary = run_pairs(parser.parse_args(argv))
    assert summary["returned"] == 25 and len(load_pairs(out)) == 25
    assert json.loads(summary_path(out).read_text())["per_backend"]["template:builtin-templates"]["valid"] >= 25
    printed = capsys.readouterr().out
    assert '"returned": 25' in printed and "rejected_pairs" not in printed
    with pytest.raises(FileExistsError):
        run_pairs(parser.parse_args(argv))
    run_pairs(parser.parse_args(argv + ["--force"]))
