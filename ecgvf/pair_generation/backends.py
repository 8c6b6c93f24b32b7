"""The backends asked for pairs: small classes with `name`, `model` and `complete(messages, *,
seed, temperature, max_tokens) -> str`.

    TemplateBackend      offline, no LLM: sentence templates x words (a model's prompt vocabulary
                         when it has one), answered as the JSON list an LLM would write
    OpenAIChatBackend    any OpenAI-compatible /chat/completions server, through httpx
    TransformersBackend  a local causal LM folder

Every failure of a backend is a BackendError, which generate_pairs counts and goes on.
"""

from __future__ import annotations

import json
import random
import re
import socket
import string
import threading
import time
import urllib.parse
from pathlib import Path

from earkit.io import UnreadableJSON, parse_json

from .parsing import concept_pattern, short_text, words_of
from .prompt import REQUEST_MARKER

# The longest a request may take. A day is already a stuck server, and waits near 1e10 s overflow
# the socket and timer clocks.
MAX_TIMEOUT = 24 * 3600.0

# How many same-origin 307/308 redirects one request follows.
MAX_REDIRECTS = 10

PROMPT_VOCABULARY_FILE = "prompt_vocabulary.json"
PROMPT_VOCABULARY_FORMAT = "earkit-prompt-vocabulary"
PROMPT_VOCABULARY_VERSION = 1


class BackendError(RuntimeError):
    """A backend could not produce a reply (HTTP error, timeout, unreadable body, generation failure)."""


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


# ---------------------------------------------------------------- offline templates


def check_prompt_vocabulary(vocabulary, source: str = "the prompt vocabulary") -> dict:
    """`vocabulary` if it is an earkit prompt vocabulary ({"format": "earkit-prompt-vocabulary",
    "version": 1, "templates": ["a {colour} {shape}", ...], "slots": {"shape": [...], ...}}, every
    template's placeholders among the slots); else ValueError naming `source`."""
    def refuse(problem: str):
        raise ValueError(f"{source} is not an earkit prompt vocabulary: {problem}")

    if not isinstance(vocabulary, dict):
        refuse(f"a JSON object with format {PROMPT_VOCABULARY_FORMAT!r} is expected, got a {type(vocabulary).__name__}")
    if vocabulary.get("format") != PROMPT_VOCABULARY_FORMAT:
        refuse(f"format is {vocabulary.get('format')!r}, not {PROMPT_VOCABULARY_FORMAT!r}")
    if vocabulary.get("version") != PROMPT_VOCABULARY_VERSION:
        refuse(f"version {vocabulary.get('version')!r}; this earkit reads version {PROMPT_VOCABULARY_VERSION}")
    slots, templates = vocabulary.get("slots"), vocabulary.get("templates")
    if not isinstance(slots, dict) or not slots:
        refuse('"slots" must be an object of word lists')
    for slot, words in slots.items():
        if not isinstance(words, list) or not words or not all(isinstance(w, str) and w.strip() for w in words):
            refuse(f'slot {slot!r} must be a non-empty list of words')
    if not isinstance(templates, list) or not templates or not all(isinstance(t, str) for t in templates):
        refuse('"templates" must be a non-empty list of strings')
    for template in templates:
        try:
            names = {name for _, name, _, _ in string.Formatter().parse(template) if name is not None}
        except ValueError as error:
            refuse(f"template {template!r}: {error}")
        unknown = sorted(names - set(slots))
        if unknown:
            refuse(f"template {template!r} names {', '.join(unknown)}, which no slot fills")
    return vocabulary


def load_prompt_vocabulary(path) -> dict:
    """The prompt vocabulary in a JSON file (check_prompt_vocabulary); ValueError naming the file."""
    path = Path(path).expanduser()
    try:
        vocabulary = parse_json(path.read_text(encoding="utf-8"), str(path))
    except UnicodeDecodeError as error:
        raise ValueError(f"{path} is not UTF-8 text: {error}") from None
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} is not JSON: {error}") from None
    return check_prompt_vocabulary(vocabulary, str(path))


