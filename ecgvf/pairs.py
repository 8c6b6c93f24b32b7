"""The ECGVF prompt-pair generator: target/replacement prompt pairs for a concept, asked of one or
more LLMs through one structured template, parsed, validated and written with their provenance.

EAR's benchmark builds its training pairs by asking LLMs for prompts that show a concept and the
same prompts with the concept replaced ("A church on a hill overlooking the sea" -> "A ground on
a hill overlooking the sea"). Here:

    messages = pair_request_messages("church", count=20)          # the template, filled
    backends = [TemplateBackend(), OpenAIChatBackend("http://127.0.0.1:8000/v1", "qwen2.5-7b")]
    pairs, summary = generate_pairs("church", backends=backends, n_pairs=200)
    write_generated(pairs, "church.jsonl", summary=summary)

Backends are small classes with `name`, `model` and `complete(messages, *, seed, temperature,
max_tokens) -> str`: `TemplateBackend` (offline, no LLM: sentence templates x scene words x
replacement words), `OpenAIChatBackend` (any OpenAI-compatible /chat/completions server, standard
library only) and `TransformersBackend` (a local causal LM folder).

Nothing a backend says can crash a run: a reply without a JSON list of pairs is retried with
another seed, then dropped and counted as malformed; a backend failure (HTTP error, timeout,
non-JSON body, an exception in generation) is counted the same way; every pair that fails
validation is kept in the summary with its reason.

Each written line is earkit's pairs JSONL (concept_prompt, anchor_prompt, concept, anchor), so
`earkit.engine.pair_files.load_pairs` reads it, plus provenance: backend, model, template, seed, attempt.
"""

from __future__ import annotations

import argparse
import difflib
import http.client
import itertools
import json
import math
import os
import random
import re
import socket
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

from earkit.io import UnreadableJSON, encode_utf8, parse_json, unencodable, write_files_atomic

TEMPLATE_NAME = "ecgvf-pairs"
TEMPLATE_VERSION = 1
TEMPLATE = f"{TEMPLATE_NAME}/v{TEMPLATE_VERSION}"  # recorded on every pair: bump it when the wording changes

# The marker of the machine-readable request line in the user message. LLMs read the prose around
# it; TemplateBackend reads only this line, so every backend gets the same messages.
REQUEST_MARKER = "Request (JSON): "

# Rejection reasons, in the order the checks run (the summary counts each).
NOT_AN_OBJECT = "not an object"
MISSING_FIELD = "missing field"
INVALID_TEXT = "not valid Unicode text"  # a lone surrogate ("\ud800" in the JSON): no file or tokenizer takes it
IDENTICAL = "identical"
CONCEPT_MISSING = "concept missing from original"
CONCEPT_IN_MODIFIED = "concept in modified"
REPLACEMENT_MISSING = "replacement missing from modified"
REWRITTEN = "sentence rewritten"
DUPLICATE = "duplicate"
REJECTION_REASONS = (NOT_AN_OBJECT, MISSING_FIELD, INVALID_TEXT, IDENTICAL, CONCEPT_MISSING, CONCEPT_IN_MODIFIED,
                     REPLACEMENT_MISSING, REWRITTEN, DUPLICATE)

# Field names a reply may use: the template asks for EAR's, earkit's own are accepted too.
ORIGINAL_KEYS = ("original_prompt", "concept_prompt")
MODIFIED_KEYS = ("modified_prompt", "anchor_prompt")
REPLACED_KEYS = ("replaced", "anchor", "replacement")

DEFAULT_MIN_SIMILARITY = 0.75

# The longest a request may take. A day is already a stuck server, and waits near 1e10 s overflow
# the socket and timer clocks.
MAX_TIMEOUT = 24 * 3600.0


class BackendError(RuntimeError):
    """A backend could not produce a reply (HTTP error, timeout, unreadable body, generation failure)."""


class MalformedReply(ValueError):
    """A reply holds no JSON list of pairs."""


# ---------------------------------------------------------------- the template

PERSONA = (
    "You are a careful data annotator for research on erasing concepts from text-to-image models. "
    "You write short, concrete, visual image-generation prompts and their minimally edited counterparts."
)

RULES = """Rules:
1. Each original prompt describes one picture and contains the concept word exactly as given (a plural is fine).
2. The modified prompt is the original prompt with only the concept word(s) replaced by the replacement; every other word stays the same, in the same order.
3. The modified prompt must not contain the concept, a synonym of it, or a part of it.
4. The replacement is a concrete, visually different thing that fits the same scene; it is recorded in "replaced".
5. Prompts are single sentences of 4 to 25 words. Vary scenes, settings, styles, viewpoints and replacements; never repeat a prompt.
6. Answer with the JSON list only: no prose, no explanation, no code fence."""

OUTPUT_SCHEMA = """Output format: a JSON list with one object per pair, each with exactly these string fields:
[{"original_prompt": "...", "modified_prompt": "...", "replaced": "..."}]"""

# Few-shot examples: the first two from EAR's released train_church.json, one in ShapesWorld's words.
DEFAULT_EXAMPLES = (
    {"original_prompt": "The church is surrounded by a peaceful garden.",
     "modified_prompt": "The cinema is surrounded by a peaceful garden.", "replaced": "cinema"},
    {"original_prompt": "The grand church stands tall in the city center.",
     "modified_prompt": "The grand skyscraper stands tall in the city center.", "replaced": "skyscraper"},
    {"original_prompt": "a photo of a small red circle on a white background",
     "modified_prompt": "a photo of a small red square on a white background", "replaced": "square"},
)


def pair_request_messages(concept: str, *, count: int = 20, replacements=None, style_hints=None,
                          examples=None) -> list[dict]:
    """The structured template filled for one concept: chat messages (system: persona, rules,
    output schema; user: objective, examples, the request as one JSON line)."""
    concept = _check_concept(concept)
    if not isinstance(count, int) or count < 1:
        raise ValueError(f"count must be a positive integer, got {count!r}")
    replacements = _word_list(replacements, "replacements")
    style_hints = _word_list(style_hints, "style_hints")
    examples = list(DEFAULT_EXAMPLES if examples is None else examples)

    objective = (f'Objective: write {count} different pairs for the concept "{concept}". In each pair, the '
                 f'original prompt shows a "{concept}"; the modified prompt is the same sentence with '
                 f'"{concept}" replaced by something else.')
    lines = [objective]
    if replacements:
        lines.append("Choose each replacement from: " + ", ".join(replacements) + ".")
    if style_hints:
        lines.append("Style: " + "; ".join(style_hints) + ".")
    if examples:
        shown = [{"original_prompt": e["original_prompt"], "modified_prompt": e["modified_prompt"],
                  "replaced": e.get("replaced") or ""} for e in examples]
        lines.append("Examples (for another concept or the same one; do not copy them):\n[\n"
                     + ",\n".join(json.dumps(example, ensure_ascii=False) for example in shown) + "\n]")
    request = {"concept": concept, "count": count, "replacement_candidates": replacements, "style_hints": style_hints}
    lines.append(REQUEST_MARKER + json.dumps(request, ensure_ascii=False))
    lines.append(f"Answer with the JSON list of {count} pairs only.")
    return [
        {"role": "system", "content": "\n\n".join([PERSONA, RULES, OUTPUT_SCHEMA])},
        {"role": "user", "content": "\n\n".join(lines)},
    ]


