"""HttpJudge against a real HTTP server on 127.0.0.1 (http.server in a thread).

The stub answers each request with the next scripted action — a chat-completions reply, a bare
status, garbage, or a reply that comes after a delay — and records what it was sent, so the
tests count requests and retries on both sides.
"""

from __future__ import annotations

import json
import pickle
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from actors.core.judges import HttpJudge, HttpJudgeError, JudgeInput
from actors.core.judges.http_judge import SYSTEM_PROMPT, parse_judgment


@dataclass
class Reply:
    """One scripted answer: HTTP status, body, extra headers, and a delay before sending."""

    status: int = 200
    body: str = ""
    headers: dict[str, str] = field(default_factory=dict)
    delay_s: float = 0.0


def chat(content: str) -> Reply:
    """A well-formed chat-completions reply whose message is ``content``."""
    return Reply(body=json.dumps({"choices": [{"message": {"role": "assistant",
                                                           "content": content}}]}))


def verdict(choice: str, confidence: float = 0.8, rationale: str = "because") -> Reply:
    return chat(json.dumps({"choice": choice, "confidence": confidence,
                            "rationale": rationale}))


def delayed(reply: Reply, seconds: float) -> Reply:
    return replace(reply, delay_s=seconds)


class Stub:
    """The server's state: scripted replies (or a function of the request) and requests seen."""

    def __init__(self) -> None:
        self.script: list[Reply] = []
        self.respond: Callable[[dict[str, Any]], Reply] | None = None
        self.requests: list[tuple[str, dict[str, str], dict[str, Any]]] = []
        self.lock = threading.Lock()
        self.url = ""

    def next_reply(self, body: dict[str, Any]) -> Reply:
        with self.lock:
            if self.script:
                return self.script.pop(0)
        assert self.respond is not None, "the stub ran out of scripted replies"
        return self.respond(body)


def _handler(stub: Stub) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            with stub.lock:
                stub.requests.append((self.path, dict(self.headers), body))
            reply = stub.next_reply(body)
            time.sleep(reply.delay_s)
            data = reply.body.encode()
            try:
                self.send_response(reply.status)
                for key, value in reply.headers.items():
                    self.send_header(key, value)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)
            except (BrokenPipeError, ConnectionResetError):
                pass  # the client timed out and left

        def log_message(self, *args: Any) -> None:
            pass

    return Handler


@pytest.fixture
def stub() -> Iterator[Stub]:
    state = Stub()
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(state))
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, args=(0.02,), daemon=True)
    thread.start()
    state.url = f"http://127.0.0.1:{server.server_address[1]}/v1"
    yield state
    server.shutdown()
    server.server_close()


ITEM = JudgeInput("What is 2+2?", "4", "5")


def make(stub: Stub, **kwargs: Any) -> HttpJudge:
    options = {"model": "judge-model", "api_key": "sekret", "timeout_s": 2.0, "retries": 3,
               "backoff_s": 0.01, "max_backoff_s": 0.05} | kwargs
    return HttpJudge(stub.url, **options)


def test_good_json_is_a_verdict_and_the_request_is_a_chat_completion(stub):
    stub.script = [verdict("a", 0.9, "4 is right")]
    judge = make(stub)
    [out] = judge.judge([ITEM])
    assert (out.choice, out.confidence, out.rationale) == ("a", 0.9, "4 is right")
    assert (judge.stats.requests, judge.stats.retries, judge.stats.abstained) == (1, 0, 0)
    [(path, headers, body)] = stub.requests
    assert path == "/v1/chat/completions"
    assert headers["Authorization"] == "Bearer sekret"
    assert body["model"] == "judge-model" and body["temperature"] == 0.0
    system, user = body["messages"]
    assert (system["role"], system["content"]) == ("system", SYSTEM_PROMPT)
    assert user["content"] == ("<prompt>\nWhat is 2+2?\n</prompt>\n\n<response_a>\n4\n"
                               "</response_a>\n\n<response_b>\n5\n</response_b>")


def test_no_key_sends_no_authorization_header(stub):
    stub.script = [verdict("tie", 0.5)]
    assert make(stub, api_key=None).judge([ITEM])[0].choice == "tie"
    assert "Authorization" not in stub.requests[0][1]


@pytest.mark.parametrize("reply", [
    chat("I think A is better."),  # prose
    chat('{"choice": "c", "confidence": 0.5, "rationale": "x"}'),  # no such choice
    chat('{"choice": "a", "confidence": 1.7, "rationale": "x"}'),  # out of [0, 1]
    chat('{"choice": "a", "confidence": "high"}'),  # not a number
    chat('{"choice": "a", "confidence": true}'),  # a bool is not a number
    chat('["a", 0.9]'),  # JSON, but not an object
    Reply(body="<html>oops</html>"),  # HTTP 200 that is not JSON
    Reply(body='{"id": "x", "choices": []}'),  # no message at all
])
def test_garbage_abstains_without_retrying(stub, reply):
    stub.script = [reply]
    judge = make(stub)
    [out] = judge.judge([ITEM])
    assert (out.choice, out.confidence) == (None, 0.0)
    assert (judge.stats.requests, judge.stats.retries, judge.stats.abstained) == (1, 0, 1)
    assert len(stub.requests) == 1


