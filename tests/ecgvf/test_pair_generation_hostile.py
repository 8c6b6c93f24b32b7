"""The ECGVF prompt-pair tooling against hostile input: servers that redirect the API key away, drip
bytes forever, or answer JSON nested a hundred thousand deep; pairs, prompt and benchmark files
nested as deep; lone surrogates in replies; nonsense timeouts. Each must end as a counted failure
(a run keeps what it has) or as one line naming the problem (exit 2), never as a traceback, a
leaked key, a hung run or half of a command's outputs."""

import json
import math
import shutil
import socket
import ssl
import subprocess
import threading
import time
from http.server import BaseHTTPRequestHandler

import pytest

from ecgvf_helpers import LocalServer
from earkit.cli import main
from earkit.ecgvf.benchmark import load_benchmark, load_prompt_file
from earkit.ecgvf.pair_generation import (
    BackendError, MalformedReply, OpenAIChatBackend, TemplateBackend, extract_pair_list, generate_pairs, load_examples,
    summary_path, validate_items, write_generated,
)
from earkit.engine.pair_files import load_pairs, load_prompts

# Names added with these fixes are imported in the tests that use them, so that against the code
# before the fixes each test fails on its own behaviour, not all of them on an import.

DEEP = "[" * 100000
KEY = "sk-secret-test-key"
MESSAGES = [{"role": "user", "content": "hi"}]


def chat_answer(content: str) -> bytes:
    return json.dumps({"choices": [{"index": 0, "message": {"role": "assistant", "content": content}}]}).encode()


def pairs_reply(seed: int, count: int = 2) -> str:
    return json.dumps([{"original_prompt": f"a red circle number {seed} {index}",
                        "modified_prompt": f"a red square number {seed} {index}", "replaced": "square"}
                       for index in range(count)])


class Stub(LocalServer):
    """An HTTP server on 127.0.0.1 whose POST answer is `respond(handler, body, index)` (index: the
    request's number), recording each request; plain http, or https with `tls` (cert, key)."""

    def __init__(self, respond, tls=None):
        self.requests, self.stop = [], threading.Event()
        stub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def do_POST(self):
                raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                stub.requests.append({"method": "POST", "path": self.path, "headers": dict(self.headers),
                                      "body": json.loads(raw) if raw else None})
                try:
                    respond(self, stub.requests[-1]["body"], len(stub.requests) - 1)
                except (BrokenPipeError, ConnectionResetError, ssl.SSLError, OSError):
                    pass  # the client gave up

            def do_GET(self):
                stub.requests.append({"method": "GET", "path": self.path, "headers": dict(self.headers), "body": None})
                send(self, 405, b'{"error": "GET"}')

        super().__init__(Handler)
        scheme = "http"
        if tls:
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.load_cert_chain(*tls)
            self.server.socket = context.wrap_socket(self.server.socket, server_side=True)
            scheme = "https"
        self.origin = f"{scheme}://127.0.0.1:{self.server.server_address[1]}"
        self.url = self.origin + "/v1"

    def __exit__(self, *exc):
        self.stop.set()
        super().__exit__(*exc)


def send(handler, status: int, body: bytes, headers=()):
    handler.send_response(status)
    for name, value in headers:
        handler.send_header(name, value)
    handler.send_header("Content-Type", "application/json")
    handler.send_header("Content-Length", str(len(body)))
    handler.end_headers()
    handler.wfile.write(body)


def good(handler, body, index):
    send(handler, 200, chat_answer(pairs_reply(body["seed"])))


def redirect_to(location: str, code: int):
    def respond(handler, body, index):
        send(handler, code, b"moved", headers=[("Location", location)])
    return respond


def cli(argv, capsys):
    """(exit status, stdout, stderr) of `earkit ARGV`."""
    status = main(argv)
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def four_pairs_from(respond, out, capsys) -> "Stub":
    """`earkit pairs` asking a stub server that answers with `respond` for 4 pairs, 2 a request:
    it must succeed and write 4; returns the stub (its requests)."""
    with Stub(respond) as stub:
        status, printed, err = cli(["pairs", "--concept", "circle", "--backend", "openai", "--openai-url", stub.url, "--openai-model", "m", "--n", "4",
                                    "--per-request", "2", "--out", str(out), "--quiet", "--timeout", "5"], capsys)
    assert status == 0, err
    assert len(load_pairs(out)) == 4
    return stub