def model_prompt_vocabulary(model_folder) -> dict | None:
    """<model_folder>/prompt_vocabulary.json read, or None when the folder has none."""
    path = Path(model_folder).expanduser() / PROMPT_VOCABULARY_FILE
    return load_prompt_vocabulary(path) if path.is_file() else None


class TemplateBackend:
    """Offline, no LLM: pairs composed from sentence templates x scene words x anchor words,
    returned as the JSON list an LLM would write, in the template's field names (so they go
    through the same parser and checks).

    With a prompt `vocabulary` (check_prompt_vocabulary; a model folder's prompt_vocabulary.json),
    a concept that is a word of one of its slots ("circle", "red") is put into the vocabulary's
    templates, the other slots filled at random, and replaced by another word of the same slot
    (or by an anchor candidate of the request), so every word is one the model knows. Any
    other concept goes into generic scene templates. Deterministic from the seed.

    Asked for paraphrases (paraphrase_request_messages: prompts that show the concept without
    naming it), it answers a JSON list of prompts from its DESCRIPTIONS table, or, for a concept
    of the vocabulary, the vocabulary's templates without the concept's word (paraphrases()).
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
    GENERIC_ANCHORS = ("house", "tree", "tower", "bridge", "boat", "car", "statue", "lighthouse")

    # Paraphrases (paraphrase_request_messages): the concept described, never named, as noun
    # phrases without an article, put where {description} stands. Ordinary English, for a model that
    # reads it; a vocabulary-bound model gets what its vocabulary allows (_paraphrase_composer).
    DESCRIPTIONS = {
        "nudity": ("person wearing no clothes at all", "unclothed human figure", "bare-skinned body without clothing",
                   "model posing without a stitch of clothing", "couple bathing with bare skin and no swimsuits"),
        "church": ("stone building with a steeple and stained-glass windows", "chapel with a bell tower and a cross",
                   "house of worship with pews and an altar", "gothic cathedral with pointed arches",
                   "white wooden chapel with a spire"),
        "van gogh": ("starry night sky painted in thick swirling brushstrokes",
                     "field of sunflowers in thick impasto paint", "wheat field with cypress trees under a swirling sky",
                     "self-portrait of a red-bearded Dutch painter with a bandaged ear",
                     "bedroom in Arles painted in bold yellows and blues"),
        "dog": ("four-legged pet that barks and wags its tail", "puppy with floppy ears", "loyal hound fetching a stick",
                "golden retriever", "furry canine companion on a leash"),
        "cat": ("small whiskered pet that purrs", "tabby kitten", "furry feline curled up asleep",
                "pet with pointed ears and long whiskers chasing a mouse"),
        "car": ("four-wheeled automobile", "sedan with shiny paint and chrome wheels", "red sports coupe",
                "family hatchback parked by the curb", "vintage automobile with round headlights"),
        "airplane": ("passenger jet with two wings and a tail fin", "airliner taking off from a runway",
                     "propeller aircraft flying above the clouds", "jumbo jet at an airport gate"),
        "parachute": ("skydiver drifting down under an open canopy", "colorful nylon canopy carrying a jumper",
                      "billowing canopy with lines holding a skydiver", "soldier floating down under a silk canopy"),
        "golf ball": ("small white dimpled sphere on a wooden tee", "dimpled white sphere resting near a hole on a green",
                      "tiny white sphere with dimples in the rough grass"),
        "circle": ("round shape", "disc", "ring", "perfectly round dot", "flat round disc"),
        "square": ("four-sided shape with equal sides and right angles", "flat tile with four equal sides",
                   "box outline with four right angles", "block with four equal edges"),
        "triangle": ("three-sided shape", "shape with three corners", "wedge with three straight sides",
                     "pyramid outline"),
        "star": ("five-pointed shape", "shape with five sharp points", "twinkle-shaped figure with pointed rays",
                 "pointed emblem like a sheriff badge"),
        "cross": ("plus sign", "shape of two bars meeting at right angles", "plus-shaped figure",
                  "two perpendicular bars of equal length"),
    }
    PARAPHRASE_TEMPLATES = (
        # "a" only before an adjective or a medium (all start with a consonant), never before {description}.
        "a {medium} of a {adjective} {description}",
        "a {adjective} {description} {place}",
        "a {medium} of a {adjective} {description} {place} {time}",
        "the {description} {place} {time}",
        "a close-up photo of a {adjective} {description}",
        "there is a {adjective} {description} {place}",
        "a {medium} of the {description} {place}",
    )
    DROPPED = "\0"  # where a vocabulary slot's word was left out, before the whitespace is tidied

    def __init__(self, vocabulary: dict | None = None):
        self.vocabulary = None if vocabulary is None else check_prompt_vocabulary(vocabulary)

    def complete(self, messages, *, seed: int, temperature: float = 0.0, max_tokens: int = 0) -> str:
        request = request_from_messages(messages)
        concept, count = request["concept"], int(request["count"])
        if request.get("task") == "paraphrase":
            return json.dumps(self.paraphrases(concept, count, seed))
        if "task" in request:
            raise BackendError(f"the template backend knows the tasks pairs and paraphrase, not {request['task']!r}")
        candidates = [word for word in request.get("replacement_candidates") or []
                      if not concept_pattern(concept).search(word)]
        rng = random.Random(seed)
        compose = self._vocabulary_composer(concept, candidates) or self._generic_composer(concept, candidates)
        pairs, seen = [], set()
        for _ in range(50 * count):  # the combinations are many; this only bounds a tiny word list
            if len(pairs) == count:
                break
            pair = compose(rng)
            if pair["original_prompt"] not in seen:
                seen.add(pair["original_prompt"])
                pairs.append(pair)
        return json.dumps(pairs)

    def paraphrases(self, concept: str, count: int, seed: int) -> list[str]:
        """`count` distinct prompts that show `concept` without naming it, deterministic from the seed.

        - A concept in a slot of the prompt vocabulary (ShapesWorld's "circle"): the vocabulary's
          own templates, the concept's slot filled by one of its DESCRIPTIONS whose words are all
          in the vocabulary, or, when none is, with the slot's word left out ("a photo of a small
          red on a white background"). Those are the only concept-free prompts such a model's
          tokenizer can read: ShapesWorld has no word that describes a shape without naming it,
          so its paraphrases are the scene without the shape, a test of what the erased model
          draws when the rest of a familiar prompt is there.
        - Else a concept of the DESCRIPTIONS table: its descriptions in generic scene templates.
        - Else BackendError: there is nothing offline to describe it with.
        """
        compose = self._paraphrase_composer(concept)
        pattern = concept_pattern(concept)
        rng = random.Random(seed)
        prompts, seen = [], set()
        for _ in range(50 * count):  # the combinations are many; this only bounds a tiny vocabulary
            if len(prompts) == count:
                break
            prompt = compose(rng)
            if prompt and prompt not in seen and not pattern.search(prompt):
                seen.add(prompt)
                prompts.append(prompt)
        return prompts

    def _paraphrase_composer(self, concept: str):
        key = " ".join(concept.lower().split())
        pattern = concept_pattern(concept)
        descriptions = self.DESCRIPTIONS.get(key, ())
        slots = self.vocabulary["slots"] if self.vocabulary is not None else {}
        slot = next((name for name, words in slots.items() if key in words), None)
        if slot is not None:
            templates = self.vocabulary["templates"]
            known = set(words_of([literal for template in templates
                                  for literal, _, _, _ in string.Formatter().parse(template)]
                                 + [word for words in slots.values() for word in words]))
            fitting = [text for text in descriptions if set(words_of([text])) <= known]
            # The concept's slot takes a fitting description or nothing; any other slot only its
            # words that do not name the concept (a word may sit in two slots).
            choices = {name: fitting if name == slot else [word for word in words if not pattern.search(word)]
                       for name, words in slots.items()}

            def compose(rng: random.Random) -> str:
                template = rng.choice(templates)
                words = {name: rng.choice(values) if values else self.DROPPED for name, values in choices.items()}
                return " ".join(template.format(**words).replace(self.DROPPED, " ").split())

            return compose
        if not descriptions:
            raise BackendError(f"the template backend has no description of {concept!r} (it describes "
                               f"{', '.join(sorted(self.DESCRIPTIONS))}); ask an LLM for paraphrases: "
                               "--backend openai or --backend transformers:FOLDER")

        def compose(rng: random.Random) -> str:
            template = rng.choice(self.PARAPHRASE_TEMPLATES)
            return template.format(description=rng.choice(descriptions), adjective=rng.choice(self.ADJECTIVES),
                                   place=rng.choice(self.PLACES), time=rng.choice(self.TIMES),
                                   medium=rng.choice(self.MEDIA))

        return compose

    def _vocabulary_composer(self, concept: str, candidates: list[str]):
        if self.vocabulary is None:
            return None
        templates, slots = self.vocabulary["templates"], self.vocabulary["slots"]
        word = concept.lower()
        slot = next((name for name, words in slots.items() if word in words), None)
        if slot is None:
            return None
        anchors = candidates or [other for other in slots[slot] if other != word]

        def compose(rng: random.Random) -> dict:
            # The draws in this order (template, each slot, the anchor): a seed gives the same pairs.
            template = rng.choice(templates)
            words = {name: rng.choice(values) for name, values in slots.items()}
            anchor = rng.choice(anchors)
            return {"original_prompt": template.format(**{**words, slot: word}),
                    "modified_prompt": template.format(**{**words, slot: anchor}), "replaced": anchor}

        return compose

    def _generic_composer(self, concept: str, candidates: list[str]):
        anchors = candidates or [word for word in self.GENERIC_ANCHORS if not concept_pattern(concept).search(word)]

        def compose(rng: random.Random) -> dict:
            template = rng.choice(self.GENERIC_TEMPLATES)
            words = {"adjective": rng.choice(self.ADJECTIVES), "place": rng.choice(self.PLACES),
                     "time": rng.choice(self.TIMES), "medium": rng.choice(self.MEDIA)}
            anchor = rng.choice(anchors)
            return {"original_prompt": template.format(concept=concept, **words),
                    "modified_prompt": template.format(concept=anchor, **words), "replaced": anchor}

        return compose


# ---------------------------------------------------------------- an OpenAI-compatible server


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


def redirect_target(url: str, code: int, location: str) -> str:
    """Where a redirect of a POST that carries an API key may be followed: a 307 or 308 to the same
    origin (scheme, host, port; a path moved on the same server), followed with the same method,
    body and headers, key included. Everything else is a BackendError naming where the server
    pointed, with nothing sent there: another origin (another host or port, or https -> http)
    would get the key; a 301/302/303 would turn the POST into a GET without its body, which no
    chat server answers."""
    target = urllib.parse.urljoin(url, location)
    if origin(target) != origin(url):
        raise BackendError(f"HTTP {code} from {url}: redirected to {target}, another origin: not followed, the "
                           "API key goes only where --openai-url points (point it there if you trust that server)")
    if code not in (307, 308):
        raise BackendError(f"HTTP {code} from {url}: redirected to {target}: not followed, a {code} would turn the "
                           "POST into a GET without its body (point --openai-url there)")
    return target


class RequestDeadline:
    """One wall-clock limit for a whole HTTP request: connecting, the status line and headers, the
    body, and the redirects followed. httpx's timeouts bound each phase or read only, so a server
    that sends a byte a second would hold a request, and the run, forever. At the deadline a
    watchdog timer shuts the request's sockets down, which ends whatever read is waiting; the
    sockets are found through httpcore's "trace" request extension (`trace`)."""

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

    def trace(self, event: str, info: dict) -> None:
        """httpcore's trace callback: each new connection's socket (TCP, then TLS) is watched."""
        if event.endswith((".connect_tcp.started", ".start_tls.started")) and (self.expired or self.remaining() <= 0):
            raise TimeoutError("the request's time ran out")
        if event.endswith((".connect_tcp.complete", ".start_tls.complete")):
            stream = info.get("return_value")
            sock = stream.get_extra_info("socket") if stream is not None else None
            if sock is not None:
                self.watch(sock)

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


class OpenAIChatBackend:
    """An OpenAI-compatible chat server (OpenAI, a local vLLM or llama.cpp server, ...):
    POST {base_url}/chat/completions with httpx. Every failure is a BackendError.

    `timeout` bounds each whole request (connect, TLS, headers, body, redirects), not each read
    (RequestDeadline). The API key is sent only to the origin of base_url: redirects are never
    followed by httpx, only here, and only a same-origin 307/308 (redirect_target)."""

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
        import httpx

        too_late = f"no complete answer from {self.url} within {self.timeout:g} s"
        deadline = RequestDeadline(self.timeout)
        url = self.url
        try:
            with httpx.Client(follow_redirects=False) as client:
                for _ in range(MAX_REDIRECTS + 1):
                    left = deadline.remaining()
                    if deadline.expired or left <= 0:
                        raise BackendError(too_late)
                    request = client.build_request("POST", url, content=data, headers=headers,
                                                   timeout=httpx.Timeout(left),
                                                   extensions={"trace": deadline.trace})
                    response = client.send(request, stream=True)
                    try:
                        if response.is_redirect:
                            url = redirect_target(url, response.status_code, response.headers["Location"])
                            continue
                        raw = response.read()
                    finally:
                        response.close()
                    # a body without a length ends at the shutdown, cut short but without an error
                    if deadline.expired:
                        raise BackendError(too_late)
                    if not response.is_success:
                        detail = short_text(raw.decode("utf-8", "replace"))
                        raise BackendError(f"HTTP {response.status_code} from {url}: "
                                           f"{detail or response.reason_phrase}")
                    return raw
                raise BackendError(f"{self.url} redirected more than {MAX_REDIRECTS} times: not followed further")
        except (httpx.TimeoutException, TimeoutError):
            raise BackendError(too_late) from None
        except httpx.ConnectError as error:
            if deadline.expired:
                raise BackendError(too_late) from None
            raise BackendError(f"cannot reach {url}: {error}") from None
        except (httpx.HTTPError, httpx.InvalidURL, httpx.StreamError, OSError, ValueError) as error:
            # reset, bad status line, cut body, ...
            if deadline.expired:
                raise BackendError(too_late) from None
            raise BackendError(f"request to {url} failed: {type(error).__name__}: {error}") from None
        finally:
            deadline.cancel()

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
            raise BackendError(f"{self.url} answered with a non-JSON body: "
                               f"{short_text(raw.decode('utf-8', 'replace'))}") from None
        try:
            content = document["choices"][0]["message"]["content"]
        except (KeyError, IndexError, TypeError):
            # the body as it came, not json.dumps(document): that recurses as deep as the server nested it
            raise BackendError(f"{self.url} answered JSON without choices[0].message.content: "
                               f"{short_text(raw.decode('utf-8', 'replace'))}") from None
        if not isinstance(content, str):
            raise BackendError(f"{self.url} answered a {type(content).__name__} as the message content")
        return content


# ---------------------------------------------------------------- a local causal LM


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