def request_from_messages(messages) -> dict:
    """The JSON request line pair_request_messages put in the messages."""
    for message in reversed(list(messages or [])):
        content = message.get("content") if isinstance(message, dict) else None
        if isinstance(content, str):
            for line in content.splitlines():
                if line.startswith(REQUEST_MARKER):
                    try:
                        return parse_json(line[len(REQUEST_MARKER):], "the request line")
                    except ValueError as error:
                        raise BackendError(f"the request line of the messages is not JSON: {error}") from None
    raise BackendError("the messages hold no request line: build them with pair_request_messages")


def load_examples(path, limit: int = 3) -> list[dict]:
    """Few-shot examples from a pairs file (earkit JSONL or a released EAR train_* file), read with
    earkit.engine.pair_files.load_pairs: the first `limit` pairs, as the template's example objects."""
    from earkit.engine.pair_files import load_pairs

    examples = []
    for pair in load_pairs(path)[:limit]:
        replaced = pair.anchor
        if replaced is None and pair.concept:
            replaced = infer_replacement(pair.concept_prompt, pair.anchor_prompt, pair.concept)
        examples.append({"original_prompt": pair.concept_prompt, "modified_prompt": pair.anchor_prompt,
                         "replaced": replaced or ""})
    return examples


def _check_concept(concept) -> str:
    if not isinstance(concept, str) or not concept.strip():
        raise ValueError(f"concept must be a non-empty word or phrase, got {concept!r}")
    _check_unicode(concept, "concept")
    return " ".join(concept.split())


def _check_unicode(text: str, what: str) -> None:
    # A lone surrogate (a command-line byte that is not UTF-8 arrives as one) would be written on
    # every pair and fail the write after the whole run: refuse it before the first request.
    bad = unencodable(text)
    if bad is not None:
        raise ValueError(f"{what} {ascii(text)} is not valid Unicode text (it holds {ascii(bad)}; not UTF-8 input?)")


def _word_list(values, what: str) -> list[str]:
    if values is None:
        return []
    if isinstance(values, str):
        raise ValueError(f"{what} must be a list of strings, got the single string {values!r}")
    words = []
    for value in values:
        if not isinstance(value, str) or not value.strip():
            raise ValueError(f"{what} holds {value!r}, not a non-empty string")
        _check_unicode(value, f"{what} entry")
        words.append(" ".join(value.split()))
    return list(dict.fromkeys(words))


# ---------------------------------------------------------------- backends


class TemplateBackend:
    """Offline, no LLM: pairs composed from sentence templates x scene words x replacement words,
    returned as the JSON list an LLM would write (so they go through the same parser and checks).

    A ShapesWorld shape or colour ("circle", "red") is put into ShapesWorld's own caption templates
    with its colours, sizes and backgrounds, and replaced by another shape (colour), so every word
    is one the ShapesWorld tokenizer knows. Any other concept goes into generic scene templates.
    Deterministic from the seed.
    """

    name = "template"
    model = "builtin-templates"

    GENERIC_TEMPLATES = (
        # "a" never sits right before {concept}, so "a"/"an" never depends on the word put there.
        "a photo of the {concept} {place}",
        "a {adjective} {concept} {place}",
        "the {adjective} {concept} {place} {time}",
        "a {medium} of a {adjective} {concept}",
        "a {medium} of the {concept} {place}",
        "there is a {adjective} {concept} {place}",
        "the {concept} {place} {time}",
        "a close-up photo of a {adjective} {concept} {time}",
        "a {medium} of a {adjective} {concept} {place} {time}",
    )
    ADJECTIVES = ("small", "large", "beautiful", "quiet", "famous", "colorful", "modern", "weathered", "lonely",
                  "tall")
    PLACES = ("on a hill", "in the city", "by the sea", "in a forest", "near a river", "in the snow",
              "on a quiet street", "in a small village", "under a clear sky", "in a field of flowers")
    TIMES = ("at sunset", "at night", "in the morning", "in winter", "on a rainy day", "in autumn")
    MEDIA = ("photo", "painting", "watercolor painting", "pencil sketch", "digital illustration", "drawing")
    GENERIC_REPLACEMENTS = ("house", "tree", "tower", "bridge", "boat", "car", "statue", "lighthouse")

    def complete(self, messages, *, seed: int, temperature: float = 0.0, max_tokens: int = 0) -> str:
        request = request_from_messages(messages)
        concept, count = request["concept"], int(request["count"])
        candidates = [word for word in request.get("replacement_candidates") or []
                      if not concept_pattern(concept).search(word)]
        rng = random.Random(seed)
        compose = self._shapes_world_composer(concept, candidates) or self._generic_composer(concept, candidates)
        pairs, seen = [], set()
        for _ in range(50 * count):  # the combinations are many; this only bounds a tiny word list
            if len(pairs) == count:
                break
            pair = compose(rng)
            if pair["original_prompt"] not in seen:
                seen.add(pair["original_prompt"])
                pairs.append(pair)
        return json.dumps(pairs)

    @staticmethod
    def _shapes_world_composer(concept: str, candidates: list[str]):
        from earkit.engine.shapesworld.render import BACKGROUNDS, CAPTION_TEMPLATES, COLOURS, SHAPES, SIZES

        word = concept.lower()
        if word in SHAPES:
            slot, others = "shape", [shape for shape in SHAPES if shape != word]
        elif word in COLOURS:
            slot, others = "colour", [colour for colour in COLOURS if colour != word]
        else:
            return None
        replacements = candidates or others

        def compose(rng: random.Random) -> dict:
            template = rng.choice(CAPTION_TEMPLATES)
            words = {"shape": rng.choice(SHAPES), "colour": rng.choice(list(COLOURS)),
                     "size": rng.choice(list(SIZES)), "background": rng.choice(list(BACKGROUNDS))}
            replaced = rng.choice(replacements)
            return {"original_prompt": template.format(**{**words, slot: word}),
                    "modified_prompt": template.format(**{**words, slot: replaced}), "replaced": replaced}

        return compose

    def _generic_composer(self, concept: str, candidates: list[str]):
        replacements = candidates or [word for word in self.GENERIC_REPLACEMENTS
                                      if not concept_pattern(concept).search(word)]

        def compose(rng: random.Random) -> dict:
            template = rng.choice(self.GENERIC_TEMPLATES)
            words = {"adjective": rng.choice(self.ADJECTIVES), "place": rng.choice(self.PLACES),
                     "time": rng.choice(self.TIMES), "medium": rng.choice(self.MEDIA)}
            replaced = rng.choice(replacements)
            return {"original_prompt": template.format(concept=concept, **words),
                    "modified_prompt": template.format(concept=replaced, **words), "replaced": replaced}

        return compose