def one_line_error(err: str, *words) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err[-2000:]
    assert "Traceback" not in err
    for word in words:
        assert word in lines[0], lines[0]
    return lines[0]


# ---------------------------------------------------------------- 1. the API key and redirects


@pytest.mark.parametrize("code", [301, 302, 303, 307, 308])
def test_a_redirect_to_another_origin_never_gets_the_key(code):
    with Stub(good) as other, Stub(redirect_to(other.url + "/chat/completions", code)) as first:
        backend = OpenAIChatBackend(first.url, "m", api_key=KEY, timeout=5)
        with pytest.raises(BackendError, match="another origin") as error:
            backend.complete(MESSAGES, seed=0, temperature=0, max_tokens=8)
        assert other.url in str(error.value) and KEY not in str(error.value)
        assert first.requests[0]["headers"]["Authorization"] == f"Bearer {KEY}"
        assert not any("Authorization" in r["headers"] for r in other.requests)
        assert other.requests == []  # not followed at all: a redirected POST would lose its body anyway


def test_a_redirect_within_the_origin_keeps_the_post_and_the_key():
    def respond(handler, body, index):
        if handler.path == "/v1/chat/completions":
            return send(handler, 307, b"", headers=[("Location", "/v2/chat/completions")])
        good(handler, body, index)

    with Stub(respond) as stub:
        backend = OpenAIChatBackend(stub.url, "m", api_key=KEY, timeout=5)
        reply = backend.complete(MESSAGES, seed=4, temperature=0, max_tokens=8)
    assert extract_pair_list(reply)[0][0]["original_prompt"] == "a red circle number 4 0"
    assert [(r["method"], r["path"]) for r in stub.requests] == [("POST", "/v1/chat/completions"),
                                                                 ("POST", "/v2/chat/completions")]
    assert all(r["headers"]["Authorization"] == f"Bearer {KEY}" for r in stub.requests)
    assert stub.requests[0]["body"] == stub.requests[1]["body"]


def test_a_same_origin_redirect_that_would_drop_the_body_is_refused():
    with Stub(redirect_to("/v2/chat/completions", 302)) as stub:
        backend = OpenAIChatBackend(stub.url, "m", api_key=KEY, timeout=5)
        with pytest.raises(BackendError, match="302.*/v2/chat/completions"):
            backend.complete(MESSAGES, seed=0, temperature=0, max_tokens=8)
    assert [r["method"] for r in stub.requests] == ["POST"]  # no GET without the body follows


@pytest.mark.parametrize("url, new, same", [
    ("https://api.example.com/v1/chat/completions", "http://api.example.com/v1/chat/completions", False),
    ("https://api.example.com/v1/chat/completions", "https://api.example.com:443/v2", True),
    ("http://127.0.0.1/v1/chat/completions", "http://127.0.0.1:80/v2", True),
    ("http://127.0.0.1:8000/v1/chat/completions", "http://127.0.0.1:8001/v1/chat/completions", False),
    ("http://127.0.0.1:8000/v1/chat/completions", "http://localhost:8000/v1/chat/completions", False),
    ("https://api.example.com/v1/chat/completions", "https://api.example.com.evil.org/v1", False),
    ("https://api.example.com/v1/chat/completions", "https://api.example.com:99999/v1", False),
])
def test_https_to_http_or_any_other_origin_is_not_followed(url, new, same):
    from earkit.ecgvf.pair_generation.backends import redirect_target

    if same:
        assert redirect_target(url, 307, new) == new
        assert redirect_target(url, 308, new) == new
    else:
        with pytest.raises(BackendError, match="another origin"):
            redirect_target(url, 307, new)
    with pytest.raises(BackendError, match="not followed"):
        redirect_target(url, 302, new)


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory):
    """A self-signed certificate for 127.0.0.1 (openssl), or skip."""
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed")
    folder = tmp_path_factory.mktemp("tls")
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert),
                    "-days", "1", "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"],
                   check=True, capture_output=True)
    return cert, key