def test_json_inside_prose_or_a_code_fence_is_read():
    fenced = parse_judgment('```json\n{"choice": "b", "confidence": 0.6, "rationale": "r"}\n```')
    assert (fenced.choice, fenced.confidence) == ("b", 0.6)
    wrapped = parse_judgment('Sure! {"choice": "A", "confidence": 1, "rationale": "r"} Done.')
    assert (wrapped.choice, wrapped.confidence) == ("a", 1.0)
    assert parse_judgment('{"choice": "a", "confidence": 0.5}').rationale == ""


def test_500_then_success_is_retried_once(stub):
    stub.script = [Reply(status=500, body="boom"), verdict("b", 0.7)]
    judge = make(stub)
    [out] = judge.judge([ITEM])
    assert (out.choice, out.confidence) == ("b", 0.7)
    assert (judge.stats.requests, judge.stats.retries) == (2, 1)
    assert len(stub.requests) == 2


def test_429_waits_as_retry_after_says_up_to_the_cap(stub):
    stub.script = [Reply(status=429, headers={"Retry-After": "30"}),
                   Reply(status=503), verdict("a")]
    waits: list[float] = []
    judge = make(stub, backoff_s=0.01, max_backoff_s=0.05, sleep=waits.append)
    assert judge.judge([ITEM])[0].choice == "a"
    # Retry-After 30 s is capped at 0.05 s; then the exponential backoff 0.01 · 2^1
    assert waits == [0.05, 0.02]
    assert (judge.stats.requests, judge.stats.retries) == (3, 2)


def test_persistent_5xx_abstains_after_the_configured_retries(stub):
    stub.respond = lambda body: Reply(status=502)
    judge = make(stub, retries=2)
    [out] = judge.judge([ITEM])
    assert out.abstained and out.rationale == "gave up after 2 retries: HTTP 502"
    assert (judge.stats.requests, judge.stats.retries, judge.stats.abstained) == (3, 2, 1)
    assert len(stub.requests) == 3


def test_slow_beyond_timeout_retries_then_abstains(stub):
    stub.respond = lambda body: delayed(verdict("a"), 1.5)
    judge = make(stub, timeout_s=0.2, retries=2)
    start = time.perf_counter()
    [out] = judge.judge([ITEM])
    elapsed = time.perf_counter() - start
    assert out.abstained and out.rationale == "gave up after 2 retries: timed out after 0.2s"
    assert (judge.stats.requests, judge.stats.retries) == (3, 2)
    assert 0.6 <= elapsed < 3.0  # three 0.2 s timeouts and two short backoffs, not 3 × 1.5 s


def test_slow_once_then_fast_succeeds(stub):
    stub.script = [delayed(verdict("a"), 1.0), verdict("b")]
    judge = make(stub, timeout_s=0.3, retries=1)
    assert judge.judge([ITEM])[0].choice == "b"
    assert judge.stats.retries == 1


def test_connection_refused_is_retried_then_abstains():
    with socket.socket() as sock:  # a port that nothing listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    judge = HttpJudge(f"http://127.0.0.1:{port}/v1", "m", retries=2, backoff_s=0.01)
    [out] = judge.judge([ITEM])
    assert out.abstained and out.rationale.startswith("gave up after 2 retries: transport")
    assert (judge.stats.requests, judge.stats.retries) == (3, 2)


@pytest.mark.parametrize("status", [400, 401, 403, 404])
def test_configuration_errors_raise_at_once(stub, status):
    stub.script = [Reply(status=status, body='{"error": "nope"}')]
    judge = make(stub)
    with pytest.raises(HttpJudgeError, match=f"returned HTTP {status}.*api_key_env"):
        judge.judge([ITEM])
    assert (judge.stats.requests, judge.stats.retries) == (1, 0)


def test_concurrent_requests_keep_the_input_order(stub):
    def respond(body: dict[str, Any]) -> Reply:
        user = body["messages"][1]["content"]
        return delayed(verdict("a" if "pick-a" in user else "b"), 0.2)

    stub.respond = respond
    items = [JudgeInput(f"q{i}", "pick-a" if i % 3 == 0 else "x", "y") for i in range(12)]
    judge = make(stub, concurrency=4)
    start = time.perf_counter()
    out = judge.judge(items)
    assert [j.choice for j in out] == ["a" if i % 3 == 0 else "b" for i in range(12)]
    assert judge.stats.requests == 12
    # one at a time would take 12 × 0.2 s; four in flight take about 3 × 0.2 s
    assert time.perf_counter() - start < 1.8


def test_a_used_judge_pickles_without_its_connection_pool(stub):
    stub.respond = lambda body: verdict("a")
    judge = make(stub)
    judge.judge([ITEM])
    clone = pickle.loads(pickle.dumps(judge))
    assert clone._client is None
    assert clone.judge([ITEM])[0].choice == "a"
    judge.close()