def check_timeout(timeout, name: str = "timeout") -> float:
    """`timeout` as float seconds: a number > 0 and at most MAX_TIMEOUT (nan, inf, 0 and negatives
    are refused: nan compares false with everything, so it would wait forever unnoticed)."""
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not 0 < timeout <= MAX_TIMEOUT:
        raise ValueError(f"{name} must be seconds, a number > 0 and at most {MAX_TIMEOUT:g} (a day), got {timeout!r}")
    return float(timeout)


def origin(url: str) -> tuple:
    """(scheme, host, port) of a URL, the port filled in for http and https: where a request goes.
    A port that is not a port gives an origin no other URL shares."""
    parts = urllib.parse.urlsplit(url)
    scheme = parts.scheme.lower()
    try:
        port = parts.port or {"http": 80, "https": 443}.get(scheme)
    except ValueError:
        return (scheme, parts.hostname, object())
    return (scheme, parts.hostname, port)


class SameOriginRedirects(urllib.request.HTTPRedirectHandler):
    """Redirects for a POST that carries an API key: a 307 or 308 to the same origin (scheme, host,
    port; a path moved on the same server) is followed with the same method, body and headers, key
    included. Everything else is a BackendError naming where the server pointed, with nothing sent
    there: another origin (another host or port, or https -> http) would get the key, which urllib
    would otherwise send to wherever a redirect names; and a 301/302/303 would turn the POST into a
    GET without its body, which no chat server answers."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        if origin(newurl) != origin(req.full_url):
            fp.close()
            raise BackendError(f"HTTP {code} from {req.full_url}: redirected to {newurl}, another origin: not "
                               "followed, the API key goes only where --backend points (point it there if you "
                               "trust that server)")
        if code not in (307, 308):
            fp.close()
            raise BackendError(f"HTTP {code} from {req.full_url}: redirected to {newurl}: not followed, a {code} "
                               "would turn the POST into a GET without its body (point --backend there)")
        return urllib.request.Request(newurl, data=req.data, headers=dict(req.headers),
                                      origin_req_host=req.origin_req_host, unverifiable=True, method=req.get_method())

    # Python 3.10's handler has no 308: name every code, so each goes through redirect_request.
    http_error_301 = http_error_302 = http_error_303 = http_error_307 = http_error_308 = (
        urllib.request.HTTPRedirectHandler.http_error_302)


class RequestDeadline:
    """One wall-clock limit for a whole HTTP request: connecting, the status line and headers, the
    body, and a redirect followed. A socket timeout bounds each read only, so a server that sends a
    byte a second would hold a request, and the run, forever. At the deadline a watchdog timer
    shuts the request's sockets down, which ends whatever read is waiting."""

    def __init__(self, seconds: float):
        self.seconds = seconds
        self.end = time.monotonic() + seconds
        self.expired = False
        self._sockets = []
        self._lock = threading.Lock()
        self._timer = threading.Timer(seconds, self._expire)
        self._timer.daemon = True
        self._timer.start()

    def remaining(self) -> float:
        return self.end - time.monotonic()

    def watch(self, sock) -> None:
        with self._lock:
            self._sockets.append(sock)
            if self.expired:
                self._shut(sock)

    def _expire(self) -> None:
        with self._lock:
            self.expired = True
            for sock in self._sockets:
                self._shut(sock)

    @staticmethod
    def _shut(sock) -> None:
        try:  # the OS socket itself (under TLS too, without touching the TLS state another thread is in)
            socket.socket.shutdown(sock, socket.SHUT_RDWR)
        except OSError:
            pass  # closed already, or detached when TLS took it over (that TLS socket is watched too)

    def cancel(self) -> None:
        self._timer.cancel()

    def connection_class(self, base):
        """`base` (http.client.HTTPConnection or HTTPSConnection) whose sockets this deadline watches."""
        deadline = self

        class Watched(base):
            def connect(self):
                left = deadline.remaining()
                if deadline.expired or left <= 0:
                    raise TimeoutError("the request's time ran out")
                # The connect, and a TLS handshake as a whole (ssl bounds each call by the socket
                # timeout, not each read), wait at most the time left; then the watchdog takes over.
                self.timeout = left
                super().connect()
                deadline.watch(self.sock)

        return Watched