def test_an_https_server_redirecting_to_http_does_not_get_the_key_sent_in_clear(tls_files, monkeypatch):
    monkeypatch.setenv("SSL_CERT_FILE", str(tls_files[0]))  # the client trusts the stub's certificate
    with Stub(good) as plain, Stub(redirect_to(plain.url + "/chat/completions", 307), tls=tls_files) as secure:
        assert secure.url.startswith("https://")
        ok = OpenAIChatBackend(secure.url, "m", api_key=KEY, timeout=5)
        with pytest.raises(BackendError, match="another origin"):
            ok.complete(MESSAGES, seed=0, temperature=0, max_tokens=8)
        assert secure.requests[0]["headers"]["Authorization"] == f"Bearer {KEY}"
        assert plain.requests == []


# ---------------------------------------------------------------- 2. JSON nested too deeply


def test_parse_json_turns_a_recursion_error_into_a_value_error_naming_the_source():
    from earkit.io import NestedTooDeeply, parse_json

    with pytest.raises(NestedTooDeeply, match="some.json line 3: JSON nested too deeply"):
        parse_json(DEEP, "some.json line 3")
    assert isinstance(NestedTooDeeply("x"), ValueError)
    assert parse_json('{"a": [1]}', "x") == {"a": [1]}
    assert parse_json('xx[1, 2] tail', "x", start=2) == ([1, 2], 8)
    with pytest.raises(json.JSONDecodeError):
        parse_json("[1,", "x")


@pytest.mark.parametrize("reply", [DEEP, "Here you go:\n```json\n" + DEEP + "\n```", '{"pairs": ' + DEEP,
                                   "[" + '{"a": ' * 50000], ids=["bare", "fenced", "wrapped", "objects"])
def test_a_deeply_nested_reply_is_malformed(reply):
    with pytest.raises(MalformedReply, match="nested too deeply"):
        extract_pair_list(reply)


def test_a_deep_reply_is_retried_and_the_run_keeps_its_pairs():
    class Scripted:
        name, model = "scripted", "deep-then-good"

        def __init__(self):
            self.calls = 0

        def complete(self, messages, *, seed, temperature, max_tokens):
            self.calls += 1
            return DEEP if self.calls % 2 == 1 else pairs_reply(seed)

    pairs, summary = generate_pairs("circle", backends=[Scripted()], n_pairs=4, retries=1, progress=False)
    assert len(pairs) == 4 and summary["malformed_replies"] == 2 and summary["backend_errors"] == 0
    assert "nested too deeply" in summary["per_backend"]["scripted:deep-then-good"]["malformed_example"]


def test_a_deeply_nested_response_body_is_a_backend_error():
    def respond(handler, body, index):
        send(handler, 200, DEEP.encode())

    with Stub(respond) as stub:
        with pytest.raises(BackendError, match="nested too deeply"):
            OpenAIChatBackend(stub.url, "m", timeout=5).complete(MESSAGES, seed=0, temperature=0, max_tokens=8)


def test_earkit_pairs_survives_a_deep_first_reply(tmp_path, capsys):
    def respond(handler, body, index):
        send(handler, 200, chat_answer(DEEP if index == 0 else pairs_reply(body["seed"])))

    out = tmp_path / "circle.jsonl"
    stub = four_pairs_from(respond, out, capsys)
    summary = json.loads(summary_path(out).read_text())
    assert summary["malformed_replies"] == 1 and summary["returned"] == 4 and len(stub.requests) == 3


def deep_files(folder):
    """name -> a file whose JSON is nested 100000 deep, in every form the readers take."""
    files = {
        "deep.jsonl": '{"concept_prompt": "a circle", "anchor_prompt": "a square"}\n' + DEEP + "\n",
        "deep.json": DEEP,
        "deep_lines.json": '{"concept_prompt": "a circle", "anchor_prompt": "a square"}\n{"x": ' + DEEP + "\n",
    }
    paths = {}
    for name, text in files.items():
        paths[name] = folder / name
        paths[name].write_text(text)
    return paths


@pytest.mark.parametrize("name", ["deep.jsonl", "deep.json", "deep_lines.json"])
def test_deep_pairs_and_prompt_files_are_value_errors_naming_the_file(tmp_path, name):
    path = deep_files(tmp_path)[name]
    for reader in (load_pairs, load_prompts, load_examples):
        with pytest.raises(ValueError, match="nested too deeply") as error:
            reader(path)
        assert str(path) in str(error.value)


def test_deep_benchmark_files_are_value_errors_naming_the_file(tmp_path):
    paths = deep_files(tmp_path)
    benchmark = tmp_path / "bench.jsonl"
    benchmark.write_text('{"prompt": "a red circle", "role": "target", "concept": "circle"}\n' + DEEP + "\n")
    first_line = tmp_path / "first.jsonl"
    first_line.write_text('{"role": ' + DEEP + "\n")
    prompts = tmp_path / "prompts.json"
    prompts.write_text('["a circle", ' + DEEP)
    good_pairs = tmp_path / "good.jsonl"
    good_pairs.write_text('{"concept_prompt": "a circle", "anchor_prompt": "a square", "concept": "circle"}\n')
    calls = [lambda: load_benchmark(benchmark), lambda: load_benchmark(first_line, concept="circle"),
             lambda: load_benchmark(good_pairs, preserve=prompts), lambda: load_prompt_file(prompts),
             lambda: load_prompt_file(paths["deep.jsonl"])]
    calls += [lambda path=path: load_benchmark(path, concept="circle") for path in paths.values()]
    for call in calls:
        with pytest.raises(ValueError, match="nested too deeply") as error:
            call()
        assert str(tmp_path) in str(error.value)


def test_the_command_line_says_a_deep_file_is_nested_too_deeply(tmp_path, capsys):
    deep = deep_files(tmp_path)["deep.jsonl"]
    commands = [
        ["erase", "--model", str(tmp_path / "no-model"), "--pairs", str(deep), "--out", str(tmp_path / "erase")],
        ["filter", "--pairs", str(deep), "--out", str(tmp_path / "kept.jsonl")],
        ["eval", "--benchmark", str(deep), "--concept", "circle", "--out", str(tmp_path / "report")],
        ["pairs", "--concept", "circle", "--examples", str(deep), "--out", str(tmp_path / "p.jsonl"), "--quiet"],
    ]
    for argv in commands:
        status, _, err = cli(argv, capsys)
        assert status == 2, (argv, err[-2000:])
        one_line_error(err, f"earkit {argv[0]}: error:", str(deep), "nested too deeply")
    assert not (tmp_path / "p.jsonl").exists() and not (tmp_path / "kept.jsonl").exists()


def test_eval_refuses_to_replace_a_folder_whose_metrics_are_nested_too_deeply(tmp_path, capsys):
    report = tmp_path / "report"
    report.mkdir()
    (report / "metrics.json").write_text(DEEP)
    bench = tmp_path / "bench.jsonl"
    bench.write_text('{"prompt": "a red circle", "role": "target", "concept": "circle"}\n')
    status, _, err = cli(["eval", "--benchmark", str(bench), "--out", str(report), "--force"], capsys)
    assert status == 2
    one_line_error(err, "not replacing", str(report))
    assert (report / "metrics.json").read_text() == DEEP


# ---------------------------------------------------------------- 3. one deadline per request


def dripper(where: str, gap: float = 0.3, lifetime: float = 8.0):
    """Answers one byte every `gap` seconds, in the headers or in the body, for up to `lifetime`."""
    def respond(handler, body, index):
        content = chat_answer(pairs_reply(body["seed"]))
        head = (b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n" + b"X-Slow: " + b"a" * 200 + b"\r\n"
                + f"Content-Length: {len(content)}\r\n\r\n".encode())
        fast, slow = (b"", head + content) if where == "headers" else (head, content)
        handler.wfile.write(fast)
        handler.wfile.flush()
        started = time.monotonic()
        for byte in slow:
            if handler.server_stop.is_set() or time.monotonic() - started > lifetime:
                return
            handler.wfile.write(bytes([byte]))
            handler.wfile.flush()
            time.sleep(gap)
    return respond


class DripStub(Stub):
    def __init__(self, where):
        super().__init__(self.respond)
        self.inner = dripper(where)

    def respond(self, handler, body, index):
        handler.server_stop = self.stop
        self.inner(handler, body, index)


@pytest.mark.parametrize("where", ["headers", "body"])
def test_a_dripping_server_cannot_hold_a_request_past_its_timeout(where):
    with DripStub(where) as stub:
        backend = OpenAIChatBackend(stub.url, "m", timeout=1)
        started = time.monotonic()
        with pytest.raises(BackendError, match=r"no complete answer from .* within 1 s"):
            backend.complete(MESSAGES, seed=0, temperature=0, max_tokens=8)
        assert time.monotonic() - started < 3