class _DeadlineHandler:
    """Mixed into urllib's HTTP(S) handlers: their connections are watched by `deadline`."""

    def __init__(self, deadline: RequestDeadline, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.deadline = deadline

    def do_open(self, http_class, req, **kwargs):
        return super().do_open(self.deadline.connection_class(http_class), req, **kwargs)


class _DeadlineHTTPHandler(_DeadlineHandler, urllib.request.HTTPHandler):
    pass


class _DeadlineHTTPSHandler(_DeadlineHandler, urllib.request.HTTPSHandler):
    pass


class OpenAIChatBackend:
    """An OpenAI-compatible chat server (OpenAI, a local vLLM or llama.cpp server, ...):
    POST {base_url}/chat/completions, standard library only. Every failure is a BackendError.

    `timeout` bounds each whole request (connect, headers, body), not each read. The API key is
    sent only to the origin of base_url: a redirect elsewhere is a BackendError (SameOriginRedirects)."""

    name = "openai"

    def __init__(self, base_url: str, model: str, api_key: str | None = None, timeout: float = 120.0):
        if not isinstance(base_url, str) or not re.match(r"https?://", base_url):
            raise ValueError(f"base_url must be an http(s) URL such as http://127.0.0.1:8000/v1, got {base_url!r}")
        if not isinstance(model, str) or not model.strip():
            raise ValueError(f"model must be the server's model name, got {model!r}")
        self.timeout = check_timeout(timeout)
        self.base_url = base_url.rstrip("/")
        self.url = self.base_url + "/chat/completions"
        self.model = model.strip()
        self.api_key = api_key

    def post(self, data: bytes, headers: dict) -> bytes:
        """The body of the answer to one POST to self.url, within self.timeout all told."""
        too_late = f"no complete answer from {self.url} within {self.timeout:g} s"
        deadline = RequestDeadline(self.timeout)
        opener = urllib.request.build_opener(_DeadlineHTTPHandler(deadline), _DeadlineHTTPSHandler(deadline),
                                             SameOriginRedirects())
        request = urllib.request.Request(self.url, data=data, headers=headers, method="POST")
        try:
            with opener.open(request, timeout=self.timeout) as response:
                raw = response.read()
        except urllib.error.HTTPError as error:  # before URLError: it is one
            try:
                detail = _short(error.read().decode("utf-8", "replace")) if error.fp else ""
            except (OSError, ValueError, http.client.HTTPException):
                detail = ""
            if deadline.expired:
                raise BackendError(too_late) from None
            raise BackendError(f"HTTP {error.code} from {self.url}: {detail or error.reason}") from None
        except urllib.error.URLError as error:
            if deadline.expired or isinstance(error.reason, (socket.timeout, TimeoutError)):
                raise BackendError(too_late) from None
            raise BackendError(f"cannot reach {self.url}: {error.reason}") from None
        except (socket.timeout, TimeoutError):  # a timeout while reading the body is not wrapped in URLError
            raise BackendError(too_late) from None
        except (OSError, ValueError, http.client.HTTPException) as error:  # reset, bad status line, cut body, ...
            if deadline.expired:
                raise BackendError(too_late) from None
            raise BackendError(f"request to {self.url} failed: {type(error).__name__}: {error}") from None
        finally:
            deadline.cancel()
        if deadline.expired:  # a body without a length ends at the shutdown, cut short but without an error
            raise BackendError(too_late)
        return raw

    def complete(self, messages, *, seed: int, temperature: float, max_tokens: int) -> str:
        body = {"model": self.model, "messages": list(messages), "temperature": float(temperature),
                "seed": int(seed), "max_tokens": int(max_tokens)}
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        raw = self.post(json.dumps(body).encode("utf-8"), headers)
        try:
            document = parse_json(raw.decode("utf-8"), self.url)
        except UnreadableJSON as error:  # nested too deeply, or a number too long
            raise BackendError(f"{self.url} answered {error}") from None
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise BackendError(f"{self.url} answered with a non-JSON body: {_short(raw.decode('utf-8', 'replace'))}") \
                from None
        try:
            content = document["choices"][0]["message"]["content"]
        except (KeyError, IndexError, TypeError):
            # the body as it came, not json.dumps(document): that recurses as deep as the server nested it
            raise BackendError(f"{self.url} answered JSON without choices[0].message.content: "
                               f"{_short(raw.decode('utf-8', 'replace'))}") from None
        if not isinstance(content, str):
            raise BackendError(f"{self.url} answered a {type(content).__name__} as the message content")
        return content


class TransformersBackend:
    """A local transformers causal LM folder (AutoModelForCausalLM + AutoTokenizer): the tokenizer's
    chat template when it has one, else the messages as plain "role: content" text; greedy at
    temperature 0, else sampling seeded per call. CPU by default."""

    name = "transformers"

    def __init__(self, folder, *, device: str = "cpu", dtype=None):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        folder = Path(folder).expanduser()
        if not folder.is_dir():
            raise FileNotFoundError(f"language model folder {folder} does not exist")
        self.folder = folder
        self.model = folder.name  # the name recorded on each pair
        self.device = torch.device(device)
        self.tokenizer = AutoTokenizer.from_pretrained(folder)
        self.language_model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype or torch.float32)
        self.language_model.to(self.device).eval()
        pad = self.tokenizer.pad_token_id
        self.pad_token_id = pad if pad is not None else self.tokenizer.eos_token_id  # generate() warns without one

    def prompt_ids(self, messages):
        if getattr(self.tokenizer, "chat_template", None):
            text = self.tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=True)
            encoded = self.tokenizer(text, return_tensors="pt", add_special_tokens=False)
        else:
            text = "\n\n".join(f"{m['role']}: {m['content']}" for m in messages) + "\n\nassistant:"
            encoded = self.tokenizer(text, return_tensors="pt")
        return encoded["input_ids"].to(self.device), encoded["attention_mask"].to(self.device)

    def complete(self, messages, *, seed: int, temperature: float, max_tokens: int) -> str:
        import torch

        try:
            input_ids, attention_mask = self.prompt_ids(messages)
            options = dict(max_new_tokens=int(max_tokens), do_sample=temperature > 0,
                           pad_token_id=self.pad_token_id)
            if temperature > 0:
                options.update(temperature=float(temperature), top_k=0, top_p=1.0)
            cuda = [self.device.index or 0] if self.device.type == "cuda" else []
            with torch.random.fork_rng(devices=cuda), torch.no_grad():  # seed this call, leave the caller's RNG be
                torch.manual_seed(seed)
                output = self.language_model.generate(input_ids, attention_mask=attention_mask, **options)
        except Exception as error:  # noqa: BLE001 - anything generation raises is this backend failing
            raise BackendError(f"generation with {self.folder} failed: {type(error).__name__}: {error}") from error
        return self.tokenizer.decode(output[0, input_ids.shape[1]:], skip_special_tokens=True)


def _short(text: str, limit: int = 200) -> str:
    """Text for the summary and messages: one line, at most `limit` characters, and writable (a lone
    surrogate, which a reply's JSON escape can hold, becomes the escape text \\udXXX again)."""
    text = " ".join(str(text).split())
    text = text if len(text) <= limit else text[:limit] + "..."
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


# ---------------------------------------------------------------- parsing replies


CLOSING_BRACKET_AHEAD = re.compile(r"\s*[\]}]")


def without_trailing_commas(text: str) -> str:
    """The text with each comma that only precedes a closing bracket removed, outside strings
    (the one JSON slip that is safe to repair)."""
    kept, in_string, escaped = [], False, False
    for index, char in enumerate(text):
        if in_string:
            if escaped:
                escaped = False
            elif char == "\\":
                escaped = True
            elif char == '"':
                in_string = False
        elif char == '"':
            in_string = True
        elif char == "," and CLOSING_BRACKET_AHEAD.match(text, index + 1):
            continue
        kept.append(char)
    return "".join(kept)