def test_earkit_pairs_counts_a_dripping_backend_as_failed_and_goes_on(tmp_path, capsys):
    out = tmp_path / "circle.jsonl"
    with DripStub("body") as stub:
        started = time.monotonic()
        status, printed, err = cli(["pairs", "--concept", "circle", "--backend", "openai", "--openai-url", stub.url, "--openai-model", "m",
                                    "--backend", "template", "--n", "5", "--retries", "0", "--timeout", "1",
                                    "--out", str(out), "--quiet"], capsys)
        elapsed = time.monotonic() - started
    assert status == 0, err
    assert elapsed < 4
    summary = json.loads(summary_path(out).read_text())
    dripping = summary["per_backend"]["openai:m"]
    assert dripping["backend_errors"] == 1 and "within 1 s" in dripping["errors"][0]
    assert len(load_pairs(out)) == 5


# ---------------------------------------------------------------- 4. lone surrogates and all-or-nothing writes


def test_a_pair_with_a_lone_surrogate_is_rejected_with_a_reason():
    from earkit.ecgvf.pair_generation import INVALID_TEXT

    items = [{"original_prompt": "a red circle \ud800", "modified_prompt": "a red square \ud800", "replaced": "square"},
             {"original_prompt": "a red circle", "modified_prompt": "a red square", "replaced": "sq\udcffuare"},
             {"original_prompt": "a blue circle", "modified_prompt": "a blue square", "replaced": "square"}]
    accepted, rejected = validate_items(items, "circle")
    assert [p["concept_prompt"] for p in accepted] == ["a blue circle"]
    assert [r["reason"] for r in rejected] == [INVALID_TEXT, INVALID_TEXT]
    json.dumps(rejected, ensure_ascii=False).encode("utf-8")  # the record of them is writable


def test_earkit_pairs_writes_the_good_pairs_when_a_reply_holds_a_lone_surrogate(tmp_path, capsys):
    def respond(handler, body, index):
        if index == 0:
            reply = ('[{"original_prompt": "a red circle \\ud800", "modified_prompt": "a red square \\ud800", '
                     '"replaced": "square"}, ' + pairs_reply(body["seed"])[1:])
        elif index == 1:
            reply = "Sorry \ud800, no"  # a malformed reply that is not UTF-8 either
        else:
            reply = pairs_reply(body["seed"])
        send(handler, 200, chat_answer(reply))

    out = tmp_path / "circle.jsonl"
    four_pairs_from(respond, out, capsys)
    from earkit.ecgvf.pair_generation import INVALID_TEXT

    summary = json.loads(summary_path(out).read_text(encoding="utf-8"))
    assert summary["rejected"] == {INVALID_TEXT: 1} and summary["malformed_replies"] == 1
    assert summary["returned"] == 4
    # a rerun is refused because both outputs exist, not because half of them do
    status, _, err = cli(["pairs", "--concept", "circle", "--out", str(out), "--quiet"], capsys)
    assert status == 2 and "already exists" in err


def test_write_generated_writes_both_files_or_neither(tmp_path):
    pairs, summary = generate_pairs("circle", backends=[TemplateBackend()], n_pairs=3, progress=False)
    bad = pairs + [{**pairs[0], "concept_prompt": "a circle \ud800"}]  # past validation: only the writer can stop it
    path = tmp_path / "circle.jsonl"
    with pytest.raises(ValueError, match=r"pairs\[3\].*UTF-8"):
        write_generated(bad, path, summary=summary)
    assert sorted(p.name for p in tmp_path.iterdir()) == []

    write_generated(pairs, path, summary=summary)
    old = path.read_bytes(), summary_path(path).read_bytes()
    with pytest.raises(ValueError, match="UTF-8"):
        write_generated(bad, path, summary=summary, force=True)
    assert (path.read_bytes(), summary_path(path).read_bytes()) == old
    assert sorted(p.name for p in tmp_path.iterdir()) == ["circle.jsonl", "circle.summary.json"]


def test_write_files_atomic_puts_back_what_it_replaced_when_a_later_file_fails(tmp_path):
    from earkit.io import write_files_atomic

    first, blocked = tmp_path / "first.txt", tmp_path / "blocked"
    (blocked / "inside").mkdir(parents=True)  # a non-empty folder: nothing can be renamed over it
    with pytest.raises(OSError):
        write_files_atomic({first: b"new", blocked: b"x"})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["blocked"]
    first.write_bytes(b"old")
    with pytest.raises(OSError):
        write_files_atomic({first: b"new", blocked: b"x"})
    assert first.read_bytes() == b"old" and sorted(p.name for p in tmp_path.iterdir()) == ["blocked", "first.txt"]
    write_files_atomic({first: b"new", tmp_path / "second.txt": b"2"})
    assert first.read_bytes() == b"new" and (tmp_path / "second.txt").read_bytes() == b"2"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["blocked", "first.txt", "second.txt"]


def test_files_with_lone_surrogate_escapes_are_refused_when_read(tmp_path):
    path = tmp_path / "pairs.jsonl"
    path.write_text('{"concept_prompt": "a circle \\ud800", "anchor_prompt": "a square"}\n')
    with pytest.raises(ValueError, match="line 1.*concept_prompt.*lone surrogate"):
        load_pairs(path)
    bench = tmp_path / "bench.jsonl"
    bench.write_text('{"prompt": "a circle \\udfff", "role": "target", "concept": "circle"}\n')
    with pytest.raises(ValueError, match="line 1.*lone surrogate"):
        load_benchmark(bench)


def test_a_concept_or_anchor_that_is_not_utf8_is_refused_before_any_request():
    with pytest.raises(ValueError, match="concept"):
        generate_pairs("circle\udcff", backends=[TemplateBackend()], n_pairs=1, progress=False)
    with pytest.raises(ValueError, match="anchors"):
        generate_pairs("circle", backends=[TemplateBackend()], n_pairs=1, anchors=["sq\udcffuare"], progress=False)


# ---------------------------------------------------------------- 5. the timeout itself


@pytest.mark.parametrize("timeout", ["nan", "inf", "-inf", "0", "-1", "1e12"])
def test_a_timeout_that_is_not_a_positive_finite_number_is_refused_before_any_request(tmp_path, capsys, timeout):
    with Stub(good) as stub:
        status, _, err = cli(["pairs", "--concept", "circle", "--backend", "openai", "--openai-url", stub.url, "--openai-model", "m", "--n", "2",
                              "--out", str(tmp_path / "p.jsonl"), "--quiet", f"--timeout={timeout}"], capsys)
        assert stub.requests == []
    assert status == 2
    one_line_error(err, "earkit pairs: error:", "--timeout")
    assert list(tmp_path.iterdir()) == []
    for value in (math.nan, math.inf, 0, -1, True):
        with pytest.raises(ValueError, match="timeout"):
            OpenAIChatBackend("http://127.0.0.1:1/v1", "m", timeout=value)


# ---------------------------------------------------------------- the same failures, elsewhere


LONG_NUMBER = "1" * 5000  # Python converts at most 4300 digits: a plain ValueError, not a JSONDecodeError


def test_a_number_too_long_to_read_is_a_malformed_reply_or_a_value_error_naming_the_file(tmp_path):
    reply = '[{"original_prompt": "a red circle", "modified_prompt": "a red square", "n": ' + LONG_NUMBER + "}]"
    with pytest.raises(MalformedReply, match="number too long"):
        extract_pair_list(reply)
    path = tmp_path / "long.jsonl"
    path.write_text('{"concept_prompt": "a circle", "anchor_prompt": "a square", "n": ' + LONG_NUMBER + "}\n")
    for reader in (load_pairs, load_benchmark):
        with pytest.raises(ValueError, match="line 1: a JSON number too long") as error:
            reader(path)
        assert str(path) in str(error.value)


def deepest_parsable() -> int:
    """The deepest list json.loads reads from here (it depends on the stack in use)."""
    low, high = 1, 5000
    while low < high:
        middle = (low + high + 1) // 2
        try:
            json.loads("[" * middle + "]" * middle)
            low = middle
        except RecursionError:
            high = middle - 1
    return low


def at_depth(frames: int, function, *args, **kwargs):
    """function(*args, **kwargs), called `frames` calls deeper in the stack."""
    return at_depth(frames - 1, function, *args, **kwargs) if frames else function(*args, **kwargs)