def _as_pair_list(value, *, single: bool = False):
    """The list of pair objects a decoded JSON value holds, or None: a list holding at least one
    object, or {"pairs": [...]} (an object with one list of objects as a value); with `single`,
    also one bare pair object."""
    if isinstance(value, list):
        return value if any(isinstance(item, dict) for item in value) else None
    if isinstance(value, dict):
        if single and any(key in value for key in ORIGINAL_KEYS):
            return [value]
        lists = [item for item in value.values() if isinstance(item, list) and any(isinstance(x, dict) for x in item)]
        return lists[0] if len(lists) == 1 else None
    return None


def _salvage_objects(text: str, start: int) -> list:
    """The complete objects at the head of a list cut off mid-way (a reply that ran out of tokens)."""
    objects, position = [], start + 1
    while True:
        while position < len(text) and text[position] in " \t\r\n,":
            position += 1
        if position >= len(text) or text[position] != "{":
            return objects
        try:
            value, position = parse_json(text, "the reply", start=position)
        except ValueError:  # malformed, or nested too deeply
            return objects
        objects.append(value)


def extract_pair_list(reply) -> tuple[list, bool]:
    """(the list of pair objects in an LLM reply, whether it was salvaged from a cut-off list).

    Tolerated: code fences, prose before or after, trailing commas, {"pairs": [...]}, a list cut
    off after complete objects. MalformedReply when no such list is there (an empty list included:
    it gives nothing, and is retried like any other useless reply). A reply whose JSON is nested
    too deeply to read ("[" * 100000), or with a number too long to read, is malformed too, said so."""
    if not isinstance(reply, str) or not reply.strip():
        raise MalformedReply("empty reply")
    unreadable = []  # why a decode failed other than malformed JSON, for the message when nothing is found
    fenced = re.findall(r"```[A-Za-z]*\s*\n?(.*?)```", reply, flags=re.DOTALL)
    texts = fenced + [reply]

    def decoded_from(text: str, opening: str):
        """Each JSON value that starts at an `opening` bracket, as written and with trailing commas
        removed (lazily: the first good one usually ends the search)."""
        for source in (text, without_trailing_commas(text)):
            for match in itertools.islice(re.finditer(re.escape(opening), source), 200):
                try:
                    yield parse_json(source, "the reply", start=match.start())[0]
                except json.JSONDecodeError:
                    continue
                except UnreadableJSON as error:
                    unreadable.append(str(error).removeprefix("the reply: "))
                    continue

    # In order of trust: a whole list (or a {"pairs": [...]} wrapper), the complete objects of a
    # list cut off mid-way, a single bare pair object.
    for text in texts:
        for value in itertools.chain(decoded_from(text, "["), decoded_from(text, "{")):
            pairs = _as_pair_list(value)
            if pairs is not None:
                return pairs, False
    for text in texts:
        start = text.find("[")
        objects = _salvage_objects(text, start) if start >= 0 else []
        if objects:
            return objects, True
    for text in texts:
        for value in decoded_from(text, "{"):
            pairs = _as_pair_list(value, single=True)
            if pairs is not None:
                return pairs, False
    if unreadable:
        raise MalformedReply(unreadable[0])
    if re.search(r"\[\s*\]", reply):
        raise MalformedReply("an empty list")
    raise MalformedReply("no JSON list of pairs in the reply")


# ---------------------------------------------------------------- validating pairs

TOKEN = re.compile(r"\w+|[^\w\s]")


def concept_pattern(concept: str) -> re.Pattern:
    """The concept as whole words, any case, any whitespace between its words, plural tolerated
    (circle/circles, church/churches, city/cities); a possessive ("church's") matches too."""
    words = concept.split()
    last = words[-1]
    forms = [re.escape(last) + "(?:s|es)?"]
    if len(last) > 1 and last[-1].lower() == "y":
        forms.append(re.escape(last[:-1]) + "ies")
    head = "".join(re.escape(word) + r"\s+" for word in words[:-1])
    return re.compile(r"(?<!\w)" + head + "(?:" + "|".join(forms) + r")(?!\w)", re.IGNORECASE)


def normalised(text: str) -> str:
    """Lower case words and numbers only: what makes two prompts the same prompt."""
    return " ".join(re.findall(r"\w+", text.casefold()))


def _tokens(text: str) -> list[str]:
    # "an" before a vowel and "a" before a consonant are one word: swapping "apple" for "pear"
    # changes the article, not the sentence.
    return ["a" if token == "an" else token for token in TOKEN.findall(text.casefold())]


def similarity_without(original: str, modified: str, concept: str, replaced: str | None) -> float:
    """How much of the sentence the modified prompt kept: the token-level match ratio (difflib)
    of the two prompts after the concept is removed from the original and the replacement from the
    modified prompt. 1.0 for a pure replacement."""
    rest_of_original = _tokens(concept_pattern(concept).sub(" ", original))
    rest_of_modified = _tokens(concept_pattern(replaced).sub(" ", modified) if replaced else modified)
    if not rest_of_original and not rest_of_modified:
        return 1.0
    return difflib.SequenceMatcher(None, rest_of_original, rest_of_modified, autojunk=False).ratio()


def infer_replacement(original: str, modified: str, concept: str) -> str | None:
    """The words of the modified prompt that stand where the concept stood in the original (for a
    pair whose reply left "replaced" out); None when the concept was only deleted."""
    original_tokens, modified_tokens = TOKEN.findall(original), TOKEN.findall(modified)
    pattern = concept_pattern(concept)
    concept_tokens = {token.casefold() for match in pattern.finditer(original) for token in TOKEN.findall(match[0])}
    matcher = difflib.SequenceMatcher(None, [t.casefold() for t in original_tokens],
                                      [t.casefold() for t in modified_tokens], autojunk=False)
    for tag, i1, i2, j1, j2 in matcher.get_opcodes():
        if tag == "replace" and any(t.casefold() in concept_tokens for t in original_tokens[i1:i2]):
            return " ".join(modified_tokens[j1:j2]) or None
    return None


def _field(item: dict, keys: tuple[str, ...]):
    for key in keys:
        if key in item:
            return item[key]
    return None