def test_a_rejected_pair_nested_as_deep_as_json_reads_does_not_stop_the_summary(tmp_path):
    # A field nested just shallower than the reply parser can read parses, and is kept on the
    # rejected pair; json.dumps of the summary needs a few levels more, and fails when the caller
    # writes from a deeper stack than it generated on (50 frames: a framework, a callback). Where
    # the window lies depends on the stack, so every depth up to the parser's limit is tried.
    from earkit.ecgvf.pair_generation import CONCEPT_MISSING

    class Nested:
        name, model = "nested", "deep-field"

        def __init__(self, below_limit):
            self.below_limit = below_limit

        def complete(self, messages, *, seed, temperature, max_tokens):
            depth = deepest_parsable() - self.below_limit
            rejected = ('{"original_prompt": "a red square", "modified_prompt": "a red star", "extra": '
                        + "[" * depth + "]" * depth + "}")
            return "[" + rejected + ", " + pairs_reply(seed)[1:]

    parsed = 0
    for below_limit in range(13):
        pairs, summary = generate_pairs("circle", backends=[Nested(below_limit)], n_pairs=2, retries=0,
                                        max_requests=1, progress=False)
        if summary["rejected"] != {CONCEPT_MISSING: 1}:
            continue  # too deep for the reply parser from here: a malformed reply
        parsed += 1
        path = at_depth(50, write_generated, pairs, tmp_path / f"circle{below_limit}.jsonl", summary=summary)
        written = json.loads(summary_path(path).read_text())
        assert written["rejected_pairs"][0]["extra"].startswith("<a JSON list")
        assert written["rejected_pairs"][0]["original_prompt"] == "a red square"
    assert parsed >= 5


class TlsDripServer:
    """A TCP server that answers a TLS client with the header of a 16 kB handshake record, then
    one byte of it every 0.3 s: the handshake never ends, and no single read waits long."""

    def __init__(self):
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"https://127.0.0.1:{self.listener.getsockname()[1]}/v1"
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.serve, daemon=True)

    def serve(self):
        self.listener.settimeout(0.1)
        while not self.stop.is_set():
            try:
                connection, _ = self.listener.accept()
            except OSError:
                continue
            threading.Thread(target=self.drip, args=(connection,), daemon=True).start()

    def drip(self, connection):
        with connection:
            try:
                connection.sendall(b"\x16\x03\x03\x3f\xff")
                started = time.monotonic()
                while not self.stop.is_set() and time.monotonic() - started < 8:
                    connection.sendall(b"\x00")
                    time.sleep(0.3)
            except OSError:
                pass

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join(timeout=5)
        self.listener.close()


def test_a_server_dripping_the_tls_handshake_is_cut_at_the_deadline():
    # A guard more than a regression test: ssl already bounds a whole handshake by the socket
    # timeout, which the deadline sets to the time left before connecting.
    with TlsDripServer() as server:
        backend = OpenAIChatBackend(server.url, "m", api_key=KEY, timeout=1)
        started = time.monotonic()
        with pytest.raises(BackendError, match="within 1 s"):
            backend.complete(MESSAGES, seed=0, temperature=0, max_tokens=8)
        assert time.monotonic() - started < 3


def test_earkit_filter_writes_its_two_files_together_or_not_at_all(tmp_path, monkeypatch):
    from ecgvf_helpers import StubJudge, rendered
    from earkit.ecgvf.filter import decisions_path, filter_pairs, write_filter_results
    from earkit.engine.pair_files import PromptPair

    pairs = [PromptPair("a red circle", "a red square", "circle", "square")]
    records = filter_pairs(pairs, StubJudge(), [[rendered("circle")]], [[rendered("square")]])
    out = tmp_path / "kept.jsonl"
    real_replace = __import__("os").replace

    def failing_replace(source, target):  # the disk fills up as the second file goes in
        if str(target) == str(out):
            raise OSError(28, "No space left on device")
        return real_replace(source, target)

    monkeypatch.setattr("os.replace", failing_replace)
    with pytest.raises(OSError, match="No space"):
        write_filter_results(records, out)
    assert list(tmp_path.iterdir()) == []  # no decisions file claiming pairs that were never written
    monkeypatch.undo()
    kept, decisions = write_filter_results(records, out)
    assert decisions == decisions_path(out) and load_pairs(kept) == pairs