def check_pair(item, concept: str, *, min_similarity: float = DEFAULT_MIN_SIMILARITY):
    """(the cleaned pair {original_prompt, modified_prompt, replaced, similarity}, None), or
    (None, the reason it is rejected). Duplicates are found by validate_items, not here."""
    if not isinstance(item, dict):
        return None, NOT_AN_OBJECT
    original, modified, replaced = (_field(item, keys) for keys in (ORIGINAL_KEYS, MODIFIED_KEYS, REPLACED_KEYS))
    if not isinstance(original, str) or not original.strip() or not isinstance(modified, str) or not modified.strip():
        return None, MISSING_FIELD
    if any(isinstance(text, str) and unencodable(text) is not None for text in (original, modified, replaced)):
        return None, INVALID_TEXT
    original, modified = " ".join(original.split()), " ".join(modified.split())
    replaced = " ".join(replaced.split()) if isinstance(replaced, str) and replaced.strip() else None
    pattern = concept_pattern(concept)
    if normalised(original) == normalised(modified):
        return None, IDENTICAL
    if not pattern.search(original):
        return None, CONCEPT_MISSING
    if pattern.search(modified):
        return None, CONCEPT_IN_MODIFIED
    if replaced is None:
        replaced = infer_replacement(original, modified, concept)
    elif not concept_pattern(replaced).search(modified):
        return None, REPLACEMENT_MISSING
    similarity = similarity_without(original, modified, concept, replaced)
    if similarity < min_similarity:
        return None, REWRITTEN
    return {"original_prompt": original, "modified_prompt": modified, "replaced": replaced,
            "similarity": round(similarity, 4)}, None


def validate_items(items, concept: str, *, seen: set | None = None,
                   min_similarity: float = DEFAULT_MIN_SIMILARITY) -> tuple[list[dict], list[dict]]:
    """(accepted pairs, rejected pairs with their "reason") for the objects of one reply; `seen`
    (the normalised pairs accepted so far, updated here) removes duplicates across replies."""
    seen = set() if seen is None else seen
    accepted, rejected = [], []
    for item in items:
        pair, reason = check_pair(item, concept, min_similarity=min_similarity)
        if pair is not None:
            key = (normalised(pair["original_prompt"]), normalised(pair["modified_prompt"]))
            if key in seen:
                pair, reason = None, DUPLICATE
            else:
                seen.add(key)
                accepted.append(pair)
        if pair is None:
            shown = item if isinstance(item, dict) else {"value": item}
            record = {_short(key, 80): _recorded(value) for key, value in shown.items() if isinstance(key, str)}
            rejected.append({**record, "reason": reason})
    return accepted, rejected


def _recorded(value):
    """A rejected pair's field as the summary keeps it: text and numbers as they are (a lone
    surrogate as its escape text, so the summary can be written), a list or an object only as its
    kind and length: a reply may nest one thousands deep, which json.dumps cannot write."""
    if isinstance(value, str):
        return value.encode("utf-8", "backslashreplace").decode("utf-8")
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # NaN would make the summary JSON that only Python reads
    if value is None or isinstance(value, (bool, int, float)):
        return value
    kind = "list" if isinstance(value, list) else "object" if isinstance(value, dict) else type(value).__name__
    return f"<a JSON {kind}" + (f" of {len(value)}>" if isinstance(value, (list, dict)) else ">")


# ---------------------------------------------------------------- the run


def request_seed(seed: int, backend_label: str, request: int, attempt: int) -> int:
    """A seed per (run seed, backend, request, attempt): a retry asks again with another seed, and
    the same run seed asks the same questions."""
    return random.Random(f"{seed}/{backend_label}/{request}/{attempt}").randrange(2**31)


def _backend_labels(backends) -> list[str]:
    labels, used = [], {}
    for backend in backends:
        for attribute in ("name", "model"):
            if not isinstance(getattr(backend, attribute, None), str):
                raise ValueError(f"backend {backend!r} has no string {attribute!r}")
        if not callable(getattr(backend, "complete", None)):
            raise ValueError(f"backend {backend!r} has no complete(messages, *, seed, temperature, max_tokens)")
        label = f"{backend.name}:{backend.model}"
        used[label] = used.get(label, 0) + 1
        labels.append(label if used[label] == 1 else f"{label}#{used[label]}")
    return labels


def generate_pairs(concept: str, *, backends, n_pairs: int, seed: int = 0, retries: int = 2, anchors=None,
                   progress: bool = True, style_hints=None, examples=None, pairs_per_request: int = 20,
                   temperature: float = 0.7, max_tokens: int = 2048, min_similarity: float = DEFAULT_MIN_SIMILARITY,
                   max_requests: int | None = None, patience: int = 3,
                   max_failed_requests: int = 3) -> tuple[list[dict], dict]:
    """Ask the backends, in turn, for pairs for `concept` until `n_pairs` valid distinct ones are in.

    Each request asks one backend for `pairs_per_request` pairs through pair_request_messages
    (anchors are the replacement candidates offered). A malformed reply or a backend error is
    retried up to `retries` times with another seed, then the request is given up; a backend whose
    last `max_failed_requests` requests all failed is retired. The run stops when it has n_pairs,
    when every backend is retired, after `max_requests` requests (default: 3 per 20 pairs wanted
    per backend, at least 5 per backend), or after `patience` rounds without a new pair.

    Returns (pairs, summary): at most n_pairs records {concept_prompt, anchor_prompt, concept,
    anchor, backend, model, template, seed, attempt}, and counts of everything that happened.
    """
    concept = _check_concept(concept)
    backends = [backends] if hasattr(backends, "complete") else list(backends or [])
    if not backends:
        raise ValueError("no backends: give at least one (TemplateBackend() works offline)")
    integers = (("n_pairs", n_pairs, 1), ("retries", retries, 0), ("pairs_per_request", pairs_per_request, 1),
                ("max_tokens", max_tokens, 1), ("patience", patience, 1), ("max_failed_requests", max_failed_requests, 1))
    for name, value, least in integers:
        if not isinstance(value, int) or isinstance(value, bool) or value < least:
            raise ValueError(f"{name} must be an integer >= {least}, got {value!r}")
    if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature >= 0):
        raise ValueError(f"temperature must be a finite number >= 0, got {temperature!r}")
    if not 0.0 <= min_similarity <= 1.0:
        raise ValueError(f"min_similarity must be in [0, 1], got {min_similarity!r}")
    anchors = _word_list(anchors, "anchors")
    for anchor in anchors:
        if concept_pattern(concept).search(anchor):
            raise ValueError(f"anchor {anchor!r} contains the concept {concept!r}: it would stay in the modified prompt")
    labels = _backend_labels(backends)
    if max_requests is None:
        max_requests = len(backends) * max(5, 3 * math.ceil(n_pairs / pairs_per_request))
    messages = pair_request_messages(concept, count=pairs_per_request, replacements=anchors,
                                     style_hints=style_hints, examples=examples)

    per_backend = {label: {"backend": backend.name, "model": backend.model, "requests": 0, "attempts": 0,
                           "received": 0, "valid": 0, "rejected": {}, "malformed_replies": 0, "salvaged_replies": 0,
                           "backend_errors": 0, "errors": [], "malformed_example": None, "retired": False}
                   for label, backend in zip(labels, backends)}
    failed_in_a_row = dict.fromkeys(labels, 0)
    accepted, rejected_pairs, seen = [], [], set()
    requests, stale_rounds, round_index, stopped = 0, 0, 0, None

    from tqdm.auto import tqdm

    bar = tqdm(total=n_pairs, desc=f"pairs for {concept!r}", unit="pair", disable=not progress, file=sys.stderr)
    try:
        while stopped is None:
            found_before = len(accepted)
            for label, backend in zip(labels, backends):
                counts = per_backend[label]
                if counts["retired"]:
                    continue
                if len(accepted) >= n_pairs:
                    break
                if requests >= max_requests:
                    break
                requests += 1
                counts["requests"] += 1
                request_index = counts["requests"] - 1
                for attempt in range(retries + 1):
                    call_seed = request_seed(seed, label, request_index, attempt)
                    counts["attempts"] += 1
                    try:
                        reply = backend.complete(messages, seed=call_seed, temperature=temperature,
                                                 max_tokens=max_tokens)
                    except Exception as error:  # noqa: BLE001 - a failing backend must not end the run
                        counts["backend_errors"] += 1
                        message = str(error) if isinstance(error, BackendError) else f"{type(error).__name__}: {error}"
                        if message not in counts["errors"] and len(counts["errors"]) < 5:
                            counts["errors"].append(message)
                        continue
                    try:
                        items, salvaged = extract_pair_list(reply)
                    except MalformedReply as error:
                        counts["malformed_replies"] += 1
                        if counts["malformed_example"] is None:
                            counts["malformed_example"] = f"{error}: {_short(str(reply))}"
                        continue
                    counts["salvaged_replies"] += salvaged
                    counts["received"] += len(items)
                    good, bad = validate_items(items, concept, seen=seen, min_similarity=min_similarity)
                    for pair in good:
                        accepted.append({
                            "concept_prompt": pair["original_prompt"], "anchor_prompt": pair["modified_prompt"],
                            "concept": concept, "anchor": pair["replaced"], "backend": backend.name,
                            "model": backend.model, "template": TEMPLATE, "seed": call_seed, "attempt": attempt,
                        })
                    for pair in bad:
                        counts["rejected"][pair["reason"]] = counts["rejected"].get(pair["reason"], 0) + 1
                        rejected_pairs.append({**pair, "backend": label, "seed": call_seed, "attempt": attempt})
                    counts["valid"] += len(good)
                    bar.update(min(len(good), max(0, n_pairs - bar.n)))
                    failed_in_a_row[label] = 0
                    break
                else:  # every attempt failed
                    failed_in_a_row[label] += 1
                    if failed_in_a_row[label] >= max_failed_requests:
                        counts["retired"] = True
            round_index += 1
            stale_rounds = 0 if len(accepted) > found_before else stale_rounds + 1
            if len(accepted) >= n_pairs:
                stopped = "enough pairs"
            elif all(counts["retired"] for counts in per_backend.values()):
                stopped = f"every backend retired after {max_failed_requests} failed requests in a row"
            elif requests >= max_requests:
                stopped = f"request budget spent ({max_requests} requests)"
            elif stale_rounds >= patience:
                stopped = f"no new pair in {patience} rounds"
    finally:
        bar.close()

    rejected_by_reason = {}
    for counts in per_backend.values():
        for reason, number in counts["rejected"].items():
            rejected_by_reason[reason] = rejected_by_reason.get(reason, 0) + number
    summary = {
        "concept": concept, "template": TEMPLATE, "seed": seed, "requested": n_pairs,
        "returned": min(n_pairs, len(accepted)),  # the pairs given back (the first n_pairs valid ones)
        "valid": len(accepted), "received": sum(c["received"] for c in per_backend.values()),
        "rejected": rejected_by_reason, "malformed_replies": sum(c["malformed_replies"] for c in per_backend.values()),
        "backend_errors": sum(c["backend_errors"] for c in per_backend.values()),
        "requests": requests, "rounds": round_index, "stopped": stopped, "anchors": anchors,
        "settings": {"retries": retries, "pairs_per_request": pairs_per_request, "temperature": temperature,
                     "max_tokens": max_tokens, "min_similarity": min_similarity, "max_requests": max_requests,
                     "patience": patience, "max_failed_requests": max_failed_requests},
        "per_backend": per_backend, "rejected_pairs": rejected_pairs,
    }
    return accepted[:n_pairs], summary


# ---------------------------------------------------------------- writing


def summary_path(path) -> Path:
    """Where write_generated puts the summary beside a pairs file: pairs.jsonl -> pairs.summary.json."""
    path = Path(path).expanduser()
    return path.with_name(path.stem + ".summary.json")


def is_pairs_summary(path: Path) -> bool:
    """A summary that `earkit pairs` wrote: a JSON object with its concept, template and counts."""
    try:
        record = parse_json(path.read_text(encoding="utf-8"), str(path))
    except (OSError, ValueError):
        return False
    return isinstance(record, dict) and {"concept", "template", "requested", "valid"} <= set(record)


def refuse_foreign_summary(path: Path) -> None:
    """--out names the pairs file and --force may replace it; the summary beside it is a name the
    user never typed, so it is replaced only when earkit pairs wrote it."""
    if path.exists() and not is_pairs_summary(path):
        raise FileExistsError(f"not replacing {path}: earkit pairs did not write it (it writes its summary there); "
                              "move it or choose another --out")


def _refuse_existing(path: Path, force: bool) -> None:
    if path.is_dir():
        raise IsADirectoryError(f"{path} is a folder, not a pairs file")
    if path.exists() and not force:
        raise FileExistsError(f"{path} already exists (pass force=True, or --force, to replace it)")


def write_generated(pairs, path, *, force: bool = False, summary: dict | None = None) -> Path:
    """Write generated pairs as JSON lines (load_pairs reads them); with `summary`, it goes beside
    them as <stem>.summary.json. Both or neither: everything is turned into bytes first, then the
    files are written atomically together (a summary never claims pairs that are not there, and a
    rerun is never refused over half an output). An existing file is replaced only with force."""
    pairs = list(pairs)
    if not pairs:
        raise ValueError("no pairs to write")
    path = Path(path).expanduser()
    lines = []
    for index, pair in enumerate(pairs):
        if not isinstance(pair, dict) or not all(isinstance(pair.get(key), str) and pair[key].strip()
                                                 for key in ("concept_prompt", "anchor_prompt")):
            raise ValueError(f"pairs[{index}] is not a generated pair with concept_prompt and anchor_prompt: {pair!r}")
        line = json.dumps(pair, ensure_ascii=False)
        bad = unencodable(line)
        if bad is not None:  # validate_items rejects these; a pair made elsewhere may still hold one
            raise ValueError(f"pairs[{index}] holds the lone surrogate {ascii(bad)}, which is not valid Unicode and "
                             f"cannot be written as UTF-8: {_short(line)} (nothing written)")
        lines.append(line)
    files = {path: encode_utf8("\n".join(lines) + "\n", path)}
    _refuse_existing(path, force)
    if summary is not None:
        _refuse_existing(summary_path(path), force)
        refuse_foreign_summary(summary_path(path))
        # backslashreplace writes a lone surrogate in a string as its JSON escape (\ud800), which
        # reads back as the same string: the summary is a record of what came back, kept whole.
        text = json.dumps(summary, ensure_ascii=False, indent=1) + "\n"
        files[summary_path(path)] = text.encode("utf-8", "backslashreplace")
    write_files_atomic(files)
    return path


# ---------------------------------------------------------------- command line

BACKEND_FORMS = "template | openai:URL:MODEL | transformers:FOLDER"


def parse_backend(spec: str, *, timeout: float = 120.0, api_key: str | None = None, device: str = "cpu"):
    """A backend from its command-line form: "template", "openai:URL:MODEL" (the URL's path has no
    colon: http://127.0.0.1:8000/v1:qwen2.5:7b is that URL and model qwen2.5:7b), "transformers:FOLDER"."""
    if spec == "template":
        return TemplateBackend()
    kind, _, rest = spec.partition(":")
    if kind == "openai":
        # Read left to right, never backtracking: scheme://host, then a port (":digits" before "/",
        # ":" or the end), then a path up to the next colon; the rest after ":" is the model.
        host = re.match(r"https?://[^/:\s]+", rest)
        end = host.end() if host else 0
        for part in (r":\d+(?=[/:]|$)", r"/[^:\s]*"):
            match = re.compile(part).match(rest, end)
            end = match.end() if match else end
        if not host or rest[end:end + 1] != ":" or not rest[end + 1:].strip():
            raise ValueError(f"--backend {spec!r}: expected openai:URL:MODEL, e.g. openai:http://127.0.0.1:8000/v1:qwen")
        return OpenAIChatBackend(rest[:end], rest[end + 1:], api_key=api_key, timeout=timeout)
    if kind in ("transformers", "hf") and rest:
        return TransformersBackend(rest, device=device)
    raise ValueError(f"--backend {spec!r}: expected one of {BACKEND_FORMS}")


def add_pairs_arguments(parser: argparse.ArgumentParser) -> None:
    """The arguments of `earkit pairs`."""
    parser.add_argument("--concept", required=True, help="the concept the pairs replace, e.g. church or circle")
    parser.add_argument("--backend", action="append", default=None,
                        help=f"{BACKEND_FORMS}; repeatable, asked in turn (default: template)")
    parser.add_argument("--n", type=int, default=200, help="valid pairs wanted (default: %(default)s)")
    parser.add_argument("--out", required=True, help="pairs JSONL to write; the summary goes beside it")
    parser.add_argument("--anchor", action="append", default=None, help="a replacement candidate; repeatable")
    parser.add_argument("--style", action="append", default=None, help="a style hint for the prompts; repeatable")
    parser.add_argument("--examples", help="few-shot examples from a pairs file (e.g. the released EAR train_church.json)")
    parser.add_argument("--examples-limit", type=int, default=3, help="how many examples to show (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--retries", type=int, default=2, help="retries of a malformed or failed reply (default: %(default)s)")
    parser.add_argument("--per-request", type=int, default=20, help="pairs asked for per request (default: %(default)s)")
    parser.add_argument("--temperature", type=float, default=0.7)
    parser.add_argument("--max-tokens", type=int, default=2048)
    parser.add_argument("--min-similarity", type=float, default=DEFAULT_MIN_SIMILARITY,
                        help="least token similarity of the two prompts without the concept/replacement (default: %(default)s)")
    parser.add_argument("--max-requests", type=int, default=None, help="request budget over all backends")
    parser.add_argument("--timeout", type=float, default=120.0,
                        help="seconds per HTTP request, all told: connect, headers, body (default: %(default)s)")
    parser.add_argument("--api-key-env", default="OPENAI_API_KEY",
                        help="environment variable holding the API key for openai backends (default: %(default)s)")
    parser.add_argument("--device", default="cpu", help="device for transformers backends (default: %(default)s)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.add_argument("--force", action="store_true", help="replace an existing --out")


def run_pairs(args) -> dict:
    """`earkit pairs`: generate, write the pairs and their summary, print the summary's counts.
    ValueError when no valid pair came back (the summary is printed first, to say why)."""
    out = Path(args.out).expanduser()
    for path in (out, summary_path(out)):  # before asking anyone: a run can take hours of LLM time
        _refuse_existing(path, args.force)
    refuse_foreign_summary(summary_path(out))
    from earkit.io import check_writable
    from earkit.engine.model import check_device

    check_writable(out, "--out")
    if any(spec.startswith("transformers:") for spec in args.backend or []):
        check_device(args.device)
    check_timeout(args.timeout, "--timeout")  # for every backend: nan or 0 is a typo, whichever backend runs
    if args.examples_limit < 0:
        raise ValueError(f"--examples-limit must be >= 0, got {args.examples_limit}")
    if args.max_requests is not None and args.max_requests < 1:
        raise ValueError(f"--max-requests must be at least 1, got {args.max_requests}")
    api_key = os.environ.get(args.api_key_env) if args.api_key_env else None
    backends = [parse_backend(spec, timeout=args.timeout, api_key=api_key, device=args.device)
                for spec in args.backend or ["template"]]
    examples = load_examples(args.examples, args.examples_limit) if args.examples else None
    pairs, summary = generate_pairs(
        args.concept, backends=backends, n_pairs=args.n, seed=args.seed, retries=args.retries, anchors=args.anchor,
        progress=not args.quiet, style_hints=args.style, examples=examples, pairs_per_request=args.per_request,
        temperature=args.temperature, max_tokens=args.max_tokens, min_similarity=args.min_similarity,
        max_requests=args.max_requests)
    shown = {key: value for key, value in summary.items() if key != "rejected_pairs"}
    print(json.dumps(shown, indent=1, ensure_ascii=False))
    if not pairs:
        raise ValueError(f"no valid pairs for {summary['concept']!r} ({summary['stopped']}); nothing written")
    write_generated(pairs, out, force=args.force, summary=summary)
    print(f"wrote {len(pairs)} pairs to {out} (summary: {summary_path(out)})")
    return summary
